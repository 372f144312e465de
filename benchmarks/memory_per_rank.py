"""What each rank holds after one training step (gloo, CPU processes), against the slot design
(every replica slot a full copy with its own AdamW moments, every rank all dense weights) and
against the memory plan.

    PYTHONPATH=. python benchmarks/memory_per_rank.py --nproc 4 --json benchmarks/results/memory_4xcpu_gloo.json

Per rank: bytes of expert master weights, expert AdamW state, dense master weights (FSDP shard),
dense AdamW state; the slot design's bytes for the same layout (S = E*d/G slots per layer); the
plan's "master weights" and "optimizer state" items (`micromoe.train.memory`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import _env  # benchmarks/ is on sys.path
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def measure(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    from micromoe.model import preset
    from micromoe.model.parallel import expert_parameters
    from micromoe.train.config import resolve
    from micromoe.train.data import TokenData, load_tokens
    from micromoe.train.loop import train
    from micromoe.train.parallel import ParallelState, resolve_layout
    from micromoe.train.trainer import build_run

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tokens, vocab = load_tokens()
    flags = {"out": out, "max_steps": 1, "eval_interval": 0, "micro_batch": 1, "save": False, "ep": args.ep}
    cfg = resolve(args.preset, flags)
    model_cfg = preset(args.preset, num_layers=args.layers, seq_len=args.seq_len)
    par = ParallelState(rank, world, torch.device("cpu"), resolve_layout(cfg, world), cfg.dispatcher)
    run = build_run(cfg, model_cfg, par, TokenData(tokens, vocab), peak_flops=None)
    train(run)
    experts = {id(p) for p in expert_parameters(run.model)}
    row = {"rank": rank, "expert_master": 0, "expert_state": 0, "dense_master": 0, "dense_state": 0}
    for p in run.model.parameters():
        kind = "expert" if id(p) in experts else "dense"
        row[f"{kind}_master"] += _local(p).nbytes
        row[f"{kind}_state"] += sum(_local(t).nbytes for t in run.optimizer.state[p].values() if t.dim() > 0)
    row["slots_per_layer"] = run.parallel.groups[0].placement.slots_per_gpu
    row["layout"] = str(run.parallel.layout)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, row)  # collective (world)
    if rank == 0:
        Path(out, "rows.json").write_text(json.dumps(everyone))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--ep", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            measure, args=(args.nproc, args, out), nprocs=args.nproc, join=True, start_method="spawn"
        )
        rows = json.loads(Path(out, "rows.json").read_text())

    from micromoe.model import preset
    from micromoe.train.config import resolve
    from micromoe.train.memory import plan_memory
    from micromoe.train.parallel import resolve_layout
    from micromoe.train.precision import resolve_precision

    mc = preset(args.preset, num_layers=args.layers, seq_len=args.seq_len)
    per_expert = 3 * mc.hidden * mc.ffn_hidden * 4
    dense_total = sum(r["dense_master"] for r in rows)
    cfg = resolve(args.preset, {"micro_batch": 1, "ep": args.ep})
    layout = resolve_layout(cfg, args.nproc)
    plan = plan_memory(
        mc,
        cfg,
        resolve_precision("fp32", torch.device("cpu")),
        world=args.nproc,
        layout=layout,
        capacity=2**50,
        device="cpu",
        where="plan",
    )
    items = {i.name: i.bytes for i in plan.items}
    slot_expert = rows[0]["slots_per_layer"] * mc.num_moe_layers * per_expert
    print(f"{args.preset} --layers {args.layers}, {args.nproc} gloo ranks, {layout}")
    print(f"{'rank':>4} {'expert W MiB':>13} {'expert state':>13} {'dense W MiB':>12} {'dense state':>12}")
    mib = 2**20
    for r in rows:
        print(
            f"{r['rank']:>4} {r['expert_master'] / mib:>13.1f} {r['expert_state'] / mib:>13.1f} "
            f"{r['dense_master'] / mib:>12.2f} {r['dense_state'] / mib:>12.2f}"
        )
    print(
        f"slot design: expert W {slot_expert / mib:.1f} MiB, expert state {2 * slot_expert / mib:.1f} MiB, "
        f"dense W {dense_total / mib:.2f} MiB, dense state {2 * dense_total / mib:.2f} MiB per rank"
    )
    print(
        f"plan: master weights {items['master weights'] / mib:.1f} MiB, optimizer state {items['optimizer state'] / mib:.1f} MiB"
    )
    if args.json:
        result = {
            "env": {"cpu": _env.cpu_name(), **_env.versions("python", "torch"), "commit": _env.git_commit()},
            "command": " ".join(["python", *sys.argv]),
            "config": {
                "preset": args.preset,
                "layers": args.layers,
                "world": args.nproc,
                "layout": str(layout),
            },
            "ranks": rows,
            "slot_design_per_rank": {
                "expert_master": slot_expert,
                "expert_state": 2 * slot_expert,
                "dense_master": dense_total,
                "dense_state": 2 * dense_total,
            },
            "plan": items,
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
