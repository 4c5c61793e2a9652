"""The training loop shared by all stages: AdamW, warm-up + cosine, bf16 autocast, gradient
accumulation, progress bar, checkpoints every N steps and on SIGINT/SIGTERM, exact resume, and
data-parallel scale-out (plumbing in :mod:`.distributed`).

:meth:`Trainer.train` is the one loop, readable top to bottom; a stage changes what it does through
hooks (:meth:`~Trainer.train_step`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.save_checkpoint` and
a few small ones). How data, seeds, resume, DDP and FSDP fit together: docs/training.md, "How the
trainer is organised".

    torchrun --nproc_per_node 4 --no-python refrag train cpt --init-checkpoint runs/rec/checkpoint
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
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import (
    clip_grad_norm_sharded,
    full_tensor,
    gather_optimizer_state,
    init_distributed,
    is_dtensor,
    shard_decoder,
    shard_like,
    shard_optimizer_state,
)

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"

# Micro-batch seeds: (seed * SEED_STEP_STRIDE + step) * MICRO_SEED_STRIDE + index for the first
# MICRO_SEED_STRIDE micro-batches of a step (the historical formula, so runs resume with the same
# data); larger indices (many ranks x accumulation) use a string seed that cannot collide.
SEED_STEP_STRIDE = 1_000_003
MICRO_SEED_STRIDE = 64


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


def micro_batch_seed(seed: int, step: int, index: int) -> int | str:
    """Seed of the data RNG for micro-batch ``index`` (0-based, across all ranks) of ``step``.

    Example:
        >>> micro_batch_seed(0, 3, 1)
        193
    """
    if index < MICRO_SEED_STRIDE:
        return (seed * SEED_STEP_STRIDE + step) * MICRO_SEED_STRIDE + index
    return f"{seed}/{step}/{index}"


class Trainer:
    """Runs one stage of the REFRAG recipe.

    Under ``torchrun`` / ``accelerate launch`` it trains data-parallel (see docs/training.md). A
    stage subclasses it and overrides the hooks: what trains (:meth:`set_trainable`,
    :meth:`module_params`, :meth:`trainable_state`, :meth:`load_trainable_state`), one optimizer
    step (:meth:`train_step`, or just :meth:`loss_for_step`), the evaluation (:meth:`evaluate`) and
    the export (:meth:`save_checkpoint`, :meth:`export_metrics`); :meth:`train` stays one loop.

    Args:
        cfg: the stage's :class:`TrainConfig`.
        engine: an already built engine (tests); default: built from ``cfg`` (on
            ``cuda:LOCAL_RANK`` in a multi-GPU run).

    Example:
        >>> cfg = TrainConfig(stage="reconstruct", output_dir="runs/rec", max_steps=2000)  # doctest: +SKIP
        >>> metrics = Trainer(cfg).train()   # Ctrl-C saves; rerunning resumes  # doctest: +SKIP
    """

    # Settings a resume must keep (other values would draw other data), checked in this order.
    RESUME_KEYS: tuple[str, ...] = ("stage", "chunk_size", "max_steps", "batch_size", "seed", "max_chunks")
    # Values assumed for resume settings that state files written by older versions lack.
    RESUME_DEFAULTS: dict[str, Any] = {}

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
        self.dist = self.dist.on(engine.device)  # collectives go through the engine's device
        if engine.config.chunk_size != cfg.chunk_size:
            raise ValueError(f"the engine has k={engine.config.chunk_size} but the config says k={cfg.chunk_size}.")
        self.engine.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self.set_trainable()
        if self.fsdp:
            # Every rank starts from rank 0's trainable weights, broadcast while they are whole.
            self.broadcast_initial_weights([p for p in self.module_params() if p.requires_grad])
            shard_decoder(self.engine.decoder, self.dist)
        self.params = [p for p in self.module_params() if p.requires_grad]
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
            self.broadcast_initial_weights(self.params)

    # ------------------------------------------------------------------ hooks: what trains

    def module_params(self) -> Iterator[torch.nn.Parameter]:
        """Every parameter of the modules this stage may train (the trainer keeps those that
        require gradients after :meth:`set_trainable`)."""
        yield from self.engine.chunk_encoder.parameters()
        yield from self.engine.decoder.parameters()

    def set_trainable(self) -> None:
        """Freeze and unfreeze parameters, add LoRA adapters: what this stage trains."""
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

    def broadcast_initial_weights(self, params: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's trainable weights (fresh projector / LoRA init)."""
        self.dist.broadcast_params(params)

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
        return {part: {n: full_tensor(v.detach()).to("cpu", copy=True) for n, v in items} for part, items in parts.items()}

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load what :meth:`trainable_state` returned (whole tensors; cut to shards with ``fsdp``)."""
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
                if is_dtensor(p):
                    p.to_local().copy_(shard_like(value.to(p.dtype), p).to_local())
                else:
                    p.copy_(value)

    # ------------------------------------------------------------------ hooks: data + loss

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

    # ------------------------------------------------------------------ hooks: the step

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
        if self.fsdp:  # FSDP has already reduce-scattered (averaged) the decoder shards' gradients
            self.dist.average_grads([p for p in self.params if not is_dtensor(p)])
            clip_grad_norm_sharded(self.params, cfg.max_grad_norm, self.dist)
        else:
            self.dist.average_grads(self.params)
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": total, **agg}

    def agree_on_step(self, metrics: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
        """The step's metrics over all ranks (here: this rank's means averaged), and whether to
        stop (``stop``, a signal, on any rank): every rank takes the same decision."""
        return self.dist.mean_metrics(metrics, stop)

    def progress_postfix(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What the progress bar shows after a step."""
        post: dict[str, Any] = {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics.get('acc', 0):.2f}"}
        if "chunks" in metrics:  # the curriculum's chunk count (not in sft)
            post["L"] = int(metrics["chunks"])
        return post

    # ------------------------------------------------------------------ hooks: evaluation + export

    def before_training(self) -> None:
        """Runs on every rank once the resume state is loaded, before the first step: the
        evaluation of the initial model (``eval_before``), once per output directory."""
        main = self.dist.is_main
        need = self.cfg.eval_before and main and self.step == 0 and not (self.out / "metrics_before.json").exists()
        if self.fsdp:
            need = self.dist.broadcast_object(need)  # rank 0 decides for all
        if need:
            before = self.evaluate_fresh()
            if main:
                (self.out / "metrics_before.json").write_text(json.dumps(before, indent=2))

    def evaluate_fresh(self) -> dict[str, Any]:
        """:meth:`evaluate` on the current weights: the engine's cached chunk vectors were encoded by
        an earlier state of the chunk encoder, so they are forgotten first."""
        self.engine.forget_vectors()
        return self.evaluate()

    def evaluate(self) -> dict[str, Any]:
        """The stage's built-in evaluation (logged, and stored in the exported checkpoint)."""
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

    def export_metrics(self, after: dict[str, Any], final: bool) -> dict[str, Any]:
        """The metrics stored with an export: of an evaluation during training (``final=False``)
        or at the end of the stage."""
        if not final:
            return {"step": self.step, "after": after}
        metrics = {"stage": self.cfg.stage, "steps": self.step, "after": after}
        if self.dist.is_main and (self.out / "metrics_before.json").exists():
            metrics["before"] = json.loads((self.out / "metrics_before.json").read_text())
        return metrics

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

    # ------------------------------------------------------------------ resume state

    def save_state(self) -> None:
        """Write the resume state atomically (trainable weights, optimizer, scheduler, RNG).

        Call it on every rank: rank 0 writes, the others wait for it (the ranks hold the same
        weights and optimizer state; with ``fsdp`` every rank first takes part in gathering the
        decoder's shards, so the file is a whole state that any number of ranks can resume).
        """
        if self.fsdp:
            trainable, optim = self.trainable_state(), gather_optimizer_state(self.optimizer)
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
        self.dist.barrier()

    def try_resume(self) -> bool:
        """Continue from ``output_dir``'s resume state if there is one. Returns True if resumed."""
        path = self.out / STATE_FILE
        found = path.is_file()
        if self.dist.enabled:
            # Checked before the settings below, so that no rank raises while the others wait.
            seen = self.dist.count_ranks(found)
            if 0 < seen < self.dist.world_size:
                raise ValueError(
                    f"{path} is visible on {seen} of {self.dist.world_size} ranks; put output_dir on a "
                    "filesystem that every rank shares."
                )
        if not found:
            return False
        state = torch.load(path, weights_only=False, map_location="cpu")
        saved = {**self.RESUME_DEFAULTS, **state["config"]}
        for key in self.RESUME_KEYS:
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
        self.load_trainable_state(state["trainable"])
        optim = state["optimizer"]
        self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, optim) if self.fsdp else optim)
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        logger.info("resumed %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        logger.warning("signal %d: saving at the end of this step", signum)
        self._stop = True

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
        self.before_training()
        self.dist.barrier()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log = open(self.out / "train_log.jsonl", "a") if main else None
        stop = False
        try:
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"refrag {cfg.stage}", dynamic_ncols=True,
                       disable=not main)
            t_last = time.perf_counter()
            while self.step < cfg.max_steps and not stop:
                m = self.train_step()
                m, stop = self.agree_on_step(m, self._stop)  # a signal during the step stops every rank alike
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                m.update(step=self.step, lr=self.scheduler.get_last_lr()[0], sec=dt)
                if log is not None:
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                bar.set_postfix(self.progress_postfix(m))
                bar.update(1)
                if self.step % cfg.save_every == 0 or stop:
                    self.save_state()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps and not stop:
                    if evaluates:
                        ev = self.evaluate_fresh()
                        if log is not None:
                            log.write(json.dumps({"step": self.step, "eval": ev}) + "\n")
                        self.save_checkpoint(self.export_metrics(ev, final=False))
                    self.dist.barrier()
            bar.close()
            self.save_state()
            # A signal that arrived after the last step's agreement still stops every rank alike.
            stop = self.dist.any_rank(stop or self._stop)
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
            metrics = self.export_metrics(self.evaluate_fresh(), final=True)
            self.save_checkpoint(metrics)
        self.dist.barrier()
        metrics = self.dist.broadcast_object(metrics)
        self.close()
        return metrics

    def close(self) -> None:
        """Leave the process group if this trainer created it (end of a torchrun job). A multi-rank
        trainer cannot train again afterwards; build a new one (as a new process would)."""
        self.dist = self.dist.leave()
