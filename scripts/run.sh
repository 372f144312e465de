#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on a CPU (no GPU needed): train the `tiny` MoE
# transformer on 4 gloo processes with MicroEP for a few minutes. It prints the balance of the
# executed plans against plain EP on the same routing, and writes out/train-tiny/report.md with
# plots (loss, balance per layer, throughput). Extra args go to `micromoe train`
# (e.g. --max-steps 100, --dispatcher ep, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/micromoe train --preset tiny --nproc 4 --dispatcher microep --out out/train-tiny "$@"
