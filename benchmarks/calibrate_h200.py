"""Measure the bundled cost models: `micromoe calibrate` for every shape we ship, in one process.

    PYTHONPATH=. python3 benchmarks/calibrate_h200.py --out OUT.json [--budget-s 25]

Writes one JSON {name: {"model": ..., "samples": ...}} (split into
micromoe/data/cost_models/<name>.json by `--install`).

With `--emulated RESULTS --plans PLANS` (the timed plans of `bench_emulated.py`), `--install` fits
the shapes that have emulated timings jointly on the calibration samples and those per-GPU timings
of real plans (each set weighted 1 in total), with the shape terms of `micromoe.plan.cost`; the
other shapes keep the designed-split fit. `--validate` instead prints held-out errors: each
emulated workload predicted by a model fitted without it (leave one workload out). Slot counts and rows per GPU per shape are
the regimes the benchmarks and simulator use (8 GPUs, 2 replicas, 4096 tokens per GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_emulated import ideal_rows, padded, predictions, summarize  # benchmarks/ is on sys.path

from micromoe.plan.cost import BUNDLED_DIR, CostModel, bundled_name, fit_cost_model, relative_errors
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


def emulated_samples(plans: dict, results: dict) -> dict[str, list[tuple[str, np.ndarray, float]]]:
    """Per bundled name: (workload, padded rows int64 [S], measured us) of every timed simulated GPU."""
    by_name = {c["spec"]["name"]: c for c in plans["cases"]}
    out: dict[str, list] = {}
    for r in results["cases"]:
        spec, case = r["spec"], by_name[r["spec"]["name"]]
        name = bundled_name(results["hardware"]["gpu"], spec["hidden"], spec["ffn"])
        for v, times_KG in r["measured_us"].items():
            for k, times in enumerate(times_KG):
                if v == "ideal":
                    one = ideal_rows(case["totals"][k], spec["gpus"], case["slots_per_gpu"])
                    rows_GS = np.tile(one, (spec["gpus"], 1))
                else:
                    rows_GS = padded(np.asarray(case["rows"][v][k], dtype=np.int64))
                out.setdefault(name, []).extend(
                    (spec["name"], g, t) for g, t in zip(rows_GS, times, strict=True)
                )
    return out


def joint_fit(samples: Samples, emulated: list, tile: int, meta: dict) -> CostModel:
    """Fit with shape terms on the calibration training samples plus emulated GPUs (each set
    weighted 1 in total); calibration held-out errors in meta['heldout']."""
    train = ~samples.heldout
    s_max = max(samples.rows.shape[1], max(len(e[1]) for e in emulated))
    rows = np.zeros((int(train.sum()) + len(emulated), s_max), dtype=np.int64)
    rows[: train.sum(), : samples.rows.shape[1]] = samples.rows[train]
    for i, (_, r, _) in enumerate(emulated):
        rows[train.sum() + i, : len(r)] = r
    slots = np.concatenate([samples.slots[train], [len(e[1]) for e in emulated]])
    times = np.concatenate([samples.times_us[train], [e[2] for e in emulated]])
    weights = np.concatenate(
        [np.full(train.sum(), train.sum() ** -0.5), np.full(len(emulated), len(emulated) ** -0.5)]
    )
    model = fit_cost_model(
        rows, times, tile=tile, meta=meta, num_slots_N=slots, weights_N=weights, shape_terms=True
    )
    test = samples.heldout
    err = relative_errors(model, samples.rows[test], samples.times_us[test], samples.slots[test])
    heldout = {
        "samples": int(test.sum()),
        "median_rel_err": float(np.median(err)),
        "p90_rel_err": float(np.quantile(err, 0.9)),
    }
    workloads = sorted({e[0] for e in emulated})
    meta_out = {
        **model.meta,
        "heldout": heldout,
        "emulated": {"samples": len(emulated), "workloads": workloads},
    }
    return CostModel(**{**model.__dict__, "meta": meta_out})


def ratio_errors(case: dict, timed: dict, model: CostModel) -> tuple[float, float, float]:
    """(median per-GPU error, median over variants of |predicted - measured| ratio to the ideal
    with the ideal's mean, the same with the ideal's max) of one emulated workload."""
    summary = summarize(case, {**timed, "predicted_us": predictions(case, model)})
    per_gpu = np.median([v["model_median_err"] for v in summary.values()])
    to_mean = np.median([abs(v["predicted_vs_ideal"] - v["vs_ideal_mean"]) for v in summary.values()])
    to_max = np.median([abs(v["predicted_vs_ideal"] - v["vs_ideal"]) for v in summary.values()])
    return float(per_gpu), float(to_mean), float(to_max)


def validate(calib: dict, plans: dict, results: dict) -> None:
    """Leave one emulated workload out: the designed-split fit (what the bundled models were)
    against the joint fit with shape terms, both scored on the workload left out."""
    emulated = emulated_samples(plans, results)
    by_name = {c["spec"]["name"]: c for c in plans["cases"]}
    print(
        f"{'model':<16}{'workload':<26}{'per-GPU err':>22}{'ratio err (ideal mean)':>26}{'(ideal max)':>16}"
    )
    for name, emu in emulated.items():
        samples = Samples.from_json(calib[name]["samples"])
        base = fit_samples(samples, meta={})
        for r in (r for r in results["cases"] if r["model"] and r["model"].endswith(name)):
            held = r["spec"]["name"]
            joint = joint_fit(samples, [e for e in emu if e[0] != held], base.tile, {})
            before = ratio_errors(by_name[held], r, base)
            after = ratio_errors(by_name[held], r, joint)
            cells = "".join(
                f"{100 * b:>11.1f}% ->{100 * a:>5.1f}%" for b, a in zip(before, after, strict=True)
            )
            print(f"{name:<16}{held:<26}{cells}", flush=True)


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
    ap.add_argument("--emulated", type=Path, help="install, validate: timed emulation results JSON")
    ap.add_argument("--plans", type=Path, help="install, validate: the plans JSON of --emulated")
    ap.add_argument("--validate", type=Path, help="calibration JSON: print leave-one-workload-out errors")
    args = ap.parse_args()
    if (args.emulated is None) != (args.plans is None):
        ap.error("--emulated and --plans go together")
    if args.validate:
        if args.emulated is None:
            ap.error("--validate needs --emulated and --plans")
        calib, plans = json.loads(args.validate.read_text()), json.loads(args.plans.read_text())
        validate(calib, plans, json.loads(args.emulated.read_text()))
        return 0
    if args.install:
        BUNDLED_DIR.mkdir(parents=True, exist_ok=True)
        emulated = {}
        if args.emulated:
            emulated = emulated_samples(
                json.loads(args.plans.read_text()), json.loads(args.emulated.read_text())
            )
        for name, entry in json.loads(args.install.read_text()).items():
            meta = {
                k: v for k, v in entry["model"]["meta"].items() if k not in ("fit", "heldout", "emulated")
            }
            samples = Samples.from_json(entry["samples"])
            model = fit_samples(samples, meta=meta)
            if name in emulated:
                model = joint_fit(samples, emulated[name], model.tile, meta)
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
