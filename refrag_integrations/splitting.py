"""Documents -> passages: cut text into passages of ~100-200 words on paragraph and sentence
boundaries (:mod:`refrag_integrations.chunking` then cuts passages into chunks of k tokens).

Example:
    >>> from refrag_integrations.splitting import split_passages
    >>> split_passages("A short one.\\n\\nAnother paragraph here.", min_words=5, max_words=10)
    ['A short one.\\n\\nAnother paragraph here.']
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from .config import MAX_PARAGRAPH_CHARS, PASSAGE_MAX_WORDS, PASSAGE_MIN_WORDS

# A sentence ends at . ! ? (and any closing quotes/brackets) before whitespace that is not
# followed by a lower-case letter ("Jesus Christ and ... the first"); group 1 is the whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s+)(?![a-z])")
_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s")


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
    for para, continued in paragraphs(((line, False) for line in text.splitlines()), markdown=False):
        out.extend(splitter.feed(para, continued))
    out.extend(splitter.finish())
    return out



def paragraphs(lines: Iterable[tuple[str, bool]], markdown: bool) -> Iterator[tuple[str, bool]]:
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

