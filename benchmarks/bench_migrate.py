"""Cost of re-placing one MoE layer (`migrate_layer`), and what its gather moves instead.

Builds a MicroEP layer (EP = W/2, d = 2, symmetric placement), takes one AdamW step so every
expert has moments, then re-places it back and forth between the symmetric placement and a
load-aware one for Zipf(1.2) loads, and reports per re-placement the weight and optimizer bytes
sent between ranks (0 with experts owned once: a new gather table is all that changes) and the
slowest rank's wall time (median over --repeats); beside it, the bytes one forward's gather of the
local slots receives from other ranks under each placement (the traffic that replaced moving
weights). Runs under torchrun (NCCL on GPUs) or starts --nproc gloo CPU processes itself.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --standalone --nproc_per_node=4 benchmarks/bench_migrate.py
    PYTHONPATH=. python benchmarks/bench_migrate.py --nproc 4 --hidden 256 --ffn 704
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from micromoe.plan import Placement
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    migrate_layer,
    sync_gradients,
)


def bench(rank: int, world: int, args: argparse.Namespace, device: torch.device) -> dict | None:
    layout = ParallelLayout(world, world, world // 2, 2)
    g = layout.microep_size
    sym = Placement.symmetric(g, args.experts, 2)
    aware = Placement.asymmetric(1.0 / np.arange(1, args.experts + 1) ** 1.2, g, sym.slots_per_gpu, seed=0)
    groups = build_process_groups(layout, sym, rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = MoEConfig(args.hidden, args.ffn, args.experts, 2)
    layer = apply_expert_parallel(MoELayer(cfg, device=device, dtype=dtype), groups, "microep")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    layer(x).float().square().mean().backward()
    sync_gradients(layer, groups)
    opt.step()
    ms, moved, gathered = [], [], {}
    for i in range(2 * args.repeats):
        target = aware if i % 2 == 0 else sym
        groups, stats = migrate_layer(layer, groups, target, optimizer=opt)
        t = torch.tensor([stats.ms], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # collective (world): the slowest rank
        ms.append(float(t))
        moved.append(stats.bytes_moved)
        gathered["load-aware" if i % 2 == 0 else "symmetric"] = _gather_bytes(layer, world, device)
    if rank != 0:
        return None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": world,
        "backend": dist.get_backend(),
        "config": {"hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "dtype": str(dtype)},
        "bytes_moved_median": float(np.median(moved)),
        "ms_median": float(np.median(ms)),
        "ms_all": ms,
        "gather_bytes_per_forward": gathered,
    }


def _gather_bytes(layer: MoELayer, world: int, device: torch.device) -> int:
    """Bytes the world's ranks receive from other ranks in one forward's gather of their slots."""
    ex = layer.experts
    t = ex.table
    per_row = (ex.w_gate_up[0].numel() + ex.w_down[0].numel()) * (
        ex.compute_dtype or ex.w_down.dtype
    ).itemsize
    mine = torch.tensor([float(np.delete(t.recv_splits, t.gpu).sum() * per_row)], device=device)
    dist.all_reduce(mine)  # collective (world)
    return int(mine)


def worker(rank: int, world: int, args: argparse.Namespace, backend: str, local_rank: int = 0) -> None:
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = bench(rank, world, args, device)
        if result is not None:
            print(json.dumps(result, indent=1))
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    worker(rank, world, args, "gloo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="tokens of the one training step")
    ap.add_argument("--repeats", type=int, default=3, help="round trips symmetric -> load-aware -> symmetric")
    ap.add_argument("--nproc", type=int, default=4, help="without a launcher: gloo CPU processes (even)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        worker(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            args,
            backend,
            int(os.environ.get("LOCAL_RANK", 0)),
        )
        return
    if args.nproc < 2 or args.nproc % 2:
        ap.error(f"--nproc must be even and >= 2 (EP = W/2, d = 2), got {args.nproc}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    mp.start_processes(_spawned, args=(args.nproc, args), nprocs=args.nproc, join=True, start_method="spawn")


if __name__ == "__main__":
    main()
