"""Build a training run (model, parallelism, optimizer, data, hook) and save/restore it.

`build_run` is called by every rank with the same configuration. It builds the model on the meta
device, applies parallelism (experts owned once per MicroEP group with their slots gathered; dense
parameters under FSDP2 whenever a process group exists), activation checkpointing and the
precision, and only then allocates and initializes what this rank keeps (`model.init`), so every
layout starts from the same weights. A resumed run loads its checkpoint into that layout: the
checkpoint holds tensors by logical name, so world size, EP, d and placement may all differ from
the run that wrote it (only the model and the global batch must match).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from micromoe.model import ModelConfig, MoETransformer, parallelize_model
from micromoe.model.hf import hf_source, read_config
from micromoe.model.init import materialize
from micromoe.model.parallel import apply_activation_checkpointing, shard_dense
from micromoe.plan import Placement
from micromoe.train import checkpoint as ckpt
from micromoe.train.config import TrainConfig
from micromoe.train.data import BatchSpec, TokenData
from micromoe.train.parallel import ParallelState, build_groups, build_placement
from micromoe.train.precision import PrecisionPlan, resolve_precision
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
    precision: PrecisionPlan


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, none on norms. FSDP's sharded parameters
    (DTensors) and plain tensors (expert masters) go into separate groups: one multi-tensor
    kernel cannot mix them. Plain CUDA groups use the fused kernel."""
    groups = []
    for sharded in (True, False):
        for decay in (True, False):
            params = [
                p for p in model.parameters() if isinstance(p, DTensor) == sharded and (p.dim() >= 2) == decay
            ]
            if params:
                fused = not sharded and all(p.is_cuda for p in params)
                groups.append(
                    {
                        "params": params,
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "fused": fused or None,
                    }
                )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def run_meta(run_cfg: TrainConfig, model_cfg: ModelConfig, par: ParallelState) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it (for the record and for resuming)."""
    lay = par.layout
    return {
        "world": par.world,
        "dp": lay.dp if lay else 1,
        "ep": lay.ep if lay else 1,
        "merge": lay.merge if lay else 1,
        "dispatcher": par.dispatcher if lay else "local",
        "placement": run_cfg.placement if lay else "local",
        "global_batch": run_cfg.micro_batch * run_cfg.grad_accum * par.world,
        "seed": run_cfg.seed,
        "model": dataclasses.asdict(model_cfg),
        "train": run_cfg.to_dict(),
    }


def check_compatible(meta: dict[str, Any], now: dict[str, Any]) -> None:
    """ValueError unless a checkpoint's run and this one train the same model on the same data
    stream: the model, the global batch and the seed must match (the layout may change)."""
    for key, what in (("model", "model"), ("global_batch", "--global-batch"), ("seed", "--seed")):
        if meta.get(key) != now.get(key):
            if key == "model":
                diff = [k for k in now["model"] if (meta.get("model") or {}).get(k) != now["model"][k]]
                raise ValueError(
                    f"the checkpoint holds another model (differs in {', '.join(diff)}); resume with the "
                    "same model options, or train into a fresh --out"
                )
            raise ValueError(
                f"the checkpoint was written with {what} {meta.get(key)!r} but this run has "
                f"{now.get(key)!r}; the data stream would change: resume with the same {what}"
            )


def build_run(
    cfg: TrainConfig, model_cfg: ModelConfig, par: ParallelState, data: TokenData, *, peak_flops: float | None
) -> Run:
    """Model, placements and groups, optimizer; restored from out/checkpoints when cfg.resume."""
    folder = ckpt.latest_checkpoint(Path(cfg.out)) if cfg.resume else None
    meta = ckpt.read_meta(folder) if folder is not None else None
    if meta is not None:
        check_compatible(meta, run_meta(cfg, model_cfg, par))
    precision = resolve_precision(cfg.precision, par.device)
    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    flops_per_token = model.flops_per_token()
    for p in model.parameters():  # the masters' dtype (experts and dense alike)
        p.data = p.data.to(precision.master)
    if par.distributed:
        if model_cfg.num_moe_layers == 0:
            raise ValueError("a distributed run needs at least one MoE layer (num_dense_layers < num_layers)")
        placements = _placements(cfg, par, model_cfg, meta)
        par.groups = build_groups(par.layout, placements, par.rank)  # collective (world)
        parallelize_model(
            model,
            par.groups,
            par.dispatcher,
            cost_model=cfg.cost_model,
            compute_dtype=precision.compute,
            gather=cfg.expert_gather,
            device=par.device,
        )
    else:
        for layer in model.moe_layers():
            layer.experts.compute_dtype = precision.compute
    if dist.is_initialized():
        mesh = init_device_mesh(par.device.type, (par.world,))
        casts = precision.casts
        shard_dense(
            model,
            mesh,
            param_dtype=precision.compute if casts else None,
            reduce_dtype=precision.reduce if casts else None,
        )
    apply_activation_checkpointing(model, cfg.ac)  # type: ignore[arg-type]
    materialize(model, par.device, cfg.seed)
    if cfg.hf and folder is None:
        _load_hf(model, cfg, model_cfg, par)
    if par.device.type == "cuda" and cfg.compile:
        model.fuse_pointwise()
    optimizer = make_optimizer(model, cfg)
    spec = BatchSpec(model_cfg.seq_len, cfg.micro_batch, cfg.grad_accum, par.world)
    replacer = _replacer(cfg, par, model)
    run = Run(
        cfg, model_cfg, par, model, optimizer, data, spec, replacer, 0, flops_per_token, peak_flops, precision
    )
    if folder is not None:
        _restore(run, folder, meta)
    return run


def _placements(
    cfg: TrainConfig, par: ParallelState, model_cfg: ModelConfig, meta: dict | None
) -> list[Placement]:
    """The checkpoint's placements when they fit this layout (adaptive replacement may have
    changed them), else fresh ones."""
    num = model_cfg.num_moe_layers
    saved = (meta or {}).get("placements")
    if saved and par.dispatcher == "microep" and meta.get("dispatcher") == "microep":
        loaded = [Placement.from_slots(np.array(s), model_cfg.num_experts) for s in saved]
        if all(p.num_gpus == par.layout.microep_size for p in loaded):
            return loaded
    return [build_placement(cfg, par.layout, model_cfg.num_experts, i) for i in range(num)]


def _replacer(cfg: TrainConfig, par: ParallelState, model: MoETransformer) -> Replacer:
    # the dispatchers' resolved cost model also scores placements for adaptive replacement
    moe = model.moe_layers()
    cost = getattr(moe[0].dispatcher, "cost_model", None) if moe and cfg.cost_model else None
    return build_replacement(
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


def _load_hf(model: MoETransformer, cfg: TrainConfig, model_cfg: ModelConfig, par: ParallelState) -> None:
    """The --hf folder's weights into this rank's part of the model: every dense tensor (its shard
    kept) and the owned experts only, one tensor at a time."""
    source = hf_source(cfg.hf, num_layers=model_cfg.num_layers, seq_len=model_cfg.seq_len)
    copied = ckpt.fill_model(model, source.tensor, set(source.names()))
    source.files.close()
    if par.rank == 0:
        log.info("loaded %s: %d tensors on rank 0 (its experts and the dense weights)", cfg.hf, copied)


def hf_meta(cfg: TrainConfig) -> dict[str, Any] | None:
    """The source folder and its config.json, for `micromoe export`."""
    if not cfg.hf:
        return None
    return {"path": str(Path(cfg.hf).resolve()), "config": read_config(Path(cfg.hf))}


def _writer(par: ParallelState) -> bool:
    """Whether this rank writes experts and replicated tensors: the first MicroEP group (each
    expert has one owner there), or rank 0 without expert parallelism."""
    return par.rank < (par.layout.microep_size if par.layout is not None else 1)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save(run: Run, step: int) -> Path:
    """Checkpoint after `step` optimizer steps (collective: every rank calls it)."""
    par = run.parallel
    meta = {
        **run_meta(run.cfg, run.model_cfg, par),
        "placements": par.placements(),
        "optimizer_step": ckpt.optimizer_step(run.optimizer),
        "precision": run.precision.describe(),
        "data": {"seed": run.data.seed, "next_step": step},
        "data_fingerprint": run.data.fingerprint,
        "hf": hf_meta(run.cfg),
    }
    if hasattr(run.replacer, "state_dict"):
        meta["replacement"] = run.replacer.state_dict()
    state = ckpt.logical_state(run.model, run.optimizer, writer=_writer(par), for_save=True)
    folder = ckpt.save_checkpoint(
        Path(run.cfg.out),
        step,
        meta,
        state,
        rng_state(par.device),
        rank=par.rank,
        distributed=dist.is_initialized(),
        keep=run.cfg.keep,
    )
    if par.rank == 0:
        log.info("checkpoint saved: %s", folder)
    return folder


def _restore(run: Run, folder: Path, meta: dict[str, Any]) -> None:
    par = run.parallel
    state = ckpt.logical_state(run.model, run.optimizer, writer=_writer(par), for_save=False)
    ckpt.load_checkpoint(folder, state, distributed=dist.is_initialized())
    ckpt.set_optimizer_step(run.optimizer, int(meta.get("optimizer_step", meta["step"])))
    same_layout = all(
        meta.get(k) == v for k, v in run_meta(run.cfg, run.model_cfg, par).items() if k != "train"
    )
    rng = ckpt.read_rng(folder, par.rank) if same_layout else None
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and par.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], par.device)
    restored = [g.placement.slot_expert.tolist() for g in par.groups] == meta.get("placements")
    if "replacement" in meta and hasattr(run.replacer, "load_state_dict") and restored:
        run.replacer.load_state_dict(meta["replacement"])
    run.start_step = int(meta["step"])
    if par.rank == 0:
        how = (
            ""
            if same_layout
            else f" (resharded from {meta['world']} ranks, EP {meta['ep']}, d {meta['merge']})"
        )
        log.info("resumed from %s at step %d%s", folder, run.start_step, how)
