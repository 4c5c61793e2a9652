"""The package's public surface: what ``refrag_integrations`` exports, what inference imports,
and the one-way flow between its top-level modules."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import refrag_integrations
from refrag_integrations import LearnedPolicy, RefragEngine, load_policy, resolve_policy, save_checkpoint
from refrag_integrations.checkpoint import PACKAGED_DEFAULT, load_checkpoint
from refrag_integrations.policy import POLICY_NAMES, PerplexityDescPolicy, QueryRelevancePolicy, RandomPolicy

PACKAGE = Path(refrag_integrations.__file__).parent
REPO = PACKAGE.parent
LEGACY_CLASS = "refrag_integrations.training.policy_rl:LearnedPolicy"


def test_all_is_pinned():
    assert sorted(refrag_integrations.__all__) == [
        "Budget", "Chunk", "ChunkEncoder", "ChunkStore", "ChunkVectors", "Expand", "ExpandAll", "ExpandNone",
        "ExpansionBudget", "ExpansionPolicy", "GenerationResult", "GenerationStats", "LearnedPolicy",
        "ModelNotFoundError", "PerplexityDescPolicy", "PreparedInput", "Projector", "QueryRelevancePolicy",
        "RagPrompt", "RandomPolicy", "RefragConfig", "RefragEngine", "RegisteredPassage", "TokenStream",
        "UntrainedProjectorWarning", "chunk_passage", "load_checkpoint", "load_decoder", "load_encoder", "load_policy", "make_policy",
        "passage_id", "resolve_policy", "save_checkpoint", "save_engine",
    ]
    for name in refrag_integrations.__all__:
        assert getattr(refrag_integrations, name) is not None, name


# --------------------------------------------------------------------------- inference never imports training


def _tiny_checkpoint(tiny_engine: RefragEngine, path: Path, legacy: bool) -> Path:
    """A checkpoint with everything inference loads: projector, decoder LoRA, a learned policy."""
    enc = tiny_engine.chunk_encoder
    policy = LearnedPolicy(enc.encoder_dim, query_conditioned=True, expand_fraction=0.5)
    config = policy.policy_config()
    if legacy:  # as checkpoints written before the policy table stored it
        config.pop("policy")
        config["class"] = LEGACY_CLASS
    q_proj = tiny_engine.decoder.model.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(0)
    lora = {
        "model.layers.0.self_attn.q_proj.lora_A": torch.randn(2, q_proj.in_features, generator=g) * 0.01,
        "model.layers.0.self_attn.q_proj.lora_B": torch.randn(q_proj.out_features, 2, generator=g) * 0.01,
        "model.layers.0.self_attn.q_proj.lora_scale": torch.tensor(2.0),
    }
    return save_checkpoint(
        path, tiny_engine.config, enc.projector.state_dict(), decoder_lora=[lora],
        policy=policy.state_dict(), policy_config=config, trained_stages=["policy"],
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["policy-name", "legacy-class-path"])
def test_loading_and_answering_never_imports_training(tiny_dirs, tiny_engine, tmp_path, legacy):
    ckpt = _tiny_checkpoint(tiny_engine, tmp_path / "ckpt", legacy)
    dec, enc = (str(p) for p in tiny_dirs)
    script = f"""
