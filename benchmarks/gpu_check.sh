#!/usr/bin/env bash
# Everything a GPU session has to run for the kernels issue, in one call (device time is scarce):
#   bash benchmarks/gpu_check.sh          # ~9 minutes on one H200: GPU tests, then bench_gpu.py
# The device tool's machine has torch, triton and transformers but not this package: run from the
# repository root. The results land in benchmarks/results/gpu.json, and in $OUT when the tool sets it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "no nvidia-smi"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -x tests/test_kernels.py tests/test_triton_model.py 2>&1 | tail -15
python benchmarks/bench_gpu.py "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu.json "$OUT/"; fi
