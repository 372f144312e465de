"""`micromoe calibrate`: measure this device's expert-GEMM cost model for one hidden/FFN shape.

    micromoe calibrate --hidden 4096 --ffn 1536 --out h200-4096x1536.json

Times `GroupedSwiGLU` forward+backward (bf16 on CUDA, fp32 on CPU) over designed per-slot row
distributions, fits `micromoe.plan.cost.CostModel` and writes it as JSON (with the GPU, versions,
shape and held-out fit error). Pass the file, or a bundled name, to `--cost-model` options.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the sampled grid's defaults, shown by --help as typed on the command line
SLOTS = (8, 16, 32)
ROWS = (2048, 8192, 16384, 32768, 65536)


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `micromoe calibrate`."""
    parser.add_argument("--hidden", type=int, required=True, metavar="H", help="model hidden size")
    parser.add_argument("--ffn", type=int, required=True, metavar="F", help="expert FFN hidden size")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="cost-model JSON to write")
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="device to time on; auto: cuda when available, else cpu (default %(default)s)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=30.0,
        metavar="S",
        help="stop taking new samples after this many seconds (at least 12 samples; default %(default)s)",
    )
    parser.add_argument(
        "--slots",
        type=_int_list,
        default=list(SLOTS),
        metavar="S1,S2,...",
        help=f"local slot counts per GPU to sample (default {_csv(SLOTS)})",
    )
    parser.add_argument(
        "--rows",
        type=_int_list,
        default=list(ROWS),
        metavar="N1,N2,...",
        help=f"rows per GPU to sample (default {_csv(ROWS)})",
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions per sample (median; default %(default)s)"
    )
    parser.add_argument(
        "--samples-out", type=Path, default=None, metavar="FILE", help="also write the raw timed samples"
    )


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at the top: `micromoe --help` and other commands build this
    # parser and should not pay for importing torch
    import torch

    from micromoe.runtime.calibrate import calibrate

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; pass --device cpu")
    if args.budget_s <= 0 or args.reps < 1:
        raise ValueError(f"--budget-s must be > 0 and --reps >= 1, got {args.budget_s} and {args.reps}")
    model, samples = calibrate(
        args.hidden,
        args.ffn,
        args.device,
        slot_counts=args.slots,
        totals=args.rows,
        budget_s=args.budget_s,
        reps=args.reps,
    )
    model.save(args.out)
    if args.samples_out is not None:
        args.samples_out.write_text(json.dumps(samples.to_json()) + "\n")
    fit, held = model.meta["fit"], model.meta["heldout"]
    print(
        f"{model.meta['gpu']} {args.hidden}x{args.ffn}: {fit['samples'] + held['samples']} samples in "
        f"{model.meta['seconds']:.1f} s; held-out relative error median {held['median_rel_err']:.3f} "
        f"p90 {held['p90_rel_err']:.3f}; tile {model.tile}; wrote {args.out}"
    )
    return 0
