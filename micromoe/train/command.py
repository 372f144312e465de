"""`micromoe train`: train a MoE transformer with plain EP or MicroEP.

Launch modes:
- under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): NCCL with one GPU per rank when CUDA is
  available, gloo otherwise; multi-node through torchrun's rendezvous;
- `--nproc N` without a launcher: N gloo CPU processes started here (spawn, free local port);
- otherwise one process, no process group (the model keeps all experts locally).
Options resolve as defaults < preset < flags. Before any process starts, every value and path is
checked (`preflight.py`, `outputs.py`) and OUT is locked for this run; the resolved config goes to
OUT/config.json (and into every checkpoint), a short summary to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path

import torch

from micromoe.model import PRESETS
from micromoe.runtime.timeouts import CollectiveTimeout
from micromoe.runtime.warmup import warm_up_kernels
from micromoe.train.config import RUN_PRESETS, TrainConfig
from micromoe.train.launch import run_rank, spawn
from micromoe.train.outputs import RunLock, check_run_outputs, clear_run
from micromoe.train.preflight import Prepared, dry_run, prepare


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
        "(default: bundled tiny-shakespeare)",
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
        "--overwrite",
        action="store_true",
        help="replace the run in OUT (its log, config, report and checkpoints) and an existing "
        "--record-routing file; without it a run refuses an OUT that holds another run",
    )
    r.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: go on although --data differs from the data the run trained on",
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
        help="GiB per GPU for the memory plan (default: this machine's GPU, else its RAM per rank); "
        "--dry-run plans for GPUs of this size",
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


def run(args: argparse.Namespace) -> int:
    """Check everything, lock OUT, then train in this process, in spawned ranks or as one rank
    of a torchrun job."""
    launched = os.environ.get("WORLD_SIZE") is not None and os.environ.get("RANK") is not None
    if args.dry_run:
        return dry_run(args, launched)
    world = _world_size(args, launched)
    prep = prepare(args, world, launched=launched)
    rank = int(os.environ["RANK"]) if launched else 0
    lock = _claim_outputs(args, prep) if rank == 0 else None
    try:
        if launched:
            _run_launched(rank, world, args)
            return 0
        # once here for every rank (they then load the kernels from numba's cache)
        compiled_s = warm_up_kernels(timed=prep.cfg.cost_model is not None, announce=True)
        if world == 1:
            run_rank(0, 0, 1, None, args, compiled_s=compiled_s)
            return 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        assert lock is not None
        lock.share()  # the spawned ranks join it
        spawn(world, args, Path(prep.cfg.out), compiled_s=compiled_s)
        return 0
    finally:
        if lock is not None:
            lock.release()


def _world_size(args: argparse.Namespace, launched: bool) -> int:
    if args.nproc is not None and (isinstance(args.nproc, bool) or args.nproc < 1):
        raise ValueError(f"--nproc must be a positive integer, got {args.nproc!r}")
    if not launched:
        return args.nproc or 1
    world = int(os.environ["WORLD_SIZE"])
    if args.nproc is not None and args.nproc != world:
        raise ValueError(f"--nproc {args.nproc} under a launcher with WORLD_SIZE={world}; drop --nproc")
    return world


def _claim_outputs(args: argparse.Namespace, prep: Prepared) -> RunLock:
    """Check every output path, lock OUT, check again under the lock (another run may have
    started meanwhile), and clear the old run for --overwrite."""
    cfg = prep.cfg
    inputs = {"--data": Path(args.data) if args.data else None}
    inputs["--cost-model"] = Path(cfg.cost_model) if cfg.cost_model else None
    options = {
        "routing": Path(cfg.record_routing) if cfg.record_routing else None,
        "resume": cfg.resume,
        "overwrite": args.overwrite,
        "inputs": inputs,
    }
    check_run_outputs(Path(cfg.out), **options)
    lock = RunLock.claim(Path(cfg.out))
    try:
        check_run_outputs(Path(cfg.out), **options)
        if args.overwrite:
            clear_run(Path(cfg.out))
    except BaseException:
        lock.release()
        raise
    return lock


def _run_launched(rank: int, world: int, args: argparse.Namespace) -> None:
    """One rank of a torchrun job; a stalled peer ends it with one line and no clean shutdown."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        run_rank(int(os.environ.get("LOCAL_RANK", 0)), rank, world, backend, args, compiled_s=None)
    except CollectiveTimeout as exc:
        print(f"micromoe train: error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # a peer is gone: destroying the process group could wait for it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
