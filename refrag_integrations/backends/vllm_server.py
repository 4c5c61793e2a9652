"""VllmBackend: decode REFRAG's mixed inputs on a vLLM server, through its OpenAI-compatible API.

The engine prepares the mixed input (token embeddings + projected chunk vectors, float32,
``(positions, hidden)``); this backend posts it to ``/v1/completions`` as ``prompt_embeds`` (the
base64 of ``torch.save(tensor)``, what vLLM's ``--enable-prompt-embeds`` reads), streams the
answer back (server-sent events), and fills the request's stats (TTFT is measured from the
request start to the first streamed piece). Stop strings, max tokens and sampling settings go to
the server; greedy decoding (the default) gives the in-process decoder's answer.

Before the first request for an engine it checks that the server serves *this* engine's decoder:
``GET /v1/models`` names the served model; its directory's ``refrag_decoder.json`` (written by
``refrag export decoder``) or its served name (``refrag-decoder-<fingerprint>``) must carry the
fingerprint of the engine's decoder weights (a checkpoint's LoRA merged). Anything else is
refused with :class:`ServedModelMismatchError`, never answered with the wrong weights.

Serve the exported decoder with (vLLM 0.32, CPU or GPU)::

    python -m vllm.entrypoints.openai.api_server --model DIR --enable-prompt-embeds \
        --dtype float32 --max-model-len 4096        # add --enforce-eager on CPU
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ..config import DECODER_FINGERPRINT_FILE, VLLM_CONNECT_TIMEOUT_S, VLLM_READ_TIMEOUT_S
from ..export import SERVED_NAME_PREFIX, decoder_fingerprint, read_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import GenerationResult, PreparedInput, RefragEngine

_FINGERPRINT_IN_NAME = re.compile(re.escape(SERVED_NAME_PREFIX) + r"([0-9a-f]{16})")


class VllmBackendError(RuntimeError):
    """The vLLM server did not answer: down, unreachable, refused the request, or broke the stream.

    A RuntimeError on purpose: LlamaIndex's refine loop swallows ValueError/TypeError from an LLM.
    """


class ServedModelMismatchError(VllmBackendError):
    """The vLLM server serves other decoder weights than the engine's (or cannot show which)."""


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """``prompt_embeds`` as vLLM reads it: base64 of ``torch.save`` of a float32 ``(T, d)`` CPU tensor.

    Example:
        >>> len(encode_prompt_embeds(torch.zeros(3, 4))) > 0
        True
    """
    if embeds.dim() != 2:
        raise ValueError(f"prompt embeddings must be (positions, hidden), got shape {tuple(embeds.shape)}.")
    buf = io.BytesIO()
    torch.save(embeds.detach().to("cpu", torch.float32).contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class VllmBackend:
    """Decode prepared mixed inputs on a vLLM server (``--enable-prompt-embeds``).

    Args:
        base_url: the server's OpenAI-compatible API root, e.g. ``http://localhost:8000/v1``.
        model: the served model name to use (default: the one model the server serves).
        api_key: sent as a bearer token (vLLM ``--api-key``), if the server wants one.
        verify_model: check the served model's decoder fingerprint against the engine's before
            the first request (default True; False trusts the server blindly).
        connect_timeout: seconds to wait for a connection.
        read_timeout: seconds to wait for the next streamed piece.

    Raises:
        ValueError: ``base_url`` is not an ``http(s)://`` URL.

    Example:
        >>> backend = VllmBackend("http://localhost:8000/v1")                          # doctest: +SKIP
        >>> engine.generate_prepared([engine.prepare_rag(q, passages)], backend=backend)  # doctest: +SKIP
    """

    name = "vllm"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        verify_model: bool = True,
        connect_timeout: float = VLLM_CONNECT_TIMEOUT_S,
        read_timeout: float = VLLM_READ_TIMEOUT_S,
    ) -> None:
        import httpx

        if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
            raise ValueError(
                f"base_url must be the vLLM server's API root as an http(s) URL, e.g. "
                f"'http://localhost:8000/v1', got {base_url!r}."
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.verify_model = bool(verify_model)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout), headers=headers
        )
        self._lock = threading.Lock()
        self._served: dict[str, str] = {}  # engine decoder fingerprint -> checked served model name
        self._fingerprints: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"VllmBackend(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    # ------------------------------------------------------------------ HTTP

    def _unreachable(self, err: Exception) -> VllmBackendError:
        return VllmBackendError(
            f"The vLLM server at {self.base_url} is not reachable ({type(err).__name__}: {err}). Start it with "
            "`python -m vllm.entrypoints.openai.api_server --model DIR --enable-prompt-embeds ...` on the directory "
            "written by `refrag export decoder`, or fix --base-url / base_url."
        )

    def _refused(self, path: str, status: int, body: bytes) -> VllmBackendError:
        try:
            payload = json.loads(body)
            detail = payload.get("error", payload)
            detail = detail.get("message", detail) if isinstance(detail, dict) else detail
        except (ValueError, AttributeError):
            detail = body.decode("utf-8", "replace")[:500]
        hint = ""
        if "prompt_embeds" in str(detail) or "embeds" in str(detail):
            hint = " (was the server started with --enable-prompt-embeds?)"
        return VllmBackendError(f"The vLLM server at {self.base_url} refused {path} with HTTP {status}: {detail}{hint}")

    def _get_json(self, path: str) -> Any:
        import httpx

        try:
            response = self._client.get(self.base_url + path)
        except httpx.TransportError as err:
            raise self._unreachable(err) from err
        if response.status_code != 200:
            raise self._refused(path, response.status_code, response.content)
        try:
            return response.json()
        except ValueError as err:
            raise VllmBackendError(f"{self.base_url}{path} did not answer JSON; is base_url a vLLM server's /v1 root?") from err

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST ``body`` with ``stream: true`` and yield each server-sent event's JSON."""
        import httpx

        try:
            with self._client.stream("POST", self.base_url + path, json=body) as response:
                if response.status_code != 200:
                    raise self._refused(path, response.status_code, response.read())
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:  # vLLM reports a failure inside the stream this way
                        err = event["error"]
                        raise VllmBackendError(
                            f"The vLLM server at {self.base_url} failed mid-stream: "
                            f"{err.get('message', err) if isinstance(err, dict) else err}"
                        )
                    yield event
        except httpx.TransportError as err:
            raise self._unreachable(err) from err
        raise VllmBackendError(f"The vLLM server at {self.base_url} closed the stream without [DONE].")

    # ------------------------------------------------------------------ the served model

    def engine_fingerprint(self, engine: "RefragEngine") -> str:
        """The engine's decoder fingerprint (computed once per engine)."""
        with self._lock:
            fp = self._fingerprints.get(engine)
        if fp is None:
            fp = decoder_fingerprint(engine)
            with self._lock:
                self._fingerprints[engine] = fp
        return fp

    def served_model(self, engine: "RefragEngine") -> str:
        """The served model's name, after checking (once per engine decoder) that the server serves
        this engine's decoder weights.

        Raises:
            VllmBackendError: the server is down or serves no model / not the one named by ``model``.
            ServedModelMismatchError: the served decoder is not the engine's, or nothing shows which it is.
        """
        fp = self.engine_fingerprint(engine)
        with self._lock:
            if fp in self._served:
                return self._served[fp]
        models = self._get_json("/models").get("data") or []
        ids = [str(m.get("id")) for m in models]
        if self.model is not None:
            entry = next((m for m in models if m.get("id") == self.model), None)
            if entry is None:
                raise VllmBackendError(f"The vLLM server at {self.base_url} serves {ids}, not model={self.model!r}.")
        elif len(models) == 1:
            entry = models[0]
        else:
            raise VllmBackendError(
                f"The vLLM server at {self.base_url} serves {len(models)} models {ids}; name one with model=."
            )
        if self.verify_model:
            self._check_fingerprint(entry, fp, engine)
        with self._lock:
            self._served[fp] = str(entry["id"])
        return str(entry["id"])

    def _check_fingerprint(self, entry: dict[str, Any], fp: str, engine: "RefragEngine") -> None:
        served = str(entry.get("id"))
        fix = (
            f"Export this engine's decoder with `refrag export decoder CHECKPOINT DIR` (checkpoint of decoder "
            f"{engine.config.decoder!r}) and serve DIR (optionally with --served-model-name {SERVED_NAME_PREFIX}{fp})."
        )
        for where in (entry.get("root"), entry.get("id")):
            card = Path(str(where)) / DECODER_FINGERPRINT_FILE if where else None
            if card is not None and card.is_file():
                try:
                    got = read_fingerprint(card.parent)["decoder_fingerprint"]
                except (ValueError, KeyError, TypeError) as err:
                    raise ServedModelMismatchError(f"{card} has no decoder_fingerprint ({err}). {fix}") from err
                if got != fp:
                    raise ServedModelMismatchError(
                        f"The vLLM server at {self.base_url} serves {served!r}, a decoder with fingerprint {got} "
                        f"({card}), but this engine's decoder (checkpoint deltas/LoRA merged) has fingerprint {fp}: "
                        f"it would answer with other weights. {fix}"
                    )
                return
        named = {m for where in (entry.get("id"), entry.get("root")) for m in _FINGERPRINT_IN_NAME.findall(str(where))}
        if named == {fp}:
            return
        if named:
            raise ServedModelMismatchError(
                f"The vLLM server at {self.base_url} serves {served!r}, named for decoder fingerprint "
                f"{sorted(named)}, but this engine's decoder has fingerprint {fp}. {fix}"
            )
        raise ServedModelMismatchError(
            f"Cannot tell which decoder the vLLM server at {self.base_url} serves: {served!r} (root "
            f"{entry.get('root')!r}) is neither a directory readable here with {DECODER_FINGERPRINT_FILE} nor named "
            f"{SERVED_NAME_PREFIX}<fingerprint>. {fix} To skip this check, use VllmBackend(..., verify_model=False)."
        )

    # ------------------------------------------------------------------ decoding

    def request_body(
        self, model: str, prepared: "PreparedInput", *, max_new_tokens: int, do_sample: bool, temperature: float,
        top_p: float, stop: Sequence[str] | None, seed: int | None, ignore_eos: bool = False,
    ) -> dict[str, Any]:
        """The ``/v1/completions`` request for one prepared input (streamed)."""
        body: dict[str, Any] = {
            "model": model,
            "prompt_embeds": encode_prompt_embeds(prepared.embeds),
            "max_tokens": int(max_new_tokens),
            "temperature": float(temperature) if do_sample else 0.0,
            "top_p": float(top_p) if do_sample else 1.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        stops = [s for s in (stop or []) if s]
        if stops:
            body["stop"] = stops
        if seed is not None:
            body["seed"] = int(seed)
        if ignore_eos:
            body["ignore_eos"] = True
        return body

    def stream_steps(
        self, engine: "RefragEngine", prepared: "PreparedInput", *, t_start: float, ignore_eos: bool = False, **gen: Any
    ) -> Iterator[dict[str, Any]]:
        """Stream one prepared input. Yields ``{"text", "token_ids", "finish_reason", "usage",
        "ttft"}`` per server event (``ttft``: seconds since ``t_start``, on the first piece only).
        ``ignore_eos`` decodes exactly ``max_new_tokens`` (what ``refrag bench`` times)."""
        engine.check_context_window([prepared], gen["max_new_tokens"])
        body = self.request_body(self.served_model(engine), prepared, ignore_eos=ignore_eos, **gen)
        first = True
        for event in self._events("/completions", body):
            choices = event.get("choices") or []
            choice = choices[0] if choices else {}
            ttft = None
            if first and choice:
                ttft, first = time.perf_counter() - t_start, False
            yield {
                "text": choice.get("text") or "",
                "token_ids": list(choice.get("token_ids") or []),
                "finish_reason": choice.get("finish_reason"),
                "usage": event.get("usage"),
                "ttft": ttft,
            }

    def _one(
        self, engine: "RefragEngine", b: int, prepared: "PreparedInput", t_start: float,
        on_text: Callable[[int, str], None] | None, cancel: Callable[[int], bool] | None, gen: dict[str, Any],
    ) -> "GenerationResult":
        from ..engine import GenerationResult

        text, ids, finish, usage, ttft, emitted = "", [], None, None, 0.0, 0
        cancelled = cancel is not None and cancel(b)  # e.g. a stream closed before its request left
        # A generator: the request leaves at its first step; leaving early closes the HTTP
        # response, and vLLM aborts a request whose client disconnected.
        with closing(self.stream_steps(engine, prepared, t_start=t_start, **gen)) as steps:
            for step in () if cancelled else steps:
                if step["ttft"] is not None:
                    ttft = step["ttft"]
                if step["text"]:
                    text += step["text"]
                    # as in process: a piece never ends in half a multi-byte character (U+FFFD)
                    safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
                    if on_text is not None and safe > emitted:
                        on_text(b, text[emitted:safe])
                        emitted = safe
                ids.extend(step["token_ids"])
                finish = step["finish_reason"] or finish
                usage = step["usage"] or usage
                if finish is None and cancel is not None and cancel(b):  # checked at every streamed token
                    cancelled = True
                    break
        if cancelled:
            finish = "cancelled"
        if text.endswith("\ufffd"):
            text = text[:-1]  # half a character at the end (cut short): never shown, as in process
        if on_text is not None and not cancelled and len(text) > emitted:
            on_text(b, text[emitted:])
        eos_ends = not gen.get("ignore_eos")  # with ignore_eos an EOS is one token like any other
        if eos_ends and ids and ids[-1] in engine.eos_ids():
            ids = ids[:-1]  # the engine's token_ids never include the EOS that ended the answer
        new_tokens = len(ids)
        if not ids and usage and usage.get("completion_tokens"):  # a server that returns no token ids
            new_tokens = int(usage["completion_tokens"]) - (1 if eos_ends and finish == "stop" else 0)
        stats = prepared.stats
        stats.ttft_s, stats.total_s, stats.new_tokens = ttft, time.perf_counter() - t_start, new_tokens
        return GenerationResult(text, ids, finish if finish in ("length", "cancelled") else "stop", stats)

    def generate(
        self,
        engine: "RefragEngine",
        prepared: Sequence["PreparedInput"],
        *,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        stop: Sequence[str] | None,
        seed: int | None,
        t_start: float,
        on_text: Callable[[int, str], None] | None = None,
        cancel: Callable[[int], bool] | None = None,
        ignore_eos: bool = False,
    ) -> list["GenerationResult"]:
        """Decode each prepared input on the server (several as concurrent requests, which vLLM
        batches); see :class:`~refrag_integrations.backends.DecoderBackend`.

        ``cancel(row)`` is checked before a row's request and at each token the server streams;
        once true, the row's HTTP response is closed (vLLM aborts a request whose client
        disconnected, freeing its batch slot and KV cache) and the row ends with
        ``finish_reason == "cancelled"``. A consumer that leaves during the prefill is seen at the
        first token."""
        gen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature,
               "top_p": top_p, "stop": stop, "seed": seed, "ignore_eos": ignore_eos}
        engine.check_context_window(prepared, max_new_tokens)  # all rows, before any request
        if len(prepared) == 1:
            return [self._one(engine, 0, prepared[0], t_start, on_text, cancel, gen)]
        with ThreadPoolExecutor(max_workers=len(prepared)) as pool:
            futures = [
                pool.submit(self._one, engine, b, p, t_start, on_text, cancel, gen) for b, p in enumerate(prepared)
            ]
            return [f.result() for f in futures]


__all__ = [
    "ServedModelMismatchError",
    "VllmBackend",
    "VllmBackendError",
    "encode_prompt_embeds",
]
