"""The compiled kernels and their interpreted Python bodies give bit-identical plans.

Running the kernels with NUMBA_DISABLE_JIT=1 also lets coverage see their bodies.
"""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import hashlib, numpy as np
from micromoe.plan import Placement, schedule, lp_optimum_fraction
rng = np.random.default_rng(11)
h = hashlib.sha256()
for i in range(40):
    g = int(rng.choice([2, 4, 8])); r = int(rng.choice([d for d in (1, 2, 4) if g % d == 0]))
    e = (g // r) * int(rng.integers(1, 4))
    p = Placement.random(g, e, r, seed=i)
    w = rng.pareto(1.0, e) + 0.01
    c = np.stack([rng.multinomial(int(rng.integers(0, 500)), w / w.sum()) for _ in range(g)])
    base = rng.integers(0, 100, g) if i % 2 else None
    plan = schedule(c, p, base_load=base, gpus_per_node=2 if i % 3 == 0 and g % 2 == 0 else None)
    t = lp_optimum_fraction(c.sum(0), p, base)
    for a in (plan.replica_quota, plan.route_src, plan.route_dst, plan.route_count, plan.certificate):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(str((plan.max_load, t)).encode())
print(h.hexdigest())
"""


def _digest(disable_jit: bool) -> str:
    env = dict(os.environ, NUMBA_DISABLE_JIT="1" if disable_jit else "0")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


def test_interpreted_kernels_match_compiled():
    compiled = _digest(False)
    assert len(compiled) == 64
    assert _digest(True) == compiled
