"""`refrag train` argument errors: one line naming the flag, before any model loads."""

from __future__ import annotations

from typer.testing import CliRunner

from refrag_integrations.cli import app


def test_default_data_dir_missing_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared/data does not exist from here
    res = CliRunner().invoke(app, ["train", "reconstruct", "--output-dir", str(tmp_path / "rec")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --data-dir ../shared/data is not a directory")
    assert not (tmp_path / "rec").exists()


def test_explicit_missing_data_dir_names_the_flag(tmp_path):
    missing = tmp_path / "no-such-data"
    res = CliRunner().invoke(
        app, ["train", "sft", "--output-dir", str(tmp_path / "sft"), "--data-dir", str(missing)]
    )
    assert res.exit_code == 2
    assert f"--data-dir {missing} is not a directory" in res.output and "Traceback" not in res.output
