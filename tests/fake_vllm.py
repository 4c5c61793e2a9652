"""A fake vLLM server for tests: the OpenAI-compatible ``/v1/models`` and streamed
``/v1/completions`` with ``prompt_embeds``, decoding greedily with a Hugging Face model directory.

Its decode loop is deliberately not the engine's: no KV cache (the whole sequence is recomputed
every step), stop strings and EOS handled here, so "the vLLM backend answers like the in-process
engine" compares two implementations, not one with itself.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch


class FakeVllmServer:
    """Serve ``model_dir`` on 127.0.0.1 (a free port) until :meth:`close`.

    Args:
        model_dir: the model to decode with (e.g. a ``refrag export decoder`` directory).
        served_id: the id ``/v1/models`` reports (default: ``model_dir``, as vLLM does).
        root: the root ``/v1/models`` reports (default: ``served_id``).
        pace_s: seconds between two streamed tokens (a slow server, for tests that leave early).
        ignore_eos: decode ``max_tokens`` tokens whatever the request says (a long answer).

    Attributes:
        disconnects: for each streamed answer whose client went away before its end, how many
            token events had been written; ``disconnected`` is set at the first.
        max_in_flight: the most completion requests it was answering at the same time.
    """

    def __init__(
        self, model_dir: Path, served_id: str | None = None, root: str | None = None, *, pace_s: float = 0.0,
        ignore_eos: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.served_id = served_id or str(model_dir)
        self.root = root if root is not None else self.served_id
        self.requests: list[dict[str, Any]] = []
        self.refuse: tuple[int, str] | None = None  # (status, message) to answer every completion with
        self.pace_s, self.ignore_eos = pace_s, ignore_eos
        self.disconnects: list[int] = []
        self.disconnected = threading.Event()
        self.in_flight = self.max_in_flight = 0
        self._count = threading.Lock()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {self.tokenizer.eos_token_id}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                self._json(200, {"object": "list", "data": [{"id": server.served_id, "root": server.root}]})

            def do_POST(self) -> None:
                with server._count:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._complete()
                finally:
                    with server._count:
                        server.in_flight -= 1

            def _complete(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.refuse is not None:
                    return self._json(server.refuse[0], {"error": {"message": server.refuse[1]}})
                if body.get("model") != server.served_id:
                    return self._json(404, {"error": {"message": f"model {body.get('model')!r} does not exist"}})
                embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
                pieces, finish = server.decode(embeds, {**body, "ignore_eos": body.get("ignore_eos") or server.ignore_eos})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, (text, tok) in enumerate(pieces):
                    last = i == len(pieces) - 1
                    choice = {"index": 0, "text": text, "token_ids": [tok], "finish_reason": finish if last else None}
                    try:
                        if i and server.pace_s:
                            time.sleep(server.pace_s)
                        self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):  # the client went away: vLLM aborts here
                        server.disconnects.append(i)
                        server.disconnected.set()
                        return
                usage = {"prompt_tokens": int(embeds.shape[0]), "completion_tokens": len(pieces)}
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @torch.no_grad()
    def decode(self, embeds: torch.Tensor, body: dict[str, Any]) -> tuple[list[tuple[str, int]], str]:
        """Greedy decode; returns (text delta, token id) per generated token and the finish reason."""
        embed = self.model.get_input_embeddings()
        stops = body.get("stop") or []
        ids: list[int] = []
        finish = "length"
        final = None
        for _ in range(int(body["max_tokens"])):
            x = embeds if not ids else torch.cat([embeds, embed(torch.tensor(ids))], 0)  # (T, d)
            tok = int(self.model(inputs_embeds=x.unsqueeze(0)).logits[0, -1].argmax())
            ids.append(tok)
            if tok in self.eos and not body.get("ignore_eos"):
                finish = "stop"
                break
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                final, finish = text[: min(hits)], "stop"
                break
        if final is None:
            final = self.tokenizer.decode(ids, skip_special_tokens=True)
        pieces, sent = [], 0
        for i, tok in enumerate(ids):
            upto = min(len(self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True)), len(final))
            pieces.append((final[sent:upto] if upto > sent else "", tok))
            sent = max(sent, upto)
        return pieces, finish

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
