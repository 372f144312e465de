"""The workloads `micromoe simulate` runs, built and checked from its parsed options.

Zipf loads (`--zipf`), aggregate traces (sampled into micro-batches) and per-micro-batch routing
logs (replayed as logged); every option is checked here, before any work, with a ValueError that
names the flag.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from micromoe.sim.traces import AggregateTrace, load_trace
from micromoe.sim.workload import Workload, workload_from_aggregate, workload_from_routing, workload_from_zipf

DEFAULT_TRACE = "counts57b.json"
DEFAULT_GPUS = 8
TRACE_TOP_K = 8  # the bundled Qwen2-57B-A14B traces route every token to 8 experts
ZIPF_TOP_K = 2  # the paper's Zipf experiments use top-2 models


def build_workloads(args: argparse.Namespace) -> tuple[list[Workload], dict[str, Any]]:
    """The workloads to run and the resolved configuration (printed and saved with the results)."""
    if args.zipf is not None and args.trace:
        raise ValueError("pass either --trace or --zipf, not both")
    _positive(args, "replicas", "tokens_per_gpu", "micro_batches", "experts", "layers", "ar_interval")
    if args.gpus is not None:
        _positive(args, "gpus")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.top_k is not None:
        _positive(args, "top_k")
    if args.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {args.seed}")
    gpus = args.gpus if args.gpus is not None else DEFAULT_GPUS
    sampling = dict(
        num_micro_batches=args.micro_batches + args.warmup,
        tokens_per_gpu=args.tokens_per_gpu,
        noise=args.noise,
        drift=args.drift,
        seed=args.seed,
        stream=True,  # sample each micro-batch when it is run: memory holds one, not all M
    )
    if args.zipf is not None:
        workloads, config = _zipf_workloads(args, gpus, sampling)
    else:
        workloads, config = _trace_workloads(args, gpus, sampling)
    gpus = workloads[0].num_gpus
    if args.gpus_per_node is not None and (args.gpus_per_node < 1 or gpus % args.gpus_per_node):
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} must be positive and divide the {gpus} GPUs")
    return workloads, {
        "gpus": gpus,
        "replicas": args.replicas,
        "gpus_per_node": args.gpus_per_node,
        "tokens_per_gpu": args.tokens_per_gpu,
        "micro_batches": args.micro_batches,
        **config,
        "warmup": args.warmup,
        "noise": args.noise,
        "drift": args.drift,
        "seed": args.seed,
        "lplb_topology": args.lplb_topology,
        "lplb_solver": args.lplb_solver,
        "ar_interval": args.ar_interval,
    }


def _zipf_workloads(
    args: argparse.Namespace, gpus: int, sampling: dict[str, Any]
) -> tuple[list[Workload], dict[str, Any]]:
    zipf = _parse_floats(args.zipf, "--zipf")
    top_k = args.top_k or ZIPF_TOP_K
    workloads = [
        workload_from_zipf(
            s,
            num_experts=args.experts,
            num_layers=args.layers,
            num_gpus=gpus,
            top_k=top_k,
            shuffle=args.hot_experts == "random",
            **sampling,
        )
        for s in zipf
    ]
    return workloads, {
        "zipf": zipf,
        "experts": args.experts,
        "layers": args.layers,
        "hot_experts": args.hot_experts,
        "top_k": top_k,
    }


def _trace_workloads(
    args: argparse.Namespace, gpus: int, sampling: dict[str, Any]
) -> tuple[list[Workload], dict[str, Any]]:
    """Aggregate traces are sampled; routing logs are replayed (--micro-batches does not apply)."""
    workloads = []
    for name in args.trace or [DEFAULT_TRACE]:
        trace = load_trace(_resolve_trace(name))
        if isinstance(trace, AggregateTrace):
            top_k = args.top_k or trace.top_k or TRACE_TOP_K
            workloads.append(workload_from_aggregate(trace, num_gpus=gpus, top_k=top_k, **sampling))
        else:
            workloads.append(workload_from_routing(trace, num_gpus=args.gpus, top_k=0))
    _check_same_gpus(workloads, args.gpus)
    ks = sorted({w.top_k for w in workloads if w.top_k})
    replayed = {w.name: w.num_micro_batches - args.warmup for w in workloads if not w.top_k}
    config: dict[str, Any] = {
        "traces": [w.name for w in workloads],
        # replayed routing logs carry no top-k (None) and their own number of micro-batches
        "top_k": (ks[0] if len(ks) == 1 else ks) if ks else None,
    }
    if replayed:
        measured = {*replayed.values(), *([args.micro_batches] if ks else [])}
        config["micro_batches"] = measured.pop() if len(measured) == 1 else replayed
    return workloads, config


def _check_same_gpus(workloads: list[Workload], gpus_flag: int | None) -> None:
    """One run, one group size: say how to get there (routing logs keep their recorded GPUs)."""
    sizes = {w.name: w.num_gpus for w in workloads}
    if len(set(sizes.values())) == 1:
        return
    logged = {w.num_gpus for w in workloads if not w.top_k}
    if len(logged) > 1 or gpus_flag is not None:
        fix = "routing logs replay on the GPU count they were recorded with: run them separately"
    else:
        fix = f"pass --gpus {logged.pop()} to sample the aggregate traces on the routing log's GPUs"
    raise ValueError(f"all traces of one run need the same number of GPUs, got {sizes}; {fix}")


def _resolve_trace(name: str) -> Path:
    """A path as given, else a bundled trace of that name (micromoe/data/traces/)."""
    path = Path(name)
    if path.exists():
        return path
    bundled = resources.files("micromoe") / "data" / "traces" / path.name
    if bundled.is_file():
        return Path(str(bundled))
    raise ValueError(f"trace {name!r} not found (neither a file nor a bundled trace like {DEFAULT_TRACE})")


def _parse_floats(text: str, flag: str) -> list[float]:
    out = []
    for tok in text.split(","):
        try:
            out.append(float(tok))
        except ValueError:
            raise ValueError(
                f"{flag}: {tok.strip()!r} is not a number; give a comma-separated list like 0,0.5,1"
            ) from None
    return out


def _positive(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        v = getattr(args, n)
        if v < 1:
            raise ValueError(f"--{n.replace('_', '-')} must be >= 1, got {v}")
