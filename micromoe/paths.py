"""Output paths checked before any work: a file or folder a command will write, probed now.

A run may take minutes or hours; a typo in an output path must not surface only at the end, and
a path the operating system will refuse (a file where a folder is needed, a pseudo file system
such as /proc, a read-only mount) must be named in one line before anything starts. Each check
probes by doing what the command will do (open for append, create a folder) and undoes it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_writable_file(path: Path, flag: str) -> None:
    """ValueError naming `flag` unless `path` is (or can be created as) a writable regular file.

    Its folder must exist (a typo in a folder name is more likely than a wish for new folders).
    Probes by opening for append (no truncation); a file created by the probe is removed again.
    """
    path = Path(path)
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


def check_creatable_dir(path: Path, flag: str) -> None:
    """ValueError naming `flag` unless `path` is a folder this process can write into, or can be
    created as one (missing parents included). Creates nothing that outlives the call: the probe
    is a temporary folder inside the nearest existing ancestor, removed again."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder; give a folder name")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".micromoe-probe-", dir=existing)
    except OSError as exc:
        where = "written" if existing == path else f"created (in {str(existing)!r})"
        raise ValueError(f"{flag} {str(path)!r} cannot be {where}: {exc.strerror or exc}") from None
    os.rmdir(probe)


def same_path(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name the same file or folder (symlinks and `..` resolved; an
    existing pair is compared by inode, so hard links count as the same file)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it (after resolving both)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents
