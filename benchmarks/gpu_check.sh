#!/usr/bin/env bash
# The GPU check as one command on the bare GPU machine (see docs/benchmarks.md):
#   bash benchmarks/gpu_check.sh            # writes $OUT/gpu_check.json (+ gpu_check.log)
# Installs the carried wheels (.gpu_wheels/) into a private folder, never into the system
# Python, and runs python -m benchmarks.gpu_check from the working tree (no pip install -e).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
SITE="$(mktemp -d)/site"
mkdir -p "$SITE"
for w in .gpu_wheels/*.whl; do python -m zipfile -e "$w" "$SITE"; done   # a wheel is a zip: no pip needed
export PYTHONPATH="$PWD:$SITE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
python -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
