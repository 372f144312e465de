"""The density lemma: the LP optimum of the min-max problem in closed form.

T* = max over non-empty GPU sets S of (L_inside(S) + base(S)) / |S|, where L_inside(S) is the load
of experts whose replicas all lie in S. `lp_optimum` finds it exactly for any group size by a
Dinkelbach loop over max-flow feasibility checks (each failure yields a Hall set and a larger valid
ratio), without enumerating subsets. `lp_optimum_brute_force` enumerates them, for tests.

Legend: E experts, G GPUs; loads int [E], base loads int [G]. Every function takes any validated
slot layout (a `Placement` or the `SlotLayout` the layout builders score).
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import IntArray, as_int_array
from micromoe.plan.flow import feasible_scaled, inside_load, ratio_bound
from micromoe.plan.slot_layout import SlotLayout


def lp_optimum_fraction(
    loads: npt.ArrayLike, placement: SlotLayout, base_load: npt.ArrayLike | None = None
) -> Fraction:
    """Exact T* as a Fraction. loads: int [E] >= 0 (tokens per expert); base_load: int [G] >= 0."""
    p = placement
    load = as_int_array(loads, "loads", (p.num_experts,))
    base = (
        np.zeros(p.num_gpus, np.int64)
        if base_load is None
        else as_int_array(base_load, "base_load", (p.num_gpus,))
    )
    t = _start_ratio(load, base, p)
    while True:
        num, den = t.numerator, t.denominator
        ok, hall = feasible_scaled(load * den, num - den * base, den * base, num, p.graph)
        if ok:
            return t
        t_next = _set_ratio(load, base, p, hall)
        assert t_next > t, "Hall set must raise the bound"
        t = t_next


def lp_optimum(loads: npt.ArrayLike, placement: SlotLayout, base_load: npt.ArrayLike | None = None) -> float:
    """T*, the optimal (fractional) max GPU load for per-expert `loads` on `placement`."""
    return float(lp_optimum_fraction(loads, placement, base_load))


def balance_ratio(loads: npt.ArrayLike, placement: SlotLayout) -> float:
    """T* / mean GPU load: 1.0 means the placement can balance these loads perfectly."""
    load = np.asarray(loads, dtype=np.int64)
    total = int(load.sum())
    if total == 0:
        return 1.0
    return float(lp_optimum_fraction(load, placement) * placement.num_gpus / total)


def lp_optimum_brute_force(
    loads: npt.ArrayLike, placement: SlotLayout, base_load: npt.ArrayLike | None = None
) -> Fraction:
    """Reference T* by enumerating all 2^G - 1 GPU sets (G <= 16)."""
    p = placement
    if p.num_gpus > 16:
        raise ValueError(f"brute force enumerates 2^G sets; G={p.num_gpus} is too large (max 16)")
    load = np.asarray(loads, dtype=np.int64)
    base = np.zeros(p.num_gpus, np.int64) if base_load is None else np.asarray(base_load, np.int64)
    hosts = [set(p.hosts(e).tolist()) for e in range(p.num_experts)]
    best = Fraction(0)
    for k in range(1, p.num_gpus + 1):
        for subset in itertools.combinations(range(p.num_gpus), k):
            s = set(subset)
            inside = sum(int(load[e]) for e in range(p.num_experts) if hosts[e] <= s)
            best = max(best, Fraction(inside + int(base[list(subset)].sum()), k))
    return best


def _set_ratio(load: IntArray, base: IntArray, p: SlotLayout, in_set: np.ndarray) -> Fraction:
    inside = int(inside_load(load, p.host_ptr, p.host_gpu, in_set))
    return Fraction(inside + int(base[in_set].sum()), int(in_set.sum()))


def _start_ratio(load: IntArray, base: IntArray, p: SlotLayout) -> Fraction:
    """The largest of the solver's cheap lower bounds (`flow.ratio_bound`), as a Fraction."""
    num, den, _ = ratio_bound(load, base, p.host_ptr, p.host_gpu)
    return Fraction(int(num), int(den))


__all__ = ["balance_ratio", "lp_optimum", "lp_optimum_brute_force", "lp_optimum_fraction"]
