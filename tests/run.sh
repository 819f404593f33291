#!/usr/bin/env bash
# Installs what the tests need and runs the whole suite (CPU tests; GPU tests
# skip cleanly without a CUDA device; MPI tests launch mpiexec with timeouts).
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of PyTorch: an unpinned `torch` would pull several GB of CUDA packages.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check ".[test]"
python -m pytest "$@"
