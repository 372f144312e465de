"""`micromoe simulate`: compare load balancers on routing traces or Zipf-skewed loads.

With no arguments it runs the bundled Qwen2-57B trace (counts57b.json) on 8 GPUs with 2 replicas.
Trace files are aggregate counts (sampled into micro-batches) or per-micro-batch routing logs
(replayed as is); see `micromoe/sim/traces.py` for both formats and `workload.py` for the noise model.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from micromoe.plan.cost import bundled_models
from micromoe.plan.cost import load as load_cost_model
from micromoe.sim.balancers import BALANCERS, GroupConfig
from micromoe.sim.command_workloads import (
    DEFAULT_GPUS,
    DEFAULT_TRACE,
    TRACE_TOP_K,
    ZIPF_TOP_K,
    build_workloads,
)
from micromoe.sim.lplb import TOPOLOGIES
from micromoe.sim.outputs import check_outputs
from micromoe.sim.report import build_report, format_report, write_json
from micromoe.sim.runner import simulate
from micromoe.sim.workload import Workload

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `micromoe simulate`, in four groups."""
    _add_workload_arguments(parser)
    _add_group_arguments(parser)
    _add_balancer_arguments(parser)
    _add_output_arguments(parser)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group(f"workload (default: the bundled {DEFAULT_TRACE} trace)")
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
        "--experts",
        type=int,
        default=32,
        metavar="E",
        help="experts per layer for --zipf (default %(default)s)",
    )
    src.add_argument(
        "--hot-experts",
        choices=("random", "first"),
        default="random",
        help="--zipf: which expert ids are hot: random per layer, or first (expert i is the (i+1)-th most "
        "loaded) (default %(default)s)",
    )
    src.add_argument(
        "--layers",
        type=int,
        default=4,
        metavar="L",
        help="layers for --zipf, each with its own hot experts (default %(default)s)",
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
        help="replicas per expert: slots = experts x d (default %(default)s)",
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
        help="tokens per GPU per micro-batch when sampling (default %(default)s)",
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
        help="micro-batches to sample per workload (default %(default)s; a routing log replays all of its own)",
    )
    grp.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="W",
        help="micro-batches run first but not measured (adaptive balancers learn from them; default %(default)s)",
    )
    grp.add_argument(
        "--noise",
        type=float,
        default=0.1,
        help="per-source-GPU log-normal noise on expert shares (default %(default)s)",
    )
    grp.add_argument(
        "--drift",
        type=float,
        default=0.1,
        help="std of the slow, shared drift of log expert shares (default %(default)s)",
    )
    grp.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed: the same seed gives the same results (default %(default)s)",
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
        help="LPLB's per-micro-batch LP: exact (HiGHS, the layout at its best) or ipm (LPLB's own 5 "
        "interior-point steps, with its fallback to an even split) (default %(default)s)",
    )
    bal.add_argument(
        "--ar-interval",
        type=int,
        default=4,
        metavar="K",
        help="microep-ar re-checks each layer's placement every K micro-batches (default %(default)s)",
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
    workloads, config = build_workloads(args)
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
            timed=cost is not None,
        )
        log.info("wrote %s", args.plot)
    return 0


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
