"""`micromoe calibrate`: measure this device's expert-GEMM cost model for one hidden/FFN shape.

    micromoe calibrate --hidden 4096 --ffn 1536 --out h200-4096x1536.json

Times `GroupedSwiGLU` forward+backward (bf16 on CUDA, fp32 on CPU) over designed per-slot row
distributions, fits `micromoe.plan.cost.CostModel` and writes it as JSON (with the GPU, versions,
shape and held-out fit error). Pass the file, or a bundled name, to `--cost-model` options.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from micromoe.paths import check_writable_file, same_path
from micromoe.runtime.calibrate_design import ALIGN

log = logging.getLogger("micromoe")
START_UP_MAX_S = 60.0  # no command takes longer to start; an older process is not ours
EXIT_S = 0.4  # kept for writing the model and the interpreter's exit (unloading torch)

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
        help="seconds the whole command may take (loading, warm-up, samples and fit; at least 12 samples "
        "must fit, default %(default)s)",
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
    """Check the options and output paths, say what is measured where, measure within the budget
    (from this call's start: loading torch, the warm-up and the fit count), write the model."""
    # the budget counts from the command's start: the interpreter's start-up and imports too
    started = time.perf_counter() - (_start_up_s() if getattr(args, "_own_process", False) else 0.0)
    _check_options(args)
    # torch is imported here, not at the top: `micromoe --help` and other commands build this
    # parser and should not pay for importing torch
    import torch

    from micromoe.runtime.calibrate import calibrate

    device = _device(args.device, torch.cuda.is_available())
    _check_memory(args, device)
    log.info("calibrate: %s", _where(device, args, fell_back=args.device == "auto" and device == "cpu"))
    progress = _Progress(args.budget_s)
    try:
        model, samples = _calibrate(calibrate, args, device, started, progress)
    finally:
        progress.close()
    model.save(args.out)
    if args.samples_out is not None:
        args.samples_out.write_text(json.dumps(samples.to_json()) + "\n")
    fit, held = model.meta["fit"], model.meta["heldout"]
    print(
        f"{model.meta['gpu']} {args.hidden}x{args.ffn}: {fit['samples'] + held['samples']} samples in "
        f"{time.perf_counter() - started:.1f} s; held-out relative error median {held['median_rel_err']:.3f} "
        f"p90 {held['p90_rel_err']:.3f}; tile {model.tile}; wrote {args.out}"
    )
    return 0


def _calibrate(calibrate, args: argparse.Namespace, device: str, started: float, progress) -> tuple:
    """`calibrate` in what is left of the budget; too small a budget is named by its flag."""
    try:
        return calibrate(
            args.hidden,
            args.ffn,
            device,
            slot_counts=args.slots,
            totals=args.rows,
            budget_s=args.budget_s - EXIT_S - (time.perf_counter() - started),
            reps=args.reps,
            count_startup=True,
            progress=progress,
        )
    except ValueError as exc:
        raise ValueError(f"--budget-s {args.budget_s:g}: {exc}") from None


def _start_up_s() -> float:
    """Seconds this process (started for this command) spent before `run`: interpreter start-up
    and imports count against the budget, as the user's clock sees them. 0 where /proc is missing
    or the age is implausible (over START_UP_MAX_S)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
    return age if 0.0 <= age <= START_UP_MAX_S else 0.0


def _check_options(args: argparse.Namespace) -> None:
    """ValueError naming the flag of the first bad value or unwritable output (before any work)."""
    for flag, value in (("--hidden", args.hidden), ("--ffn", args.ffn), ("--reps", args.reps)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise ValueError(f"--budget-s must be a finite number of seconds > 0, got {args.budget_s}")
    if min(args.rows) < ALIGN:
        raise ValueError(f"--rows must be >= {ALIGN} (one aligned block of rows), got {min(args.rows)}")
    check_writable_file(args.out, "--out")
    if args.samples_out is not None:
        if same_path(args.samples_out, args.out):
            raise ValueError(f"--samples-out {str(args.samples_out)!r} is also --out; give two files")
        check_writable_file(args.samples_out, "--samples-out")


def _device(choice: str, cuda: bool) -> str:
    if choice == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device here; pass --device cpu")
    return "cuda" if choice == "auto" and cuda else ("cpu" if choice == "auto" else choice)


def _check_memory(args: argparse.Namespace, device: str) -> None:
    """Refuse a shape whose timer cannot fit: inputs and gradients of the largest sample and the
    expert weights of the largest slot count (a lower bound of what `ExpertTimer` allocates)."""
    import torch

    width = 2 if device == "cuda" else 4
    rows = max(args.rows) + 144 * max(args.slots)
    need = width * (2 * rows * args.hidden + 2 * 3 * max(args.slots) * args.hidden * args.ffn)
    if device == "cuda":
        have = torch.cuda.get_device_properties(0).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(
            f"timing {max(args.slots)} slots of {args.hidden}x{args.ffn} at {max(args.rows)} rows needs at "
            f"least {need / 2**30:.1f} GiB, the {device} has {have / 2**30:.1f} GiB; use smaller --rows, "
            "--slots or shape"
        )


def _where(device: str, args: argparse.Namespace, *, fell_back: bool) -> str:
    """What is timed where, in words (and plainly when there was no GPU to measure)."""
    import torch

    shape = f"expert GEMMs {args.hidden}x{args.ffn} (forward+backward)"
    if device == "cuda":
        return f"timing {shape} on {torch.cuda.get_device_name(0)} (cuda:0, bfloat16), budget {args.budget_s:g} s"
    text = f"timing {shape} on the CPU (float32, one thread), budget {args.budget_s:g} s"
    if fell_back:
        text += "; no CUDA device found: this model predicts CPU runs only (run it on the GPU to model)"
    return text


class _Progress:
    """Progress against the time budget: a tqdm bar on a terminal, otherwise a line at the first
    sample and then every EVERY_S."""

    EVERY_S = 5.0

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.last = budget_s, -float("inf")
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # optional UI dependency, only on a terminal

            self.bar = tqdm(total=round(budget_s, 1), unit="s", desc="calibrate", leave=False)

    def __call__(self, samples: int, elapsed_s: float) -> None:
        if self.bar is not None:
            self.bar.n = round(min(elapsed_s, self.budget_s), 1)
            self.bar.set_postfix_str(f"{samples} samples")
        elif time.monotonic() - self.last >= self.EVERY_S:
            self.last = time.monotonic()
            log.info("calibrate: %d samples, %.0f of %g s", samples, elapsed_s, self.budget_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
