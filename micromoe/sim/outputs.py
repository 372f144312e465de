"""Output files of `micromoe simulate`, checked before any work is done.

A run may take minutes; a typo in `--json` or `--plot` must not surface only at the end, and an
output must never overwrite an input trace or the other output.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_outputs(outputs: dict[str, str | None], inputs: list[str]) -> None:
    """ValueError unless every given output (flag -> path) can be written now, and no two outputs or
    an output and an input (existing trace files) are the same file."""
    taken: dict[Path, str] = {}
    for path in inputs:
        if Path(path).is_file():
            taken[Path(path).resolve()] = f"the input trace {path!r}"
    for flag, value in outputs.items():
        if value is None:
            continue
        path = Path(value)
        key = path.resolve()
        if key in taken:
            raise ValueError(f"{flag} {value!r} is {taken[key]}; writing it would overwrite that file")
        check_writable(path, flag)
        taken[key] = f"also given to {flag}"


def check_writable(path: Path, flag: str) -> None:
    """ValueError naming `flag` unless `path` is (or can be created as) a writable regular file.

    Probes by opening for append (no truncation); a file created by the probe is removed again.
    """
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory; give a file name such as {path / 'out'}")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: directory {str(parent)!r} does not exist; create it first")
    existed = path.exists()
    if existed and not path.is_file():
        raise ValueError(f"{flag} {str(path)!r} is not a regular file")
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    if not existed:
        os.unlink(path)
