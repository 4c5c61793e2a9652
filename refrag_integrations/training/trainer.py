"""The training loop shared by all stages: AdamW, warm-up + cosine, bf16 autocast, gradient
accumulation, progress bar, checkpoints every N steps and on SIGINT/SIGTERM, exact resume, and
data-parallel scale-out.

Data for step t is drawn from an RNG seeded by (seed, t, micro-batch index), and each micro-batch
runs under its own seeded torch RNG (dropout), so resuming at step t replays exactly the batches an
uninterrupted run would have seen; optimizer, scheduler and RNG states are saved.

Scale-out (DDP). The same :class:`Trainer` runs under ``torchrun --nproc_per_node N`` or
``accelerate launch``: it reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
``MASTER_PORT``), joins the process group (nccl on CUDA, gloo on CPU) and puts each rank on
``cuda:LOCAL_RANK``. One optimizer step consumes ``world_size * grad_accum`` micro-batches; rank r
draws micro-batches ``r * grad_accum ... r * grad_accum + grad_accum - 1`` of the step, so an
N-rank run sees exactly the data (and dropout masks) of a single process with ``N * grad_accum``
accumulation steps, and a single-process run is unchanged. Gradients of the trainable parameters
are averaged with an all-reduce after the backward passes (the chunk encoder and the decoder are
called through the engine's helpers, so there is no single module to wrap in
``DistributedDataParallel``); clipping and the AdamW step then run identically on every rank, and
the initial trainable weights are broadcast from rank 0. Only rank 0 writes the resume state, the
checkpoint, the logs and the progress bar, and runs the evaluations; every rank resumes from the
same ``trainer_state.pt`` (``output_dir`` must be on a filesystem all ranks see). A SIGINT/SIGTERM
on any rank stops all ranks after the same step and saves. Mind torchrun's deadline: it forwards a
SIGTERM to every worker and kills them 30 s later, so a step longer than that loses the work since
the last ``save_every`` save; signalling one worker process directly has no deadline.

    torchrun --nproc_per_node 4 --no-python refrag train cpt --init-checkpoint runs/rec/checkpoint
    accelerate launch --num_processes 4 --no_python refrag train cpt --init-checkpoint runs/rec/checkpoint

FSDP (``--set fsdp=true``). DDP replicates the decoder on every GPU. The stages as configured
train only the chunk encoder, the projector and LoRA adapters, so the replicated decoder is frozen:
no gradients or optimizer state, only its weights (4 bytes per parameter in fp32; 2 with
``--set decoder_dtype=bfloat16``, which keeps the LoRA adapters, encoder and projector in fp32), so
a 7B decoder (28 GB, or 14 GB in bf16) still fits one 80 GB GPU with room for activations, and DDP
(the default) spares FSDP's per-layer all-gathers there. Use FSDP when the decoder does not
fit once per GPU next to the activations (larger decoders, long contexts): each rank then holds
1/N of the decoder. After ``add_lora`` the trainer calls ``torch.distributed.fsdp.fully_shard`` on
each decoder layer and then on the decoder, leaving out the input embedding (``ignored_params``:
the engine embeds tokens and chunk vectors outside the decoder's forward, so that weight stays a
whole, replicated tensor, and so does a tied LM head); the chunk encoder and the projector stay
replicated. FSDP reduce-scatters (averages) the decoder's gradients itself, once per optimizer
step: during gradient accumulation the earlier micro-batches run with
``set_requires_gradient_sync(False)`` (FSDP's ``no_sync``: each rank keeps its unsharded gradients
of the trainable decoder parameters, small with LoRA, until the last micro-batch); the trainer all-reduces only the replicated ones (encoder, projector) and clips with the norm of
the decoder's gradient shards (summed over the ranks) and of the replicated gradients combined
(``torch.nn.utils.clip_grad_norm_`` cannot mix DTensors and plain tensors). Data, seeds and
results are those of DDP: an N-rank FSDP run matches a single process with ``N * grad_accum``
accumulation to float rounding. ``trainer_state.pt`` and the export hold whole tensors (the shards
and the AdamW moments are gathered onto the CPU by every rank, rank 0 writes), in the layout a
single process writes, so a run may resume with or without FSDP and on another number of ranks
(with ``world_size * grad_accum`` kept). Every rank runs the evaluations (each forward of a sharded
decoder is a collective) and rank 0 writes their results. ``fsdp`` needs a distributed launch and
a :class:`Trainer` stage (reconstruct, cpt, mixed, sft; the policy stage trains only its small network and runs
data-parallel without fsdp).

    torchrun --nproc_per_node 4 --no-python refrag train cpt --init-checkpoint runs/rec/checkpoint --set fsdp=true
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"

# Micro-batch seeds: (seed * SEED_STEP_STRIDE + step) * MICRO_SEED_STRIDE + index for the first
# MICRO_SEED_STRIDE micro-batches of a step (the historical formula, so runs resume with the same
# data); larger indices (many ranks x accumulation) use a string seed that cannot collide.
SEED_STEP_STRIDE = 1_000_003
MICRO_SEED_STRIDE = 64
# Rank 0 alone evaluates and writes while the other ranks wait at a barrier: allow it an hour.
DIST_TIMEOUT_S = 3600
# Gradients are all-reduced in flat buckets of at most this many elements (bounds the extra memory).
GRAD_BUCKET_ELEMENTS = 1 << 25


def lr_lambda(step: int, total: int, warmup_frac: float) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _encoder_layers(encoder: torch.nn.Module) -> torch.nn.ModuleList | None:
    for path in ("encoder.layer", "layers", "transformer.layer", "encoder.layers"):
        mod: Any = encoder
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.ModuleList):
            return mod
    return None


def _decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's transformer blocks (the units FSDP shards and gathers one at a time)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        mod: Any = decoder
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, torch.nn.ModuleList) and len(mod):
            return list(mod)
    # Hugging Face models name their blocks in _no_split_modules; reversed pre-order = children first.
    names = set(getattr(decoder, "_no_split_modules", None) or ())
    return [m for m in reversed(list(decoder.modules())) if type(m).__name__ in names]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support: no FSDP shards either
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP shard (DTensor) gathered from every rank (a collective), or ``t``."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) as a DTensor sharded like ``param``
    (no communication: each rank keeps its own slice)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def micro_batch_seed(seed: int, step: int, index: int) -> int | str:
    """Seed of the data RNG for micro-batch ``index`` (0-based, across all ranks) of ``step``.

    Example:
        >>> micro_batch_seed(0, 3, 1)
        193
    """
    if index < MICRO_SEED_STRIDE:
        return (seed * SEED_STEP_STRIDE + step) * MICRO_SEED_STRIDE + index
    return f"{seed}/{step}/{index}"


# ---------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run; ``world_size == 1`` is a plain single process.

    Attributes:
        world_size: number of ranks.
        rank: this process's rank (0 writes files and logs).
        local_rank: rank on this machine (selects ``cuda:local_rank``).
        owns_group: True if :func:`init_distributed` created the process group (and so destroys it).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}.") from None


def init_distributed(device_type: str) -> DistContext:
    """Join the process group described by ``torchrun`` / ``accelerate launch``.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (``MASTER_ADDR`` / ``MASTER_PORT`` are read by
    torch's ``env://`` rendezvous). Without ``WORLD_SIZE`` (or with 1) this is a single process. An
    already initialised process group is used as it is.

    Args:
        device_type: ``"cuda"`` (nccl backend, and this rank is pinned to ``cuda:LOCAL_RANK``) or
            ``"cpu"`` (gloo backend).

    Example:
        >>> init_distributed("cpu").world_size  # a plain `python` run
        1
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        return DistContext(world, rank, _env_int("LOCAL_RANK", rank), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}.")
    if world == 1:
        return DistContext()
    rank = _env_int("RANK", -1)
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in 0..{world - 1} when WORLD_SIZE={world}, got {os.environ.get('RANK')!r}.")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support.")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if device_type == "cuda" else "gloo", init_method="env://",
        world_size=world, rank=rank, timeout=timedelta(seconds=DIST_TIMEOUT_S),
    )
    return DistContext(world, rank, local_rank, owns_group=True)


