"""Question answering with N passages: closed-book, full-context RAG and REFRAG per expansion
policy and fraction p, on one engine and the same passages; Match / EM / F1 with bootstrap 95%
CIs, TTFT per setting, and the equal-latency comparison (REFRAG with more passages against RAG
with fewer, as in the paper). The drop control (``controls=("drop",)``) answers every selective
REFRAG row again with the same expanded chunks as tokens and the unexpanded chunks deleted
instead of compressed, and reports REFRAG minus drop with a paired bootstrap 95% CI: what the
compressed positions are worth. The blank control (``"blank"``) keeps every position but gives
each compressed chunk one content-free vector: REFRAG minus blank is what the vectors' content is
worth beyond filling positions.

Every request goes through :meth:`RefragEngine.generate`, i.e. the engine's own RAG prompt, which
the SFT stage trains on. Passages for N are the gold passage plus N-1 distractors (other
questions' gold passages, gold at a random position, fixed seed), or the top-N retrieved from the
whole corpus through Chroma. REFRAG runs with precomputed chunk vectors ("cached"): TTFT is the
query-time cost after indexing. Predictions are appended to ``predictions.jsonl`` as they finish;
a rerun continues where the last one stopped.
"""

from __future__ import annotations

import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import QA_MAX_NEW_TOKENS, QA_PASSAGE_COUNTS, QA_POLICIES, QA_PS, QA_SEED
from .data import QAExample, with_distractors
from .metrics import bootstrap_ci, median, qa_scores
from .runs import JsonlLog, command_line, machine_info, now_iso, resume_log, write_json

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import RefragEngine

PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"
PLOT_FILE = "qa_tradeoff.png"
SIGNATURE_FILE = "run.json"
UNTRAINED_NOTE = (
    "The REFRAG projector is UNTRAINED: compressed chunks carry no usable information, so the "
    "REFRAG rows are NOT REFRAG quality; they only show that the harness runs. Closed-book and "
    "RAG rows are the plain decoder."
)


@dataclass(frozen=True)
class QASetting:
    """One way of answering: ``closed_book`` (no passages), ``rag`` (all chunks expanded),
    REFRAG with an expansion policy at fraction p (``refrag_p0`` compresses everything), or the
    control of a REFRAG setting (``control_of``): ``drop`` keeps its expanded chunks as tokens and
    deletes its other chunks; ``blank`` keeps the same positions but gives every compressed chunk
    one content-free vector."""

    name: str
    expand: str  # "all", "none", or a policy name ("relevance", "random", "learned")
    p: float | None = None
    control_of: str | None = None  # a control: the REFRAG setting whose decisions it reuses
    control: str | None = None  # which control ("drop" or "blank"), with control_of

    @property
    def uses_passages(self) -> bool:
        return self.name != "closed_book"

    @property
    def is_refrag(self) -> bool:
        return self.expand != "all" and self.control_of is None


# Selective policies for p > 0: query relevance, random, the paper's perplexity-desc baseline, and
# the checkpoint's learned (RL) policy. Further learned policies (other checkpoints' policies on
# this checkpoint's chunk vectors) are named "learned-<name>" and passed to run_qa.
SELECTIVE_POLICIES = ("relevance", "random", "perplexity-desc", "learned")
EXTRA_POLICY_PREFIX = "learned-"
# Control rows, each reusing a selective REFRAG row's decisions (same decoder, same generation):
# "drop" keeps the expanded chunks as tokens and deletes the unexpanded ones instead of compressing
# them; "blank" keeps every position but replaces each compressed chunk's vector by one content-free
# vector (the mean chunk vector of a fixed reference set), so REFRAG - blank is what the chunk
# vectors' content adds beyond filling positions.
QA_CONTROLS = ("drop", "blank")
# Passages whose mean pre-projection chunk vector is the blank control's vector: the gold passages
# of the first examples of the evaluated data, in order (fixed per run).
BLANK_REFERENCE_PASSAGES = 64


def check_controls(controls: Sequence[str]) -> tuple[str, ...]:
    """The control names, validated (see :data:`QA_CONTROLS`).

    Example:
        >>> check_controls(["drop"])
        ('drop',)
    """
    if isinstance(controls, str):
        raise TypeError(f"controls must be a list of names, e.g. ['drop'], not the str {controls!r}.")
    for c in controls:
        if c not in QA_CONTROLS:
            raise ValueError(f"unknown control {c!r}; choose from {QA_CONTROLS}.")
    return tuple(dict.fromkeys(controls))


