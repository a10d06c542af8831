#!/usr/bin/env bash
# The GPU benchmark in one command on a GPU machine: install the package, run, write bench/results/gpu_step.*
# Sized for under 5 minutes on one H200 (FLUX width, 2 double + 4 single blocks, 1024x1024, bf16).
# bench/gpu_checks.sh runs this and the FSDP / CPU-offload / 8-bit checks together.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/install_for_gpu.sh
"$PY" bench/gpu_step.py "$@"
