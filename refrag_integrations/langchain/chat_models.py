"""The decoding side of REFRAG for LangChain: a chat model and a text-completion LLM.

:class:`ChatRefrag` renders the messages with the decoder's chat template; the engine then finds
every passage registered by :class:`~refrag_integrations.langchain.RefragRetriever` (or
:class:`~refrag_integrations.langchain.RefragCompressor`) inside that prompt and compresses
exactly those, per the decisions made at retrieval time; every other character of the prompt
(instructions, question, template markup, unregistered documents) stays ordinary tokens. A
prompt without registered passages is ordinary generation on the decoder.

Usage is reported honestly: ``usage_metadata.input_tokens`` counts the decoder positions the
prompt actually used (what the KV cache holds); ``response_metadata["prompt_tokens"]`` is the
token count of the same prompt uncompressed; ``response_metadata["refrag"]`` has the engine's
full stats (chunks compressed / expanded, TTFT, query-time encoding, whether the projector was
trained); ``response_metadata["refrag_passages"]`` says how many passages were registered for this
request, found in the prompt (whitespace may differ) and compressed.

Only this request's registrations are compressed (see :mod:`refrag_integrations.registrations`):
concurrent requests that share a passage keep their own decisions, and a passage of an earlier
turn in the chat history stays tokens.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from typing import Any, AsyncIterator, Iterator, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
from langchain_core.runnables.config import run_in_executor
from pydantic import ConfigDict, Field, field_validator

from ..adapter_arguments import renamed_settings
from ..config import DEFAULT_MAX_NEW_TOKENS
from ..engine import GenerationResult, PreparedInput, RefragEngine
from ..registrations import cut_passages, engines_with_registrations, match_prompt
from ._engine import RefragEngineFields
from .retrievers import check_expand_fraction, check_max_expanded, check_policy

# Options a single call may override, e.g. ``llm.invoke(msgs, max_tokens=16)`` or ``.bind(...)``
# (``expand`` / ``budget``: deprecated names of policy / expand_fraction, max_expanded).
CALL_OPTIONS = ("max_tokens", "temperature", "top_p", "seed", "policy", "expand_fraction", "max_expanded")

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "function": "function"}
# Content blocks an earlier assistant turn may carry that are not text and not input media.
_SKIPPED_AI_BLOCKS = {"reasoning", "thinking", "tool_call", "tool_call_chunk", "tool_use", "invalid_tool_call"}


# --------------------------------------------------------------------------- helpers


def message_text(message: BaseMessage) -> str:
    """The text of a message. REFRAG decoders read text only: an image, audio or file block is
    refused with a ValueError; reasoning and tool-call blocks of earlier AI turns are skipped."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and message.type == "ai" and block.get("type") in _SKIPPED_AI_BLOCKS:
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"REFRAG chat models read text only; a {message.type} message has a {kind!r} content block. "
                "Send text content."
            )
    return "".join(parts)


def render_messages(engine: RefragEngine, messages: Sequence[BaseMessage]) -> tuple[str, bool]:
    """Render messages with the decoder's chat template (with the generation prompt).

    Returns the prompt and whether the tokenizer's special tokens (BOS) must still be added: a
    chat template writes its own; without one, a plain ``role: text`` layout is used and BOS is
    added.
    """
    if not messages:
        raise ValueError("No messages to answer: give at least one message.")
    chat = []
    for m in messages:
        if not isinstance(m, BaseMessage):
            raise TypeError(f"messages must be langchain messages, got {type(m).__name__}.")
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
        if role is None:
            raise ValueError(f"Unsupported message type {m.type!r}; use system, human, ai or tool messages.")
        chat.append({"role": role, "content": message_text(m)})
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), False
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in chat) + "assistant:", True


def check_option(name: str, value: Any) -> Any:
    """Validate one generation option (at construction and per call); returns it unchanged."""
    if name == "policy":
        return check_policy(value)
    if name == "expand_fraction":
        return check_expand_fraction(value)
    if name == "max_expanded":
        return check_max_expanded(value)
    if name == "max_tokens" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {value!r}.")
    if name == "temperature" and value is not None and (not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"temperature must be a number >= 0 (0 or None = greedy), got {value!r}.")
    if name == "top_p" and (not isinstance(value, (int, float)) or not 0.0 < value <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {value!r}.")
    if name == "seed" and value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"seed must be an integer or None, got {value!r}.")
    return value


