"""GPU check of the single-device fast path (not a test, not a timing).

    PYTHONPATH=. python3 benchmarks/check_layer_path_gpu.py [--json out.json]

1. Each Triton kernel against its pure-torch body (kernels.py) on fresh random inputs, float32
   and bf16, odd sizes, with the caching allocator's free blocks poisoned with NaN first (an
   unwritten output element shows up as NaN).
2. The layer on the fast path against the same layer on the reference pipeline (same weights,
   inputs and forced Zipf routing), bf16: output and every gradient; and the fast path against the test
   suite's float32 dense reference (bf16 weights upcast), output and every gradient.
3. The fast path without group padding (align 1: the default, as torchtitan's local path), in a child
   process: a grouped GEMM that rejects unaligned groups may kill the CUDA context.
4. The counting-sort row layout (kernels_rows.py) against the radix-sort path (`sorted_rows`),
   exactly, on uniform and skewed ids at the benchmark's sizes, padded and not, and with bad ids;
   the router's gate kernels (kernels_gate.py) against a float64 softmax over the chosen logits,
   forward and backward, with a repeated and an out-of-range id.
Exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _dist import dense_moe  # noqa: E402  (the test suite's reference, shared on purpose)

from micromoe.runtime import MoEConfig, MoELayer  # noqa: E402
from micromoe.runtime import kernels as K  # noqa: E402
from micromoe.runtime.dispatch_fast import sorted_rows  # noqa: E402
from micromoe.runtime.dispatch_local import LocalDispatcher  # noqa: E402
from micromoe.runtime.kernels_gate import chosen_softmax  # noqa: E402
from micromoe.runtime.kernels_rows import rows_layout  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def poison() -> None:
    """Fill the allocator's cached free memory with NaN."""
    blocks = [torch.full((1 << 26,), float("nan"), device="cuda") for _ in range(8)]
    del blocks


def check_kernels() -> dict:
    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [(1, 8, 1, 0), (37, 1000, 2, 0), (64, 2048, 8, 0), (50, 4096, 3, 13), (9, 72, 6, 40)]
    for dtype in (torch.float32, torch.bfloat16):
        for t, h, k, pad in cases:
            poison()
            n = t * k + pad
            kw = {"device": "cuda", "generator": g}
            x = torch.randn(t, h, **kw).to(dtype)
            pos = torch.randperm(n, **kw)[: t * k].to(torch.int32)
            rows = torch.randn(n, h, **kw).to(dtype)
            w = torch.rand(t, k, **kw).to(dtype)
            dy = torch.randn(t, h, **kw).to(dtype)
            hh = torch.randn(t * k + 5, 2 * h, **kw).to(dtype)
            da = torch.randn(t * k + 5, h, **kw).to(dtype)
            pairs = {
                "scatter": (K._scatter(x, pos, k, n), K._scatter_torch(x, pos, k, n)),
                "gather_sum": (K._gather_sum(rows, pos, k, None), K._gather_sum_torch(rows, pos, k, None)),
                "combine": (K._gather_sum(rows, pos, k, w), K._gather_sum_torch(rows, pos, k, w)),
                "swiglu_fwd": (K._swiglu_fwd(hh), K._swiglu_torch(hh)),
                "swiglu_bwd": (K._swiglu_bwd(hh, da), K._swiglu_bwd_torch(hh, da)),
            }
            got_bwd = K._combine_bwd(dy, rows, pos, w, n)
            ref_bwd = K._combine_bwd_torch(dy, rows, pos, w, n)
            pairs["combine_bwd_rows"] = (got_bwd[0], ref_bwd[0])
            pairs["combine_bwd_w"] = (got_bwd[1], ref_bwd[1])
            for name, (a, b) in pairs.items():
                key = f"{name}/{str(dtype)[6:]}/t{t}-h{h}-k{k}-pad{pad}"
                out[key] = rel(a, b)
    bad = {k: v for k, v in out.items() if not v <= TOL[torch.float32 if "float32" in k else torch.bfloat16]}
    return {"max_rel_err": max(out.values()), "failed": bad}


