"""Compile the planner's and the row map's kernels before the first step, and say so.

The planner and the row map are numba kernels compiled on first use and cached on disk
(`plan.jit`): the first run on a machine compiles them (tens of seconds on a small CPU), later
runs load them (well under a second). Left to the first micro-batch, that one-time cost would
show up as scheduler time and as a silent first step; `warm_up_kernels` runs every kernel a
training step uses once on a tiny problem instead, so a launcher can compile them once (with a
line saying so) before it starts its ranks, and each rank can load them and report the time
apart from the scheduler's.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from micromoe.plan import Placement, schedule
from micromoe.plan.cost import CostModel
from micromoe.runtime.rows import plain_ep_route, planned_route, rank_row_map

log = logging.getLogger("micromoe")

NOTICE_AFTER_S = 2.0  # loading cached kernels takes about 0.3 s; compiling them tens of seconds
# a model of arbitrary coefficients: the time planner's kernels depend on the model's array types,
# not on its values, so any model compiles them
_ANY_MODEL = CostModel(fixed_us=1.0, max_row_us=0.001, tile=8, c_row=0.01, c_tile=1.0, c_active=1.0)


def warm_up_kernels(*, timed: bool = False, announce: bool = False) -> float:
    """Run every kernel of a training step's planning once (plain EP and MicroEP routes, both
    sides of the row map, the token planner; the time planner too when `timed`). Returns the
    seconds taken. With `announce`, a line is logged if it takes longer than NOTICE_AFTER_S
    (i.e. the kernels are being compiled, not loaded from the cache), and another when done."""
    start = time.perf_counter()
    done = threading.Event()
    notice = threading.Timer(NOTICE_AFTER_S, _announce, args=(done,)) if announce else None
    if notice is not None:
        notice.daemon = True
        notice.start()
    try:
        _run_kernels(timed)
    finally:
        done.set()
        if notice is not None:
            notice.cancel()
    seconds = time.perf_counter() - start
    if announce and seconds > NOTICE_AFTER_S:
        log.info("kernels compiled in %.0f s (cached for later runs)", seconds)
    return seconds


def _announce(done: threading.Event) -> None:
    if not done.is_set():
        log.info("compiling kernels (one time; later runs load them from the cache) ...")


def _run_kernels(timed: bool) -> None:
    g, e, align = 4, 8, 8
    counts = np.arange(g * e, dtype=np.int64).reshape(g, e) % 5 + 1
    microep = Placement.symmetric(g, e, 2)
    ep = Placement.expert_parallel(g, e, 1)
    models = [None, _ANY_MODEL] if timed else [None]
    for cost in models:
        plan = schedule(counts, microep, cost=cost)
        rank_row_map(planned_route(plan, 1), g, microep.slot_expert[1], e, align)
    schedule(counts[: g // 2], Placement.expert_parallel(g // 2, e, 1))  # the plain-EP counterfactual
    rank_row_map(plain_ep_route(counts, ep, 1), g, ep.slot_expert[1], e, align)
