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
import threading
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
from pydantic import ConfigDict, Field, field_validator, model_validator

from ..adapter_arguments import renamed_settings
from ..config import DEFAULT_MAX_NEW_TOKENS
from ..engine import GenerationResult, PreparedInput, RefragEngine, check_temperature, check_top_p
from ..prompt_text import RenderedPrompt, check_prompt, check_text, render_chat
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


def render_messages(engine: RefragEngine, messages: Sequence[BaseMessage]) -> RenderedPrompt:
    """Render messages with the decoder's chat template (with the generation prompt).

    Returns the prompt, its chat-template markup (message texts are user text: a control-token
    string typed in one stays text) and whether the tokenizer's special tokens (BOS) must still
    be added: a chat template writes its own; without one, a plain ``role: text`` layout is
    used, all of it user text, and BOS is added.

    Raises:
        ValueError: no messages, no text in any of them, an empty last human message, or a lone
            surrogate in a message.
    """
    if not messages:
        raise ValueError("No messages to answer: give at least one message.")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, BaseMessage):
            raise TypeError(f"messages must be langchain messages, got {type(m).__name__}.")
        role = m.role if isinstance(m, ChatMessage) else _ROLES.get(m.type)
        if role is None:
            raise ValueError(f"Unsupported message type {m.type!r}; use system, human, ai or tool messages.")
        chat.append({"role": role, "content": check_text(message_text(m), f"message {i} ({m.type})")})
    if messages[-1].type == "human" and not chat[-1]["content"].strip():
        raise ValueError(
            f"The last message (human, message {len(chat) - 1}) is empty, so the prompt is empty: give the question text."
        )
    if not any(m["content"].strip() for m in chat):
        raise ValueError("The messages hold no text, so the prompt is empty: give at least one non-empty message.")
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, chat)
    return RenderedPrompt("".join(f"{m['role']}: {m['content']}\n\n" for m in chat) + "assistant:", [], True)


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
    if name == "temperature" and value is not None:
        check_temperature(value)  # 0 or None = greedy
    if name == "top_p":
        check_top_p(value)
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
    backend: str = Field(
        default="transformers",
        description="Decoder backend: 'transformers' (the engine's in-process decoder) or 'vllm' (a vLLM server "
        "at base_url serving the directory `refrag export decoder` wrote; REFRAG's assembly stays here).",
    )
    base_url: str | None = Field(
        default=None, description="The vLLM server's API root, e.g. 'http://localhost:8000/v1' (backend='vllm')."
    )

    @model_validator(mode="after")
    def _check_backend(self) -> "RefragGenerationFields":
        from ..backends import shared_backend

        shared_backend(self.backend, self.base_url)  # an unknown name or a missing URL fails here, not mid-chain
        return self

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
                "backend": self.decoder_backend(),
            },
        }

    def decoder_backend(self) -> Any:
        """Where this model's prompts are decoded: None (the engine's own choice, by default its
        in-process decoder) or the shared vLLM backend for ``base_url``."""
        from ..backends import shared_backend

        return shared_backend(self.backend, self.base_url)

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
            "backend": self.backend,
            "base_url": self.base_url,
        }

    # ------------------------------------------------------------------ running the engine

    def _prompt(self, engine: RefragEngine, inputs: Any) -> tuple[RenderedPrompt, str, str]:
        """(the rendered prompt, the current turn, the question) for the subclass's input type: the current turn is where this request's registrations are recognised (see
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
        rendered, current, question = self._prompt(engine, inputs)
        prompt = rendered.text
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
            add_special_tokens=rendered.add_special_tokens, markup_spans=rendered.markup_spans,
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
        with engine.batcher.preparing():  # concurrent requests (batch / abatch) wait for it and share a batch
            prepared, passages = self._prepare(engine, inputs, options)
            result = engine.generate_prepared([prepared], t_start=t0, **options["gen"])[0]
        return (*self._result_metadata(engine, result, passages), result)

    def _run_many(
        self, inputs: Sequence[Any], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> list[tuple[UsageMetadata, dict[str, Any], GenerationResult]]:
        """Several inputs with the same options, each as (usage, response metadata, result):
        greedy ones on one engine as one left-padded batch (one prefill, one batched decode);
        sampled ones one by one, so a seeded sample never depends on the other inputs of its
        batch."""
        options = self._options(stop, kwargs)
        if len(inputs) < 2 or options["gen"]["do_sample"]:
            return [self._run(x, stop, dict(kwargs)) for x in inputs]
        engines = [self._engine_for(x) for x in inputs]
        if any(e is not engines[0] for e in engines):  # prompts registered on different engines
            return [self._run(x, stop, dict(kwargs)) for x in inputs]
        engine = engines[0]
        t0 = time.perf_counter()
        ready = [self._prepare(engine, x, options) for x in inputs]
        results = engine.generate_prepared([prepared for prepared, _ in ready], t_start=t0, **options["gen"])
        return [(*self._result_metadata(engine, r, passages), r) for r, (_, passages) in zip(results, ready)]

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
        thread; text pieces reach the event loop through a queue, so the loop never blocks. If the
        consumer stops early (closes the generator, or its task is cancelled), decoding stops."""
        options = self._options(stop, kwargs)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_text(_: int, piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        def work() -> tuple:
            engine = self._engine_for(inputs)
            t0 = time.perf_counter()
            with engine.batcher.preparing():
                prepared, passages = self._prepare(engine, inputs, options)
                result = engine.generate_prepared(
                    [prepared], t_start=t0, on_text=on_text, cancel=cancel, **options["gen"]
                )[0]
            return (*self._result_metadata(engine, result, passages), result)

        task = asyncio.ensure_future(run_in_executor(None, work))
        # Runs on the loop after every piece the worker queued before finishing.
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
        finally:
            if not task.done():  # the consumer stopped early: stop decoding, let the worker end quietly
                cancel.set()
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
        return render_messages(self.get_engine(), messages).text

    def _prompt(self, engine: RefragEngine, messages: Sequence[BaseMessage]) -> tuple[RenderedPrompt, str, str]:
        rendered = render_messages(engine, messages)
        human = [m for m in messages if m.type == "human"]
        last_ai = max((i for i, m in enumerate(messages) if m.type == "ai"), default=-1)
        current = [m for i, m in enumerate(messages) if m.type == "system" or i > last_ai]
        return rendered, "\n\n".join(map(message_text, current)), message_text(human[-1]) if human else ""

    def _input_text(self, messages: Sequence[BaseMessage]) -> str:
        if not messages:
            raise ValueError("No messages to answer: give at least one message.")
        texts = [message_text(m) if isinstance(m, BaseMessage) else "" for m in messages]
        if all(isinstance(m, BaseMessage) for m in messages):
            if messages[-1].type == "human" and not texts[-1].strip():
                raise ValueError(
                    f"The last message (human, message {len(messages) - 1}) is empty, so the prompt is empty: "
                    "give the question text."
                )
            if not any(t.strip() for t in texts):
                raise ValueError(
                    f"The messages hold no text, so the prompt is empty: give {type(self).__name__} at least "
                    "one message with some text to answer."
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
        rendered = render_messages(engine, messages)
        return len(engine.tokenize(rendered.text, rendered.add_special_tokens, markup_spans=rendered.markup_spans))

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

    def _prompt(self, engine: RefragEngine, prompt: str) -> tuple[RenderedPrompt, str, str]:
        check_prompt(prompt)  # all of it user text: no chat template here
        return RenderedPrompt(prompt, [], True), self._input_text(prompt), prompt

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
        # LangChain's batch()/abatch() of an LLM arrive here with all prompts at once.
        generations = [
            [Generation(text=result.text, generation_info=self._info(usage, meta, result))]
            for usage, meta, result in self._run_many(prompts, stop, kwargs)
        ]
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
