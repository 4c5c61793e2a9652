"""``refrag serve``: an OpenAI-compatible chat-completions endpoint that answers with REFRAG,
decoding on a vLLM server (see docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..config import CHROMA_SERVER_TIMEOUT_S, DEFAULT_COLLECTION, SERVE_MAX_REQUEST_BYTES, SERVE_PORT
from .common import BACKEND_HELP, BASE_URL_HELP
from .validation import check_server_timeout


def serve(
    base_url: Optional[str] = typer.Option(None, "--base-url", help=BASE_URL_HELP),
    backend: str = typer.Option("vllm", "--backend", help=BACKEND_HELP),
    checkpoint: Optional[str] = typer.Option(None, help="REFRAG checkpoint (default: the packaged one, if any)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(SERVE_PORT, help="Port to listen on."),
    index_dir: Optional[Path] = typer.Option(
        None, "--index", help="Index built by `refrag index` to retrieve from when a request gives no passages."
    ),
    chroma_host: Optional[str] = typer.Option(None, "--chroma-host", help="Chroma server host, instead of --index."),
    chroma_port: int = typer.Option(8000, "--chroma-port", help="Chroma server port."),
    server_timeout: float = typer.Option(
        CHROMA_SERVER_TIMEOUT_S, "--server-timeout", help="Seconds each call to the Chroma server (--chroma-host) may take.",
        callback=check_server_timeout,
    ),
    collection: str = typer.Option(DEFAULT_COLLECTION, help="Prefix of the Chroma collections."),
    model_name: str = typer.Option("refrag", "--model-name", help="Model name reported to clients."),
    max_request_bytes: int = typer.Option(SERVE_MAX_REQUEST_BYTES, help="Larger request bodies are refused (HTTP 413)."),
) -> None:
    """Serve POST /v1/chat/completions (messages + passages, or retrieval from --index), GET /health
    and GET /v1/models; REFRAG assembles here, the decoder backend decodes."""
    from .common import check_backend, connect_backend

    if max_request_bytes < 1024:
        raise typer.BadParameter(f"--max-request-bytes must be at least 1024, got {max_request_bytes}.")
    decoder_backend = check_backend(backend, base_url)
    from ..engine import RefragEngine
    from ..serving import make_server

    engine = RefragEngine.from_pretrained(checkpoint)
    connect_backend(engine, decoder_backend)
    retrieve = None
    if index_dir is not None or chroma_host is not None:
        from ..index import SentenceEmbedder
        from ..config import DEFAULT_EMBEDDER
        from .index import open_store

        store = open_store(engine, index_dir, chroma_host, chroma_port, collection, must_exist=True,
                           timeout=server_timeout)
        embedder = SentenceEmbedder(store.embedder_name() or DEFAULT_EMBEDDER)
        store.attach(engine)

        def retrieve(question: str, top_k: int) -> list[str]:
            return [h.text for h in store.search(question, top_k, embedder=embedder)]

    server = make_server(engine, decoder_backend, host=host, port=port, retrieve=retrieve, model_name=model_name,
                         max_request_bytes=max_request_bytes)
    typer.echo(f"serving http://{host}:{server.server_address[1]}/v1/chat/completions "
               f"(decoder: {decoder_backend or 'in-process'}; Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
