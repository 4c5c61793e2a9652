"""Micro-batching: concurrent generation requests decoded as one left-padded batch.

Requests that reach an in-process engine together (LangChain ``batch`` / ``abatch`` threads,
concurrent LlamaIndex queries, a server's request handlers) would otherwise decode one after
another. :class:`MicroBatcher` collects them for a short window and hands them to the engine as
one batch: one left-padded prefill, then one batched decode with the KV cache (the engine's
``generate_batch`` machinery). Each request still gets its own text, token ids, finish reason and
stats (TTFT and total time are measured from that request's own start).

What is grouped, and why the answers do not change:

* Only greedy requests with the same ``max_new_tokens``, stop strings and ``ignore_eos`` share a batch; left
  padding with an attention mask and per-row positions gives each row the tokens it would get
  alone. A sampled request always runs alone, so a seeded sample never depends on which other
  requests happened to arrive with it.
* A request whose consumer went away (its ``cancel`` event is set, e.g. an abandoned stream)
  stops within one decoder step; the other rows of its batch carry on.

Limits: a batch returns when its longest answer ends (a short answer waits for the longest of
its batch); rows are not added to a batch that is already decoding (the next batch takes them);
an error of the whole batch (e.g. out of memory) reaches every caller in it. A request too long
for the decoder's window is refused in its caller's thread before it joins a batch.

There is no background thread: the first waiting caller leads, collects what arrived within the
window (at most ``max_batch_size`` rows), runs the batch and hands every caller its result; the
next waiting caller leads the next batch. Requests that queued while a batch was decoding start
as soon as it ends, without another wait.

The first request of a batch waits only for requests that are on their way: announced by
:meth:`MicroBatcher.preparing` (``engine.generate`` and the LangChain and LlamaIndex chat models
announce each request while its input is prepared; streams are not announced) and not yet submitted. It
stops waiting as soon as none is left in preparation, the batch is full, or ``window_s`` has
passed since it arrived; then it runs with every queued request of its kind. So a lone request
runs at once, and a burst of concurrent requests shares one batch (the wait is as long as the
slowest concurrent preparation, at most the window) instead of the first running alone.

The batcher holds its ``run`` function weakly when it is a bound method (the engine's), so a
batcher kept somewhere never keeps a dropped engine (and its decoder's memory) alive; submitting
to a batcher whose engine is gone raises :class:`ReferenceError`.
"""

from __future__ import annotations

import inspect
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .config import DEFAULT_BATCH_WINDOW_S, DEFAULT_MAX_BATCH_SIZE

# run(prepared, t_start=[...], on_text=f(row, piece), cancel=f(row) -> bool, **gen) -> one result per row
RunBatch = Callable[..., list]


class RequestCancelled(RuntimeError):
    """A request was cancelled (its consumer went away) before its batch started."""


