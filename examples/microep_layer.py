"""A MicroEP MoE layer trained for a few steps on skewed routing, one process per device.

    torchrun --nproc_per_node=4 examples/microep_layer.py          # CPU (gloo) or one GPU each (NCCL)

DP = 4 ranks, EP = 2, merge factor d = 2: one MicroEP group of 4 GPUs holding 8 experts twice
(symmetric placement). Each step prints, on rank 0, how skewed the routing is (hottest expert's
load over the mean expert load) and the largest per-GPU load of MicroEP's plan over the mean.
"""

from __future__ import annotations

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


def main() -> None:
    tune_allocator()  # MicroEP schedules every micro-batch: keep the planner's arrays off fresh pages
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    layout = ParallelLayout(world_size=world, dp=world, ep=world // 2, merge=2)
    placement = Placement.symmetric(layout.microep_size, num_experts=8, replicas=2)
    groups = build_process_groups(layout, placement, rank)

    torch.manual_seed(0)  # every rank builds the same full layer, then keeps its slots
    layer = MoELayer(MoEConfig(hidden=64, ffn_hidden=128, num_experts=8, top_k=2)).to(device)
    apply_expert_parallel(layer, groups, "microep")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    zipf = torch.arange(1, 9, dtype=torch.float64) ** -1.2  # the same hot experts on every rank

    gen = torch.Generator().manual_seed(rank)
    for step in range(3):
        x = torch.randn(256, 64, generator=gen).to(device)
        expert = torch.multinomial(zipf.expand(256, 8), 2, generator=gen).to(device)
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