import json, sys
from refrag_integrations import RefragEngine
engine = RefragEngine.from_pretrained({str(ckpt)!r}, decoder={dec!r}, encoder={enc!r}, device="cpu")
out = engine.generate("Who wrote Herons?", ["Herons was written by Simon Stephens."], max_new_tokens=3)
print(json.dumps({{
    "training": sorted(m for m in sys.modules if m.startswith("refrag_integrations.training")),
    "policy": type(engine.policy).__name__,
    "chunks": out.stats.chunks, "expanded": out.stats.chunks_expanded, "trained": out.stats.trained,
}}))
"""
    # A fresh interpreter: other tests' imports cannot hide an import of training here.
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["training"] == []
    assert got["policy"] == "LearnedPolicy" and got["trained"] is True
    assert got["expanded"] == int(0.5 * got["chunks"])  # the learned policy's trained p decided


def test_packaged_default_policy_loads_through_the_table():
    ckpt = load_checkpoint(PACKAGED_DEFAULT)
    assert ckpt.policy_config["class"] == LEGACY_CLASS  # written before the table: still loads
    policy = load_policy(ckpt.policy, ckpt.policy_config)
    assert isinstance(policy, LearnedPolicy) and policy.query_conditioned


def test_policy_config_never_imports_a_named_module(tiny_engine):
    policy = LearnedPolicy(tiny_engine.chunk_encoder.encoder_dim)
    assert policy.policy_config()["policy"] == "learned"
    for bad in ({"class": "os:system"}, {"class": "refrag_integrations.policy:ExpandAll"}, {"policy": "random"}):
        with pytest.raises(ValueError, match="policy"):
            load_policy(policy.state_dict(), {**policy.policy_config(), "policy": None, **bad})
    again = load_policy(policy.state_dict(), policy.policy_config())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), policy.state_dict().values()))


def test_resolve_policy_is_the_one_name_table(tiny_engine):
    assert resolve_policy("relevance", engine=tiny_engine).__class__ is QueryRelevancePolicy
    assert isinstance(resolve_policy("random", seed=3), RandomPolicy)
    assert isinstance(resolve_policy("perplexity-desc", engine=tiny_engine), PerplexityDescPolicy)
    obj = resolve_policy("none")
    assert resolve_policy(obj) is obj
    with pytest.raises(ValueError, match="Unknown expansion policy"):
        resolve_policy("greedy")
    with pytest.raises(ValueError, match="checkpoint"):
        LearnedPolicy.from_name()
    with pytest.raises(ValueError, match="engine"):
        resolve_policy("perplexity-desc")
    assert set(POLICY_NAMES) == {"all", "none", "random", "relevance", "perplexity-desc"}
    with pytest.warns(DeprecationWarning):
        assert refrag_integrations.make_policy("all").name == "all"


# --------------------------------------------------------------------------- one-way flow


def _imports(path: Path) -> set[str]:
    """Top-level package modules ``path`` imports at run time (``TYPE_CHECKING`` blocks left out)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        if node.module:
            out.add(node.module.split(".")[0])
        else:
            out.update(a.name for a in node.names)
    return out


def test_no_import_loop_among_top_level_modules():
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {m: sorted(_imports(p) & set(modules)) for m, p in modules.items()}
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            raise AssertionError(f"import loop: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in done:
            return
        for n in graph[m]:
            visit(n, stack + [m])
        done.add(m)

    for m in graph:
        visit(m, [])
    # Inference modules never import training, evaluation, the CLI or a framework adapter.
    for m, p in modules.items():
        assert not _imports(p) & {"training", "evaluation", "cli", "langchain", "llama_index"}, m


def test_deprecated_cli_option_names_warn_and_still_work():
    import typer

    from refrag_integrations.cli.common import renamed_option

    assert renamed_option("0.1", None, "--expand-fraction", "--p", "0") == "0.1"
    assert renamed_option(None, None, "--expand-fraction", "--p", "0") == "0"
    with pytest.warns(DeprecationWarning, match="--p is deprecated; use --expand-fraction"):
        assert renamed_option(None, "0,0.25", "--expand-fraction", "--p", "0") == "0,0.25"
    with pytest.raises(typer.BadParameter, match="deprecated name"):
        renamed_option("0.1", "0.2", "--expand-fraction", "--p", "0")


def test_one_vocabulary_with_deprecated_aliases(tiny_engine):
    """policy / expand_fraction / max_expanded everywhere; expand / budget still work, with a warning."""
    new = tiny_engine.prepare_rag("Who?", ["Herons was written by Simon Stephens."], "random", expand_fraction=0.5)
    with pytest.warns(DeprecationWarning, match="budget= is deprecated"):
        old = tiny_engine.prepare_rag("Who?", ["Herons was written by Simon Stephens."], expand="random", budget=0.5)
    assert new.stats.expanded == old.stats.expanded and new.stats.chunks_expanded == int(0.5 * new.stats.chunks)
    with pytest.raises(ValueError, match="deprecated name"):
        tiny_engine.decide("Who?", ["Herons."], policy="all", expand="none")
    capped = tiny_engine.decide("Who?", ["Herons was written by Simon Stephens in 2001."], "random", max_expanded=1)
    assert sum(map(sum, capped)) == 1
    from refrag_integrations.langchain import RefragCompressor

    with pytest.warns(DeprecationWarning, match="expand= is deprecated"):
        old_style = RefragCompressor(engine=tiny_engine, expand="relevance", budget=3)
    assert (old_style.policy, old_style.expand_fraction, old_style.max_expanded) == ("relevance", None, 3)
