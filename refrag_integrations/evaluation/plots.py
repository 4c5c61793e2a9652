"""PNG plots of benchmark and evaluation results (matplotlib, headless Agg backend).

* :func:`plot_bench_speedups`: TTFT / TTIT speed-up and throughput gain of REFRAG over RAG
  against context length, per k, cached and not cached (like the paper's Figure 2).
* :func:`plot_bench_memory`: KV-cache size and peak memory against context length.
* :func:`plot_qa_tradeoff`: QA Match against median TTFT per setting, with 95% CIs.
* :func:`plot_ppl`: log-perplexity per setting, with 95% CIs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Plots need matplotlib: pip install 'refrag-integrations[eval]' (or pip install matplotlib)."
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_MODE_STYLE = {"cached": "-", "not_cached": "--"}
_MODE_LABEL = {"cached": "cached", "not_cached": "not cached"}


def _length_axis(ax: Any, lengths: Sequence[int]) -> None:
    """Log2 x axis labelled with the measured context lengths as plain numbers."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("context tokens")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_bench_speedups(doc: dict[str, Any], path: str | Path, p: float = 0.0) -> Path:
    """Three panels against context length (log2 axis): TTFT speed-up, TTIT speed-up and
    throughput gain over full-context RAG, one line per k and mode at expand fraction ``p``.

    Example:
        >>> plot_bench_speedups(read_json(Path("runs/bench/bench.json")), "speedup.png")  # doctest: +SKIP
    """
    plt = _pyplot()
    rows = [r for r in doc.get("summary", []) if r["p"] == p]
    if not rows:
        raise ValueError(f"no REFRAG results with p={p} and a RAG baseline at the same length to plot.")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("ttft_speedup", "TTFT speed-up (x)"), ("ttit_speedup", "TTIT speed-up (x)"),
              ("throughput_gain", "throughput gain (x)"))
    ks = sorted({r["k"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (field, title) in zip(axes, panels):
        for i, k in enumerate(ks):
            for mode in ("cached", "not_cached"):
                pts = sorted((r["length"], r[field]) for r in rows if r["k"] == k and r["mode"] == mode and r[field])
                if pts:
                    ax.plot(*zip(*pts), _MODE_STYLE[mode], marker="o", color=colors[i % len(colors)],
                            label=f"k={k} {_MODE_LABEL[mode]}")
        ax.axhline(1.0, color="grey", lw=0.8)
        _length_axis(ax, [r["length"] for r in rows])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    trained = doc.get("projector_trained")
    fig.suptitle(f"REFRAG vs full-context RAG, p={p}" + ("" if trained else " (untrained projector: latency only)"))
    return _save(fig, path)


def plot_bench_memory(doc: dict[str, Any], path: str | Path, p: float = 0.0) -> Path:
    """KV-cache size after prefill and measured peak memory against context length, for RAG and
    REFRAG (cached) at each k and expand fraction ``p``."""
    plt = _pyplot()
    res = doc.get("results", [])
    rag = sorted((r["length"], r) for r in res if r["mode"] == "rag")
    if not rag:
        raise ValueError("no RAG results to plot.")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, field, title in ((axes[0], "kv_cache_mb", "KV cache after prefill (MB)"),
                             (axes[1], "peak_memory_mb", "peak memory of a request (MB)")):
        pts = [(s, r[field]) for s, r in rag if r.get(field) is not None]
        if pts:
            ax.plot(*zip(*pts), "k-", marker="s", label="RAG")
        for k in sorted({r["k"] for r in res if r["mode"] == "cached"}):
            pts = sorted((r["length"], r[field]) for r in res
                         if r["mode"] == "cached" and r["k"] == k and r["p"] == p and r.get(field) is not None)
            if pts:
                ax.plot(*zip(*pts), "-", marker="o", label=f"REFRAG k={k}")
        _length_axis(ax, [s for s, _ in rag])
        ax.set_yscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _plain_log_axis(axis: Any) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def plot_qa_tradeoff(
    rows: Sequence[dict[str, Any]], path: str | Path, metric: str = "match", title: str | None = None
) -> Path:
    """Accuracy against median TTFT, one point per (setting, N), with 95% CI bars; points of the
    same setting are joined in order of N.

    Args:
        rows: ``summary.json`` rows of ``refrag eval qa`` (``setting``, ``n``, ``ttft_s``, metric CIs).
        path: the PNG to write.
        metric: ``match``, ``em`` or ``f1``.
        title: the figure title (e.g. a warning that the projector is untrained).
    """
    plt = _pyplot()
    rows = [r for r in rows if r.get("ttft_s") is not None]
    if not rows:
        raise ValueError("no QA results with TTFT to plot.")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        pts = sorted((r for r in rows if r["setting"] == setting), key=lambda r: r["n"])
        x = [r["ttft_s"] * 1000 for r in pts]
        y = [r[metric]["mean"] for r in pts]
        err = [[r[metric]["mean"] - r[metric]["low"] for r in pts], [r[metric]["high"] - r[metric]["mean"] for r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=setting)
        for r, xi, yi in zip(pts, x, y):
            ax.annotate(f"N={r['n']}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("median TTFT (ms)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ppl(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Bar chart of mean log-perplexity (nats per continuation token) per setting, with 95% CIs."""
    plt = _pyplot()
    if not rows:
        raise ValueError("no perplexity results to plot.")
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 4))
    names = [r["setting"] for r in rows]
    means = [r["log_ppl"]["mean"] for r in rows]
    err = [[r["log_ppl"]["mean"] - r["log_ppl"]["low"] for r in rows], [r["log_ppl"]["high"] - r["log_ppl"]["mean"] for r in rows]]
    ax.bar(names, means, yerr=err, capsize=4, color="tab:blue")
    ax.set_ylabel("log-perplexity (nats/token)")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
