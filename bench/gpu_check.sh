#!/usr/bin/env bash
# The one-shot GPU check, for the day a GPU is at hand. From the repository root:
#
#     bench/gpu_check.sh
#
# Installs nothing beyond `make setup` (run only when .venv is missing). With CUDA it runs the
# `gpu` tests (fp16 and bf16 tiny runs, the cpu:gloo,cuda:nccl group, the 83M reference step),
# then prints the precision table of bench/gpu_check.py for the reference recipe at batch 32.
# Without CUDA it dry-runs the same code on the reduced tiny recipe (the table says "cpu"): CI
# runs it that way so that it cannot rot. When $OUT is set (a machine the repository was copied
# to, whose $OUT folder comes back), the test log and the table are written there too.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
export RAY_AUTH_MODE=token PYTHONHASHSEED=0 RAY_enable_metrics_collection=0 PYTHONUNBUFFERED=1
out="${OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$out"
status=0
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || true
    .venv/bin/python -m pytest -m gpu -q -rs -s tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" || status=$?
else
    echo "[gpu_check] no CUDA device: dry run on the CPU (the gpu tests would skip)" >&2
fi
.venv/bin/python bench/gpu_check.py "$@" | tee "$out/gpu_check.md"
echo "[gpu_check] files in $out" >&2
exit "$status"
