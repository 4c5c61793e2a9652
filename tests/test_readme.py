"""Every ```python block of README.md runs as written.

Each block is executed top to bottom in a fresh namespace, exactly as a reader would paste it:
once on tiny random models (fast: catches a stale constructor argument, a renamed function, a
missing import), and once on the real offline default models with the packaged checkpoint
(marked ``integration``: the README's claims about the shipped defaults). Both check what each
block is there to show: the Python API compresses with ``expand_fraction=0.25`` and ``policy="all"``
is ordinary RAG; the LangChain chain's chat model finds the retrieved passages and the LlamaIndex
query engine's LLM reads the retrieved nodes, both compressing them with the shipped defaults and
leaving them tokens on an untrained engine (whose default is ordinary RAG).
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> dict[str, str]:
    """The README's python blocks by the heading of their section."""
    text = README.read_text(encoding="utf-8")
    blocks: dict[str, str] = {}
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M):
        headings = re.findall(r"^## (.+)$", text[: match.start()], re.M)
        name = headings[-1].split(":")[0].strip() if headings else "top"
        assert name not in blocks, f"two python blocks under '{name}': give each its own section"
        blocks[name] = match.group(1)
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_the_three_snippets():
    assert set(BLOCKS) == {"Python API", "LangChain", "LlamaIndex"}


def imported_modules(code: str) -> list[str]:
    return re.findall(r"^(?:from|import) ([\w.]+)", code, re.M)


def llm_messages(runs: list[Any]) -> list[dict]:
    """The AI messages (as dicts) of every chat model run in a traced run tree."""
    out = []
    stack = list(runs)
    while stack:
        run = stack.pop()
        stack.extend(run.child_runs)
        if run.run_type == "llm" and run.outputs:
            for generation in run.outputs["generations"][0]:
                out.append(generation["message"]["kwargs"])
    return out


def run_block(name: str) -> tuple[dict[str, Any], str, list[dict]]:
    """Execute one README block; return its namespace, what it printed and its chat model messages."""
    code = BLOCKS[name]
    for module in imported_modules(code):
        if not module.startswith("refrag_integrations"):
            pytest.importorskip(module)
    namespace: dict[str, Any] = {"__name__": f"readme_{name}"}
    printed = io.StringIO()
    tracing = contextlib.nullcontext(None)
    if name == "LangChain":
        from langchain_core.tracers.context import collect_runs

        tracing = collect_runs()
    with tracing as collector, contextlib.redirect_stdout(printed):
        try:
            exec(compile(code, f"README.md ({name})", "exec"), namespace)
        finally:
            store = namespace.get("vectorstore")
            if store is not None:  # the default in-process Chroma collection: leave none behind
                store.delete_collection()
    messages = llm_messages(collector.traced_runs) if collector is not None else []
    return namespace, printed.getvalue(), messages


def check_block(name: str, namespace: dict[str, Any], printed: str, messages: list[dict], trained: bool) -> None:
    """What each block shows. ``trained``: the engine has a checkpoint, so the adapters' default
    policy compresses; an untrained engine's default is ordinary RAG (README, "Python API")."""
    assert printed, f"the {name} block printed nothing"  # a tiny random model may print only whitespace
    if name == "Python API":
        out, rag = namespace["out"], namespace["rag"]
        assert out.stats.chunks_compressed > 0  # learned policy, or an untrained engine opting into relevance
        assert rag.stats.chunks_compressed == 0 and rag.stats.positions == rag.stats.prompt_tokens
        assert str(out.stats.to_dict()) in printed
    elif name == "LangChain":
        assert len(messages) == 1
        passages = messages[0]["response_metadata"]["refrag_passages"]
        assert passages["registered"] == passages["found"] == 2
        assert passages["compressed"] >= 1 if trained else passages["compressed"] == 0
    elif name == "LlamaIndex":
        stats = namespace["llm"].last_stats
        assert stats is not None and stats.chunks == stats.chunks_compressed + stats.chunks_expanded > 0
        assert stats.chunks_compressed > 0 if trained else stats.chunks_compressed == 0


@pytest.fixture
def fresh_shared_engines(monkeypatch):
    """The adapters' process-wide engines start empty and are dropped after the test, so the
    README's shared engine neither sees nor leaves registrations of other tests."""
    from refrag_integrations import shared

    monkeypatch.setattr(shared, "_ENGINES", {})


@pytest.fixture
def tiny_defaults(monkeypatch, tiny_chat_dirs, fresh_shared_engines):
    """``RefragEngine.from_pretrained`` with no decoder / encoder loads the tiny chat models (k = 4),
    everywhere: the README's own call and the adapters' shared engine."""
    from refrag_integrations import RefragEngine

    dec, enc = tiny_chat_dirs
    original = RefragEngine.from_pretrained

    def from_tiny(checkpoint=None, **kwargs):
        given = {key: value for key, value in kwargs.items() if value is not None}
        defaults = {"decoder": str(dec), "encoder": str(enc), "chunk_size": 4, "device": "cpu"}
        return original(checkpoint, **{**defaults, **given})

    monkeypatch.setattr(RefragEngine, "from_pretrained", staticmethod(from_tiny))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_block_runs_on_tiny_models(name, tiny_defaults):
    from refrag_integrations import UntrainedProjectorWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedProjectorWarning)  # the tiny models have no checkpoint
        namespace, printed, messages = run_block(name)
    check_block(name, namespace, printed, messages, trained=False)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_readme_block_runs_on_the_default_models(name, fresh_shared_engines):
    from refrag_integrations import UntrainedProjectorWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedProjectorWarning)  # the packaged checkpoint must load
        namespace, printed, messages = run_block(name)
    check_block(name, namespace, printed, messages, trained=True)
    if name == "Python API":
        assert namespace["out"].stats.trained
