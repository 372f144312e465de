"""Progress of a simulation: a tqdm bar on a terminal, periodic one-line log messages elsewhere.

Piped or CI output gets a line like `simulate: 96/384 micro-batches (25%), zipf s=1, 31 s` every
PROGRESS_EVERY_S seconds (and one at the end), so a long run never looks hung.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

from tqdm import tqdm

log = logging.getLogger("micromoe.sim")

PROGRESS_EVERY_S = 15.0  # seconds between one-line progress messages when not on a terminal


class Progress(Protocol):
    """What the runner calls: tqdm's subset."""

    def update(self, n: int = 1) -> object: ...
    def set_postfix_str(self, s: str = "") -> object: ...
    def close(self) -> object: ...


def make_progress(total: int, progress: bool | None) -> Progress:
    """progress: True = a bar, False = nothing, None = a bar on a terminal, else periodic lines."""
    if progress is None and not _stderr_is_terminal():
        return LineProgress(total, PROGRESS_EVERY_S)
    return tqdm(
        total=total, desc="simulate", unit="mb", disable=not progress if progress is not None else None
    )


class LineProgress:
    """Logs `done/total` at most every `every_s` seconds, and once when closed."""

    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.every_s = total, every_s
        self.done, self.label = 0, ""
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._log(now)

    def set_postfix_str(self, s: str = "") -> None:
        self.label = s

    def close(self) -> None:
        self._log(time.monotonic())

    def _log(self, now: float) -> None:
        share = 100 * self.done / self.total if self.total else 100.0
        where = f", {self.label}" if self.label else ""
        log.info(
            "simulate: %d/%d micro-batches (%.0f%%)%s, %.0f s",
            self.done,
            self.total,
            share,
            where,
            now - self._start,
        )


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False