def qa_settings(
    policies: Sequence[str] = QA_POLICIES, ps: Sequence[float] = QA_PS, controls: Sequence[str] = ()
) -> list[QASetting]:
    """Closed-book, RAG, REFRAG at p = 0, then every (policy, p > 0), then for each control in
    ``controls`` (``"drop"``, ``"blank"``) a ``<control>_<policy>_p<p>`` twin of every selective
    REFRAG setting.

    Example:
        >>> [s.name for s in qa_settings(["relevance"], [0.0, 0.25])]
        ['closed_book', 'rag', 'refrag_p0', 'refrag_relevance_p0.25']
        >>> [s.name for s in qa_settings(["relevance"], [0.25], controls=["drop"])][-1]
        'drop_relevance_p0.25'
    """
    controls = check_controls(controls)
    out = [QASetting("closed_book", "all"), QASetting("rag", "all")]
    ps = [float(p) for p in ps]
    for p in ps:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"expand fractions p must lie in [0, 1], got {p}.")
    if 0.0 in ps:
        out.append(QASetting("refrag_p0", "none", 0.0))
    for policy in policies:
        if policy in ("all", "none"):
            raise ValueError(f"policy {policy!r} is a fixed setting (rag / refrag_p0), not a selective policy.")
        if policy not in SELECTIVE_POLICIES and not policy.startswith(EXTRA_POLICY_PREFIX):
            raise ValueError(f"unknown expansion policy {policy!r}; choose from {SELECTIVE_POLICIES}.")
        for p in ps:
            if p > 0:
                out.append(QASetting(f"refrag_{policy}_p{p:g}", policy, p))
    selective = [s for s in out if s.is_refrag and s.p]
    for control in controls:
        if not selective:
            raise ValueError(f"the {control} control needs a selective REFRAG setting: give a policy and some p > 0.")
        # After every REFRAG setting: each question's REFRAG answer (and its decisions) comes first.
        out += [QASetting(f"{control}_{s.name[len('refrag_'):]}", s.expand, s.p, control_of=s.name, control=control)
                for s in selective]
    return out


def blank_vector(engine: "RefragEngine", passages: Sequence[str]) -> "torch.Tensor":
    """The blank control's content-free chunk vector: the mean pre-projection chunk vector of
    ``passages`` (a fixed reference set, not the question's passages), shape ``(d_enc,)``."""
    import torch

    if not passages:
        raise ValueError("the blank control needs reference passages.")
    found = engine.chunk_vectors(list(passages))
    return torch.cat(found.vectors, 0).mean(0)


def kept_passages(engine: "RefragEngine", passages: Sequence[str], expanded: Sequence[Sequence[int]]) -> list[str]:
    """The drop control's passages: each passage reduced to the text of its expanded chunks, in
    order (chunk texts tile the passage, so this is the concatenation of the kept spans); a
    passage left with no kept text is dropped.

    Args:
        engine: the engine whose chunking (k decoder tokens) the decisions refer to.
        passages: the passages the REFRAG setting answered from, in prompt order.
        expanded: per passage, the indices of its expanded chunks (``GenerationStats.expanded``).

    Example:
        >>> kept_passages(engine, ["aaaa bbbb cccc"], [[0, 2]])  # doctest: +SKIP
        ['aaaa cccc']
    """
    if len(expanded) != len(passages):
        raise ValueError(f"expanded has decisions for {len(expanded)} passages but {len(passages)} were given.")
    out = []
    for j, (text, keep) in enumerate(zip(passages, expanded)):
        chunks = engine.chunk(text)
        bad = [i for i in keep if not 0 <= i < len(chunks)]
        if bad:
            raise ValueError(f"expanded[{j}] names chunks {bad}, but passage {j} has {len(chunks)} chunks.")
        keep = set(keep)
        kept = "".join(c.text for c in chunks if c.index in keep)
        if kept.strip():
            out.append(kept)
    return out


def record_key(setting: str, n: int, line: int) -> str:
    return f"{setting}|N={n}|line={line}"


