"""Process-wide: keep the planner's per-micro-batch arrays off fresh pages.

glibc serves every allocation of 128 KiB or more with its own mmap and returns it on free, so a
process that allocates and frees such arrays every micro-batch (a 256-expert x 64-GPU plan's route
list is ~0.5 MiB) pays a page fault per 4 KiB page, every time. On the virtual machines we measured
that cost more than the scheduling itself (benchmarks/results/scheduler_*.json). Raising glibc's
mmap and trim thresholds keeps those arrays in the reusable heap.

This is a process-wide setting, so nothing here runs on import: entry points that schedule every
micro-batch (the training runtime, the benchmarks, `micromoe` commands) call `tune_allocator()`
once at start-up. The same effect without code: GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_state: dict[str, int] = {}


def tune_allocator(mmap_threshold: int = 32 << 20) -> bool:
    """Serve allocations below `mmap_threshold` bytes from the heap and keep freed heap memory
    (up to twice that) for reuse. Returns False where the C library is not glibc (no-op there)."""
    if _state.get("mmap_threshold") == mmap_threshold:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = (
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1
    )
    if ok:
        _state["mmap_threshold"] = mmap_threshold
    return ok


def allocator_settings() -> dict[str, int]:
    """What `tune_allocator` set in this process (empty: glibc defaults)."""
    return dict(_state)
