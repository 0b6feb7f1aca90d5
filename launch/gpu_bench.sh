#!/usr/bin/env bash
# Speed benchmarks on one GPU (JAX with CUDA; flax, transformers and torch installed; no gguf,
# tensorflow, datasets or clu needed: the models are random-weight presets of the real shapes).
#
#   OUT=/path/to/results launch/gpu_bench.sh
#
# Writes into $OUT (at most 8 files, all flat):
#   generate_smollm2_f32.json/.png   L2D tokens/s vs ODE grid points, SmolLM2-135M shape, float32
#   generate_llama1b_bf16.json/.png  the same, Llama-3.2-1B shape, bfloat16
#   train_llama1b_bf16_b4_t2048.json training step, Llama-3.2-1B shape, bfloat16, 4 x 2048 tokens
#   train_smollm2_f32_b4_t256.json   training step, SmolLM2 shape, float32, 4 x 256 (the CPU shape)
#   bench.log                        everything printed
# Each step has its own time limit (the first argument of `step`, seconds) so the run stays under 5
# minutes; the generate JSON files are rewritten after every measured point, so a step cut
# short still leaves the points it finished. `bench forward` (ours vs transformers on the same
# GPU) is left out for time; run it alone: `l2d-jax bench forward --model random:llama-3.2-1b
# --dtype bfloat16 --batch 1,8 --seq 128 --json forward.json`.
set -uo pipefail

: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python}
LOG="$OUT/bench.log"

# torch shares the GPU with JAX in `bench forward`: no 75 % pre-allocation by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step LIMIT_S ARGS...: one bench command with a wall-clock limit
    local limit=$1; shift
    echo "== [$(date +%T)] l2d-jax $* (limit ${limit}s)" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" -m l2d_jax.cli "$@" >>"$LOG" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || echo "!! exit code $rc: l2d-jax $*" | tee -a "$LOG"
}

{
    echo "== $(date)"; nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1
    "$PY" -c "import jax, flax; print('jax', jax.__version__, jax.default_backend(), jax.devices())" 2>&1
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" 2>&1
} >>"$LOG"

start=$SECONDS
step 90 bench generate --model random:smollm2-135m --dtype float32 --batch 1,8 \
    --steps 0,2,8,16 --new-tokens 32 --repeats 2 --json "$OUT/generate_smollm2_f32.json"
step 90 bench generate --model random:llama-3.2-1b --dtype bfloat16 --batch 1,8 \
    --steps 0,2,8,16 --new-tokens 32 --repeats 2 --json "$OUT/generate_llama1b_bf16.json"
step 60 bench train --preset llama-3.2-1b --dtype bfloat16 --batch 4 --seq 2048 --steps 3 \
    --json "$OUT/train_llama1b_bf16_b4_t2048.json"
step 40 bench train --dtype float32 --batch 4 --seq 256 --steps 3 \
    --json "$OUT/train_smollm2_f32_b4_t256.json"
echo "== done in $((SECONDS - start)) s" | tee -a "$LOG"
