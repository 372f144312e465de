"""The time planner's integer cost table is the same on every machine.

Ranks plan independently from the same counts, so the table the search compares must not depend on
the CPU: it is built from integer coefficients, integer features and an integer logarithm. Checked
here against NumPy running with its AVX2/AVX-512 kernels switched off (as on an older CPU).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from micromoe.plan.cost import _log2_fixed, bundled_models, load
from micromoe.plan.timed import FIXED_POINT, cost_tables

_DIGEST = (
    "import hashlib; from micromoe.plan.cost import load, bundled_models; "
    "print(hashlib.sha256(b''.join(load(n).slot_cost_table_int(70000, 1e6).tobytes() "
    "for n in bundled_models())).hexdigest())"
)


def _digest(env_extra: dict[str, str]) -> str:
    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_integer_table_independent_of_simd_kernels():
    plain = _digest({})
    no_simd = _digest(
        {
            "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR AVX2 FMA3"
        }
    )
    here = hashlib.sha256(
        b"".join(load(n).slot_cost_table_int(70000, 1e6).tobytes() for n in bundled_models())
    ).hexdigest()
    assert plain == no_simd == here


@pytest.mark.parametrize("name", bundled_models())
def test_integer_table_tracks_the_float_model(name):
    model = load(name)
    n = 1 << 20
    as_int = model.slot_cost_table_int(n, FIXED_POINT)
    as_float = model.slot_cost_table(n)
    assert as_int[0] == 0 and np.all(np.diff(as_int) >= 0)
    np.testing.assert_allclose(as_int / FIXED_POINT, as_float, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(cost_tables(model, 5000).f_int[:5001], as_int[:5001])


def test_integer_log2():
    n = np.arange(1, 1 << 18, dtype=np.int64)
    fixed = _log2_fixed(n)
    assert np.all(np.diff(fixed) >= 0)
    powers = np.array([1 << k for k in range(40)], dtype=np.int64)
    np.testing.assert_array_equal(_log2_fixed(powers), np.arange(40) << 30)  # exact at powers of two
    assert np.abs(fixed / 2.0**30 - np.log2(n)).max() < 1e-8


def test_integer_table_rejects_bad_sizes():
    model = load(bundled_models()[0])
    with pytest.raises(ValueError, match="max_rows"):
        model.slot_cost_table_int(-1, FIXED_POINT)
