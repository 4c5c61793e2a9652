"""RefragLLM: a LlamaIndex LLM that decodes with REFRAG.

It renders what LlamaIndex sends (chat messages through the decoder's chat template, or a
completion prompt), finds the passages that :class:`RefragNodePostprocessor` registered *whole*
inside that prompt, compresses exactly those per their expansion decisions, and leaves every other
character (template, question, a passage that LlamaIndex split across calls) as ordinary tokens.
A prompt without registered passages is ordinary generation on the same decoder.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from typing import Any, Generator, Iterator, List, Optional, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from ..config import DEFAULT_MAX_NEW_TOKENS, PROMPT_RESERVE_TOKENS
from ..engine import GenerationResult, GenerationStats, PreparedInput, RefragEngine
from ..policy import ExpandAll, ExpandNone, ExpansionBudget, ExpansionPolicy, as_budget
from ..prompt_text import RenderedPrompt, check_prompt, check_text, render_chat
from ..registrations import PromptMatch, Registration, cut_passages, match_prompt
from ._engine import EngineSettings, checked_arguments
from ._request import current_registration, stats_sink

STATS_KEY = "refrag_stats"  # key of the stats dict in every response's additional_kwargs
PASSAGES_KEY = "refrag_passages"  # key of {"registered", "found", "compressed"} in additional_kwargs

# LlamaIndex roles that chat templates do not know, mapped onto ones they do.
_ROLES = {"chatbot": "assistant", "model": "assistant", "developer": "system"}
_GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")
_WINDOW_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length")


class ContextWindowExceededError(RuntimeError):
    """A prompt needs more decoder positions than the decoder's window.

    A RuntimeError rather than a ValueError on purpose: LlamaIndex's refine loop catches
    ValueError/TypeError from the LLM and silently answers "Empty Response"; this must surface.
    """


def compressed_context_window(window: int, k: int, expand_fraction: float, reserve: int) -> int:
    """The context window to report to LlamaIndex when passages are compressed.

    ``reserve`` tokens (template, question, answer) stay tokens; the rest of the decoder's window
    holds passage text at the effective compression rate ``k / (1 - p + k p)`` (the paper's rate
    with a fraction p of chunks expanded). A prompt packed to the reported window then fits the
    real one as long as its uncompressed part stays within ``reserve``.

    Example:
        >>> compressed_context_window(8192, 16, 0.0, 320)
        126272
        >>> compressed_context_window(8192, 16, 1.0, 320)
        8192
    """
    if not 0.0 <= expand_fraction <= 1.0:
        raise ValueError(f"expand_fraction must be in [0, 1], got {expand_fraction!r}.")
    if window <= reserve:
        return window
    rate = k / (1.0 - expand_fraction + k * expand_fraction)
    return reserve + int((window - reserve) * rate)


def expected_expand_fraction(policy: "ExpansionPolicy | str", budget: "ExpansionBudget | float | int | None") -> float:
    """The fraction p of chunks a policy keeps as tokens under a budget, for sizing the window:
    ``none`` 0, ``all`` 1, a selective policy its budget's fraction, or 1 (nothing assumed
    compressed) when only a count or no limit is set.

    Example:
        >>> expected_expand_fraction("relevance", 0.25)
        0.25
    """
    name = policy if isinstance(policy, str) else getattr(policy, "name", "")
    if isinstance(policy, ExpandNone) or name == "none":
        return 0.0
    fraction = as_budget(budget).fraction
    if isinstance(policy, ExpandAll) or name == "all" or fraction is None:
        return 1.0
    return float(fraction)


class RefragLLM(EngineSettings, CustomLLM):
    """A LlamaIndex LLM over a :class:`~refrag_integrations.RefragEngine`.

    Use it with :class:`RefragNodePostprocessor` on the same engine (or let
    :class:`RefragQueryEngine` wire both). ``metadata.context_window`` is the decoder's real
    window, so chat memory and everything else LlamaIndex sizes from it keep what the decoder can
    read as tokens; only retrieved text that will be compressed may use more:
    :meth:`prompt_helper` (used by :class:`RefragQueryEngine`) packs nodes into
    :attr:`compressed_window`, the window scaled by the expected compression, so COMPACT
    synthesis puts all retrieved nodes into one call. Every response carries its
    :class:`~refrag_integrations.GenerationStats` as a dict in ``additional_kwargs["refrag_stats"]``
    and ``additional_kwargs["refrag_passages"]`` = how many passages were registered for the
    request, found in the prompt and compressed (see also :attr:`last_stats` and
    :func:`collect_generation_stats`).

    Args:
        engine: the engine shared with the postprocessor (default: the process-wide
            :func:`shared_engine` for ``checkpoint``/``decoder``/``encoder``/``chunk_size``/``device``,
            loaded on first use).
        **kwargs: the fields below. Unknown arguments raise a TypeError that names the right one
            (e.g. ``max_tokens=`` -> ``max_new_tokens=``).

    Example:
        >>> llm = RefragLLM(engine=engine, max_new_tokens=32)                  # doctest: +SKIP
        >>> llm.complete("Who wrote Hamlet?").text                             # doctest: +SKIP
        >>> baseline = RefragLLM(engine=engine, compress=False)  # ordinary decoding, same model  # doctest: +SKIP
    """

    model_name: str = Field(default="", description="Model name reported in metadata; empty = the decoder's name.")
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, gt=0, description="Generation limit (tokens).")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy decoding; > 0 samples at this temperature.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (when sampling).")
    seed: Optional[int] = Field(default=None, description="Random seed for sampling.")
    stop: List[str] = Field(default_factory=list, description="Strings that end generation (not included).")
    compress: bool = Field(
        default=True,
        description="False = ordinary generation on the same decoder: registered passages stay tokens "
        "and the real context window is reported (the full-context baseline).",
    )
    expand_fraction: Optional[float] = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fraction p of passage chunks the postprocessor keeps as tokens; only sets the "
        "reported context window (rate k / (1 - p + k p)). None = from the engine's default policy "
        "and budget.",
    )
    context_window: Optional[int] = Field(
        default=None, gt=0, description="The decoder's real window in positions; None = from its config."
    )
    is_chat: Optional[bool] = Field(
        default=None,
        description="Report a chat model (messages rendered with the decoder's chat template); "
        "None = whether the tokenizer has a chat template.",
    )
    backend: str = Field(
        default="transformers",
        description="Decoder backend: 'transformers' (the engine's in-process decoder) or 'vllm' (a vLLM server "
        "at base_url serving the directory `refrag export decoder` wrote; REFRAG's assembly stays here).",
    )
    base_url: Optional[str] = Field(
        default=None, description="The vLLM server's API root, e.g. 'http://localhost:8000/v1' (backend='vllm')."
    )

    _last_stats: Optional[GenerationStats] = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _tokenizer_lock: Any = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, engine: Optional[RefragEngine] = None, **kwargs: Any) -> None:
        super().__init__(**checked_arguments(type(self), engine, kwargs))
        self.decoder_backend()  # an unknown backend or a missing base_url fails here, not mid-query
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "RefragLLM"

    # ------------------------------------------------------------------ properties

    def decoder_backend(self) -> Any:
        """Where prompts are decoded: None (the engine's own choice, by default its in-process
        decoder) or the shared vLLM backend for ``base_url``."""
        from ..backends import shared_backend

        return shared_backend(self.backend, self.base_url)

    @property
    def last_stats(self) -> Optional[GenerationStats]:
        """Stats of the most recent generation by this object (any thread)."""
        return self._last_stats

    @property
    def decoder_window(self) -> int:
        """The decoder's real context window, in positions."""
        if self.context_window is not None:
            return self.context_window
        cfg = self.engine.decoder.config
        for attr in _WINDOW_ATTRS:
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(
            f"Cannot read the decoder's context window from its config (none of {_WINDOW_ATTRS}); "
            "pass RefragLLM(context_window=...)."
        )

    def expected_expand_fraction(self) -> float:
        """The p used for the reported window: the field, else what the engine's default policy
        and budget imply (see :func:`expected_expand_fraction`)."""
        if self.expand_fraction is not None:
            return self.expand_fraction
        return expected_expand_fraction(self.engine.policy, self.engine.budget)

    @property
    def compressed_window(self) -> int:
        """The window retrieved nodes may be packed into: the decoder's window scaled by the
        expected compression (see :func:`compressed_context_window`); the real window when
        ``compress=False``. Only for packing nodes that the postprocessor registers; everything
        else (chat history, templates) must fit the real window, ``metadata.context_window``."""
        window = self.decoder_window
        if not self.compress:
            return window
        return compressed_context_window(
            window, self.engine.k, self.expected_expand_fraction(), PROMPT_RESERVE_TOKENS + self.max_new_tokens
        )

    def prompt_helper(self, **kwargs: Any) -> PromptHelper:
        """A PromptHelper that packs retrieved nodes into :attr:`compressed_window` and counts
        decoder tokens; give it to a response synthesizer, e.g.
        ``get_response_synthesizer(llm=llm, prompt_helper=llm.prompt_helper())`` (what
        :class:`RefragQueryEngine` does). ``kwargs`` go to ``PromptHelper.from_llm_metadata``."""
        window = LLMMetadata(context_window=self.compressed_window, num_output=self.max_new_tokens)
        return PromptHelper.from_llm_metadata(window, tokenizer=self.tokenize, **kwargs)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.decoder_window,
            num_output=self.max_new_tokens,
            is_chat_model=self._is_chat(),
            model_name=self.model_name or self.engine.config.decoder,
        )

    def tokenize(self, text: str) -> List[int]:
        """Decoder token ids of ``text`` (no special tokens); pass it as a PromptHelper's tokenizer
        so LlamaIndex counts the tokens the decoder will see.

        Uses a private copy of the decoder's tokenizer: a fast tokenizer must not be called from
        two threads at once, and LlamaIndex counts tokens on the event loop's thread while another
        request may be generating, so sharing the engine's (and its lock) would stall the loop."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self.engine.copy_tokenizer()
            # user text: a control-token string in it is counted as the text it is
            return list(self._tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def _is_chat(self) -> bool:
        if self.is_chat is not None:
            return self.is_chat
        return bool(getattr(self.engine.tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ prompt -> mixed input

    def _render_chat(self, messages: Sequence[ChatMessage]) -> RenderedPrompt:
        """The prompt for chat messages: its text, its chat-template markup (message texts are user
        text: a control-token string in one stays text) and whether BOS must still be added.

        Raises:
            ValueError: the prompt is empty (no messages, no text in any, an empty last user
                message), or a message holds a lone surrogate.
        """
        if not messages:
            raise ValueError("No messages to answer, so the prompt is empty: give at least one ChatMessage.")
        for i, m in enumerate(messages):
            check_text(m.content or "", f"message {i} ({m.role.value})")
        if messages[-1].role == MessageRole.USER and not (messages[-1].content or "").strip():
            raise ValueError(
                f"The last message (user, message {len(messages) - 1}) is empty, so the prompt is empty: "
                "give the question text."
            )
        if not any((m.content or "").strip() for m in messages):
            raise ValueError(
                "The messages hold no text, so the prompt is empty: give RefragLLM at least one non-empty message."
            )
        tokenizer = self.engine.tokenizer
        if self._is_chat() and getattr(tokenizer, "chat_template", None):
            turns = [{"role": _ROLES.get(m.role.value, m.role.value), "content": m.content or ""} for m in messages]
            return render_chat(tokenizer, turns)
        return RenderedPrompt(self.messages_to_prompt(messages), [], True)

    def _render_completion(self, prompt: str, formatted: bool) -> RenderedPrompt:
        check_prompt(prompt)
        if formatted:  # already the exact text to decode (LlamaIndex's predict path for non-chat LLMs)
            return RenderedPrompt(prompt, [], True)
        if self._is_chat() and getattr(self.engine.tokenizer, "chat_template", None):
            messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
            if self.system_prompt:
                messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
            return self._render_chat(messages)
        text = self.completion_to_prompt(prompt)
        if self.system_prompt:
            text = f"{self.system_prompt}\n\n{text}"
        return RenderedPrompt(text, [], True)

    def _prepare(
        self, rendered: RenderedPrompt, query: str, registration: Optional[Registration]
    ) -> tuple[PreparedInput, dict]:
        """Compress the passages of this request found in the prompt (those of ``registration``,
        the postprocessing of this query; without one, recognised among the engine's
        registrations by ``query``) with their decisions; the prompt's chat markup stays markup
        and every other character user text. Returns the input and the ``refrag_passages`` counts."""
        engine, prompt = self.engine, rendered.text
        if self.compress:
            only = None if registration is None else [registration]
            match = match_prompt(engine, prompt, query, only=only)
            if only is not None and not match.found:
                # a registration this context kept from an earlier query (or another engine's): its
                # passages are not in this prompt, so recognise this request's among the engine's
                match = match_prompt(engine, prompt, query)
        else:  # the full-context baseline: nothing is looked for
            match = PromptMatch()
        if match.registered and not match.found:
            warnings.warn(
                f"{match.registered} passage(s) were registered for this query but none was found in the "
                "prompt, so nothing is compressed (a node that LlamaIndex split across calls stays tokens; "
                "a custom template must keep node text intact).",
                UserWarning,
                stacklevel=2,
            )
        prepared = engine.prepare(
            prompt, match.spans, match.decisions(engine, prompt), query=cut_passages(query, match),
            add_special_tokens=rendered.add_special_tokens, markup_spans=rendered.markup_spans,
        )
        passages = match.summary(prepared.stats.expanded, [len(engine.chunk(prompt[a:b])) for a, b in match.spans])
        need, window = prepared.stats.positions + self.max_new_tokens, self.decoder_window
        if need > window:
            raise ContextWindowExceededError(
                f"The prompt needs {prepared.stats.positions} decoder positions plus {self.max_new_tokens} "
                f"for the answer, more than the decoder's window of {window}. Only passages registered by "
                f"RefragNodePostprocessor and found whole in the prompt are compressed "
                f"({prepared.stats.chunks_compressed} chunks here); everything else, including a node that "
                "LlamaIndex split across calls, stays tokens. Retrieve fewer or smaller nodes, lower "
                "expand_fraction, or give the synthesizer llm.prompt_helper()."
            )
        return prepared, passages

    def _gen_kwargs(self, overrides: dict) -> dict:
        unknown = sorted(set(overrides) - set(_GEN_KEYS) - {"max_tokens"})
        if unknown:
            raise TypeError(f"Unknown generation arguments {unknown}; RefragLLM accepts {list(_GEN_KEYS)}.")
        gen = {
            "max_new_tokens": overrides.get("max_new_tokens", overrides.get("max_tokens", self.max_new_tokens)),
            "temperature": overrides.get("temperature", self.temperature),
            "top_p": overrides.get("top_p", self.top_p),
            "stop": list(overrides.get("stop", self.stop) or []),
            "seed": overrides.get("seed", self.seed),
        }
        gen["do_sample"] = gen["temperature"] > 0
        gen["temperature"] = gen["temperature"] or 1.0
        gen["backend"] = self.decoder_backend()
        return gen

    def _record(self, stats: GenerationStats, sink: list | None) -> dict:
        self._last_stats = stats
        if sink is not None:
            sink.append(stats)
        return stats.to_dict()

    # ------------------------------------------------------------------ generation (sync cores)

    def _generate(self, rendered: RenderedPrompt, query: str, overrides: dict) -> tuple[GenerationResult, dict]:
        """The result and the response's additional_kwargs (stats and passage counts)."""
        registration, sink = current_registration(), stats_sink()
        gen = self._gen_kwargs(overrides)
        t0 = time.perf_counter()
        with self.engine.batcher.preparing():  # concurrent queries wait for it and share a batch
            prepared, passages = self._prepare(rendered, query, registration)
            result = self.engine.generate_prepared([prepared], t_start=t0, **gen)[0]
        return result, {STATS_KEY: self._record(result.stats, sink), PASSAGES_KEY: passages}

    def _stream(
        self, rendered: RenderedPrompt, query: str, overrides: dict, cancel: threading.Event | None = None
    ) -> Iterator[tuple[str, str, dict | None]]:
        """Yields ``(delta, text so far, None)`` per piece, then ``("", text, additional_kwargs)``
        once. The request's registration and stats sink are taken now; the work starts on the
        first ``next``. Closing the iterator, or setting ``cancel`` (from any thread), stops the
        decoding."""
        registration, sink = current_registration(), stats_sink()
        gen = self._gen_kwargs(overrides)

        def pieces() -> Iterator[tuple[str, str, dict | None]]:
            t0 = time.perf_counter()
            prepared, passages = self._prepare(rendered, query, registration)
            with self.engine.stream_prepared(prepared, t_start=t0, cancel=cancel, **gen) as stream:
                text = ""
                for piece in stream:
                    text += piece
                    yield piece, text, None
            if stream.result is None or stream.result.finish_reason == "cancelled":  # the consumer left
                return
            yield "", text, {STATS_KEY: self._record(stream.result.stats, sink), PASSAGES_KEY: passages}

        return pieces()

    def _complete_response(self, prompt: str, formatted: bool, overrides: dict) -> CompletionResponse:
        result, kwargs = self._generate(self._render_completion(prompt, formatted), prompt, overrides)
        return CompletionResponse(text=result.text, additional_kwargs=kwargs)

    def _complete_stream(
        self, prompt: str, formatted: bool, overrides: dict, cancel: threading.Event | None = None
    ) -> Iterator[CompletionResponse]:
        items = self._stream(self._render_completion(prompt, formatted), prompt, overrides, cancel)  # takes the request's context now
        return _closing_map(
            items,
            lambda delta, so_far, kwargs: CompletionResponse(text=so_far, delta=delta, additional_kwargs=kwargs or {}),
        )

    def _chat_response(self, messages: Sequence[ChatMessage], overrides: dict) -> ChatResponse:
        result, kwargs = self._generate(self._render_chat(messages), _last_user(messages), overrides)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), additional_kwargs=kwargs
        )

    def _chat_stream(
        self, messages: Sequence[ChatMessage], overrides: dict, cancel: threading.Event | None = None
    ) -> Iterator[ChatResponse]:
        items = self._stream(self._render_chat(messages), _last_user(messages), overrides, cancel)
        return _closing_map(
            items,
            lambda delta, so_far, kwargs: ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far),
                delta=delta,
                additional_kwargs=kwargs or {},
            ),
        )

    # ------------------------------------------------------------------ LlamaIndex API

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Generate a completion. ``formatted=True``: ``prompt`` is decoded as is; otherwise it is
        wrapped as a user turn in the decoder's chat template (when it has one)."""
        return self._complete_response(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream a completion; the last item has empty ``delta`` and the stats."""
        return self._complete_stream(prompt, formatted, kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Render ``messages`` with the decoder's chat template and generate the reply."""
        return self._chat_response(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_stream(messages, kwargs)

    # Async versions run the engine in a worker thread, so the event loop keeps serving others.

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete_response, prompt, formatted, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        cancel = threading.Event()
        return _in_thread(self._complete_stream(prompt, formatted, kwargs, cancel), cancel)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat_response, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        cancel = threading.Event()
        return _in_thread(self._chat_stream(messages, kwargs, cancel), cancel)


def _last_user(messages: Sequence[ChatMessage]) -> str:
    """The latest user turn (the query a query-aware policy sees for unregistered decisions)."""
    for m in reversed(messages):
        if m.role == MessageRole.USER:
            return m.content or ""
    return ""


def _closing_map(items: Generator[tuple, None, None], make: Any) -> Iterator[Any]:
    """``make(*item)`` for each item; closing this iterator closes ``items`` (stops the decoding)."""
    try:
        for item in items:
            yield make(*item)
    finally:
        items.close()


async def _in_thread(items: Iterator[Any], cancel: threading.Event):
    """Drive a blocking iterator from a worker thread, one item at a time.

    If the consumer stops early (closes this async generator, or its task is cancelled while a
    worker thread waits for the next item), ``cancel`` stops the decoding at once, and ``items``
    is closed as soon as no thread runs it any more.
    """
    end = object()
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = asyncio.ensure_future(asyncio.to_thread(next, items, end))
            item = await asyncio.shield(pending)  # a cancelled consumer never interrupts next() mid-way
            pending = None
            if item is end:
                return
            yield item
    finally:
        cancel.set()
        if pending is None:
            items.close()
        else:
            pending.add_done_callback(lambda done: _close_after(done, items))


def _close_after(done: asyncio.Future, items: Iterator[Any]) -> None:
    """Close ``items`` once the worker's ``next`` returned; its outcome is no longer wanted."""
    if not done.cancelled():
        done.exception()  # retrieved, so asyncio does not log it as lost
    items.close()
