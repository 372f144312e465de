"""Where a benchmark ran, for its results JSON: CPU or GPU name, Python and package versions, git commit.

The benchmark scripts import it as `import _env` (a script's own folder, benchmarks/, is on
sys.path). Each script picks the entries it records, so its JSON keys stay its own. Packages,
torch included, are imported only when asked for, and one that cannot be imported is recorded as
'unavailable: <why>' instead of failing the run.
"""

from __future__ import annotations

import importlib
import platform
import subprocess
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
NO_COMMIT = "unknown (no git history on this machine)"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows (e.g. 'x86_64')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA `torch.device` (index None: the current one), else 'cpu (<model>)'."""
    if device.type != "cuda":
        return f"cpu ({cpu_name()})"
    return importlib.import_module("torch").cuda.get_device_name(device)


def package_version(name: str) -> str:
    """Module `name`'s __version__, else its installed distribution's; 'unavailable: <why>' when it
    cannot be imported."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError: report it
        return f"unavailable: {exc}"
    found = getattr(module, "__version__", None)
    if found is None:
        try:
            found = installed_version(name)
        except PackageNotFoundError:
            return "unavailable: no version recorded"
    return str(found)


def _cuda() -> str | None:
    return importlib.import_module("torch").version.cuda  # None on a CPU-only build


def _nccl() -> str:
    return ".".join(map(str, importlib.import_module("torch").cuda.nccl.version()))


_SPECIAL = {"python": platform.python_version, "cuda": _cuda, "nccl": _nccl}


def versions(*names: str) -> dict[str, str | None]:
    """{name: version}, in the order given. A name is 'python', 'cuda' (torch's CUDA; None on a
    CPU-only build), 'nccl' (torch's) or an importable package ('torch', 'numpy', 'numba',
    'highspy', 'triton', 'torchtitan', ...; see `package_version`)."""
    return {n: _SPECIAL[n]() if n in _SPECIAL else package_version(n) for n in names}


def git_commit() -> str:
    """The full commit hash of this checkout's HEAD, or NO_COMMIT where there is no git history."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return NO_COMMIT
    return out if len(out) == 40 else NO_COMMIT
