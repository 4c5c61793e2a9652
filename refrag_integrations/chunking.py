"""Passage text -> chunks of k decoder tokens, each with the text span it covers.

Chunks are defined on the *decoder's* token sequence (the paper's C_i = x_{k(i-1)+1 : ki}); the
encoder reads each chunk's text span. Pure functions: no model state, no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

from .prompt_text import check_text


@dataclass(frozen=True)
class Chunk:
    """One chunk of a passage: k decoder tokens (the last chunk may be shorter) and their text.

    Attributes:
        token_ids: the decoder token ids of this chunk.
        text: the passage text the tokens cover, ``passage[start:end]``.
        start: character offset of the chunk in its passage.
        end: character offset one past the chunk's end.
        index: position of the chunk within its passage.
    """

    token_ids: tuple[int, ...]
    text: str
    start: int
    end: int
    index: int


def passage_id(text: str) -> str:
    """Stable content id of a passage: the first 32 hex digits of its SHA-256.

    Example:
        >>> passage_id("hello")[:8]
        '2cf24dba'
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        check_text(text, "passage")  # raises the ValueError that names the character
        raise
    return hashlib.sha256(data).hexdigest()[:32]


def tokenize_text(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Tokenize passage text as plain text: no added special tokens, and special-token strings
    inside the text (e.g. ``<|im_end|>``) are split into ordinary tokens, never parsed as control
    tokens. Returns the ids and, for fast tokenizers, the character offsets."""
    kwargs: dict[str, Any] = {"add_special_tokens": False, "split_special_tokens": True}
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, **kwargs)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    enc = tokenizer(text, **kwargs)
    return list(enc["input_ids"]), None


def special_prefix_ids(tokenizer: Any) -> list[int]:
    """Tokens ``tokenizer`` adds in front of plain text (e.g. BOS), if any."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:] == plain else []


def chunk_token_ids(token_ids: Sequence[int], k: int) -> list[list[int]]:
    """Split a token sequence into consecutive pieces of exactly ``k`` (the last may be shorter).

    Example:
        >>> chunk_token_ids([1, 2, 3, 4, 5], 2)
        [[1, 2], [3, 4], [5]]
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"chunk size k must be a positive integer, got {k!r}.")
    return [list(token_ids[i : i + k]) for i in range(0, len(token_ids), k)]


def chunk_passage(text: str, tokenizer: Any, k: int) -> list[Chunk]:
    """Cut a passage into chunks of exactly ``k`` decoder tokens with their text spans.

    Spans tile the passage: chunk i covers text from its first token's start to the next chunk's
    first token's start, so concatenating chunk texts gives back the passage.

    Args:
        text: the passage text (must contain at least one token).
        tokenizer: the decoder's tokenizer.
        k: the compression rate, tokens per chunk.

    Raises:
        ValueError: ``k < 1`` or the passage is empty.
    """
    if not isinstance(text, str):
        raise TypeError(f"passage must be a str, got {type(text).__name__}.")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"chunk size k must be a positive integer, got {k!r}.")
    ids, offsets = tokenize_text(text, tokenizer)
    if not ids or not text.strip():
        raise ValueError("Empty passage: a passage must contain some text to chunk.")
    pieces = chunk_token_ids(ids, k)
    chunks: list[Chunk] = []
    for i, piece in enumerate(pieces):
        if offsets is not None:
            start = 0 if i == 0 else offsets[i * k][0]
            end = len(text) if i == len(pieces) - 1 else offsets[(i + 1) * k][0]
            chunk_text = text[start:end]
        else:  # slow tokenizer: no offsets, so the span is the decoded text
            chunk_text = tokenizer.decode(piece)
            start = chunks[-1].end if chunks else 0
            end = start + len(chunk_text)
        chunks.append(Chunk(token_ids=tuple(piece), text=chunk_text, start=start, end=end, index=i))
    return chunks


def chunks_from_token_ids(token_ids: Sequence[int], tokenizer: Any, k: int) -> list[Chunk]:
    """Chunks of a window of decoder token ids (training data is drawn as token windows).

    Each chunk's text is its own tokens decoded, and the spans tile the concatenated text, as
    :func:`chunk_passage` does for a passage.

    Example:
        >>> [c.token_ids for c in chunks_from_token_ids([5, 6, 7], tok, 2)]   # doctest: +SKIP
        [(5, 6), (7,)]
    """
    chunks: list[Chunk] = []
    start = 0
    for i, piece in enumerate(chunk_token_ids(token_ids, k)):
        text = tokenizer.decode(piece)
        chunks.append(Chunk(token_ids=tuple(int(t) for t in piece), text=text, start=start, end=start + len(text), index=i))
        start += len(text)
    return chunks
