"""micromoe.plan: the MicroEP planner. Pure NumPy + a compiled kernel; never imports torch.

Entry points: `Placement` (replica layouts), `schedule` (the per-micro-batch optimal token plan),
`lp_optimum` (the density lemma), and the adaptive-replacement helpers in `forecast`.
"""

from micromoe.plan.density import balance_ratio, lp_optimum, lp_optimum_brute_force, lp_optimum_fraction
from micromoe.plan.forecast import LoadTracker, Replacement, decide_replacement, placement_score
from micromoe.plan.placement import Placement
from micromoe.plan.schedule import Plan, certificate_bound, schedule

__all__ = [
    "LoadTracker",
    "Placement",
    "Plan",
    "Replacement",
    "balance_ratio",
    "certificate_bound",
    "decide_replacement",
    "lp_optimum",
    "lp_optimum_brute_force",
    "lp_optimum_fraction",
    "placement_score",
    "schedule",
]
