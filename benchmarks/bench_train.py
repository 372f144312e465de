"""Training throughput and balance of plain EP, MicroEP and MicroEP with adaptive replacement.

Runs the trainer's own model, optimizer and step (`micromoe.train.loop.train_step`: forward and
backward of every micro-batch, gradient sync, AdamW, the replacement hook) for each variant, with
natural routing and with routing forced to Zipf(s) (the same hot experts on every GPU; the gates
still come from the router, so gradients flow). Variants on W GPUs, named like bench_layer's:
  epW         plain EP over all W GPUs;
  ep(W/2)     plain EP over half the GPUs, DP = 2 (MicroEP's expert memory per GPU);
  microep     EP = W/2, d = 2, symmetric placement;
  microep-ar  the same with adaptive replacement every --ar-interval steps;
  uniform     ep(W/2) with exactly balanced forced routing: the bound.
On one process only the single-rank variants apply (`ep1`, `uniform`); the others are listed
under "skipped". Per row: tokens/s (global tokens per step / median over timed steps of the
slowest rank's step time) and max/mean GPU load of the executed plans (mean over MoE layers,
micro-batches, timed steps and ranks).

    # 4 GPUs
    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --standalone --nproc_per_node=4 benchmarks/bench_train.py
    # one GPU, or a CPU smoke test with 4 gloo processes
    PYTHONPATH=. python benchmarks/bench_train.py
    PYTHONPATH=. python benchmarks/bench_train.py --nproc 4 --preset tiny --layers 2 --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _env  # benchmarks/ (this script's folder) is on sys.path
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from micromoe.allocator import tune_allocator
from micromoe.model import preset
from micromoe.train.config import TrainConfig
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train_step
from micromoe.train.metrics import StepMeter
from micromoe.train.parallel import ParallelState, resolve_layout
from micromoe.train.trainer import build_run


@dataclass(frozen=True)
class Variant:
    name: str
    ep: int
    merge: int
    dispatcher: str
    replace: bool = False
    balanced: bool = False  # exactly balanced forced routing (the bound); runs once


def make_variants(world: int) -> tuple[tuple[Variant, ...], list[str]]:
    """(variants that apply to `world` ranks, why the others were skipped)."""
    if world == 1:
        skipped = ["microep, microep-ar and ep(W/2): need at least 2 ranks"]
        return (Variant("ep1", 1, 1, "ep"), Variant("uniform", 1, 1, "ep", balanced=True)), skipped
    full = Variant(f"ep{world}", world, 1, "ep")
    if world % 2:
        skipped = [f"ep(W/2), microep, microep-ar, uniform: need an even world size, got {world}"]
        return (full,), skipped
    half = world // 2
    return (
        full,
        Variant(f"ep{half}", half, 1, "ep"),
        Variant("microep", half, 2, "microep"),
        Variant("microep-ar", half, 2, "microep", replace=True),
        Variant("uniform", half, 1, "ep", balanced=True),
    ), []


# ------------------------------------------------------------------------------------------------
# forced routing


class ForcedRouting:
    """A forward pre-hook for a router: replaces its top-k selection by a fixed pool of draws.

    Draws are made once per token count on the router's device (not timed) and cycled, so the
    timed steps spend nothing on sampling. `skew=None` with `balanced=True` gives every expert
    exactly T*K/E rows on every rank (T*K a multiple of E).
    """

    def __init__(self, num_experts: int, top_k: int, skew: float | None, seed: int, *, pool: int = 4) -> None:
        self.num_experts, self.top_k, self.skew, self.seed, self.pool = num_experts, top_k, skew, seed, pool
        self._draws: dict[int, list[torch.Tensor]] = {}
        self._calls = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        t = x.shape[0]
        if t not in self._draws:
            self._draws[t] = [self._draw(t, i, x.device) for i in range(self.pool)]
        draws = self._draws[t]
        self._calls += 1
        return (x, draws[self._calls % len(draws)])

    def _draw(self, t: int, i: int, device: torch.device) -> torch.Tensor:
        e, k = self.num_experts, self.top_k
        if self.skew is None:  # balanced: token t takes experts (t*K + j + shift) mod E
            rows = torch.arange(t)[:, None] * k + torch.arange(k) + self.seed + i
            return (rows % e).to(device)
        gen = torch.Generator().manual_seed(self.seed * 1009 + i)
        p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64) ** self.skew
        return torch.multinomial(p.expand(t, -1), k, replacement=False, generator=gen).to(device)


def force_routing(model: torch.nn.Module, skew: float | None, rank: int) -> list[Any]:
    """Install forced routing on every MoE layer's router; returns the hook handles."""
    handles = []
    for i, layer in enumerate(model.moe_layers()):
        hook = ForcedRouting(layer.cfg.num_experts, layer.cfg.top_k, skew, seed=100 * rank + i)
        handles.append(layer.router.register_forward_pre_hook(hook))
    return handles


