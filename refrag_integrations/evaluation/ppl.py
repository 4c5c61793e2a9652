"""Log-perplexity of held-out continuations with no context, the full context as tokens, and the
context compressed by REFRAG at each k (the paper's Table 1 setting, scaled down).

For a window of s context tokens followed by o continuation tokens, the decoder reads

* ``no_context``:    [start] + continuation
* ``full_context``:  [start] + the s context tokens + continuation
* ``refrag_k{k}``:   [start] + the context as chunk vectors (one position per k tokens; with
  p > 0 a random fraction p of the chunks expanded) + continuation

and the score is the mean negative log-likelihood (nats) of the o continuation tokens. ``[start]``
is the tokenizer's BOS prefix, or its BOS / EOS token when it adds none, so the first continuation
token is predicted in every setting. The context is assembled by the engine
(:meth:`RefragEngine.prepare` on the context text as one passage), so chunking and projection are
exactly those of generation. Finished windows are appended to ``windows.jsonl``; a rerun
continues.
"""

from __future__ import annotations

import math
import statistics
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import PPL_KS, PPL_PS
from .metrics import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, ConfidenceInterval, bootstrap_ci
from .runs import command_line, machine_info, now_iso, read_json, resume_log, write_json

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine

WINDOWS_FILE = "windows.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
PLOT_FILE = "ppl.png"
SIGNATURE_FILE = "run.json"
UNTRAINED_NOTE = (
    "The REFRAG projector is UNTRAINED for the refrag rows: they measure noise vectors in place of "
    "the context, not REFRAG quality. no_context and full_context are the plain decoder."
)


def ppl_settings(ks: Sequence[int] = PPL_KS, ps: Sequence[float] = PPL_PS) -> list[tuple[str, int | None, float | None]]:
    """(name, k, p) of every setting: no context, full context, then REFRAG per k and p.

    Example:
        >>> [s[0] for s in ppl_settings([16], [0.0, 0.25])]
        ['no_context', 'full_context', 'refrag_k16', 'refrag_k16_p0.25']
    """
    out: list[tuple[str, int | None, float | None]] = [("no_context", None, None), ("full_context", None, None)]
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k}.")
        for p in ps:
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"expand fraction p must lie in [0, 1], got {p}.")
            out.append((f"refrag_k{k}" if not p else f"refrag_k{k}_p{float(p):g}", int(k), float(p)))
    return out


def start_ids(tokenizer: Any) -> list[int]:
    """Tokens in front of every scored sequence: the tokenizer's own special prefix (e.g. BOS);
    if it adds none, its BOS token, else its EOS token (a document boundary)."""
    from ..chunking import special_prefix_ids

    prefix = special_prefix_ids(tokenizer)
    if prefix:
        return prefix
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a sequence with.")


def continuation_nll(
    engine: "RefragEngine", context: str | None, continuation: Sequence[int], policy: Any = "all",
    expand_fraction: float | None = None,
) -> tuple[float, int]:
    """Mean NLL (nats) of ``continuation`` token ids after ``context`` assembled by ``engine``.

    Args:
        engine: the engine (its k decides the chunking of the context).
        context: context text, or None for no context.
        continuation: the token ids to score.
        policy: how the context's chunks enter: ``"all"`` (tokens), ``"none"`` (all compressed),
            or an expansion policy with ``expand_fraction``.
        expand_fraction: expand fraction p for a policy.

    Returns:
        (mean NLL over the continuation tokens, decoder positions used in total).

    Example:
        >>> nll, positions = continuation_nll(engine, "Some context ...", [281, 1176], policy="none")  # doctest: +SKIP
    """
    import torch

    if not continuation:
        raise ValueError("continuation must hold at least one token id.")
    embed = engine.decoder.get_input_embeddings()
    dev = embed.weight.device
    parts = [embed(torch.tensor(start_ids(engine.tokenizer), device=dev))]  # (1.., d)
    if context is not None:
        prepared = engine.prepare(context, [(0, len(context))], policy, expand_fraction=expand_fraction)
        parts.append(prepared.embeds.to(embed.weight.dtype))  # (T_ctx, d)
    cont = torch.tensor(list(continuation), device=dev)  # (o,)
    parts.append(embed(cont))  # (o, d)
    emb = torch.cat(parts, 0).unsqueeze(0)  # (1, T, d)
    T, o = emb.shape[1], cont.shape[0]
    pos = torch.arange(T, device=dev).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        logits = engine.decoder_forward(inputs_embeds=emb, position_ids=pos, use_cache=False, logits_to_keep=o + 1).logits
    pred = logits[0, :o].float()  # (o, V): positions T-o-1 .. T-2 predict the o continuation tokens
    nll = torch.nn.functional.cross_entropy(pred, cont)
    return float(nll), int(T)


