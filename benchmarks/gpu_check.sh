#!/usr/bin/env bash
# Everything a GPU session has to run for the kernels issue, in one call (device time is scarce):
#   bash benchmarks/gpu_check.sh          # ~9 minutes on one H200: GPU tests, then bench_gpu.py
# The device tool's machine has torch, triton and transformers but not this package: run from the
# repository root. The results land in $OUT/gpu.json when the tool sets $OUT, else benchmarks/results/gpu.json.
# A failing test is reported but does not stop the benchmark: both are what the session is for.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image's torch is under python3
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
"$PYTHON" -m pytest -q tests/test_kernels.py tests/test_triton_model.py 2>&1 | tail -15 || echo "GPU TESTS FAILED (above)"
# Straight into $OUT when the device tool sets it: a run cut short still returns what it measured.
"$PYTHON" benchmarks/bench_gpu.py ${OUT:+--out "$OUT/gpu.json"} "$@"