def _policy_for(
    engine: "RefragEngine", setting: QASetting, seed: int, line: int, n: int, reuse: dict[str, Any] | None = None
) -> Any:
    from ..policy import resolve_policy

    reuse = {} if reuse is None else reuse
    if setting.expand in ("all", "none"):
        return setting.expand
    if setting.expand == "perplexity-desc":
        if "perplexity-desc" not in reuse:  # one instance per run: it caches per-passage scores
            reuse["perplexity-desc"] = resolve_policy("perplexity-desc", engine=engine)
        return reuse["perplexity-desc"]
    if setting.expand == "random":
        # A fresh generator per request: decisions do not depend on evaluation order, so a
        # resumed run makes the same choices as an uninterrupted one.
        return resolve_policy("random", seed=zlib.crc32(f"{seed}:{line}:{n}".encode()))
    if setting.expand == "learned":
        return engine.policy
    if setting.expand.startswith(EXTRA_POLICY_PREFIX):  # run_qa checked that it was given
        return reuse["extra_policies"][setting.expand[len(EXTRA_POLICY_PREFIX):]]
    return resolve_policy(setting.expand, engine=engine)


def run_qa(
    engine: "RefragEngine",
    examples: Sequence[QAExample],
    out_dir: str | Path,
    *,
    ns: Sequence[int] = QA_PASSAGE_COUNTS,
    settings: Sequence[QASetting] | None = None,
    limit: int | None = None,
    max_new_tokens: int = QA_MAX_NEW_TOKENS,
    seed: int = QA_SEED,
    retrieve: Callable[[str, int], list[str]] | None = None,
    signature: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    extra_policies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer the first ``limit`` examples with N passages in every setting; write predictions,
    ``summary.json``, ``summary.md`` and the accuracy-vs-TTFT plot into ``out_dir``.

    Args:
        engine: the engine (its checkpoint, if any, is what is evaluated).
        examples: the evaluation examples (the whole split: distractors come from all of them).
        out_dir: results directory; a rerun with the same signature continues it.
        ns: passage counts N.
        settings: answering settings (default :func:`qa_settings`).
        limit: answer only the first ``limit`` examples.
        max_new_tokens: generation limit (greedy decoding).
        seed: seed of the distractor draw, gold position and the random policy.
        retrieve: ``(question, n) -> passages``: top-N retrieval instead of gold + distractors.
        signature: extra run identity (data file, checkpoint path) kept in ``run.json``.
        overwrite: start over even if ``out_dir`` holds a run with another signature.
        progress: show a progress bar.
        extra_policies: more learned policies by name, used by the settings whose policy is
            ``"learned-<name>"`` (e.g. the other variant of a policy run; see
            :func:`load_extra_policy`).

    Returns:
        The summary document (also in ``summary.json``).

    Example:
        >>> examples = load_qa(nq_path("../shared/data"), "eval")                           # doctest: +SKIP
        >>> doc = run_qa(engine, examples, "runs/eval-qa", ns=(1, 5), limit=20)             # doctest: +SKIP
    """
    import torch
    from tqdm.auto import tqdm

    from .bench import learned_policy, weights_signature

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"passage counts N must be >= 1, got {ns}.")
    if settings is None:
        learned = ["learned"] if learned_policy(engine) is not None else []
        settings = qa_settings(list(QA_POLICIES) + learned, QA_PS)
    out = Path(out_dir)
    run = {
        "decoder": engine.config.decoder,
        "decoder_fingerprint": engine.config.decoder_fingerprint,
        "k": engine.k,
        "projector_trained": bool(engine.trained),
        "dtype": str(engine.autocast_dtype or next(engine.decoder.parameters()).dtype).replace("torch.", ""),
        **weights_signature(engine),
        "device": str(engine.device),
        "threads": torch.get_num_threads(),  # TTFTs of one run must be comparable
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "passages": "retrieved" if retrieve is not None else "gold+distractors",
        **(signature or {}),
    }
    log = resume_log(out / SIGNATURE_FILE, run, out / PREDICTIONS_FILE, overwrite=overwrite)
    chosen = list(examples[:limit] if limit is not None else examples)
    index = {id(e): i for i, e in enumerate(examples)}

    work = []
    for ex in chosen:
        for n in ns:
            for s in settings:
                if s.name == "closed_book" and n != ns[0]:
                    continue  # closed-book does not depend on N: answered once
                if record_key(s.name, 0 if s.name == "closed_book" else n, ex.line) not in log:
                    work.append((ex, n, s))
    reuse: dict[str, Any] = {"extra_policies": dict(extra_policies or {})}
    by_name = {s.name: s for s in settings}
    for i, s in enumerate(settings):  # fail before answering anything
        if s.expand.startswith(EXTRA_POLICY_PREFIX) and s.expand[len(EXTRA_POLICY_PREFIX):] not in reuse["extra_policies"]:
            raise ValueError(f"setting {s.name!r} needs the learned policy {s.expand[len(EXTRA_POLICY_PREFIX):]!r}; "
                             "pass it in extra_policies.")
        if s.control_of is not None and not any(t.name == s.control_of and t.is_refrag for t in settings[:i]):
            raise ValueError(f"control setting {s.name!r} reuses the decisions of {s.control_of!r}, which must be a "
                             "REFRAG setting listed before it (see qa_settings).")
    bar = tqdm(total=len(work), desc="refrag eval qa", unit="answer", disable=not progress)
    passages_for: dict[tuple[int, int], tuple[list[str], bool, int | None]] = {}
    for ex, n, s in work:
        if (ex.line, n) not in passages_for:
            passages_for.clear()  # one example at a time: keep memory flat
            if retrieve is not None:
                got = retrieve(ex.question, n)
                gold_at = got.index(ex.passage) if ex.passage in got else None
                passages_for[(ex.line, n)] = (got, gold_at is not None, gold_at)
            else:
                got, gold_at = with_distractors(examples, index[id(ex)], n, seed)
                passages_for[(ex.line, n)] = (got, True, gold_at)
        passages, gold_in, gold_at = passages_for[(ex.line, n)]
        n_used = 0 if s.name == "closed_book" else n
        use = passages if s.uses_passages else []
        control: dict[str, Any] = {}
        blank = None
        if s.control_of is not None:
            expanded, source = _control_decisions(engine, log, by_name[s.control_of], ex, n, passages, seed, reuse)
            if s.control == "blank":
                if "blank_vector" not in reuse:
                    reference = [e.passage for e in examples[:BLANK_REFERENCE_PASSAGES]]
                    reuse["blank_vector"] = blank_vector(engine, reference)
                    engine.forget_vectors(reference)  # the reference set must not warm the rows' cache
                blank = [[i in keep for i in range(len(engine.chunk(t)))] for t, keep in zip(passages, map(set, expanded))]
            else:
                use = kept_passages(engine, passages, expanded)
            control = {"chunks": sum(len(engine.chunk(t)) for t in passages), "chunks_expanded": sum(map(len, expanded)),
                       "expanded": expanded, "passages_kept": len(use), "decisions_from": source}
        for text in use:  # pre-tokenise (RAG, drop, blank) / precompute chunk vectors (REFRAG, "cached")
            engine.chunk(text)
        if s.is_refrag:
            engine.chunk_vectors(use)
        if blank is not None:
            vec = reuse["blank_vector"]
            vectors = [vec.expand(len(d), vec.shape[0]).clone() for d in blank]
            t0 = time.perf_counter()
            prepared = engine.prepare_rag(ex.question, use, policy=blank, vectors=vectors)
            res = engine.generate_prepared([prepared], t_start=t0, max_new_tokens=max_new_tokens)[0]
        else:
            expand = "all" if s.control_of is not None else _policy_for(engine, s, seed, ex.line, n, reuse)
            fraction = s.p if s.p and s.is_refrag else None
            res = engine.generate(ex.question, use, policy=expand, expand_fraction=fraction,
                                  max_new_tokens=max_new_tokens)
        st = res.stats
        log.append({
            "key": record_key(s.name, n_used, ex.line), "setting": s.name, "n": n_used, "line": ex.line,
            "question": ex.question, "answers": list(ex.answers), "prediction": res.text,
            **qa_scores(res.text, ex.answers),
            "ttft_s": st.ttft_s, "total_s": st.total_s, "positions": st.positions,
            "prompt_tokens": st.prompt_tokens, "context_tokens": st.context_tokens,
            "chunks": st.chunks, "chunks_expanded": st.chunks_expanded,
            "gold_in_passages": gold_in if s.uses_passages else None,
            "gold_position": gold_at if s.uses_passages else None,
            "projector_trained": st.trained if s.is_refrag else None,
            **({"expanded": st.expanded} if s.is_refrag else {}),  # the decisions a drop control reuses
            **control,
        })
        bar.update(1)
    bar.close()
    doc = summarize_qa(log.values(), settings, ns, [e.line for e in chosen])
    doc.update({"run": run, "machine": machine_info(engine.device), "commands": _commands(out), "finished_at": now_iso(),
                "note": None if engine.trained else UNTRAINED_NOTE})
    write_json(out / SUMMARY_FILE, doc)
    (out / TABLE_FILE).write_text(qa_markdown(doc), encoding="utf-8")
    if doc["rows"]:
        from .plots import plot_qa_tradeoff

        title = None if engine.trained else "untrained projector: REFRAG points are not REFRAG quality"
        plot_qa_tradeoff(doc["rows"], out / PLOT_FILE, title=title)
    return doc


def _control_decisions(
    engine: "RefragEngine", log: JsonlLog, refrag: QASetting, ex: QAExample, n: int, passages: Sequence[str],
    seed: int, reuse: dict[str, Any],
) -> tuple[list[list[int]], str]:
    """The expanded chunk indices per passage that the REFRAG setting used for this question, and
    where they came from: its prediction record, or (a record written before decisions were
    recorded) the same policy with the same seed asked again, checked against the record's counts."""
    rec = log.records[record_key(refrag.name, n, ex.line)]  # answered before: it precedes in settings
    if rec.get("expanded") is not None:
        return [list(e) for e in rec["expanded"]], "refrag record"
    policy = _policy_for(engine, refrag, seed, ex.line, n, reuse)
    decisions = engine.decide(ex.question, passages, policy, expand_fraction=refrag.p if refrag.p else None)
    expanded = [[i for i, keep in enumerate(d) if keep] for d in decisions]
    counts = (sum(map(len, decisions)), sum(map(len, expanded)))
    if counts != (rec["chunks"], rec["chunks_expanded"]):
        raise ValueError(f"{refrag.name} for line {ex.line}, N={n} expanded {rec['chunks_expanded']} of {rec['chunks']} "
                         f"chunks, but its policy now gives {counts[1]} of {counts[0]}: its decisions cannot be "
                         "recovered; answer it again (delete its records from predictions.jsonl) or use --overwrite.")
    return expanded, "recomputed"


def load_extra_policy(engine: "RefragEngine", checkpoint: str | Path) -> Any:
    """The learned policy of another checkpoint, to be run on ``engine``'s chunk vectors.

    The policy reads pre-projection chunk vectors, so the checkpoint must have been trained on the
    same encoder weights as ``engine`` (e.g. both variants exported by one ``refrag train policy``
    run); anything else is refused.

    Raises:
        ValueError: the checkpoint has no policy, or another encoder / k / encoder delta.
    """
    import torch

    from ..checkpoint import load_checkpoint
    from ..policy import load_policy

    ckpt = load_checkpoint(checkpoint)
    if ckpt.policy is None or ckpt.policy_config is None:
        raise ValueError(f"{checkpoint} holds no learned policy.")
    cfg = engine.config
    if (ckpt.config.encoder, ckpt.config.chunk_size) != (cfg.encoder, cfg.chunk_size):
        raise ValueError(f"{checkpoint} was trained for encoder {ckpt.config.encoder!r}, k={ckpt.config.chunk_size}; "
                         f"the engine has {cfg.encoder!r}, k={cfg.chunk_size}.")
    weights = engine.chunk_encoder.encoder.state_dict()
    for name, value in ckpt.encoder_delta.items():
        if name not in weights or not torch.equal(weights[name].to(value.device, value.dtype), value):
            raise ValueError(f"{checkpoint}'s encoder weights differ from the engine's ({name}): its policy was "
                             "trained on other chunk vectors.")
    policy = load_policy(ckpt.policy, ckpt.policy_config)
    if hasattr(policy, "attach_encoder"):
        policy.attach_encoder(engine.chunk_encoder)
    return policy


def _commands(out: Path) -> list[str]:
    """Every command that contributed to this results directory, oldest first."""
    from .runs import read_json

    old = read_json(out / SUMMARY_FILE).get("commands", []) if (out / SUMMARY_FILE).is_file() else []
    return old + [command_line()]


def summarize_qa(
    records: Sequence[dict[str, Any]] | Any, settings: Sequence[QASetting], ns: Sequence[int], lines: Sequence[int]
) -> dict[str, Any]:
    """Per (setting, N): Match / EM / F1 with bootstrap 95% CIs and median TTFT, over the examples
    that every (setting, N) has finished (so all rows compare the same questions); plus the
    equal-latency comparison and, for every REFRAG row with a control twin (drop, blank), REFRAG
    minus the control (under ``drop_control``, one entry per control row)."""
    by_key = {r["key"]: r for r in records}
    cells = [(s, 0 if s.name == "closed_book" else n) for n in ns for s in settings
             if not (s.name == "closed_book" and n != ns[0])]
    common = [ln for ln in lines if all(record_key(s.name, n, ln) in by_key for s, n in cells)]
    rows = []
    for s, n in cells:
        recs = [by_key[record_key(s.name, n, ln)] for ln in common]
        if not recs:
            continue
        row: dict[str, Any] = {"setting": s.name, "policy": s.expand, "p": s.p, "n": n, "examples": len(recs)}
        if s.control_of is not None:
            row["control_of"] = s.control_of
            row["control"] = s.control
        for metric in ("match", "em", "f1"):
            row[metric] = bootstrap_ci([r[metric] for r in recs]).to_dict()
        row["ttft_s"] = median([r["ttft_s"] for r in recs])
        row["positions"] = statistics.fmean(r["positions"] for r in recs)
        row["prompt_tokens"] = statistics.fmean(r["prompt_tokens"] for r in recs)
        if s.uses_passages:
            row["gold_in_passages"] = statistics.fmean(1.0 if r["gold_in_passages"] else 0.0 for r in recs)
        row["projector_trained"] = recs[0]["projector_trained"]
        rows.append(row)
    doc: dict[str, Any] = {"examples": len(common), "rows": rows, "equal_latency": equal_latency(rows)}
    drops = []
    for s, n in cells:
        if s.control_of is not None and common:
            pairs = [(by_key[record_key(s.control_of, n, ln)], by_key[record_key(s.name, n, ln)]) for ln in common]
            drops.append(drop_difference(s.control_of, s.name, n, pairs))
    if drops:
        doc["drop_control"] = drops
    return doc


def drop_difference(
    refrag: str, drop: str, n: int, pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], metric: str = "match"
) -> dict[str, Any]:
    """REFRAG minus its drop control on the same questions, with a paired bootstrap 95% CI (the
    per-question differences are resampled, so both rows move together).

    Args:
        refrag, drop: the two settings' names.
        n: passage count N.
        pairs: per question, the REFRAG record and the drop record (prediction-log records).
        metric: ``match``, ``em`` or ``f1``.

    Example:
        >>> r = [({"match": 1.0, "positions": 50}, {"match": 0.0, "positions": 40})] * 3
        >>> drop_difference("refrag_random_p0.25", "drop_random_p0.25", 5, r)["difference"]["mean"]
        1.0
    """
    if not pairs:
        raise ValueError(f"no questions answered in both {refrag!r} and {drop!r} (N={n}).")
    return {
        "setting": refrag, "control": drop, "n": n, "examples": len(pairs), "metric": metric,
        "refrag": statistics.fmean(a[metric] for a, _ in pairs), "drop": statistics.fmean(b[metric] for _, b in pairs),
        "difference": bootstrap_ci([a[metric] - b[metric] for a, b in pairs]).to_dict(),
        "refrag_positions": statistics.fmean(a["positions"] for a, _ in pairs),
        "drop_positions": statistics.fmean(b["positions"] for _, b in pairs),
    }