def run_ppl(
    engine: "RefragEngine",
    windows: Sequence[tuple[str, list[int]]],
    out_dir: str | Path,
    *,
    ks: Sequence[int] = PPL_KS,
    ps: Sequence[float] = PPL_PS,
    seed: int = 0,
    signature: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every window in every setting; write ``windows.jsonl``, ``summary.json``,
    ``summary.md`` and ``ppl.png`` into ``out_dir``. A rerun skips finished (window, setting)
    pairs.

    Args:
        engine: the base engine; engines for other k share its models.
        windows: ``(context text, continuation ids)`` pairs (:func:`heldout_windows`).
        out_dir: results directory.
        ks, ps: compression rates and expand fractions (p > 0 expands a random fraction).
        seed: seed of the random expansion.
        signature: extra run identity (data file, s, o) kept in ``run.json``.
        overwrite: start over even if ``out_dir`` holds a run with another signature.
        progress: show a progress bar.

    Example:
        >>> windows = heldout_windows(text, engine.tokenizer, 512, 128, limit=20)    # doctest: +SKIP
        >>> doc = run_ppl(engine, windows, "runs/eval-ppl", ks=(8, 16, 32))          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..policy import resolve_policy
    from .bench import engine_for_k, weights_signature

    settings = ppl_settings(ks, ps)
    out = Path(out_dir)
    run = {
        "decoder": engine.config.decoder,
        "decoder_fingerprint": engine.config.decoder_fingerprint,
        "projector_trained_k": engine.k if engine.trained else None,
        "dtype": str(engine.autocast_dtype or next(engine.decoder.parameters()).dtype).replace("torch.", ""),
        **weights_signature(engine),
        "seed": seed,
        **(signature or {}),
    }
    log = resume_log(out / SIGNATURE_FILE, run, out / WINDOWS_FILE, overwrite=overwrite)
    engines: dict[int, "RefragEngine"] = {}
    work = [(i, s) for i in range(len(windows)) for s in settings if f"{s[0]}|w={i}" not in log]
    for i, (name, k, p) in tqdm(work, desc="refrag eval ppl", unit="window", disable=not progress):
        context, cont = windows[i]
        eng = engine if k is None else engines.setdefault(k, engine_for_k(engine, k))
        if name == "no_context":
            nll, positions = continuation_nll(eng, None, cont)
        elif name == "full_context":
            nll, positions = continuation_nll(eng, context, cont, "all")
        elif not p:
            nll, positions = continuation_nll(eng, context, cont, "none")
        else:
            policy = resolve_policy("random", seed=zlib.crc32(f"{seed}:{i}:{k}".encode()))
            nll, positions = continuation_nll(eng, context, cont, policy, expand_fraction=p)
        if not math.isfinite(nll):
            raise RuntimeError(f"non-finite NLL in setting {name}, window {i}: check the dtype (never fp16).")
        log.append({"key": f"{name}|w={i}", "setting": name, "k": k, "p": p, "window": i, "nll": nll,
                    "positions": positions, "continuation_tokens": len(cont),
                    "projector_trained": (bool(eng.trained) if k is not None else None)})
    doc = summarize_ppl(log.values(), settings, len(windows))
    old = read_json(out / SUMMARY_FILE).get("commands", []) if (out / SUMMARY_FILE).is_file() else []
    trained_any = any(r.get("projector_trained") for r in doc["rows"])
    doc.update({"run": run, "machine": machine_info(engine.device), "commands": old + [command_line()],
                "finished_at": now_iso(), "note": None if trained_any else UNTRAINED_NOTE})
    write_json(out / SUMMARY_FILE, doc)
    (out / TABLE_FILE).write_text(ppl_markdown(doc), encoding="utf-8")
    if doc["rows"]:
        from .plots import plot_ppl

        plot_ppl(doc["rows"], out / PLOT_FILE, title=None if trained_any else "untrained projector: refrag bars are not REFRAG quality")
    return doc


def gap_closed_ci(
    none: Sequence[float], full: Sequence[float], compressed: Sequence[float], *,
    resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = BOOTSTRAP_SEED,
) -> ConfidenceInterval | None:
    """Share of the no-context -> full-context log-PPL gap that a setting closes,
    ``(none - compressed) / (none - full)`` of the mean NLLs over the same windows, with a paired
    percentile-bootstrap interval (windows resampled together in all three settings).

    ``None`` when full context is not better than no context on these windows (no gap to close).

    Example:
        >>> ci = gap_closed_ci([3.0, 4.0], [2.0, 3.0], [2.5, 3.5], resamples=100)
        >>> round(ci.mean, 3)
        0.5
    """
    import numpy as np

    n, f, c = (np.asarray(list(x), dtype=np.float64) for x in (none, full, compressed))
    if not (n.size == f.size == c.size) or n.size == 0:
        raise ValueError("gap_closed_ci needs three non-empty sequences over the same windows.")
    if n.mean() - f.mean() <= 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n.size, size=(resamples, n.size))  # (R, windows)
    gap = n[idx].mean(axis=1) - f[idx].mean(axis=1)  # (R,)
    keep = gap > 0
    shares = (n[idx].mean(axis=1) - c[idx].mean(axis=1))[keep] / gap[keep]
    mean = float((n.mean() - c.mean()) / (n.mean() - f.mean()))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(shares, [alpha, 1.0 - alpha]) if shares.size else (mean, mean)
    return ConfidenceInterval(mean=mean, low=float(min(low, mean)), high=float(max(high, mean)),
                              n=int(n.size), confidence=confidence)


