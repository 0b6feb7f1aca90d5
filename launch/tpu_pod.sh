#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it, install l2d-jax on every worker, start the
# SAME training command on all workers at once (--worker=all; jax.distributed finds the
# other workers itself: L2D_DISTRIBUTED=tpu), follow the log, stop, delete. Before creating
# the slice (create, run) and before starting a run (train), the planner compiles the train
# step for that slice HERE, ahead of time (`l2d-jax plan --aot-topology --require-fit`, needs
# libtpu: ./install.sh installs it), and a run that will not fit is refused (--force: start
# anyway). --dry-run prints the plan command with the gcloud ones.
#
# Usage: launch/tpu_pod.sh [--dry-run] COMMAND [options] [--config.KEY=VALUE ...]
# Commands:
#   plan      compile the train step for the slice here and say whether it fits (no gcloud)
#   create    gcloud compute tpus tpu-vm create (accelerator type, runtime version, --spot)
#   install   copy this checkout (or git clone --repo) to every worker, ./install.sh, jax[tpu]
#   train     start `l2d-jax train` on every worker in the background (log: --log, pid file)
#   logs      stream worker 0's training log (--worker N for another one)
#   stop      SIGTERM the training on every worker: it writes a checkpoint and exits (75);
#             `train` again resumes from it
#   delete    delete the TPU VM
#   run       create + install + train + logs
# Options (environment variable in brackets):
#   --name NAME         TPU name [TPU_NAME, default l2d-jax]
#   --zone ZONE         zone [ZONE], required
#   --project PROJECT   GCP project [PROJECT], default: gcloud's
#   --type TYPE         accelerator type [ACCELERATOR_TYPE, default v5litepod-16], e.g. v4-32,
#                       v5litepod-16, v5p-16
#   --version VERSION   TPU runtime [RUNTIME_VERSION, default from the type: v4 tpu-ubuntu2204-base,
#                       v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
#   --spot              a Spot (preemptible) slice [SPOT=1]
#   --repo URL          git clone URL on the workers instead of copying this checkout [REPO_URL]
#   --branch BRANCH     branch for --repo [BRANCH, default main]
#   --remote-dir DIR    checkout on the workers [REMOTE_DIR, default l2d-jax (in $HOME)]
#   --config FILE       training config, relative to the checkout [CONFIG]
#   --workdir DIR       run directory; must be the SAME storage on every worker (a gcsfuse
#                       mount or NFS) [WORKDIR, default: the config's save_dir/run name]
#   --mesh data=N,fsdp=N,tensor=N   mesh override [MESH]
#   --log FILE          log file on the workers [LOG_FILE, default l2d_train.log (in $HOME)]
#   --worker N          worker for `logs` [default 0]
#   --topology GEN:SHAPE  TPU topology for the plan [TOPOLOGY, default from --type: v5litepod-16
#                       v5e:4x4, v4-8 v4:2x2x1, v5p-8 v5p:2x2x1, v6e-8 v6e:2x4, ...]
#   --force             start even if the plan says it does not fit [FORCE=1]
#   --no-plan           skip the plan [NO_PLAN=1]
#   --dry-run           print the plan and gcloud commands instead of running them
set -euo pipefail

usage() { sed -n '2,46p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
NAME="${TPU_NAME:-l2d-jax}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
REPO_URL="${REPO_URL:-}"
BRANCH="${BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-l2d-jax}"
CONFIG="${CONFIG:-}"
WORKDIR="${WORKDIR:-}"
MESH="${MESH:-}"
LOG_FILE="${LOG_FILE:-l2d_train.log}"
TOPOLOGY="${TOPOLOGY:-}"
FORCE="${FORCE:-0}"
NO_PLAN="${NO_PLAN:-0}"
WORKER=0
COMMAND=""
OVERRIDES=()

need() { [[ $# -ge 2 && -n "$2" ]] || { echo "tpu_pod.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --type) need "$@"; TYPE="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --repo) need "$@"; REPO_URL="$2"; shift 2 ;;
    --branch) need "$@"; BRANCH="$2"; shift 2 ;;
    --remote-dir) need "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --mesh) need "$@"; MESH="$2"; shift 2 ;;
    --log) need "$@"; LOG_FILE="$2"; shift 2 ;;
    --worker) need "$@"; WORKER="$2"; shift 2 ;;
    --topology) need "$@"; TOPOLOGY="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --no-plan) NO_PLAN=1; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    plan|create|install|train|logs|stop|delete|run)
      [[ -z "$COMMAND" ]] || { echo "tpu_pod.sh: one command at a time ($COMMAND, $1)" >&2; exit 2; }
      COMMAND="$1"; shift ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n "$COMMAND" ]] || { echo "tpu_pod.sh: no command" >&2; usage >&2; exit 2; }
[[ -n "$ZONE" || "$COMMAND" == plan ]] || { echo "tpu_pod.sh: --zone (or ZONE) is required" >&2; exit 2; }

if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) echo "tpu_pod.sh: no default runtime for --type $TYPE; pass --version" >&2; exit 2 ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")

quote() {  # shell-quote one word, readably
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {  # run CMD...: print it (dry run) or run it
  if [[ $DRY_RUN -eq 1 ]]; then
    local first=1 w
    for w in "$@"; do [[ $first -eq 1 ]] || printf ' '; quote "$w"; first=0; done; echo
  else "$@"; fi
}
on_workers() {  # on_workers WORKER REMOTE_SHELL_COMMAND
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

mesh_overrides() {
  local out=() part key val
  [[ -z "$MESH" ]] && return 0
  IFS=, read -r -a parts <<< "$MESH"
  for part in "${parts[@]}"; do
    key="${part%%=*}"; val="${part#*=}"
    case "$key" in data|fsdp|tensor) ;; *)
      echo "tpu_pod.sh: --mesh $MESH: axes are data, fsdp, tensor" >&2; exit 2 ;; esac
    [[ "$val" =~ ^-?[0-9]+$ ]] || { echo "tpu_pod.sh: --mesh $MESH: $key needs an integer" >&2; exit 2; }
    out+=("--config.mesh.$key=$val")
  done
  printf '%s ' "${out[@]}"
}

