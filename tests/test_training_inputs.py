"""Training data given as files (corpus, heldout, qa, qa_eval) instead of data_dir's fixed names,
the checks that run before any model loads, and the evaluation progress bars."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from refrag_integrations.cli import app
from refrag_integrations.training.config import HELDOUT_FRACTION, TrainConfig
from refrag_integrations.training.data import (
    TokenCorpus, distillation_documents, heldout_documents, input_files, missing_input, pretraining_documents,
    qa_examples, read_documents, split_heldout,
)

from test_training import DOCS  # noqa: E402  (tests/ is on sys.path via conftest)


def write_qa(path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"question {i}?", "answers": [f"answer {i}"],
                                "ctxs": [{"title": f"Title {i}", "text": DOCS[i % len(DOCS)][:80]}]}) + "\n")


def test_text_files_of_every_format_read_as_documents(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    (tmp_path / "c.txt").write_text(DOCS[1])
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[2])
    assert read_documents(tmp_path / "c.jsonl") == DOCS == read_documents(tmp_path / "c.jsonl.gz")
    assert read_documents(tmp_path / "c.txt") == [DOCS[1]] and read_documents(tmp_path / "c.txt.gz") == [DOCS[2]]
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line needs a string 'text' field"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="must end in one of"):
        read_documents(tmp_path / "c.csv")


@pytest.mark.parametrize("docs", [DOCS, [DOCS[0]]])
def test_heldout_split_is_the_corpus_tail_and_disjoint_from_training(docs):
    train, held = split_heldout(docs)
    assert "".join(train) + "".join(held) == "".join(docs)  # nothing lost, nothing shared
    share = sum(len(d) for d in held) / sum(len(d) for d in docs)
    assert HELDOUT_FRACTION * 0.9 < share <= HELDOUT_FRACTION + 0.01
    assert held[0][:1].isspace()  # cut at a whitespace, no word split


def test_config_files_replace_the_data_dir_defaults(tmp_path):
    corpus, held, qa, qa_eval = tmp_path / "c.jsonl", tmp_path / "h.txt", tmp_path / "qa.jsonl", tmp_path / "e.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    held.write_text("held-out text")
    write_qa(qa, 20)
    write_qa(qa_eval, 3)
    missing_dir = str(tmp_path / "no-data-dir")  # never read when every file is given
    cfg = TrainConfig(stage="cpt", corpus=str(corpus), data_dir=missing_dir)
    train, tail = pretraining_documents(cfg), heldout_documents(cfg)
    assert (train, tail) == split_heldout(DOCS) and distillation_documents(cfg) == train
    cfg = TrainConfig(stage="cpt", corpus=str(corpus), heldout=str(held), data_dir=missing_dir)
    assert pretraining_documents(cfg) == DOCS and heldout_documents(cfg) == ["held-out text"]
    cfg = TrainConfig(stage="sft", qa=str(qa), data_dir=missing_dir)
    tr, ev = qa_examples(cfg, "train"), qa_examples(cfg, "eval")
    assert [e.line for e in tr] == list(range(1, 19)) and [e.line for e in ev] == [19, 20]
    assert tr[0].passage == f"Title 0\n{DOCS[0][:80].strip()}"
    cfg = TrainConfig(stage="sft", qa=str(qa), qa_eval=str(qa_eval), data_dir=missing_dir)
    assert len(qa_examples(cfg, "train")) == 20 and len(qa_examples(cfg, "eval")) == 3
    write_qa(tmp_path / "one.jsonl", 1)
    with pytest.raises(ValueError, match="too few to hold out"):
        qa_examples(TrainConfig(stage="sft", qa=str(tmp_path / "one.jsonl")), "train")
    with pytest.raises(TypeError, match="expected a TrainConfig"):
        pretraining_documents(str(tmp_path))


def test_input_files_name_the_setting_that_points_at_each(tmp_path):
    d = tmp_path / "data"
    assert [n for n, _ in input_files(TrainConfig(stage="reconstruct", data_dir=str(d)))] == ["data_dir"] * 4
    assert input_files(TrainConfig(stage="distill", qa="q.jsonl", corpus="c.txt", qa_share=0.5)) == [
        ("corpus", Path("c.txt")), ("qa", Path("q.jsonl"))]
    assert input_files(TrainConfig(stage="distill", qa="q.jsonl")) == [("qa", Path("q.jsonl"))]
    assert missing_input(TrainConfig(stage="sft", data_dir=str(d))).startswith(f"--data-dir {d} is not a directory")
    d.mkdir()
    assert missing_input(TrainConfig(stage="sft", data_dir=str(d))).startswith(
        f"--data-dir {d} has no nq-open-oracle.jsonl.gz")
    write_qa(tmp_path / "qa.jsonl", 4)
    assert missing_input(TrainConfig(stage="sft", qa=str(tmp_path / "qa.jsonl"), data_dir=str(tmp_path / "x"))) is None


def test_stage_command_trains_from_files_without_a_data_dir_check(tmp_path):
    res = CliRunner().invoke(app, ["train", "cpt", "--output-dir", str(tmp_path / "cpt"), "--data-dir",
                                   str(tmp_path / "none"), "--set", f"corpus={tmp_path / 'c.jsonl'}"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == f"Error: corpus file {tmp_path / 'c.jsonl'} does not exist; check the path."


def test_evaluations_show_a_progress_bar_only_when_asked(tiny_engine, capsys):
    from refrag_integrations.training.objectives import next_paragraph_eval, reconstruction_eval

    corpus = TokenCorpus(DOCS, tiny_engine.tokenizer)
    capsys.readouterr()
    rec = reconstruction_eval(tiny_engine, corpus, [1, 2], examples=3, batch=2)
    nxt = next_paragraph_eval(tiny_engine, corpus, 2, 4, examples=3, batch=2)
    err = capsys.readouterr().err
    assert set(rec) == {"1", "2"} and "log_ppl_compressed" in nxt
    assert "eval reconstruction:   0%|          | 0/4" in err  # 2 chunk counts x 2 batches
    assert "eval next paragraph:   0%|          | 0/2" in err
    reconstruction_eval(tiny_engine, corpus, [1], examples=2, progress=False)
    next_paragraph_eval(tiny_engine, corpus, 2, 4, examples=2, progress=False)
    assert capsys.readouterr().err == ""


def test_an_answer_is_text_even_where_it_spells_a_control_token(tiny_chat_engine):
    """A gold answer is trained as text: ``<|im_end|>`` inside it is split into ordinary tokens,
    so the target's only control token is the final EOS; ordinary answers tokenise as before."""
    from refrag_integrations.training.data import answer_ids

    tok = tiny_chat_engine.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = answer_ids(tok, "Paris <|im_end|> France")
    assert end not in ids[:-1] and ids[-1] == tok.eos_token_id
    assert answer_ids(tok, " Paris ") == tok("Paris", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
