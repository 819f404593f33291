#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (CPU tests, and the GPU code
# paths on the CPU emulation of CUDA streams; `gpu` tests skip cleanly without a CUDA
# device; MPI tests launch mpiexec with timeouts).
#
# A skipped test fails the run unless it is marked `gpu` (tests/skip_guard.py): a test
# that skips because a package is missing is not coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of PyTorch: an unpinned `torch` would pull several GB of CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check ".[test]"
export DALI_REHEARSAL_NO_SKIPS="${DALI_REHEARSAL_NO_SKIPS:-1}"
python -m pytest "$@"
