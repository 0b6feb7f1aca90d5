# Sourced by tpu_pod.sh and slurm_gpu.sbatch (not run on its own): print commands, and the
# plan gate that runs `l2d-jax plan ... --emit-overrides` here before anything is launched.
#
# plan_gate PY PLAN_ARGS...   (PLAN_ARGS: --config FILE and the planner's options/overrides)
#   Runs `env JAX_PLATFORMS=cpu PY -m l2d_jax.cli plan PLAN_ARGS --emit-overrides F --json J`,
#   ALSO under --dry-run (it is local: no gcloud, no srun), printing the command, the planner's
#   report, its verdict and the mesh. Sets
#     PLAN_RC         0: fits (as given or with the planner's change: F written), 3: nothing
#                     fits (no F)
#     PLAN_OVERRIDES  the planner's --config.KEY=VALUE lines (empty when it fits as given)
#     PLAN_MESH       the mesh that was planned, "data=N,fsdp=N,tensor=N" (the planner's -1
#                     resolved, its change applied); empty when the plan's JSON names none
#     PLAN_ARGS_OUT   what a launch appends to its train command: PLAN_OVERRIDES, after the
#                     --config.mesh.* of PLAN_MESH unless they set the mesh themselves (so the
#                     config's data=-1 is never launched unplanned)
#   Any other exit of the planner stops the script (exit code of the planner).
#   A fitting result is cached in L2D_PLAN_CACHE (default ~/.cache/l2d_jax/plans), keyed by the
#   command, configs/*.py and the checkout's commit and uncommitted diff: the TPU plan compiles
#   for minutes, and `--dry-run` then the real run (or create then train) plan the same thing.

show_cmd() {  # print CMD... shell-quoted, readably, on one line
  local w first=1
  for w in "$@"; do
    [[ $first -eq 1 ]] || printf ' '
    first=0
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then printf '%s' "$w"
    else printf "'%s'" "${w//\'/\'\\\'\'}"; fi
  done
  echo
}

plan_mesh() {  # plan_mesh PY JSON [--config.* ...]: the mesh a plan JSON resolved, changes applied
  "$1" -c '
import json, sys
plan = json.load(open(sys.argv[1]))
mesh = dict((plan.get("aot") or {}).get("train_mesh") or plan.get("mesh") or {})
for line in sys.argv[2:]:
    key, _, value = line[len("--config."):].partition("=")
    if key.startswith("mesh."):
        mesh[key[len("mesh."):]] = int(value)
print(",".join(f"{k}={int(mesh[k])}" for k in ("data", "fsdp", "tensor") if k in mesh))
' "${@:2}"
}

_sha256() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }

plan_gate() {
  local py="$1"; shift
  local repo; repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  local cache="${L2D_PLAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/l2d_jax/plans}"
  local key
  key="$( { printf '%s\n' "$@"; cat "$repo"/configs/*.py; git -C "$repo" rev-parse HEAD 2>/dev/null || true
            git -C "$repo" diff HEAD -- l2d_jax configs 2>/dev/null || true; } | _sha256 | cut -c1-24)"
  local overrides="$cache/$key.overrides" json="$cache/$key.json"
  local cmd=(env JAX_PLATFORMS=cpu "$py" -m l2d_jax.cli plan "$@" --emit-overrides "$overrides" --json "$json")
  PLAN_RC=0
  mkdir -p "$cache"
  if [[ -f "$overrides" && -f "$json" ]]; then
    echo "# plan (cached: $overrides; delete it to plan again): $(show_cmd "${cmd[@]}")"
  else
    echo "# plan: $(show_cmd "${cmd[@]}")"
    rm -f "$overrides" "$json"
    "${cmd[@]}" || PLAN_RC=$?
    # --require-fit exits 3 when the config does not fit AS GIVEN; the overrides file is written
    # only when it, or the planner's change, fits (nothing fits: no file)
    [[ $PLAN_RC -eq 3 && -f "$overrides" ]] && PLAN_RC=0
    if [[ $PLAN_RC -ne 0 ]]; then rm -f "$overrides" "$json"; fi
    if [[ $PLAN_RC -ne 0 && $PLAN_RC -ne 3 ]]; then
      echo "$(basename "$0"): the plan failed (exit $PLAN_RC); fix what it says above, or --no-plan skips it" >&2
      exit "$PLAN_RC"
    fi
  fi
  PLAN_OVERRIDES=() PLAN_ARGS_OUT=() PLAN_MESH=""
  if [[ $PLAN_RC -eq 3 ]]; then
    echo "# plan verdict: does NOT fit, and no change the planner tried fits"
    return 0
  fi
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"; line="${line%"${line##*[![:space:]]}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    [[ "$line" == --config.*=* ]] || {
      echo "$(basename "$0"): $overrides: expected --config.KEY=VALUE lines, got: $line" >&2; exit 2; }
    PLAN_OVERRIDES+=("$line")
  done < "$overrides"
  PLAN_MESH="$(plan_mesh "$py" "$json" "${PLAN_OVERRIDES[@]}")" \
    || { echo "$(basename "$0"): cannot read the mesh from the plan's $json (above); delete it to plan again" >&2; exit 2; }
  local part parts
  if [[ -n "$PLAN_MESH" && " ${PLAN_OVERRIDES[*]} " != *" --config.mesh."* ]]; then
    IFS=, read -r -a parts <<< "$PLAN_MESH"
    for part in "${parts[@]}"; do PLAN_ARGS_OUT+=("--config.mesh.$part"); done
  fi
  PLAN_ARGS_OUT+=("${PLAN_OVERRIDES[@]}")
  if [[ ${#PLAN_OVERRIDES[@]} -eq 0 ]]; then
    echo "# plan verdict: fits as configured"
  else
    echo "# plan verdict: fits with the planner's change: ${PLAN_OVERRIDES[*]}"
  fi
  if [[ -n "$PLAN_MESH" ]]; then echo "# mesh: $PLAN_MESH"
  else echo "# mesh: as the config says (the plan's JSON names none)"; fi
}
