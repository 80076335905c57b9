#!/usr/bin/env bash
# Builds the CUDA extension on a machine with a GPU and runs the CUDA-relevant tests and
# the benchmarks there, writing logs and JSON under $OUT (or build/gpu-check).
#   scripts/gpu-check.sh [pytest -k expression]     (BENCHES="alloc paged_kv" limits the benchmarks)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-$(command -v python3)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PYTHON -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$OUT/gpu.txt"
nvcc --version | tail -1 | tee -a "$OUT/gpu.txt"
MEMWARDEN_CUDA=ON MEMWARDEN_BUILD_TESTS=OFF JOBS=16 scripts/dev-build.sh >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
PYTHONPATH=python $PYTHON -m pytest tests/python -q -p no:cacheprovider -x ${1:+-k "$1"} 2>&1 | tee "$OUT/pytest.log" | tail -15
for bench in benchmarks/bench_*.py; do
  name=$(basename "$bench" .py)
  [[ -z "${BENCHES:-}" || " $BENCHES " == *" ${name#bench_} "* ]] || continue
  PYTHONPATH=python $PYTHON "$bench" --help 2>/dev/null | grep -q -- "--device" || continue
  for device in cuda cpu; do
    PYTHONPATH=python $PYTHON "$bench" --device "$device" --json "$OUT/${name}_${device}.json" 2>&1 | tail -12
  done
done
