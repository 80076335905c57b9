#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh, and a CPU build of vLLM: scripts/setup-vllm.sh,
# unless MEMWARDEN_SKIP_VLLM=1) and runs every test: the C++ core tests (ctest), the same
# under AddressSanitizer + UndefinedBehaviorSanitizer, a smoke run of each benchmark, and
# the Python tests (pytest, with the parity and gateway tests against the real vLLM).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$(pwd)/.venv/bin:$PATH"

declare -a PHASES=()
phase() {  # phase NAME COMMAND...: runs and times one phase
  local name=$1 start=$SECONDS
  shift
  echo "=================== $name"
  "$@"
  PHASES+=("$(printf '%-28s %5ds' "$name" $((SECONDS - start)))")
}

core_tests() {  # core_tests BUILD_DIR [CMAKE ARGS...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DMEMWARDEN_BUILD_EXTENSION=OFF -DMEMWARDEN_BUILD_TESTS=ON "$@" >/dev/null
  cmake --build "$dir" -j "$(nproc)"
  ctest --test-dir "$dir" --output-on-failure -j "$(nproc)"
}

benchmarks_smoke() {
  for bench in benchmarks/bench_*.py; do
    echo "--- $bench --quick"
    python "$bench" --quick --json "build/bench-smoke/$(basename "$bench" .py).json"
  done
}

phase "setup (venv, build, install)" scripts/setup.sh
if [ "${MEMWARDEN_SKIP_VLLM:-0}" != 1 ]; then  # the real vLLM the parity and gateway tests run against
  phase "vLLM CPU build (.venv-vllm)" scripts/setup-vllm.sh
fi
phase "C++ core tests" core_tests build/core-tests -DCMAKE_BUILD_TYPE=Release
phase "C++ core tests, ASan+UBSan" core_tests build/core-asan -DCMAKE_BUILD_TYPE=Debug -DMEMWARDEN_SANITIZE=ON
phase "benchmark smoke runs" benchmarks_smoke
phase "Python tests" python -m pytest tests/python -q -p no:cacheprovider

echo "=================== phase times"
printf '%s\n' "${PHASES[@]}"
