"""`micromoe simulate`: compare load balancers on routing traces or Zipf-skewed loads.

With no arguments it runs the bundled Qwen2-57B trace (counts57b.json) on 8 GPUs with 2 replicas.
Trace files are aggregate counts (sampled into micro-batches) or per-micro-batch routing logs
(replayed as is); see `micromoe/sim/traces.py` for both formats and `workload.py` for the noise model.
"""

from __future__ import annotations

import argparse
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from micromoe.plan.cost import bundled_models
from micromoe.plan.cost import load as load_cost_model
from micromoe.sim.balancers import BALANCERS, GroupConfig
from micromoe.sim.lplb import TOPOLOGIES
from micromoe.sim.outputs import check_outputs
from micromoe.sim.report import build_report, format_report, write_json
from micromoe.sim.runner import simulate
from micromoe.sim.traces import AggregateTrace, load_trace
from micromoe.sim.workload import Workload, workload_from_aggregate, workload_from_routing, workload_from_zipf

log = logging.getLogger(__name__)

DEFAULT_TRACE = "counts57b.json"
DEFAULT_GPUS = 8
TRACE_TOP_K = 8  # the bundled Qwen2-57B-A14B traces route every token to 8 experts
ZIPF_TOP_K = 2  # the paper's Zipf experiments use top-2 models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `micromoe simulate`, in four groups."""
    _add_workload_arguments(parser)
    _add_group_arguments(parser)
    _add_balancer_arguments(parser)
    _add_output_arguments(parser)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("workload (default: the bundled counts57b.json trace)")
    src.add_argument(
        "--trace",
        action="append",
        metavar="FILE",
        default=None,
        help="aggregate counts JSON or JSON-lines routing log; repeat for several; a bare "
        "name like counts57b_share.json also finds the bundled traces",
    )
    src.add_argument(
        "--zipf",
        metavar="S1,S2,...",
        default=None,
        help="synthetic loads instead of traces: P(i-th most loaded expert) ~ i^-s, one workload per s",
    )
    src.add_argument(
        "--experts", type=int, default=32, metavar="E", help="experts per layer for --zipf (default 32)"
    )
    src.add_argument(
        "--hot-experts",
        choices=("random", "first"),
        default="random",
        help="--zipf: which expert ids are hot: random per layer (default) or expert i = (i+1)-th most loaded",
    )
    src.add_argument(
        "--layers",
        type=int,
        default=4,
        metavar="L",
        help="layers for --zipf, each with its own hot experts (default 4)",
    )


def _add_group_arguments(parser: argparse.ArgumentParser) -> None:
    grp = parser.add_argument_group("group and batch")
    grp.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="G",
        help=f"GPUs in the MicroEP group (default {DEFAULT_GPUS}; a routing log's own GPU count)",
    )
    grp.add_argument(
        "--replicas",
        type=int,
        default=2,
        metavar="d",
        help="replicas per expert: slots = experts x d (default 2)",
    )
    grp.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        metavar="n",
        help="GPUs per node, to report off-node traffic",
    )
    grp.add_argument(
        "--tokens-per-gpu",
        type=int,
        default=4096,
        metavar="N",
        help="tokens per GPU per micro-batch when sampling (default 4096)",
    )
    grp.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="k",
        help=f"experts per token when sampling (default: the trace's top_k, else {TRACE_TOP_K}; {ZIPF_TOP_K} for --zipf)",
    )
    grp.add_argument(
        "--micro-batches",
        type=int,
        default=32,
        metavar="M",
        help="micro-batches to sample per workload (default 32; a routing log replays all of its own)",
    )
    grp.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="W",
        help="micro-batches run first but not measured (adaptive balancers learn from them; default 0)",
    )
    grp.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="per-source-GPU log-normal noise on expert shares (default 0.1)",
    )
    grp.add_argument(
        "--drift",
        type=float,
        default=0.1,
        help="std of the slow, shared drift of log expert shares (default 0.1)",
    )
    grp.add_argument(
        "--seed", type=int, default=0, help="random seed: the same seed gives the same results (default 0)"
    )


