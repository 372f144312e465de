"""Placements scored in predicted GPU time: the cost model decides how many slots an expert gets.

Legend: G GPUs, E experts, S local slots per GPU, R replicas; loads are rows per micro-batch.

Time is not linear in rows, so the replica count that balances tokens is not always the one that
balances time. With large GEMMs even slots win (many replicas, every slot about the same rows);
with small ones every active slot costs a tile and a group, and fewer active groups win (fewer
replicas, slots left empty). Instead of a rule for that, `time_aware_slots` builds candidates
that spend 100%, 50%, 25% and 0% of the spare slots (beyond one per expert) on extra replicas,
counted as EPLB's replicate step does (largest load per replica first, at most G per expert),
packed into slot indices (`replica_columns`). Each budget's GPUs are assigned once by EPLB's
balanced packing under the local-slot rule (`assign_gpus`) and `num_samples` times at random. The
time-aware plan (`schedule(..., cost=)`) of each candidate is predicted under the forecast, and
the fastest is kept; `prefer_even` can instead keep the candidate with the most replicas among
those within a tie margin of the fastest (`even_margin`), a guard against the model's error
between even and uneven slots. Measured on one H200 (docs/RESULTS.md, issue 7) a 2% margin was
1.4-2.5% slower on Zipf-128 and equal elsewhere, so the default is 0 (the model's choice).
Scores are relative to an ideal fair share
(`ideal_time_us`): 1.0 = as fast as total rows / G on every GPU, spread evenly over the best
number of its slots.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from micromoe.plan.checks import FloatArray, IntArray, as_expected_loads, positive_int
from micromoe.plan.placement import Placement
from micromoe.plan.schedule import schedule
from micromoe.plan.slot_layout import SlotLayout
from micromoe.plan.slots import pack_columns, random_gpus, replica_counts_for
from micromoe.plan.timed import SlotCostModel, check_cost_model, cost_tables, gpu_constant_us

SPARE_FRACTIONS = (1.0, 0.5, 0.25, 0.0)
EVEN_MARGIN = 0.0  # see `prefer_even`


def forecast_rows(forecast: npt.ArrayLike) -> IntArray:
    """int64 [E]: forecast loads (float rows per micro-batch) rounded to whole rows."""
    return np.rint(as_expected_loads(forecast, "forecast")).astype(np.int64)


def ideal_time_us(rows_E: IntArray, num_gpus: int, slots_per_gpu: int, cost: SlotCostModel) -> float:
    """Predicted time of one GPU that runs its fair share, ceil(total / G) rows, split evenly over
    the best number k of slots, ceil(experts with load / G) <= k <= S (every such expert needs
    a slot somewhere): the fastest any GPU could be if every GPU did the same."""
    per_gpu = -(-int(rows_E.sum()) // num_gpus)
    fewest = min(slots_per_gpu, max(1, -(-int(np.count_nonzero(rows_E)) // num_gpus)))
    f = cost_tables(cost, per_gpu + 1).f_us
    m = float(cost.max_row_us)
    best = np.inf
    for k in range(fewest, slots_per_gpu + 1):
        base, extra = divmod(per_gpu, k)
        top = base + (1 if extra else 0)
        best = min(best, float((k - extra) * f[base] + extra * f[base + 1]) + m * top)
    return gpu_constant_us(cost, slots_per_gpu) + best


def predicted_max_us(rows_E: IntArray, placement: SlotLayout, cost: SlotCostModel) -> float:
    """Predicted slowest-GPU time of the time-aware plan for per-expert loads `rows_E` (the rows
    all start on GPU 0: locality does not change the time)."""
    counts = np.zeros((placement.num_gpus, placement.num_experts), dtype=np.int64)
    counts[0] = rows_E
    return float(schedule(counts, placement, cost=cost).predicted_us.max())


def time_score(forecast: npt.ArrayLike, placement: SlotLayout, cost: SlotCostModel) -> float:
    """Predicted slowest-GPU time / ideal fair share (`ideal_time_us`) under the forecast (>= ~1,
    lower is better)."""
    rows = forecast_rows(forecast)
    if rows.size != placement.num_experts:
        raise ValueError(f"forecast has {rows.size} experts, the placement {placement.num_experts}")
    ideal = ideal_time_us(rows, placement.num_gpus, placement.slots_per_gpu, cost)
    return predicted_max_us(rows, placement, cost) / ideal


def time_aware_slots(
    forecast: npt.ArrayLike,
    num_gpus: int,
    slots_per_gpu: int,
    cost: SlotCostModel,
    *,
    seed: int = 0,
    num_samples: int = 8,
    spare_fractions: tuple[float, ...] = SPARE_FRACTIONS,
    even_margin: float = EVEN_MARGIN,
) -> tuple[IntArray, float, int]:
    """The candidate layout with the lowest predicted slowest-GPU time under `forecast`, up to
    `even_margin` in favour of more replicas (`prefer_even`).

    Args:
        forecast: float [E] >= 0; expected rows per expert per micro-batch (scale matters).
        num_gpus, slots_per_gpu: the group's G and S (E <= G * S).
        cost: the cost model.
        seed, num_samples: random GPU samples of each budget's replica groups, besides the
            balanced assignment (deterministic).
        spare_fractions: shares of the G * S - E spare slots given to extra replicas.
        even_margin: relative tie margin towards more replicas (`prefer_even`; 0: the fastest).

    Returns:
        (slot_expert int64 [G, S] with -1 for empty slots, its time score, its replica total R).
    """
    check_cost_model(cost)
    loads = as_expected_loads(forecast, "forecast")
    g, s = positive_int(num_gpus, "num_gpus"), positive_int(slots_per_gpu, "slots_per_gpu")
    positive_int(num_samples, "num_samples")
    if loads.size > g * s:
        raise ValueError(f"{loads.size} experts do not fit in {g} GPUs x {s} slots")
    rows = forecast_rows(loads)
    ideal = ideal_time_us(rows, g, s, cost)
    rng = np.random.default_rng(seed)
    scored: list[tuple[float, int, IntArray]] = []  # (predicted us, replicas, slot table)
    for frac in spare_fractions:
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"spare_fractions must lie in [0, 1], got {frac}")
        total = loads.size + round(frac * (g * s - loads.size))
        columns = replica_columns(loads, g, s, total)
        for k in range(num_samples + 1):  # the balanced assignment first, then random GPU samples
            slots = assign_gpus(columns, loads, g, s, None if k == 0 else rng)
            t = predicted_max_us(rows, Placement.from_slots(slots, loads.size), cost)
            scored.append((t, int((slots >= 0).sum()), slots))
    t, _, best = prefer_even(scored, even_margin)
    return best, t / ideal, int((best >= 0).sum())


def prefer_even(scored: list[tuple[float, int, IntArray]], margin: float) -> tuple[float, int, IntArray]:
    """The candidate with the most replicas among those predicted within `margin` (relative) of
    the fastest, then the fastest of those (first on ties: deterministic).

    scored: (predicted slowest-GPU us, replica total, slot table) per candidate. More replicas
    means more even slots; a positive margin makes a layout with fewer replicas win only when it
    is predicted faster by more than that (margin 0: the fastest).
    """
    if not scored:
        raise ValueError("no candidates to choose from")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"even_margin must lie in [0, 1) (0.02 = 2%), got {margin}")
    fastest = min(c[0] for c in scored)
    near = [c for c in scored if c[0] <= fastest * (1.0 + margin)]
    most = max(c[1] for c in near)
    return min((c for c in near if c[1] == most), key=lambda c: c[0])


def replica_columns(loads: FloatArray, g: int, s: int, total: int) -> list[list[tuple[int, int]]]:
    """Replica groups (expert, replicas) of each slot index: `total` replicas by EPLB's rule (one
    each, then each spare to the largest load per replica, at most G), first-fit decreasing into
    slot indices of width G (`slots.pack_columns`). With total = G * S every slot is used (free
    width goes to the hottest per replica of its slot index); otherwise an expert that fits
    nowhere shrinks to the widest free slot index and leftover slots stay empty."""
    reps = replica_counts_for(loads, total, g)
    return pack_columns(loads, reps, g, s, fill=total == g * s)


def assign_gpus(
    columns: list[list[tuple[int, int]]],
    loads: FloatArray,
    g: int,
    s: int,
    rng: np.random.Generator | None,
) -> IntArray:
    """slot_expert int64 [G, S] (-1 empty) for replica groups per slot index.

    rng None: EPLB's balanced packing under the local-slot rule: groups by load per replica,
    heaviest first (expert id on ties), each onto the r GPUs with the least forecast load among
    those whose slot index is still free (lowest id on ties). Otherwise the GPUs of each slot
    index at random.
    """
    if rng is not None:
        return random_gpus(columns, g, s, rng)
    slots = np.full((g, s), -1, dtype=np.int64)
    groups = sorted(
        ((float(loads[e]) / r, e, r, j) for j, column in enumerate(columns) for e, r in column),
        key=lambda x: (-x[0], x[1]),
    )
    gpu_load = np.zeros(g)
    for w, e, r, j in groups:
        free = np.flatnonzero(slots[:, j] < 0)
        pick = free[np.lexsort((free, gpu_load[free]))[:r]]
        slots[pick, j] = e
        gpu_load[pick] += w
    return slots
