#!/usr/bin/env bash
# Train on one machine with the given devices (the original's scripts/run_training.sh 0,1 CFG).
#
# Usage: launch/single_host.sh [--dry-run] [--workdir DIR] [--mesh data=N,fsdp=N,tensor=N] \
#            DEVICES CONFIG [--config.KEY=VALUE ...]
#   DEVICES   GPU ids, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES); "all" (every local device:
#             all GPUs, or the chips of a single-host TPU VM); or cpu:N (N CPU devices, tests)
#   CONFIG    a configs/*.py file (FILE[:ARG])
#   --mesh    mesh axis sizes; axes not named: data=-1 (the remaining devices), fsdp=1,
#             tensor=1 (default: data = number of DEVICES; with "all": data=-1)
#   --workdir run directory (default: <save_dir>/<run name> from the config)
#   --dry-run print the environment and the command instead of running them
# Environment: PYTHON (default: python), L2D_JAX_CACHE_DIR (compilation cache).
# One process drives all the devices of the machine; the command is
#   python -m l2d_jax.cli train --config CONFIG --config.mesh.data=... [overrides]
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
WORKDIR=""
MESH=""
POSITIONAL=()
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a directory}"; shift 2 ;;
    --workdir=*) WORKDIR="${1#--workdir=}"; shift ;;
    --mesh) MESH="${2:?--mesh needs data=N,fsdp=N,tensor=N}"; shift 2 ;;
    --mesh=*) MESH="${1#--mesh=}"; shift ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "single_host.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) POSITIONAL+=("$1"); shift ;;
  esac
done
if [[ ${#POSITIONAL[@]} -ne 2 ]]; then
  echo "single_host.sh: expected DEVICES and CONFIG" >&2; usage >&2; exit 2
fi
DEVICES="${POSITIONAL[0]}"
CONFIG="${POSITIONAL[1]}"
if [[ ! -f "${CONFIG%%:*}" ]]; then
  echo "single_host.sh: config file not found: ${CONFIG%%:*}" >&2; exit 2
fi

ENV_VARS=()
case "$DEVICES" in
  all) N=-1 ;;
  cpu:*)
    N="${DEVICES#cpu:}"
    [[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "single_host.sh: cpu:N needs a positive N" >&2; exit 2; }
    ENV_VARS+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=$N") ;;
  *)
    [[ "$DEVICES" =~ ^[0-9]+(,[0-9]+)*$ ]] || {
      echo "single_host.sh: DEVICES must be GPU ids like 0,1 or 'all' or cpu:N, got '$DEVICES'" >&2; exit 2; }
    IFS=, read -r -a IDS <<< "$DEVICES"
    N=${#IDS[@]}
    ENV_VARS+=("CUDA_VISIBLE_DEVICES=$DEVICES") ;;
esac

# mesh overrides: --mesh wins; else all devices on the data axis
declare -A AXES=([data]="$N" [fsdp]=1 [tensor]=1)
if [[ -n "$MESH" ]]; then
  AXES=([data]=-1 [fsdp]=1 [tensor]=1)
  IFS=, read -r -a PARTS <<< "$MESH"
  for part in "${PARTS[@]}"; do
    key="${part%%=*}"; val="${part#*=}"
    if [[ -z "${AXES[$key]+x}" || ! "$val" =~ ^-?[0-9]+$ || "$part" != *=* ]]; then
      echo "single_host.sh: --mesh $MESH: expected data=N,fsdp=N,tensor=N" >&2; exit 2
    fi
    AXES[$key]="$val"
  done
fi
MESH_ARGS=("--config.mesh.data=${AXES[data]}" "--config.mesh.fsdp=${AXES[fsdp]}" "--config.mesh.tensor=${AXES[tensor]}")

PY="${PYTHON:-python}"
CMD=("$PY" -m l2d_jax.cli train --config "$CONFIG")
[[ -n "$WORKDIR" ]] && CMD+=(--workdir "$WORKDIR")
CMD+=("${MESH_ARGS[@]}" "${OVERRIDES[@]}")

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_VARS+=("PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}")
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# single host: devices $DEVICES, mesh data=${AXES[data]} fsdp=${AXES[fsdp]} tensor=${AXES[tensor]}"
  for v in "${ENV_VARS[@]}"; do echo "export $v"; done
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
for v in "${ENV_VARS[@]}"; do export "${v?}"; done
exec "${CMD[@]}"
