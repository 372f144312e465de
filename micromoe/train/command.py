"""`micromoe train`: train a MoE transformer with plain EP or MicroEP.

Launch modes:
- under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): NCCL with one GPU per rank when CUDA is
  available, gloo otherwise; multi-node through torchrun's rendezvous;
- `--nproc N` without a launcher: N gloo CPU processes started here (spawn, free local port);
- otherwise one process, no process group (the model keeps all experts locally).
Options resolve as defaults < preset < flags; the resolved config is logged by rank 0 and saved
to OUT/config.json and inside every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from micromoe.allocator import tune_allocator
from micromoe.model import PRESETS, ModelConfig, preset
from micromoe.model.hf import architecture, read_config
from micromoe.model.hf import model_config as hf_model_config
from micromoe.train import checkpoint as ckpt
from micromoe.train.config import RUN_PRESETS, TrainConfig, resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train
from micromoe.train.memory import GIB, MemoryPlan, device_capacity, plan_memory
from micromoe.train.metrics import measure_bf16_peak
from micromoe.train.parallel import ParallelState, init_distributed, resolve_layout
from micromoe.train.precision import resolve_precision
from micromoe.train.report import summary_line, write_report
from micromoe.train.trainer import build_run, check_compatible, run_meta

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option defaults to None so that the preset's value shows through unless given; the
    defaults that --help shows come from TrainConfig and RUN_PRESETS (`_default`)."""
    _model_options(p.add_argument_group("model"))
    _data_options(p.add_argument_group("data"))
    _optimization_options(p.add_argument_group("optimization"))
    _run_options(p.add_argument_group("run control"))
    _parallel_options(p.add_argument_group("parallelism"))


