#!/usr/bin/env bash
# Train, evaluate and export on a Cloud TPU VM slice: create it, install l2d-jax on every worker,
# start the SAME command on all workers at once (--worker=all; jax.distributed finds the other
# workers itself on a multi-worker slice: L2D_DISTRIBUTED=tpu), follow the log, stop, delete.
#
# Usage: launch/tpu_pod.sh [--dry-run] COMMAND [options] [--config.KEY=VALUE ...]
# Commands:
#   plan      compile the train step for the slice HERE and say what fits (no gcloud)
#   create    plan, then gcloud compute tpus tpu-vm create (accelerator type, image, --spot)
#   install   copy this checkout (or git clone --repo) to every worker, then on each:
#             ./install.sh --venv .venv --target tpu && l2d-jax env --require tpu
#   train     plan, then start `l2d-jax train` on every worker in the background (log --log)
#   eval      start `l2d-jax eval` of the run's workdir on every worker in the background
#             (log l2d_eval.log): --tasks (gsm8k, math: configs/benchmark.py; humaneval, mbpp:
#             configs/benchmark_code.py) at --steps ODE grid points, results in --eval-out
#   export    on worker 0 (CPU): `l2d-jax convert export WORKDIR --export-out`, the original
#             PyTorch L2D's state_dict with the README saying how the original loads it
#   logs      stream worker 0's training log (--worker N, --log l2d_eval.log for the eval)
#   stop      SIGTERM training / evaluation on every worker: training checkpoints and exits
#             (75), `train` again resumes; an evaluation resumes from --eval-out
#   delete    delete the TPU VM (its disks too: keep the workdir in a bucket)
#   run       plan + create + install + train + logs
# Options (environment variable in brackets):
#   --name NAME         TPU name [TPU_NAME, default l2d-jax]
#   --zone ZONE         zone [ZONE], required except for plan
#   --project PROJECT   GCP project [PROJECT], default: gcloud's
#   --type TYPE         accelerator type [ACCELERATOR_TYPE, default v5litepod-16], e.g.
#                       v5litepod-8 (v5e-8), v4-8, v5p-8, v6e-8, v4-32
#   --version VERSION   TPU software version (image) [RUNTIME_VERSION]; default per generation:
#                       the newest one documented for JAX (see IMAGES below)
#   --spot              a Spot (preemptible) slice [SPOT=1]
#   --repo URL          git clone URL on the workers instead of copying this checkout [REPO_URL]
#   --branch BRANCH     branch for --repo [BRANCH, default main]
#   --remote-dir DIR    checkout on the workers [REMOTE_DIR, default l2d-jax (in $HOME)]
#   --config FILE       training config, relative to the checkout [CONFIG]
#   --workdir URI       run directory [WORKDIR]: gs://BUCKET/PATH (checkpoints, logs, export;
#                       survives `delete`; every worker writes its shards there). A local path
#                       must be the same storage on every worker (NFS, a gcsfuse mount) and is
#                       lost with the VM: the script warns. Default: the config's save_dir
#   --mesh data=N,fsdp=N,tensor=N   mesh to plan and train with [MESH] (default: the config's,
#                       resolved and, where it does not fit, changed by the planner)
#   --log FILE          training log on the workers [LOG_FILE, default l2d_train.log (in $HOME)]
#   --worker N          worker for `logs` [default 0]
#   --hf-home DIR       HF_HOME on the workers [HF_HOME, when set; a path under this machine's
#                       home becomes the same path under the workers' home]
#   --tasks LIST        eval tasks [TASKS, default gsm8k,math,humaneval]
#   --steps LIST        eval ODE grid points, 0 = base model [STEPS, default 0,2,8,16]
#   --limit N           eval: first N examples per task (a quick check)
#   --eval-mesh MESH    eval: each worker's mesh over its own chips (default: the eval config's)
#   --eval-out URI      eval results [EVAL_OUT, default WORKDIR/eval]
#   --export-out URI    export directory or file [EXPORT_OUT, default WORKDIR/original]
#   --topology GEN:SHAPE  TPU topology for the plan [TOPOLOGY, default from --type: v5litepod-8
#                       v5e:2x4, v4-8 v4:2x2x1, v5p-8 v5p:2x2x1, v6e-8 v6e:2x4, v4-32 v4:2x2x4 ...]
#   --force             start even if nothing the planner tried fits [FORCE=1]
#   --no-plan           skip the plan (the train command then gets no planner overrides) [NO_PLAN=1]
#   --dry-run           print every command instead of running it; never calls gcloud. The plan
#                       still runs (locally: a TPU compile takes minutes; the result is cached)
# The plan: `l2d-jax plan --aot-topology TOPO --programs train --require-fit --emit-overrides F`
# compiles the train step for the slice with libtpu here (./install.sh installs it); F holds
# the --config.KEY=VALUE changes that make it fit (none when it fits as given), which `train`
# appends after the resolved mesh (--config.mesh.*). Nothing fits: exit 3 (--force: start anyway).
# HF_TOKEN: when set, `train` and `eval` copy it with `gcloud ... scp` to ~/.l2d_hf_token (mode
# 600) on every worker, and the remote command exports HF_TOKEN from that file: the token is
# never on a command line, in --dry-run output or in a log (they show HF_TOKEN=<set>).
# IMAGES (TPU software versions for JAX, https://cloud.google.com/tpu/docs/runtimes, "PyTorch
# and JAX" table): v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and
# older tpu-ubuntu2204-base. All are Ubuntu 22.04 images whose python3 is 3.10; l2d-jax needs
# >= 3.11 (jax 0.10.2), so `install` relies on ./install.sh fetching a Python >= 3.11 (uv).
# Buckets: create the bucket in the slice's region; the TPU VM's service account needs write
# access to it (roles/storage.objectUser on the bucket).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
source "$(dirname "${BASH_SOURCE[0]}")/plan_gate.sh"

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
REMOTE_HF_HOME="${HF_HOME:-}"
TASKS="${TASKS:-gsm8k,math,humaneval}"
STEPS="${STEPS:-0,2,8,16}"
LIMIT=""
EVAL_MESH=""
EVAL_OUT="${EVAL_OUT:-}"
EXPORT_OUT="${EXPORT_OUT:-}"
TOPOLOGY="${TOPOLOGY:-}"
FORCE="${FORCE:-0}"
NO_PLAN="${NO_PLAN:-0}"
WORKER=0
COMMAND=""
OVERRIDES=()

