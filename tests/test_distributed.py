"""Data-parallel training: two CPU processes (gloo), launched the way torchrun launches them
(``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``), stay in sync, agree on
stopping when only one of them is signalled, resume together, and end with the weights of a single
process that accumulates the same global batch (``grad_accum = 2``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Callable

import pytest
import torch

from refrag_integrations.training.config import TrainConfig
from refrag_integrations.training.trainer import CHECKPOINT_DIR, STATE_FILE, Trainer

from test_training import DOCS, make_cfg  # noqa: E402  (tests/ is on sys.path, see conftest.py)

WORLD = 2
STEPS = 4
STOP_AT = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(cfg: TrainConfig) -> Trainer:
    from refrag_integrations.training.data import TokenCorpus

    trainer = Trainer(cfg)
    corpus = TokenCorpus(DOCS, trainer.engine.tokenizer)
    trainer._data, trainer._heldout = corpus, corpus
    return trainer


def run_rank_interrupted(
    make: Callable[[TrainConfig], Trainer], cfg: dict, rank: int, ports: list[int],
    on_first: Callable[[Trainer], None] | None = None, on_stopped: Callable[[], None] | None = None,
) -> tuple[dict, Trainer, dict]:
    """One rank of a ``WORLD``-rank gloo run, set up as torchrun sets it up: train until rank 1
    alone gets SIGTERM after step ``STOP_AT``, then a new trainer (``make``) resumes to the end.

    ``on_first(trainer)`` runs before the first training, ``on_stopped()`` after it stopped.
    Returns (the first run's result, the resumed trainer, its final metrics).
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    os.environ["MASTER_PORT"] = str(ports[0])
    first = make(TrainConfig(**cfg))
    assert first.dist.world_size == WORLD and first.dist.rank == rank and first.dist.owns_group
    if on_first is not None:
        on_first(first)
    step_once = first.train_step

    def step_then_sigterm():
        m = step_once()
        if first.step == STOP_AT and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return m

    first.train_step = step_then_sigterm
    stopped = first.train()  # leaves the process group it created
    if on_stopped is not None:
        on_stopped()

    os.environ["MASTER_PORT"] = str(ports[1])
    second = make(TrainConfig(**cfg))
    return stopped, second, second.train()


def spawn_interrupted_ranks(worker: Callable[..., None], cfg: TrainConfig, result_dir: Path) -> list[dict]:
    """Run ``worker(rank, cfg, ports, result_dir)`` on ``WORLD`` spawned ranks, load each rank's
    ``rank{r}.pt`` and check what every interrupted run must show: both ranks stopped after
    ``STOP_AT`` although only rank 1 was signalled, resumed to ``max_steps``, and agree on the
    final metrics."""
    import torch.multiprocessing as mp

    mp.start_processes(
        worker, args=(cfg.to_dict(), [_free_port(), _free_port()], str(result_dir)), nprocs=WORLD,
        join=True, start_method="spawn",
    )
    ranks = [torch.load(Path(result_dir) / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["stopped"] for r in ranks] == [{"stopped_at": STOP_AT}] * WORLD
    assert [r["step"] for r in ranks] == [cfg.max_steps] * WORLD
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and "after" in ranks[0]["metrics"]
    return ranks


def _worker(rank: int, cfg: dict, ports: list[int], result_dir: str) -> None:
    """One rank: train until rank 1 alone gets SIGTERM, then a new Trainer resumes to the end."""
    stopped, second, metrics = run_rank_interrupted(_trainer, cfg, rank, ports)
    torch.save(
        {"stopped": stopped, "metrics": metrics, "step": second.step, "trainable": second.trainable_state()},
        Path(result_dir) / f"rank{rank}.pt",
    )


def test_two_gloo_ranks_stay_in_sync_and_match_one_process(tmp_path, tiny_dirs, monkeypatch):
    # cpt with LoRA and a trained encoder layer: encoder, projector and decoder gradients all sync,
    # and the encoder's dropout runs (seeded per micro-batch, so rank placement does not matter).
    common = dict(stage="cpt", lora_rank=2, max_steps=STEPS, batch_size=2, save_every=100)
    dist_cfg = make_cfg(tmp_path / "ddp", tiny_dirs, grad_accum=1, **common)
    # Both ranks stopped after the same step although only rank 1 was signalled, then resumed.
    ranks = spawn_interrupted_ranks(_worker, dist_cfg, tmp_path)

    # In sync: identical trainable weights on both ranks.
    a, b = ranks[0]["trainable"], ranks[1]["trainable"]
    for part in ("projector", "encoder", "decoder"):
        assert a[part] and a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs between ranks"

    # Only rank 0 wrote: one log line per step, one resume state, one export.
    out = tmp_path / "ddp"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log if "step" in m and "loss" in m] == list(range(1, STEPS + 1))
    saved = torch.load(out / STATE_FILE, weights_only=False)
    assert saved["step"] == STEPS and saved["world_size"] == WORLD
    assert (out / CHECKPOINT_DIR / "refrag_config.json").is_file()

    # The same global batch in one process (grad_accum = 2 over the two ranks' micro-batches).
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    single = _trainer(make_cfg(tmp_path / "single", tiny_dirs, grad_accum=WORLD, **common))
    init = single.trainable_state()
    single.train()
    want = single.trainable_state()
    for part in ("projector", "encoder", "decoder"):
        for name, value in want[part].items():
            torch.testing.assert_close(a[part][name], value, rtol=1e-4, atol=1e-5)
            # Training moved every tensor, so the match is not the trivial one of untouched weights.
            assert not torch.equal(value, init[part][name]), f"{part}.{name} did not train"

    single_log = [json.loads(line) for line in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines()]
    for d, s in zip(log, single_log):  # rank 0 logs the mean over ranks = the single run's accumulated mean
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-4)
