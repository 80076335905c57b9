#!/usr/bin/env bash
# Sets up everything memwarden needs on a fresh Linux x86-64 machine with Python 3.11:
# a virtual environment in .venv with torch and the build/test tools, GoogleTest
# (Debian package, for the C++ core tests), and memwarden itself, built against that
# torch without build isolation. CUDA sources are compiled when nvcc is found.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN=${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${MEMWARDEN_TORCH:-torch==2.14.1}

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv
fi
PY=.venv/bin/python
export PATH="$(pwd)/.venv/bin:$PATH"

echo "== installing $TORCH_SPEC and build/test tools"
$PY -m pip install -q --disable-pip-version-check "$TORCH_SPEC" numpy \
  "scikit-build-core>=0.10" "cmake>=3.26" ninja pytest hypothesis expecttest psutil \
  transformers==5.18.0 accelerate huggingface_hub gguf import-linter matplotlib rich \
  "fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" openai nbmake ipykernel

if [ ! -f /usr/include/gtest/gtest.h ] && command -v apt-get >/dev/null; then
  echo "== installing GoogleTest (libgtest-dev)"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo")
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libgtest-dev >/dev/null
fi

if command -v nvcc >/dev/null && $PY -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  # One architecture keeps the build short on a machine without a GPU; set
  # TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") to build for others.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  echo "== CUDA: $(nvcc --version | tail -1); torch CUDA $($PY -c 'import torch; print(torch.version.cuda)'); archs $TORCH_CUDA_ARCH_LIST"
else
  echo "== CUDA: no nvcc or a CPU build of torch: CPU kernels only"
fi

echo "== building and installing memwarden (no build isolation)"
mkdir -p build
if ! $PY -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps . >build/pip-install.log 2>&1; then
  tail -n 60 build/pip-install.log
  echo "memwarden build failed; full log in build/pip-install.log" >&2
  exit 1
fi
grep -E "Building (CXX|CUDA) object|Linking|memwarden:" build/pip-install.log || true
$PY -c 'import memwarden; print("memwarden", memwarden.__version__, "installed")'