def _add_balancer_arguments(parser: argparse.ArgumentParser) -> None:
    bal = parser.add_argument_group("balancers")
    bal.add_argument(
        "--balancers",
        default=",".join(BALANCERS),
        metavar="LIST",
        help=f"comma-separated, from {','.join(BALANCERS)} (default: all)",
    )
    bal.add_argument(
        "--lplb-topology",
        choices=TOPOLOGIES,
        default=None,
        help="LPLB's copy graph (default: cube for 8 GPUs, hypercube for 16, a nodes x GPUs-per-node "
        "torus when G factorises, else ring)",
    )
    bal.add_argument(
        "--lplb-solver",
        choices=("exact", "ipm"),
        default="exact",
        help="LPLB's per-micro-batch LP: exact (HiGHS, the layout at its best; default) or ipm (LPLB's "
        "own 5 interior-point steps, with its fallback to an even split)",
    )
    bal.add_argument(
        "--ar-interval",
        type=int,
        default=4,
        metavar="K",
        help="microep-ar re-checks each layer's placement every K micro-batches (default 4)",
    )
    bal.add_argument(
        "--cost-model",
        metavar="NAME|FILE",
        default=None,
        help="also score every balancer in predicted expert time with this cost model: a bundled "
        f"name ({', '.join(bundled_models()) or 'see micromoe/data/cost_models'}) or a file from "
        "`micromoe calibrate`; microep and microep-ar then also plan and re-place by it",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="OUT.json", default=None, help="write the results as JSON")
    out.add_argument(
        "--plot", metavar="OUT.png", default=None, help="draw ratio distributions and per-layer means"
    )
    out.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (terminal) or periodic progress lines (pipes, CI)",
    )


def run(args: argparse.Namespace) -> int:
    check_outputs({"--json": args.json, "--plot": args.plot}, args.trace or [])  # before any work
    names = _parse_balancers(args.balancers)
    cost = load_cost_model(args.cost_model) if args.cost_model else None  # ValueError names the file
    workloads, config = _build_workloads(args)
    config["balancers"] = names
    config["cost_model"] = args.cost_model
    cfg = GroupConfig(
        num_gpus=config["gpus"],
        replicas=args.replicas,
        gpus_per_node=args.gpus_per_node,
        lplb_topology=args.lplb_topology,
        lplb_solver=args.lplb_solver,
        ar_interval=args.ar_interval,
        seed=args.seed,
        cost_model=cost,  # microep and microep-ar also plan with it (the others only get scored)
    )
    log.info(
        "simulating %d workload(s) x %d micro-batches on %d GPUs",
        len(workloads),
        workloads[0].num_micro_batches,
        cfg.num_gpus,
    )
    results = simulate(
        workloads,
        names,
        cfg,
        warmup=config["warmup"],
        progress=False if args.no_progress else None,
        cost_model=cost,
    )
    report = build_report(results, config)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        log.info("wrote %s", args.json)
    if args.plot:
        from micromoe.sim.plot import plot_results

        zipf = config.get("zipf")
        plot_results(
            results,
            cfg.num_gpus,
            args.plot,
            x_values=zipf,
            x_label="Zipf s" if zipf else "workload",
            title=_title(config),
            layer_ids=_layer_ids(workloads),
        )
        log.info("wrote %s", args.plot)
    return 0


def _build_workloads(args: argparse.Namespace) -> tuple[list[Workload], dict[str, Any]]:
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


def _parse_balancers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("--balancers is empty; give a comma-separated list such as ep,microep")
    for n in names:
        if n not in BALANCERS:
            raise ValueError(f"unknown balancer {n!r} in --balancers; choose from {','.join(BALANCERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--balancers lists a balancer twice: {text!r}")
    return names


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


def _title(config: dict[str, Any]) -> str:
    what = f"Zipf, {config['experts']} experts" if "zipf" in config else ", ".join(config["traces"])
    mb = config["micro_batches"]
    batches = f"{mb} micro-batches" if isinstance(mb, int) else "micro-batches as logged"
    k = config.get("top_k")
    top_k = f", top-{k}" if isinstance(k, int) else ""
    return f"{what}; {config['gpus']} GPUs, {config['replicas']} replicas{top_k}, {batches}"


def _layer_ids(workloads: list[Workload]) -> list[int] | None:
    """The per-layer panel's layer ids when every workload has the same ones (routing logs)."""
    ids = {w.layer_ids for w in workloads}
    only = ids.pop() if len(ids) == 1 else None
    return list(only) if only is not None else None
