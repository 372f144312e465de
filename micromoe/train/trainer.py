"""Build a training run (model, parallelism, optimizer, data, hook) and save/restore it.

`build_run` is called by every rank with the same configuration: it builds the full single-device
model from the seed (so replicas start identical), shards its MoE layers, and resumes from the
newest checkpoint when asked.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromoe.model import ModelConfig, MoETransformer, parallelize_model
from micromoe.plan import Placement
from micromoe.train import checkpoint as ckpt
from micromoe.train.config import TrainConfig
from micromoe.train.data import BatchSpec, TokenData
from micromoe.train.parallel import ParallelState, build_groups, build_placement
from micromoe.train.replacement import Replacer, build_replacement

log = logging.getLogger("micromoe.train")


@dataclass
class Run:
    """Everything the loop needs; built identically on every rank."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    parallel: ParallelState
    model: MoETransformer
    optimizer: torch.optim.Optimizer
    data: TokenData
    spec: BatchSpec
    replacer: Replacer
    start_step: int
    flops_per_token: float
    peak_flops: float | None


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, none on norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)  # one kernel per step on the GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def run_meta(run_cfg: TrainConfig, model_cfg: ModelConfig, par: ParallelState) -> dict[str, Any]:
    """What a checkpoint must agree on (plus the resolved configs, saved for the record)."""
    lay = par.layout
    return {
        "world": par.world,
        "dp": lay.dp if lay else 1,
        "ep": lay.ep if lay else 1,
        "merge": lay.merge if lay else 1,
        "dispatcher": par.dispatcher if lay else "local",
        "placement": run_cfg.placement if lay else "local",
        # the data a step reads is a function of these (resuming with others changes the stream)
        "micro_batch": run_cfg.micro_batch,
        "grad_accum": run_cfg.grad_accum,
        "seed": run_cfg.seed,
        "model": dataclasses.asdict(model_cfg),
        "train": run_cfg.to_dict(),
    }


def build_run(
    cfg: TrainConfig, model_cfg: ModelConfig, par: ParallelState, data: TokenData, *, peak_flops: float | None
) -> Run:
    """Model, placements and groups, optimizer; restored from out/checkpoints when cfg.resume."""
    folder = ckpt.latest_checkpoint(Path(cfg.out)) if cfg.resume else None
    meta = ckpt.read_meta(folder) if folder is not None else None
    if meta is not None:
        ckpt.check_compatible(meta, run_meta(cfg, model_cfg, par))
    torch.manual_seed(cfg.seed)  # every rank builds the same full model
    model = MoETransformer(model_cfg).to(par.device)
    flops_per_token = model.flops_per_token()
    if par.device.type == "cuda" and cfg.bf16:
        for p in model.parameters():  # bf16 weights (grouped GEMMs need them); buffers stay fp32
            p.data = p.data.to(torch.bfloat16)
    if par.device.type == "cuda" and cfg.compile:
        model.fuse_pointwise()
    if par.distributed:
        num_moe = model_cfg.num_moe_layers
        if num_moe == 0:
            raise ValueError("a distributed run needs at least one MoE layer (num_dense_layers < num_layers)")
        if meta is not None:
            placements = [
                Placement.from_slots(np.array(s), model_cfg.num_experts) for s in meta["placements"]
            ]
        else:
            placements = [build_placement(cfg, par.layout, model_cfg.num_experts, i) for i in range(num_moe)]
        par.groups = build_groups(par.layout, placements, par.rank)  # collective (world)
        parallelize_model(model, par.groups, par.dispatcher, cost_model=cfg.cost_model)
    optimizer = make_optimizer(model, cfg)
    spec = BatchSpec(model_cfg.seq_len, cfg.micro_batch, cfg.grad_accum, par.world)
    # the dispatchers' resolved cost model also scores placements for adaptive replacement
    moe = model.moe_layers()
    cost = getattr(moe[0].dispatcher, "cost_model", None) if moe and cfg.cost_model else None
    replacer = build_replacement(
        cfg.replace_interval,
        cfg.replace_threshold,
        par,
        micro_batches=cfg.grad_accum,
        trigger_after=cfg.replace_trigger_after,
        cooldown=cfg.replace_cooldown,
        warmup=cfg.replace_warmup,
        window=cfg.replace_window,
        min_gain=cfg.replace_min_gain,
        seed=cfg.seed,
        cost=cost,
    )
    run = Run(cfg, model_cfg, par, model, optimizer, data, spec, replacer, 0, flops_per_token, peak_flops)
    if folder is not None:
        _restore(run, folder, meta)
    return run


def save(run: Run, step: int) -> Path:
    """Checkpoint after `step` optimizer steps (collective: every rank calls it)."""
    par = run.parallel
    meta = {**run_meta(run.cfg, run.model_cfg, par), "placements": par.placements()}
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": ckpt.rng_state(),
        "data": {"seed": run.data.seed, "next_step": step},
    }
    if hasattr(run.replacer, "state_dict"):
        state["replacement"] = run.replacer.state_dict()
    return ckpt.save_checkpoint(
        Path(run.cfg.out), step, meta, state, rank=par.rank, distributed=par.distributed
    )


def _restore(run: Run, folder: Path, meta: dict[str, Any]) -> None:
    state = ckpt.load_rank_state(folder, run.parallel.rank)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    ckpt.set_rng_state(state["rng"])
    if state["data"]["seed"] != run.data.seed:
        raise ValueError(
            f"the checkpoint sampled data with seed {state['data']['seed']}, this run uses {run.data.seed}; "
            "resume with the same --seed"
        )
    if "replacement" in state and hasattr(run.replacer, "load_state_dict"):
        run.replacer.load_state_dict(state["replacement"])
    run.start_step = int(meta["step"])
    if run.parallel.rank == 0:
        log.info("resumed from %s at step %d", folder, run.start_step)
