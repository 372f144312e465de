"""The repository is self-contained: a LICENSE matching the package's, every bundled data file's
origin inside the repository (with a checksum that matches the file), and a README that speaks to
users (no paths outside the repository, no notes about runs still pending)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "micromoe" / "data"


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def test_license_file_matches_the_package_metadata():
    declared = re.search(r'^license = "([^"]+)"', _pyproject(), flags=re.M).group(1)
    text = (ROOT / "LICENSE").read_text()
    assert declared == "MIT" and text.startswith("MIT License") and "micromoe/data/README.md" in text


def _bundled() -> list[Path]:
    return sorted(
        p for p in DATA.rglob("*") if p.is_file() and p.name != "README.md" and "__pycache__" not in p.parts
    )


@pytest.mark.parametrize("path", _bundled(), ids=lambda p: str(p.relative_to(DATA)))
def test_every_bundled_file_has_its_origin_and_licence_written_down(path):
    notes = (DATA / "README.md").read_text()
    rel = path.relative_to(DATA)
    family = f"{rel.parent}/h200-*.json" if rel.parent.name == "cost_models" else None
    assert path.name in notes or (family and family in notes), (
        f"{rel} is not described in micromoe/data/README.md"
    )
    row = next(line for line in notes.splitlines() if path.name in line or (family and family in line))
    assert "licence" in notes.lower() and ("MIT" in row or "Apache" in row or "public domain" in row)
    listed = re.search(re.escape(path.name) + r"[^|]*?`([0-9a-f]{32})`", notes)
    if listed is None:  # a checksum given in a sentence ("md5 `...`") on the file's row
        listed = re.search(r"md5 `([0-9a-f]{32})`", row) if path.name in row else None
    if listed is not None:
        assert hashlib.md5(path.read_bytes()).hexdigest() == listed.group(1), f"{rel} changed: update its md5"


def test_the_package_ships_the_data_notes():
    patterns = re.search(r"^micromoe = \[(.*)\]$", _pyproject(), flags=re.M).group(1)
    assert '"data/README.md"' in patterns


def test_the_readme_speaks_to_users():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme, "no paths outside the repository"
    for note in (r"\bpending\b", "not yet re-measured", "not yet timed", r"\bTODO\b"):
        assert not re.search(note, readme), note
    assert "LICENSE" in readme and "micromoe/data/README.md" in readme
