"""Everything `micromoe train` checks before any process starts, each value named by its flag.

`prepare(args, world)` resolves the configuration (defaults < preset < flags, or a Hugging Face
folder's config with --hf), reads the data, and refuses in one line what cannot work: a model flag
out of range, a data source that is not a regular file or folder or too short, a cost model of
another layer shape, a run whose memory plan does not fit (`memory.py`; unless --force), a resume
from a damaged or incompatible checkpoint, on other data or with nothing left to train. The output
paths are checked by `outputs.py`. Workers then rebuild the same configuration and find nothing
left to refuse. `dry_run` prints the memory plan instead of training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromoe.model import ModelConfig, preset
from micromoe.model.hf import architecture, read_config
from micromoe.model.hf import model_config as hf_model_config
from micromoe.plan import cost as cost_models
from micromoe.runtime.cost_select import check_layer_shape, load_cost_spec
from micromoe.runtime.layout import ParallelLayout
from micromoe.train import checkpoint as ckpt
from micromoe.train.config import TrainConfig, check_real, resolve
from micromoe.train.data import TokenData, data_fingerprint, default_corpus, load_tokens
from micromoe.train.memory import GIB, MemoryPlan, device_capacity, plan_memory
from micromoe.train.outputs import CONFIG
from micromoe.train.parallel import ParallelState, build_placement, resolve_layout
from micromoe.train.precision import resolve_precision
from micromoe.train.trainer import check_compatible, run_meta

log = logging.getLogger("micromoe.train")

# flag -> ModelConfig field
MODEL_FLAGS = {
    "layers": "num_layers",
    "seq_len": "seq_len",
    "hidden": "hidden",
    "ffn_hidden": "ffn_hidden",
    "heads": "num_heads",
    "experts": "num_experts",
    "top_k": "top_k",
    "dense_layers": "num_dense_layers",
    "vocab_size": "vocab_size",
    "tie_embeddings": "tie_embeddings",
    "aux_loss": "aux_loss_coef",
    "expert_bias_rate": "expert_bias_rate",
}
HF_FLAGS = ("layers", "seq_len", "aux_loss", "expert_bias_rate")  # model flags that apply with --hf
_NON_NEGATIVE_MODEL_INTS = ("dense_layers",)
_MODEL_FLOATS = ("aux_loss", "expert_bias_rate")  # finite, >= 0
PATH_FLAGS = ("out", "data", "record_routing", "cost_model")


@dataclass(frozen=True)
class Prepared:
    """What the checks resolved: the configs, the token stream and its description."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    tokens: np.ndarray
    vocab: int
    data: dict[str, Any]  # source, tokens, vocab, fingerprint (saved in config.json)
    device_type: str  # where the ranks will train: "cuda" or "cpu"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_model_flags(args: argparse.Namespace) -> None:
    """ValueError naming the flag of the first model option out of range (None = not given)."""
    for name in MODEL_FLAGS:
        value = getattr(args, name, None)
        if value is None or name == "tie_embeddings":
            continue
        if name in _MODEL_FLOATS:
            check_real(value, flag(name), 0.0)
            continue
        low = 0 if name in _NON_NEGATIVE_MODEL_INTS else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "an integer >= 0" if low == 0 else "a positive integer"
            raise ValueError(f"{flag(name)} must be {kind}, got {value!r}")


