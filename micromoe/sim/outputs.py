"""Output files of `micromoe simulate`, checked before any work is done.

A run may take minutes; a typo in `--json` or `--plot` must not surface only at the end, and an
output must never overwrite an input trace or the other output.
"""

from __future__ import annotations

from pathlib import Path

from micromoe.paths import check_writable_file


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
        check_writable_file(path, flag)
        taken[key] = f"also given to {flag}"