die() { echo "tpu_pod.sh: $1" >&2; exit "${2:-2}"; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
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
    --hf-home) need "$@"; REMOTE_HF_HOME="$2"; shift 2 ;;
    --tasks) need "$@"; TASKS="$2"; shift 2 ;;
    --steps) need "$@"; STEPS="$2"; shift 2 ;;
    --limit) need "$@"; LIMIT="$2"; shift 2 ;;
    --eval-mesh) need "$@"; EVAL_MESH="$2"; shift 2 ;;
    --eval-out) need "$@"; EVAL_OUT="$2"; shift 2 ;;
    --export-out) need "$@"; EXPORT_OUT="$2"; shift 2 ;;
    --topology) need "$@"; TOPOLOGY="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --no-plan) NO_PLAN=1; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    plan|create|install|train|eval|export|logs|stop|delete|run)
      [[ -z "$COMMAND" ]] || die "one command at a time ($COMMAND, $1)"
      COMMAND="$1"; shift ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n "$COMMAND" ]] || { echo "tpu_pod.sh: no command" >&2; usage >&2; exit 2; }
[[ -n "$ZONE" || "$COMMAND" == plan ]] || die "--zone ZONE (or export ZONE=...) is required, e.g. --zone us-central2-b"
[[ -n "$CONFIG" || ( "$COMMAND" != train && "$COMMAND" != run ) ]] || die "$COMMAND needs --config FILE (a configs/*.py training config)"

# The image per generation (see IMAGES above) and what its python3 is.
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v2-*|v3-*|v4-*) VERSION=tpu-ubuntu2204-base ;;
    *) die "no default TPU software version for --type $TYPE; pass --version" ;;
  esac
fi
case "$VERSION" in
  v2-alpha-tpuv6e|v2-alpha-tpuv5|v2-alpha-tpuv5-lite|tpu-ubuntu2204-base)
    IMAGE_PYTHON="Ubuntu 22.04, python3 3.10 < 3.11: ./install.sh --target tpu installs Python >= 3.11 with uv" ;;
  *) IMAGE_PYTHON="python3 of this image unknown: ./install.sh --target tpu installs Python >= 3.11 with uv when older" ;;
esac

