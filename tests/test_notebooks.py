"""The cookbook notebooks are committed executed, read only what ships in the package, and show
the shipped defaults; the train-your-own notebook runs end to end (marked ``integration``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COOKBOOK = ROOT / "cookbook"
RAG_NOTEBOOKS = ["langchain_rag.ipynb", "llamaindex_query_engine.ipynb"]
TRAIN_NOTEBOOK = "train_your_own_decoder.ipynb"
NOTEBOOKS = RAG_NOTEBOOKS + [TRAIN_NOTEBOOK]


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def text_outputs(nb: dict) -> str:
    out = []
    for cell in code_cells(nb):
        for o in cell.get("outputs", []):
            text = o.get("text", o.get("data", {}).get("text/plain", ""))
            out.append("".join(text) if isinstance(text, list) else text)
    return "\n".join(out)


def load(name: str) -> dict:
    return json.loads((COOKBOOK / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_committed_executed_top_to_bottom(name):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.reads((COOKBOOK / name).read_text(encoding="utf-8"), as_version=4))
    nb = load(name)
    cells = code_cells(nb)
    # One kernel, every cell once, in order: the outputs belong to the code as committed.
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    for cell in cells:
        assert not [o for o in cell["outputs"] if o["output_type"] == "error"], source(cell)[:80]
    with_output = [c for c in cells if c["outputs"]]
    assert len(with_output) >= len(cells) - 4  # only definition cells may be silent
    assert cells[-1]["outputs"] or cells[-2]["outputs"]
    assert "machine:" in text_outputs(nb)  # timings come with the machine they were measured on


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_reads_the_packaged_demo_corpus_and_nothing_outside_the_package(name):
    code = "\n".join(source(c) for c in code_cells(load(name)))
    assert 'resources.files("refrag_integrations") / "data"' in code
    assert "nq_demo_passages.jsonl" in code and "nq_demo_questions.jsonl" in code
    assert "shared" not in code and "REFRAG_SHARED_DATA" not in code


@pytest.mark.parametrize("name", RAG_NOTEBOOKS)
def test_rag_notebook_compares_the_shipped_default_with_ordinary_rag_and_plots_it(name):
    nb = load(name)
    code = "\n".join(source(c) for c in code_cells(nb))
    assert "RefragEngine.from_pretrained()" in code or 'RefragEngine.from_pretrained(device="cpu")' in code
    assert 'policy="relevance"' not in code and "expand_fraction=" not in code  # the shipped default policy and p
    assert 'policy="all"' in code or "compress=False" in code  # ordinary RAG on the same decoder
    out = text_outputs(nb)
    assert "trained projector: True" in out or "projector trained: True" in out
    assert "LearnedPolicy(query_conditioned=True, expand_fraction=0.25)" in out
    assert len(re.findall(r"TTFT \d+ ms", out)) >= 16  # 8 questions x 2 sides, measured in the notebook
    assert len(re.findall(r"Match [01], F1 \d\.\d\d", out)) == 16
    pngs = [o for c in code_cells(nb) for o in c["outputs"] if "image/png" in o.get("data", {})]
    assert len(pngs) == 1


def test_train_notebook_committed_run_trained_every_stage_and_loaded_the_result():
    out = text_outputs(load(TRAIN_NOTEBOOK))
    assert "$ refrag train recipe --decoder $WORK/my-decoder" in out
    assert "trained: ['reconstruct', 'cpt', 'sft', 'policy'] | skipped: []" in out
    assert "trained: [] | skipped: ['reconstruct', 'cpt', 'sft', 'policy']" in out  # the rerun
    assert re.search(r"trained: True \| default policy: LearnedPolicy", out)
    assert "meaningless: a tiny random model" in out


@pytest.mark.integration
def test_train_notebook_runs(monkeypatch):
    """Executes the notebook (tiny models, a few minutes of CPU); nothing is written back."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("yaml")
    # The kernel and the `refrag` subprocess import this checkout's package, not another install.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(COOKBOOK / TRAIN_NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(COOKBOOK)}}
    ).execute()  # raises CellExecutionError on any failing cell
    out = text_outputs(nb)
    assert "trained: ['reconstruct', 'cpt', 'sft', 'policy'] | skipped: []" in out
    assert "trained: [] | skipped: ['reconstruct', 'cpt', 'sft', 'policy']" in out
    assert re.search(r"decoder positions (\d+) for (\d+) prompt tokens", out)
    used, total = map(int, re.search(r"decoder positions (\d+) for (\d+) prompt tokens", out).groups())
    assert used < total  # the trained checkpoint's policy compressed chunks
    assert "removed /" in out
