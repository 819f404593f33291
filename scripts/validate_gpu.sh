#!/usr/bin/env bash
# One-command GPU validation (see scripts/validate_gpu.py):
#   bash scripts/validate_gpu.sh --wheels WHEEL_DIR [--out outputs/gpu-validation]
# Installs DALI offline from WHEEL_DIR (parts joined), runs the gpu tests, the stage stress
# test, compute-sanitizer, the kernel benchmark (eager and CUDA graph), the throughput
# profile and the MPI exchange, and writes OUT/report.json and OUT/report.md.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/validate_gpu.py "$@"
