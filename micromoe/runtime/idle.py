"""GPU idle time caused by one host wait, measured with two CUDA events (no extra sync).

A dispatcher that must read counts on the host blocks on the device (`PendingCounts.wait`), then
routes on the CPU before it queues the next GPU work. `HostWaitProbe` records one event right
before the wait and one right before that next GPU work: the first completes when the GPU has
drained everything queued before the wait, the second is queued on a stream that holds nothing
in between, so the time between them is exactly how long the stream sat empty because of the
host (zero when the queued work outlasted the wait and the routing).
"""

from __future__ import annotations

import time

import torch


class HostWaitProbe:
    """Open around a host wait: `HostWaitProbe(device)` before it, `stop()` before the next GPU work.

    Reading `gpu_idle_ms` waits for the second event (a host sync), so read it off the hot path
    (stats, benchmarks). On CPU tensors both numbers are host time only and `gpu_idle_ms` is 0.
    """

    def __init__(self, device: torch.device) -> None:
        self._start: torch.cuda.Event | None = None
        self._stop: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        self.host_s = 0.0

    def stop(self) -> HostWaitProbe:
        """Close the probe (call right before queuing the first GPU work after the wait)."""
        self.host_s = time.perf_counter() - self._t0
        if self._start is not None:
            self._stop = torch.cuda.Event(enable_timing=True)
            self._stop.record()
        return self

    @property
    def gpu_idle_ms(self) -> float:
        """Milliseconds the GPU's stream sat empty between the two events (0 on CPU)."""
        if self._start is None or self._stop is None:
            return 0.0
        return self._start.elapsed_time(self._stop)  # waits for the second event
