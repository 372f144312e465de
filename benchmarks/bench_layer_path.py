"""One-GPU benchmark of the MoE layer's token path, against torchtitan's MoE layer.

    PYTHONPATH=. python3 benchmarks/bench_layer_path.py --out benchmarks/results/layer_path_1xH200.json

Per shape (hidden/FFN, experts, top-k, tokens), bf16, eager, forward + backward with every
gradient reset between reps, the same weights, inputs and forced Zipf(1.0) routing (no token
dropping) for every variant:
- `ours` (columns `layer_*`): `MoELayer` on the single-device fast path (device-side layout,
  fused kernels, no group padding); `ours_align8` (`--align8`): the same with groups padded to 8;
- `ref`: the same layer on the reference local pipeline (host-side layout after a count sync);
- `torchtitan`: torchtitan 0.3.0's `MoE` (its router with the choice forced, local dispatcher,
  grouped experts), when importable;
- `graphed` (`--graphed`): the fast path's forward and backward replayed from two CUDA graphs
  (`torch.cuda.make_graphed_callables`): the same kernels without the host's launch gaps.
Times are medians of per-rep CUDA events with the host free to run ahead (`*_ms`) and with a
device sync before every rep (`*_sync_ms`; `*_host_issue_ms` is then the host time to issue one
rep: the CPU overhead). A profiler pass (10 reps) gives each variant's busy kernel time per rep,
its grouped-GEMM kernel time and top kernels, and the GPU idle time inside the profiled reps
(`gpu_idle_ms`: mean CUDA-event rep time minus busy kernel time, same reps and clocks;
`*_idle_median_rep_ms`: the median rep's instead, robust to a few slow reps, which the mean
takes in;
`*_ms_minus_busy` subtracts the busy time from the unprofiled median instead). The grouped-GEMM
rate is compared with a measured dense bf16 matmul peak. Not a test: run it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _env  # benchmarks/ (this script's folder) is on sys.path
import torch
import torch.nn.functional as F

from micromoe.runtime import MoEConfig, MoELayer
from micromoe.runtime.dispatch_fast import FAST_ALIGN
from micromoe.runtime.dispatch_local import LocalDispatcher


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    experts: int
    top_k: int
    tokens: int

    @property
    def name(self) -> str:
        return f"h{self.hidden}-f{self.ffn}-e{self.experts}-k{self.top_k}-t{self.tokens}"

    @property
    def gemm_flops(self) -> float:
        """FLOPs of the 6 grouped GEMMs of forward + backward (gate/up, down; x3 for backward)."""
        return 18.0 * self.tokens * self.top_k * self.hidden * self.ffn


SHAPES = (
    Shape(2048, 4096, 16, 2, 8192),
    Shape(2048, 768, 128, 8, 4096),
    Shape(4096, 1536, 128, 8, 4096),
    Shape(2048, 1408, 64, 6, 8192),  # DeepSeek-V2-Lite-like expert, more tokens
)
GEMM_KEYS = ("groupproblemshape", "grouped", "group_gemm", "groupedgemm")


# ------------------------------------------------------------------------------------------------
# the variants


def zipf_routing(tokens: int, experts: int, top_k: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """int64 [T, K]: distinct experts per token from Zipf(skew), expert 0 hottest."""
    p = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** skew
    return torch.multinomial(p.expand(tokens, -1), top_k, replacement=False, generator=gen)


def build_ours(shape: Shape, device: torch.device, *, fast: bool, align: int = FAST_ALIGN) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden=shape.hidden, ffn_hidden=shape.ffn, num_experts=shape.experts, top_k=shape.top_k)
    layer = MoELayer(cfg, device=device, dtype=torch.bfloat16)
    layer.dispatcher = LocalDispatcher(shape.experts, fast_path=fast, fast_align=align)
    layer.experts.fused_swiglu = fast
    return layer


class _Forced(torch.nn.Module):
    """`layer` with its routing fixed (a one-argument module for graph capture)."""

    def __init__(self, layer: MoELayer, expert_TK: torch.Tensor) -> None:
        super().__init__()
        self.layer, self.expert_TK = layer, expert_TK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, forced_expert=self.expert_TK)


def build_graphed(layer: MoELayer, x: torch.Tensor, expert_TK: torch.Tensor) -> torch.nn.Module:
    """The fast path's forward and backward captured as two CUDA graphs (it never syncs with the
    host, so it is capturable); replays show the layer's time without launch gaps."""
    return torch.cuda.make_graphed_callables(_Forced(layer, expert_TK), (x.detach().requires_grad_(True),))