def check_rows() -> dict:
    """Counting sort against the radix-sort path: identical layouts for valid ids."""
    out, g = {}, torch.Generator().manual_seed(2)
    cases = [(1, 1, 1), (7, 3, 2), (3000, 16, 2), (8192, 16, 2), (4096, 128, 8), (8192, 64, 6), (999, 200, 4)]
    for t, e, k in cases:
        for skew in (0.0, 1.2):
            p = torch.arange(1, e + 1, dtype=torch.float64) ** -skew
            ids = torch.multinomial(p.expand(t, e), k, generator=g).cuda()
            for align in (1, 8):
                got, want = rows_layout(ids, e, align), sorted_rows(ids, e, align)
                want = (want[0], want[1], want[3], want[4])
                same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
                out[f"t{t}-e{e}-k{k}-skew{skew}-align{align}"] = same
    bad = torch.tensor([[0, 1], [1, 7], [-1, 0], [2, 9]], device="cuda")
    for align in (1, 8):
        pos, rows, bounds, ends = rows_layout(bad, 3, align)
        ref = sorted_rows(bad, 3, align)
        valid = ((bad >= 0) & (bad < 3)).reshape(-1)
        n = 8 + 3 * (align - 1)
        out[f"bad_ids-align{align}"] = (
            torch.equal(pos[valid], ref[0][valid])
            and len(set(pos.tolist())) == 8
            and int(pos.max()) < n
            and torch.equal(bounds, ref[3])
            and torch.equal(rows, ref[1])
        )
    return {"ok": all(out.values()), "cases": out}


