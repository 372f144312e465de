"""GPU benchmark of one MoE layer: plain EP (EP=4, EP=2) vs MicroEP (EP=2, d=2) vs uniform routing.

Run on 4 GPUs (not a test):
    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --standalone --nproc_per_node=4 \
        benchmarks/bench_layer.py --out benchmarks/results/layer_4xH200.json

One layer, bf16, hidden 2048, SwiGLU FFN 4096, 16 experts, top-2, 8192 tokens per GPU, forward +
backward, routing forced to Zipf(s) with the same hot experts on every GPU. Variants: ep4 (plain
EP=4), ep2 (plain EP=2, two EP groups: the same expert memory per GPU as MicroEP), microep (EP=2,
d=2, symmetric placement), uniform (ep2 with perfectly balanced routing: the lower bound).
The script first checks the distributed layers against a dense bf16 reference on the GPU, then
times every variant: the median over iterations of the slowest rank's fwd+bwd time, the max/mean
GPU load, a forward time split from CUDA events, and the grouped-GEMM rate against the measured
bf16 matmul peak. It writes JSON and prints a table on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import _env  # benchmarks/ (this script's folder) is on sys.path
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from micromoe.allocator import tune_allocator
from micromoe.plan import Placement
from micromoe.runtime import MoEConfig, MoELayer, ParallelLayout, apply_expert_parallel, build_process_groups
from micromoe.runtime.timeouts import init_distributed

SKEWS = (0.0, 0.5, 1.0, 1.5)


@dataclass(frozen=True)
class Variant:
    name: str
    ep: int
    merge: int
    dispatcher: str


def make_variants(world: int) -> tuple[Variant, ...]:
    """On 4 GPUs: ep4, ep2 and microep (EP=2, d=2); on W GPUs: epW, ep(W/2), microep (EP=W/2, d=2)."""
    half = world // 2
    return (
        Variant(f"ep{world}", world, 1, "ep"),
        Variant(f"ep{half}", half, 1, "ep"),
        Variant("microep", half, 2, "microep"),
    )


class CudaPhaseTimer:
    """Records a CUDA event at every `mark` between `start()` and `stop()` (a no-op otherwise);
    phase = time between consecutive marks. Handed to the dispatcher when the layer is built."""

    def __init__(self) -> None:
        self.events: list[tuple[str, torch.cuda.Event, float]] = []
        self.recording = False

    def start(self) -> None:
        self.events, self.recording = [], True

    def stop(self) -> None:
        self.recording = False

    def mark(self, name: str) -> None:
        if not self.recording:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.events.append((name, ev, time.perf_counter()))

    def phases_ms(self) -> dict[str, float]:
        """GPU time per phase, plus 'host_<phase>': host time between the marks."""
        out = {}
        for (_, a, ta), (name, b, tb) in zip(self.events, self.events[1:], strict=False):
            out[name] = out.get(name, 0.0) + a.elapsed_time(b)
            out[f"host_{name}"] = out.get(f"host_{name}", 0.0) + (tb - ta) * 1e3
        return out


# ------------------------------------------------------------------------------------------------
# inputs


def zipf_routing(tokens: int, num_experts: int, top_k: int, skew: float, gen: torch.Generator, device):
    """int64 [T, K], distinct experts per token from Zipf(skew); expert 0 hottest on every GPU."""
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** skew
    idx = torch.multinomial(p.expand(tokens, -1), top_k, replacement=False, generator=gen)
    return idx.to(device)


def balanced_routing(tokens: int, num_experts: int, top_k: int, rank: int, device):
    """int64 [T, K]: every expert gets exactly T*K/E rows on every GPU (perfect balance)."""
    t = torch.arange(tokens, device=device)[:, None]
    return (t * top_k + torch.arange(top_k, device=device) + rank) % num_experts


# ------------------------------------------------------------------------------------------------
# correctness on the GPU (bf16 against a float32 dense reference)


def dense_reference(x, router_w, w_gate_up, w_down, expert):
    x, router_w, w_gate_up, w_down = (t.float() for t in (x, router_w, w_gate_up, w_down))
    gate = torch.softmax(x @ router_w.t(), -1).gather(1, expert)
    gate = gate / gate.sum(-1, keepdim=True)
    ffn, y = w_down.shape[1], torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        h = x @ w_gate_up[e]
        y += (gate * (expert == e)).sum(1, keepdim=True) * ((F.silu(h[:, :ffn]) * h[:, ffn:]) @ w_down[e])
    return y


def check_correctness(cfg: MoEConfig, rank: int, world: int, device) -> dict:
    """Forward and input gradient of ep4/ep2/microep vs the dense reference, skewed routing."""
    out = {}
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(1024, cfg.hidden, generator=gen).to(device, torch.bfloat16)
    expert = zipf_routing(1024, cfg.num_experts, cfg.top_k, 1.2, gen, device)
    coef = torch.randn(1024, cfg.hidden, generator=gen).to(device)
    for v in make_variants(world):
        layer, _ = build_layer(cfg, v, rank, world, device)
        torch.manual_seed(0)
        full = MoELayer(cfg, device=device, dtype=torch.bfloat16)
        leaves = [
            t.detach().float().requires_grad_(True) for t in (full.router.weight, full.experts.w_gate_up)
        ]
        leaves.append(full.experts.w_down.detach().float())
        xr = x.float().requires_grad_(True)
        y_ref = dense_reference(xr, leaves[0], leaves[1], leaves[2], expert)
        (y_ref * coef).sum().backward()
        xl = x.clone().requires_grad_(True)
        y = layer(xl, forced_expert=expert)
        (y.float() * coef).sum().backward()
        err_y = float((y.float() - y_ref).norm() / y_ref.norm())
        err_gx = float((xl.grad.float() - xr.grad).norm() / xr.grad.norm())
        rows = torch.tensor([int(layer.last_stats.slot_load.sum())], device=device)
        dist.all_reduce(rows)  # collective (world): every (token, expert) row computed once
        ok = err_y < 2e-2 and err_gx < 2e-2 and int(rows) == world * 1024 * cfg.top_k
        out[v.name] = {"rel_err_y": err_y, "rel_err_grad_x": err_gx, "rows_ok": int(rows), "ok": ok}
        del layer, full
    return out


# ------------------------------------------------------------------------------------------------
# timing


def build_layer(
    cfg: MoEConfig, v: Variant, rank: int, world: int, device, timer: CudaPhaseTimer | None = None
):
    layout = ParallelLayout(world, world, v.ep, v.merge)
    if v.dispatcher == "ep":
        placement = Placement.expert_parallel(layout.microep_size, cfg.num_experts, 1)
    else:
        placement = Placement.symmetric(layout.microep_size, cfg.num_experts, v.merge)
    groups = build_process_groups(layout, placement, rank)
    torch.manual_seed(0)
    layer = MoELayer(cfg, device=device, dtype=torch.bfloat16)
    return apply_expert_parallel(layer, groups, v.dispatcher, timer=timer), groups


def fwd_bwd(layer, x, expert, coef) -> None:
    for p in layer.parameters():
        p.grad = None
    y = layer(x, forced_expert=expert)
    y.backward(coef)


def time_variant(layer, timer: CudaPhaseTimer, x, expert, coef, iters: int, warmup: int) -> dict:
    """Median over iterations of the slowest rank's fwd+bwd ms, forward split, loads.

    `timer` is the one the layer's dispatcher was built with; it records only for the split runs."""
    for _ in range(warmup):
        fwd_bwd(layer, x, expert, coef)
    torch.cuda.synchronize()
    totals = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()  # collective (world): start every iteration together
        a.record()
        fwd_bwd(layer, x, expert, coef)
        b.record()
        b.synchronize()  # host sync: read this iteration's time
        totals.append(a.elapsed_time(b))
    t = torch.tensor(totals, device=x.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # collective (world): the slowest rank per iteration
    phases, route_s = [], []
    for _ in range(max(5, iters // 3)):
        dist.barrier()  # collective (world)
        timer.start()
        fwd_bwd(layer, x, expert, coef)
        timer.stop()
        torch.cuda.synchronize()
        phases.append(timer.phases_ms())
        route_s.append(layer.last_stats.route_s)
    split = {k: float(np.median([p[k] for p in phases])) for k in phases[0]}
    load = torch.tensor([float(layer.last_stats.slot_load.sum())], device=x.device)
    loads = [torch.zeros_like(load) for _ in range(dist.get_world_size())]
    dist.all_gather(loads, load)  # collective (world): per-GPU loads
    loads_np = np.array([float(v) for v in loads])
    return {
        "median_ms": float(t.median()),
        "p10_ms": float(t.quantile(0.1)),
        "p90_ms": float(t.quantile(0.9)),
        "max_mean_load": float(loads_np.max() / loads_np.mean()),
        "gpu_load": loads_np.astype(int).tolist(),
        "fwd_split_ms": split,
        "route_cpu_ms": float(np.median(route_s) * 1e3),
    }


def gather_split(res: dict, cfg: MoEConfig, layer) -> None:
    """Replace the local forward split by its max over ranks; add the experts' per-rank TFLOP/s."""
    local = res["fwd_split_ms"]
    rows = int(layer.last_stats.slot_load.sum())
    tflops = 6 * rows * cfg.hidden * cfg.ffn_hidden / (local.get("experts", float("nan")) * 1e-3) / 1e12
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (local, tflops))  # collective (world)
    res["fwd_split_ms"] = {k: max(e[0][k] for e in everyone) for k in local}
    res["fwd_experts_ms_per_gpu"] = [e[0]["experts"] for e in everyone]
    res["fwd_gemm_tflops_per_gpu"] = [e[1] for e in everyone]


def measure_peak(device) -> float:
    """bf16 8192^3 matmul TFLOP/s on random data (mean of 10 after 3 warm-ups)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        a @ b
    e.record()
    e.synchronize()  # host sync
    return 2 * 8192**3 * 10 / (s.elapsed_time(e) * 1e-3) / 1e12


def measure_grouped_gemm(layer, x, expert, cfg: MoEConfig, iters: int = 20) -> float:
    """Grouped-GEMM TFLOP/s of the local experts, fwd+bwd, on this rank's dispatched rows."""
    with torch.no_grad():
        sel = layer.router(x, expert)
        tokens, rows, _ = layer.dispatcher.dispatch(x, sel.expert, sel.weight)
    tokens.requires_grad_(True)
    grad = torch.randn_like(tokens)
    for _ in range(3):
        layer.experts(tokens, rows).backward(grad)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        layer.experts(tokens, rows).backward(grad)
    e.record()
    e.synchronize()  # host sync
    flops = 18 * tokens.shape[0] * cfg.hidden * cfg.ffn_hidden * iters
    return flops / (s.elapsed_time(e) * 1e-3) / 1e12


def targets(rows: list[dict], peak: float, gemm: float, base: str) -> dict:
    """The issue's targets; `base` is plain EP with MicroEP's expert memory (ep2 on 4 GPUs)."""
    t = {(r["variant"], r["skew"]): r["median_ms"] for r in rows}
    uni = t[("uniform", 0.0)]
    out = {"baseline": base}
    for s in (0.5, 1.0):
        ep2, micro = t[(base, s)], t[("microep", s)]
        lost = ep2 - uni
        out[f"recovered_frac_s{s}"] = (ep2 - micro) / lost if lost > 0 else float("nan")
        out[f"microep_over_uniform_s{s}"] = micro / uni
    out["microep_over_ep2_s0"] = t[("microep", 0.0)] / t[(base, 0.0)]
    out["grouped_gemm_frac_of_peak"] = gemm / peak
    out["pass"] = {
        "recover_80pct": all(out[f"recovered_frac_s{s}"] >= 0.8 for s in (0.5, 1.0)),
        "within_1.08x_uniform": all(out[f"microep_over_uniform_s{s}"] <= 1.08 for s in (0.5, 1.0)),
        "s0_within_1.03x_ep2": out["microep_over_ep2_s0"] <= 1.03,
        "gemm_60pct_peak": out["grouped_gemm_frac_of_peak"] >= 0.6,
    }
    return out


def print_table(result: dict) -> None:
    print(f"\n{result['gpu']} x{result['config']['world_size']}, fwd+bwd median of the slowest rank")
    keys = ["permute", "count_exchange", "route", "dispatch_a2a", "slot_sort", "experts", "combine"]
    print(
        f"{'variant':8} {'skew':>4} {'ms':>7} {'max/mean':>8}  fwd split ms: "
        + " ".join(f"{k[:9]:>9}" for k in keys)
    )
    for r in result["rows"]:
        sp = " ".join(f"{r['fwd_split_ms'].get(k, 0.0):9.3f}" for k in keys)
        print(f"{r['variant']:8} {r['skew']:4.1f} {r['median_ms']:7.3f} {r['max_mean_load']:8.3f}  {sp}")
    print(
        "peak bf16 TFLOP/s",
        round(result["peak_bf16_tflops"], 1),
        "grouped GEMM fwd+bwd TFLOP/s",
        round(result["grouped_gemm_tflops"], 1),
    )
    print("targets", json.dumps(result["targets"], indent=1))
    print("correctness", json.dumps(result["correctness"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/layer_{W}xH200.json")
    ap.add_argument("--iters", type=int, default=40, help="timed iterations per variant and skew")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per GPU")
    ap.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before a stalled collective fails (default 600)"
    )
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    tune_allocator()  # MicroEP schedules every micro-batch: keep the planner's arrays off fresh pages
    local_rank = int(os.environ["LOCAL_RANK"])  # set by torchrun
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    init_distributed("nccl", args.timeout, device_id=device)  # every group gets this timeout
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = MoEConfig(hidden=2048, ffn_hidden=4096, num_experts=16, top_k=2)
    t0 = time.time()
    correctness = check_correctness(cfg, rank, world, device)
    peak = measure_peak(device)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, cfg.hidden, generator=gen).to(device, torch.bfloat16)
    coef = torch.randn(args.tokens, cfg.hidden, generator=gen).to(device, torch.bfloat16)
    rows, gemm = [], float("nan")
    base = make_variants(world)[1].name  # plain EP with MicroEP's expert memory per GPU
    for v in make_variants(world):
        timer = CudaPhaseTimer()
        layer, _ = build_layer(cfg, v, rank, world, device, timer)
        for s in SKEWS:
            expert = zipf_routing(
                args.tokens, cfg.num_experts, cfg.top_k, s, torch.Generator().manual_seed(7 + rank), device
            )
            res = time_variant(layer, timer, x, expert, coef, args.iters, args.warmup)
            gather_split(res, cfg, layer)
            rows.append({"variant": v.name, "skew": s, **res})
        if v.name == base:
            expert = balanced_routing(args.tokens, cfg.num_experts, cfg.top_k, rank, device)
            res = time_variant(layer, timer, x, expert, coef, args.iters, args.warmup)
            gather_split(res, cfg, layer)
            rows.append({"variant": "uniform", "skew": 0.0, **res})
            g = torch.tensor([measure_grouped_gemm(layer, x, expert, cfg)], device=device)
            dist.all_reduce(g, op=dist.ReduceOp.MIN)  # collective (world): the slowest GPU's rate
            gemm = float(g)
        del layer
    if rank == 0:
        result = {
            "gpu": _env.device_name(device),
            "versions": {
                **_env.versions("torch", "cuda", "nccl", "python", "numpy"),
                "micromoe_commit": _env.git_commit(),
            },
            "config": {
                "world_size": world,
                "hidden": cfg.hidden,
                "ffn_hidden": cfg.ffn_hidden,
                "num_experts": cfg.num_experts,
                "top_k": cfg.top_k,
                "tokens_per_gpu": args.tokens,
                "dtype": "bfloat16",
                "pass": "forward+backward",
                "iters": args.iters,
                "warmup": args.warmup,
                "skews": list(SKEWS),
                "routing": "Zipf(s) over experts, same hot experts on every GPU; uniform = exactly balanced",
                "median_ms": "median over iterations of the slowest rank's fwd+bwd time (CUDA events)",
                "fwd_split_ms": "forward phases from CUDA events, per-phase max over ranks",
            },
            "peak_bf16_tflops": peak,
            "grouped_gemm_tflops": gemm,
            "correctness": correctness,
            "rows": rows,
            "targets": targets(rows, peak, gemm, base),
            "wall_s": time.time() - t0,
        }
        args.out = args.out or Path(f"benchmarks/results/layer_{world}xH200.json")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print_table(result)
    dist.barrier()  # collective (world): let rank 0 finish writing
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
