"""micromoe.plan: the MicroEP planner. Pure NumPy + compiled kernels; never imports torch.

Owns the math of expert placement and token scheduling: which expert sits in which slot of which
GPU (`Placement` and its builders), the per-micro-batch optimal token plan (`schedule` -> `Plan`),
the density lemma (`lp_optimum`), and adaptive replacement (`forecast`).

Imports run one way, bottom to top:
    checks, jit                 shared array types and argument checks; the one numba wrapper
    slot_layout                 the validated slot table (`SlotLayout`) and its replica CSR lists
    slots                       raw slot generators (plain EP, random, the paper's Cayley graphs)
    flow, kernel, route         compiled kernels: min-max flow, the schedule body, route fill
    density                     the density lemma (exact LP optimum of a layout)
    layouts                     builders that score candidate layouts with the density lemma
    placement                   `Placement`: a slot layout with its named builders
    highs                       the paper's LP on HiGHS (a selectable backend; `new_highs`)
    cost                        the expert-GEMM cost model (`CostModel`: predicted GPU time from slot rows)
    timed_bound, timed_smooth   the time-aware planner, compiled: predicted times and bound; split smoothing
    timed_kernel                its local search over replica quotas
    timed                       its entry (`schedule(..., cost=)`: min predicted slowest GPU)
    schedule                    `schedule` and `Plan`
    timed_layouts               placements scored in predicted time
    forecast                    load forecasts, the replacement decision and `ReplacementPolicy`
"""

from micromoe.plan.checks import IntArray, positive_int
from micromoe.plan.density import balance_ratio, lp_optimum, lp_optimum_brute_force, lp_optimum_fraction
from micromoe.plan.forecast import (
    LoadTracker,
    Replacement,
    ReplacementPolicy,
    decide_replacement,
    placement_score,
)
from micromoe.plan.highs import new_highs
from micromoe.plan.placement import Placement
from micromoe.plan.schedule import Plan, certificate_bound, schedule

__all__ = [
    "IntArray",
    "LoadTracker",
    "Placement",
    "Plan",
    "Replacement",
    "ReplacementPolicy",
    "balance_ratio",
    "certificate_bound",
    "decide_replacement",
    "lp_optimum",
    "lp_optimum_brute_force",
    "lp_optimum_fraction",
    "new_highs",
    "placement_score",
    "positive_int",
    "schedule",
]
