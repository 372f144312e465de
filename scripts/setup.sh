#!/usr/bin/env bash
# Create .venv and install micromoe with its test tools. Idempotent; safe to run on every call.
# PyTorch: an already-installed torch is kept (GPU users bring their own CUDA build); otherwise the
# pinned CPU build is installed, which on our CI machines is a local file and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
fi
"$VPY" -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
"$VPY" -c "import micromoe, torch, numba, highspy" || { echo "setup failed: micromoe or a dependency does not import" >&2; exit 1; }
