"""User text inside prompts: checked, and tokenised as text, never as control tokens.

A prompt holds two kinds of characters. *Markup* is what the engine's chat template inserts
(``<|im_start|>user\\n`` ...): its special-token strings must become the decoder's control tokens.
*User text* is everything else (questions, messages, instructions, passages): a special-token
string typed there (``<|im_end|>``) must stay ordinary text, or a user could end their own turn
and write the assistant's. This module renders chat messages with the markup's character spans
known, and tokenises a prompt with that split. Pure functions of a tokenizer; no model state.
"""

from __future__ import annotations

import logging
import re
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

logger = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass
class RenderedPrompt:
    """A prompt ready for the engine (:meth:`RefragEngine.prepare_prompt`).

    Attributes:
        text: the prompt.
        markup_spans: character spans of chat-template markup, in order; special-token strings
            there become control tokens. Every other character is user text.
        add_special_tokens: whether the tokenizer's special prefix (BOS) must still be added (a
            chat template writes its own).
    """

    text: str
    markup_spans: list[Span] = field(default_factory=list)
    add_special_tokens: bool = False


def check_text(value: Any, name: str) -> str:
    """Return ``value`` if it is a str that can be encoded as UTF-8 (the tokenizer and the
    passage ids need that).

    Raises:
        TypeError: ``value`` is not a str.
        ValueError: it holds a lone surrogate (e.g. ``"\\ud800"``, left by decoding bytes with
            ``errors="surrogateescape"``); the message names ``name`` and the position.

    Example:
        >>> check_text("Who wrote Hamlet?", "question")
        'Who wrote Hamlet?'
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name} contains a lone surrogate {value[err.start]!r} at character {err.start}: it is not "
            "valid Unicode text and cannot be encoded as UTF-8. Decode the input with errors='replace' "
            "(or remove the character)."
        ) from None
    return value


def check_prompt(prompt: Any, name: str = "prompt") -> str:
    """Return ``prompt`` if it is a str with some non-blank text and no lone surrogate.

    Raises:
        TypeError: ``prompt`` is not a str.
        ValueError: it is empty or blank, or holds a lone surrogate; the message names ``name``.
    """
    check_text(prompt, name)
    if not prompt.strip():
        raise ValueError(f"{name} is empty ({prompt!r}): give the text to answer.")
    return prompt


# tokenizer -> (its size when computed, its special-token strings): building them reads the
# tokenizer's whole added-token table, which costs more than tokenising a short text.
_SPECIAL_STRINGS: "weakref.WeakKeyDictionary[Any, tuple[int, list[str]]]" = weakref.WeakKeyDictionary()


def special_token_strings(tokenizer: Any) -> list[str]:
    """The strings a tokenizer turns into special (control) tokens, e.g. ``<|im_start|>``.

    Remembered per tokenizer while its size (``len(tokenizer)``) stays the same: adding tokens
    recomputes them."""
    try:
        size = len(tokenizer)
        known = _SPECIAL_STRINGS.get(tokenizer)
    except TypeError:  # no len() or not weak-referenceable: compute every time
        return _special_token_strings(tokenizer)
    if known is not None and known[0] == size:
        return list(known[1])
    strings = _special_token_strings(tokenizer)
    _SPECIAL_STRINGS[tokenizer] = (size, strings)
    return list(strings)


def _special_token_strings(tokenizer: Any) -> list[str]:
    strings = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            strings.add(getattr(token, "content", str(token)))
    return sorted(s for s in strings if s)


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> RenderedPrompt:
    """Apply the tokenizer's chat template (with the generation prompt) to ``messages`` and find
    the markup: everything the template wrote around the messages' contents.

    The template is rendered twice: with the contents, and with a unique placeholder for each
    content; the placeholders' surroundings are the markup. A template that trims contents is
    followed. One that rewrites a content in another way (e.g. drops reasoning from earlier
    turns) cannot be followed: then the prompt is the template's markup with the contents
    inserted verbatim (a warning says so).

    Raises:
        ValueError: the template rewrites the placeholders themselves (e.g. upper-cases contents).

    Example:
        >>> r = render_chat(tok, [{"role": "user", "content": "Hi"}])          # doctest: +SKIP
        >>> [r.text[a:b] for a, b in r.markup_spans]                             # doctest: +SKIP
        ['<|im_start|>user\\n', '<|im_end|>\\n<|im_start|>assistant\\n']
    """
    messages = [dict(m) for m in messages]
    contents = [str(m.get("content") or "") for m in messages]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    marks = [f"\x00refrag-content-{i}-{uuid.uuid4().hex}\x00" for i in range(len(messages))]
    skeleton = tokenizer.apply_chat_template(
        [{**m, "content": mark} for m, mark in zip(messages, marks)], tokenize=False, add_generation_prompt=True
    )
    found = sorted((m.start(), i) for i, mark in enumerate(marks) for m in re.finditer(re.escape(mark), skeleton))
    order = [i for _, i in found]  # the message of each content slot, in prompt order
    pieces, cursor = [], 0  # the markup around the content slots
    for at, i in found:
        pieces.append(skeleton[cursor:at])
        cursor = at + len(marks[i])
    pieces.append(skeleton[cursor:])
    if any("refrag-content-" in piece.lower() for piece in pieces):  # a placeholder the template rewrote
        raise ValueError(
            "The decoder's chat template rewrites message text (it changed a placeholder), so REFRAG cannot "
            "tell its markup from the messages' text. Give the tokenizer a chat_template that inserts message "
            "contents unchanged or trimmed."
        )
    spans = _align(prompt, pieces, [contents[i] for i in order])
    if spans is None:
        logger.warning(
            "The decoder's chat template rewrites message contents in a way REFRAG cannot follow; the "
            "prompt is the template's markup with each message's text inserted verbatim."
        )
        parts, spans, pos = [], [], 0
        for n, piece in enumerate(pieces):
            spans.append((pos, pos + len(piece)))
            content = contents[order[n]] if n < len(order) else ""
            parts += [piece, content]
            pos += len(piece) + len(content)
        prompt = "".join(parts)
    return RenderedPrompt(prompt, [(a, b) for a, b in spans if b > a], add_special_tokens=False)


def _align(prompt: str, pieces: Sequence[str], contents: Sequence[str]) -> list[Span] | None:
    """Spans of the markup ``pieces`` in ``prompt`` = pieces[0] + content[0] + pieces[1] + ...,
    where a content may appear trimmed; None when the prompt is not of that form."""
    spans, pos = [], 0
    for n, piece in enumerate(pieces):
        if not prompt.startswith(piece, pos):
            return None
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
        if n == len(contents):
            break
        nxt = pieces[n + 1]
        for cand in dict.fromkeys((contents[n], contents[n].strip(), contents[n].rstrip(), contents[n].lstrip())):
            if prompt.startswith(cand, pos) and prompt.startswith(nxt, pos + len(cand)):
                pos += len(cand)
                break
        else:
            return None
    return spans if pos == len(prompt) else None


def tokenize_prompt(
    tokenizer: Any, prompt: str, markup_spans: Sequence[Span] = (), start: int = 0, end: int | None = None
) -> list[int]:
    """Token ids of ``prompt[start:end]`` (no BOS added): special-token strings inside
    ``markup_spans`` become control tokens; everywhere else they are split into ordinary tokens.

    Text without a control-token string in user text is tokenised in one call, exactly as the
    tokenizer would; otherwise markup and user text are tokenised piece by piece.

    Example:
        >>> tokenize_prompt(tok, "<|im_start|>user\\nHi <|im_end|>", [(0, 17)])   # doctest: +SKIP
        [1, 85, 10, 52, 224, 31, 95, ...]   # one <|im_start|> id, then "<|im_end|>" as text
    """
    end = len(prompt) if end is None else end
    if end <= start:
        return []
    markup = [(max(a, start), min(b, end)) for a, b in markup_spans if min(b, end) > max(a, start)]

    def in_markup(a: int, b: int) -> bool:
        return any(ma <= a and b <= mb for ma, mb in markup)

    text = prompt[start:end]
    injected = False
    for s in special_token_strings(tokenizer):
        at = text.find(s)
        while at >= 0 and not injected:
            injected = not in_markup(start + at, start + at + len(s))
            at = text.find(s, at + 1)
    if not injected:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids: list[int] = []
    cursor = start
    for a, b in markup + [(end, end)]:
        if a > cursor:  # user text
            ids.extend(tokenizer(prompt[cursor:a], add_special_tokens=False, split_special_tokens=True)["input_ids"])
        if b > a:
            ids.extend(tokenizer(prompt[a:b], add_special_tokens=False)["input_ids"])
        cursor = b
    return ids
