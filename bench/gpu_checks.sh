#!/usr/bin/env bash
# Every GPU check of the scale-out work in one command, sized for one `device` run (under 10 minutes on one H200):
#   1. the benchmark (bench/gpu_step.py: FLUX width, 2 double + 4 single blocks, 1024^2, bf16, full SenseFlow step)
#   2. the same step FSDP1-wrapped as yamls/flux.yaml does (per-block FULL_SHARD + activation checkpointing)
#   3. the same step with FSDP2 and parameter CPU offload (trainer.parallelism_config.fsdp.cpu_offload); exits 1
#      unless every FSDP2 unit offloads, the trained shards, gradients and Adam state are on the CPU between
#      steps and the blocks computed on CUDA (reported in bench/results/gpu_step_fsdp_offload.md)
#   4. tiny FLUX trained 3 batches on the GPU with optimizer.kind=adamw_8bit
# Each step has its own time limit, so what finishes comes back. Results: bench/results/gpu_step*.{md,json} and
# bench/results/gpu_checks.md (versions, exit codes, log tails); copied to $OUT when the device tool sets it.
#
# On the lent machine (no network, torch but no Composer): `bash bench/device_wheels.sh` here first, then
#   device run: command "bash bench/gpu_checks.sh", carry [".whl"], timeout_s 600
# On a GPU machine with network: `bash bench/gpu_checks.sh` (installs the package with pip).
# GPU_CHECKS_TINY=1 runs the same steps at tiny widths on the CPU (a dry run of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/install_for_gpu.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
RES=bench/results LOGS=$(mktemp -d)
tiny=() train_device=(trainer.device=gpu trainer.precision=amp_bf16)
if [ "${GPU_CHECKS_TINY:-0}" = 1 ]; then tiny=(--tiny); train_device=(); fi
report=$RES/gpu_checks${tiny:+_tiny}.md
{
  echo "# GPU checks ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo; echo "Command: \`bash bench/gpu_checks.sh\`${tiny:+ with GPU_CHECKS_TINY=1}"; echo; echo '```'
  nvidia-smi -L 2>&1 || echo 'no nvidia-smi'
  "$PY" -c 'import sys, torch, composer, diffusers, transformers; print("python", sys.version.split()[0], "| torch",
torch.__version__, "| cuda", torch.version.cuda, torch.cuda.is_available(), "| composer", composer.__version__,
"| diffusers", diffusers.__version__, "| transformers", transformers.__version__)' 2>&1
  echo '```'; echo; echo '| check | exit code | seconds |'; echo '|---|---|---|'
} > "$report"
check() {  # name, time limit in seconds, command...
  local name=$1 limit=$2 start=$SECONDS; shift 2
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1; local rc=$?
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (time limit)') | $((SECONDS - start)) |" >> "$report"
  echo "$name: exit $rc after $((SECONDS - start)) s"
}
check gpu_step 230 "$PY" bench/gpu_step.py "${tiny[@]}"
check gpu_step_fsdp1 110 "$PY" bench/gpu_step.py --fsdp --cycles 1 "${tiny[@]}"
check gpu_step_fsdp2_cpu_offload 140 env FSDP_VERSION=2 "$PY" bench/gpu_step.py --cpu-offload --cycles 1 "${tiny[@]}"
check tiny_flux_adamw_8bit 60 "$PY" train.py yamls/tiny_flux.yaml optimizer.kind=adamw_8bit trainer.max_duration=3ba \
  trainer.progress_bar=false "${train_device[@]}"
for log in "$LOGS"/*.log; do
  { echo; echo "## $(basename "$log" .log): last lines"; echo '```'; tail -n 25 "$log"; echo '```'; } >> "$report"
done
cat "$report"
if [ -n "${OUT:-}" ]; then cp "$report" "$RES"/gpu_step*.md "$RES"/gpu_step*.json "$OUT"/ 2>/dev/null; fi
exit 0