def _show(value: object) -> str:
    """A default as --help shows it: switches as on/off, everything else as str()."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _default(name: str) -> str:
    """'(default: V)' for TrainConfig field `name` as `resolve` sets it when the flag is not given:
    TrainConfig's default unless a preset overrides it, then each value with its presets
    ('(default: 500 for tiny, 1000 for small)'). Written into help texts so that no default is
    copied by hand; None defaults are explained in words instead."""
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]
    by_value: dict[str, list[str]] = {}
    for preset_name, values in RUN_PRESETS.items():
        by_value.setdefault(_show(values.get(name, base)), []).append(preset_name)
    if len(by_value) == 1:
        return f"(default: {next(iter(by_value))})"
    return "(default: " + ", ".join(f"{v} for {'/'.join(ps)}" for v, ps in by_value.items()) + ")"


def _model_options(m: argparse._ArgumentGroup) -> None:
    m.add_argument(
        "--preset",
        default=TrainConfig.preset,
        choices=list(PRESETS),
        help="model shape and training defaults (default: %(default)s)",
    )
    m.add_argument(
        "--hf",
        metavar="DIR",
        help="start from a Hugging Face model folder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): its config, "
        "weights and tokenizer; --layers keeps the first N blocks",
    )
    m.add_argument("--layers", type=int, help="number of transformer blocks (override the preset)")
    m.add_argument("--seq-len", type=int, help="tokens per training sequence")
    m.add_argument("--hidden", type=int, help="model width")
    m.add_argument("--ffn-hidden", type=int, help="each expert's SwiGLU hidden size")
    m.add_argument("--heads", type=int, help="attention heads")
    m.add_argument("--experts", type=int, help="experts per MoE layer")
    m.add_argument("--top-k", type=int, help="experts per token")
    m.add_argument("--dense-layers", type=int, help="first blocks with a dense FFN instead of MoE")
    m.add_argument("--vocab-size", type=int, help="vocabulary (default: the preset's, at least the data's)")
    m.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share input and output embeddings",
    )
    m.add_argument("--aux-loss", type=float, help="load-balancing aux-loss coefficient (0 = off)")
    m.add_argument("--expert-bias-rate", type=float, help="aux-loss-free expert-bias update rate (0 = off)")


def _data_options(d: argparse._ArgumentGroup) -> None:
    d.add_argument(
        "--data",
        help="text file, folder of .txt/.md files, a token .bin (micromoe tokenize), or with --hf also .jsonl "
        "(tokenized with the model's tokenizer) (default: bundled tiny-shakespeare)",
    )
    d.add_argument(
        "--val-fraction",
        type=float,
        help=f"share of the tokens held out for validation {_default('val_fraction')}",
    )


def _optimization_options(o: argparse._ArgumentGroup) -> None:
    o.add_argument(
        "--micro-batch", type=int, help=f"sequences per micro-batch per rank {_default('micro_batch')}"
    )
    o.add_argument(
        "--grad-accum", type=int, help=f"micro-batches per rank and optimizer step {_default('grad_accum')}"
    )
    o.add_argument("--global-batch", type=int, help="sequences per optimizer step; sets --grad-accum")
    o.add_argument("--lr", type=float, help=f"peak AdamW learning rate {_default('lr')}")
    o.add_argument(
        "--min-lr", type=float, help=f"learning rate at the end of the cosine decay {_default('min_lr')}"
    )
    o.add_argument("--warmup-steps", type=int, help=f"linear warmup steps {_default('warmup_steps')}")
    o.add_argument("--lr-decay-steps", type=int, help="length of the cosine decay (default: --max-steps)")
    o.add_argument(
        "--grad-clip",
        type=float,
        help=f"clip the global gradient norm to this, 0 = off {_default('grad_clip')}",
    )
    o.add_argument(
        "--weight-decay", type=float, help=f"AdamW weight decay on matrices {_default('weight_decay')}"
    )


def _run_options(r: argparse._ArgumentGroup) -> None:
    r.add_argument("--max-steps", type=int, help=f"optimizer steps to train {_default('max_steps')}")
    r.add_argument(
        "--eval-interval",
        type=int,
        help=f"validation loss every N steps and at the end, 0 = never {_default('eval_interval')}",
    )
    r.add_argument(
        "--eval-batches", type=int, help=f"validation micro-batches per rank {_default('eval_batches')}"
    )
    r.add_argument("--seed", type=int, help=f"model init and data sampling seed {_default('seed')}")
    r.add_argument(
        "--out", help=f"output folder: log.jsonl, config.json, report, checkpoints {_default('out')}"
    )
    r.add_argument(
        "--precision",
        choices=["auto", "fp32", "mixed", "bf16"],
        help="mixed: fp32 master weights and AdamW state, bf16 compute; fp32: everything fp32; bf16: "
        f"weights and AdamW state in bf16 too; auto: mixed on a GPU, fp32 on a CPU {_default('precision')}",
    )
    r.add_argument(
        "--ac",
        choices=["none", "full", "moe"],
        help="activation checkpointing: recompute whole blocks (full) or only the MoE FFNs (moe) in the "
        f"backward, to fit longer sequences {_default('ac')}",
    )
    r.add_argument(
        "--expert-gather",
        choices=["micro", "step"],
        help="expert slot copies gathered from their owners for every micro-batch (micro: least memory), "
        f"or once per optimizer step and kept (step: less traffic with --grad-accum) {_default('expert_gather')}",
    )
    r.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"on GPU, fuse RoPE with torch.compile {_default('compile')}",
    )
    r.add_argument(
        "--ckpt-interval",
        type=int,
        help=f"checkpoint every N steps, 0 = only at the end {_default('ckpt_interval')}",
    )
    r.add_argument(
        "--keep", type=int, help=f"checkpoints kept, older ones deleted; 0 = all {_default('keep')}"
    )
    r.add_argument(
        "--save",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"write checkpoints {_default('save')}",
    )
    r.add_argument(
        "--resume", action="store_true", default=None, help="continue from OUT's newest checkpoint"
    )
    r.add_argument(
        "--record-routing",
        metavar="FILE",
        help="write per-micro-batch counts[src, e] (simulator's routing-log format)",
    )
    r.add_argument(
        "--log-interval",
        type=int,
        help=f"steps between progress lines when not on a terminal {_default('log_interval')}",
    )
    r.add_argument("--no-report", action="store_true", help="skip the Markdown/PNG report at the end")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-rank memory plan (weights, optimizer state, gathered slots, gradients, "
        "activations) and whether it fits, then exit (0: fits, 1: does not); starts no process",
    )
    r.add_argument(
        "--world-size", type=int, help="--dry-run: ranks to plan for (default: --nproc or the launcher's)"
    )
    r.add_argument(
        "--device-memory",
        type=float,
        metavar="GIB",
        help="--dry-run: memory per GPU in GiB (default: this machine's GPU, else its RAM per rank)",
    )
    r.add_argument(
        "--force", action="store_true", help="start even when the memory plan says the run does not fit"
    )


def _parallel_options(q: argparse._ArgumentGroup) -> None:
    q.add_argument("--nproc", type=int, help="start N gloo CPU processes (without torchrun)")
    q.add_argument("--dp", type=int, help="data-parallel degree (must equal the world size)")
    q.add_argument("--ep", type=int, help="expert-parallel degree (default: half the world)")
    q.add_argument(
        "--merge", type=int, help="MicroEP merge factor d: EP groups per MicroEP group (2 for microep)"
    )
    q.add_argument(
        "--dispatcher",
        choices=["ep", "microep"],
        help=f"plain EP or MicroEP token dispatch {_default('dispatcher')}",
    )
    q.add_argument(
        "--placement",
        choices=["symmetric", "random", "asymmetric"],
        help=f"initial MicroEP placement {_default('placement')}",
    )
    q.add_argument(
        "--replace-interval",
        type=int,
        help="adaptive replacement: optimizer steps between checks of the load forecast, 0 = off; the "
        f"--replace-* options below only act when it is on {_default('replace_interval')}",
    )
    q.add_argument(
        "--replace-threshold",
        type=float,
        help="adaptive replacement: a micro-batch is imbalanced, and a check re-places its layer, when the "
        "placement's score (T*/mean GPU load, or predicted time over the fair share with --cost-model) "
        f"exceeds this {_default('replace_threshold')}",
    )
    q.add_argument(
        "--replace-trigger-after",
        type=int,
        metavar="K",
        help="adaptive replacement: check a layer at once after K consecutive micro-batches whose realized "
        f"score exceeded --replace-threshold, without waiting for the interval {_default('replace_trigger_after')}",
    )
    q.add_argument(
        "--replace-cooldown",
        type=int,
        metavar="N",
        help="adaptive replacement hysteresis: no layer is re-placed again within N micro-batches of its "
        "last replacement, so loads that swing back and forth do not make it flap; 0 = off "
        f"{_default('replace_cooldown')}",
    )
    q.add_argument(
        "--replace-min-gain",
        type=float,
        help="adaptive replacement hysteresis: a new placement must lower the score by at least this "
        f"{_default('replace_min_gain')}",
    )
    q.add_argument(
        "--replace-warmup",
        type=int,
        metavar="N",
        help="adaptive replacement: micro-batches observed before the first load-aware placement "
        f"(a fresh run has no load history; a resumed run keeps its own) {_default('replace_warmup')}",
    )
    q.add_argument(
        "--replace-window",
        type=int,
        metavar="N",
        help="adaptive replacement: a check scores placements by their mean over the last N micro-batches "
        f"{_default('replace_window')}",
    )
    q.add_argument(
        "--cost-model",
        help="MicroEP plans for predicted GPU time: a bundled cost-model name, a JSON path, 'bundled' (this GPU and layer shape) or 'auto' (calibrated at start-up); also scores placements for --replace-interval",
    )
    q.add_argument(
        "--timeout", type=float, help=f"seconds before a stuck collective fails {_default('timeout')}"
    )


def resolve_configs(args: argparse.Namespace, world: int, vocab_min: int) -> tuple[TrainConfig, ModelConfig]:
    """TrainConfig and ModelConfig for `world` ranks; ValueError on any inconsistency."""
    flags = dict(vars(args))
    if flags.get("cost_model") is not None and flags.get("dispatcher") == "ep":
        raise ValueError("--cost-model plans MicroEP's replica split; --dispatcher ep has none: drop it")
    cfg = resolve(args.preset, flags)
    overrides = {field: flags.get(flag) for flag, field in MODEL_FLAGS.items()}
    model_cfg = _hf_model_config(args, overrides, vocab_min) if args.hf else preset(args.preset, **overrides)
    if model_cfg.vocab_size < vocab_min:
        if args.vocab_size is not None:
            raise ValueError(
                f"--vocab-size {args.vocab_size} is smaller than the data's {vocab_min} token ids"
            )
        model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_min)
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
    return cfg, model_cfg


def _hf_model_config(args: argparse.Namespace, overrides: dict[str, Any], vocab_min: int) -> ModelConfig:
    """The --hf folder's ModelConfig: --layers keeps the first N blocks, --seq-len, --aux-loss and
    --expert-bias-rate apply; flags that change the shape are refused (the weights fix it)."""
    shape = [
        f"--{flag.replace('_', '-')}"
        for flag, field in MODEL_FLAGS.items()
        if flag not in HF_FLAGS and overrides[field] is not None
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


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and os.environ.get("RANK") is not None:
        world = int(env_world)
        if args.nproc is not None and args.nproc != world:
            raise ValueError(f"--nproc {args.nproc} under a launcher with WORLD_SIZE={world}; drop --nproc")
        _preflight(args, world)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        _worker(local, rank, world, backend, args)
        return 0
    world = args.nproc or 1
    if world < 1:
        raise ValueError(f"--nproc must be >= 1, got {world}")
    _preflight(args, world)
    if world == 1:
        _worker(0, 0, 1, None, args)
        return 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    _spawn(world, args)
    return 0


def _memory_plan(
    args: argparse.Namespace, world: int, cfg: TrainConfig, model_cfg: ModelConfig, *, local_ranks: int
) -> MemoryPlan:
    """The plan for `world` ranks on `--device-memory` GiB per GPU (a GPU target) or this machine."""
    layout = resolve_layout(cfg, world) if world > 1 else None
    if args.device_memory is not None:
        if not args.device_memory > 0 or not math.isfinite(args.device_memory):
            raise ValueError(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
        capacity = int(args.device_memory * GIB)
        target, where = "cuda", f"GPUs of {args.device_memory:g} GiB"
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        capacity, where = device_capacity(device, local_ranks)
        target = device.type
    precision = resolve_precision(cfg.precision, torch.device(target))
    return plan_memory(
        model_cfg, cfg, precision, world=world, layout=layout, capacity=capacity, device=target, where=where
    )


def _dry_run(args: argparse.Namespace) -> int:
    """Print the memory plan of one rank for --world-size ranks; exit 0 if it fits, 1 if not."""
    launched = os.environ.get("WORLD_SIZE")
    world = args.world_size or args.nproc or (int(launched) if launched else 1)
    if world < 1:
        raise ValueError(f"--world-size must be >= 1, got {world}")
    _, vocab = load_tokens(args.data)
    cfg, model_cfg = resolve_configs(args, world, vocab)
    plan = _memory_plan(args, world, cfg, model_cfg, local_ranks=min(world, args.nproc or world))
    layout = resolve_layout(cfg, world) if world > 1 else None
    shape = f"EP {layout.ep}, d {layout.merge}" if layout is not None else "one process"
    print(
        f"memory plan: {args.preset}, {world} ranks ({shape}), micro-batch {cfg.micro_batch} x "
        f"{model_cfg.seq_len} tokens, --ac {cfg.ac}, --expert-gather {cfg.expert_gather}, "
        f"precision {plan.precision.name}"
    )
    print(plan.table())
    print(plan.verdict())
    return 0 if plan.fits else 1


def _spawn(world: int, args: argparse.Namespace) -> None:
    """Start `world` gloo processes and wait for them. A user mistake found by a worker (ValueError)
    ends the job as ValueError with that message (the lowest rank's), so the command prints one
    line and exits 2; any other failure keeps torch's report with the worker's traceback."""
    verbose = bool(getattr(args, "verbose", False))
    # torch logs a warning per process it terminates after a failure: noise next to the one line
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.NOTSET if verbose else logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="micromoe_train_") as errors:
        try:
            mp.start_processes(
                _spawned, args=(world, args, errors), nprocs=world, join=True, start_method="spawn"
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            found = sorted(Path(errors).glob("rank*.txt"), key=lambda f: int(f.stem[4:]))
            if not found:
                raise
            raise ValueError(found[0].read_text()) from None


def _preflight(args: argparse.Namespace, world: int) -> None:
    """Every check that can fail before processes start: configs, data, checkpoint compatibility."""
    if args.hf:  # an unsupported model is the first thing to say, before its tokenizer reads the data
        architecture(read_config(Path(args.hf)), f"{args.hf}/config.json")
    tokens, vocab = load_tokens(args.data, hf=args.hf)
    cfg, model_cfg = resolve_configs(args, world, vocab)
    TokenData(tokens, vocab, val_fraction=cfg.val_fraction).check(model_cfg.seq_len)
    local = world if args.nproc else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    plan = _memory_plan(args, world, cfg, model_cfg, local_ranks=local)
    if not plan.fits and not args.force:
        raise ValueError(f"the memory plan {plan.verdict()}; see `--dry-run`, or --force to start anyway")
    if cfg.resume:
        folder = ckpt.latest_checkpoint(Path(cfg.out))
        if folder is None:
            raise ValueError(f"--resume: no checkpoint under {cfg.out}/checkpoints")
        par = ParallelState(
            0, world, torch.device("cpu"), resolve_layout(cfg, world) if world > 1 else None, cfg.dispatcher
        )
        check_compatible(ckpt.check_checkpoint(folder), run_meta(cfg, model_cfg, par))


def _spawned(rank: int, world: int, args: argparse.Namespace, errors: str) -> None:
    """A spawned rank: a ValueError (a user mistake) is written to `errors`/rank<r>.txt for the
    parent, with the traceback on stderr only under -v, and ends the process with exit code 2."""
    try:
        _worker(rank, rank, world, "gloo", args, errors=errors)
    except ValueError as exc:
        _report_error(errors, rank, exc, args)
        sys.exit(2)  # SystemExit passes torch's wrapper, which reports other exceptions itself


def _report_error(errors: str, rank: int, exc: ValueError, args: argparse.Namespace) -> None:
    """Write `exc` for the parent once (the traceback to stderr only under -v)."""
    path = Path(errors, f"rank{rank}.txt")
    if path.exists():
        return
    if getattr(args, "verbose", False):
        traceback.print_exception(exc)
    path.write_text(str(exc))


def _worker(
    local_rank: int,
    rank: int,
    world: int,
    backend: str | None,
    args: argparse.Namespace,
    *,
    errors: str | None = None,
) -> None:
    """One rank: build, train, report (rank 0), then destroy the process group. With `errors` (a
    spawned rank) a ValueError is reported there before the group goes away, since the peers then
    fail too and the parent must find this message first."""
    if rank != 0 or not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True
        )
    tune_allocator()  # the planner runs every micro-batch: keep its arrays off fresh pages
    torch.set_num_threads(
        max(1, torch.get_num_threads() // max(1, world)) if backend == "gloo" else torch.get_num_threads()
    )
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend is None and torch.cuda.is_available():
        device = torch.device("cuda", 0)
    tokens, vocab = load_tokens(args.data, hf=args.hf)
    cfg, model_cfg = resolve_configs(args, world, vocab)
    if backend is not None:
        init_distributed(backend, rank, world, cfg.timeout)
    elif resolve_precision(cfg.precision, device).casts:  # one process: a one-rank group, so FSDP
        # applies the mixed precision to the dense weights as it does in a distributed run
        backend1 = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend1, store=dist.HashStore(), rank=0, world_size=1, **kw)
    try:
        layout = resolve_layout(cfg, world) if world > 1 else None
        par = ParallelState(rank, world, device, layout, cfg.dispatcher)
        out = Path(cfg.out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            resolved = {
                "train": cfg.to_dict(),
                "model": dataclasses.asdict(model_cfg),
                "world": world,
                "layout": str(layout),
                "precision": resolve_precision(cfg.precision, device).describe(),
            }
            (out / "config.json").write_text(json.dumps(resolved, indent=1))
            log.info("micromoe train: %s", json.dumps(resolved))
        peak = measure_bf16_peak(device) if device.type == "cuda" else None
        data = TokenData(tokens, vocab, val_fraction=cfg.val_fraction, seed=cfg.seed)
        run = build_run(cfg, model_cfg, par, data, peak_flops=peak)
        records = train(run)
        if rank == 0 and records:
            log.info(summary_line(records))
            if not args.no_report:
                log.info("report: %s", write_report(out))
    except ValueError as exc:
        if errors is not None:
            _report_error(errors, rank, exc, args)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
