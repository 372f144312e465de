"""One GPU: fp32 master weights (`--precision mixed`) against pure bf16 on the `small` preset, the
code before the ownership design as the throughput baseline, and the memory plan against the
measured peak of reduced-layer runs.

    PYTHONPATH=. python3 benchmarks/train_precision_gpu.py --json OUT.json [--steps 500] \\
        [--old-code DIR]        # DIR holds the earlier `micromoe` package (its throughput is "today's")

Each training run is `micromoe train` in a fresh process; from its log.jsonl: the last validation
loss, the median tokens/s over the steps after the first 10 (compilation and warm-up excluded),
and the peak allocated GPU memory. The memory plan (`micromoe.train.memory`) is compared without its
fixed runtime reserve, which `torch.cuda.max_memory_allocated` does not see.
`--preset tiny --steps 3 --device cpu` runs the same code on a CPU (smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _env  # benchmarks/ is on sys.path

REPO = Path(__file__).resolve().parents[1]


def train(out: Path, args: list[str], *, pythonpath: str | None = None) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": pythonpath or str(REPO)}
    cmd = [sys.executable, "-m", "micromoe", "train", "--out", str(out), "--no-report", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def summarize(log: list[dict]) -> dict:
    steady = [r["tokens_per_s"] for r in log[10:]] or [r["tokens_per_s"] for r in log]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    return {
        "steps": len(log),
        "final_loss": log[-1]["loss"],
        "val_loss": val[-1] if val else None,
        "val_losses": val,
        "tokens_per_s": statistics.median(steady),
        "max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in log), default=0.0),
    }


def precision_runs(tmp: Path, preset: str, steps: int, old_code: str | None) -> dict:
    common = ["--preset", preset, "--max-steps", str(steps), "--eval-interval", str(max(1, steps // 5))]
    common += ["--eval-batches", "8"]
    rows = {}
    for precision in ("mixed", "bf16"):
        rows[precision] = summarize(train(tmp / precision, [*common, "--precision", precision]))
        print(f"{precision}: {rows[precision]}", flush=True)
    if old_code:
        old_steps = min(steps, 60)
        log = train(
            tmp / "old",
            ["--preset", preset, "--max-steps", str(old_steps), "--eval-interval", "0"],
            pythonpath=old_code,
        )
        rows["before (bf16 weights and AdamW state)"] = summarize(log)
    return rows


def memory_runs(tmp: Path, preset: str, layers: int, seq_len: int | None) -> list[dict]:
    import torch

    from micromoe.model import preset as model_preset
    from micromoe.train.config import resolve
    from micromoe.train.memory import RUNTIME_RESERVE, device_capacity, plan_memory
    from micromoe.train.precision import resolve_precision

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for ac in ("none", "full"):
        flags = {"micro_batch": 1, "ac": ac}
        args = ["--preset", preset, "--layers", str(layers), "--micro-batch", "1", "--ac", ac]
        args += ["--max-steps", "3", "--eval-interval", "0", "--no-save"]
        overrides = {"num_layers": layers}
        if seq_len:
            args += ["--seq-len", str(seq_len)]
            overrides["seq_len"] = seq_len
        try:
            log = train(tmp / f"mem-{ac}", args)
        except RuntimeError as exc:
            print(exc, flush=True)
            rows.append({"ac": ac, "error": str(exc)[-3000:]})
            continue
        cfg = resolve(preset, flags)
        mcfg = model_preset(preset, **overrides)
        capacity, where = device_capacity(device, 1)
        plan = plan_memory(
            mcfg,
            cfg,
            resolve_precision("auto", device),
            world=1,
            layout=None,
            capacity=capacity,
            device=device.type,
            where=where,
        )
        planned = (plan.total - RUNTIME_RESERVE[device.type]) / 2**30
        measured = max(r.get("max_memory_gib", 0.0) for r in log)
        rows.append(
            {
                "preset": preset,
                "layers": layers,
                "ac": ac,
                "planned_gib": planned,
                "measured_peak_gib": measured,
                "ratio": measured / planned if planned else None,
                "items_gib": {i.name: i.bytes / 2**30 for i in plan.items},
            }
        )
        print(f"memory --ac {ac}: planned {planned:.2f} GiB, measured {measured:.2f} GiB", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--old-code", default=None, help="folder holding the earlier micromoe package")
    ap.add_argument("--memory-preset", default="qwen3-30b-a3b")
    ap.add_argument("--memory-layers", type=int, default=4)
    ap.add_argument("--memory-seq-len", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: precision, memory")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) - {""}
    result = {
        "env": {**_env.versions("python", "torch", "cuda"), "commit": _env.git_commit()},
        "command": sys.argv,
    }
    import torch

    result["env"]["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"

    def save() -> None:  # after every part: a run cut short keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="micromoe_precision_") as tmp:
        if "precision" not in skip:
            result["precision"] = precision_runs(Path(tmp), args.preset, args.steps, args.old_code)
            save()
        if "memory" not in skip:
            result["memory"] = memory_runs(
                Path(tmp), args.memory_preset, args.memory_layers, args.memory_seq_len
            )
            save()
    rows = {k: v for k, v in result.get("precision", {}).items() if "error" not in v}
    if rows:
        base = rows.get("before (bf16 weights and AdamW state)") or next(iter(rows.values()))
        print(f"{'run':<40} {'val loss':>9} {'tokens/s':>10} {'vs before':>9} {'peak GiB':>9}")
        for name, r in rows.items():
            val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            print(
                f"{name:<40} {val:>9} {r['tokens_per_s']:>10,.0f} {ratio:>9.3f} {r['max_memory_gib']:>9.2f}"
            )
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
