"""TrainConfig: one dataclass for the library, the CLI (`refrag train STAGE`) and YAML files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_CHUNK_SIZE, DEFAULT_DATA_DIR

STAGES = ("reconstruct", "cpt", "mixed", "sft", "distill", "policy")
#: expand_fraction when a config gives none: mixed uses the paper's p = 0.1; sft trains and the
#: policy chooses at the p = 0.25 the evaluations and the default checkpoint use.
STAGE_EXPAND_FRACTION = {"reconstruct": 0.0, "cpt": 0.0, "mixed": 0.1, "sft": 0.25, "distill": 0.0, "policy": 0.25}
#: Share of a user's corpus (qa) file held out for evaluation when no heldout (qa_eval) file is given.
HELDOUT_FRACTION = 0.1
#: The stages `refrag train recipe` runs when none are chosen, in order (mixed and distill are opt-in).
RECIPE_STAGES = ("reconstruct", "cpt", "sft", "policy")
#: Per-stage settings of `refrag train recipe` (any recipe setting overrides them): the steps, batch
#: sizes, learning rates and chunk counts of the runs behind the full lineage in docs/training.md (runs
#: 1, 11, 12, 13, 14); distill has no measured run yet.
RECIPE_STAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "reconstruct": {"max_steps": 1000, "batch_size": 8, "lr": 3e-4, "max_chunks": 8},
    "cpt": {"max_steps": 1500, "batch_size": 8, "lr": 3e-4, "max_chunks": 32},
    "mixed": {"max_steps": 300, "batch_size": 8, "lr": 2e-4, "max_chunks": 32},
    "sft": {"max_steps": 150, "batch_size": 4, "lr": 2e-4, "lora_rank": 8, "num_passages": 10,
            "compressed_share": 0.25},
    "distill": {"max_steps": 300, "batch_size": 4, "lr": 2e-4, "num_passages": 10},
    "policy": {"max_steps": 120, "batch_size": 4, "lr": 3e-4, "num_passages": 10, "kl_coef": 0.1},
}


@dataclass
class TrainConfig:
    """Settings of one training stage. Every field has help text; YAML keys are field names.

    Example:
        >>> cfg = TrainConfig(stage="reconstruct", output_dir="runs/rec", max_steps=10)
        >>> cfg.stage
        'reconstruct'
    """

    stage: str = field(default="reconstruct", metadata={"help": f"One of {STAGES}."})
    output_dir: str = field(default="runs/refrag", metadata={"help": "Run directory (resume state, checkpoints)."})
    init_checkpoint: str | None = field(
        default=None, metadata={"help": "Checkpoint to start from (the previous stage's output)."}
    )
    decoder: str | None = field(default=None, metadata={"help": "Decoder (default: RefragConfig's)."})
    encoder: str | None = field(default=None, metadata={"help": "Encoder (default: RefragConfig's)."})
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={"help": "k, decoder tokens per chunk."})
    chunk_context: str | None = field(
        default=None,
        metadata={"help": "What a chunk vector sees: 'chunk' (its own tokens, the paper) or 'passage' (its whole "
                  "passage, each chunk's span pooled). Default: the init checkpoint's, else 'chunk'."},
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "distill: softmax temperature of the teacher and the student (the KL is scaled by T^2)."},
    )
    distill_ce_weight: float = field(
        default=0.0,
        metadata={"help": "distill: weight of cross-entropy on the gold answer (QA examples) or the true "
                  "continuation (text examples), added to the KL."},
    )
    qa_share: float = field(
        default=1.0,
        metadata={"help": "distill: share of examples that are NQ train questions (gold + distractor passages, "
                  "KL on the answer); the rest are Wikipedia next-paragraph continuations (KL on o tokens after "
                  "max_chunks compressed chunks)."},
    )
    data_dir: str = field(
        default=DEFAULT_DATA_DIR,
        metadata={"help": "Directory with the shared data files, read for every input that corpus, heldout, qa and "
                  "qa_eval leave unset."},
    )
    corpus: str | None = field(
        default=None,
        metadata={"help": "Text corpus for reconstruct, cpt, mixed and distill's text examples: .jsonl(.gz) with a "
                  "'text' field per line, or .txt(.gz) (one document). Default: data_dir's Wikipedia + WikiText-2 "
                  "valid + NQ train passages (distill: enwiki-2015-articles.jsonl.gz)."},
    )
    heldout: str | None = field(
        default=None,
        metadata={"help": "Held-out text for the evaluations of reconstruct, cpt and mixed (same formats as corpus). "
                  f"Default: the last {HELDOUT_FRACTION:.0%} of corpus (never trained on) when corpus is given, "
                  "else data_dir's wikitext2-test.txt."},
    )
    qa: str | None = field(
        default=None,
        metadata={"help": "QA examples for sft, distill and policy: .jsonl(.gz), one {'question', 'answers', "
                  "'ctxs': [{'title', 'text'}, ...]} per line, ctxs[0] the gold passage (the NQ-open shape). "
                  "Default: data_dir's NQ-open lines 1-2000."},
    )
    qa_eval: str | None = field(
        default=None,
        metadata={"help": "QA examples for the evaluations of sft, distill and policy (same format as qa). Default: "
                  f"the last {HELDOUT_FRACTION:.0%} of qa (never trained on) when qa is given, else data_dir's "
                  "NQ-open lines 2001-2655."},
    )
    max_chunks: int = field(default=16, metadata={"help": "L_max: most chunks per example (curriculum top)."})
    num_passages: int = field(default=5, metadata={"help": "sft, policy: passages per question (gold + distractors)."})
    group_size: int = field(default=8, metadata={"help": "policy: G action sequences sampled per question (GRPO group)."})
    ppo_epochs: int = field(default=4, metadata={"help": "policy: PPO updates on each batch of rollouts."})
    ppo_clip: float = field(default=0.2, metadata={"help": "policy: PPO clipping epsilon of the probability ratio."})
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "policy: weight of a KL penalty from the initial policy (the relevance heuristic for the "
                  "query variant, uniform for the paper's), which keeps small, noisy runs from drifting below "
                  "where they started; 0 = the paper's objective."},
    )
    policy_variant: str = field(
        default="query",
        metadata={"help": "policy: learned policy exported into the checkpoint: 'query' (query-conditioned) or "
                          "'chunks' (the paper's, ignores the query). Both are trained and evaluated."},
    )
    continuation_tokens: int = field(default=64, metadata={"help": "o: tokens to predict after the context (cpt)."})
    expand_fraction: float | None = field(
        default=None,
        metadata={"help": "p: fraction of chunks kept as tokens, at random (mixed, sft) or chosen by the learned "
                  "policy (policy). Default per stage: mixed 0.1 (the paper's), sft and policy 0.25; reconstruct "
                  "and cpt expand nothing."},
    )
    compressed_share: float = field(
        default=0.0,
        metadata={"help": "sft: share of examples with no chunk expanded (p = 0), so the fully compressed path "
                  "is trained too; the others use expand_fraction."},
    )
    curriculum_stages: int = field(default=9, metadata={"help": "Stages of the geometric curriculum (paper: 9)."})
    curriculum_start: int = field(
        default=1,
        metadata={"help": "First curriculum stage: a warm start from a trained checkpoint may skip the early, "
                  "mostly one-chunk stages (= curriculum_stages: the last stage's mixture throughout)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (paper: 2e-4 rec, 5e-5 cpt, 2e-5 sft)."})
    warmup_frac: float = field(default=0.04, metadata={"help": "Warm-up fraction of steps (paper: 4%)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    encoder_trainable_layers: int = field(
        default=2, metadata={"help": "Top encoder layers trained (-1 = all, 0 = projector only)."}
    )
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the decoder (0 = decoder frozen)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (never fp16)."})
    decoder_dtype: str = field(
        default="float32",
        metadata={"help": "Parameter dtype of the frozen decoder: float32, or bfloat16 to halve its memory (large "
                  "decoders on GPUs; LoRA adapters, encoder and projector stay float32; never float16)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's)."})
    save_every: int = field(default=50, metadata={"help": "Save resume state every N steps."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0 = only at the end)."})
    eval_before: bool = field(
        default=True, metadata={"help": "Evaluate the initial model before the first step (metrics_before.json)."}
    )
    eval_examples: int = field(default=64, metadata={"help": "Held-out examples per evaluation setting."})
    seed: int = field(default=0, metadata={"help": "Seed for data sampling and initialisation."})
    device: str | None = field(default=None, metadata={"help": "cpu / cuda (default: cuda if available)."})
    fsdp: bool = field(
        default=False,
        metadata={"help": "Shard the decoder over the ranks with FSDP (torch fully_shard, per decoder layer) "
                  "instead of replicating it on each (DDP); for decoders too large to hold once per GPU. Needs a "
                  "distributed launch (torchrun / accelerate launch, 2+ ranks) and a Trainer stage "
                  "(reconstruct, cpt, mixed, sft); not the policy stage."},
    )

    def __post_init__(self) -> None:
        self._coerce_numbers()
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        for name in ("chunk_size", "max_chunks", "batch_size", "grad_accum", "max_steps", "curriculum_stages"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        for name in ("save_every", "eval_examples", "num_passages", "continuation_tokens", "group_size", "ppo_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.eval_every < 0 or self.lora_rank < 0:
            raise ValueError("eval_every and lora_rank must be >= 0.")
        if self.encoder_trainable_layers < -1:
            raise ValueError(f"encoder_trainable_layers must be -1 (all), 0 or a positive count, got {self.encoder_trainable_layers!r}.")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}.")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm!r}.")
        if self.expand_fraction is None:
            self.expand_fraction = STAGE_EXPAND_FRACTION[self.stage]
        if not 0.0 <= self.expand_fraction <= 1.0:
            raise ValueError(f"expand_fraction must be in [0, 1], got {self.expand_fraction!r}.")
        if self.stage in ("reconstruct", "cpt") and self.expand_fraction > 0:
            raise ValueError(
                f"the {self.stage} stage keeps every chunk compressed, so expand_fraction={self.expand_fraction!r} "
                "would be ignored; train the mixed stage for a random fraction of expanded chunks."
            )
        if self.stage == "mixed" and self.expand_fraction == 0:
            raise ValueError(
                "the mixed stage with expand_fraction=0 is the cpt stage; give 0 < expand_fraction <= 1 "
                f"(default {STAGE_EXPAND_FRACTION['mixed']}, the paper's) or train cpt."
            )
        if not 1 <= self.curriculum_start <= self.curriculum_stages:
            raise ValueError(
                f"curriculum_start must be in 1..curriculum_stages ({self.curriculum_stages}), got {self.curriculum_start!r}."
            )
        if not 0.0 <= self.compressed_share <= 1.0:
            raise ValueError(f"compressed_share must be in [0, 1], got {self.compressed_share!r}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature!r}.")
        if self.distill_ce_weight < 0:
            raise ValueError(f"distill_ce_weight must be >= 0, got {self.distill_ce_weight!r}.")
        if not 0.0 <= self.qa_share <= 1.0:
            raise ValueError(f"qa_share must be in [0, 1], got {self.qa_share!r}.")
        if self.chunk_context is not None and self.chunk_context not in ("chunk", "passage"):
            raise ValueError(f"chunk_context must be 'chunk' or 'passage', got {self.chunk_context!r}.")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef!r}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        from ..models import resolve_dtype

        try:
            self.decoder_dtype = str(resolve_dtype(self.decoder_dtype, allowed=("float32", "bfloat16"))).replace("torch.", "")
        except ValueError as err:
            raise ValueError(
                f"decoder_dtype must be float32 or bfloat16, got {self.decoder_dtype!r} (float16 can overflow in "
                "training; use bfloat16)."
            ) from err
        if not isinstance(self.eval_before, bool):
            raise ValueError(f"eval_before must be true or false, got {self.eval_before!r}.")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp must be true or false, got {self.fsdp!r}.")
        if self.fsdp and self.stage == "policy":
            raise ValueError(
                "fsdp=true does not apply to the policy stage: it trains only the small policy network with the "
                "REFRAG model frozen; drop fsdp (the policy stage runs data-parallel without it; FSDP shards the "
                "decoder of the reconstruct, cpt, mixed and sft stages)."
            )

    def _coerce_numbers(self) -> None:
        """Numbers given as text become numbers: YAML 1.1 (PyYAML, ``--set``) reads ``1e-4`` as a
        string; anything else that is not a number of the field's type raises a clear error."""
        for f in dataclasses.fields(self):
            optional = str(f.type).endswith(" | None")
            kind = {"float": float, "int": int}.get(str(f.type).removesuffix(" | None"))
            value = getattr(self, f.name)
            if optional and value is None:
                continue
            if kind is None or isinstance(value, bool):
                if kind is not None:
                    raise ValueError(f"{f.name} must be a number, got {value!r}.")
                continue
            if isinstance(value, str):
                try:
                    value = kind(value.strip())
                except ValueError:
                    raise ValueError(f"{f.name} must be a number, got {value!r}.") from None
            elif kind is float and isinstance(value, int):
                value = float(value)
            elif not isinstance(value, kind):
                raise ValueError(f"{f.name} must be a number, got {value!r}.")
            setattr(self, f.name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown training config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)
