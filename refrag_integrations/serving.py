"""An OpenAI-compatible chat-completions endpoint for REFRAG (what ``refrag serve`` runs).

Any OpenAI client posts ``/v1/chat/completions`` with its messages plus either ``passages`` (a
list of passage texts) or nothing, in which case the server retrieves ``top_k`` passages from its
index for the last user message. The engine assembles REFRAG's mixed input here and a decoder
backend (normally a vLLM server) decodes it; the answer comes back as a ``chat.completion`` (or
streamed ``chat.completion.chunk`` events with ``"stream": true``), with REFRAG's stats under
``refrag``. ``GET /health`` says whether the decoder backend answers; ``GET /v1/models`` names
the model. Request bodies are bounded (HTTP 413 beyond ``max_request_bytes``).

Request fields beyond OpenAI's: ``passages``, ``top_k``, ``policy`` (``all``, ``none``,
``relevance``, ``random``, ...), ``expand_fraction``, ``max_expanded``. Messages: any system
messages (joined as the instruction) and one user message, the question; earlier turns are
refused (multi-turn RAG is not built).

Example:
    >>> server = make_server(engine, backend, port=8080)                      # doctest: +SKIP
    >>> server.serve_forever()                                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOP_K, SERVE_MAX_REQUEST_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from .backends import DecoderBackend
    from .engine import RefragEngine, TokenStream

logger = logging.getLogger(__name__)

# Retrieval for requests without passages: (question, top_k) -> passage texts.
Retrieve = Callable[[str, int], Sequence[str]]


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """Check a chat-completions request and return what the engine needs.

    Returns:
        ``question``, ``system_prompt`` (None: the default RAG instruction), ``passages`` (None:
        retrieve), ``top_k``, ``policy``, ``expand_fraction``, ``max_expanded``, ``stream`` and
        ``gen`` (the generation settings).

    Raises:
        RequestError: a field is missing, of the wrong type or out of range (the message names it).
    """
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects.")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}.")
        (system if m["role"] in ("system", "developer") else turns).append(m["content"])
    roles = [m["role"] for m in messages if m["role"] not in ("system", "developer")]
    if roles != ["user"]:
        raise RequestError(
            f"Give system messages and exactly one user message (the question); got turns {roles}. "
            "Multi-turn RAG is not supported: put the question in one user message."
        )
    passages = body.get("passages")
    if passages is not None and (not isinstance(passages, list) or not all(isinstance(p, str) and p.strip() for p in passages)):
        raise RequestError("'passages' must be a list of non-empty strings (or left out to retrieve from the index).")
    top_k = body.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise RequestError(f"'top_k' must be an int >= 1, got {top_k!r}.")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_NEW_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"'max_tokens' must be an int >= 1, got {max_tokens!r}.")
    temperature = body.get("temperature", 0.0)
    top_p = body.get("top_p", 1.0)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RequestError(f"'{name}' must be a number >= 0, got {value!r}.")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError(f"'stop' must be a string or a list of strings, got {body.get('stop')!r}.")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an int, got {seed!r}.")
    if body.get("n", 1) != 1:
        raise RequestError("Only n=1 is supported.")
    return {
        "question": turns[0],
        "system_prompt": "\n\n".join(system) if system else None,
        "passages": passages,
        "top_k": top_k,
        "policy": body.get("policy"),
        "expand_fraction": body.get("expand_fraction"),
        "max_expanded": body.get("max_expanded"),
        "stream": bool(body.get("stream", False)),
        "gen": {"max_new_tokens": max_tokens, "do_sample": float(temperature) > 0,
                "temperature": float(temperature) or 1.0, "top_p": float(top_p), "stop": stop, "seed": seed},
    }


def make_server(
    engine: "RefragEngine",
    backend: "DecoderBackend | None",
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    retrieve: Retrieve | None = None,
    model_name: str = "refrag",
    max_request_bytes: int = SERVE_MAX_REQUEST_BYTES,
) -> ThreadingHTTPServer:
    """An HTTP server (one thread per request) answering chat completions with REFRAG.

    Args:
        engine: the engine that assembles the mixed inputs.
        backend: the decoder backend (a vLLM server); None decodes in this process.
        host, port: where to listen (port 0: a free port, see ``server.server_address``).
        retrieve: passages for requests that give none; None: such requests are refused.
        model_name: the name reported in responses and ``/v1/models``.
        max_request_bytes: larger request bodies are refused with HTTP 413.
    """
    from .backends.vllm_server import VllmBackendError

    def health() -> tuple[int, dict[str, Any]]:
        if backend is None:
            return 200, {"status": "ok", "backend": "transformers"}
        try:
            served = backend.served_model(engine) if hasattr(backend, "served_model") else None
        except VllmBackendError as err:
            return 503, {"status": "unavailable", "backend": backend.name, "error": str(err)}
        return 200, {"status": "ok", "backend": backend.name, "served_model": served}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.info("%s " + fmt, self.address_string(), *args)

        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send_json(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self) -> None:
            if self.path in ("/health", "/v1/health"):
                return self._send_json(*health())
            if self.path == "/v1/models":
                return self._send_json(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self._error(404, f"No route {self.path}; use POST /v1/chat/completions, GET /health or GET /v1/models.")

        def do_POST(self) -> None:
            if self.path != "/v1/chat/completions":
                return self._error(404, f"No route {self.path}; use POST /v1/chat/completions.")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._error(411, "Send the request body with a Content-Length header.")
            if int(length) > max_request_bytes:
                self.close_connection = True  # the body is not read
                return self._error(413, f"The request body has {length} bytes; this server takes at most {max_request_bytes}.")
            try:
                body = json.loads(self.rfile.read(int(length)))
                request = parse_chat_request(body)
                self._answer(request)
            except json.JSONDecodeError as err:
                self._error(400, f"The request body is not valid JSON ({err}).")
            except RequestError as err:
                self._error(err.status, str(err))
            except VllmBackendError as err:
                self._error(502, str(err))
            except (ValueError, TypeError) as err:  # the engine's checks: passages, policy, window
                self._error(400, str(err))

        def _answer(self, request: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            passages = request["passages"]
            if passages is None:
                if retrieve is None:
                    raise RequestError("Give 'passages': this server has no index to retrieve from (start it with --index).")
                passages = list(retrieve(request["question"], request["top_k"]))
            prepared = engine.prepare_rag(
                request["question"], passages, request["policy"], expand_fraction=request["expand_fraction"],
                max_expanded=request["max_expanded"], system_prompt=request["system_prompt"],
            )
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            head = {"id": rid, "created": created, "model": model_name}
            if not request["stream"]:
                result = engine.generate_prepared([prepared], t_start=t0, backend=backend, **request["gen"])[0]
                s = result.stats
                return self._send_json(200, {
                    **head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.finish_reason}],
                    "usage": {"prompt_tokens": s.positions, "completion_tokens": s.new_tokens,
                              "total_tokens": s.positions + s.new_tokens},
                    "refrag": s.to_dict(),
                })
            with engine.stream_prepared(prepared, t_start=t0, backend=backend, **request["gen"]) as stream:
                # leaving early (this client went away: a write raises) closes the stream, which
                # closes its connection to vLLM, and vLLM aborts the request
                self._send_stream(stream, head)

        def _send_stream(self, stream: "TokenStream", head: dict[str, Any]) -> None:
            """Send ``stream``'s pieces as ``chat.completion.chunk`` events, then ``[DONE]``."""
            pieces = iter(stream)
            first = next(pieces, None)  # a failing backend fails here, before any header is sent
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
                chunk = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant", "content": ""})
            try:
                if first is not None:
                    event({"content": first})
                for piece in pieces:
                    event({"content": piece})
                result = stream.result
                event({}, result.finish_reason, refrag=result.stats.to_dict())
            except (VllmBackendError, ValueError) as err:  # headers are gone: report inside the stream
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(err)}})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return ThreadingHTTPServer((host, port), Handler)


__all__ = ["RequestError", "make_server", "parse_chat_request"]
