"""What a run says about itself when it starts: the resolved config (written to OUT/config.json
only) and a short summary on stderr (device, world, layout, parameters, tokens per step, memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from micromoe.model import ModelConfig, MoETransformer
from micromoe.train.config import TrainConfig
from micromoe.train.data import BatchSpec
from micromoe.train.memory import GIB, MemoryPlan
from micromoe.train.parallel import ParallelState
from micromoe.train.precision import resolve_precision


def precision(cfg: TrainConfig, device: torch.device) -> str:
    """What this run really trains in, e.g. 'mixed (fp32 master weights, bf16 compute)'."""
    p = resolve_precision(cfg.precision, device).describe()
    if p["precision"] == "mixed":
        return "mixed precision (fp32 master weights and AdamW state, bf16 compute)"
    return f"{p['precision']} weights, AdamW state and compute"


def resolved_config(
    cfg: TrainConfig, model_cfg: ModelConfig, par: ParallelState, data: dict[str, Any]
) -> dict[str, Any]:
    """OUT/config.json: every option as resolved, the layout, the data (source, size,
    fingerprint) and the precision actually used (which dtype holds what)."""
    return {
        "train": cfg.to_dict(),
        "model": dataclasses.asdict(model_cfg),
        "world": par.world,
        "layout": str(par.layout),
        "device": par.device.type,
        "precision": resolve_precision(cfg.precision, par.device).describe(),
        "data": data,
    }


def _count(n: int) -> str:
    """12,345 -> '12.3 K', 1.5e9 -> '1.50 B'."""
    if n < 1e6:
        return f"{n / 1e3:,.1f} K"
    return f"{n / 1e6:,.2f} M" if n < 1e9 else f"{n / 1e9:,.2f} B"


def _plural(n: int, word: str, suffix: str = "s") -> str:
    return f"{n} {word}{'' if n == 1 else suffix}"


def startup_lines(
    cfg: TrainConfig,
    model: MoETransformer,
    par: ParallelState,
    spec: BatchSpec,
    memory: MemoryPlan,
    *,
    backend: str | None,
    start_step: int,
) -> list[str]:
    """The start-up summary: a few short lines for a person (the full config is in config.json)."""
    m = model.cfg
    device = str(par.device) if par.device.type == "cuda" else "CPU"
    where = f"{device}, {_plural(par.world, 'rank')}" + (f" ({backend})" if backend else "")
    lay = par.layout
    if lay is None:
        layout = "one process, every expert local"
    else:
        kind = "MicroEP" if par.dispatcher == "microep" else "plain EP"
        layout = f"DP {lay.dp}, EP {lay.ep}, d {lay.merge} ({kind}"
        layout += f", {cfg.placement} placement)" if lay.merge > 1 else ")"
    counts = model.num_params()
    tokens = spec.global_batch * spec.seq_len
    run = f"steps {start_step} -> {cfg.max_steps}" if start_step else f"{cfg.max_steps} steps"
    return [
        f"micromoe train: {cfg.preset} on {where}; {layout}; {precision(cfg, par.device)}",
        f"model: {_plural(m.num_layers, 'layer')} ({m.num_moe_layers} MoE, {m.num_experts} experts, "
        f"top-{m.top_k}), {_count(counts['total'])} parameters, {_count(counts['active'])} active per token",
        f"{run}, {tokens:,} tokens per step ({_plural(spec.micro_batch, 'sequence')} x {spec.seq_len} "
        f"tokens x {_plural(spec.grad_accum, 'micro-batch', 'es')} x {_plural(spec.world, 'rank')})",
        f"memory per rank (plan): {memory.total / GIB:.2f} GiB of {memory.capacity / GIB:.1f} "
        f"({', '.join(f'{i.name} {i.bytes / GIB:.2f}' for i in memory.largest(3))}); --dry-run shows it all",
        f"full config: {cfg.out}/config.json",
    ]
