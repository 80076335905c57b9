#!/usr/bin/env bash
# Incremental developer build: core, core tests and the extension, linked into the
# source tree so `PYTHONPATH=python pytest` imports it without installing.
#   scripts/dev-build.sh            CPU kernels only (fast)
#   MEMWARDEN_CUDA=ON scripts/dev-build.sh   also compile the CUDA sources (arch 9.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(pwd)/.venv/bin/python}
export PATH="$(dirname "$PYTHON"):$PATH"  # the venv's cmake and ninja
CUDA=${MEMWARDEN_CUDA:-OFF}
BUILD=build/dev-$(echo "$CUDA" | tr '[:upper:]' '[:lower:]')
cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PYTHON" -DMEMWARDEN_CUDA="$CUDA" \
  -DMEMWARDEN_BUILD_TESTS="${MEMWARDEN_BUILD_TESTS:-ON}" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90-real}" >/dev/null
cmake --build "$BUILD" -j "${JOBS:-2}"
ln -sf "$(pwd)/$BUILD"/_C*.so python/memwarden/
echo "built $BUILD; run: PYTHONPATH=python $PYTHON -m pytest tests/python; ctest --test-dir $BUILD"