def model_config(args: argparse.Namespace, vocab_min: int) -> ModelConfig:
    """The preset's shape (or the --hf folder's) with the model flags, checked against each other
    by flag name."""
    check_model_flags(args)
    overrides = {field: getattr(args, name, None) for name, field in MODEL_FLAGS.items()}
    if getattr(args, "hf", None):
        return _hf_model_config(args, overrides, vocab_min)
    shape = {
        **dataclasses.asdict(preset(args.preset)),
        **{k: v for k, v in overrides.items() if v is not None},
    }
    if shape["top_k"] > shape["num_experts"]:
        raise ValueError(f"--top-k {shape['top_k']} exceeds the {shape['num_experts']} experts (--experts)")
    if shape["num_dense_layers"] > shape["num_layers"]:
        raise ValueError(
            f"--dense-layers {shape['num_dense_layers']} exceeds the {shape['num_layers']} layers (--layers)"
        )
    if shape["head_dim"] is None and shape["hidden"] % shape["num_heads"]:
        raise ValueError(f"--hidden {shape['hidden']} is not a multiple of --heads {shape['num_heads']}")
    if shape["head_dim"] is None and (shape["hidden"] // shape["num_heads"]) % 2:
        raise ValueError(
            f"--hidden / --heads = {shape['hidden'] // shape['num_heads']} per head must be even (RoPE)"
        )
    model_cfg = preset(args.preset, **overrides)
    if model_cfg.vocab_size < vocab_min:
        if args.vocab_size is not None:
            raise ValueError(
                f"--vocab-size {args.vocab_size} is smaller than the data's {vocab_min} token ids"
            )
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_min)
    return model_cfg


def _hf_model_config(args: argparse.Namespace, overrides: dict[str, Any], vocab_min: int) -> ModelConfig:
    """The --hf folder's ModelConfig: --layers keeps the first N blocks, --seq-len, --aux-loss and
    --expert-bias-rate apply; flags that change the shape are refused (the weights fix it)."""
    shape = [
        flag(name)
        for name, field in MODEL_FLAGS.items()
        if name not in HF_FLAGS and overrides[field] is not None
    ]
    if shape:
        raise ValueError(f"--hf takes the model's shape from {args.hf}/config.json; drop {', '.join(shape)}")
    model_cfg = hf_model_config(
        read_config(Path(args.hf)),
        where=f"{args.hf}/config.json",
        num_layers=args.layers,
        seq_len=args.seq_len,
    )
    if vocab_min > model_cfg.vocab_size:
        raise ValueError(
            f"the data has token ids up to {vocab_min - 1}, beyond the --hf model's vocabulary of {model_cfg.vocab_size}"
        )
    training = {
        k: v for k, v in overrides.items() if k in ("aux_loss_coef", "expert_bias_rate") and v is not None
    }
    return dataclasses.replace(model_cfg, **training)