# Storage: gs://BUCKET/PATH (bucket names: 3-63 of a-z 0-9 - _ ., starting and ending with a
# letter or digit; dotted names up to 222), or a local path.
is_uri() { [[ "$1" == *://* ]]; }
check_uri() {  # check_uri OPTION VALUE
  local v="$2" bucket
  [[ -z "$v" ]] && return 0
  [[ "$v" =~ ^gs:/[^/] || "$v" == gs:* && "$v" != gs://* ]] && die "$1 $v: a bucket URI is gs://BUCKET/PATH"
  [[ "$v" == gs://* ]] || return 0
  bucket="${v#gs://}"; bucket="${bucket%%/*}"
  if [[ ! "$bucket" =~ ^[a-z0-9][a-z0-9._-]*[a-z0-9]$ || ${#bucket} -lt 3 \
        || ( ${#bucket} -gt 63 && "$bucket" != *.* ) || ${#bucket} -gt 222 ]]; then
    die "$1 $v: '$bucket' is not a bucket name (3-63 characters: lowercase letters, digits, - _ ., starting and ending with a letter or digit); use gs://BUCKET/PATH"
  fi
  [[ "$v" =~ [[:space:]] ]] && die "$1 $v: no spaces in a bucket path"
  return 0
}
[[ "$REMOTE_HF_HOME" =~ ^[A-Za-z0-9_./~-]*$ ]] || die "--hf-home $REMOTE_HF_HOME: a plain path on the workers (letters, digits, _ . / ~ -)"
check_uri --workdir "$WORKDIR"
check_uri --eval-out "$EVAL_OUT"
check_uri --export-out "$EXPORT_OUT"

# More than one TPU VM in the slice: the type's number is over 8 (v2 / v3 / v4 / v5p count
# TensorCores, 8 per VM; v5e / v6e count chips, at most 8 on one VM)
MULTI_WORKER=0
n_of_type="${TYPE##*-}"
if [[ "$n_of_type" =~ ^[0-9]+$ && "$n_of_type" -gt 8 ]]; then MULTI_WORKER=1; fi

warn_storage() {  # loud warnings for a run directory that is not a bucket
  local where="${WORKDIR:-the save_dir of the config (a local path)}"
  is_uri "$WORKDIR" && return 0
  if [[ $MULTI_WORKER -eq 1 ]]; then
    echo "!!! WARNING: the run directory $where is a local path on a multi-worker slice ($TYPE):" >&2
    echo "!!! every worker writes its own shards of each checkpoint there, so it must be the SAME" >&2
    echo "!!! storage on all workers (NFS / Filestore, a gcsfuse mount), or checkpoints are incomplete." >&2
    echo "!!! Use --workdir gs://BUCKET/PATH." >&2
  fi
  echo "!!! WARNING: $where is on the TPU VM: \`tpu_pod.sh delete\` destroys it with every checkpoint." >&2
  echo "!!! Use --workdir gs://BUCKET/PATH (unless it is a mount of storage outside the VM)." >&2
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run() { if [[ $DRY_RUN -eq 1 ]]; then show_cmd "$@"; else "$@"; fi; }
on_workers() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"; }

MESH_ARGS=()  # --mesh as --config.mesh.* overrides
if [[ -n "$MESH" ]]; then
  IFS=, read -r -a mesh_parts <<< "$MESH"
  for part in "${mesh_parts[@]}"; do
    [[ "$part" =~ ^(data|fsdp|tensor)=-?[0-9]+$ ]] || die "--mesh $MESH: expected data=N,fsdp=N,tensor=N (any subset)"
    MESH_ARGS+=("--config.mesh.$part")
  done
fi

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

PLANNED=()  # what the plan adds to the train command
do_plan() {  # compile the train step for the slice here; refuse a run that cannot fit
  [[ "$NO_PLAN" == 1 ]] && return 0
  if [[ -z "$CONFIG" ]]; then
    [[ "$COMMAND" == plan ]] && die "plan needs --config FILE"
    echo "tpu_pod.sh: no --config: nothing to plan for $TYPE" >&2; return 0
  fi
  local topo="$TOPOLOGY" py
  [[ -n "$topo" ]] || topo="$(topology_of "$TYPE")" \
    || die "no topology known for --type $TYPE; pass --topology GEN:SHAPE (or --no-plan)"
  py="${L2D_PYTHON:-$REPO/.venv/bin/python}"
  [[ -x "$py" ]] || py=python3
  local args=(--config "$REPO/$CONFIG" --aot-topology "$topo" --programs train --require-fit)
  [[ -n "$MESH" ]] && args+=(--mesh "$MESH")
  plan_gate "$py" "${args[@]}" "${OVERRIDES[@]}"
  if [[ $PLAN_RC -eq 3 ]]; then
    [[ "$FORCE" == 1 ]] || die "the plan says $CONFIG does not fit $TYPE ($topo), nor does any change it tried; use a larger slice (or --force)" 3
    echo "tpu_pod.sh: --force: starting $CONFIG on $TYPE although the plan says it does not fit" >&2
    return 0
  fi
  PLANNED=("${PLAN_ARGS_OUT[@]}")
}

# remote_cmd VAR WORD...: VAR = the words quoted for the remote shell, where they travel inside
# double quotes (bash -c "..."); a word with $ " ` or \ is refused
remote_cmd() {
  local w out=()
  for w in "${@:2}"; do
    [[ "$w" != *[\"\$\`\\]* ]] || die "'$w' contains \$, \", \` or \\, which cannot be passed to the workers"
    out+=("$(show_cmd "$w")")
  done
  printf -v "$1" '%s' "${out[*]}"
}

TOKEN_SENT=0
send_token() {  # HF_TOKEN -> ~/.l2d_hf_token (mode 600) on every worker, never on a command line
  if [[ -z "${HF_TOKEN:-}" ]]; then
    echo "tpu_pod.sh: note: HF_TOKEN is not set; gated models (Llama) cannot be downloaded on the workers" >&2
    return 0
  fi
  echo "# HF_TOKEN=<set>: copied to ~/.l2d_hf_token (mode 600) on every worker, exported from there"
  if [[ $DRY_RUN -eq 1 ]]; then
    show_cmd "${GCLOUD[@]}" scp "<HF_TOKEN file>" "$NAME:~/.l2d_hf_token" "${WHERE[@]}" --worker=all
  else
    TOKEN_FILE="$(umask 077 && mktemp)"
    trap 'rm -f "$TOKEN_FILE"' EXIT
    printf '%s' "$HF_TOKEN" > "$TOKEN_FILE"
    "${GCLOUD[@]}" scp "$TOKEN_FILE" "$NAME:~/.l2d_hf_token" "${WHERE[@]}" --worker=all
    rm -f "$TOKEN_FILE"
  fi
  TOKEN_SENT=1
}

remote_env() {  # the exports every remote l2d-jax command starts with
  local mode=none  # one worker: one process; several: jax.distributed finds the others itself
  [[ $MULTI_WORKER -eq 1 ]] && mode=tpu
  local env="cd ~/$REMOTE_DIR || exit 1; export PYTHONPATH=\$HOME/$REMOTE_DIR L2D_DISTRIBUTED=$mode"
  local hf_home="$REMOTE_HF_HOME"  # under this machine's home: the same place under the workers'
  [[ "$hf_home" == "$HOME"/* ]] && hf_home="\$HOME/${hf_home#"$HOME"/}"
  [[ -n "$hf_home" ]] && env+=" HF_HOME=$hf_home"
  [[ $TOKEN_SENT -eq 1 ]] && env+="; chmod 600 ~/.l2d_hf_token; export HF_TOKEN=\"\$(cat ~/.l2d_hf_token)\""
  echo "$env"
}

# Start CMD in the background on every worker, as its own process group (stop signals all of
# it), unless training or an evaluation is already running there (the chips are taken).
start_background() {  # start_background LOG PIDFILE CMD
  local busy="for p in ~/l2d_train.pid ~/l2d_eval.pid; do if test -f \$p && kill -0 \$(cat \$p) 2>/dev/null; then echo \"\$(hostname): \$p is running (the TPU is busy): wait, or tpu_pod.sh stop\" >&2; exit 1; fi; done"
  on_workers all "$(remote_env); $busy; setsid nohup bash -c \"$3\" > ~/$1 2>&1 < /dev/null & echo \$! > ~/$2"
}

do_create() {
  local args=(create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  echo "# image: $VERSION ($IMAGE_PYTHON)"
  run "${GCLOUD[@]}" "${args[@]}"
}

do_install() {
  local setup="cd ~/$REMOTE_DIR && ./install.sh --venv .venv --target tpu && .venv/bin/python -m l2d_jax.cli env --require tpu"
  [[ "$COMMAND" == run ]] || echo "# image: $VERSION ($IMAGE_PYTHON)"
  if [[ -n "$REPO_URL" ]]; then
    on_workers all "(test -d ~/$REMOTE_DIR/.git && git -C ~/$REMOTE_DIR pull --ff-only) || git clone --branch $BRANCH $REPO_URL ~/$REMOTE_DIR; $setup"
  else
    local tarball=/tmp/l2d-jax-src.tgz
    run tar czf "$tarball" -C "$REPO" --exclude=.venv --exclude=.venv-ci --exclude=.git --exclude=experiments .
    run "${GCLOUD[@]}" scp "$tarball" "$NAME:~/l2d-jax-src.tgz" "${WHERE[@]}" --worker=all
    on_workers all "mkdir -p ~/$REMOTE_DIR && tar xzf ~/l2d-jax-src.tgz -C ~/$REMOTE_DIR && $setup"
  fi
}

do_train() {
  warn_storage
  local cmd=(.venv/bin/python -m l2d_jax.cli train --config "$CONFIG" --no-progress)
  [[ -n "$WORKDIR" ]] && cmd+=(--workdir "$WORKDIR")
  cmd+=("${MESH_ARGS[@]}" "${OVERRIDES[@]}" "${PLANNED[@]}")
  local line; remote_cmd line "${cmd[@]}"
  send_token
  start_background "$LOG_FILE" l2d_train.pid "$line"
}

do_eval() {
  [[ -n "$WORKDIR" ]] || die "eval needs --workdir URI (the training run directory, e.g. gs://BUCKET/runs/l1b)"
  [[ "$STEPS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--steps $STEPS: comma-separated ODE grid points, e.g. 0,2,8,16"
  [[ -z "$LIMIT" || "$LIMIT" =~ ^[0-9]+$ ]] || die "--limit $LIMIT: a number of examples per task"
  local out="${EVAL_OUT:-${WORKDIR%/}/eval}" task text=() code=() part cmds=()
  IFS=, read -r -a parts <<< "$TASKS"
  for task in "${parts[@]}"; do
    case "$task" in
      humaneval|mbpp) code+=("$task") ;;
      "") ;;
      *) text+=("$task") ;;
    esac
  done
  [[ ${#text[@]} -gt 0 || ${#code[@]} -gt 0 ]] || die "--tasks is empty; e.g. --tasks gsm8k,math,humaneval"
  # one `l2d-jax eval` per evaluation config (their generation settings differ), each its own --out
  for part in benchmark:"${text[*]}" benchmark_code:"${code[*]}"; do
    local name="${part%%:*}" list="${part#*:}"
    [[ -n "$list" ]] || continue
    local cmd=(.venv/bin/python -m l2d_jax.cli eval --config "configs/$name.py" --ckpt "$WORKDIR"
               --tasks "${list// /,}" --steps "$STEPS" --out "${out%/}/$name" --no-progress)
    [[ -n "$LIMIT" ]] && cmd+=(--limit "$LIMIT")
    [[ -n "$EVAL_MESH" ]] && cmd+=(--mesh "$EVAL_MESH")
    local line; remote_cmd line "${cmd[@]}"
    cmds+=("$line")
  done
  send_token
  local joined; joined="$(printf ' && %s' "${cmds[@]}")"
  start_background l2d_eval.log l2d_eval.pid "${joined:4}"
  echo "# results: $out/{benchmark,benchmark_code}/results.md; log: tpu_pod.sh logs --log l2d_eval.log"
}

do_export() {
  [[ -n "$WORKDIR" ]] || die "export needs --workdir URI (the training run directory, e.g. gs://BUCKET/runs/l1b)"
  local out="${EXPORT_OUT:-${WORKDIR%/}/original}" line
  remote_cmd line .venv/bin/python -m l2d_jax.cli convert export "$WORKDIR" "$out"
  # one process, on worker 0's host CPU (the chips may be training; the export streams tensors)
  on_workers 0 "cd ~/$REMOTE_DIR || exit 1; export PYTHONPATH=\$HOME/$REMOTE_DIR JAX_PLATFORMS=cpu L2D_DISTRIBUTED=none; $line"
}

do_logs() { on_workers "$WORKER" "tail -n +1 -F ~/$LOG_FILE"; }
do_stop() { on_workers all "for p in ~/l2d_train.pid ~/l2d_eval.pid; do test -f \$p && kill -TERM -- -\$(cat \$p) 2>/dev/null; done; true"; }
do_delete() {
  if [[ -n "$WORKDIR" ]] && ! is_uri "$WORKDIR"; then
    echo "!!! WARNING: deleting $NAME destroys its disks: a run directory $WORKDIR on the VM is lost." >&2
  fi
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

case "$COMMAND" in
  plan) do_plan ;;
  create) do_plan; do_create ;;
  install) do_install ;;
  train) do_plan; do_train ;;
  eval) do_eval ;;
  export) do_export ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  run) do_plan; do_create; do_install; do_train; do_logs ;;
esac
