#!/usr/bin/env bash
# Downloads, on a machine with the package registry, every wheel scripts/validate_gpu.sh
# installs offline on the GPU machine, for its platform (default: CPython 3.12, manylinux
# x86_64), and splits the large ones into 50 MB parts for transfer.
#
#   bash scripts/fetch_gpu_wheels.sh [OUT_DIR]        # default .whl/gpu (ignored by git)
#   PYTHON_VERSION=3.11 bash scripts/fetch_gpu_wheels.sh
#
# Copy OUT_DIR to the GPU machine (any way that keeps files <= 50 MB), then run
#   bash scripts/validate_gpu.sh --wheels OUT_DIR
# SHA256SUMS holds the checksums of the whole wheels; the install step checks them after
# joining the parts.
set -euo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (usage: bash $0 [OUT_DIR])" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
out="${1:-.whl/gpu}"
py="${PYTHON_VERSION:-3.12}"
mkdir -p "$out"
python3 -m pip download --disable-pip-version-check --only-binary=:all: \
    --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform linux_x86_64 \
    -d "$out" -r scripts/gpu-wheels.txt
cd "$out"
sha256sum -- *.whl > SHA256SUMS
for wheel in *.whl; do
    if [ "$(stat -c %s "$wheel")" -gt $((50 * 1024 * 1024)) ]; then
        split -b 50m "$wheel" "$wheel.part-"
        rm -- "$wheel"
    fi
done
ls -l
