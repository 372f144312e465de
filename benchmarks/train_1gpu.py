"""One GPU: the `small` preset trained in bf16 (experts as grouped GEMMs); tokens/s and MFU against
the bf16 matmul peak measured in the same run, plus a torch.profiler summary of one step.

    PYTHONPATH=. python3 benchmarks/train_1gpu.py --json benchmarks/results/train_1xH200.json

MFU = (6 x active parameters + causal attention FLOPs) per token x tokens/s / measured peak.
`--preset tiny --steps 3` runs the same code on CPU (no MFU) as a smoke check.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from micromoe.allocator import tune_allocator
from micromoe.model import preset
from micromoe.train.config import resolve
from micromoe.train.data import TokenData, load_tokens
from micromoe.train.loop import train, train_step
from micromoe.train.metrics import StepMeter, measure_bf16_peak
from micromoe.train.parallel import ParallelState
from micromoe.train.trainer import build_run


def _run(
    name: str,
    micro_batch: int,
    compile_: bool,
    steps: int,
    device: torch.device,
    peak: float | None,
    out: Path,
):
    tokens, vocab = load_tokens()
    flags = {
        "out": str(out / f"mb{micro_batch}{compile_}"),
        "max_steps": steps,
        "eval_interval": 0,
        "save": False,
    }
    cfg = resolve(name, {**flags, "micro_batch": micro_batch, "warmup_steps": 5, "compile": compile_})
    model_cfg = preset(name)
    par = ParallelState(0, 1, device, None, "ep")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    run = build_run(cfg, model_cfg, par, TokenData(tokens, vocab, seed=0), peak_flops=peak)
    records = train(run)
    return run, records


def _profile(run, device: torch.device, steps: int = 3) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    meter = StepMeter(len(run.model.moe_layers()), 1)
    train_step(run, 0, meter, None)  # warm
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for s in range(steps):
            train_step(run, 100 + s, meter, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)
    top = [
        {
            "name": e.key[:90],
            "ms_per_step": (getattr(e, key, 0) or 0) / 1e3 / steps,
            "calls": e.count // steps,
        }
        for e in rows[:25]
    ]
    kernel_ms = 0.0
    if device.type == "cuda":
        kernel_ms = (
            sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3 / steps
        )
    return {"step_ms": wall * 1e3, "gpu_kernel_ms_per_step": kernel_ms, "top_ops": top}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--micro-batches", default="8,16", help="micro-batch sizes to try")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument(
        "--compile", default="on", choices=["on", "off", "both"], help="fuse RoPE (torch.compile)"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tune_allocator()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = measure_bf16_peak(device) if device.type == "cuda" else None
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    out = Path(tempfile.mkdtemp(prefix="train1gpu_"))
    rows, best = [], None
    compiles = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    for mb, comp in ((int(v), c) for v in args.micro_batches.split(",") for c in compiles):
        try:
            run, records = _run(args.preset, mb, comp, args.steps, device, peak, out)
        except Exception as exc:  # noqa: BLE001 - an OOM or a compiler failure is a result row
            rows.append(
                {"micro_batch": mb, "compile": comp, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            )
            continue
        tail = records[len(records) // 2 :]
        row = {
            "micro_batch": mb,
            "compile": comp,
            "tokens_per_step": run.spec.global_batch * run.spec.seq_len,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in tail),
            "step_ms": 1e3 * statistics.median(r["step_s"] for r in tail),
            "mfu": statistics.median(r["mfu"] for r in tail) if peak else None,
            "sched_us": None,  # one process plans nothing (the log records None)
            "loss_first": records[0]["loss"],
            "loss_last": records[-1]["loss"],
            "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if best is None or row["tokens_per_s"] > best[1]["tokens_per_s"]:
            best = (run, row)
        else:
            del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    profile_summary = _profile(best[0], device) if best else None
    if profile_summary:
        print(json.dumps({k: v for k, v in profile_summary.items() if k != "top_ops"}))
        for r in profile_summary["top_ops"][:15]:
            print(f"  {r['ms_per_step']:8.2f} ms  x{r['calls']:<4d} {r['name']}")
    model = best[0].model if best else None
    result = {
        "what": "micromoe train, one GPU, bf16 weights, LocalDispatcher + grouped GEMM experts",
        "preset": args.preset,
        "model": best[0].model_cfg.__dict__ if best else None,
        "params": model.num_params() if model else None,
        "flops_per_token": best[0].flops_per_token if best else None,
        "peak_bf16_flops_measured": peak,
        "rows": rows,
        "best": best[1] if best else None,
        "profile": profile_summary,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        or None,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
