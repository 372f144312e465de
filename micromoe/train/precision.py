"""Which dtype holds what: master weights, optimizer state, compute, gradient reduction.

- `mixed` (the default on a GPU): float32 master weights and AdamW state, bfloat16 compute (FSDP
  gathers the dense weights in bf16, the expert gather sends bf16 slot copies, the grouped GEMMs
  keep bf16 operands), gradients reduced and accumulated in float32 at their owners. An update
  smaller than bf16's resolution (about 0.4% of a weight) is kept.
- `fp32` (the default and only sensible choice on a CPU): float32 everywhere.
- `bf16`: weights and AdamW state in bfloat16 (half the memory of `mixed`'s masters and state;
  small updates are lost). For comparisons and memory-bound runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrecisionPlan:
    """The resolved precision of a run.

    Attributes:
        name: "fp32", "mixed" or "bf16".
        master: dtype of the parameters the optimizer updates (and of its state).
        compute: dtype of the forward/backward math (dense weights as FSDP gathers them, expert
            slot copies, activations).
        reduce: dtype gradients are reduced and accumulated in.
    """

    name: str
    master: torch.dtype
    compute: torch.dtype
    reduce: torch.dtype

    def describe(self) -> dict[str, str]:
        """JSON-ready: what each dtype holds (for config.json and the start-up summary)."""
        short = {torch.float32: "fp32", torch.bfloat16: "bf16"}
        return {
            "precision": self.name,
            "master_weights": short[self.master],
            "optimizer_state": short[self.master],
            "compute": short[self.compute],
            "gradient_reduce": short[self.reduce],
        }

    @property
    def casts(self) -> bool:
        """Whether compute runs in another dtype than the masters (FSDP mixed precision on)."""
        return self.compute != self.master


def resolve_precision(name: str, device: torch.device) -> PrecisionPlan:
    """`name` ("auto", "fp32", "mixed", "bf16") for `device`: auto is mixed on CUDA, fp32 elsewhere."""
    if name == "auto":
        name = "mixed" if device.type == "cuda" else "fp32"
    if name == "fp32":
        return PrecisionPlan("fp32", torch.float32, torch.float32, torch.float32)
    if name == "mixed":
        return PrecisionPlan("mixed", torch.float32, torch.bfloat16, torch.float32)
    if name == "bf16":
        return PrecisionPlan("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16)
    raise ValueError(f"--precision must be auto, fp32, mixed or bf16, got {name!r}")
