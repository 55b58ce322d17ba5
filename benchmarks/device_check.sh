#!/usr/bin/env bash
# The GPU columns of BENCHMARKS.md in one call, on a machine with one NVIDIA GPU.
#
#   bash benchmarks/device_check.sh [OUT_DIR]      # default OUT_DIR: device_check
#
# Runs, each under its own time limit (8 minutes in all, python start-up included):
#   1. sweep.json        benchmarks/sweep.py --end-to-end --random-only: a random sweep of
#                        1,000 configurations, 1e8 agent-rounds, compilation included
#                        (target on a GPU: >= 1e8 agent-rounds/s end to end), chunks of
#                        2^20 agents;
#      sweep_big.json    the same with 250 seeds (1e9 agent-rounds), where compilation
#                        weighs less in the end-to-end rate;
#   2. local_step.json   benchmarks/local_step.py --quick: the local step's model FLOPs
#                        utilisation (MiniLM-L6 and roberta-base size, against the GPU's
#                        dense TF32 peak) next to PyTorch + PEFT;
#   3. devices_per_gpu.json  benchmarks/devices_per_gpu.py: MiniLM devices one GPU trains
#                        per round with the vmapped path (tau = 20, batch 32, seq 64);
#   4. inference.json    benchmarks/inference.py --gpu: ONNX Runtime CUDA inference,
#                        dense and pruned (needs onnxruntime-gpu; the JSON says if absent).
# Each step writes its JSON (stdout) and log (stderr) under OUT_DIR; a step that fails or
# runs out of time is reported in summary.txt and the next one still runs. The machine's
# description (nvidia-smi, jax devices) goes to machine.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-device_check}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" 2>&1
} > "$OUT/machine.txt"

: > "$OUT/summary.txt"
step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log its outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  local what=ok
  [ $rc -eq 124 ] && what="timed out after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="failed (exit $rc, see $name.log)"
  echo "$name: $what, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

step sweep 110 "$PY" benchmarks/sweep.py --end-to-end --random-only --random 1000 \
  --random-seeds 25 --chunk-agents 1048576
step sweep_big 70 "$PY" benchmarks/sweep.py --end-to-end --random-only --random 1000 \
  --random-seeds 250 --chunk-agents 1048576
step local_step 120 "$PY" benchmarks/local_step.py --quick
step devices_per_gpu 100 "$PY" benchmarks/devices_per_gpu.py --groups 1 16 64 256 \
  --budget-s 20
step inference 70 "$PY" benchmarks/inference.py --gpu --batches 1 32 128 --budget-s 1
echo "total $SECONDS s; results in $OUT/" | tee -a "$OUT/summary.txt"
