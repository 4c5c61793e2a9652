"""Constructor arguments of the framework adapters: deprecated names and unknown names.

Both frameworks' base classes silently drop keyword arguments they do not know, so
``ChatRefrag(max_new_tokens=5)`` used to keep the default of 64 tokens. Every adapter runs its
keyword arguments through :func:`renamed_settings` (deprecated names that still work, with a
DeprecationWarning) and :func:`refuse_unknown_arguments` (anything else it does not know raises
a TypeError naming the argument and, where there is one, the argument meant). Framework-free,
so the LangChain and LlamaIndex adapters share it.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any, Iterable, Mapping

from .policy import as_budget

# Names users bring from other libraries, and the argument each adapter family uses instead.
LANGCHAIN_HINTS = {
    "max_new_tokens": "max_tokens=",
    "max_length": "max_tokens=",
    "n_predict": "max_tokens=",
    "model_id": "decoder=",
    "model_path": "decoder=",
    "model_name": "model= (it selects the decoder)",
}
LLAMA_INDEX_HINTS = {
    "max_tokens": "max_new_tokens=",
    "max_length": "max_new_tokens=",
    "model": "decoder= to choose the decoder (model_name= only renames it in metadata)",
    "model_id": "decoder=",
    "model_path": "decoder=",
}


def renamed_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Map the deprecated names ``expand`` and ``budget`` onto ``policy`` and ``expand_fraction``
    / ``max_expanded`` (with a DeprecationWarning); other keys pass through.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     renamed_settings({"budget": 0.25})
        {'expand_fraction': 0.25, 'max_expanded': None}
    """
    values = dict(values)
    if "expand" in values:
        warnings.warn("expand= is deprecated; use policy=.", DeprecationWarning, stacklevel=4)
        expand = values.pop("expand")
        if values.get("policy") is not None:
            raise ValueError("Give policy= only; expand= is its deprecated name.")
        values["policy"] = expand
    if "budget" in values:
        warnings.warn("budget= is deprecated; use expand_fraction= and/or max_expanded=.", DeprecationWarning, stacklevel=4)
        budget = values.pop("budget")
        if budget is not None:
            if values.get("expand_fraction") is not None or values.get("max_expanded") is not None:
                raise ValueError("Give expand_fraction= / max_expanded= only; budget= is their deprecated name.")
            b = as_budget(budget)  # raises TypeError / ValueError naming the problem
            values["expand_fraction"], values["max_expanded"] = b.fraction, b.max_count
    return values


def refuse_unknown_arguments(
    owner: str, given: Iterable[str], known: Iterable[str], hints: Mapping[str, str] | None = None
) -> None:
    """Raise a TypeError for every name in ``given`` that is not in ``known``.

    The message names each unknown argument and the argument meant: from ``hints`` when the
    name is a well-known one of another library, else the closest known name, if any.

    Example:
        >>> refuse_unknown_arguments("ChatRefrag", ["max_new_tokens"], ["max_tokens"], LANGCHAIN_HINTS)
        Traceback (most recent call last):
        ...
        TypeError: ChatRefrag got an unknown argument max_new_tokens=; use max_tokens= instead.
    """
    known = set(known)
    unknown = [name for name in given if name not in known]
    if not unknown:
        return
    hints = hints or {}
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        meant = hints.get(name) or (f"{close[0]}=" if close else None)
        parts.append(f"{name}=; use {meant} instead" if meant else f"{name}= (there is no such setting)")
    plural = "an unknown argument" if len(parts) == 1 else "unknown arguments"
    raise TypeError(f"{owner} got {plural} {'; '.join(parts)}.")