def resolve_configs(args: argparse.Namespace, world: int, vocab_min: int) -> tuple[TrainConfig, ModelConfig]:
    """TrainConfig and ModelConfig for `world` ranks; ValueError naming the flag of any problem."""
    flags = dict(vars(args))
    for name in PATH_FLAGS:  # "" would mean the current folder: never what was meant
        value = flags.get(name)
        if value is not None and not str(value).strip():
            raise ValueError(f"{flag(name)} is empty; give a path")
    if flags.get("cost_model") is not None and flags.get("dispatcher") == "ep":
        raise ValueError("--cost-model plans MicroEP's replica split; --dispatcher ep has none: drop it")
    for name in ("global_batch", "world_size"):
        value = getattr(args, name, None)
        if value is not None and (isinstance(value, bool) or value < 1):
            raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")
    cfg = resolve(args.preset, flags)
    model_cfg = model_config(args, vocab_min)
    if args.global_batch is not None:
        per_step = cfg.micro_batch * world
        if args.global_batch % per_step:
            raise ValueError(
                f"--global-batch {args.global_batch} is not a multiple of micro-batch x world = {per_step}"
            )
        if args.grad_accum is not None and args.grad_accum * per_step != args.global_batch:
            raise ValueError("--global-batch and --grad-accum disagree; give one of them")
        cfg = dataclasses.replace(cfg, grad_accum=args.global_batch // per_step)
    merge = resolve_layout(cfg, world).merge if world > 1 else 1  # validates EP / d / DP vs the world
    if args.placement is not None and merge == 1:
        raise ValueError(
            f"--placement {args.placement} shapes replicated MicroEP placements (d > 1), but this run has "
            "d = 1 (one copy of each expert); drop --placement or use --dispatcher microep with --merge 2"
        )
    if cfg.replace_interval and world == 1:
        raise ValueError("adaptive replacement (--replace-interval) needs a distributed run (--nproc >= 2)")
    if cfg.replace_interval and cfg.dispatcher != "microep":
        raise ValueError(
            f"adaptive replacement moves MicroEP replicas; --dispatcher is {cfg.dispatcher!r}: "
            "use --dispatcher microep or --replace-interval 0"
        )
    if world > 1:  # the experts must split evenly over the MicroEP group (and over its EP groups)
        layout = resolve_layout(cfg, world)
        try:
            build_placement(cfg, layout, model_cfg.num_experts, 0)
        except ValueError as exc:
            raise ValueError(f"--experts {model_cfg.num_experts} on {layout}: {exc}") from None
    if world > 1 and model_cfg.num_moe_layers == 0:
        raise ValueError(
            f"a distributed run needs at least one MoE layer: --dense-layers {model_cfg.num_dense_layers} "
            f"leaves none of the {model_cfg.num_layers} layers (--layers)"
        )
    return cfg, model_cfg


def training_device(launched: bool, world: int) -> str:
    """Where the ranks train: one GPU each under a launcher or alone when CUDA is there, else CPU
    (`--nproc` starts gloo CPU processes)."""
    return "cuda" if torch.cuda.is_available() and (launched or world == 1) else "cpu"


def prepare(args: argparse.Namespace, world: int, *, launched: bool) -> Prepared:
    """Every check that can fail before processes start (module docstring)."""
    if args.data is not None and not str(args.data).strip():
        raise ValueError("--data is empty; give a path")
    if args.hf:  # an unsupported model is the first thing to say, before its tokenizer reads the data
        architecture(read_config(Path(args.hf)), f"{args.hf}/config.json")
    try:
        tokens, vocab = load_tokens(args.data, hf=args.hf)
    except ValueError as exc:
        raise ValueError(f"--data: {exc}") from None
    cfg, model_cfg = resolve_configs(args, world, vocab)
    TokenData(tokens, vocab, val_fraction=cfg.val_fraction).check(model_cfg.seq_len)
    device_type = training_device(launched, world)
    layout = resolve_layout(cfg, world) if world > 1 else None
    check_cost_model_flag(cfg, model_cfg, device_type)
    plan = memory_plan(args, world, cfg, model_cfg, device=torch.device(device_type), launched=launched)
    if not plan.fits and not args.force:
        raise ValueError(f"the memory plan {plan.verdict()}; see --dry-run, or --force to start anyway")
    source = str(args.data) if args.data is not None else f"bundled {default_corpus().name}"
    data = {
        "source": source,
        "tokens": int(tokens.size),
        "vocab": vocab,
        "fingerprint": data_fingerprint(tokens),
    }
    if cfg.resume:
        check_resume(
            cfg, model_cfg, layout, data, allow_data_change=bool(getattr(args, "allow_data_change", False))
        )
    return Prepared(cfg, model_cfg, tokens, vocab, data, device_type)


def check_cost_model_flag(cfg: TrainConfig, model_cfg: ModelConfig, device_type: str) -> None:
    """--cost-model: a file or bundled name must load and match the MoE layer's shape; 'bundled'
    needs a GPU with a shipped model of this shape ('auto' is measured later, on the ranks)."""
    spec = cfg.cost_model
    if spec is None or spec == "auto":
        return
    hidden, ffn = model_cfg.hidden, model_cfg.ffn_hidden
    if spec == "bundled":
        if device_type != "cuda":
            raise ValueError("--cost-model bundled picks the shipped model of this GPU; this run has no GPU")
        name = cost_models.bundled_name(torch.cuda.get_device_name(0), hidden, ffn)
        if name not in cost_models.bundled_models():
            raise ValueError(
                f"--cost-model bundled: no shipped model {name!r} for this GPU and shape; use "
                "--cost-model auto or a file from `micromoe calibrate`"
            )
        return
    try:
        check_layer_shape(load_cost_spec(spec), hidden=hidden, ffn=ffn, spec=spec)
    except ValueError as exc:
        raise ValueError(f"--cost-model: {exc}") from None


def check_resume(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    layout: ParallelLayout | None,
    data: dict[str, Any],
    *,
    allow_data_change: bool,
) -> int:
    """The step the run resumes from; ValueError if there is no checkpoint, it does not fit this
    run, --max-steps is not above its step, or the data differ (unless `allow_data_change`)."""
    out = Path(cfg.out)
    folder = ckpt.latest_checkpoint(out)
    if folder is None:
        raise ValueError(f"--resume: no checkpoint under {cfg.out}/checkpoints")
    meta = ckpt.check_checkpoint(folder)  # meta.json and every file's header, before any process
    world = layout.world_size if layout is not None else 1
    par = ParallelState(0, world, torch.device("cpu"), layout, cfg.dispatcher)
    check_compatible(meta, run_meta(cfg, model_cfg, par))
    step = int(meta["step"])
    if cfg.max_steps <= step:
        raise ValueError(
            f"--resume: the newest checkpoint in {cfg.out} is at step {step}, and --max-steps "
            f"{cfg.max_steps} is not above it, so there is nothing to train; pass --max-steps > {step}"
        )
    saved = meta.get("data_fingerprint") or _config_fingerprint(out)
    if saved is None:
        log.warning("--resume: %s records no data fingerprint; the data cannot be compared", out)
    elif saved != data["fingerprint"] and not allow_data_change:
        raise ValueError(
            f"--resume: the data ({data['source']}, {data['tokens']} tokens, fingerprint "
            f"{data['fingerprint']}) is not what the run in {cfg.out} trained on (fingerprint {saved}); "
            "pass the original --data, or --allow-data-change to go on with this data"
        )
    return step


def _config_fingerprint(out: Path) -> str | None:
    """The data fingerprint in OUT/config.json (None if the file or the key is missing)."""
    try:
        config = json.loads((out / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    value = config.get("data", {}).get("fingerprint") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def memory_plan(
    args: argparse.Namespace,
    world: int,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    *,
    device: torch.device,
    launched: bool = False,
) -> MemoryPlan:
    """One rank's memory plan for `world` ranks on `device`: GPUs of --device-memory GiB when
    given, else this machine's GPU (or its RAM shared by the ranks it runs)."""
    layout = resolve_layout(cfg, world) if world > 1 else None
    if args.device_memory is not None:
        check_real(args.device_memory, "--device-memory", 0.0, low_open=True)
        capacity, where = int(args.device_memory * GIB), f"GPUs of {args.device_memory:g} GiB"
        device = torch.device("cuda")
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if launched else world
        probe = torch.device("cuda", 0) if device.type == "cuda" else device
        capacity, where = device_capacity(probe, local)
    precision = resolve_precision(cfg.precision, device)
    return plan_memory(
        model_cfg,
        cfg,
        precision,
        world=world,
        layout=layout,
        capacity=capacity,
        device=device.type,
        where=where,
    )


def dry_run(args: argparse.Namespace, launched: bool) -> int:
    """Print the memory plan of one rank for --world-size ranks; 0 if it fits, 1 if not."""
    launch_world = int(os.environ["WORLD_SIZE"]) if launched else None
    world = args.world_size or args.nproc or launch_world or 1
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world!r}")
    if args.hf:
        architecture(read_config(Path(args.hf)), f"{args.hf}/config.json")
    vocab = load_tokens(args.data, hf=args.hf)[1] if args.data is not None else 256
    cfg, model_cfg = resolve_configs(args, world, vocab)
    plan = memory_plan(args, world, cfg, model_cfg, device=torch.device(training_device(True, world)))
    layout = resolve_layout(cfg, world) if world > 1 else None
    shape = f"EP {layout.ep}, d {layout.merge}" if layout is not None else "one process"
    name = args.hf or args.preset
    print(
        f"memory plan: {name}, {world} ranks ({shape}), micro-batch {cfg.micro_batch} x "
        f"{model_cfg.seq_len} tokens, --ac {cfg.ac}, --expert-gather {cfg.expert_gather}, "
        f"precision {plan.precision.name}"
    )
    print(plan.table())
    print(plan.verdict())
    return 0 if plan.fits else 1
