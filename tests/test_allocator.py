"""tune_allocator: a process-wide glibc setting, applied once and reported."""

from __future__ import annotations

from micromoe.allocator import allocator_settings, tune_allocator


def test_tune_allocator_is_idempotent():
    if tune_allocator(64 << 20):
        assert allocator_settings() == {"mmap_threshold": 64 << 20}
        assert tune_allocator(64 << 20)
    else:
        assert allocator_settings() == {}
