#!/usr/bin/env bash
# GPU readiness check (issue 22): train a full-resolution STAS recipe for a few minutes with bf16, predict the
# 64 held-out shared images on the GPU, a 1-GPU DDP step, GPU-vs-CPU parity; figures to $OUT/gpu_check.json.
#   bash benchmarks/gpu_check.sh [--minutes 4]      on a machine with a CUDA GPU (about 8 minutes in all)
#   bash benchmarks/gpu_check.sh --dry-run           anywhere: tiny model, synthetic data, CPU (the test suite)
# Uses .venv when it exists (make install), else the python3 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
