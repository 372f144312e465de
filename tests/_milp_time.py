"""Independent MILP reference for the time-aware planner tests, written directly against highspy.

min T  s.t.  sum_g x[e,g] = load_e;  x[e,g] <= load_e * y[e,g] (y binary: slot active);
             tile * k[e,g] >= x[e,g] (k integer: row tiles);  top[g] >= x[e,g];
             T >= fixed + sum_e (c_row x + c_tile k + c_active y) + max_row * top[g]  for every g.
"""

from __future__ import annotations

import highspy
import numpy as np


def milp_min_max_time(
    load, host_lists, num_gpus, *, fixed, max_row, tile, c_row, c_tile, c_active, token_cap=None
) -> float:
    """The optimal slowest-GPU time; with `token_cap`, every GPU also takes at most that many rows."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("mip_rel_gap", 1e-9)
    h.setOptionValue("mip_abs_gap", 1e-9)
    inf = highspy.kHighsInf
    pairs = [(e, g) for e, hosts in enumerate(host_lists) for g in hosts]
    n = len(pairs)
    # columns: x[0:n], y[n:2n], k[2n:3n], top[3n:3n+G], T
    ix, iy, ik, itop, it = 0, n, 2 * n, 3 * n, 3 * n + num_gpus
    ncol = it + 1
    ub = np.full(ncol, inf)
    for i, (e, _) in enumerate(pairs):
        ub[ix + i] = float(load[e])
        ub[iy + i] = 1.0
    h.addVars(ncol, np.zeros(ncol), ub)
    h.changeColCost(it, 1.0)
    integ = np.array([1] * (3 * n) + [0] * (num_gpus + 1), dtype=np.uint8)
    h.changeColsIntegrality(ncol, np.arange(ncol, dtype=np.int32), integ)
    for e in range(len(host_lists)):
        idx = np.array([ix + i for i, (ee, _) in enumerate(pairs) if ee == e], dtype=np.int32)
        h.addRow(float(load[e]), float(load[e]), idx.size, idx, np.ones(idx.size))
    for i, (e, g) in enumerate(pairs):
        h.addRow(-inf, 0.0, 2, np.array([ix + i, iy + i], dtype=np.int32), np.array([1.0, -float(load[e])]))
        h.addRow(-inf, 0.0, 2, np.array([ix + i, ik + i], dtype=np.int32), np.array([1.0, -float(tile)]))
        h.addRow(-inf, 0.0, 2, np.array([ix + i, itop + g], dtype=np.int32), np.array([1.0, -1.0]))
    for g in range(num_gpus):
        mine = [i for i, (_, gg) in enumerate(pairs) if gg == g]
        idx = [ix + i for i in mine] + [ik + i for i in mine] + [iy + i for i in mine] + [itop + g, it]
        val = [c_row] * len(mine) + [c_tile] * len(mine) + [c_active] * len(mine) + [max_row, -1.0]
        h.addRow(-inf, -float(fixed), len(idx), np.array(idx, dtype=np.int32), np.array(val))
    if token_cap is not None:
        for g in range(num_gpus):
            idx = np.array([ix + i for i, (_, gg) in enumerate(pairs) if gg == g], dtype=np.int32)
            h.addRow(-inf, float(token_cap), idx.size, idx, np.ones(idx.size))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return h.getInfo().objective_function_value
