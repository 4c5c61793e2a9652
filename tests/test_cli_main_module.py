"""``python -m refrag_integrations.cli`` is the ``refrag`` command (the train-your-own notebook uses it)."""

from __future__ import annotations

import runpy
import sys

import pytest


def test_python_dash_m_runs_the_refrag_app(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["refrag", "train", "recipe", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("refrag_integrations.cli", run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "Usage: refrag train recipe" in out and "--output-dir" in out
