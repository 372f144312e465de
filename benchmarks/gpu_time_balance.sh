#!/usr/bin/env bash
# The time-balancing measurements on one GPU, named by the GPU they ran on (H100 or H200).
#
#   bash benchmarks/gpu_time_balance.sh models OUT   # calibrate the bundled shapes on this GPU if it has
#                                                    # no bundled models yet, plan with them; start-up
#                                                    # calibration in a fresh process
#   bash benchmarks/gpu_time_balance.sh time OUT [PLANS]   # time the plans (default: PLANS made here)
#
# Both write under OUT (a folder) and print a table last. `models` plans the emulation suite with
# the new models, which needs HiGHS (LPLB): put a highspy wheel on PYTHONPATH where it is missing.
# Environment: ROUNDS (interleaved timing rounds, default 5), SKIP_STARTUP=1 (models: leave out the
# start-up calibration).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
phase=$1 out=$2
mkdir -p "$out"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name())")
tag=$(python3 -c "import sys; w = sys.argv[1].lower().replace('nvidia', '').split(); print(w[0].upper())" "$gpu")
echo "GPU: $gpu ($tag)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv || true

case $phase in
models)
  if ! ls micromoe/data/cost_models/"${tag,,}"-*.json >/dev/null 2>&1; then
    python3 benchmarks/calibrate_gpu.py --out "$out/calibration_1x$tag.json" --budget-s 15 \
      --models-dir "$out/models"
    python3 benchmarks/bench_emulated.py plan --gpu-name "$gpu" --models "$out/models" \
      --balancers ep,eplb,lplb,microep,microep-ar,microep-t,microep-ar-t \
      --out "$out/emulated_plans_1x$tag.json"
    tar -C "$out" -czf "$out/models.tgz" models
  fi
  if [ "${SKIP_STARTUP:-0}" != 1 ]; then
    python3 benchmarks/bench_startup_calibration.py --json "$out/startup_calibration_1x$tag.json"
  fi
  ;;
time)
  plans=${3:-benchmarks/results/emulated_plans_1x$tag.json}
  models=()
  if [ -d "$out/models" ]; then models=(--models "$out/models"); fi
  python3 benchmarks/bench_emulated.py time --plans "$plans" --rounds "${ROUNDS:-5}" "${models[@]}" \
    --json "$out/emulated_1x$tag.json"
  ;;
*)
  echo "phase must be models or time" >&2
  exit 2
  ;;
esac
