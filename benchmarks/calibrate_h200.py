"""Measure the bundled cost models: `micromoe calibrate` for every shape we ship, in one process.

    PYTHONPATH=. python3 benchmarks/calibrate_h200.py --out OUT.json [--budget-s 25]

Writes one JSON {name: {"model": ..., "samples": ...}} (split into
micromoe/data/cost_models/<name>.json by `--install`). Slot counts and rows per GPU per shape are
the regimes the benchmarks and simulator use (8 GPUs, 2 replicas, 4096 tokens per GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from micromoe.plan.cost import BUNDLED_DIR, bundled_name
from micromoe.runtime.calibrate import Samples, calibrate, fit_samples

# (hidden, ffn, local slot counts, rows per GPU): what the model is, in the comment
SHAPES = [
    (3584, 2560, (8, 16, 32), (4096, 16384, 32768, 65536)),  # Qwen2-57B-A14B, 64 experts top-8
    (2048, 768, (16, 32, 64), (4096, 16384, 32768, 65536)),  # Qwen3-30B-A3B, 128 experts top-8
    (2048, 4096, (4, 8, 16), (2048, 4096, 8192, 16384, 32768)),  # our layer benchmark, 16 experts top-2
    (4096, 1536, (16, 32, 64), (4096, 16384, 32768, 65536)),  # Qwen3-235B-A22B, 128 experts top-8
    (2880, 2880, (4, 8, 16, 32), (2048, 4096, 8192, 16384, 32768)),  # GPT-OSS, 32/128 experts top-4
    (7168, 2048, (16, 32, 64), (4096, 16384, 32768, 65536)),  # DeepSeek-V3, 256 experts top-8
    (4096, 14336, (2, 4, 8), (2048, 8192, 16384, 32768)),  # Mixtral-8x7B, 8 experts top-2
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="combined JSON to write")
    ap.add_argument("--budget-s", type=float, default=25.0, help="seconds per shape (default 25)")
    ap.add_argument(
        "--install",
        type=Path,
        help="refit every model of a combined JSON from its stored samples (the current model form) "
        "and write the bundled model files",
    )
    ap.add_argument("--models-dir", type=Path, help="also write each model as <dir>/<name>.json")
    args = ap.parse_args()
    if args.install:
        BUNDLED_DIR.mkdir(parents=True, exist_ok=True)
        for name, entry in json.loads(args.install.read_text()).items():
            meta = {k: v for k, v in entry["model"]["meta"].items() if k not in ("fit", "heldout")}
            model = fit_samples(Samples.from_json(entry["samples"]), meta=meta)
            model.save(BUNDLED_DIR / f"{name}.json")
            held = model.meta["heldout"]
            print(f"installed {name}: tile {model.tile}, held-out median {held['median_rel_err']:.3f}")
        return 0
    out = {}
    t0 = time.perf_counter()
    for hidden, ffn, slots, totals in SHAPES:
        model, samples = calibrate(
            hidden, ffn, "cuda", slot_counts=slots, totals=totals, budget_s=args.budget_s
        )
        name = bundled_name(torch.cuda.get_device_name(), hidden, ffn)
        out[name] = {"model": model.to_json(), "samples": samples.to_json()}
        if args.models_dir:
            args.models_dir.mkdir(parents=True, exist_ok=True)
            model.save(args.models_dir / f"{name}.json")
        held = model.meta["heldout"]
        print(
            f"{name}: {len(samples.times_us)} samples, tile {model.tile}, held-out median "
            f"{held['median_rel_err']:.3f} p90 {held['p90_rel_err']:.3f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(out) + "\n")  # after every shape: a timeout keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main())
