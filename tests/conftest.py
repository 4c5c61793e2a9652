"""Shared fixtures: tiny random models (no network) and the real offline defaults (integration)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_models  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(decoder dir, encoder dir) of tiny random models without a chat template."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny"), chat=False)


@pytest.fixture(scope="session")
def tiny_chat_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(decoder dir, encoder dir) of tiny random models whose tokenizer has a chat template."""
    return make_tiny_models(tmp_path_factory.mktemp("tinychat"), chat=True)


@pytest.fixture(scope="session")
def tiny_engine(tiny_dirs):
    """A RefragEngine on the tiny models, k = 4, untrained projector (fresh per session).

    Its default policy is set to "none" (compress everything), as the tests of the compressed path
    expect; an untrained engine's own default is ordinary RAG (tests/test_untrained_engine.py)."""
    from refrag_integrations import RefragEngine

    dec, enc = tiny_dirs
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")


@pytest.fixture(scope="session")
def tiny_chat_engine(tiny_chat_dirs):
    from refrag_integrations import RefragEngine

    dec, enc = tiny_chat_dirs  # default policy "none", as tiny_engine
    return RefragEngine.from_pretrained(decoder=str(dec), encoder=str(enc), chunk_size=4, device="cpu", policy="none")


@pytest.fixture(scope="session")
def default_engine():
    """The real offline default models (SmolLM2-135M-Instruct + all-MiniLM-L6-v2)."""
    from refrag_integrations import RefragEngine

    return RefragEngine.from_pretrained(device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
