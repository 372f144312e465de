#!/usr/bin/env bash
# Create .venv and install micromoe with its test tools and the Hugging Face extra. Idempotent; safe to run on every call.
# PyTorch: an already-installed torch is kept (GPU users bring their own CUDA build); otherwise the
# pinned CPU build is installed, which on our CI machines is a local file and takes seconds.
# Progress goes to stderr, so stdout carries only what the caller runs afterwards. The install is
# skipped when pyproject.toml, this script and the venv's Python are unchanged since the last
# successful one (stamp: .venv/.micromoe-setup); delete the stamp or set MICROMOE_REINSTALL=1 to
# force it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VPY=.venv/bin/python
STAMP=.venv/.micromoe-setup

say() { echo "setup: $*" >&2; }

# pip's own progress lines, minus a harmless warning about the venv's location, to stderr
pip_install() {
  "$VPY" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
    | sed -u '/^WARNING: Location/d' >&2
}

if [ ! -x "$VPY" ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi

key=$({ cat pyproject.toml scripts/setup.sh; "$VPY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
if [ "${MICROMOE_REINSTALL:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] \
  && "$VPY" -c "import micromoe, torch, numba, highspy, transformers, safetensors, tokenizers" 2>/dev/null; then
  exit 0
fi

start=$SECONDS
say "installing micromoe and its dependencies into .venv (first run: about two minutes)"
pip_install --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  say "no torch in .venv: installing the CPU build torch==2.13.0"
  pip_install "torch==2.13.0"
fi
# keep the torch that is there (a dependency asking for another one must not replace a CUDA build)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$VPY" -c 'import torch; print("torch==" + torch.__version__)' >"$constraints"
pip_install -e ".[test,hf]" -c "$constraints"
"$VPY" -c "import micromoe, torch, numba, highspy, transformers, safetensors, tokenizers" || {
  say "setup failed: micromoe or a dependency does not import"
  exit 1
}
echo "$key" >"$STAMP"
say "done in $((SECONDS - start)) s"
