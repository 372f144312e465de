"""Chunked weight gradients in `GroupedSwiGLU` (`max_group_rows`), timed on one GPU.

Checks on the GPU that chunking leaves the output and input gradient bit-identical and the weight
gradients within bf16 rounding of a float32 reference, then times forward+backward (bf16, the
emulation's `ExpertTimer`: CUDA events, spin kernel queued first, median of `--reps`):

(a) one slot of 6k and 15k rows, unchunked and chunked at C in {1024, 2048, 4096};
(b) the emulation plans of Zipf-128 s=1.0 and s=1.5 (EPLB, LPLB, MicroEP-AR-t and the ideal even
    split, every simulated GPU), each chunk setting in the same process, interleaved per sample.

    PYTHONPATH=. python3 benchmarks/bench_chunked_groups.py --plans benchmarks/results/emulated_1xH200_plans.json \\
        --json benchmarks/results/chunked_groups_1xH200.json

Legend: G simulated GPUs, S local slots, K samples of a case.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromoe.runtime.calibrate import ExpertTimer, environment
from micromoe.runtime.experts import GroupedSwiGLU

ALIGN = 8  # the dispatchers' per-slot padding, as in bench_emulated.py
VARIANTS = ("eplb", "lplb", "microep-ar-t")


def check(device: torch.device, hidden: int, ffn: int) -> dict[str, Any]:
    """Chunked vs unchunked vs a float32 loop reference at rows [5000, 0, 300, 2100, 37]."""
    rows = torch.tensor([5000, 0, 300, 2100, 37], device=device)
    n = int(rows.sum())
    torch.manual_seed(0)
    layer = GroupedSwiGLU(len(rows), hidden, ffn, device=device, dtype=torch.bfloat16)
    x = torch.randn(n, hidden, device=device, dtype=torch.bfloat16)
    gy = torch.randn(n, hidden, device=device, dtype=torch.bfloat16)
    res = {}
    for c in (None, 1024):
        layer.max_group_rows = c
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = layer(xx, rows)
        y.backward(gy)
        res[c] = (y.detach(), xx.grad, layer.w_gate_up.grad.clone(), layer.w_down.grad.clone())
    ref = _reference(layer, x, gy, rows.tolist())
    out = {
        "rows": rows.tolist(),
        "out_identical": bool(torch.equal(res[None][0], res[1024][0])),
        "x_grad_identical": bool(torch.equal(res[None][1], res[1024][1])),
        "empty_slot_grad_zero_chunked": bool(not res[1024][2][1].any() and not res[1024][3][1].any()),
    }
    for c, r in res.items():
        for name, got, want in zip(("w_gate_up", "w_down"), r[2:], ref, strict=True):
            used = [s for s, k in enumerate(rows.tolist()) if k > 0]
            err = (got[used].float() - want[used]).norm() / want[used].norm()
            out[f"{name}_rel_err_vs_fp32_{'off' if c is None else c}"] = float(err)
    return out


def _reference(
    layer: GroupedSwiGLU, x: torch.Tensor, gy: torch.Tensor, rows: list[int]
) -> list[torch.Tensor]:
    wg = layer.w_gate_up.detach().float().requires_grad_(True)
    wd = layer.w_down.detach().float().requires_grad_(True)
    outs = []
    for s, (xs, gs) in enumerate(
        zip(torch.split(x.float(), rows), torch.split(gy.float(), rows), strict=True)
    ):
        h = xs @ wg[s]
        g, u = h.split(layer.ffn_hidden, dim=1)
        outs.append(((torch.nn.functional.silu(g) * u) @ wd[s] * gs).sum())
    torch.stack(outs).sum().backward()
    return [wg.grad, wd.grad]


def set_chunk(timer: ExpertTimer, c: int | None) -> None:
    for m in timer.modules.values():
        m.max_group_rows = c


def time_single(timer: ExpertTimer, chunks: list[int | None], reps: int) -> list[dict[str, Any]]:
    rows_out = []
    for n in (6144, 15360):
        rows = np.array([n], dtype=np.int64)
        timer.module(1)
        times = {c: [] for c in chunks}
        for _ in range(3):  # rounds, settings interleaved
            for c in chunks:
                set_chunk(timer, c)
                times[c].append(timer.time_us(rows, reps=reps))
        med = {str(c): float(np.median(t)) for c, t in times.items()}
        rows_out.append({"rows": n, "us": med, "vs_off": {k: v / med["None"] for k, v in med.items()}})
        print(
            f"one slot of {n} rows: "
            + ", ".join(f"C={k} {v:.1f} us ({v / med['None']:.3f})" for k, v in med.items()),
            flush=True,
        )
    return rows_out


def time_case(
    case: dict[str, Any], timer: ExpertTimer, chunks: list[int | None], reps: int
) -> dict[str, Any]:
    """Measured us [K, G] per chunk setting and variant; settings interleaved per sample."""
    g, slots = case["spec"]["gpus"], case["slots_per_gpu"]
    meas = {str(c): {v: [] for v in (*VARIANTS, "ideal")} for c in chunks}
    for k, total in enumerate(case["totals"]):
        per = total / g / slots
        ideal = np.full(slots, int(round(per / ALIGN)) * ALIGN, dtype=np.int64)
        for c in chunks:
            set_chunk(timer, c)
            for v in VARIANTS:
                rows_GS = -(-np.asarray(case["rows"][v][k], dtype=np.int64) // ALIGN) * ALIGN
                meas[str(c)][v].append([timer.time_us(r, reps=reps) for r in rows_GS])
            meas[str(c)]["ideal"].append([timer.time_us(ideal, reps=reps) for _ in range(g)])
    return meas


def summarize(meas: dict[str, dict[str, list]]) -> dict[str, Any]:
    out = {}
    for c, by_v in meas.items():
        t = {v: np.asarray(x) for v, x in by_v.items()}
        crit = {v: x.max(axis=1) for v, x in t.items()}
        ideal_max = crit["ideal"]
        row = {
            v: {"critical_us": float(np.median(cr)), "vs_ideal": float(np.median(cr / ideal_max))}
            for v, cr in crit.items()
        }
        best = min(("eplb", "lplb"), key=lambda p: row[p]["critical_us"])
        row["ours_vs_best_peer"] = row["microep-ar-t"]["critical_us"] / row[best]["critical_us"]
        row["best_peer"] = best
        out[c] = row
    base = out["None"]
    for row in out.values():  # same work, chunked / unchunked
        for v in (*VARIANTS, "ideal"):
            row[v]["vs_unchunked"] = row[v]["critical_us"] / base[v]["critical_us"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument(
        "--cases", default="zipf128 s=1.0,zipf128 s=1.5", help="exact case names, comma-separated"
    )
    ap.add_argument("--chunks", default="none,1024,2048,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    plans = json.loads(args.plans.read_text())
    names = args.cases.split(",")
    cases = [c for c in plans["cases"] if c["spec"]["name"] in names]
    hidden, ffn = cases[0]["spec"]["hidden"], cases[0]["spec"]["ffn"]
    result: dict[str, Any] = {
        "hardware": environment(device),
        "chunks": [str(c) for c in chunks],
        "reps": args.reps,
    }
    try:
        result["check"] = check(device, hidden, ffn)
    except Exception as exc:  # keep timing: the JSON says what failed
        result["check"] = {"error": repr(exc)}
    print(json.dumps(result["check"]), flush=True)
    max_rows = max(
        int((-(-np.asarray(c["rows"][v]) // ALIGN) * ALIGN).sum(axis=-1).max())
        for c in cases
        for v in VARIANTS
    )
    timer = ExpertTimer(hidden, ffn, device, max_rows=max(max_rows, 65536), seed=0)
    result["single_slot"] = time_single(timer, chunks, reps=4 * args.reps)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    result["cases"] = []
    for case in cases:
        t1 = time.perf_counter()
        meas = time_case(case, timer, chunks, args.reps)
        summ = summarize(meas)
        result["cases"].append({"name": case["spec"]["name"], "summary": summ, "measured_us": meas})
        print(f"\n{case['spec']['name']} ({time.perf_counter() - t1:.0f} s)")
        for c, row in summ.items():
            cells = "  ".join(
                f"{v} {row[v]['vs_ideal']:.3f} ({row[v]['vs_unchunked']:.3f})" for v in (*VARIANTS, "ideal")
            )
            print(
                f"C={c:>5}: {cells}  ours/best peer {row['ours_vs_best_peer']:.3f} ({row['best_peer']})",
                flush=True,
            )
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    result["wall_s"] = time.perf_counter() - t0
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
