"""Package metadata: one version source, the typing marker shipped as package data."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import refrag_integrations

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions():
    assert refrag_integrations.__version__ == importlib.metadata.version("refrag-integrations")


def test_pyproject_reads_the_version_from_the_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "refrag_integrations.__version__"


def test_py_typed_exists_and_ships_as_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (Path(refrag_integrations.__file__).parent / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["refrag_integrations"]
    assert "Typing :: Typed" in project["project"]["classifiers"]
