"""The resolved configuration of a training run: defaults < preset < command-line flags.

`TrainConfig` holds every option except the model shape (a `ModelConfig`); `RUN_PRESETS` gives each
model preset its training defaults. Both are saved inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from micromoe.plan.forecast import REPLACE_WINDOW

_POSITIVE_INTS = ("micro_batch", "grad_accum", "max_steps", "eval_batches", "log_interval")
_POSITIVE_INTS += ("replace_trigger_after", "replace_warmup", "replace_window")
_OPTIONAL_POSITIVE_INTS = ("dp", "ep", "merge", "lr_decay_steps")  # None = derived
_NON_NEGATIVE_INTS = ("warmup_steps", "eval_interval", "ckpt_interval", "replace_interval")
_NON_NEGATIVE_INTS += ("replace_cooldown", "seed", "keep")
INF = math.inf
MAX_SEED = 2**63
# float field -> (low, low excluded?, high, high excluded?); every float must also be finite
_FLOAT_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "val_fraction": (0.0, True, 1.0, True),
    "lr": (0.0, True, INF, True),
    "min_lr": (0.0, False, INF, True),
    "weight_decay": (0.0, False, INF, True),
    "beta1": (0.0, False, 1.0, True),
    "beta2": (0.0, False, 1.0, True),
    "grad_clip": (0.0, False, INF, True),  # 0 = off
    "replace_threshold": (1.0, False, INF, True),  # 1.0 = perfect balance
    "replace_min_gain": (0.0, False, INF, True),
    "timeout": (0.0, True, INF, True),
}
_NO_FLAG = ("beta1", "beta2")  # fields without a command-line flag


def flag_name(field_name: str) -> str:
    """The command-line flag of a TrainConfig field ('grad_clip' -> '--grad-clip')."""
    if field_name in _NO_FLAG:
        return f"TrainConfig.{field_name}"
    return "--" + field_name.replace("_", "-")


def check_real(
    value: Any, name: str, low: float, high: float = INF, *, low_open: bool = False, high_open: bool = True
) -> float:
    """`value` as a float if it is a finite real number in the range; ValueError naming `name`.

    Rejects bool, str, NaN and infinities; the range's ends are included unless `*_open`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high == INF else f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {lo}{hi}, got {value!r}")
    return float(value)


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
        for name in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS + _NON_NEGATIVE_INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_POSITIVE_INTS:
                continue
            low = 0 if name in _NON_NEGATIVE_INTS else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                kind = "an integer >= 0" if low == 0 else "a positive integer"
                raise ValueError(f"{flag_name(name)} must be {kind}, got {value!r}")
        for name, (low, low_open, high, high_open) in _FLOAT_RANGES.items():
            check_real(
                getattr(self, name), flag_name(name), low, high, low_open=low_open, high_open=high_open
            )
        if self.seed >= MAX_SEED:  # torch.manual_seed and NumPy's generators take 64-bit seeds
            raise ValueError(f"--seed must be < 2**63, got {self.seed}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min-lr {self.min_lr:g} must be <= --lr {self.lr:g} (min_lr <= lr)")
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
