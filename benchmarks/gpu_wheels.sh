#!/usr/bin/env bash
# Download the wheels the GPU check needs on the bare GPU machine (Python 3.12, x86_64) into
# .gpu_wheels/ (git-ignored; carried to the machine by the `run` tool, see docs/benchmarks.md).
# monai (pure Python), PyYAML (cp312 binary), tqdm: about 2.6 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
pip download --no-deps -d .gpu_wheels "monai==1.6.1" "tqdm>=4.60"
pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_wheels "pyyaml>=6.0"
ls -l .gpu_wheels && du -sh .gpu_wheels
