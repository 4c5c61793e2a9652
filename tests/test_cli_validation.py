"""Bad command-line values are refused before any model loads: one line, exit status 2, no
traceback (issue 18 WEAK, FAIL 3); an untrained projector is visible in `refrag ask` (issue 16 §1)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from refrag_integrations.cli import app
from refrag_integrations.config import MAX_CONTEXT_CHARS, MAX_PASSAGE_CHARS, MAX_TOP_K

GOOD = "Gustave Eiffel designed the tower in Paris, France.\n\nThe tower was built from 1887 to 1889.\n"


class ModelLoaded(RuntimeError):
    """Raised by the patched loaders: a model was about to be loaded."""


@pytest.fixture()
def no_models(monkeypatch):
    """Every way a command could load a model fails the command and is recorded."""
    from refrag_integrations import embedder, models
    from refrag_integrations.engine import RefragEngine

    calls: list[str] = []

    def refuse(what):
        def load(*args, **kwargs):
            calls.append(what)
            raise ModelLoaded(f"{what} called")
        return load

    monkeypatch.setattr(RefragEngine, "from_pretrained", classmethod(lambda cls, *a, **k: refuse("engine")()))
    monkeypatch.setattr(models, "load_decoder", refuse("decoder"))
    monkeypatch.setattr(models, "load_encoder", refuse("encoder"))
    monkeypatch.setattr(embedder.SentenceEmbedder, "__init__", lambda self, *a, **k: refuse("embedder")())
    return calls


@pytest.fixture()
def files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(GOOD)
    fake_pdf = tmp_path / "fake.pdf"
    fake_pdf.write_text("this is not a PDF at all\n")
    huge = tmp_path / "huge.txt"
    huge.write_text("word " * 200_000)  # one 1 MB passage (no blank line)
    many = tmp_path / "many.txt"
    many.write_text("\n\n".join(["short passage " * 100] * (MAX_CONTEXT_CHARS // 1400 + 10)))
    long_one = tmp_path / "long.txt"
    long_one.write_text(GOOD + "\n\n" + "x" * (MAX_PASSAGE_CHARS + 1))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stage: sft\nlr: [1e-4\n")
    list_yaml = tmp_path / "list.yaml"
    list_yaml.write_text("- sft\n- policy\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    return {"good": good, "fake_pdf": fake_pdf, "huge": huge, "many": many, "long": long_one, "bad_yaml": bad_yaml,
            "list_yaml": list_yaml, "file": a_file, "dir": tmp_path, "missing": tmp_path / "does-not-exist"}


CASES = {
    # ask
    "p above 1": (["ask", "q?", "--passages", "{good}", "--expand-fraction", "1.5"], "expand fraction"),
    "p nan": (["ask", "q?", "--passages", "{good}", "--expand-fraction", "nan"], "got nan"),
    "no tokens": (["ask", "q?", "--passages", "{good}", "--max-new-tokens", "0"], "at least 1"),
    "bogus policy": (["ask", "q?", "--passages", "{good}", "--policy", "bogus"], "unknown expansion policy 'bogus'"),
    "empty question": (["ask", "   ", "--passages", "{good}"], "question is empty"),
    "missing checkpoint": (["ask", "q?", "--passages", "{good}", "--checkpoint", "{missing}"], "not a directory"),
    "not a checkpoint": (["ask", "q?", "--passages", "{good}", "--checkpoint", "{dir}"], "no refrag_config.json"),
    "top-k too large": (["ask", "q?", "-k", "5000"], f"between 1 and {MAX_TOP_K}"),
    "top-k zero": (["ask", "q?", "-k", "0"], f"between 1 and {MAX_TOP_K}"),
    "passages dir": (["ask", "q?", "--passages", "{dir}"], "is a directory"),
    "passages missing": (["ask", "q?", "--passages", "{missing}"], "does not exist"),
    "fake pdf": (["ask", "q?", "--passages", "{fake_pdf}"], "not a PDF file"),
    "huge passage": (["ask", "q?", "--passages", "{huge}"], "passage 1 of"),
    "long passage": (["ask", "q?", "--passages", "{long}"], "passage 3 of"),
    "too many characters": (["ask", "q?", "--passages", "{many}"], "characters of passages"),
    "ask index is a file": (["ask", "q?", "--index", "{file}"], "is a file"),
    "index and host": (["ask", "q?", "--index", "{dir}", "--host", "localhost"], "not both"),
    "ask server timeout": (["ask", "q?", "--host", "localhost", "--server-timeout", "0"], "'--server-timeout'"),
    # index
    "batch size 0": (["index", "{good}", "--index", "{dir}/idx", "--batch-size", "0"], "--batch-size"),
    "min over max words": (["index", "{good}", "--index", "{dir}/idx", "--min-words", "300", "--max-words", "200"],
                           "must not exceed"),
    "bogus embedder": (["index", "{good}", "--index", "{dir}/idx", "--embedder", "bogus"], "'bogus'"),
    "index checkpoint": (["index", "{good}", "--index", "{dir}/idx", "--checkpoint", "{missing}"], "not a directory"),
    # demo
    "demo p": (["demo", "--expand-fraction", "2"], "expand fraction"),
    "demo index file": (["demo", "--index", "{file}"], "is a file"),
    "demo top-k": (["demo", "-k", "100000"], f"between 1 and {MAX_TOP_K}"),
    "demo policy": (["demo", "--policy", "bogus"], "unknown expansion policy"),
    # serve
    "serve server timeout": (["serve", "--chroma-host", "localhost", "--server-timeout", "nan"], "'--server-timeout'"),
    # train
    "train missing config": (["train", "sft", "--config", "{missing}"], "does not exist"),
    "train malformed config": (["train", "sft", "--config", "{bad_yaml}"], "not valid YAML at line"),
    "recipe missing config": (["train", "recipe", "--config", "{missing}"], "does not exist"),
    "recipe list config": (["train", "recipe", "--config", "{list_yaml}"], "must hold a mapping"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_values_fail_fast_in_one_line(case, files, no_models):
    argv, expected = CASES[case]
    argv = [a.format(**files) for a in argv]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2, (res.output, res.exception)
    assert not no_models, f"a model was loaded: {no_models}"
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in res.output and "╭" not in res.output


def test_debug_shows_the_usual_output_and_library_errors_are_one_line(files, no_models, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(app, ["--debug", "ask", "q?", "--passages", str(files["good"]), "--expand-fraction", "2"])
    assert res.exit_code == 2 and "Usage:" in res.output  # typer's own rendering
    from refrag_integrations.engine import RefragEngine

    def broken(cls, *args, **kwargs):
        raise ValueError("the decoder 'x' cannot be found; give a local path.")

    monkeypatch.setattr(RefragEngine, "from_pretrained", classmethod(broken))
    res = runner.invoke(app, ["ask", "q?", "--passages", str(files["good"])])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: the decoder 'x' cannot be found; give a local path. (run with --debug for the traceback)"
    ]
    res = runner.invoke(app, ["ask", "q?", "--passages", str(files["good"]), "--debug"])
    assert isinstance(res.exception, ValueError)  # --debug after the command works too: the exception propagates


def test_help_and_no_arguments_still_show_help():
    runner = CliRunner()
    res = runner.invoke(app, ["ask", "--help"])
    assert res.exit_code == 0 and "--expand-fraction" in res.output
    res = runner.invoke(app, ["train"])
    assert res.exit_code == 2 and "recipe" in res.output


def test_ask_says_the_projector_is_untrained_and_answers_with_ordinary_rag(files, tiny_engine, monkeypatch):
    from refrag_integrations.engine import RefragEngine

    monkeypatch.setattr(RefragEngine, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_engine))
    runner = CliRunner()
    base = ["ask", "Who designed the tower?", "--passages", str(files["good"]), "--max-new-tokens", "2"]
    res = runner.invoke(app, base + ["--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    s = out["stats"]
    assert out["policy"] == "all" and s["trained"] is False
    assert s["chunks_expanded"] == s["chunks"] > 0 and s["positions"] == s["prompt_tokens"]
    assert "UNTRAINED" in res.stderr and "ordinary RAG" in res.stderr

    res = runner.invoke(app, base + ["--json", "--expand-fraction", "0.5"])  # REFRAG is opt-in
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.strip().splitlines()[-1])["stats"]
    assert s["chunks_expanded"] < s["chunks"] and "NOT REFRAG quality" in res.stderr

    res = runner.invoke(app, base)  # text output: the warning is a visible line of it
    assert res.exit_code == 0 and any(line.startswith("warning: no trained REFRAG checkpoint")
                                      for line in res.stdout.splitlines())


def test_ask_reads_a_real_pdf_as_index_does(tmp_path, tiny_engine, monkeypatch):
    pytest.importorskip("pypdf", reason="PDF support needs the `pdf` extra (pypdf)")
    from refrag_integrations.engine import RefragEngine

    from tiny import make_pdf

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(["The Eiffel Tower is in Paris.", "It was built from 1887 to 1889."]))
    monkeypatch.setattr(RefragEngine, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_engine))
    res = CliRunner().invoke(app, ["ask", "Where is the tower?", "--passages", str(pdf), "--json",
                                   "--max-new-tokens", "1"])
    assert res.exit_code == 0, res.output
    sources = json.loads(res.stdout.strip().splitlines()[-1])["sources"]
    assert len(sources) == 1 and "Eiffel Tower is in Paris" in sources[0]["text"] and "1887" in sources[0]["text"]


def test_ask_gives_the_server_timeout_to_the_store_and_a_timeout_is_one_line(tiny_engine, monkeypatch):
    """`ask --host ... --server-timeout T` opens the store with that timeout; a server that does not
    answer in time ends the command with the store's one-line error (exit 1), no traceback."""
    from refrag_integrations.engine import RefragEngine
    from refrag_integrations.store import ChromaTimeoutError, ChunkStore

    monkeypatch.setattr(RefragEngine, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_engine))
    opened = []

    def frozen(cls, engine, **kwargs):
        opened.append(kwargs)
        raise ChromaTimeoutError(
            f"The Chroma server at http://{kwargs['host']}:{kwargs['port']} did not answer within the "
            f"{kwargs['timeout']:g} s timeout (ReadTimeout)."
        )

    monkeypatch.setattr(ChunkStore, "for_engine", classmethod(frozen))
    res = CliRunner().invoke(app, ["ask", "q?", "--host", "10.0.0.9", "--port", "8123", "--server-timeout", "2.5"])
    assert opened and opened[0]["timeout"] == 2.5 and opened[0]["host"] == "10.0.0.9", opened
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == ["Error: The Chroma server at http://10.0.0.9:8123 did not answer within the 2.5 s timeout "
                     "(ReadTimeout). (run with --debug for the traceback)"], res.output