class Trainer:
    """Runs one stage of the REFRAG recipe.

    Under ``torchrun`` / ``accelerate launch`` it trains data-parallel (see the module docstring).

    Args:
        cfg: the stage's :class:`TrainConfig`.
        engine: an already built engine (tests); default: built from ``cfg`` (on
            ``cuda:LOCAL_RANK`` in a multi-GPU run).

    Example:
        >>> cfg = TrainConfig(stage="reconstruct", output_dir="runs/rec", max_steps=2000)  # doctest: +SKIP
        >>> metrics = Trainer(cfg).train()   # Ctrl-C saves; rerunning resumes  # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, engine=None) -> None:
        from ..engine import RefragEngine

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if engine is not None:
            device_type = engine.device.type
        else:
            device_type = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
        self.dist = init_distributed(device_type)
        self.fsdp = bool(cfg.fsdp)
        if self.fsdp and not self.dist.enabled:
            raise ValueError(
                "fsdp=true shards the decoder over the ranks of a distributed launch, but this is a single process; "
                "launch with `torchrun --nproc_per_node N` or `accelerate launch --num_processes N` (N >= 2), "
                "or drop fsdp."
            )
        self.out = Path(cfg.output_dir)
        self.prev_stages: list[str] = []
        self.prev = None  # the init checkpoint's contents, carried into this stage's export
        if cfg.init_checkpoint:
            self.prev = load_checkpoint(cfg.init_checkpoint)
            self.prev_stages = self.prev.trained_stages
        if engine is None:
            device = cfg.device
            if self.dist.enabled and device_type == "cuda" and (device is None or torch.device(device).index is None):
                device = f"cuda:{self.dist.local_rank}"
            kwargs: dict[str, Any] = {"device": device, "decoder_dtype": cfg.decoder_dtype}
            if cfg.init_checkpoint:
                engine = RefragEngine.from_pretrained(
                    cfg.init_checkpoint, decoder=cfg.decoder, encoder=cfg.encoder, chunk_context=cfg.chunk_context, **kwargs
                )
            else:
                torch.manual_seed(cfg.seed)
                engine = RefragEngine.from_pretrained(
                    "none", decoder=cfg.decoder, encoder=cfg.encoder, chunk_size=cfg.chunk_size,
                    chunk_context=cfg.chunk_context, **kwargs
                )
        self.engine = engine
        if engine.config.chunk_size != cfg.chunk_size:
            raise ValueError(f"the engine has k={engine.config.chunk_size} but the config says k={cfg.chunk_size}.")
        self.engine.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self._set_trainable()
        if self.fsdp:
            # Every rank starts from rank 0's trainable weights, broadcast while they are whole.
            self._broadcast_params([p for p in self._modules_params() if p.requires_grad])
            self._shard_decoder()
        self.params = [p for p in self._modules_params() if p.requires_grad]
        if not self.params:
            raise ValueError("Nothing to train: the configuration freezes every parameter.")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.max_steps, cfg.warmup_frac)
        )
        self.step = 0
        self._stop = False
        self._data = None
        self._heldout = None
        if not self.fsdp:
            self._broadcast_params()

    # ------------------------------------------------------------------ parameters

    def _modules_params(self):
        yield from self.engine.chunk_encoder.parameters()
        yield from self.engine.decoder.parameters()

    def _set_trainable(self) -> None:
        enc = self.engine.chunk_encoder
        dec = self.engine.decoder
        for p in dec.parameters():
            p.requires_grad_(False)
        for p in enc.encoder.parameters():
            p.requires_grad_(False)
        for p in enc.projector.parameters():
            p.requires_grad_(True)
        if self.cfg.lora_rank > 0:
            from .lora import add_lora

            add_lora(dec, self.cfg.lora_rank)
        n = self.cfg.encoder_trainable_layers
        if n < 0:
            for p in enc.encoder.parameters():
                p.requires_grad_(True)
        elif n > 0:
            layers = _encoder_layers(enc.encoder)
            if layers is None:
                raise ValueError("Cannot find the encoder's layer list to train its top layers; use -1 or 0.")
            for layer in list(layers)[-n:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        enc.train()
        dec.eval()  # frozen or LoRA: dropout stays off in the decoder

    def _shard_decoder(self) -> None:
        """FSDP: shard each decoder layer, then the rest of the decoder (final norm, an untied LM
        head) over the ranks. The input embedding stays a whole, replicated tensor: the engine
        calls it outside the decoder's forward (token embeddings around the chunk vectors)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dec = self.engine.decoder
        layers = _decoder_layers(dec)
        if not layers:
            raise ValueError(
                f"fsdp=true cannot find the layers of the decoder ({type(dec).__name__}) to shard; drop fsdp."
            )
        mesh = init_device_mesh(self.engine.device.type, (self.dist.world_size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(dec, mesh=mesh, ignored_params={dec.get_input_embeddings().weight})

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What training changes: projector, trained encoder params, trained decoder params.

        With ``fsdp`` the decoder's shards are gathered into whole tensors on the CPU (a collective:
        call it on every rank).
        """
        enc = self.engine.chunk_encoder
        parts = {
            "projector": list(enc.projector.state_dict().items()),
            "encoder": [(n, p) for n, p in enc.encoder.named_parameters() if p.requires_grad],
            "decoder": [(n, p) for n, p in self.engine.decoder.named_parameters() if p.requires_grad],
        }
        if not self.fsdp:
            return {part: {n: v.detach().clone() for n, v in items} for part, items in parts.items()}
        # The decoder's shards gathered one tensor at a time; every tensor copied onto the CPU.
        return {part: {n: _full(v.detach()).to("cpu", copy=True) for n, v in items} for part, items in parts.items()}

    def _load_trainable(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        enc = self.engine.chunk_encoder
        enc.projector.load_state_dict(state["projector"])
        enc.encoder.load_state_dict(state["encoder"], strict=False)
        if not self.fsdp:
            self.engine.decoder.load_state_dict(state["decoder"], strict=False)
            return
        params = dict(self.engine.decoder.named_parameters())
        with torch.no_grad():
            for name, value in state["decoder"].items():
                p = params.get(name)
                if p is None:
                    raise ValueError(f"the saved decoder tensor {name!r} has no parameter in this decoder.")
                if _is_dtensor(p):
                    p.to_local().copy_(_shard_like(value.to(p.dtype), p).to_local())
                else:
                    p.copy_(value)

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict; with ``fsdp`` its sharded moments are gathered whole onto the
        CPU (a collective), so the file has the same layout as a single process's."""
        sd = self.optimizer.state_dict()
        if not self.fsdp:
            return sd
        state = {}
        for index in sorted(sd["state"]):  # the same order on every rank
            state[index] = {k: (_full(v).cpu() if _is_dtensor(v) else v) for k, v in sd["state"][index].items()}
        return {**sd, "state": state}

    def _load_optimizer_state(self, sd: dict[str, Any]) -> None:
        """Load a saved optimizer state (written by any number of ranks, with or without ``fsdp``)."""
        if self.fsdp:
            flat = [p for group in self.optimizer.param_groups for p in group["params"]]
            state = {}
            for index, entry in sd["state"].items():
                p = flat[int(index)] if int(index) < len(flat) else None
                if p is not None and _is_dtensor(p):
                    whole = tuple(p.shape)  # the moments have the parameter's shape; "step" is a scalar
                    entry = {
                        k: (_shard_like(v, p) if torch.is_tensor(v) and k != "step" and tuple(v.shape) == whole else v)
                        for k, v in entry.items()
                    }
                state[index] = entry
            sd = {**sd, "state": state}
        self.optimizer.load_state_dict(sd)

    # ------------------------------------------------------------------ data + loss

    def data(self):
        if self._data is None:
            from .data import TokenCorpus, pretraining_documents

            t0 = time.perf_counter()
            self._data = TokenCorpus(pretraining_documents(self.cfg), self.engine.tokenizer)
            logger.info("tokenized %d training tokens in %.1fs", self._data.tokens, time.perf_counter() - t0)
        return self._data

    def heldout(self):
        if self._heldout is None:
            from .data import TokenCorpus, heldout_documents

            self._heldout = TokenCorpus(heldout_documents(self.cfg), self.engine.tokenizer)
        return self._heldout

    def micro_rng(self, step: int, micro: int) -> random.Random:
        """The data RNG of micro-batch ``micro`` (global index) of optimizer step ``step``."""
        return random.Random(micro_batch_seed(self.cfg.seed, step, micro))

    def loss_for_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of micro-batch ``micro`` of optimizer step ``step`` (data seeded by both).

        ``micro`` is the micro-batch's index in the step's global batch (``rank * grad_accum +``
        the local index), so every rank draws different data and a single process draws the same.
        """
        from .curriculum import sample_chunk_count
        from .objectives import continuation_loss, random_expansion, reconstruction_loss

        cfg = self.cfg
        rng = self.micro_rng(step, micro)
        L = sample_chunk_count(rng, step, cfg.max_steps, cfg.curriculum_stages, cfg.max_chunks, cfg.curriculum_start)
        k = cfg.chunk_size
        dev = self.engine.device
        if cfg.stage == "reconstruct":
            w = torch.tensor(self.data().windows(rng, L * k, cfg.batch_size), device=dev)
            loss, m = reconstruction_loss(self.engine, w)
        elif cfg.stage in ("cpt", "mixed"):
            o = cfg.continuation_tokens
            w = torch.tensor(self.data().windows(rng, L * k + o, cfg.batch_size), device=dev)
            p = cfg.expand_fraction if cfg.stage == "mixed" else 0.0
            expand = random_expansion(rng, cfg.batch_size, L, p)
            loss, m = continuation_loss(self.engine, w[:, : L * k], w[:, L * k :], expand)
        else:
            raise ValueError(f"stage {cfg.stage!r} is trained by its own command, not by Trainer.")
        m["chunks"] = L
        return loss, m

    # ------------------------------------------------------------------ distributed

    def _barrier(self) -> None:
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _broadcast_params(self, params: list[torch.Tensor] | None = None) -> None:
        """Start every rank from rank 0's trainable weights (fresh projector / LoRA init)."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in self.params if params is None else params:
                dist.broadcast(p.data, src=0)

    def _broadcast_object(self, obj: Any) -> Any:
        if not self.dist.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _count_ranks(self, flag: bool) -> int:
        """On every rank: the number of ranks where ``flag`` is True."""
        if not self.dist.enabled:
            return int(flag)
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self._comm_device())
        dist.all_reduce(t)
        return int(round(t.item()))

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return self._count_ranks(flag) > 0

    def _comm_device(self) -> torch.device:
        return self.engine.device

    def _all_reduce_grads(self) -> None:
        """Average the trainable parameters' gradients over the ranks (flat buckets).

        A parameter without a gradient on some ranks counts as zero there; one without a gradient
        on every rank keeps ``grad=None`` (the optimizer then skips it, as in a single process).
        With ``fsdp`` only the replicated parameters (encoder, projector) are all-reduced: FSDP
        has already reduce-scattered (averaged) the gradients of the decoder's shards.
        """
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        world = self.dist.world_size
        params = [p for p in self.params if not _is_dtensor(p)] if self.fsdp else self.params
        if not params:
            return
        has = torch.tensor([float(p.grad is not None) for p in params], device=self._comm_device())
        dist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist()) if h > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in live:
            if not buckets or size + p.numel() > GRAD_BUCKET_ELEMENTS or buckets[-1][0].grad.dtype != p.grad.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
        for bucket in buckets:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # (n,)
            dist.all_reduce(flat)
            flat.div_(world)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over the trainable parameters; with ``fsdp`` the norm combines the
        decoder's gradient shards (summed over the ranks) and the replicated gradients (the same on
        every rank), which ``torch.nn.utils.clip_grad_norm_`` cannot mix."""
        if not self.fsdp:
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        import torch.distributed as dist

        with torch.no_grad():
            grads = [p.grad for p in self.params if p.grad is not None]
            sharded = [g.to_local() for g in grads if _is_dtensor(g)]  # this rank's slices (views)
            plain = [g for g in grads if not _is_dtensor(g)]
            dev = self._comm_device()
            sq_shards = torch.zeros((), dtype=torch.float32, device=dev)
            for g in sharded:
                sq_shards += g.float().pow(2).sum().to(dev)
            dist.all_reduce(sq_shards)  # the slices are disjoint: their squares add up over the ranks
            sq_plain = torch.zeros((), dtype=torch.float32, device=dev)
            for g in plain:
                sq_plain += g.float().pow(2).sum().to(dev)
            total = (sq_shards + sq_plain).sqrt()
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in sharded + plain:
                g.mul_(coef.to(g.device, g.dtype))
        return total

    def _reduce_metrics(self, metrics: dict[str, float]) -> tuple[dict[str, float], bool]:
        """Average the step's metrics over the ranks and agree on stopping (any rank signalled).

        Every rank must report the same metric names.
        """
        if not self.dist.enabled:
            return metrics, self._stop
        import torch.distributed as dist

        keys = sorted(metrics)
        vals = [float(metrics[k]) for k in keys] + [float(self._stop)]
        t = torch.tensor(vals, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        out = {k: float(v) / self.dist.world_size for k, v in zip(keys, t[:-1].tolist())}
        return out, bool(t[-1].item() > 0)

    def close(self) -> None:
        """Leave the process group if this trainer created it (end of a torchrun job). A multi-rank
        trainer cannot train again afterwards; build a new one (as a new process would)."""
        if self.dist.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.dist = DistContext(self.dist.world_size, self.dist.rank, self.dist.local_rank, owns_group=False)

    # ------------------------------------------------------------------ state

    def save_state(self) -> None:
        """Write the resume state atomically (trainable weights, optimizer, scheduler, RNG).

        Call it on every rank: rank 0 writes, the others wait for it (the ranks hold the same
        weights and optimizer state; with ``fsdp`` every rank first takes part in gathering the
        decoder's shards, so the file is a whole state that any number of ranks can resume).
        """
        if self.fsdp:
            trainable, optim = self.trainable_state(), self._optimizer_state()
        if self.dist.is_main:
            if not self.fsdp:
                trainable, optim = self.trainable_state(), self.optimizer.state_dict()
            self.out.mkdir(parents=True, exist_ok=True)
            state = {
                "step": self.step,
                "config": self.cfg.to_dict(),
                "trainable": trainable,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "world_size": self.dist.world_size,
            }
            tmp = self.out / (STATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, self.out / STATE_FILE)
        self._barrier()

    def try_resume(self) -> bool:
        """Continue from ``output_dir``'s resume state if there is one. Returns True if resumed."""
        path = self.out / STATE_FILE
        found = path.is_file()
        if self.dist.enabled:
            seen = self._count_ranks(found)
            if 0 < seen < self.dist.world_size:
                raise ValueError(
                    f"{path} is visible on {seen} of {self.dist.world_size} ranks; put output_dir on a "
                    "filesystem that every rank shares."
                )
        if not found:
            return False
        state = torch.load(path, weights_only=False, map_location="cpu")
        saved = dict(state["config"])
        for key in ("stage", "chunk_size", "max_steps", "batch_size", "seed", "max_chunks"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"{path} was written with {key}={saved.get(key)!r} but this run has {key}={getattr(self.cfg, key)!r}; "
                    "use the same settings to resume, or another --output-dir to start afresh."
                )
        # The data of a step depends only on its global micro-batch count, so a run may resume on
        # another number of ranks as long as world_size * grad_accum stays the same.
        saved_world = int(state.get("world_size", 1))
        saved_global = int(saved.get("grad_accum", 1)) * saved_world
        global_micro = self.cfg.grad_accum * self.dist.world_size
        if saved_global != global_micro:
            raise ValueError(
                f"{path} was written by {saved_world} rank(s) x grad_accum={saved.get('grad_accum')!r} "
                f"= {saved_global} micro-batches per step, but this run has {self.dist.world_size} rank(s) x "
                f"grad_accum={self.cfg.grad_accum} = {global_micro}; keep world_size * grad_accum the same to resume."
            )
        self._load_trainable(state["trainable"])
        self._load_optimizer_state(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        logger.info("resumed %s at step %d", path, self.step)
        return True

    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> Path:
        """Export the trained weights as a REFRAG checkpoint directory (``output_dir/checkpoint``):
        everything the init checkpoint changed plus what this stage changed. Only rank 0 writes;
        without ``fsdp`` there are no collectives, so rank 0 may call it alone, and with ``fsdp``
        every rank must call it (the decoder's shards are gathered). Returns the directory."""
        from .lora import LoRALinear, lora_state

        if not self.dist.is_main and not self.fsdp:
            return self.out / CHECKPOINT_DIR
        st = self.trainable_state()
        if not self.dist.is_main:
            return self.out / CHECKPOINT_DIR
        eng = self.engine
        enc_delta = dict(self.prev.encoder_delta) if self.prev else {}
        enc_delta.update(st["encoder"])
        dec_delta = dict(self.prev.decoder_delta) if self.prev else {}
        dec_delta.update({n: v for n, v in st["decoder"].items() if ".lora_" not in n})
        adapters = list(self.prev.decoder_lora) if self.prev else []
        if self.cfg.lora_rank > 0 and self.fsdp:  # lora_state's layout, from the gathered tensors
            dec = st["decoder"]
            adapters.append({
                key: value
                for name, mod in eng.decoder.named_modules() if isinstance(mod, LoRALinear)
                for key, value in ((f"{name}.lora_A", dec[f"{name}.lora_A"].float()),
                                   (f"{name}.lora_B", dec[f"{name}.lora_B"].float()),
                                   (f"{name}.lora_scale", torch.tensor(mod.scale)))
            })
        elif self.cfg.lora_rank > 0:
            adapters.append(lora_state(eng.decoder))
        return save_checkpoint(
            self.out / CHECKPOINT_DIR, eng.config, st["projector"],
            encoder_delta=enc_delta or None, decoder_delta=dec_delta or None, decoder_lora=adapters or None,
            policy=self.prev.policy if self.prev else None,
            policy_config=self.prev.policy_config if self.prev else None,
            trained_stages=self.prev_stages + [self.cfg.stage], metrics=metrics,
        )

    # ------------------------------------------------------------------ loop

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        logger.warning("signal %d: saving at the end of this step", signum)
        self._stop = True

    @contextlib.contextmanager
    def _micro_torch_rng(self, step: int, micro: int) -> Iterator[None]:
        """Run a micro-batch under a torch RNG seeded by (seed, step, micro): dropout masks do not
        depend on which rank runs the micro-batch, and the global RNG stream is left untouched."""
        device = self.engine.device
        cuda = device.type == "cuda"
        seed = random.Random(micro_batch_seed(self.cfg.seed, step, micro)).getrandbits(63)
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)  # this rank's GPU only
            yield

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's ``grad_accum`` micro-batches (gradients averaged
        over the ranks). Returns this rank's mean loss and metrics."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total, agg = 0.0, {}
        for local in range(cfg.grad_accum):
            micro = self.dist.rank * cfg.grad_accum + local  # index in the step's global batch
            if self.fsdp:  # reduce-scatter the decoder's gradients once, after the last micro-batch
                self.engine.decoder.set_requires_gradient_sync(local == cfg.grad_accum - 1)
            with self._micro_torch_rng(self.step, micro):
                with self.engine.autocast():
                    loss, m = self.loss_for_step(self.step, micro)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}; lower the learning rate.")
                (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            for key, v in m.items():
                agg[key] = agg.get(key, 0.0) + float(v) / cfg.grad_accum
        self._all_reduce_grads()
        self._clip_grad_norm(cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": total, **agg}

    def evaluate(self) -> dict[str, Any]:
        from .objectives import next_paragraph_eval, reconstruction_eval

        cfg = self.cfg
        was = self.engine.chunk_encoder.training
        self.engine.chunk_encoder.eval()
        held = self.heldout()
        sizes = [n for n in (1, 2, 4, 8) if n <= max(8, cfg.max_chunks)]
        bar = self.dist.is_main  # progress bars on rank 0 only (every rank evaluates with fsdp)
        out: dict[str, Any] = {
            "reconstruction": reconstruction_eval(self.engine, held, sizes, cfg.eval_examples, progress=bar)
        }
        if cfg.stage != "reconstruct":
            out["next_paragraph"] = next_paragraph_eval(
                self.engine, held, min(cfg.max_chunks, 8), cfg.continuation_tokens, cfg.eval_examples, progress=bar
            )
        self.engine.chunk_encoder.train(was)
        return out

    def train(self, resume: bool = True) -> dict[str, Any]:
        """Run (or continue) the stage to ``max_steps``; returns the final metrics (on every rank).

        Logs and files are rank 0's, and so are the evaluations, except with ``fsdp`` where every
        rank evaluates (each forward of the sharded decoder is a collective) and rank 0 writes; in
        a multi-rank run the trainer leaves the process group it created when it returns.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        main = self.dist.is_main
        evaluates = main or self.fsdp  # ranks that run the evaluations
        if resume:
            self.try_resume()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        need_before = cfg.eval_before and main and self.step == 0 and not (self.out / "metrics_before.json").exists()
        if self.fsdp:
            need_before = self._broadcast_object(need_before)  # rank 0 decides for all
        if need_before:
            before = self.evaluate()
            if main:
                (self.out / "metrics_before.json").write_text(json.dumps(before, indent=2))
        self._barrier()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log = open(self.out / "train_log.jsonl", "a") if main else None
        stop = False
        try:
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"refrag {cfg.stage}", dynamic_ncols=True,
                       disable=not main)
            t_last = time.perf_counter()
            while self.step < cfg.max_steps and not stop:
                m = self.train_step()
                m, stop = self._reduce_metrics(m)  # every rank takes the same decision
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                m.update(step=self.step, lr=self.scheduler.get_last_lr()[0], sec=dt)
                if log is not None:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                post = {"loss": f"{m['loss']:.3f}", "acc": f"{m.get('acc', 0):.2f}"}
                if "chunks" in m:  # the curriculum's chunk count (not in sft)
                    post["L"] = int(m["chunks"])
                bar.set_postfix(post)
                bar.update(1)
                if self.step % cfg.save_every == 0 or stop:
                    self.save_state()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps and not stop:
                    if evaluates:
                        ev = self.evaluate()
                        if log is not None:
                            log.write(json.dumps({"step": self.step, "eval": ev}) + "\n")
                        self.save_checkpoint({"step": self.step, "after": ev})
                    self._barrier()
            bar.close()
            self.save_state()
            # A signal that arrived after the last step's agreement still stops every rank alike.
            stop = self._any_rank(stop or self._stop)
        finally:
            if log is not None:
                log.close()
            for s, h in old.items():
                signal.signal(s, h)
        if stop:
            logger.warning("stopped at step %d; rerun the same command to resume", self.step)
            self.close()
            return {"stopped_at": self.step}
        metrics = None
        if evaluates:
            after = self.evaluate()
            metrics = {"stage": cfg.stage, "steps": self.step, "after": after}
            if main and (self.out / "metrics_before.json").exists():
                metrics["before"] = json.loads((self.out / "metrics_before.json").read_text())
            self.save_checkpoint(metrics)
        self._barrier()
        metrics = self._broadcast_object(metrics)
        self.close()
        return metrics
