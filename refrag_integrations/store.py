"""ChunkStore: passages, their retrieval vectors and their precomputed chunk vectors in Chroma.

REFRAG's chunk vectors depend only on the passage, so they are computed once at indexing time and
reused by every query. The store keeps them next to the passages, in one Chroma database:

```
<collection>_passages         one record per passage: id = passage_id(text) (content hash),
                              document = the passage text, embedding = its retrieval vector
                              (cosine space), metadata = source, position, title, words
<collection>_chunks_<fp>      one record per chunk: id = "<passage_id>:<chunk index>",
                              embedding = the pre-projection chunk vector c_i (float32, stored
                              exactly), metadata = passage_id, chunk_index, n_chunks, fingerprint
```

``<fp>`` is the chunk-vector fingerprint (:func:`~refrag_integrations.encoder.compute_chunk_vector_fingerprint`): it changes
whenever the vectors would (encoder weights incl. trained deltas, pooling, k, tokenizers). Each
fingerprint has its own collection (different encoders even have different widths), so vectors of
another fingerprint can never be read by mistake; a store whose vectors were made for another
fingerprint is reported (:class:`FingerprintMismatchError`), not silently used.

The same API works on an embedded database (``ChunkStore(path)``, Chroma's ``PersistentClient``)
and on a Chroma server (``ChunkStore(host=..., port=...)``, ``HttpClient``), e.g. one started with
``chroma run --path DIR --port 8000``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from .chunking import passage_id
from . import index_lock
from .embedder import Embedder
from .config import (
    CHROMA_SERVER_TIMEOUT_S,
    CHUNK_COLLECTION_HNSW,
    DEFAULT_COLLECTION,
    INDEX_LOCK_TIMEOUT_S,
    PASSAGE_COLLECTION_HNSW,
    default_index_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RefragEngine

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
ON_MISMATCH = ("error", "encode")
_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,400}$")


class FingerprintMismatchError(ValueError):
    """The store's chunk vectors were made by another encoder / checkpoint / k / tokenizer."""


class EmbedderMismatchError(ValueError):
    """The store's retrieval vectors were made by another embedder than the one given."""


class ChromaTimeoutError(TimeoutError):
    """A Chroma server did not answer a call within the store's timeout."""


class CorruptIndexError(RuntimeError):
    """An embedded index whose Chroma database (``chroma.sqlite3``) cannot be read: rebuild it."""


# SQLite's SQLITE_CORRUPT (11) and SQLITE_NOTADB (26), as chromadb reports them
_CORRUPT_DB = re.compile(r"\(code: (11|26)\)|database disk image is malformed|file is not a database")


def _is_corrupt(err: Exception) -> bool:
    return bool(_CORRUPT_DB.search(str(err)))


def _chroma_call(method):
    """Turn chromadb's low-level failures into errors that name the store and what to do: a server
    that does not answer in time (:class:`ChromaTimeoutError`), a damaged embedded database
    (:class:`CorruptIndexError`)."""

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def gen_wrapper(self, *args, **kwargs):
            try:
                yield from method(self, *args, **kwargs)
            except Exception as err:
                worded = self._translate(err)
                if worded is err:
                    raise
                raise worded from err
        return gen_wrapper

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            worded = self._translate(err)
            if worded is err:
                raise
            raise worded from err
    return wrapper


@dataclass(frozen=True)
class PassageRecord:
    """A passage as stored: its text and where it came from.

    Attributes:
        text: the passage text exactly as it will appear in prompts (its hash is its id).
        source: the file (or other origin) it was read from.
        position: its index among the passages of that source.
        title: a document title, when the source had one.
    """

    text: str
    source: str = ""
    position: int = 0
    title: str | None = None

    @property
    def id(self) -> str:
        return passage_id(self.text)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"source": self.source, "position": int(self.position), "words": len(self.text.split())}
        if self.title:
            meta["title"] = self.title
        return meta


@dataclass(frozen=True)
class SearchHit:
    """One retrieved passage: id, text, cosine similarity to the query, and its metadata."""

    id: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- fingerprint


def fingerprint_info(engine: "RefragEngine") -> dict[str, Any]:
    """A readable description of an engine's chunk-vector fingerprint (kept with the vectors)."""
    return {
        "encoder": str(engine.config.encoder),
        "decoder": str(engine.config.decoder),
        "k": int(engine.k),
        "pooling": engine.chunk_encoder.pooling,
        "chunk_context": engine.chunk_encoder.chunk_context,
        "dim": int(engine.chunk_encoder.encoder_dim),
    }


