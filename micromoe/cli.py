"""The `micromoe` command: subcommands for simulation, calibration, training, tokenizing and export.

Each subcommand lives with the layer it drives and exposes `add_arguments(parser)` and
`run(args) -> int`; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from micromoe import __version__
from micromoe.allocator import tune_allocator
from micromoe.errors import CommandError

# name -> (module, one-line help); modules are imported only when their subcommand runs
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("micromoe.sim.command", "compare load balancers on routing traces or Zipf skews"),
    "calibrate": ("micromoe.runtime.calibrate_command", "measure this GPU's expert-GEMM cost model"),
    "train": ("micromoe.train.command", "train a MoE transformer with plain EP or MicroEP (CPU or GPUs)"),
    "tokenize": (
        "micromoe.train.tokenize",
        "tokenize text with a Hugging Face model's tokenizer into a .bin",
    ),
    "export": ("micromoe.train.export", "write a training run's checkpoint as a Hugging Face model folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micromoe",
        description="MicroMoE: Mixture-of-Experts with fine-grained, per-micro-batch load balancing.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"micromoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the process was started for this command (not a call from Python): its start-up is the
    # command's, e.g. for calibrate's --budget-s
    args._own_process = argv is None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    if args.command is None:
        parser.print_help()
        return 2
    tune_allocator()  # commands schedule every micro-batch: keep their arrays off fresh pages
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as exc:  # user mistakes: one clear line, no traceback
        print(f"micromoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:  # the job failed (a rank stalled or died): one line naming why
        print(f"micromoe {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