@dataclass(eq=False)
class _Job:
    prepared: Any
    gen: dict[str, Any]
    t_start: float
    on_text: Callable[[str], None] | None
    cancel: threading.Event | None
    arrived: float = field(default_factory=time.monotonic)
    result: Any = None
    error: BaseException | None = None
    finished: bool = False
    callback_error: BaseException | None = None  # raised by on_text: the job stops, its caller gets it

    @property
    def alone(self) -> bool:
        """A sampled job never shares a batch (its draws would depend on the other rows)."""
        return bool(self.gen.get("do_sample"))

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys may share a batch: greedy, same length limit, stop strings and EOS rule."""
        if self.alone:
            return ("alone", id(self))
        gen = self.gen
        return ("greedy", gen.get("max_new_tokens"), tuple(gen.get("stop") or ()), bool(gen.get("ignore_eos")))

    def stopped(self) -> bool:
        return self.callback_error is not None or (self.cancel is not None and self.cancel.is_set())


class MicroBatcher:
    """Collects concurrent requests into batches for a ``run`` function (the engine's decoder).

    Args:
        run: decodes a batch: called as ``run(prepared, t_start=[...], on_text=f(row, piece),
            cancel=f(row) -> bool, **gen)`` and returns one result per row. A bound method (the
            engine's) is held weakly: the batcher never keeps its owner alive.
        window_s: the longest the first request of a batch waits for requests announced as
            being prepared (seconds; 0 = never waits, yet still batches requests that queued
            while the previous batch decoded). With nothing announced it never waits.
        max_batch_size: at most this many rows in one batch (1 = one request at a time).

    Both settings are plain attributes and may be changed at any time (``engine.batcher.window_s``).

    Example:
        >>> engine.batcher.window_s, engine.batcher.max_batch_size          # doctest: +SKIP
        (0.25, 16)
    """

    def __init__(
        self, run: RunBatch, *, window_s: float = DEFAULT_BATCH_WINDOW_S, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    ) -> None:
        check_batch_settings(window_s, max_batch_size)
        if not callable(run):
            raise TypeError(f"run must be a callable that decodes a batch, got {type(run).__name__}.")
        # A bound method would keep its owner (the engine, its decoder) alive as long as this batcher.
        self._run: Callable[[], RunBatch | None] = weakref.WeakMethod(run) if inspect.ismethod(run) else (lambda: run)
        self.window_s = float(window_s)
        self.max_batch_size = int(max_batch_size)
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._preparing = 0  # requests announced by preparing(), not yet submitted
        self._announced = threading.local()  # this thread's announcements (tokens), newest last
        self._leading = False  # one caller at a time collects and runs a batch
        self._batches = self._rows = 0  # batches run and rows decoded so far (see totals)

    @property
    def run(self) -> RunBatch:
        """The function that decodes a batch.

        Raises:
            ReferenceError: it was a bound method whose object (the engine) is gone.
        """
        run = self._run()
        if run is None:
            raise ReferenceError("This batcher's engine is gone (it was garbage-collected); use a live engine's batcher.")
        return run

    @property
    def totals(self) -> tuple[int, int]:
        """(batches run, rows decoded) since this batcher was made: the difference of two readings
        gives the mean rows per batch in between (what the throughput benchmark reports)."""
        with self._cond:
            return self._batches, self._rows

    @property
    def queued(self) -> int:
        """How many requests wait for a batch (not counting the batch decoding now)."""
        with self._cond:
            return len(self._pending)

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Announce a request that this thread will submit within the block (e.g. while its input
        is prepared): until it is submitted, a batch about to start waits for it (at most its
        window) instead of running at once. Without announcements, a batch starts at once with
        whatever is queued.

        Example:
            >>> with engine.batcher.preparing():                            # doctest: +SKIP
            ...     prepared = engine.prepare_rag(question, passages)
            ...     result = engine.generate_prepared([prepared])[0]
        """
        token = object()
        announced = self._announced.__dict__.setdefault("tokens", [])
        with self._cond:
            self._preparing += 1
            announced.append(token)
        try:
            yield
        finally:
            with self._cond:
                if token in announced:  # not submitted (e.g. it failed, or went to another backend)
                    announced.remove(token)
                    self._preparing -= 1
                    self._cond.notify_all()

    def submit(
        self,
        prepared: Any,
        *,
        t_start: float,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        **gen: Any,
    ) -> Any:
        """Decode one prepared input, batched with whatever arrives with it; blocks until done.

        Args:
            prepared: the engine's prepared input.
            t_start: when the request started (``time.perf_counter()``), for its TTFT and total time.
            on_text: called with each new piece of text (possibly from another thread, the one
                running the batch: keep it quick, and never generate from inside it). If it
                raises, this request stops and its caller gets the error; the batch carries on.
            cancel: set it to stop this request within one decoder step (its result then has
                ``finish_reason == "cancelled"``).
            **gen: generation settings (``max_new_tokens``, ``do_sample``, ``stop``, ...).

        Returns:
            The run function's result for this request.

        Raises:
            RequestCancelled: ``cancel`` was set before the request's batch started.
            ReferenceError: the engine this batcher decodes for is gone.
        """
        check_batch_settings(self.window_s, self.max_batch_size)  # the attributes may have been changed
        self.run  # noqa: B018 - raises ReferenceError now, before queueing, when the engine is gone
        job = _Job(prepared, gen, t_start, on_text, cancel)
        announced = getattr(self._announced, "tokens", None)
        with self._cond:
            if announced:  # this thread's announced request arrives: one step, so no batch misses it
                announced.pop()
                self._preparing -= 1
            self._pending.append(job)
            self._cond.notify_all()
        try:
            while True:
                with self._cond:
                    while self._leading and not job.finished:
                        self._cond.wait()
                    if job.finished:
                        break
                    self._leading = True
                    try:
                        batch = self._collect()
                    except BaseException:  # e.g. KeyboardInterrupt while waiting out the window
                        self._leading = False
                        self._cond.notify_all()
                        raise
                try:
                    self._execute(batch)
                finally:
                    with self._cond:
                        self._leading = False
                        self._cond.notify_all()
        finally:
            with self._cond:  # e.g. KeyboardInterrupt while waiting: do not leave the job queued
                if job in self._pending:
                    self._pending.remove(job)
        if job.error is not None:
            raise job.error
        return job.result

    def _collect(self) -> list[_Job]:
        """Under the condition: while requests announced by :meth:`preparing` are still being
        prepared, wait for them (at most until the oldest job's window ends, or the batch is
        full); then take the oldest job's batch. With nothing announced, never waits."""
        while True:
            first = self._pending[0]
            same = [j for j in self._pending if j.key == first.key]
            remaining = first.arrived + self.window_s - time.monotonic()
            coming = self._preparing > 0  # announced requests not yet submitted
            if first.alone or not coming or len(same) >= self.max_batch_size or remaining <= 0:
                break
            self._cond.wait(remaining)
        batch = same[: self.max_batch_size]
        self._pending = [j for j in self._pending if j not in batch]
        return batch

    def _execute(self, batch: list[_Job]) -> None:
        """Run ``batch`` (outside the condition) and hand each job its result or error."""
        live = [j for j in batch if not j.stopped()]
        for j in batch:
            if j.stopped():
                j.error = j.callback_error or RequestCancelled("The request was cancelled before it started.")

        def on_text(row: int, piece: str) -> None:
            job = live[row]
            if job.on_text is None or job.callback_error is not None:
                return
            try:
                job.on_text(piece)
            except Exception as err:  # e.g. the consumer's event loop closed: stop this row only
                job.callback_error = err

        failure: BaseException | None = None
        if live:
            with self._cond:
                self._batches += 1
                self._rows += len(live)
            try:
                results = self.run(
                    [j.prepared for j in live], t_start=[j.t_start for j in live], on_text=on_text,
                    cancel=lambda row: live[row].stopped(), **live[0].gen,
                )
                for j, r in zip(live, results, strict=True):
                    j.result, j.error = r, j.callback_error
            except BaseException as err:  # every caller of the batch gets it
                failure = err
                for j in live:
                    j.error = err
        with self._cond:
            for j in batch:
                j.finished = True
            self._cond.notify_all()
        if failure is not None and not isinstance(failure, Exception):
            raise failure  # KeyboardInterrupt / SystemExit also stop the thread that ran the batch


def check_batch_settings(window_s: Any, max_batch_size: Any) -> None:
    """Refuse a negative or non-numeric window and a batch size below 1.

    Raises:
        TypeError / ValueError: naming the bad value.
    """
    if isinstance(window_s, bool) or not isinstance(window_s, (int, float)):
        raise TypeError(f"batch window_s must be a number of seconds, got {window_s!r}.")
    if not (window_s >= 0 and window_s < float("inf")):
        raise ValueError(f"batch window_s must be >= 0 and finite (0 = never wait), got {window_s!r}.")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}.")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (1 = one request at a time), got {max_batch_size}.")

