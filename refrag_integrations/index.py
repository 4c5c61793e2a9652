"""Ingestion: files -> passages -> Chroma (retrieval vectors + precomputed REFRAG chunk vectors).

Text, Markdown, JSON lines (``.jsonl``, also gzipped) and PDF (with ``pypdf``) are read as
streams and cut into passages of roughly 100-200 words on paragraph and sentence boundaries. Each
passage's id is the hash of its text, so indexing is idempotent: a passage already in the store
(with complete chunk vectors for the engine's fingerprint) is skipped. Work goes in batches, chunk
vectors first and the passage record last, so an interrupted run leaves nothing half-visible and
the next run picks up where it stopped, with nothing lost and nothing duplicated.

Bad inputs (a missing path, an empty file, binary junk, text that is not UTF-8, a bad JSON line)
are reported in the :class:`IndexReport` with a clear reason; the other inputs are still indexed.

Example:
    >>> from refrag_integrations import RefragEngine
    >>> from refrag_integrations.index import SentenceEmbedder, index_paths
    >>> from refrag_integrations.store import ChunkStore
    >>> engine = RefragEngine.from_pretrained()                       # doctest: +SKIP
    >>> store = ChunkStore.for_engine(engine, "/tmp/refrag-index")   # doctest: +SKIP
    >>> report = index_paths(["docs/"], store, engine, SentenceEmbedder())  # doctest: +SKIP
    >>> print(report.summary())                                        # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np

from .chunking import chunk_passage
from .config import (
    DEFAULT_EMBEDDER,
    DEFAULT_INDEX_BATCH_SIZE,
    MAX_JSONL_LINE_CHARS,
    MAX_PARAGRAPH_CHARS,
    PASSAGE_MAX_WORDS,
    PASSAGE_MIN_WORDS,
    READ_BLOCK_CHARS,
)
from .store import ChunkStore, PassageRecord

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RefragEngine

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PDF_SUFFIXES
INSTALL_PDF = "pip install 'refrag-integrations[pdf]'  (or: pip install pypdf)"

# A sentence ends at . ! ? (and any closing quotes/brackets) before whitespace that is not
# followed by a lower-case letter ("Jesus Christ and ... the first"); group 1 is the whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s+)(?![a-z])")
_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


class BadInputError(ValueError):
    """A file that cannot be indexed; the message says why and what to do."""


# --------------------------------------------------------------------------- splitting


def split_sentences(text: str) -> list[str]:
    """Split text after ``.``, ``!`` or ``?`` (keeping closing quotes and brackets) where
    whitespace follows.

    Example:
        >>> split_sentences('He said "Hi." Then he left! Why?')
        ['He said "Hi."', 'Then he left!', 'Why?']
    """
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start : m.start(1)].strip()
        if piece:
            out.append(piece)
        start = m.end(1)
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


class PassageSplitter:
    """Cut a stream of paragraphs into passages of ``min_words``..``max_words`` words.

    A passage ends at the first paragraph boundary after it reaches ``min_words``, and never grows
    past ``max_words``: a paragraph that would overflow it is split on sentence boundaries, and a
    sentence longer than ``max_words`` on word boundaries. A short tail at the end of a document is
    merged into the passage before it when the two fit in ``max_words``.

    Example:
        >>> s = PassageSplitter(min_words=3, max_words=6)
        >>> paragraphs = ["One two three four.", "Five six seven.", "Eight nine."]
        >>> [p for para in paragraphs for p in s.feed(para)] + list(s.finish())
        ['One two three four.', 'Five six seven.\\n\\nEight nine.']
    """

    def __init__(self, min_words: int = PASSAGE_MIN_WORDS, max_words: int = PASSAGE_MAX_WORDS) -> None:
        if not isinstance(min_words, int) or not isinstance(max_words, int) or min_words < 1 or max_words < min_words:
            raise ValueError(
                f"passage sizes must satisfy 1 <= min_words <= max_words, got min_words={min_words!r}, "
                f"max_words={max_words!r}."
            )
        self.min_words, self.max_words = min_words, max_words
        self._parts: list[str] = []  # pieces of the passage being built, with their separators
        self._words = 0
        self._held: tuple[str, int] | None = None  # the last full passage, kept for a tail merge

    def _flush(self) -> Iterator[str]:
        if not self._parts:
            return
        text = "".join(self._parts).strip()
        words = self._words
        self._parts, self._words = [], 0
        if self._held is not None:
            yield self._held[0]
        self._held = (text, words)

    def _append(self, piece: str, words: int, new_paragraph: bool) -> None:
        sep = ("\n\n" if new_paragraph else " ") if self._parts else ""
        self._parts.append(sep + piece)
        self._words += words

    def feed(self, paragraph: str, continued: bool = False) -> Iterator[str]:
        """Add one paragraph (``continued``: it goes on the previous one, no boundary between);
        yields the passages it completes."""
        first = True
        for sentence in split_sentences(paragraph):
            words = sentence.split()
            boundary = first and not continued
            first = False
            if boundary and self._words >= self.min_words:
                yield from self._flush()
            if self._words and self._words + len(words) > self.max_words:
                yield from self._flush()
            if len(words) <= self.max_words:
                self._append(sentence, len(words), boundary)
                continue
            for i in range(0, len(words), self.max_words):  # an overlong "sentence": cut on words
                piece = words[i : i + self.max_words]
                if self._words and self._words + len(piece) > self.max_words:
                    yield from self._flush()
                self._append(" ".join(piece), len(piece), boundary and i == 0)

    def finish(self) -> Iterator[str]:
        """End of document: yields what is left."""
        tail = "".join(self._parts).strip()
        tail_words = self._words
        self._parts, self._words = [], 0
        held, self._held = self._held, None
        if held is not None and tail and tail_words < self.min_words and held[1] + tail_words <= self.max_words:
            yield held[0] + "\n\n" + tail
            return
        if held is not None:
            yield held[0]
        if tail:
            yield tail


def split_passages(
    text: str, min_words: int = PASSAGE_MIN_WORDS, max_words: int = PASSAGE_MAX_WORDS
) -> list[str]:
    """Cut a document into passages of ~``min_words``..``max_words`` words (paragraphs are
    separated by blank lines).

    Example:
        >>> split_passages("A short one.\\n\\nAnother paragraph here.", min_words=5, max_words=10)
        ['A short one.\\n\\nAnother paragraph here.']
    """
    splitter = PassageSplitter(min_words, max_words)
    out: list[str] = []
    for para, continued in _paragraphs(((line, False) for line in text.splitlines()), markdown=False):
        out.extend(splitter.feed(para, continued))
    out.extend(splitter.finish())
    return out


# --------------------------------------------------------------------------- reading files


def _lines(stream: TextIO, max_chars: int = MAX_PARAGRAPH_CHARS) -> Iterator[tuple[str, bool]]:
    """Lines of a text stream, read in blocks, as ``(line, goes_on)``: a line longer than
    ``max_chars`` comes out in pieces cut at spaces, all but the last with ``goes_on=True``, so
    memory stays bounded even on a file without newlines."""
    rest = ""
    while True:
        block = stream.read(READ_BLOCK_CHARS)
        if not block:
            break
        rest += block
        lines = rest.split("\n")
        rest = lines.pop()
        for line in lines:
            yield line, False
        while len(rest) > max_chars:
            cut = rest.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            yield rest[:cut], True
            rest = rest[cut:].lstrip(" ")
    if rest:
        yield rest, False


def _paragraphs(lines: Iterable[tuple[str, bool]], markdown: bool) -> Iterator[tuple[str, bool]]:
    """Group ``(line, goes_on)`` pairs into paragraphs (blank-line separated; a Markdown heading
    is a paragraph of its own). Yields ``(paragraph, continued)``: a paragraph longer than
    MAX_PARAGRAPH_CHARS comes out in pieces, all but the first with ``continued=True``."""
    joiner = "\n" if markdown else " "
    buf: list[str] = []
    size = 0
    continued = False
    glue = False  # the previous line went on: join without a separator
    for line, goes_on in lines:
        if not line.strip() and not goes_on:
            if buf:
                yield joiner.join(buf), continued
            buf, size, continued, glue = [], 0, False, False
            continue
        if markdown and not glue and _MD_HEADING.match(line):
            if buf:
                yield joiner.join(buf), continued
            yield line.strip(), False
            buf, size, continued = [], 0, False
            continue
        if glue and buf:
            buf[-1] += " " + line.strip()
        else:
            buf.append(line.strip())
        glue = goes_on
        size += len(line)
        if size > MAX_PARAGRAPH_CHARS:
            yield joiner.join(buf), continued
            buf, size, continued = [], 0, True
    if buf:
        yield joiner.join(buf), continued


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def check_text_file(path: Path) -> None:
    """Make sure a file is non-empty UTF-8 text, reading it once as a stream (bounded memory).

    Raises:
        BadInputError: the file is empty, binary, not UTF-8, or not valid gzip.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    has_text = False
    try:
        with _open_binary(path) as f:
            while True:
                block = f.read(READ_BLOCK_CHARS)
                if not block:
                    break
                if offset == 0 and b"\x00" in block[:8192]:
                    raise BadInputError(
                        f"{path}: binary file (it contains NUL bytes), not text; only UTF-8 text, Markdown, "
                        "JSON lines and PDF files are indexed."
                    )
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as err:
                    at = offset + err.start
                    raise BadInputError(
                        f"{path}: not UTF-8 text (byte 0x{block[err.start]:02x} at offset {at} is invalid). Convert "
                        f"it first, e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`."
                    ) from None
                has_text = has_text or bool(text.strip())
                offset += len(block)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise BadInputError(f"{path}: not UTF-8 text (it ends inside a multi-byte character).") from None
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise BadInputError(f"{path}: cannot be read ({type(err).__name__}: {err}).") from None
    if not has_text:
        raise BadInputError(f"{path}: empty file (no text to index).")


