"""FSDP training (``fsdp=true``): two CPU processes (gloo), launched the way torchrun launches them,
shard the LoRA-trained decoder layer by layer, keep the input embedding whole, and end with the
losses, weights, evaluation and export of a single process that accumulates the same global batch
(``grad_accum = 4``; each rank accumulates 2 micro-batches and FSDP reduce-scatters once per step). The resume state is a whole (gathered) state: the FSDP ranks resume from it,
and so does a single process. Bad settings are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from refrag_integrations.training.config import TrainConfig
from refrag_integrations.training.trainer import CHECKPOINT_DIR, STATE_FILE, Trainer

from test_distributed import STOP_AT, WORLD, _trainer, run_rank_interrupted, spawn_interrupted_ranks  # noqa: E402  (tests/ is on sys.path, see conftest.py)
from test_training import make_cfg  # noqa: E402

STEPS = 4
ACCUM = 2  # micro-batches per rank and step: FSDP syncs the decoder's gradients on the last only


def _worker(rank: int, cfg: dict, ports: list[int], result_dir: str) -> None:
    """One rank: train until rank 1 alone gets SIGTERM (rank 0 keeps a copy of that resume state),
    then a new Trainer resumes to the end."""
    from torch.distributed.tensor import DTensor

    import torch.distributed as dist

    from refrag_integrations.training.distributed import decoder_layers

    result = Path(result_dir)
    reduce_scatters, layers = [], []  # FSDP's gradient reduce-scatters in the first run (STOP_AT steps)
    reduce_scatter = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        reduce_scatters.append(1)
        return reduce_scatter(*args, **kwargs)

    def check(first: Trainer) -> None:
        assert first.fsdp
        dist.reduce_scatter_single = counting
        dec = first.engine.decoder
        layers.extend(decoder_layers(dec))
        lora = {n: p for n, p in dec.named_parameters() if ".lora_" in n}
        # Sharded for real: the LoRA (and frozen layer) weights are DTensor shards, the embedding is whole.
        assert lora and all(isinstance(p, DTensor) for p in lora.values())
        assert all(isinstance(p, DTensor) for n, p in dec.named_parameters() if ".layers." in n)
        assert not isinstance(dec.get_input_embeddings().weight, DTensor)
        assert all(p.to_local().shape[0] < p.shape[0] for p in lora.values())

    def keep_snapshot() -> None:
        dist.reduce_scatter_single = reduce_scatter
        # one reduce-scatter per sharded layer and step, not per micro-batch (no_sync while accumulating)
        assert len(reduce_scatters) == STOP_AT * len(layers)
        if rank == 0:
            (result / "snapshot").mkdir()
            shutil.copy(Path(cfg["output_dir"]) / STATE_FILE, result / "snapshot" / STATE_FILE)

    stopped, second, metrics = run_rank_interrupted(_trainer, cfg, rank, ports, on_first=check, on_stopped=keep_snapshot)
    enc = second.engine.chunk_encoder
    local = {  # this rank's decoder shards and replicated weights (local parts: no collective needed)
        "decoder": {n: p.detach().to_local().clone() for n, p in second.engine.decoder.named_parameters() if p.requires_grad},
        "encoder": {n: p.detach().clone() for n, p in enc.encoder.named_parameters() if p.requires_grad},
        "projector": {n: p.detach().clone() for n, p in enc.projector.state_dict().items()},
    }
    torch.save({"stopped": stopped, "metrics": metrics, "step": second.step, "local": local}, result / f"rank{rank}.pt")


def _assert_tree_close(got, want, path="metrics"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            _assert_tree_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3, abs=1e-4, nan_ok=True), path
    else:
        assert got == want, path


def _assert_state_close(got: dict, want: dict, init: dict | None = None) -> None:
    for part in ("projector", "encoder", "decoder"):
        assert want[part] and got[part].keys() == want[part].keys(), part
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name].cpu(), value.cpu(), rtol=1e-4, atol=1e-5, msg=f"{part}.{name}")
            if init is not None:  # training moved every tensor: the match is not that of untouched weights
                assert not torch.equal(value, init[part][name]), f"{part}.{name} did not train"


def test_fsdp_two_gloo_ranks_match_one_process_and_resume(tmp_path, tiny_dirs, monkeypatch):
    from refrag_integrations.checkpoint import load_checkpoint

    # cpt with LoRA (sharded) and a trained encoder layer + projector (replicated, all-reduced);
    # max_grad_norm is low enough that clipping (shard norms + replicated norms) acts.
    common = dict(stage="cpt", lora_rank=2, max_steps=STEPS, batch_size=2, save_every=100, max_grad_norm=0.5)
    out = tmp_path / "fsdp"
    cfg = make_cfg(out, tiny_dirs, grad_accum=ACCUM, fsdp=True, **common)
    # Both ranks stopped after the same step although only rank 1 was signalled, then resumed.
    ranks = spawn_interrupted_ranks(_worker, cfg, tmp_path)

    # Replicated weights in sync; the decoder's shards are disjoint slices of the whole tensors.
    a, b = ranks[0]["local"], ranks[1]["local"]
    for part in ("projector", "encoder"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs between ranks"
    shards = {n: torch.cat([a["decoder"][n], b["decoder"][n]], 0) for n in a["decoder"]}

    # Rank 0 alone wrote: one log line per step, a whole resume state, the export.
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == list(range(1, STEPS + 1))
    saved = torch.load(out / STATE_FILE, weights_only=False)
    assert saved["step"] == STEPS and saved["world_size"] == WORLD
    for name, value in saved["trainable"]["decoder"].items():
        assert type(value) is torch.Tensor and value.shape == shards[name].shape  # whole, not a shard
        torch.testing.assert_close(value, shards[name], rtol=0, atol=0)
    for entry in saved["optimizer"]["state"].values():
        assert all(type(v) is torch.Tensor for v in entry.values())

    # The same global batch in one process (grad_accum = 4 over the two ranks' 2 micro-batches each).
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    single = _trainer(make_cfg(tmp_path / "single", tiny_dirs, grad_accum=WORLD * ACCUM, **common))
    init = single.trainable_state()
    single_metrics = single.train()
    want = single.trainable_state()
    _assert_state_close(saved["trainable"], want, init)
    _assert_state_close({"projector": a["projector"], "encoder": a["encoder"], "decoder": shards}, want)
    single_log = [json.loads(line) for line in (tmp_path / "single" / "train_log.jsonl").read_text().splitlines()]
    assert len(single_log) == len(log)
    for d, s in zip(log, single_log):  # rank 0 logs the mean over ranks = the single run's accumulated mean
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-4)
    _assert_tree_close(ranks[0]["metrics"]["after"], single_metrics["after"])  # evaluated on the sharded decoder
    _assert_tree_close(ranks[0]["metrics"]["before"], single_metrics["before"])

    # The export matches the single process's (projector, encoder layer, LoRA adapters).
    got, ref = load_checkpoint(out / CHECKPOINT_DIR), load_checkpoint(tmp_path / "single" / CHECKPOINT_DIR)
    assert got.trained_stages == ref.trained_stages == ["cpt"]
    assert len(got.decoder_lora) == len(ref.decoder_lora) == 1 and not got.decoder_delta
    for mine, theirs in ((got.projector, ref.projector), (got.encoder_delta, ref.encoder_delta),
                         (got.decoder_lora[0], ref.decoder_lora[0])):
        assert mine and mine.keys() == theirs.keys()
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)

    # A single process resumes the FSDP run's step-2 state (weights and AdamW moments, gathered) and
    # ends where the uninterrupted single run ended.
    resumed_dir = tmp_path / "single_resumed"
    shutil.copytree(tmp_path / "snapshot", resumed_dir)
    assert torch.load(resumed_dir / STATE_FILE, weights_only=False)["step"] == STOP_AT
    resumed = _trainer(make_cfg(resumed_dir, tiny_dirs, grad_accum=WORLD * ACCUM, **common))
    resumed.train()
    assert resumed.step == STEPS
    assert len((resumed_dir / "train_log.jsonl").read_text().splitlines()) == STEPS - STOP_AT
    _assert_state_close(resumed.trainable_state(), want)


def test_fsdp_refuses_a_single_process_and_the_policy_stage(tmp_path, tiny_dirs, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="distributed launch"):
        Trainer(make_cfg(tmp_path, tiny_dirs, fsdp=True))
    with pytest.raises(ValueError, match="policy stage"):
        TrainConfig(stage="policy", fsdp=True)
    with pytest.raises(ValueError, match="fsdp"):
        TrainConfig(fsdp="yes")
    assert TrainConfig.from_dict({"stage": "cpt", "fsdp": True}).fsdp


def test_fsdp_bfloat16_decoder_with_float32_adapters_matches_one_process(tmp_path, tiny_dirs, monkeypatch):
    # decoder_dtype=bfloat16: each sharded layer holds bfloat16 frozen weights next to float32 LoRA
    # adapters; the run (interrupted and resumed) ends where a single process with the same bfloat16
    # decoder ends, up to reduction order, and the adapters stay float32 throughout.
    common = dict(stage="cpt", lora_rank=2, max_steps=STEPS, batch_size=2, save_every=100, decoder_dtype="bfloat16")
    out = tmp_path / "fsdp"
    cfg = make_cfg(out, tiny_dirs, grad_accum=ACCUM, fsdp=True, **common)
    ranks = spawn_interrupted_ranks(_worker, cfg, tmp_path)
    assert all(v.dtype == torch.float32 for v in ranks[0]["local"]["decoder"].values())  # the adapters' shards
    saved = torch.load(out / STATE_FILE, weights_only=False)

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    single = _trainer(make_cfg(tmp_path / "single", tiny_dirs, grad_accum=WORLD * ACCUM, **common))
    assert {p.dtype for p in single.engine.decoder.parameters() if not p.requires_grad} == {torch.bfloat16}
    init = single.trainable_state()
    single.train()
    want = single.trainable_state()
    for part in ("projector", "encoder", "decoder"):
        assert want[part] and saved["trainable"][part].keys() == want[part].keys(), part
        for name, value in want[part].items():
            got = saved["trainable"][part][name]
            assert got.dtype == torch.float32, f"{part}.{name}"
            assert not torch.equal(value, init[part][name]), f"{part}.{name} did not train"
            torch.testing.assert_close(got, value, rtol=2e-3, atol=2e-4, msg=f"{part}.{name}")