def summarize_ppl(records: Any, settings: Sequence[tuple[str, int | None, float | None]], n_windows: int) -> dict[str, Any]:
    """Mean log-perplexity per setting with a bootstrap 95% CI over the windows that every setting
    has finished, and for each REFRAG setting the share of the no-context -> full-context gap it
    closes (:func:`gap_closed_ci`)."""
    by_key = {r["key"]: r for r in records}
    common = [i for i in range(n_windows) if all(f"{s[0]}|w={i}" in by_key for s in settings)]
    nll = {name: [by_key[f"{name}|w={i}"]["nll"] for i in common] for name, _, _ in settings}
    rows = []
    for name, k, p in settings:
        recs = [by_key[f"{name}|w={i}"] for i in common]
        if not recs:
            continue
        ci = bootstrap_ci(nll[name])
        gap = None
        if name not in ("no_context", "full_context") and nll.get("no_context") and nll.get("full_context"):
            g = gap_closed_ci(nll["no_context"], nll["full_context"], nll[name])
            gap = g.to_dict() if g is not None else None
        rows.append({
            "setting": name, "k": k, "p": p, "windows": len(recs), "log_ppl": ci.to_dict(),
            "ppl": math.exp(ci.mean), "positions": statistics.fmean(r["positions"] for r in recs),
            "projector_trained": recs[0]["projector_trained"], "gap_closed": gap,
        })
    return {"windows": len(common), "rows": rows}


def ppl_markdown(doc: dict[str, Any]) -> str:
    lines = []
    if doc.get("note"):
        lines += [f"> {doc['note']}", ""]
    lines += [
        f"Windows scored in every setting: {doc['windows']}.",
        "",
        "| setting | k | p | windows | log-PPL (nats/token) [95% CI] | PPL | gap closed [95% CI] | decoder positions | projector trained |",
        "|---|---:|---:|---:|---|---:|---|---:|---|",
    ]
    for r in doc["rows"]:
        c = r["log_ppl"]
        trained = "-" if r["projector_trained"] is None else ("yes" if r["projector_trained"] else "no")
        g = r.get("gap_closed")
        gap = "-" if not g else f"{g['mean']:.2f} [{g['low']:.2f}, {g['high']:.2f}]"
        lines.append(
            f"| {r['setting']} | {r['k'] or '-'} | {'-' if r['p'] is None else r['p']} | {r['windows']} | "
            f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}] | {r['ppl']:.1f} | {gap} | {r['positions']:.0f} | {trained} |"
        )
    lines += ["", "*gap closed*: (no context - setting) / (no context - full context) of the mean log-PPL over "
              "the same windows; 1 = as good as full context, 0 = no better than no context."]
    return "\n".join(lines) + "\n"