# ------------------------------------------------------------------------------------------------
# one row


def run_row(
    v: Variant, skew: float | None, args: argparse.Namespace, rank: int, world: int, device: torch.device
) -> dict[str, Any]:
    """Build a fresh run for variant `v`, train warmup + timed steps, return the row (every rank)."""
    cfg = train_config(v, args)
    model_cfg = model_config(args)
    layout = resolve_layout(cfg, world) if world > 1 else None
    par = ParallelState(rank, world, device, layout, cfg.dispatcher)
    tokens, vocab = load_tokens(args.data)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=max(model_cfg.vocab_size, vocab))
    data = TokenData(tokens, model_cfg.vocab_size, seed=cfg.seed)
    run = build_run(cfg, model_cfg, par, data, peak_flops=None)  # collective (world): groups
    if v.balanced or skew is not None:
        force_routing(run.model, None if v.balanced else skew, rank)
    step_s, balance, events = [], [], []
    for step in range(args.warmup + args.steps):
        meter = StepMeter(len(run.model.moe_layers()), par.ep_size)
        _sync(device)
        t0 = time.perf_counter()
        rec = train_step(run, step, meter, None)  # collectives inside (gradients, loss, hook)
        _sync(device)
        if step >= args.warmup:
            step_s.append(time.perf_counter() - t0)
            balance.append(meter.record()["max_mean_load"])
        events += rec.get("replacements", [])
    step_s = _reduce(step_s, world, device, "max")  # the slowest rank per step
    balance = _reduce(balance, world, device, "mean")  # every MicroEP group counts once per rank
    tokens_per_step = run.spec.global_batch * run.spec.seq_len
    row = {
        "variant": v.name,
        "skew": None if (skew is None and not v.balanced) else (0.0 if v.balanced else skew),
        "routing": "balanced" if v.balanced else ("natural" if skew is None else "zipf"),
        "tokens_per_s": tokens_per_step / float(np.median(step_s)),
        "max_mean_load": float(np.mean(balance)),
        "step_ms_median": 1e3 * float(np.median(step_s)),
        "step_ms_p90": 1e3 * float(np.quantile(step_s, 0.9)),
    }
    if v.replace:
        row["replacements"] = len(events)
        # each rank times its own part of a migration: record the slowest rank's, like the step time
        row["migration_ms"] = _reduce([float(sum(e["ms"] for e in events))], world, device, "max")[0]
        row["migration_bytes"] = int(sum(e["bytes_moved"] for e in events))  # 0: owners keep the state
    release_groups(run)
    return row


def release_groups(run: Any) -> None:
    """Destroy the process groups this row created (every variant builds its own; NCCL would keep
    a communicator for each used one). Collective (world): a barrier first."""
    if not run.parallel.distributed:
        return
    found: dict[int, dist.ProcessGroup] = {}
    for groups in run.parallel.groups:
        for g in (groups.dp, groups.microep, groups.gather, groups.expert_dp):
            if g is not None:
                found[id(g)] = g
    dist.barrier()  # collective (world): nobody still uses them
    for g in found.values():
        dist.destroy_process_group(g)


def train_config(v: Variant, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        preset=args.preset,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        max_steps=args.warmup + args.steps,
        warmup_steps=1,
        eval_interval=0,
        save=False,
        out=tempfile.gettempdir(),
        dispatcher=v.dispatcher,
        ep=v.ep,
        merge=v.merge,
        placement="symmetric",
        replace_interval=args.ar_interval if v.replace else 0,
        replace_threshold=args.ar_threshold,
        precision="auto",
    )


def model_config(args: argparse.Namespace):
    return preset(args.preset, num_layers=args.layers, seq_len=args.seq_len)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: step boundaries for the wall clock


def _reduce(values: list[float], world: int, device: torch.device, op: str) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # collective (world)
    else:
        dist.all_reduce(t)  # collective (world)
        t /= world
    return t.cpu().tolist()


