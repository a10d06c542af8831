#!/usr/bin/env bash
# The GPU benchmark in one command on a fresh GPU machine: install the package, run, write bench/results/gpu_step.*
# Sized for under 5 minutes on one H200 (FLUX width, 2 double + 4 single blocks, 1024x1024, bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e .
python bench/gpu_step.py "$@"
