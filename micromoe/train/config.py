"""The resolved configuration of a training run: defaults < preset < command-line flags.

`TrainConfig` holds every option except the model shape (a `ModelConfig`); `RUN_PRESETS` gives each
model preset its training defaults. Both are saved inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from micromoe.plan.forecast import REPLACE_WINDOW

Dispatcher = Literal["ep", "microep"]
PlacementKind = Literal["symmetric", "random", "asymmetric"]
Precision = Literal["auto", "fp32", "mixed", "bf16"]
PRECISIONS = ("auto", "fp32", "mixed", "bf16")
RECOMPUTE = ("none", "full", "moe")
GATHER = ("micro", "step")


@dataclass(frozen=True)
class TrainConfig:
    """Every run option (see `micromoe train --help` for their meaning)."""

    preset: str = "tiny"
    data: str | None = None  # None = bundled tiny-shakespeare
    hf: str | None = None  # Hugging Face model folder: the model's config, weights and tokenizer
    val_fraction: float = 0.1
    # optimization
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_decay_steps: int | None = None  # None = max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    # run control
    max_steps: int = 300
    eval_interval: int = 100
    eval_batches: int = 4
    seed: int = 0
    out: str = "runs/train"
    precision: Precision = "auto"  # auto = mixed on GPU, fp32 on CPU (see train.precision)
    ac: str = "none"  # activation checkpointing: none | full | moe
    expert_gather: str = "micro"  # expert slots gathered per micro-batch or once per step
    compile: bool = False  # on GPU: fuse RoPE with torch.compile
    ckpt_interval: int = 0  # 0 = only at the end
    keep: int = 3  # checkpoints kept (0 = all)
    save: bool = True  # write checkpoints at all
    resume: bool = False
    record_routing: str | None = None
    log_interval: int = 10
    # parallelism
    dp: int | None = None  # None = world size
    ep: int | None = None  # None = half the world (all of it on one process)
    merge: int | None = None  # None = 2 for microep, 1 for ep
    dispatcher: Dispatcher = "microep"
    placement: PlacementKind = "symmetric"
    replace_interval: int = 0
    replace_threshold: float = 1.05
    replace_trigger_after: int = 3  # consecutive imbalanced micro-batches that trigger a check
    replace_cooldown: int = 4  # micro-batches after a replacement without another
    replace_warmup: int = 2  # micro-batches before the cold-start placement
    replace_window: int = REPLACE_WINDOW  # a check scores placements over this many recent micro-batches
    replace_min_gain: float = 0.01  # a new placement must lower the score by this much
    cost_model: str | None = None  # MicroEP plans for predicted GPU time (runtime's cost-model spec)
    timeout: float = 300.0

    def __post_init__(self) -> None:
        positive = ("micro_batch", "grad_accum", "max_steps", "eval_batches", "log_interval")
        positive += ("replace_trigger_after", "replace_warmup", "replace_window")
        optional = ("dp", "ep", "merge", "lr_decay_steps")
        for name in positive + optional:
            v = getattr(self, name)
            if v is None and name in optional:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in (
            "warmup_steps",
            "eval_interval",
            "ckpt_interval",
            "keep",
            "replace_interval",
            "replace_cooldown",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        for flag, value, allowed in (
            ("--precision", self.precision, PRECISIONS),
            ("--ac", self.ac, RECOMPUTE),
            ("--expert-gather", self.expert_gather, GATHER),
        ):
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if self.dispatcher not in ("ep", "microep"):
            raise ValueError(f"--dispatcher must be 'ep' or 'microep', got {self.dispatcher!r}")
        if self.placement not in ("symmetric", "random", "asymmetric"):
            raise ValueError(f"--placement must be symmetric, random or asymmetric, got {self.placement!r}")
        if not self.replace_threshold >= 1.0:
            raise ValueError(
                f"--replace-threshold must be >= 1.0 (1.0 = perfect balance), got {self.replace_threshold}"
            )
        if not self.replace_min_gain >= 0:
            raise ValueError(f"--replace-min-gain must be >= 0, got {self.replace_min_gain}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# training defaults per model preset (between TrainConfig's defaults and the flags)
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"micro_batch": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20, "max_steps": 500},
    "small": {
        "compile": True,
        "micro_batch": 32,
        "lr": 6e-4,
        "min_lr": 6e-5,
        "warmup_steps": 50,
        "max_steps": 1000,
    },
    "gpt-32x1.3b": {"micro_batch": 4, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 200, "max_steps": 10000},
    "mixtral-8x7b": {"micro_batch": 1, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 200, "max_steps": 10000},
    "qwen3-30b-a3b": {"micro_batch": 1, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 200, "max_steps": 10000},
}


def resolve(preset: str, flags: dict[str, Any]) -> TrainConfig:
    """TrainConfig from defaults, then `RUN_PRESETS[preset]`, then `flags` (None = not given)."""
    if preset not in RUN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(RUN_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {"preset": preset, **RUN_PRESETS[preset]}
    values.update({k: v for k, v in flags.items() if k in fields and v is not None})
    return TrainConfig(**values)