# ------------------------------------------------------------------------------------------------
# the whole benchmark


def bench(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every variant x routing on this rank (collective); returns the result dict (all ranks)."""
    variants, skipped = make_variants(world)
    rows, t_start = [], time.perf_counter()
    for v in variants:
        routings: list[float | None] = [None] if v.balanced else [None, *args.skews]
        for s in routings:
            elapsed = _reduce([time.perf_counter() - t_start], world, device, "max")[0]
            if args.max_seconds and elapsed > args.max_seconds:
                skipped.append(f"{v.name} skew={s}: --max-seconds {args.max_seconds} reached")
                continue
            rows.append(run_row(v, s, args, rank, world, device))
            if rank == 0:
                r = rows[-1]
                print(
                    f"  {r['variant']:10} {r['routing']:8} skew={r['skew']}: {r['tokens_per_s']:,.0f} tok/s, "
                    f"max/mean {r['max_mean_load']:.3f}",
                    flush=True,
                )
    cfg = model_config(args)
    return {
        "gpu": _env.device_name(device),
        "versions": {
            **_env.versions("torch", "cuda", "python", "numpy"),
            "micromoe_commit": _env.git_commit(),
        },
        "config": {
            "world_size": world,
            "backend": dist.get_backend() if world > 1 else "none",
            "preset": args.preset,
            "model": dataclasses.asdict(cfg),
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "skews": list(args.skews),
            "ar_interval": args.ar_interval,
            "ar_threshold": args.ar_threshold,
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
            "tokens_per_s": "global tokens per step / median over timed steps of the slowest rank's step",
            "max_mean_load": "executed plans' max/mean GPU load in each MicroEP (or EP) group, mean over "
            "MoE layers, micro-batches, timed steps and ranks",
            "skipped": skipped,
        },
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['gpu']} x{result['config']['world_size']}, preset {result['config']['preset']}")
    print(f"{'variant':11} {'routing':9} {'skew':>5} {'tokens/s':>12} {'max/mean':>9} {'step ms':>9}")
    for r in result["rows"]:
        skew = "-" if r["skew"] is None else f"{r['skew']:.1f}"
        print(
            f"{r['variant']:11} {r['routing']:9} {skew:>5} {r['tokens_per_s']:12,.0f} "
            f"{r['max_mean_load']:9.3f} {r['step_ms_median']:9.2f}"
        )
    for s in result["config"]["skipped"]:
        print("skipped:", s)


def write_result(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--preset", default="small", help="model preset (small on GPU, tiny for a CPU smoke test)"
    )
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--seq-len", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per rank and micro-batch")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row")
    ap.add_argument("--skews", type=float, nargs="*", default=[0.5, 1.0, 1.5], help="forced Zipf skews s")
    ap.add_argument("--ar-interval", type=int, default=2, help="microep-ar: steps between replacement checks")
    ap.add_argument("--ar-threshold", type=float, default=1.02, help="microep-ar: replacement threshold")
    ap.add_argument("--max-seconds", type=float, default=None, help="skip the remaining rows after this long")
    ap.add_argument("--data", default=None, help="training text/.bin (default: bundled tiny-shakespeare)")
    ap.add_argument("--nproc", type=int, default=1, help="without a launcher: start N gloo CPU processes")
    ap.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/train_bench_{W}x{device}.json"
    )
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error(f"need --warmup >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    return args


def worker(rank: int, world: int, args: argparse.Namespace, backend: str | None, local_rank: int = 0) -> dict:
    """One rank: set up, run every row, write the JSON on rank 0, tear down."""
    tune_allocator()
    device = torch.device("cpu")
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend is not None and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    result = bench(rank, world, args, device)
    if rank == 0:
        kind = "H200" if "H200" in result["gpu"] else device.type
        write_result(result, args.out or Path(f"benchmarks/results/train_bench_{world}x{kind}.json"))
    return result


def _spawned(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    try:
        worker(rank, world, args, "gloo")
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local = int(os.environ.get("LOCAL_RANK", 0))
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, backend, local)
        dist.destroy_process_group()
    elif args.nproc > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        mp.start_processes(
            _spawned, args=(args.nproc, args), nprocs=args.nproc, join=True, start_method="spawn"
        )
    else:
        worker(0, 1, args, None)


if __name__ == "__main__":
    main()
