"""The training loop shared by all stages: AdamW, warm-up + cosine, bf16 autocast, gradient
accumulation, progress bar, checkpoints every N steps and on SIGINT/SIGTERM, exact resume.

Data for step t is drawn from an RNG seeded by (seed, t), so resuming at step t replays exactly
the batches an uninterrupted run would have seen; optimizer, scheduler and RNG states are saved.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"


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


class Trainer:
    """Runs one stage of the REFRAG recipe.

    Args:
        cfg: the stage's :class:`TrainConfig`.
        engine: an already built engine (tests); default: built from ``cfg``.
    """

    def __init__(self, cfg: TrainConfig, engine=None) -> None:
        from ..engine import RefragEngine

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.output_dir)
        self.prev_stages: list[str] = []
        self.prev = None  # the init checkpoint's contents, carried into this stage's export
        if cfg.init_checkpoint:
            self.prev = load_checkpoint(cfg.init_checkpoint)
            self.prev_stages = self.prev.trained_stages
        if engine is None:
            kwargs: dict[str, Any] = {"device": cfg.device}
            if cfg.init_checkpoint:
                engine = RefragEngine.from_pretrained(cfg.init_checkpoint, decoder=cfg.decoder, encoder=cfg.encoder, **kwargs)
            else:
                torch.manual_seed(cfg.seed)
                engine = RefragEngine.from_pretrained(
                    decoder=cfg.decoder, encoder=cfg.encoder, chunk_size=cfg.chunk_size, **kwargs
                )
        self.engine = engine
        if engine.config.chunk_size != cfg.chunk_size:
            raise ValueError(f"the engine has k={engine.config.chunk_size} but the config says k={cfg.chunk_size}.")
        self.engine.autocast_dtype = torch.bfloat16 if cfg.bf16 else None
        self._set_trainable()
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

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """What training changes: projector, trained encoder params, trained decoder params."""
        enc = self.engine.chunk_encoder
        return {
            "projector": {k: v.detach().clone() for k, v in enc.projector.state_dict().items()},
            "encoder": {n: p.detach().clone() for n, p in enc.encoder.named_parameters() if p.requires_grad},
            "decoder": {n: p.detach().clone() for n, p in self.engine.decoder.named_parameters() if p.requires_grad},
        }

    def _load_trainable(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        enc = self.engine.chunk_encoder
        enc.projector.load_state_dict(state["projector"])
        enc.encoder.load_state_dict(state["encoder"], strict=False)
        self.engine.decoder.load_state_dict(state["decoder"], strict=False)

    # ------------------------------------------------------------------ data + loss

    def data(self):
        if self._data is None:
            from .data import TokenCorpus, pretraining_documents

            t0 = time.perf_counter()
            self._data = TokenCorpus(pretraining_documents(self.cfg.data_dir), self.engine.tokenizer)
            logger.info("tokenized %d training tokens in %.1fs", self._data.tokens, time.perf_counter() - t0)
        return self._data

    def heldout(self):
        from .data import TokenCorpus, heldout_documents

        return TokenCorpus(heldout_documents(self.cfg.data_dir), self.engine.tokenizer)

    def loss_for_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of micro-batch ``micro`` of optimizer step ``step`` (data seeded by both)."""
        from .curriculum import sample_chunk_count
        from .objectives import continuation_loss, random_expansion, reconstruction_loss

        cfg = self.cfg
        rng = random.Random((cfg.seed * 1_000_003 + step) * 64 + micro)
        L = sample_chunk_count(rng, step, cfg.max_steps, cfg.curriculum_stages, cfg.max_chunks)
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

    # ------------------------------------------------------------------ state

    def save_state(self) -> None:
        """Write the resume state atomically (trainable weights, optimizer, scheduler, RNG)."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / STATE_FILE)

    def try_resume(self) -> bool:
        """Continue from ``output_dir``'s resume state if there is one. Returns True if resumed."""
        path = self.out / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        saved = dict(state["config"])
        for key in ("stage", "chunk_size", "max_steps", "batch_size", "grad_accum", "seed", "max_chunks"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"{path} was written with {key}={saved.get(key)!r} but this run has {key}={getattr(self.cfg, key)!r}; "
                    "use the same settings to resume, or another --output-dir to start afresh."
                )
        self._load_trainable(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = int(state["step"])
        logger.info("resumed %s at step %d", path, self.step)
        return True

    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> Path:
        """Export the trained weights as a REFRAG checkpoint directory (``output_dir/checkpoint``):
        everything the init checkpoint changed plus what this stage changed."""
        from .lora import lora_state

        st = self.trainable_state()
        eng = self.engine
        enc_delta = dict(self.prev.encoder_delta) if self.prev else {}
        enc_delta.update(st["encoder"])
        dec_delta = dict(self.prev.decoder_delta) if self.prev else {}
        dec_delta.update({n: v for n, v in st["decoder"].items() if ".lora_" not in n})
        adapters = list(self.prev.decoder_lora) if self.prev else []
        if self.cfg.lora_rank > 0:
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

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        total, agg = 0.0, {}
        for micro in range(cfg.grad_accum):
            with self.engine._autocast():
                loss, m = self.loss_for_step(self.step, micro)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {float(loss)} at step {self.step}; lower the learning rate.")
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            for key, v in m.items():
                agg[key] = agg.get(key, 0.0) + float(v) / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
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
        out: dict[str, Any] = {"reconstruction": reconstruction_eval(self.engine, held, sizes, cfg.eval_examples)}
        if cfg.stage != "reconstruct":
            out["next_paragraph"] = next_paragraph_eval(
                self.engine, held, min(cfg.max_chunks, 8), cfg.continuation_tokens, cfg.eval_examples
            )
        self.engine.chunk_encoder.train(was)
        return out

    def train(self, resume: bool = True) -> dict[str, Any]:
        """Run (or continue) the stage to ``max_steps``; returns the final metrics."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume:
            self.try_resume()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        before = None
        if self.step == 0 and not (self.out / "metrics_before.json").exists():
            before = self.evaluate()
            (self.out / "metrics_before.json").write_text(json.dumps(before, indent=2))
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        log = open(self.out / "train_log.jsonl", "a")
        try:
            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"refrag {cfg.stage}", dynamic_ncols=True)
            t_last = time.perf_counter()
            while self.step < cfg.max_steps and not self._stop:
                m = self.train_step()
                dt = time.perf_counter() - t_last
                t_last = time.perf_counter()
                m.update(step=self.step, lr=self.scheduler.get_last_lr()[0], sec=dt)
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m.get('acc', 0):.2f}", L=int(m.get("chunks", 0)))
                bar.update(1)
                if self.step % cfg.save_every == 0 or self._stop:
                    self.save_state()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    ev = self.evaluate()
                    log.write(json.dumps({"step": self.step, "eval": ev}) + "\n")
                    self.save_checkpoint({"step": self.step, "after": ev})
            bar.close()
            self.save_state()
        finally:
            log.close()
            for s, h in old.items():
                signal.signal(s, h)
        if self._stop:
            logger.warning("stopped at step %d; rerun the same command to resume", self.step)
            return {"stopped_at": self.step}
        after = self.evaluate()
        metrics = {"stage": cfg.stage, "steps": self.step, "after": after}
        if (self.out / "metrics_before.json").exists():
            metrics["before"] = json.loads((self.out / "metrics_before.json").read_text())
        self.save_checkpoint(metrics)
        return metrics
