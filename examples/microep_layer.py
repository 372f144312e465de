"""A MicroEP MoE layer trained for a few steps on skewed routing, one process per device.

    torchrun --nproc_per_node=4 examples/microep_layer.py          # CPU (gloo) or one GPU each (NCCL)
    torchrun --nproc_per_node=4 examples/microep_layer.py --timeout 60

Needs 2, 4, 8 or 16 ranks: the 8 experts x 2 replicas = 16 slots must split evenly over the ranks,
and EP = ranks / 2. Any other count stops before any process group exists, with that message
printed once (by rank 0). With 4 ranks: DP = 4, EP = 2, merge
factor d = 2: one MicroEP group of 4 GPUs holding 8 experts twice (symmetric placement).
`--timeout` (seconds, default 300) bounds every collective: if a rank stalls or dies, the others
stop with an error naming the timeout (and, on rank 0, the rank that did not respond). Each step
prints, on rank 0, how skewed the routing is (hottest expert's load over the mean expert load)
and the largest per-GPU load of MicroEP's plan over the mean.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

from micromoe.allocator import tune_allocator
from micromoe.plan import Placement
from micromoe.runtime import (
    MoEConfig,
    MoELayer,
    ParallelLayout,
    apply_expert_parallel,
    build_process_groups,
    sync_gradients,
)
from micromoe.runtime.timeouts import DEFAULT_TIMEOUT_S, CollectiveTimeout, init_distributed

NUM_EXPERTS, REPLICAS = 8, 2
SUPPORTED_RANKS = (2, 4, 8, 16)  # the 16 expert slots split evenly, and EP = ranks / 2 >= 1


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Train a MicroEP MoE layer for a few steps (run under torchrun)."
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds before a stalled collective fails (default {DEFAULT_TIMEOUT_S:g})",
    )
    args = ap.parse_args()
    check_launch()  # before any process group: every rank knows the world size from torchrun
    tune_allocator()  # MicroEP schedules every micro-batch: keep the planner's arrays off fresh pages
    cuda = torch.cuda.is_available()
    try:
        watchdog = init_distributed("nccl" if cuda else "gloo", args.timeout)
    except ValueError as exc:
        fail(str(exc))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        with watchdog.guard("a training step"):
            train(rank, world, cuda)
    except CollectiveTimeout as exc:
        print(f"microep_layer.py: error: {exc}", file=sys.stderr, flush=True)
        os._exit(1)  # no clean shutdown: a peer is gone
    dist.destroy_process_group()


def check_launch() -> None:
    """Stop (one message, from rank 0 only) unless torchrun started a supported number of ranks."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        fail("run it under torchrun: torchrun --nproc_per_node=4 examples/microep_layer.py")
    world = int(os.environ["WORLD_SIZE"])
    if world not in SUPPORTED_RANKS:
        fail(
            f"needs 2, 4, 8 or 16 ranks ({NUM_EXPERTS} experts x {REPLICAS} replicas split evenly, "
            f"EP = ranks / 2), got {world}; run torchrun --nproc_per_node=4"
        )


def fail(message: str) -> NoReturn:
    """Exit with status 2; only rank 0 (or a process outside torchrun) prints `message`, so a job of
    N ranks says it once. (torchrun then lists the ranks that exited, as it does for any failure.)"""
    if os.environ.get("RANK", "0") == "0":
        print(f"microep_layer.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def train(rank: int, world: int, cuda: bool) -> None:
    """Three steps of the layer on Zipf-skewed routing; rank 0 prints the balance of each."""
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    layout = ParallelLayout(world_size=world, dp=world, ep=world // 2, merge=2)
    placement = Placement.symmetric(layout.microep_size, num_experts=NUM_EXPERTS, replicas=REPLICAS)
    groups = build_process_groups(layout, placement, rank)

    torch.manual_seed(0)  # every rank builds the same full layer, then keeps its slots
    layer = MoELayer(MoEConfig(hidden=64, ffn_hidden=128, num_experts=NUM_EXPERTS, top_k=2)).to(device)
    apply_expert_parallel(layer, groups, "microep")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    zipf = torch.arange(1, NUM_EXPERTS + 1, dtype=torch.float64) ** -1.2  # the same hot experts on every rank

    gen = torch.Generator().manual_seed(rank)
    for step in range(3):
        x = torch.randn(256, 64, generator=gen).to(device)
        expert = torch.multinomial(zipf.expand(256, NUM_EXPERTS), 2, generator=gen).to(device)
        y = layer(x, forced_expert=expert)
        loss = y.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        sync_gradients(layer, groups)  # replicas' gradients over their replica groups, dense over DP
        opt.step()
        plan, counts = layer.last_stats.plan, layer.last_stats.counts_ge
        load = counts.sum(axis=0)
        if rank == 0:
            print(
                f"step {step}: loss {loss.item():.4f}  hottest expert {load.max() / load.mean():.2f}x the mean;"
                f" MicroEP max/mean GPU load {plan.max_load / (load.sum() / world):.4f}"
            )


if __name__ == "__main__":
    main()