def equal_latency(rows: Sequence[dict[str, Any]], metric: str = "match") -> list[dict[str, Any]]:
    """For each RAG row (N passages) and each REFRAG setting: the REFRAG run with the most
    passages whose median TTFT is no higher than RAG's, and the accuracy difference.

    Example:
        >>> rows = [{"setting": "rag", "n": 1, "ttft_s": 1.0, "match": {"mean": 0.3}},
        ...         {"setting": "refrag_p0", "n": 5, "ttft_s": 0.9, "match": {"mean": 0.4}}]
        >>> equal_latency(rows)[0]["refrag_n"]
        5
    """
    out = []
    rag = [r for r in rows if r["setting"] == "rag"]
    refrag_names = list(dict.fromkeys(r["setting"] for r in rows if r["setting"].startswith("refrag")))
    for base in sorted(rag, key=lambda r: r["n"]):
        for name in refrag_names:
            fits = [r for r in rows if r["setting"] == name and r["ttft_s"] <= base["ttft_s"]]
            if not fits:
                continue
            best = max(fits, key=lambda r: (r["n"], -r["ttft_s"]))
            out.append({
                "rag_n": base["n"], "rag_ttft_s": base["ttft_s"], f"rag_{metric}": base[metric]["mean"],
                "refrag_setting": name, "refrag_n": best["n"], "refrag_ttft_s": best["ttft_s"],
                f"refrag_{metric}": best[metric]["mean"], f"delta_{metric}": best[metric]["mean"] - base[metric]["mean"],
            })
    return out


