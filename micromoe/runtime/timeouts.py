"""Bounded waits: a user-settable timeout for every process group, and a clear error that names the
ranks that stalled when a collective runs past it.

torch's default is 30 minutes, and `dist.new_group` does not inherit the timeout given to
`init_process_group`: `build_process_groups` and the migration's new groups pass `world_timeout()`,
the default group's own timeout, so one setting (`init_distributed(timeout_s=...)` or
`dist.init_process_group(timeout=...)`) bounds every collective.
`init_distributed` starts the default group with the timeout and returns a `Watchdog`, whose `guard`
turns a timed-out collective into a `CollectiveTimeout` that says which timeout was hit and (on
rank 0) which ranks failed to answer a monitored barrier on a separate gloo group: a stopped, hung
or dead rank. Tested on gloo (CPU). On NCCL, torch's watchdog may abort the process itself when
the timeout passes (its own message then names the collective), before `guard` sees an exception.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0  # a few minutes: long enough for a slow CPU step, short next to 30 min
# the monitored barrier that looks for stalled ranks waits at most this long: the ranks that are
# alive reach it within a second or so of each other (they fail in the same collective or on its
# closed connections), so a short wait names the stalled rank without adding much to the timeout
PROBE_S = 5.0


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the process groups' timeout."""


def as_timeout(seconds: float, flag: str = "--timeout") -> timedelta:
    """`seconds` as a timedelta; ValueError naming `flag` unless it is finite and > 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"{flag} must be a finite number of seconds, got {seconds!r}")
    if seconds <= 0:
        raise ValueError(f"{flag} must be > 0 seconds, got {seconds!r}")
    return timedelta(seconds=float(seconds))


def init_distributed(backend: str, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: object) -> Watchdog:
    """`dist.init_process_group(backend, timeout=timeout_s, **kwargs)`, then a `Watchdog` for it.

    Collective over the world: every rank calls it with the same `backend` and `timeout_s`.
    """
    timeout = as_timeout(timeout_s)
    dist.init_process_group(backend, timeout=timeout, **kwargs)  # type: ignore[arg-type]
    # a separate gloo group only for the stall probe: a timed-out collective closes the pairs of
    # its own group, so the probe could not use that one
    probe = dist.new_group(backend="gloo", timeout=timeout)
    return Watchdog(rank=dist.get_rank(), timeout_s=float(timeout_s), probe=probe)


def world_timeout() -> timedelta:
    """The timeout the default process group was created with, for the subgroups built after it.

    torch has no public getter, so this reads the backend's options and falls back to
    DEFAULT_TIMEOUT_S (never torch's 30 minutes) if that ever changes.
    """
    try:
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        backend = dist.distributed_c10d._get_default_group()._get_backend(device)
        timeout = backend.options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=DEFAULT_TIMEOUT_S)


def is_stall_error(exc: BaseException) -> bool:
    """Whether `exc` comes from a collective that timed out, or from a peer that gave up after its
    own timeout (gloo closes the connection; NCCL's watchdog aborts)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("timed out", "timeout", "connection closed by peer", "connection reset")
    )


@dataclass(frozen=True)
class Watchdog:
    """This rank's view of the job's timeout, and a gloo group to probe for stalled ranks.

    Attributes:
        rank: this process's global rank.
        timeout_s: the timeout every process group was created with (seconds).
        probe: a gloo group of all ranks, used only by `guard` after a collective failed.
    """

    rank: int
    timeout_s: float
    probe: dist.ProcessGroup

    @contextmanager
    def guard(self, what: str = "a collective") -> Iterator[None]:
        """Run the block; a collective timing out inside it (or a peer giving up) becomes a
        `CollectiveTimeout` naming the timeout, this rank and, on rank 0, the ranks that did not
        answer a monitored barrier."""
        try:
            yield
        except CollectiveTimeout:
            raise
        except RuntimeError as exc:
            if not is_stall_error(exc):
                raise
            raise CollectiveTimeout(
                f"rank {self.rank}: {what} did not complete within the {self.timeout_s:g} s timeout "
                f"(--timeout); {self._stalled_ranks()}. First error: {_first_line(exc)}"
            ) from exc

    def _stalled_ranks(self) -> str:
        """Every rank meets at a monitored barrier on the probe group; rank 0 learns who did not."""
        try:
            dist.monitored_barrier(
                group=self.probe,
                timeout=timedelta(seconds=min(2 * self.timeout_s, PROBE_S)),  # room for late arrivals
                wait_all_ranks=True,
            )
        except RuntimeError as exc:
            found = re.search(r"[Rr]anks? ([\d, ]+) failed to pass monitoredBarrier", str(exc))
            if found:
                return f"rank(s) {found.group(1).strip()} did not respond (stopped, hung or dead)"
            return "another rank stalled or died (rank 0's error names it)"
        return "every rank answered a barrier afterwards (a slow rank rather than a dead one?)"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
