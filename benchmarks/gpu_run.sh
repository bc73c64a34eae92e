#!/usr/bin/env bash
# The GPU benchmark, as one command for the GPU machine (docs/performance.md, "GPU").
# From the repository root, with gpu-kit/ (python -m benchmarks.gpu_prepare) beside it:
#   bash benchmarks/gpu_run.sh                 # results into $OUT (the device tool's folder), else gpu-results/
#   bash benchmarks/gpu_run.sh --smoke         # the same on a CPU, tiny shape, in seconds
# TIME_BUDGET (seconds, default 420) bounds the measurements; the whole run ends within about a minute of it.
set -o pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
if ls gpu-kit/wheels/*.whl >/dev/null 2>&1; then  # bitsandbytes for the 4-bit case: no package index there
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fedit-site gpu-kit/wheels/*.whl &&
    export PYTHONPATH=/tmp/fedit-site${PYTHONPATH:+:$PYTHONPATH}
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
fi
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --kit gpu-kit --out "$out" --time-budget "${TIME_BUDGET:-420}" "$@" \
  2>&1 | tee "$out/log.txt"