def qa_markdown(doc: dict[str, Any]) -> str:
    """The QA summary and the equal-latency comparison as Markdown tables."""
    lines = []
    if doc.get("note"):
        lines += [f"> {doc['note']}", ""]
    lines += [
        f"Examples answered in every setting: {doc['examples']}.",
        "",
        "| setting | N | examples | Match [95% CI] | EM [95% CI] | F1 [95% CI] | median TTFT ms | decoder positions | gold in passages |",
        "|---|---:|---:|---|---|---|---:|---:|---:|",
    ]

    def ci(c: dict[str, float]) -> str:
        return f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"

    for r in doc["rows"]:
        gold = r.get("gold_in_passages")
        lines.append(
            f"| {r['setting']} | {r['n']} | {r['examples']} | {ci(r['match'])} | {ci(r['em'])} | {ci(r['f1'])} | "
            f"{r['ttft_s'] * 1000:.0f} | {r['positions']:.0f} | {'-' if gold is None else f'{gold:.2f}'} |"
        )
    if doc.get("equal_latency"):
        lines += [
            "",
            "Equal latency: for each RAG row, the REFRAG run with the most passages whose median TTFT is not higher.",
            "",
            "| RAG N | RAG TTFT ms | RAG Match | REFRAG setting | REFRAG N | REFRAG TTFT ms | REFRAG Match | difference |",
            "|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for e in doc["equal_latency"]:
            lines.append(
                f"| {e['rag_n']} | {e['rag_ttft_s'] * 1000:.0f} | {e['rag_match']:.3f} | {e['refrag_setting']} | "
                f"{e['refrag_n']} | {e['refrag_ttft_s'] * 1000:.0f} | {e['refrag_match']:.3f} | {e['delta_match']:+.3f} |"
            )
    drops = [d for d in doc.get("drop_control", []) if not d["control"].startswith("blank_")]
    blanks = [d for d in doc.get("drop_control", []) if d["control"].startswith("blank_")]
    if drops:
        lines += [
            "",
            "Drop control: each selective REFRAG row minus its drop twin, which keeps the same expanded chunks as "
            "tokens and deletes the unexpanded chunks instead of compressing them (same questions, paired bootstrap "
            "95% CI). A difference above 0 is what the compressed positions added.",
            "",
            "| REFRAG setting | N | examples | REFRAG Match | drop Match | REFRAG - drop [95% CI] | REFRAG positions | drop positions |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for d in drops:
            c = d["difference"]
            lines.append(
                f"| {d['setting']} | {d['n']} | {d['examples']} | {d['refrag']:.3f} | {d['drop']:.3f} | "
                f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | {d['refrag_positions']:.0f} | {d['drop_positions']:.0f} |"
            )
    if blanks:
        lines += [
            "",
            "Blank control: each selective REFRAG row minus its blank twin, which keeps the same decisions and "
            "positions but gives every compressed chunk one content-free vector (the mean chunk vector of "
            f"{BLANK_REFERENCE_PASSAGES} reference passages); same questions, paired bootstrap 95% CI. A difference "
            "above 0 is what the chunk vectors' content added beyond filling positions.",
            "",
            "| REFRAG setting | N | examples | REFRAG Match | blank Match | REFRAG - blank [95% CI] |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for d in blanks:
            c = d["difference"]
            lines.append(
                f"| {d['setting']} | {d['n']} | {d['examples']} | {d['refrag']:.3f} | {d['drop']:.3f} | "
                f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] |"
            )
    return "\n".join(lines) + "\n"
