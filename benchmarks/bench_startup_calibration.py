"""Start-up calibration (`cost_model='auto'`) as a training run pays it: in a fresh process.

For every shape, a child process imports torch, then runs `calibrate_cost_model` with the
dispatcher's budget (`AUTO_BUDGET_S`) twice: first as the process's first CUDA work (what
`micromoe train --cost-model auto` does before its first step), then again warm. Reported per
call: wall seconds, the one-time warm-up before the budget (`startup_seconds`), samples taken and
the held-out median error of the fit.

    PYTHONPATH=. python3 benchmarks/bench_startup_calibration.py --json OUT.json       # on a GPU
    PYTHONPATH=. python3 benchmarks/bench_startup_calibration.py --device cpu --shapes 32x64 --slots 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _env  # benchmarks/ (this script's folder) is on sys.path

REPO = Path(__file__).resolve().parents[1]
SHAPES = [
    (3584, 2560, 16),
    (2048, 4096, 8),
    (2048, 768, 32),
]  # (hidden, ffn, local slots): as measured before


def child(hidden: int, ffn: int, slots: int, device: str) -> dict:
    """Runs in the fresh process: two calibrations, each timed from the call to the model."""
    t0 = time.perf_counter()
    import torch  # imported here to time it apart: every training process pays it anyway

    from micromoe.runtime.calibrate import calibrate_cost_model
    from micromoe.runtime.cost_select import AUTO_BUDGET_S

    out = {"import_s": time.perf_counter() - t0, "budget_s": AUTO_BUDGET_S, "calls": []}
    for when in ("first CUDA work", "warm"):
        t1 = time.perf_counter()
        model = calibrate_cost_model(
            hidden, ffn, torch.device(device), budget_s=AUTO_BUDGET_S, num_slots=slots
        )
        meta = model.meta
        out["calls"].append(
            {
                "when": when,
                "wall_s": time.perf_counter() - t1,
                "startup_s": meta["startup_seconds"],
                "samples": meta["fit"]["samples"] + meta["heldout"]["samples"],
                "heldout_median_err": meta["heldout"]["median_rel_err"],
            }
        )
    return out


def run_shape(hidden: int, ffn: int, slots: int, device: str) -> dict:
    """One fresh Python process for one shape; its JSON answer."""
    cmd = [sys.executable, __file__, "--child", f"{hidden}x{ffn}", "--slots", str(slots), "--device", device]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"calibration child for {hidden}x{ffn} failed:\n{done.stderr[-2000:]}")
    return {"hidden": hidden, "ffn": ffn, "slots": slots, **json.loads(done.stdout.splitlines()[-1])}


def _shape(text: str) -> tuple[int, int]:
    h, f = text.lower().split("x")
    return int(h), int(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default=None, help="comma-separated HxF (default: the three measured before)")
    ap.add_argument("--slots", type=int, default=None, help="local slots per GPU (default: per shape)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*_shape(args.child), args.slots, args.device)))
        return 0
    shapes = SHAPES
    if args.shapes:
        shapes = [(*_shape(s), args.slots or 16) for s in args.shapes.split(",")]
    elif args.slots:
        shapes = [(h, f, args.slots) for h, f, _ in SHAPES]
    rows = [run_shape(h, f, s, args.device) for h, f, s in shapes]
    print(
        f"{'shape':>10} {'slots':>5} {'call':>16} {'wall s':>7} {'warm-up s':>9} {'samples':>7} {'held-out err':>12}"
    )
    for r in rows:
        for c in r["calls"]:
            shape = f"{r['hidden']}x{r['ffn']}"
            print(
                f"{shape:>10} {r['slots']:>5} {c['when']:>16} {c['wall_s']:>7.2f} "
                f"{c['startup_s']:>9.2f} {c['samples']:>7} {100 * c['heldout_median_err']:>11.1f}%"
            )
    if args.json:
        env = {"device": args.device, **_env.versions("python", "torch", "cuda"), "commit": _env.git_commit()}
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
