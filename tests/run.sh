#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (CPU tests, and the GPU code
# paths on the CPU emulation of CUDA streams; `gpu` tests skip cleanly without a CUDA
# device; MPI tests launch mpiexec with timeouts): about 11 minutes on 2 cores. Arguments
# go to pytest (`bash tests/run.sh tests/test_buffer.py -x`).
#
# A skipped test fails the run unless it is marked `gpu` (tests/skip_guard.py): a test
# that skips because a package is missing is not coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
# PyTorch, the tested version; an installed PyTorch is kept. Where a CPU wheel of it is
# provided locally (the development machines) the pin installs that CPU build; from the public
# index it installs the CUDA build (larger and slower, it works all the same). For a CPU build
# from the public index, install it first from PyTorch's CPU index (README, set-up):
#   python -m pip install torch --index-url https://download.pytorch.org/whl/cpu
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check ".[test]"
export DALI_REHEARSAL_NO_SKIPS="${DALI_REHEARSAL_NO_SKIPS:-1}"
python -m pytest "$@"
