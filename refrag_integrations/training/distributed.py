"""Data-parallel plumbing of the trainers: joining the process group that ``torchrun`` /
``accelerate launch`` describes, the collectives a training step needs (all no-ops in a single
process), and FSDP's sharding of the decoder. How the trainers use it: docs/training.md, "How the
trainer is organised".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch

# Rank 0 alone evaluates and writes while the other ranks wait at a barrier: allow it an hour.
DIST_TIMEOUT_S = 3600
# Gradients are all-reduced in flat buckets of at most this many elements (bounds the extra memory).
GRAD_BUCKET_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run; ``world_size == 1`` is a plain single process.

    Its methods are the collectives the trainers use; every rank must call them alike, and in a
    single process they return at once (sums and means of one rank are the values themselves).

    Attributes:
        world_size: number of ranks.
        rank: this process's rank (0 writes files and logs).
        local_rank: rank on this machine (selects ``cuda:local_rank``).
        owns_group: True if :func:`init_distributed` created the process group (and so destroys it).
        device: where the collectives' buffers live (the engine's device: nccl needs CUDA tensors,
            so CPU tensors travel through it).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on(self, device: torch.device) -> "DistContext":
        """The same context with its collectives' buffers on ``device``."""
        return dataclasses.replace(self, device=torch.device(device))

    def leave(self) -> "DistContext":
        """Destroy the process group if this context created it (end of a torchrun job); returns
        the context that no longer owns it."""
        if not self.owns_group:
            return self
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return dataclasses.replace(self, owns_group=False)

    # ------------------------------------------------------------------ small collectives

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def count_ranks(self, flag: bool) -> int:
        """On every rank: the number of ranks where ``flag`` is True."""
        if not self.enabled:
            return int(flag)
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return int(round(t.item()))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return self.count_ranks(flag) > 0

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (on every rank; a CPU tensor comes back on the CPU)."""
        if not self.enabled:
            return t
        import torch.distributed as dist

        buf = t.to(self.device)
        dist.all_reduce(buf)
        return buf.to(t.device)

    def mean_metrics(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """The step's metrics averaged over the ranks, and whether any rank asked to stop (one
        all-reduce). Every rank must report the same metric names."""
        if not self.enabled:
            return metrics, stop
        import torch.distributed as dist

        keys = sorted(metrics)
        vals = [float(metrics[k]) for k in keys] + [float(stop)]
        t = torch.tensor(vals, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        out = {k: float(v) / self.world_size for k, v in zip(keys, t[:-1].tolist())}
        return out, bool(t[-1].item() > 0)

    # ------------------------------------------------------------------ weights and gradients

    def broadcast_params(self, params: Iterable[torch.Tensor]) -> None:
        """Start every rank from rank 0's values of ``params`` (one broadcast per tensor; the
        tensors live on :attr:`device`)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def broadcast_params_flat(self, params: Sequence[torch.Tensor]) -> None:
        """:meth:`broadcast_params` for small tensors anywhere (the CPU policy under nccl): one flat
        float32 buffer through :attr:`device`."""
        if not self.enabled:
            return
        import torch.distributed as dist

        params = list(params)
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self.device)  # (n,)
            dist.broadcast(flat, src=0)
            flat = flat.cpu()
            offset = 0
            for p in params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def average_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over the ranks (flat buckets on :attr:`device`).

        A parameter without a gradient on some ranks counts as zero there; one without a gradient
        on every rank keeps ``grad=None`` (the optimizer then skips it, as in a single process).
        """
        if not self.enabled or not params:
            return
        import torch.distributed as dist

        has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
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
            flat.div_(self.world_size)
            offset = 0
            for p in bucket:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks in one flat buffer (a parameter without a
        gradient contributes zeros). A rank that scaled its loss by 1 / (examples of the whole
        step) thus holds the single-process gradient of the mean over all examples."""
        if not self.enabled or not params:
            return
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = self.sum_over_ranks(torch.cat([p.grad.reshape(-1) for p in params]))  # (n,)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()


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


# ---------------------------------------------------------------------- FSDP


def is_dtensor(t: Any) -> bool:
    """True if ``t`` is an FSDP shard (a ``DTensor``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support: no FSDP shards either
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP shard (DTensor) gathered from every rank (a collective), or ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) as a DTensor sharded like ``param``
    (no communication: each rank keeps its own slice)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
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


def shard_decoder(decoder: torch.nn.Module, ctx: DistContext) -> None:
    """FSDP: shard each decoder layer, then the rest of the decoder (final norm, an untied LM
    head) over the ranks of ``ctx``. The input embedding stays a whole, replicated tensor: the
    engine calls it outside the decoder's forward (token embeddings around the chunk vectors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(decoder)
    if not layers:
        raise ValueError(
            f"fsdp=true cannot find the layers of the decoder ({type(decoder).__name__}) to shard; drop fsdp."
        )
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh, ignored_params={decoder.get_input_embeddings().weight})


def clip_grad_norm_sharded(params: Sequence[torch.nn.Parameter], max_norm: float, ctx: DistContext) -> torch.Tensor:
    """``clip_grad_norm_`` over FSDP shards and replicated parameters together: the norm combines
    the shards' gradients (summed over the ranks) and the replicated gradients (the same on every
    rank), which ``torch.nn.utils.clip_grad_norm_`` cannot mix. Returns the total norm."""
    import torch.distributed as dist

    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g.to_local() for g in grads if is_dtensor(g)]  # this rank's slices (views)
        plain = [g for g in grads if not is_dtensor(g)]
        dev = ctx.device
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


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with its sharded moments gathered whole onto the CPU (a
    collective), so the file has the layout a single process writes."""
    sd = optimizer.state_dict()
    state = {}
    for index in sorted(sd["state"]):  # the same order on every rank
        state[index] = {k: (full_tensor(v).cpu() if is_dtensor(v) else v) for k, v in sd["state"][index].items()}
    return {**sd, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """A saved (whole) optimizer state dict with each moment of a sharded parameter cut to this
    rank's shard, ready for ``optimizer.load_state_dict``."""
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in sd["state"].items():
        p = flat[int(index)] if int(index) < len(flat) else None
        if p is not None and is_dtensor(p):
            whole = tuple(p.shape)  # the moments have the parameter's shape; "step" is a scalar
            entry = {
                k: (shard_like(v, p) if torch.is_tensor(v) and k != "step" and tuple(v.shape) == whole else v)
                for k, v in entry.items()
            }
        state[index] = entry
    return {**sd, "state": state}


__all__ = [
    "DistContext",
    "clip_grad_norm_sharded",
    "decoder_layers",
    "full_tensor",
    "gather_optimizer_state",
    "init_distributed",
    "is_dtensor",
    "shard_decoder",
    "shard_like",
    "shard_optimizer_state",
]
