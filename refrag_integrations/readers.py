"""File readers: text, Markdown, JSON lines (``.jsonl``, also gzipped) and PDF (with ``pypdf``),
read as streams (bounded memory) into :class:`~refrag_integrations.store.PassageRecord` s.

Bad inputs (a missing path, an empty file, binary junk, text that is not UTF-8, a bad JSON line)
raise :class:`BadInputError` (or are appended to ``problems``) with a clear reason.

Example:
    >>> from refrag_integrations.readers import read_passages
    >>> for record in read_passages("notes.md"):   # doctest: +SKIP
    ...     print(record.position, record.text[:40])
"""

from __future__ import annotations

import codecs
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

from .config import MAX_JSONL_LINE_CHARS, MAX_PARAGRAPH_CHARS, PASSAGE_MAX_WORDS, PASSAGE_MIN_WORDS, READ_BLOCK_CHARS
from .splitting import PassageSplitter, paragraphs, split_passages
from .store import PassageRecord

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PDF_SUFFIXES
INSTALL_PDF = "pip install 'refrag-integrations[pdf]'  (or: pip install pypdf)"


class BadInputError(ValueError):
    """A file that cannot be indexed; the message says why and what to do."""


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
        yield from _split(ctx, paragraphs(_lines(f), markdown), min_words, max_words)


def _split(ctx: _FileContext, paras: Iterable[tuple[str, bool]], min_words: int,
           max_words: int) -> Iterator[PassageRecord]:
    """Paragraphs ``(text, continued)`` -> passage records numbered in order within the file."""
    splitter = PassageSplitter(min_words, max_words)
    n = 0
    for para, continued in paras:
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
        page_paragraphs = (pc for page in reader.pages for pc in paragraphs(
            ((line, False) for line in (page.extract_text() or "").splitlines()), markdown=False))
        yield from _split(ctx, page_paragraphs, min_words, max_words)
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