topology_of() {  # accelerator type -> AOT topology (chips in the usual slice shapes)
  local gen="${1%%-*}" n="${1##*-}" chips
  case "$gen" in
    v4|v5p) chips=$(( n / 2 ))
      case $chips in 4) echo "$gen:2x2x1" ;; 8) echo "$gen:2x2x2" ;; 16) echo "$gen:2x2x4" ;;
        32) echo "$gen:2x4x4" ;; 64) echo "$gen:4x4x4" ;; *) return 1 ;; esac ;;
    v5litepod|v5e|v6e) [[ "$gen" == v6e ]] || gen=v5e; chips=$n
      case $chips in 1) echo "$gen:1x1" ;; 4) echo "$gen:2x2" ;; 8) echo "$gen:2x4" ;; 16) echo "$gen:4x4" ;;
        32) echo "$gen:4x8" ;; 64) echo "$gen:8x8" ;; 128) echo "$gen:8x16" ;; 256) echo "$gen:16x16" ;;
        *) return 1 ;; esac ;;
    *) return 1 ;;
  esac
}

do_plan() {  # compile the train step for the slice here; refuse a run that does not fit
  [[ "$NO_PLAN" == 1 ]] && return 0
  if [[ -z "$CONFIG" ]]; then
    [[ "$COMMAND" == plan ]] && { echo "tpu_pod.sh: plan needs --config FILE" >&2; exit 2; }
    echo "tpu_pod.sh: no --config: nothing to plan for $TYPE" >&2; return 0
  fi
  local topo="$TOPOLOGY" repo py rc=0
  [[ -n "$topo" ]] || topo="$(topology_of "$TYPE")" || {
    echo "tpu_pod.sh: no topology known for --type $TYPE; pass --topology GEN:SHAPE (or --no-plan)" >&2; exit 2; }
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  py="${L2D_PYTHON:-$repo/.venv/bin/python}"
  [[ -x "$py" ]] || py=python3
  local cmd=(env JAX_PLATFORMS=cpu "$py" -m l2d_jax.cli plan --config "$repo/$CONFIG" --aot-topology "$topo"
             --programs train --require-fit)
  [[ -n "$MESH" ]] && cmd+=(--mesh "$MESH")
  cmd+=("${OVERRIDES[@]}")
  run "${cmd[@]}" || rc=$?
  if [[ $rc -eq 3 && "$FORCE" != 1 ]]; then
    echo "tpu_pod.sh: the plan says $CONFIG does not fit $TYPE ($topo); apply its suggestion or pass --force" >&2
    exit 3
  elif [[ $rc -ne 0 && $rc -ne 3 ]]; then
    echo "tpu_pod.sh: the plan failed (exit $rc); --no-plan skips it" >&2; exit "$rc"
  fi
}

do_create() {
  local args=(create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  run "${GCLOUD[@]}" "${args[@]}"
}

do_install() {
  local setup="cd ~/$REMOTE_DIR && ./install.sh --venv .venv && .venv/bin/pip install \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
  if [[ -n "$REPO_URL" ]]; then
    on_workers all "(test -d ~/$REMOTE_DIR/.git && git -C ~/$REMOTE_DIR pull --ff-only) || git clone --branch $BRANCH $REPO_URL ~/$REMOTE_DIR; $setup"
  else
    local repo tarball=/tmp/l2d-jax-src.tgz
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    run tar czf "$tarball" -C "$repo" --exclude=.venv --exclude=.venv-ci --exclude=.git --exclude=experiments .
    run "${GCLOUD[@]}" scp "$tarball" "$NAME:~/l2d-jax-src.tgz" "${WHERE[@]}" --worker=all
    on_workers all "mkdir -p ~/$REMOTE_DIR && tar xzf ~/l2d-jax-src.tgz -C ~/$REMOTE_DIR && $setup"
  fi
}

do_train() {
  [[ -n "$CONFIG" ]] || { echo "tpu_pod.sh: train needs --config FILE" >&2; exit 2; }
  local cmd=".venv/bin/python -m l2d_jax.cli train --config $CONFIG --no-progress"
  [[ -n "$WORKDIR" ]] && cmd+=" --workdir $WORKDIR"
  cmd+=" $(mesh_overrides)${OVERRIDES[*]:+${OVERRIDES[*]}}"
  # Every worker runs the same command; it outlives the ssh session (nohup, all fds redirected).
  on_workers all "cd ~/$REMOTE_DIR || exit 1; export L2D_DISTRIBUTED=tpu PYTHONPATH=\$HOME/$REMOTE_DIR; nohup $cmd > ~/$LOG_FILE 2>&1 < /dev/null & echo \$! > ~/l2d_train.pid"
}

do_logs() { on_workers "$WORKER" "tail -n +1 -F ~/$LOG_FILE"; }
do_stop() { on_workers all "test -f ~/l2d_train.pid && kill -TERM \$(cat ~/l2d_train.pid) || true"; }
do_delete() { run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet; }

case "$COMMAND" in
  plan) do_plan ;;
  create) do_plan; do_create ;;
  install) do_install ;;
  train) do_plan; do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  run) do_plan; do_create; do_install; NO_PLAN=1 do_train; do_logs ;;
esac