def _describe(fp: str, info: Mapping[str, Any] | None) -> str:
    if not info:
        return fp
    keys = ("encoder", "decoder", "k", "pooling")
    return f"{fp} (" + ", ".join(f"{k}={info[k]}" for k in keys if k in info) + ")"


# --------------------------------------------------------------------------- store


class ChunkStore:
    """Passages, retrieval vectors and precomputed chunk vectors in one Chroma database.

    Args:
        path: directory of an embedded Chroma database (created if missing). Default:
            :func:`refrag_integrations.config.default_index_dir` when no ``host`` is given.
        host, port, ssl, headers: a Chroma server instead (``HttpClient``); same API.
        collection: prefix of the Chroma collections (``<collection>_passages``, ...).
        fingerprint: the chunk-vector fingerprint this store reads and writes; usually set by
            :meth:`for_engine` or :meth:`attach`. Needed for the chunk-vector methods only.
        fingerprint_info: a readable description of it, kept in the collection's metadata.
        embedder: the retrieval embedder, for :meth:`search` with text and :meth:`add_passages`.
        on_mismatch: what to do when passages have chunk vectors under another fingerprint only:
            ``"error"`` (raise :class:`FingerprintMismatchError`) or ``"encode"`` (log a warning
            and let the engine encode them at query time). Never are they used.
        client: an existing Chroma client to use instead of opening one.
        writer: (embedded) take the index directory's writer lock before opening it, and keep it
            until :meth:`close`. Without it, the first write takes the lock; it then refuses
            (:class:`~refrag_integrations.index_lock.StaleIndexError`) if another process wrote
            the directory after this process opened it.
        lock_timeout: seconds to wait for another process's writer lock before
            :class:`~refrag_integrations.index_lock.IndexLockedError` (0: do not wait).
        timeout: (server) seconds each call to the Chroma server may take before
            :class:`ChromaTimeoutError`.

    Example:
        >>> store = ChunkStore.for_engine(engine, "/tmp/refrag-index")        # doctest: +SKIP
        >>> store.attach(engine)            # engine now reads precomputed chunk vectors  # doctest: +SKIP
        >>> hits = store.search("who wrote hamlet", top_k=5, embedder=embedder)  # doctest: +SKIP
        >>> engine.generate("who wrote hamlet", [h.text for h in hits])   # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl: bool = False,
        headers: dict[str, str] | None = None,
        collection: str = DEFAULT_COLLECTION,
        fingerprint: str | None = None,
        fingerprint_info: Mapping[str, Any] | None = None,
        embedder: Embedder | None = None,
        on_mismatch: str = "error",
        client: Any = None,
        writer: bool = False,
        lock_timeout: float = INDEX_LOCK_TIMEOUT_S,
        timeout: float = CHROMA_SERVER_TIMEOUT_S,
    ) -> None:
        if path is not None and host is not None:
            raise ValueError("You must specify exactly one of path (embedded Chroma) or host (a Chroma server), not both.")
        if not isinstance(collection, str) or not _COLLECTION_RE.match(collection):
            raise ValueError(
                f"collection must start with a letter or digit and use only [A-Za-z0-9._-], got {collection!r}."
            )
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}.")
        if not isinstance(lock_timeout, (int, float)) or isinstance(lock_timeout, bool) or not lock_timeout >= 0:
            raise ValueError(f"lock_timeout must be a number of seconds >= 0, got {lock_timeout!r}.")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}.")
        self.timeout = float(timeout)
        self.collection = collection
        self.fingerprint = fingerprint
        self.fingerprint_info = dict(fingerprint_info or {})
        self.embedder = embedder
        self.on_mismatch = on_mismatch
        self.lock_timeout = float(lock_timeout)
        # the embedded directory this store writes under the writer lock (None: a server or a given client)
        self.root: Path | None = None
        self._writing: weakref.finalize | None = None
        if client is not None:
            self.location = "the given Chroma client"
        elif host is not None:
            self.location = f"{'https' if ssl else 'http'}://{host}:{port or 8000}"
        else:
            self.root = Path(path) if path is not None else default_index_dir()
            self.location = str(self.root)
        self._lock = threading.RLock()
        self._client = client if client is not None else self._connect(path, host, port, ssl, headers, writer)
        self._passages: Any = None
        self._chunks: Any = None
        self._mismatch_warned = False
        self._max_batch = self._max_batch_size()
        if embedder is not None:
            self.check_embedder(embedder)

    # ------------------------------------------------------------------ construction

    @_chroma_call
    def _max_batch_size(self) -> int:
        return int(self._client.get_max_batch_size())

    def _connect(self, path, host, port, ssl, headers, writer) -> Any:
        try:
            import chromadb
            from chromadb.config import Settings
        except ImportError as err:  # pragma: no cover - chromadb is a core dependency
            raise ImportError("The chunk store needs chromadb: pip install 'chromadb>=1.0'.") from err
        settings = Settings(anonymized_telemetry=False)
        if host is not None:
            import httpx

            try:
                # chromadb's own first calls have no timeout: ask the server once, with ours, first
                httpx.get(f"{self.location}/api/v2/heartbeat", headers=headers, timeout=self.timeout)
                client = chromadb.HttpClient(host=host, port=port or 8000, ssl=ssl, headers=headers, settings=settings)
            except httpx.TimeoutException as err:
                raise self._timeout_error(err) from err
            except Exception as err:  # chromadb raises plain ValueError / httpx errors here
                raise ConnectionError(
                    f"Could not reach a Chroma server at {self.location} ({type(err).__name__}: {err}). "
                    "Start one with `chroma run --path DIR --port PORT`, or use an embedded store (path=...)."
                ) from err
            _set_http_timeout(client, self.timeout)
            return client
        root = self.root
        if root.exists() and not root.is_dir():
            raise ValueError(f"The index path {root} exists and is not a directory.")
        root.mkdir(parents=True, exist_ok=True)
        if writer:  # before Chroma reads anything: this process's view then includes every earlier write
            self.lock_for_writing()
        index_lock.note_opened(root)
        try:
            return chromadb.PersistentClient(path=str(root), settings=settings)
        except Exception as err:  # chromadb raises InternalError with SQLite's message
            if _is_corrupt(err):
                raise self._corrupt_error(err) from err
            raise

    def _translate(self, err: Exception) -> Exception:
        """The error to raise for ``err`` from chromadb (``err`` itself when it needs no words)."""
        import httpx

        if isinstance(err, httpx.TimeoutException):
            return self._timeout_error(err)
        if self.root is not None and not isinstance(err, CorruptIndexError) and _is_corrupt(err):
            return self._corrupt_error(err)
        return err

    def _corrupt_error(self, err: Exception) -> CorruptIndexError:
        return CorruptIndexError(
            f"The index at {self.root} is damaged: Chroma cannot read its database {self.root / 'chroma.sqlite3'} "
            f"({str(err).strip()}). Rebuild it: move the directory away and run `refrag index PATH... --index "
            f"{self.root}` again."
        )

    def _timeout_error(self, err: Exception) -> ChromaTimeoutError:
        return ChromaTimeoutError(
            f"The Chroma server at {self.location} did not answer within the {self.timeout:g} s timeout "
            f"({type(err).__name__}). Check that it is running and not overloaded (a stopped or frozen `chroma run`), "
            "or allow more time: ChunkStore(timeout=...) / --server-timeout."
        )

    # ------------------------------------------------------------------ writer lock

    def lock_for_writing(self, timeout: float | None = None) -> None:
        """Take the embedded index's writer lock (once; kept until :meth:`close` or process exit).
        Every write takes it; call it first to fail early. A no-op for a server or a given client.

        Args:
            timeout: seconds to wait for another writer (default: the store's ``lock_timeout``).

        Raises:
            IndexLockedError: another process holds the lock past ``timeout``.
            StaleIndexError: another process wrote the index after this process opened it.
        """
        with self._lock:
            if self.root is None or self._writing is not None:
                return
            index_lock.acquire(self.root, self.lock_timeout if timeout is None else timeout, on_wait=logger.warning)
            self._writing = weakref.finalize(self, index_lock.release, self.root)  # runs once: close() or GC

    def close(self) -> None:
        """Give back the writer lock, if this store took it (reading stays possible)."""
        with self._lock:
            if self._writing is not None:
                self._writing()
                self._writing = None

    @classmethod
    def for_engine(
        cls, engine: "RefragEngine", path: str | Path | None = None, **kwargs: Any
    ) -> "ChunkStore":
        """A store bound to ``engine``'s chunk-vector fingerprint (other arguments as ``__init__``)."""
        kwargs.setdefault("fingerprint", engine.chunk_vector_fingerprint())
        kwargs.setdefault("fingerprint_info", fingerprint_info(engine))
        return cls(path, **kwargs)

    @_chroma_call
    def attach(self, engine: "RefragEngine", *, write_back: bool = False) -> "ChunkStore":
        """Make ``engine`` read precomputed chunk vectors from this store
        (``engine.vector_source = store.fetch_chunk_vectors``), and with ``write_back`` store the
        vectors it has to encode at query time. Checks the fingerprint first.

        Raises:
            FingerprintMismatchError: the store is bound to another fingerprint than the engine's,
                or (with ``on_mismatch="error"``) its chunk vectors were all made for another one.
        """
        fp = engine.chunk_vector_fingerprint()
        if self.fingerprint is None:
            self.fingerprint, self.fingerprint_info = fp, fingerprint_info(engine)
        elif fp != self.fingerprint:
            raise FingerprintMismatchError(
                f"This ChunkStore is bound to chunk-vector fingerprint {self.fingerprint}, but the engine's is "
                f"{_describe(fp, fingerprint_info(engine))}. Open the store with ChunkStore.for_engine(engine, ...)."
            )
        self.check_fingerprint()
        engine.vector_source = self.fetch_chunk_vectors
        engine.vector_sink = self._write_back if write_back else None
        return self

    # ------------------------------------------------------------------ collections

    @property
    def passages_name(self) -> str:
        return f"{self.collection}_passages"

    def _chunks_prefix(self) -> str:
        return f"{self.collection}_chunks_"

    def _get(self, name: str) -> Any:
        from chromadb.errors import NotFoundError

        try:
            return self._client.get_collection(name, embedding_function=None)
        except NotFoundError:
            return None

    def _passage_collection(self, create_for: Embedder | None = None) -> Any:
        with self._lock:
            if self._passages is None:
                col = self._get(self.passages_name)
                if col is None and create_for is not None:
                    meta = {
                        "refrag": "passages",
                        "format_version": STORE_FORMAT_VERSION,
                        "embedder": create_for.name,
                        "embedder_fingerprint": create_for.fingerprint,
                        "embedder_dim": int(create_for.dim),
                    }
                    col = self._client.get_or_create_collection(
                        self.passages_name, embedding_function=None, metadata=meta,
                        configuration={"hnsw": dict(PASSAGE_COLLECTION_HNSW)},
                    )
                if col is not None:
                    kind = (col.metadata or {}).get("refrag")
                    if kind != "passages":
                        raise ValueError(
                            f"Chroma collection {self.passages_name!r} at {self.location} was not written by "
                            "refrag-integrations; use another collection name."
                        )
                self._passages = col
            return self._passages

    def _require_fingerprint(self) -> str:
        if not self.fingerprint:
            raise ValueError(
                "This ChunkStore has no chunk-vector fingerprint: open it with ChunkStore.for_engine(engine, ...) "
                "or call store.attach(engine) first."
            )
        return self.fingerprint

    def _chunk_collection(self, create: bool = False) -> Any:
        fp = self._require_fingerprint()
        with self._lock:
            if self._chunks is None:
                name = self._chunks_prefix() + fp
                col = self._get(name)
                if col is None and create:
                    meta = {"refrag": "chunk_vectors", "format_version": STORE_FORMAT_VERSION, "fingerprint": fp}
                    meta.update({k: v for k, v in self.fingerprint_info.items() if isinstance(v, (str, int, float, bool))})
                    col = self._client.get_or_create_collection(
                        name, embedding_function=None, metadata=meta,
                        configuration={"hnsw": dict(CHUNK_COLLECTION_HNSW)},
                    )
                self._chunks = col
            return self._chunks

    @_chroma_call
    def check_embedder(self, embedder: Embedder) -> None:
        """Raise :class:`EmbedderMismatchError` if the stored passages were embedded by another model."""
        col = self._passage_collection()
        if col is None:
            return
        meta = col.metadata or {}
        if meta.get("embedder_fingerprint") != embedder.fingerprint:
            raise EmbedderMismatchError(
                f"The index at {self.location} was built with retrieval embedder {meta.get('embedder')!r} "
                f"(fingerprint {meta.get('embedder_fingerprint')}), not {embedder.name!r} (fingerprint "
                f"{embedder.fingerprint}); vectors of different embedders are not comparable. Use the same "
                "embedder, or index into another directory / collection."
            )

    def _batches(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        for i in range(0, len(items), self._max_batch):
            yield items[i : i + self._max_batch]

    # ------------------------------------------------------------------ passages

    @_chroma_call
    def count_passages(self) -> int:
        col = self._passage_collection()
        return 0 if col is None else int(col.count())

    @_chroma_call
    def embedder_name(self) -> str | None:
        """Name of the retrieval embedder the index was built with (None for an empty store)."""
        col = self._passage_collection()
        return None if col is None else (col.metadata or {}).get("embedder")

    @_chroma_call
    def has_passages(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` that are stored passages (one round trip)."""
        col = self._passage_collection()
        if col is None or not ids:
            return set()
        found: set[str] = set()
        for part in self._batches(list(dict.fromkeys(ids))):
            found.update(col.get(ids=list(part), include=[])["ids"])
        return found

    @_chroma_call
    def add_passages(
        self, records: Sequence[PassageRecord], embeddings: np.ndarray, embedder: Embedder | None = None
    ) -> int:
        """Store passages with their retrieval vectors (upsert: writing one twice changes nothing).

        Args:
            records: the passages.
            embeddings: ``(len(records), dim)`` retrieval vectors from ``embedder``.
            embedder: the embedder that made them (default: the store's); recorded with the
                collection, and checked against it.

        Returns:
            The number of records written.
        """
        embedder = embedder or self.embedder
        if embedder is None:
            raise ValueError("add_passages needs the embedder that made the retrieval vectors (embedder=...).")
        if not records:
            return 0
        vecs = np.asarray(embeddings, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape != (len(records), embedder.dim):
            raise ValueError(
                f"embeddings must have shape ({len(records)}, {embedder.dim}) (passages, embedder dim), got {vecs.shape}."
            )
        finite = np.isfinite(vecs).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(
                f"The retrieval vector of passage {records[bad].id} (record {bad}) contains NaN or infinite values; "
                f"refusing to store it (nothing was written). Embed the passage again with {embedder.name!r}."
            )
        self.check_embedder(embedder)
        self.lock_for_writing()
        col = self._passage_collection(create_for=embedder)
        for start in range(0, len(records), self._max_batch):
            part = records[start : start + self._max_batch]
            col.upsert(
                ids=[r.id for r in part],
                embeddings=vecs[start : start + len(part)],
                documents=[r.text for r in part],
                metadatas=[r.metadata() for r in part],
            )
        return len(records)

    @_chroma_call
    def get_passages(self, ids: Sequence[str]) -> dict[str, PassageRecord]:
        """The stored passages among ``ids``, by id."""
        col = self._passage_collection()
        if col is None or not ids:
            return {}
        out: dict[str, PassageRecord] = {}
        for part in self._batches(list(dict.fromkeys(ids))):
            got = col.get(ids=list(part), include=["documents", "metadatas"])
            for pid, doc, meta in zip(got["ids"], got["documents"], got["metadatas"]):
                out[pid] = _record(doc, meta)
        return out

    @_chroma_call
    def iter_passages(self, batch_size: int = 256) -> Iterator[list[PassageRecord]]:
        """All stored passages, a page at a time (for re-encoding chunk vectors)."""
        col = self._passage_collection()
        if col is None:
            return
        offset = 0
        while True:
            got = col.get(include=["documents", "metadatas"], limit=batch_size, offset=offset)
            if not got["ids"]:
                return
            yield [_record(doc, meta) for doc, meta in zip(got["documents"], got["metadatas"])]
            offset += len(got["ids"])

    @_chroma_call
    def search(
        self, query: str | np.ndarray | Sequence[float], top_k: int, *, embedder: Embedder | None = None
    ) -> list[SearchHit]:
        """The ``top_k`` passages nearest to ``query`` (a text, embedded with the store's embedder,
        or a retrieval vector), best first, with cosine similarity as score.

        Raises:
            ValueError: the store is empty, ``top_k < 1``, or a text query without an embedder.
        """
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        col = self._passage_collection()
        if col is None or col.count() == 0:
            raise ValueError(f"The index at {self.location} holds no passages; build it with `refrag index PATH`.")
        if isinstance(query, str):
            embedder = embedder or self.embedder
            if embedder is None:
                raise ValueError("A text query needs the retrieval embedder (embedder=...).")
            if not query.strip():
                raise ValueError("The query is empty.")
            self.check_embedder(embedder)
            qvec = np.asarray(embedder.embed([query]), dtype=np.float32)[0]
        else:
            qvec = np.asarray(query, dtype=np.float32).reshape(-1)
        got = col.query(
            query_embeddings=qvec[None, :], n_results=min(top_k, col.count()),
            include=["documents", "metadatas", "distances"],
        )
        return [
            SearchHit(id=pid, text=doc, score=1.0 - float(dist), metadata=dict(meta or {}))
            for pid, doc, meta, dist in zip(got["ids"][0], got["documents"][0], got["metadatas"][0], got["distances"][0])
        ]

    # ------------------------------------------------------------------ chunk vectors

    @_chroma_call
    def write_chunk_vectors(self, vectors: Mapping[str, torch.Tensor | np.ndarray]) -> int:
        """Store pre-projection chunk vectors ``{passage_id: (L, d_enc)}`` under this store's
        fingerprint (upsert: idempotent). Returns the number of chunk vectors written."""
        fp = self._require_fingerprint()
        ids: list[str] = []
        metas: list[dict[str, Any]] = []
        rows: list[np.ndarray] = []
        dim = self.fingerprint_info.get("dim")
        for pid, vec in vectors.items():
            arr = vec.detach().float().cpu().numpy() if isinstance(vec, torch.Tensor) else np.asarray(vec, np.float32)
            if arr.ndim != 2 or arr.shape[0] < 1 or (dim is not None and arr.shape[1] != dim):
                raise ValueError(
                    f"chunk vectors of passage {pid} must have shape (chunks, {dim or 'd_enc'}), got {arr.shape}."
                )
            if not np.isfinite(arr).all():
                raise ValueError(
                    f"The chunk vectors of passage {pid} contain {int((~np.isfinite(arr)).sum())} NaN or infinite "
                    f"value(s) of {arr.size}; refusing to store them (nothing was written). Encode the passage "
                    "again; if the encoder keeps producing them, its weights are damaged."
                )
            n = arr.shape[0]
            for i in range(n):
                ids.append(f"{pid}:{i}")
                metas.append({"passage_id": pid, "chunk_index": i, "n_chunks": n, "fingerprint": fp})
            rows.append(arr.astype(np.float32, copy=False))
        if not ids:
            return 0
        flat = np.concatenate(rows, 0)  # (sum L, d_enc)
        self.lock_for_writing()
        col = self._chunk_collection(create=True)
        for start in range(0, len(ids), self._max_batch):
            end = start + self._max_batch
            col.upsert(ids=ids[start:end], embeddings=flat[start:end], metadatas=metas[start:end])
        return len(ids)

    def _write_back(self, vectors: Mapping[str, torch.Tensor]) -> None:
        """Engine sink: store query-time encodings; a failing write never fails the request."""
        try:
            self.lock_for_writing(timeout=0)  # never make a request wait for another process's indexing
            self.write_chunk_vectors(vectors)
        except Exception as err:  # the answer does not depend on the write-back
            logger.warning("Could not write chunk vectors back to %s: %s", self.location, err)

    def _fetch_rows(self, col: Any, ids: Sequence[str], include: list[str]) -> dict[str, Any]:
        """Chunk rows of the passages ``ids``; ``merged["unreadable"]``: passages whose rows are
        listed but whose vectors Chroma cannot read (its vector index lost them)."""
        from chromadb.errors import InternalError

        merged: dict[str, Any] = {"ids": [], "metadatas": [], "embeddings": [], "unreadable": set()}
        parts = [list(part) for part in self._batches(list(ids))]
        while parts:
            part = parts.pop()
            try:
                got = col.get(where={"passage_id": {"$in": part}}, include=include)
            except InternalError as err:  # "Error finding id": look for the passages it is about, one by one
                if _is_corrupt(err):
                    raise
                if len(part) == 1:
                    merged["unreadable"].add(part[0])
                else:
                    parts.extend([p] for p in part)
                continue
            merged["ids"].extend(got["ids"])
            merged["metadatas"].extend(got["metadatas"] or [])
            if "embeddings" in include and got["embeddings"] is not None:
                merged["embeddings"].extend(list(got["embeddings"]))
        return merged

    @_chroma_call
    def fetch_chunk_vectors(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """Precomputed chunk vectors for many passages in one round trip: ``{passage_id:
        Tensor(L, d_enc)}`` for the passages whose vectors are stored, complete, under this store's
        fingerprint. Compatible with ``engine.vector_source``.

        Raises:
            FingerprintMismatchError: (``on_mismatch="error"``) some of ``ids`` have chunk vectors
                only under another fingerprint.
        """
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        fp = self._require_fingerprint()
        col = self._chunk_collection()
        found: dict[str, torch.Tensor] = {}
        if col is not None:
            got = self._fetch_rows(col, ids, ["embeddings", "metadatas"])
            by_pid: dict[str, dict[int, np.ndarray]] = {}
            sizes: dict[str, int] = {}
            for meta, emb in zip(got["metadatas"], got["embeddings"]):
                if meta.get("fingerprint") != fp:
                    raise FingerprintMismatchError(
                        f"Chunk collection for fingerprint {fp} at {self.location} holds a vector made for "
                        f"{meta.get('fingerprint')}; the index is corrupt. Delete it and index again."
                    )
                pid = meta["passage_id"]
                by_pid.setdefault(pid, {})[int(meta["chunk_index"])] = emb
                sizes[pid] = int(meta["n_chunks"])
            for pid, rows in by_pid.items():
                n = sizes[pid]
                if sorted(rows) != list(range(n)):
                    continue  # an interrupted write: treat as missing, it will be encoded again
                # float32 round trip is exact: Chroma returns the stored float32 values as float64.
                found[pid] = torch.from_numpy(np.stack([rows[i] for i in range(n)]).astype(np.float32))
            if got["unreadable"]:
                logger.warning(
                    "%d passage(s) have chunk vectors that cannot be read in %s; encoding them at query time. "
                    "Repair the index with `refrag index --verify --index %s`.",
                    len(got["unreadable"]), self.location, self.location,
                )
        missing = [pid for pid in ids if pid not in found]
        if missing:
            self._report_mismatch(missing)
        return found

    @_chroma_call
    def unreadable_chunk_vectors(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` whose chunk vectors are listed under this fingerprint but cannot
        be read back (e.g. after two processes wrote an embedded index at once): to be encoded and
        written again. One round trip when all are readable."""
        col = self._chunk_collection()
        if col is None or not ids:
            return set()
        return self._fetch_rows(col, list(dict.fromkeys(ids)), ["embeddings"])["unreadable"]

    @_chroma_call
    def unreadable_passages(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` that are stored passages whose retrieval vector cannot be read back."""
        from chromadb.errors import InternalError

        col = self._passage_collection()
        if col is None or not ids:
            return set()
        bad: set[str] = set()
        parts = [list(part) for part in self._batches(list(dict.fromkeys(ids)))]
        while parts:
            part = parts.pop()
            try:
                col.get(ids=part, include=["embeddings"])
            except InternalError as err:
                if _is_corrupt(err):
                    raise
                if len(part) == 1:
                    bad.add(part[0])
                else:
                    parts.extend([p] for p in part)
        return bad

    @_chroma_call
    def complete_chunk_vectors(self, ids: Sequence[str]) -> set[str]:
        """The subset of ``ids`` whose chunk vectors are stored completely under this fingerprint
        (one metadata-only round trip)."""
        col = self._chunk_collection()
        if col is None or not ids:
            return set()
        got = self._fetch_rows(col, list(dict.fromkeys(ids)), ["metadatas"])
        seen: dict[str, set[int]] = {}
        sizes: dict[str, int] = {}
        for meta in got["metadatas"]:
            seen.setdefault(meta["passage_id"], set()).add(int(meta["chunk_index"]))
            sizes[meta["passage_id"]] = int(meta["n_chunks"])
        return {pid for pid, idx in seen.items() if idx == set(range(sizes[pid]))}

    @_chroma_call
    def fingerprints(self) -> dict[str, dict[str, Any]]:
        """Every chunk-vector fingerprint in this store: ``{fp: {"vectors": count, ...info}}``."""
        out: dict[str, dict[str, Any]] = {}
        prefix = self._chunks_prefix()
        for col in self._client.list_collections():
            name = col if isinstance(col, str) else col.name
            if not name.startswith(prefix):
                continue
            handle = self._get(name)
            if handle is None:
                continue
            info = {k: v for k, v in (handle.metadata or {}).items() if k not in ("refrag", "format_version")}
            info["vectors"] = int(handle.count())
            out[name[len(prefix):]] = info
        return out

    def _other_fingerprints(self) -> dict[str, dict[str, Any]]:
        return {fp: info for fp, info in self.fingerprints().items() if fp != self.fingerprint and info["vectors"]}

    def _mismatch_message(self, others: Mapping[str, Mapping[str, Any]], what: str) -> str:
        theirs = "; ".join(_describe(fp, info) for fp, info in others.items())
        return (
            f"{what} at {self.location} were made for chunk-vector fingerprint {theirs}, but this engine's "
            f"fingerprint is {_describe(self.fingerprint or '?', self.fingerprint_info)}: the encoder weights, "
            "pooling, k or tokenizers differ, so those vectors would be wrong for it. Add vectors for this engine "
            f"with `refrag index --index {self.location}` (re-encodes the stored passages), load the checkpoint the "
            "index was built with, or open the store with on_mismatch='encode' to encode at query time."
        )

    def _report_mismatch(self, missing: Sequence[str]) -> None:
        """Passages without vectors under our fingerprint: fine, unless another fingerprint has them."""
        others = self._other_fingerprints()
        if not others:
            return
        stale = set()
        for fp in others:
            col = self._get(self._chunks_prefix() + fp)
            if col is not None:
                stale.update(m["passage_id"] for m in self._fetch_rows(col, missing, ["metadatas"])["metadatas"])
        if not stale:
            return
        msg = self._mismatch_message(others, f"The chunk vectors of {len(stale)} requested passage(s)")
        if self.on_mismatch == "error":
            raise FingerprintMismatchError(msg)
        if not self._mismatch_warned:
            logger.warning("%s Encoding them at query time.", msg)
            self._mismatch_warned = True

    @_chroma_call
    def check_fingerprint(self) -> None:
        """Report a store whose chunk vectors were all made for another fingerprint.

        Raises:
            FingerprintMismatchError: with ``on_mismatch="error"``, the store holds passages and
                chunk vectors, none of them under this store's fingerprint.
        """
        self._require_fingerprint()
        col = self._chunk_collection()
        if (col is not None and col.count() > 0) or self.count_passages() == 0:
            return
        others = self._other_fingerprints()
        if not others:
            return
        msg = self._mismatch_message(others, "All chunk vectors")
        if self.on_mismatch == "error":
            raise FingerprintMismatchError(msg)
        logger.warning("%s Encoding at query time.", msg)

    @_chroma_call
    def drop_chunk_vectors(self, fingerprint: str) -> None:
        """Delete every chunk vector of ``fingerprint`` (e.g. an encoder no longer used)."""
        self.lock_for_writing()
        with self._lock:
            if self._get(self._chunks_prefix() + fingerprint) is not None:
                self._client.delete_collection(self._chunks_prefix() + fingerprint)
            if fingerprint == self.fingerprint:
                self._chunks = None

    @_chroma_call
    def summary(self) -> dict[str, Any]:
        """Counts: passages, and chunk vectors per fingerprint."""
        return {"location": self.location, "passages": self.count_passages(), "fingerprints": self.fingerprints()}


def _set_http_timeout(client: Any, seconds: float) -> None:
    """Give a chromadb HttpClient's HTTP session a timeout. chromadb (1.x) creates it with
    ``timeout=None`` and offers no setting for it, so a frozen server would block every call forever."""
    import httpx

    session = getattr(getattr(client, "_server", None), "_session", None)
    if not isinstance(session, httpx.Client):
        raise RuntimeError(
            "This chromadb version's HttpClient has no HTTP session where refrag-integrations sets its timeout; "
            "install the chromadb version pinned by refrag-integrations."
        )
    session.timeout = httpx.Timeout(seconds)


def _record(doc: str, meta: Mapping[str, Any] | None) -> PassageRecord:
    meta = meta or {}
    return PassageRecord(text=doc, source=str(meta.get("source", "")), position=int(meta.get("position", 0)),
                         title=meta.get("title"))
