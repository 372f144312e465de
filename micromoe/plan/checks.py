"""Shared array types and argument checks of the planner (the bottom of `micromoe.plan`).

Every other module of `plan` (and `sim`) validates user input through these helpers, so one kind of
mistake gets one kind of message: a ValueError that names the parameter and the bad value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]

MAX_TOTAL = 2**53  # token totals beyond this cannot be exact as floats (LP backend, ratios)


def positive_int(value: Any, name: str) -> int:
    """`value` as a Python int if it is a positive integer (Python or NumPy); ValueError otherwise.

    bool, float (even 2.0), str and other types are rejected: a size given as 2.5 or True is a bug.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def as_int_array(a: npt.ArrayLike, name: str, shape: tuple[int, ...]) -> IntArray:
    """A non-negative int64 array of `shape` (C-contiguous copy or view) from integer-valued input.

    Accepts integer dtypes and floats holding whole numbers; ValueError names what is wrong.
    """
    arr = np.asarray(a)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.size and arr.max() >= MAX_TOTAL:
        # checked before the int64 cast, which would wrap uint64 entries above 2**63 to negatives
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(arr)), arr.shape))
        raise ValueError(
            f"{name}{list(idx)} = {arr[idx]} is too large: the largest supported total is 2**53 - 1 tokens"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} has non-finite entries")
        if not np.all(arr == np.floor(arr)):
            raise ValueError(f"{name} must hold whole token counts, got fractional entries")
        if arr.size and np.abs(arr).max() >= MAX_TOTAL:
            raise ValueError(f"{name} has entries too large to be exact token counts")
    if arr.size and arr.min() < 0:
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmin(arr)), arr.shape))
        raise ValueError(f"{name}{list(idx)} = {arr[idx]}: token counts must be >= 0")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    # summed as floats: an int64 sum of huge entries would wrap around and pass
    if out.size and float(out.sum(dtype=np.float64)) >= MAX_TOTAL:
        raise ValueError(
            f"{name} sums to {float(out.sum(dtype=np.float64)):.4g}; the largest supported total is "
            "2**53 - 1 tokens"
        )
    return out


def as_expected_loads(expected_loads: npt.ArrayLike, name: str = "expected_loads") -> FloatArray:
    """float64 [E]: a non-empty 1-D array of finite, non-negative (forecast) loads."""
    loads = np.asarray(expected_loads, dtype=np.float64)
    if loads.ndim != 1 or loads.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {loads.shape}")
    if not np.all(np.isfinite(loads)) or np.any(loads < 0):
        raise ValueError(f"{name} must be finite and >= 0")
    return loads