def _open_text(path: Path) -> TextIO:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


@dataclass
class _FileContext:
    path: Path
    problems: list[tuple[str, str]]  # (where, why) for recoverable problems inside the file


def _text_passages(ctx: _FileContext, min_words: int, max_words: int) -> Iterator[PassageRecord]:
    check_text_file(ctx.path)
    markdown = _suffix(ctx.path) in (".md", ".markdown")
    with _open_text(ctx.path) as f:
        yield from _split(ctx, _paragraphs(_lines(f), markdown), min_words, max_words)


def _split(ctx: _FileContext, paragraphs: Iterable[tuple[str, bool]], min_words: int,
           max_words: int) -> Iterator[PassageRecord]:
    """Paragraphs ``(text, continued)`` -> passage records numbered in order within the file."""
    splitter = PassageSplitter(min_words, max_words)
    n = 0
    for para, continued in paragraphs:
        for text in splitter.feed(para, continued):
            yield PassageRecord(text=text, source=str(ctx.path), position=n)
            n += 1
    for text in splitter.finish():
        yield PassageRecord(text=text, source=str(ctx.path), position=n)
        n += 1


def _jsonl_docs(ctx: _FileContext) -> Iterator[tuple[str | None, str]]:
    """(title, text) documents of a JSON-lines file: objects with ``text`` (+ optional ``title``),
    or retrieval-result objects with a ``ctxs`` list of such (e.g. NQ-open with gold passages)."""
    with _open_text(ctx.path) as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_JSONL_LINE_CHARS + 1), ""), 1):
            if len(line) > MAX_JSONL_LINE_CHARS:
                while line and not line.endswith("\n"):  # skip the rest of the overlong line
                    line = f.readline(READ_BLOCK_CHARS)
                ctx.problems.append((f"{ctx.path}:{n}", f"line longer than {MAX_JSONL_LINE_CHARS} characters, skipped"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                ctx.problems.append((f"{ctx.path}:{n}", f"not valid JSON ({err.msg}), skipped"))
                continue
            items = obj.get("ctxs") if isinstance(obj, dict) and isinstance(obj.get("ctxs"), list) else [obj]
            for item in items:
                body = item.get("text") if isinstance(item, dict) else None
                if not isinstance(body, str) or not body.strip():
                    ctx.problems.append((f"{ctx.path}:{n}", "no non-empty 'text' field, skipped"))
                    continue
                title = item.get("title")
                yield (title.strip() if isinstance(title, str) and title.strip() else None), body


def _jsonl_passages(ctx: _FileContext, min_words: int, max_words: int) -> Iterator[PassageRecord]:
    check_text_file(ctx.path)
    n = 0
    for title, body in _jsonl_docs(ctx):
        # A record that already has passage size is kept verbatim (its id is then predictable:
        # passage_id(f"{title}\n{text.strip()}")); longer ones are split.
        pieces = [body.strip()] if len(body.split()) <= max_words else split_passages(body, min_words, max_words)
        for text in pieces:
            full = f"{title}\n{text}" if title else text
            yield PassageRecord(text=full, source=str(ctx.path), position=n, title=title)
            n += 1


def _pdf_passages(ctx: _FileContext, min_words: int, max_words: int) -> Iterator[PassageRecord]:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise BadInputError(f"{ctx.path}: reading PDF needs pypdf: {INSTALL_PDF}") from None
    with open(ctx.path, "rb") as f:
        if f.read(5) != b"%PDF-":
            raise BadInputError(f"{ctx.path}: not a PDF file (no %PDF- header).")
    try:
        reader = PdfReader(str(ctx.path))
        paragraphs = (pc for page in reader.pages for pc in _paragraphs(
            ((line, False) for line in (page.extract_text() or "").splitlines()), markdown=False))
        yield from _split(ctx, paragraphs, min_words, max_words)
    except (PdfReadError, ValueError, KeyError) as err:
        raise BadInputError(f"{ctx.path}: cannot read this PDF ({type(err).__name__}: {err}).") from None


def read_passages(
    path: str | Path,
    min_words: int = PASSAGE_MIN_WORDS,
    max_words: int = PASSAGE_MAX_WORDS,
    problems: list[tuple[str, str]] | None = None,
) -> Iterator[PassageRecord]:
    """Stream the passages of one file (text, Markdown, JSON lines, gzipped JSON lines, PDF).

    Args:
        path: the file.
        min_words, max_words: passage size range.
        problems: if given, recoverable problems inside the file (e.g. a bad JSON line) are
            appended as ``(where, why)`` and the rest of the file is read.

    Raises:
        BadInputError: the file is missing, empty, binary, not UTF-8, or an unreadable PDF.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory.")
    if not path.is_file():
        raise BadInputError(f"{path}: not a regular file.")
    ctx = _FileContext(path, problems if problems is not None else [])
    suffix = _suffix(path)
    if suffix in PDF_SUFFIXES:
        return _pdf_passages(ctx, min_words, max_words)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_passages(ctx, min_words, max_words)
    return _text_passages(ctx, min_words, max_words)


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to index: named files as they are, directories searched recursively for supported
    files (hidden ones skipped), in a stable order. Returns (files, problems)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*")
                if f.is_file() and _suffix(f) in SUPPORTED_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                problems.append((str(path), f"directory holds no {', '.join(SUPPORTED_SUFFIXES)} files"))
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append((str(path), "no such file or directory"))
    return list(dict.fromkeys(files)), problems


# --------------------------------------------------------------------------- retrieval embedder


class SentenceEmbedder:
    """Retrieval embedder: a sentence-transformers model (default: the packaged all-MiniLM-L6-v2,
    offline). Vectors are L2-normalised float32.

    Args:
        name_or_path: ``"all-minilm-l6-v2"`` (offline default), a local directory or a hub id.
        device: ``"cpu"``, ``"cuda"``, ... (default: sentence-transformers' choice).
        batch_size: texts per forward pass.

    Example:
        >>> emb = SentenceEmbedder()                  # doctest: +SKIP
        >>> emb.embed(["hello world"]).shape          # doctest: +SKIP
        (1, 384)
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, device: str | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        from .models import ModelNotFoundError, model_fingerprint, resolve_encoder_path

        self.name = name_or_path
        path = resolve_encoder_path(name_or_path)
        try:
            self.model = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(
                f"Could not load retrieval embedder {name_or_path!r} ({type(err).__name__}: {err}). Use the offline "
                f"default {DEFAULT_EMBEDDER!r}, a local sentence-transformers directory, or a cached hub id."
            ) from err
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.fingerprint = model_fingerprint(self.model)
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not a single str.")
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vecs = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vecs, dtype=np.float32)


# --------------------------------------------------------------------------- indexing


@dataclass
class IndexReport:
    """What an indexing run did.

    Attributes:
        files: files read completely.
        passages: distinct passages read.
        added: passages newly written to the store.
        present: passages that were already indexed (skipped).
        chunks: chunk vectors written.
        repaired: stored passages whose vectors could not be read back, written again.
        seconds: wall time of the run.
        problems: ``(where, why)`` for every input that was skipped, in whole or in part.
    """

    files: int = 0
    passages: int = 0
    added: int = 0
    present: int = 0
    chunks: int = 0
    repaired: int = 0
    seconds: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def passages_per_s(self) -> float:
        return self.passages / self.seconds if self.seconds > 0 else 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["problems"] = [{"where": w, "why": y} for w, y in self.problems]
        d["passages_per_s"] = round(self.passages_per_s, 2)
        d["chunks_per_s"] = round(self.chunks_per_s, 2)
        return d

    def summary(self) -> str:
        lines = [
            f"indexed {self.files} file(s): {self.passages} passages ({self.added} added, {self.present} already "
            f"indexed), {self.chunks} chunk vectors written, in {self.seconds:.1f} s "
            f"({self.passages_per_s:.1f} passages/s, {self.chunks_per_s:.1f} chunk vectors/s)"
        ]
        if self.repaired:
            lines.append(f"repaired {self.repaired} stored passage(s) whose vectors could not be read back")
        lines += [f"skipped {where}: {why}" for where, why in self.problems]
        return "\n".join(lines)


class _Indexer:
    """Writes batches of passages: chunk vectors first, then the passage records (the commit)."""

    def __init__(self, store: ChunkStore, engine: "RefragEngine | None", embedder: Any, report: IndexReport,
                 batch_size: int) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if engine is not None and store.fingerprint != engine.chunk_vector_fingerprint():
            raise ValueError(
                "The store is not bound to this engine's chunk-vector fingerprint: open it with "
                "ChunkStore.for_engine(engine, ...)."
            )
        self.store, self.engine, self.embedder, self.report = store, engine, embedder, report
        self.batch_size = batch_size
        self.batch: list[PassageRecord] = []
        self.seen: set[str] = set()  # ids handled in this run (duplicates inside the input)

    def add(self, record: PassageRecord) -> None:
        pid = record.id
        if pid in self.seen:
            return
        self.seen.add(pid)
        self.report.passages += 1
        self.batch.append(record)
        if len(self.batch) >= self.batch_size:
            self.flush()

    def chunk_vectors(self, records: Sequence[PassageRecord]) -> dict[str, Any]:
        import torch

        engine = self.engine
        chunks = [chunk_passage(r.text, engine.tokenizer, engine.k) for r in records]
        texts = [c.text for cs in chunks for c in cs]
        with torch.no_grad():
            flat = engine.chunk_encoder.encode(texts).float().cpu()  # (sum L, d_enc)
        out, i = {}, 0
        for r, cs in zip(records, chunks):
            out[r.id] = flat[i : i + len(cs)]
            i += len(cs)
        return out

    def flush(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        ids = [r.id for r in batch]
        present = self.store.has_passages(ids)
        self.write(batch, present)
        self.report.added += len(batch) - len(present)
        self.report.present += len(present)

    def write(self, batch: Sequence[PassageRecord], present: set[str]) -> int:
        """Write what ``batch`` lacks: chunk vectors that are missing or unreadable, then the
        passages not ``present`` or whose retrieval vector is unreadable (the commit). Returns the
        number of passages whose chunk vectors were missing."""
        ids = [r.id for r in batch]
        broken_passages = self.store.unreadable_passages(list(present)) if self.embedder is not None else set()
        if self.engine is not None:
            complete = self.store.complete_chunk_vectors(ids)
            broken_chunks = self.store.unreadable_chunk_vectors(list(complete))
            need_chunks = [r for r in batch if r.id not in complete or r.id in broken_chunks]
        else:
            broken_chunks, need_chunks = set(), []
        need_passage = [r for r in batch if r.id not in present or r.id in broken_passages]
        if need_chunks:
            self.report.chunks += self.store.write_chunk_vectors(self.chunk_vectors(need_chunks))
        if need_passage and self.embedder is not None:
            self.store.add_passages(need_passage, self.embedder.embed([r.text for r in need_passage]), self.embedder)
        self.report.repaired += len(present & (broken_passages | broken_chunks))
        return len(need_chunks) - len(broken_chunks)


def index_paths(
    paths: Sequence[str | Path],
    store: ChunkStore,
    engine: "RefragEngine | None",
    embedder: Any,
    *,
    batch_size: int = DEFAULT_INDEX_BATCH_SIZE,
    min_words: int = PASSAGE_MIN_WORDS,
    max_words: int = PASSAGE_MAX_WORDS,
    progress: bool = True,
    on_file: Callable[[Path], None] | None = None,
) -> IndexReport:
    """Index files and directories into ``store``: passages with retrieval vectors, and (when an
    engine is given) their pre-projection chunk vectors under the engine's fingerprint.

    Idempotent and resumable: passages already complete in the store are skipped, ids are content
    hashes, and every write is an upsert, so re-running after an interruption adds exactly what
    is missing. Unreadable inputs are reported in ``report.problems``; the rest is indexed.

    Args:
        paths: files and/or directories (searched recursively for supported files).
        store: the target store, bound to ``engine``'s fingerprint (``ChunkStore.for_engine``).
        engine: the REFRAG engine whose tokenizer and chunk encoder make the chunk vectors, or
            None to store passages and retrieval vectors only.
        embedder: the retrieval embedder (e.g. :class:`SentenceEmbedder`).
        batch_size: passages per batch (one embedding pass and one write per batch).
        min_words, max_words: passage size range.
        progress: show a tqdm progress bar.
        on_file: called with each file before it is read (e.g. for logging).

    Returns:
        An :class:`IndexReport` (files, passages, added, present, chunks, seconds, problems).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    report = IndexReport()
    files, report.problems = expand_paths(paths)
    indexer = _Indexer(store, engine, embedder, report, batch_size)
    store.lock_for_writing()
    bar = tqdm(total=None, unit="passage", desc="indexing", disable=not progress, dynamic_ncols=True)
    try:
        for path in files:
            if on_file is not None:
                on_file(path)
            bar.set_postfix_str(path.name[-40:], refresh=False)
            problems: list[tuple[str, str]] = []
            try:
                for record in read_passages(path, min_words, max_words, problems):
                    indexer.add(record)
                    bar.update(1)
            except BadInputError as err:
                report.problems.append((str(path), str(err).removeprefix(f"{path}: ")))
            else:
                report.files += 1
            report.problems.extend(problems)
        indexer.flush()
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    return report


def refresh_chunk_vectors(
    store: ChunkStore, engine: "RefragEngine", *, batch_size: int = DEFAULT_INDEX_BATCH_SIZE, progress: bool = True
) -> IndexReport:
    """Compute the chunk vectors of every stored passage that lacks them under ``engine``'s
    fingerprint (after a new checkpoint or k, without the original files), and write again the
    ones that cannot be read back. Resumable like :func:`index_paths`."""
    return verify_index(store, engine, None, batch_size=batch_size, progress=progress)


def verify_index(
    store: ChunkStore,
    engine: "RefragEngine | None",
    embedder: Any,
    *,
    batch_size: int = DEFAULT_INDEX_BATCH_SIZE,
    progress: bool = True,
) -> IndexReport:
    """Check every stored passage and repair what is missing or unreadable: chunk vectors under
    ``engine``'s fingerprint (encoded again) and, with an ``embedder``, retrieval vectors
    (embedded again). This is what ``refrag index --verify`` runs.

    Args:
        store: the store, bound to ``engine``'s fingerprint (``ChunkStore.for_engine``).
        engine: makes the chunk vectors, or None to check retrieval vectors only.
        embedder: the retrieval embedder the index was built with, or None to check chunk vectors only.
        batch_size: passages per round trip.
        progress: show a tqdm progress bar.

    Returns:
        An :class:`IndexReport`: ``passages`` checked, ``added`` (passages that had no chunk
        vectors), ``repaired`` (passages with vectors that could not be read back), ``chunks``.
    """
    from tqdm.auto import tqdm

    if engine is None and embedder is None:
        raise ValueError("verify_index needs an engine (chunk vectors), an embedder (retrieval vectors), or both.")
    if engine is not None and store.fingerprint != engine.chunk_vector_fingerprint():
        raise ValueError("Open the store with ChunkStore.for_engine(engine, ...) to check its chunk vectors.")
    if embedder is not None:
        store.check_embedder(embedder)
    t0 = time.perf_counter()
    report = IndexReport()
    indexer = _Indexer(store, engine, embedder, report, batch_size)
    store.lock_for_writing()
    bar = tqdm(total=store.count_passages(), unit="passage", desc="checking", disable=not progress)
    try:
        for page in store.iter_passages(batch_size):
            added = indexer.write(page, {r.id for r in page})
            report.passages += len(page)
            report.added += added
            report.present += len(page) - added
            bar.update(len(page))
    finally:
        bar.close()
        report.seconds = time.perf_counter() - t0
    return report
