#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the bundled default (no GPU needed).
# Extra args go to `micromoe simulate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/micromoe simulate "$@"
