"""What a training run writes, and the rules that keep one run from destroying another.

`--out OUT` holds one run: `log.jsonl`, `config.json`, the report (`report.md` and its PNGs),
`checkpoints/`, and `.lock`. `--record-routing FILE` may live anywhere else. The rules, all checked
before any process starts (`check_run_outputs`, then `RunLock.claim`):

- OUT must be a folder this process can create or write into (not a file, not under /proc, not on
  a read-only mount); FILE a writable file in an existing folder.
- An OUT that holds another run (a log, a config or checkpoints) is refused unless `--resume`
  continues it or `--overwrite` replaces it (its files are removed once the lock is held).
- FILE that exists is refused unless `--resume` (the routing log is continued from the
  checkpoint's step) or `--overwrite`; FILE that is one of the run's own files or inputs (OUT's
  files, `--data`, `--cost-model`) is refused whatever the flags.
- One run at a time per OUT: an exclusive `flock` on OUT/.lock, held open for the whole run. The
  kernel drops it when its holder dies (even by SIGKILL), so a crash never leaves a false lock; a
  leftover `.lock` file means nothing by itself. Spawned ranks hold it shared, so a job whose
  launcher died still counts as running while any rank lives.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from micromoe.paths import check_creatable_dir, check_writable_file, is_inside, same_path

LOG = "log.jsonl"
CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
REPORT_FILES = ("report.md", "loss.png", "balance.png", "throughput.png")
RUN_MARKERS = (LOG, CONFIG, CHECKPOINTS)  # any of these: OUT holds a run


def run_files(out: Path) -> list[Path]:
    """Every path of OUT that a run writes (files and the checkpoints folder)."""
    out = Path(out)
    return [out / name for name in (LOG, CONFIG, CHECKPOINTS, LOCK, *REPORT_FILES)]


def holds_run(out: Path) -> bool:
    """Whether OUT holds (part of) a run: a log, a config or a checkpoints folder."""
    return any((Path(out) / name).exists() for name in RUN_MARKERS)


def check_run_outputs(
    out: Path,
    *,
    routing: Path | None,
    resume: bool,
    overwrite: bool,
    inputs: dict[str, Path | None],
) -> None:
    """ValueError (one line naming the flag, the path and the problem) unless the run may write
    its outputs: OUT creatable, no other run in it unless resumed or overwritten, the routing log
    neither an existing file (unless resumed or overwritten) nor one of the run's files or inputs.

    `inputs` maps an input flag to its path (e.g. {"--data": ..., "--cost-model": ...}; None or a
    name that is not a path is ignored). Creates nothing (probes are removed again).
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    check_creatable_dir(out, "--out")
    for flag, path in _existing(inputs):
        if any(is_inside(path, own) or is_inside(own, path) for own in run_files(out)):
            raise ValueError(
                f"{flag} {str(path)!r} is, or holds, one of the files the run writes in --out "
                f"{str(out)!r}; move it out of there or choose another --out"
            )
    if not resume and not overwrite and holds_run(out):
        found = ", ".join(name for name in RUN_MARKERS if (out / name).exists())
        raise ValueError(
            f"--out {str(out)!r} holds another run ({found}); pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )
    if routing is not None:
        _check_routing(Path(routing), out, resume=resume, overwrite=overwrite, inputs=inputs)


def _check_routing(
    routing: Path, out: Path, *, resume: bool, overwrite: bool, inputs: dict[str, Path | None]
) -> None:
    flag = "--record-routing"
    for own in run_files(out):
        if same_path(routing, own) or is_inside(routing, out / CHECKPOINTS):
            raise ValueError(
                f"{flag} {str(routing)!r} is the run's own {own.name} in --out; give a file outside "
                f"{str(out / CHECKPOINTS)!r} with another name, such as {str(out / 'routing.jsonl')!r}"
            )
    for input_flag, path in _existing(inputs):
        if same_path(routing, path) or is_inside(routing, path):
            raise ValueError(
                f"{flag} {str(routing)!r} is this run's {input_flag} input; writing it would destroy that"
            )
    check_writable_file(routing, flag)
    if routing.exists() and not resume and not overwrite:
        raise ValueError(
            f"{flag} {str(routing)!r} already exists; pass --resume to continue it with the run, "
            "--overwrite to replace it, or another file name"
        )


def _existing(inputs: dict[str, Path | None]) -> list[tuple[str, Path]]:
    """(flag, path) of the inputs that name an existing file or folder."""
    return [(flag, Path(p)) for flag, p in inputs.items() if p is not None and Path(p).exists()]


def clear_run(out: Path) -> None:
    """Remove the files a run wrote into OUT (for --overwrite; the caller holds the lock). Files
    that no run writes stay."""
    for path in run_files(Path(out)):
        if path.name == LOCK:
            continue  # held right now; see RunLock
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


@dataclass
class RunLock:
    """The lock that makes a run the only one writing to OUT (module docstring).

    `claim` takes it exclusively (refusing, in one line, an OUT in use); `share` turns it into a
    shared lock before ranks are spawned, and each spawned rank `join`s it shared.
    """

    out: Path
    _fp: IO[str] | None = field(default=None, repr=False)

    @classmethod
    def claim(cls, out: Path) -> RunLock:
        """Create OUT if needed and lock it exclusively; ValueError if another run holds it."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        fp = (out / LOCK).open("a+")
        try:
            fcntl.flock(fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fp.seek(0)
            holder = fp.read().strip() or "unknown"
            fp.close()
            raise ValueError(
                f"--out {str(out)!r} is in use by another micromoe train (pid {holder}); wait for it to "
                "finish or choose another --out"
            ) from None
        fp.seek(0)
        fp.truncate()
        fp.write(f"{os.getpid()}\n")
        fp.flush()
        return cls(out, fp)

    @classmethod
    def join(cls, out: Path) -> RunLock:
        """A spawned rank's shared hold on the lock its launcher took (see `share`)."""
        fp = (Path(out) / LOCK).open("a+")
        fcntl.flock(fp, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only shared holders exist: never blocks
        return cls(Path(out), fp)

    def share(self) -> None:
        """Downgrade to a shared lock, so spawned ranks can join it (a new run still cannot)."""
        assert self._fp is not None, "share() after release()"
        fcntl.flock(self._fp, fcntl.LOCK_SH | fcntl.LOCK_NB)

    def release(self) -> None:
        """Drop the lock (the file stays: unlinking it would let two runs lock different files)."""
        if self._fp is not None:
            self._fp.close()
            self._fp = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
