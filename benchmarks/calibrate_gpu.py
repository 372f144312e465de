"""Measure the bundled cost models: `micromoe calibrate` for every shape we ship, in one process.

    PYTHONPATH=. python3 benchmarks/calibrate_gpu.py --out OUT.json [--budget-s 25]

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

from micromoe.plan.cost import BUNDLED_DIR, CostModel, bundled_name, fit_cost_model
from micromoe.runtime.calibrate import Samples, calibrate, fit_samples, heldout_errors

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


def emulated_samples(plans: dict, results: dict) -> dict[str, list[tuple[str, int, np.ndarray, float]]]:
    """Per bundled name: (workload, sample k, padded rows int64 [S], measured us) of every timed
    simulated GPU."""
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
                    (spec["name"], k, g, t) for g, t in zip(rows_GS, times, strict=True)
                )
    return out


def joint_fit(samples: Samples, emulated: list, tile: int, meta: dict) -> CostModel:
    """Fit with shape terms on the calibration training samples plus emulated GPUs (each set
    weighted 1 in total); calibration held-out errors in meta['heldout']."""
    train = ~samples.heldout
    n_cal = int(train.sum())
    s_max = max(samples.rows.shape[1], max(len(e[2]) for e in emulated))
    rows = np.zeros((n_cal + len(emulated), s_max), dtype=np.int64)
    rows[:n_cal, : samples.rows.shape[1]] = samples.rows[train]
    for i, e in enumerate(emulated):
        rows[n_cal + i, : len(e[2])] = e[2]
    slots = np.concatenate([samples.slots[train], [len(e[2]) for e in emulated]])
    times = np.concatenate([samples.times_us[train], [e[3] for e in emulated]])
    weights = np.concatenate([np.full(n_cal, n_cal**-0.5), np.full(len(emulated), len(emulated) ** -0.5)])
    model = fit_cost_model(
        rows, times, tile=tile, meta=meta, num_slots_N=slots, weights_N=weights, shape_terms=True
    )
    heldout = heldout_errors(model, samples)
    workloads = sorted({e[0] for e in emulated})
    meta_out = {
        **model.meta,
        "heldout": heldout,
        "emulated": {"samples": len(emulated), "workloads": workloads},
    }
    return CostModel(**{**model.__dict__, "meta": meta_out})


def errors(case: dict, timed: dict, predicted_us: dict) -> tuple[float, float, float, float]:
    """Of one emulated workload, medians over its variants of: the median per-GPU error;
    |predicted - measured| ratio to the ideal (measured: slowest GPU / the ideal's mean, as
    `bench_emulated.py` reports it; predicted: slowest / the ideal's prediction); the same with the
    ideal's max (both sides maxima of noisy timings); |predicted - measured| ratio to EPLB."""
    summary = summarize(case, {**timed, "predicted_us": predicted_us})
    meas = {v: np.asarray(t).max(axis=1) for v, t in timed["measured_us"].items()}
    pred = {v: np.asarray(t).max(axis=1) for v, t in predicted_us.items()}
    to_eplb = [
        abs(np.median(pred[v] / pred["eplb"]) - np.median(meas[v] / meas["eplb"]))
        for v in meas
        if v != "eplb"
    ]
    return (
        float(np.median([v["model_median_err"] for v in summary.values()])),
        float(np.median([abs(v["predicted_vs_ideal"] - v["vs_ideal_mean"]) for v in summary.values()])),
        float(np.median([abs(v["predicted_vs_ideal"] - v["vs_ideal"]) for v in summary.values()])),
        float(np.median(to_eplb)),
    )


def validate(calib: dict, plans: dict, results: dict) -> None:
    """Held-out errors of the joint fit against the designed-split fit (what the bundled models
    were before), on emulated timings the joint fit did not see. Two splits: leave one workload
    out; and by sample (fit on the even samples k of every workload, predict the odd ones, and the
    reverse)."""
    emulated = emulated_samples(plans, results)
    by_name = {c["spec"]["name"]: c for c in plans["cases"]}
    cols = ("per-GPU err", "ratio/ideal mean", "ratio/ideal max", "ratio/EPLB")
    print(f"{'split':<9}{'model':<16}{'workload':<25}" + "".join(f"{c:>18}" for c in cols))
    for split in ("workload", "sample"):
        for name, emu in emulated.items():
            samples = Samples.from_json(calib[name]["samples"])
            base = fit_samples(samples, meta={})
            for r in (r for r in results["cases"] if r["model"] and r["model"].endswith(name)):
                case = by_name[r["spec"]["name"]]
                if split == "workload":
                    joint = joint_fit(
                        samples, [e for e in emu if e[0] != case["spec"]["name"]], base.tile, {}
                    )
                    after = predictions(case, joint)
                else:  # parity p's model predicts the samples of the other parity
                    fits = [
                        joint_fit(samples, [e for e in emu if e[1] % 2 == p], base.tile, {}) for p in (0, 1)
                    ]
                    by_fit = [predictions(case, m) for m in fits]
                    after = {
                        v: [by_fit[1 - k % 2][v][k] for k in range(len(t))] for v, t in by_fit[0].items()
                    }
                before = errors(case, r, predictions(case, base))
                now = errors(case, r, after)
                cells = "".join(
                    f"{100 * b:>10.1f} ->{100 * a:>4.1f}" for b, a in zip(before, now, strict=True)
                )
                print(f"{split:<9}{name:<16}{case['spec']['name']:<25}{cells}", flush=True)


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
