"""The one numba wrapper of the planner.

`cache=True` keeps the compile cost off every process start after the first; no `fastmath` and no
`parallel`: the planner is integer arithmetic with fixed tie-breaks so that every rank computes the
bit-identical plan.

Developers: numba validates a cached function against its own file only, not the files of the
functions it calls, so after editing `flow.py` the cached `kernel.plan_kernel` can still run the
old solver. Delete the caches (`find micromoe -name '*.nb[ic]' -delete`) after editing a kernel.
An installed release is not affected (installing rewrites every file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numba

F = TypeVar("F", bound=Callable)


def njit(fn: F) -> F:
    """Compile `fn` in nopython mode with an on-disk cache."""
    return numba.njit(cache=True, nogil=True)(fn)


def njit_inline(fn: F) -> F:
    """Like `njit`, inlined into its callers: for small helpers on the per-token loops, where a
    call would cost more (argument passing, array reference counting) than the work."""
    return numba.njit(cache=True, nogil=True, inline="always")(fn)