def check_gate() -> dict:
    """The gate kernels against a float64 softmax over the chosen logits, forward and backward."""
    out, g = {}, torch.Generator().manual_seed(3)
    for t, e, k in ((4096, 16, 2), (4096, 128, 8), (777, 64, 6), (5, 1, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (3 * torch.randn(t, e, generator=g)).cuda().to(dtype).requires_grad_(True)
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).cuda()
            if k > 1:
                ids[0, 1] = ids[0, 0]  # a repeated id: gradients add up
            ids[1, 0] = e + 3  # out of range: clamped
            dw = torch.randn(t, k, generator=g).cuda().to(dtype)
            poison()
            w = chosen_softmax(logits, ids, dtype)
            (gl,) = torch.autograd.grad(w, logits, dw)
            l64 = logits.detach().double().requires_grad_(True)
            ref = torch.softmax(l64.gather(1, ids.clamp(0, e - 1)), -1)
            (gref,) = torch.autograd.grad(ref, l64, dw.double())
            key = f"t{t}-e{e}-k{k}/{str(dtype)[6:]}"
            out[f"w/{key}"], out[f"dlogits/{key}"] = rel(w, ref), rel(gl, gref)
    bad = {k: v for k, v in out.items() if not v <= (1e-5 if "float32" in k else 1e-2)}
    return {"max_rel_err": max(out.values()), "failed": bad, "ok": not bad}


def layer_pair(cfg: MoEConfig, align: int) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(0)
    fast = MoELayer(cfg, device="cuda", dtype=torch.bfloat16)
    fast.dispatcher = LocalDispatcher(cfg.num_experts, fast_path=True, fast_align=align)
    ref = MoELayer(cfg, device="cuda", dtype=torch.bfloat16)
    ref.load_state_dict(fast.state_dict())
    ref.dispatcher = LocalDispatcher(cfg.num_experts, fast_path=False)
    ref.experts.fused_swiglu = False
    return fast, ref


def run_layer(layer: MoELayer, x, expert, dy) -> list[torch.Tensor]:
    xx = x.detach().clone().requires_grad_(True)
    y = layer(xx, forced_expert=expert)
    y.backward(dy)
    grads = [
        p.grad.detach().clone() for p in (layer.router.weight, layer.experts.w_gate_up, layer.experts.w_down)
    ]
    return [y.detach(), xx.grad.detach(), *grads]


def check_layer(align: int) -> dict:
    out = {}
    for h, f, e, k, t in ((512, 768, 16, 2, 3000), (1024, 512, 64, 8, 1024)):
        cfg = MoEConfig(hidden=h, ffn_hidden=f, num_experts=e, top_k=k)
        fast, ref = layer_pair(cfg, align)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(t, h, generator=g).cuda().to(torch.bfloat16)
        dy = torch.randn(t, h, generator=g).cuda().to(torch.bfloat16)
        zipf = torch.arange(1, e + 1, dtype=torch.float64) ** -1.2
        expert = torch.multinomial(zipf.expand(t, e), k, generator=g).cuda()
        poison()
        got = run_layer(fast, x, expert, dy)
        want = run_layer(ref, x, expert, dy)
        names = ("y", "dx", "d_router", "d_w_gate_up", "d_w_down")
        key = f"h{h}-f{f}-e{e}-k{k}-t{t}"
        out[key] = {n: rel(a, b) for n, a, b in zip(names, got, want, strict=True)}
        load = torch.bincount(expert.reshape(-1).cpu(), minlength=e).tolist()
        out[key]["slot_load_ok"] = fast.last_stats.slot_load.tolist() == load
        # float32 dense reference of the test suite (bf16 weights upcast)
        xr = x.float().requires_grad_(True)
        leaves = [
            p.detach().float().requires_grad_(True)
            for p in (fast.router.weight, fast.experts.w_gate_up, fast.experts.w_down)
        ]
        yr = dense_moe(xr, *leaves, expert)
        yr.backward(dy.float())
        dense = [yr.detach(), xr.grad, *(p.grad for p in leaves)]
        for n, a, b in zip(names, got, dense, strict=True):
            out[key][f"{n}_vs_fp32_dense"] = rel(a, b)
    ok = all(
        v["slot_load_ok"]
        and all(v[f"{n}_vs_fp32_dense"] < 3e-2 for n in ("y", "dx", "d_router", "d_w_gate_up", "d_w_down"))
        and all(v[n] < 2e-2 for n in ("y", "dx", "d_router", "d_w_gate_up", "d_w_down"))
        for v in out.values()
    )
    return {"ok": ok, "cases": out}


def main() -> int:
    ap = argparse.ArgumentParser(description="GPU check of the fast layer path")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child-align", type=int, default=0, help="(internal) run only the layer check")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    if args.child_align:
        res = check_layer(args.child_align)
        print(json.dumps(res))
        return 0 if res["ok"] else 1
    result = {"kernels": check_kernels(), "rows": check_rows(), "gate": check_gate()}
    result["layer_align8"] = check_layer(8)
    child = subprocess.run(
        [sys.executable, __file__, "--child-align", "1"], capture_output=True, text=True, timeout=300
    )
    try:
        result["layer_align1"] = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result["layer_align1"] = {"ok": False, "error": (child.stderr or child.stdout)[-2000:]}
    result["align1_ok"] = bool(result["layer_align1"].get("ok"))
    ok = not result["kernels"]["failed"] and result["layer_align8"]["ok"] and result["align1_ok"]
    ok = ok and result["rows"]["ok"] and result["gate"]["ok"]
    result["ok"] = ok
    print(json.dumps(result, indent=1))
    print(
        f"kernels max rel err {result['kernels']['max_rel_err']:.2e}; rows ok={result['rows']['ok']}; "
        f"gate max rel err {result['gate']['max_rel_err']:.2e}; layer align8 ok={result['layer_align8']['ok']}; "
        f"align1 ok={result['layer_align1'].get('ok')}; overall {'PASS' if ok else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