def build_torchtitan(layer: MoELayer, expert_TK: torch.Tensor) -> torch.nn.Module:
    """torchtitan 0.3.0's MoE with `layer`'s weights; its router's choice is forced to `expert_TK`
    (the gates still come from its softmax, renormalized over the K choices like ours)."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    c = layer.cfg
    e, h, f, k = c.num_experts, c.hidden, c.ffn_hidden, c.top_k
    cfg = MoE.Config(
        num_experts=e,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=h, hidden_dim=f, num_experts=e),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=e,
            gate=Linear.Config(in_features=h, out_features=e),
            top_k=k,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
    )
    moe = cfg.build()
    w_gu, w_down = layer.experts.w_gate_up.detach(), layer.experts.w_down.detach()
    ex = moe.routed_experts.inner_experts
    dev, dt = w_gu.device, w_gu.dtype
    ex.w1_EFD = torch.nn.Parameter(w_gu[:, :, :f].transpose(1, 2).contiguous())
    ex.w3_EFD = torch.nn.Parameter(w_gu[:, :, f:].transpose(1, 2).contiguous())
    ex.w2_EDF = torch.nn.Parameter(w_down.transpose(1, 2).contiguous())
    moe.router.gate.weight = torch.nn.Parameter(layer.router.weight.detach().clone())
    moe = moe.to(dev, dt)
    moe.tokens_per_expert_E = moe.tokens_per_expert_E.float()
    router = moe.router
    ids_BLK = expert_TK.unsqueeze(0)

    def forced(x_BLD: torch.Tensor, expert_bias_E: torch.Tensor | None = None):
        # torchtitan's router forward with the top-k choice replaced by the forced one
        with torch.autocast(device_type=x_BLD.device.type, dtype=torch.float32):
            scores_BLE = router.gate(x_BLD)
        scores_BLE = F.softmax(scores_BLE, dim=-1)
        top = scores_BLE.gather(dim=-1, index=ids_BLK)
        top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return top * router.route_scale, ids_BLK, scores_BLE

    router.forward = forced
    return moe


# ------------------------------------------------------------------------------------------------
# timing


def time_reps(
    step: Callable[[], None], reps: int, warmup: int, *, sync_each: bool, host_ms: list[float] | None = None
) -> list[float]:
    """ms per rep from CUDA events around `step` (which resets grads, runs fwd+bwd). With
    `sync_each`, `host_ms` collects the host time to issue each rep (the CPU overhead: the
    device queue is empty at the start, so the host never waits for it)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        if sync_each:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        step()
        b.record()
        if host_ms is not None:
            host_ms.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def profile_kernels(step: Callable[[], None], reps: int, *, cpu: bool = False) -> dict:
    """Kernel time per rep from a profiler trace: total (busy), grouped GEMM, the top kernels;
    and the GPU idle time inside the same reps: CUDA-event time of each rep minus the busy time
    of its kernels (same run, same clocks), plus the idle of the whole profiled span. `cpu`
    also traces CPU-side ops (their summary), at the price of more host overhead."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for a, b in ev:
            a.record()
            step()
            b.record()
        torch.cuda.synchronize()
    rep_ms = [a.elapsed_time(b) for a, b in ev]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    per_name: dict[str, list[float]] = {}
    cpu_ops: dict[str, float] = {}
    runtime_calls = 0
    intervals = []
    for evt in trace.get("traceEvents", []):
        cat = evt.get("cat")
        if cat == "cpu_op" and "dur" in evt:
            cpu_ops[evt["name"]] = cpu_ops.get(evt["name"], 0.0) + evt["dur"] / 1e3
        runtime_calls += cat in ("cuda_runtime", "cuda_driver")
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset") or "dur" not in evt:
            continue
        per_name.setdefault(evt["name"], []).append(evt["dur"] / 1e3)
        intervals.append((evt["ts"] / 1e3, (evt["ts"] + evt["dur"]) / 1e3, evt["name"]))
    if not intervals and not cpu:  # some profiler builds record kernels only with CPU tracing on
        return profile_kernels(step, reps, cpu=True)
    busy = _union_ms([(a, b) for a, b, _ in intervals]) / reps
    span = (max(e for _, e, _ in intervals) - min(s for s, _, _ in intervals)) / reps if intervals else 0.0
    gemm = sum(sum(v) for n, v in per_name.items() if any(key in n.lower() for key in GEMM_KEYS)) / reps
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "busy_ms": busy,
        "profiled_rep_ms": statistics.median(rep_ms),
        "idle_in_reps_ms": max(0.0, sum(rep_ms) / reps - busy),
        "idle_in_span_ms": max(0.0, span - busy),
        "gemm_ms": gemm,
        "launches_per_rep": sum(len(v) for v in per_name.values()) / reps,
        "top": [
            {"name": n[:160], "ms_per_rep": sum(v) / reps, "calls_per_rep": len(v) / reps} for n, v in top
        ],
        "runtime_calls_per_rep": runtime_calls / reps,
        "top_gaps_ms_per_rep": _gaps(intervals, reps),
        "top_cpu_ops_ms_per_rep": {
            n: ms / reps for n, ms in sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:20]
        },
    }


def _gaps(intervals: list[tuple[float, float, str]], reps: int) -> dict[str, float]:
    """Idle gaps on the GPU timeline, summed by the kernel that ends before and starts after."""
    out: dict[str, float] = {}
    ordered = sorted(intervals)
    for (_, end, before), (start, _, after) in zip(ordered, ordered[1:], strict=False):
        if start > end:
            key = f"{before[:50]} -> {after[:50]}"
            out[key] = out.get(key, 0.0) + (start - end) / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:12])


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def bf16_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(time_reps(lambda: torch.mm(a, b), 20, 5, sync_each=False))
    return 2 * n**3 / ms / 1e9


# ------------------------------------------------------------------------------------------------
# one shape


def bench_shape(shape: Shape, reps: int, with_tt: bool, peak: float, align8: bool, graphed: bool) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape.tokens, shape.hidden, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    dy = torch.randn(shape.tokens, shape.hidden, generator=gen).to(dev, torch.bfloat16)
    expert = zipf_routing(shape.tokens, shape.experts, shape.top_k, 1.0, gen).to(dev)
    row = {"shape": shape.name, "max_expert_load_share": _max_share(expert, shape.experts)}
    variants: dict[str, tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    ours = build_ours(shape, dev, fast=True)
    variants["ours"] = (ours, lambda a: ours(a, forced_expert=expert))
    ref = build_ours(shape, dev, fast=False)
    variants["ref"] = (ref, lambda a: ref(a, forced_expert=expert))
    if align8:
        a8 = build_ours(shape, dev, fast=True, align=8)
        variants["ours_align8"] = (a8, lambda a: a8(a, forced_expert=expert))
    if graphed:
        try:
            gr = build_graphed(build_ours(shape, dev, fast=True), x, expert)
            variants["graphed"] = (gr, gr)
        except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
            row["graphed_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if with_tt:
        tt = build_torchtitan(ours, expert)
        variants["torchtitan"] = (tt, lambda a: tt(a.unsqueeze(0)).squeeze(0))
    grads = {}
    for name, (mod, fwd) in variants.items():
        params = list(mod.parameters())

        def step(mod_params=params, fwd=fwd) -> None:
            for p in mod_params:
                p.grad = None
            x.grad = None
            fwd(x).backward(dy)

        step()
        dx = x.grad.float().clone()  # first: a graph's forward replay may reuse its backward's memory
        grads[name] = (fwd(x.detach()).float(), dx)
        ms = time_reps(step, reps, 3, sync_each=False)
        host_ms: list[float] = []
        ms_sync = time_reps(step, max(5, reps // 2), 1, sync_each=True, host_ms=host_ms)
        prof = profile_kernels(step, 10)
        layer_ms = statistics.median(ms)
        prefix = "layer" if name == "ours" else name
        row[f"{prefix}_ms"] = layer_ms
        row[f"{prefix}_sync_ms"] = statistics.median(ms_sync)
        row[f"{prefix}_host_issue_ms"] = statistics.median(host_ms)
        row[f"{prefix}_gemm_ms"] = prof["gemm_ms"]
        row[f"{prefix}_busy_ms"] = prof["busy_ms"]
        row[f"{prefix}_gpu_idle_ms"] = prof["idle_in_reps_ms"]
        row[f"{prefix}_idle_median_rep_ms"] = max(0.0, prof["profiled_rep_ms"] - prof["busy_ms"])
        row[f"{prefix}_idle_in_span_ms"] = prof["idle_in_span_ms"]
        row[f"{prefix}_profiled_ms"] = prof["profiled_rep_ms"]
        row[f"{prefix}_ms_minus_busy"] = max(0.0, layer_ms - prof["busy_ms"])
        row[f"{prefix}_launches"] = prof["launches_per_rep"]
        row[f"{prefix}_top_kernels"] = prof["top"]
        row[f"{prefix}_runtime_calls"] = prof["runtime_calls_per_rep"]
        row[f"{prefix}_top_cpu_ops"] = prof["top_cpu_ops_ms_per_rep"]
        row[f"{prefix}_top_gaps"] = prof["top_gaps_ms_per_rep"]
        if isinstance(mod, MoELayer):
            row[f"{prefix}_host_wait_idle_ms"] = mod.last_stats.gpu_idle_ms
    row["gemm_ms"], row["gpu_idle_ms"] = row.pop("layer_gemm_ms"), row.pop("layer_gpu_idle_ms")
    row["gemm_tflops"] = shape.gemm_flops / row["gemm_ms"] / 1e9 if row["gemm_ms"] else None
    row["gemm_peak_frac"] = row["gemm_tflops"] / peak if row["gemm_tflops"] else None
    row["layer_over_gemm"] = row["layer_ms"] / row["gemm_ms"] if row["gemm_ms"] else None
    if with_tt:
        row["ratio_vs_torchtitan"] = row["layer_ms"] / row["torchtitan_ms"]
    if "graphed_ms" in row:
        row["layer_over_graphed"] = row["layer_ms"] / row["graphed_ms"]
    y0, gx0 = grads["ours"]
    for name, (y, gx) in grads.items():
        row[f"rel_err_y_{name}_vs_ours"] = _rel(y, y0)
        row[f"rel_err_dx_{name}_vs_ours"] = _rel(gx, gx0)
    return row


def _max_share(expert: torch.Tensor, e: int) -> float:
    c = torch.bincount(expert.reshape(-1).cpu(), minlength=e)
    return float(c.max() / c.sum())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--reps", type=int, default=30, help="timed reps per variant (median reported)")
    ap.add_argument("--shapes", default="all", help="'all' or comma-separated shape names")
    ap.add_argument("--no-torchtitan", action="store_true", help="skip the torchtitan comparison")
    ap.add_argument("--align8", action="store_true", help="also time the fast path with groups padded to 8")
    ap.add_argument(
        "--graphed",
        action="store_true",
        help="also time the fast path replayed from CUDA graphs (fwd and bwd)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    with_tt = not args.no_torchtitan
    if with_tt:
        try:
            import torchtitan.models.common.moe  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            print(f"torchtitan unavailable ({exc}); skipping it")
            with_tt = False
    shapes = [s for s in SHAPES if args.shapes == "all" or s.name in args.shapes.split(",")]
    peak = bf16_peak_tflops()
    packages = ("triton", "torchtitan") if with_tt else ("triton",)
    result = {
        "gpu": _env.device_name(torch.device("cuda")),
        "versions": _env.versions("python", "torch", "cuda", *packages),
        "bf16_peak_tflops": peak,
    }
    result["rows"] = []
    for shape in shapes:
        row = bench_shape(shape, args.reps, with_tt, peak, args.align8, args.graphed)
        result["rows"].append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        _print_row(row)
    return 0


def _print_row(r: dict) -> None:
    tt = r.get("torchtitan_ms")
    print(
        f"{r['shape']}: ours {r['layer_ms']:.3f} ms (sync {r['layer_sync_ms']:.3f}), ref {r['ref_ms']:.3f}, "
        f"tt {tt if tt is None else round(tt, 3)}, gemm {r['gemm_ms']:.3f} "
        f"({r['gemm_peak_frac'] or 0:.0%} of peak), idle {r['gpu_idle_ms']:.3f}, "
        f"layer/gemm {r['layer_over_gemm'] or 0:.2f}, ratio vs tt {r.get('ratio_vs_torchtitan')}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