# --------------------------------------------------------------------------- shared base


class RefragGenerationFields(RefragEngineFields):
    """Generation settings shared by :class:`ChatRefrag` and :class:`RefragLLM`, and the code
    that runs the engine for one prompt (sync, streaming, async streaming)."""

    model_config = ConfigDict(populate_by_name=True)

    policy: Any = Field(
        default=None,
        description="Expansion policy for the passages found in the prompt. None: the decisions "
        "registered by the retriever (passages registered without one follow the engine's default "
        "policy). 'all': ordinary full-context decoding (every chunk stays tokens) - the baseline. "
        "'none', 'random', 'relevance', 'perplexity-desc' or an ExpansionPolicy: that policy, ignoring "
        "registered decisions.",
    )
    expand_fraction: float | None = Field(
        default=None, description="Expand fraction p for a policy (None: the engine's default)."
    )
    max_expanded: int | None = Field(
        default=None, description="At most this many chunks kept as tokens (None: the engine's default)."
    )
    max_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, description="Maximum number of tokens to generate.")
    temperature: float | None = Field(
        default=None, description="Sampling temperature; None or 0 = greedy decoding."
    )
    top_p: float = Field(default=1.0, description="Nucleus sampling mass (with temperature > 0).")
    seed: int | None = Field(default=None, description="Seed for sampling (None: 0).")
    stop: list[str] | None = Field(
        default=None, description="Stop sequences (generation ends before them); a call's stop replaces these."
    )

    @field_validator(*CALL_OPTIONS)
    @classmethod
    def _check_option(cls, value: Any, info: Any) -> Any:
        return check_option(info.field_name, value)

    # ------------------------------------------------------------------ settings

    @property
    def resolved_model_name(self) -> str:
        """The name reported in metadata and traces: the decoder's."""
        return self._decoder_name()

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Merge call-time options over the instance's; refuse unknown ones."""
        kwargs = renamed_settings(kwargs)
        unknown = sorted(set(kwargs) - set(CALL_OPTIONS) - {"model"})
        if unknown:
            raise TypeError(f"Unknown option(s) {unknown} for {type(self).__name__}; known: {list(CALL_OPTIONS)}.")
        model = kwargs.get("model")
        if model is not None and model != self.resolved_model_name:
            raise ValueError(
                f"{type(self).__name__} serves one decoder ({self.resolved_model_name!r}); it cannot switch "
                f"to model={model!r}. Build another instance for another model."
            )
        opts = {k: check_option(k, kwargs[k]) if k in kwargs else getattr(self, k) for k in CALL_OPTIONS}
        temperature = opts["temperature"]
        stops = list(stop) if stop is not None else list(self.stop or [])
        if any(not isinstance(s, str) for s in stops):
            raise TypeError(f"stop must be a list of strings, got {stops!r}.")
        return {
            "policy": opts["policy"],
            "expand_fraction": opts["expand_fraction"],
            "max_expanded": opts["max_expanded"],
            "gen": {
                "max_new_tokens": opts["max_tokens"],
                "do_sample": bool(temperature),
                "temperature": temperature or 1.0,
                "top_p": opts["top_p"],
                "stop": stops,
                "seed": opts["seed"],
            },
        }

    def _identifying(self) -> dict[str, Any]:
        return {
            "model_name": self.resolved_model_name,
            "checkpoint": self.checkpoint,
            "chunk_size": self.chunk_size,
            "policy": self.policy if self.policy is None or isinstance(self.policy, str) else repr(self.policy),
            "expand_fraction": self.expand_fraction,
            "max_expanded": self.max_expanded,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ running the engine

    def _prompt(self, engine: RefragEngine, inputs: Any) -> tuple[str, bool, str, str]:
        """(prompt text, add special tokens, current turn, question) for the subclass's input
        type: the current turn is where this request's registrations are recognised (see
        :func:`~refrag_integrations.registrations.match_prompt`); the question is what a
        query-aware policy compares chunks with."""
        raise NotImplementedError

    def _input_text(self, inputs: Any) -> str:
        """The user's text in ``inputs``, before any template (to find registered passages)."""
        raise NotImplementedError

    def _engine_for(self, inputs: Any) -> RefragEngine:
        """The engine for this request. Without ``engine=`` and without settings, that is the
        engine a retriever registered this prompt's passages on (so ``RefragRetriever(engine=e)``
        and a plain ``ChatRefrag()`` share ``e``), else the shared default engine. A prompt whose
        passages were registered only on another engine than the one named here is refused:
        decoding it would load a second engine and compress nothing."""
        text = self._input_text(inputs)  # refuses empty input before anything is loaded
        if self.engine is not None:
            return self.engine
        ours = self.loaded_engine()
        holders = {}
        for e in engines_with_registrations():
            if (latest := match_prompt(e, text, text).latest) > 0:
                holders[e] = latest
        if not holders or ours in holders:
            return ours if ours is not None else self.get_engine()
        if not self.named_settings():  # the engine of the latest retrieval for this prompt
            return max(holders, key=holders.__getitem__)
        named = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.named_settings()) or "no settings"
        raise ValueError(
            f"The passages in this prompt were registered on {len(holders)} other RefragEngine(s) (by a "
            f"retriever given engine=... or other settings), not on the engine of this "
            f"{type(self).__name__} ({named}); it would compress none of them. Give the retriever and "
            f"{type(self).__name__} the same engine=, or the same settings."
        )

    def _prepare(
        self, engine: RefragEngine, inputs: Any, options: dict[str, Any]
    ) -> tuple[PreparedInput, dict[str, int]]:
        """The mixed input, and the ``refrag_passages`` counts for response metadata."""
        prompt, add_special, current, question = self._prompt(engine, inputs)
        match = match_prompt(engine, prompt, current)
        if match.registered and not match.found:
            warnings.warn(
                f"{match.registered} passage(s) were registered for this question but none was found in "
                f"the prompt, so nothing is compressed. Keep each document's page_content intact in "
                f"format_docs (whitespace may change; words may not).",
                UserWarning,
                stacklevel=2,
            )
        query = cut_passages(question, match)
        policy = options["policy"]
        prepared = engine.prepare(
            prompt, match.spans, match.decisions(engine, prompt) if policy is None else policy, query=query,
            expand_fraction=options["expand_fraction"], max_expanded=options["max_expanded"],
            add_special_tokens=add_special,
        )
        chunks = [len(engine.chunk(prompt[a:b])) for a, b in match.spans]
        return prepared, match.summary(prepared.stats.expanded, chunks)

    def _result_metadata(
        self, engine: RefragEngine, result: GenerationResult, passages: dict[str, int]
    ) -> tuple[UsageMetadata, dict[str, Any]]:
        s = result.stats
        usage = UsageMetadata(
            input_tokens=s.positions, output_tokens=s.new_tokens, total_tokens=s.positions + s.new_tokens
        )
        meta = {
            "model_name": str(engine.config.decoder),
            "finish_reason": result.finish_reason,
            "prompt_tokens": s.prompt_tokens,
            "ttft_s": s.ttft_s,
            "refrag": s.to_dict(),
            "refrag_passages": passages,
        }
        return usage, meta

    def _run(
        self, inputs: Any, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[UsageMetadata, dict[str, Any], GenerationResult]:
        """Generate for one input; returns (usage, response metadata, result)."""
        options = self._options(stop, kwargs)
        engine = self._engine_for(inputs)
        t0 = time.perf_counter()  # after loading: TTFT never includes model loading
        prepared, passages = self._prepare(engine, inputs, options)
        result = engine.generate_prepared([prepared], t_start=t0, **options["gen"])[0]
        return (*self._result_metadata(engine, result, passages), result)

    def _run_stream(self, inputs: Any, stop: list[str] | None, kwargs: dict[str, Any]) -> Iterator[str | tuple]:
        """Yields text pieces, then (usage, response metadata, result)."""
        options = self._options(stop, kwargs)
        engine = self._engine_for(inputs)
        t0 = time.perf_counter()
        prepared, passages = self._prepare(engine, inputs, options)
        stream = engine.stream_prepared(prepared, t_start=t0, **options["gen"])
        yield from stream
        yield (*self._result_metadata(engine, stream.result, passages), stream.result)

    async def _arun_stream(
        self, inputs: Any, stop: list[str] | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[str | tuple]:
        """Async twin of :meth:`_run_stream`: loading, assembly and decoding run in a worker
        thread; text pieces reach the event loop through a queue, so the loop never blocks."""
        options = self._options(stop, kwargs)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(_: int, piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        def work() -> tuple:
            engine = self._engine_for(inputs)
            t0 = time.perf_counter()
            prepared, passages = self._prepare(engine, inputs, options)
            result = engine.generate_prepared([prepared], t_start=t0, on_text=on_text, **options["gen"])[0]
            return (*self._result_metadata(engine, result, passages), result)

        task = asyncio.ensure_future(run_in_executor(None, work))
        # Runs on the loop after every piece the worker queued before finishing.
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
        finally:
            if not task.done():  # the consumer stopped early: let the worker finish quietly
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        yield await task


# --------------------------------------------------------------------------- chat model


class ChatRefrag(RefragGenerationFields, BaseChatModel):
    """A LangChain chat model that decodes with REFRAG.

    Construction is cheap: the engine is the one given (``engine=``), or the process-wide shared
    engine for the named settings (``model=`` is ``decoder=``), loaded on first use. Without
    either, it is the engine the retriever registered the prompt's passages on, so
    ``RefragRetriever(engine=e)`` and ``ChatRefrag()`` share ``e``; a chat model naming other
    settings than that engine is refused. Unknown arguments raise a TypeError that names the
    right one (``max_new_tokens=`` -> ``max_tokens=``).

    Example:
        >>> from refrag_integrations.langchain import ChatRefrag, RefragRetriever
        >>> llm = ChatRefrag(max_tokens=32)                                 # REFRAG decoding
        >>> baseline = ChatRefrag(policy="all", max_tokens=32)              # full-context decoding
        >>> chain = (
        ...     {"context": RefragRetriever(base_retriever=retriever) | format_docs,
        ...      "question": RunnablePassthrough()}
        ...     | prompt | llm | StrOutputParser()
        ... )                                                               # doctest: +SKIP
        >>> chain.invoke("Who wrote Hamlet?")                               # doctest: +SKIP
        >>> msg = llm.invoke("Hello")                                       # doctest: +SKIP
        >>> msg.usage_metadata["input_tokens"], msg.response_metadata["prompt_tokens"]  # doctest: +SKIP
    """

    streaming: bool = Field(default=False, description="Generate through the streaming path on invoke too.")

    @property
    def _llm_type(self) -> str:
        return "refrag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._identifying()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="refrag",
            ls_model_name=kwargs.get("model") or self.resolved_model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    # ------------------------------------------------------------------ prompt

    def render_prompt(self, messages: Sequence[BaseMessage]) -> str:
        """The prompt text the decoder reads for ``messages`` (chat template applied)."""
        return render_messages(self.get_engine(), messages)[0]

    def _prompt(self, engine: RefragEngine, messages: Sequence[BaseMessage]) -> tuple[str, bool, str, str]:
        prompt, add_special = render_messages(engine, messages)
        human = [m for m in messages if m.type == "human"]
        last_ai = max((i for i, m in enumerate(messages) if m.type == "ai"), default=-1)
        current = [m for i, m in enumerate(messages) if m.type == "system" or i > last_ai]
        return prompt, add_special, "\n\n".join(map(message_text, current)), message_text(human[-1]) if human else ""

    def _input_text(self, messages: Sequence[BaseMessage]) -> str:
        if not messages:
            raise ValueError("No messages to answer: give at least one message.")
        texts = [message_text(m) if isinstance(m, BaseMessage) else "" for m in messages]
        if all(isinstance(m, BaseMessage) for m in messages) and not any(t.strip() for t in texts):
            raise ValueError(
                f"The prompt is empty: every message has empty text. Give {type(self).__name__} a "
                "message with some text to answer."
            )
        return "\n\n".join(texts)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the decoder's own (local) tokenizer."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.get_engine().tokenize(text, add_special_tokens=False)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens of the rendered prompt, uncompressed (what an ordinary chat model would read)."""
        if tools:
            raise ValueError("ChatRefrag does not support tools, so it cannot count their tokens.")
        engine = self.get_engine()
        prompt, add_special = render_messages(engine, messages)
        return len(engine.tokenize(prompt, add_special_tokens=add_special))

    # ------------------------------------------------------------------ generation

    def _message_chunk(
        self, usage: UsageMetadata, meta: dict[str, Any], result: GenerationResult
    ) -> ChatGenerationChunk:
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last"),
            generation_info={"finish_reason": result.finish_reason},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        usage, meta, result = self._run(messages, stop, kwargs)
        message = AIMessage(content=result.text, usage_metadata=usage, response_metadata=meta)
        generation = ChatGeneration(message=message, generation_info={"finish_reason": result.finish_reason})
        return ChatResult(generations=[generation], llm_output={"model_name": self.resolved_model_name})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for item in self._run_stream(messages, stop, kwargs):
            if isinstance(item, tuple):
                yield self._message_chunk(*item)
                return
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager is not None:
                run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for item in self._arun_stream(messages, stop, kwargs):
            if isinstance(item, tuple):
                yield self._message_chunk(*item)
                return
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=item))
            if run_manager is not None:
                await run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk


# --------------------------------------------------------------------------- text LLM


class RefragLLM(RefragGenerationFields, LLM):
    """A LangChain text-completion LLM that decodes with REFRAG: the prompt string is read as
    is (no chat template; the tokenizer's BOS is added), registered passages inside it are
    compressed. Stats are in each generation's ``generation_info``.

    Example:
        >>> from refrag_integrations.langchain import RefragLLM
        >>> llm = RefragLLM(max_tokens=16)
        >>> llm.invoke("Passage: ...\\nQuestion: Who wrote Hamlet?\\nAnswer:")   # doctest: +SKIP
    """

    @property
    def _llm_type(self) -> str:
        return "refrag-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._identifying()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="refrag",
            ls_model_name=kwargs.get("model") or self.resolved_model_name,
            ls_model_type="llm",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop or [])
        return params

    def _prompt(self, engine: RefragEngine, prompt: str) -> tuple[str, bool, str, str]:
        return prompt, True, self._input_text(prompt), prompt

    def _input_text(self, prompt: str) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}.")
        if not prompt.strip():
            raise ValueError("The prompt is empty: give RefragLLM some text to complete.")
        return prompt

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the decoder's own (local) tokenizer."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.get_engine().tokenize(text, add_special_tokens=False)

    @staticmethod
    def _info(usage: UsageMetadata, meta: dict[str, Any], result: GenerationResult) -> dict[str, Any]:
        return {**meta, "usage": dict(usage)}

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._run(prompt, stop, kwargs)[2].text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            usage, meta, result = self._run(prompt, stop, dict(kwargs))
            generations.append([Generation(text=result.text, generation_info=self._info(usage, meta, result))])
        return LLMResult(generations=generations, llm_output={"model_name": self.resolved_model_name})

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # The engine runs in a worker thread; the stats in generation_info are kept.
        sync_manager = run_manager.get_sync() if run_manager is not None else None
        return await run_in_executor(None, self._generate, prompts, stop, sync_manager, **kwargs)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for item in self._run_stream(prompt, stop, kwargs):
            if isinstance(item, tuple):
                yield GenerationChunk(text="", generation_info=self._info(*item))
                return
            if run_manager is not None:
                run_manager.on_llm_new_token(item)
            yield GenerationChunk(text=item)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for item in self._arun_stream(prompt, stop, kwargs):
            if isinstance(item, tuple):
                yield GenerationChunk(text="", generation_info=self._info(*item))
                return
            if run_manager is not None:
                await run_manager.on_llm_new_token(item)
            yield GenerationChunk(text=item)
