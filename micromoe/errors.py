"""Errors a `micromoe` command reports in one line, besides `ValueError` (a user mistake, exit 2).

`CommandError` is a failure of the job itself, not of its input (a rank stalled or died): the
command prints its message in one line and exits with status 1.
"""

from __future__ import annotations


class CommandError(RuntimeError):
    """A job failed for a reason its message names in one line (exit status 1)."""
