"""Builds and loads the CPU kernels of this folder (``*.cc``) as one shared library.

The first use compiles every ``*.cc`` here with the host's C++ compiler (``$CXX``, else
``c++``; about 5-10 s) against ``jax.ffi.include_dir()`` into ``$L2D_JAX_KERNEL_DIR`` (default
``~/.cache/l2d_jax/kernels``), keyed by the sources, the JAX version, the flags and the CPU
model/flags (it is built with ``-march=native``), and registers each kernel's XLA FFI target.
Without a compiler it warns once and the kernels' callers fall back to XLA.

Whether a program uses the kernels at all is its kernel backend (``backend.py``), resolved
once outside the models.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax

HERE = Path(__file__).parent
ENV_DIR = "L2D_JAX_KERNEL_DIR"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-pthread", "-w")
# FFI target -> exported handler symbol
TARGETS = {"l2d_cpu_matvec_f32": "L2dMatvecF32", "l2d_cpu_attention_f32": "L2dAttentionF32",
           "l2d_cpu_decoder_f32": "L2dDecoderF32"}


def sources() -> list[Path]:
    """The kernels' C++ files and headers, in a fixed order."""
    return sorted([*HERE.glob("*.cc"), *HERE.glob("*.h")])


def _cpu_signature() -> str:
    """Model name and feature flags of the host CPU (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep))


def library_path() -> Path:
    """Where the shared library for these sources, JAX version and CPU lives (may not exist)."""
    parts = [p.name + "\0" + p.read_text() for p in sources()]
    key = hashlib.sha256("\0".join([*parts, jax.__version__, " ".join(FLAGS),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get(ENV_DIR) or "~/.cache/l2d_jax/kernels").expanduser()
    return root / f"l2d_cpu_kernels-{key}.so"


def build(path: Path | None = None) -> Path:
    """Compiles the ``*.cc`` files into ``path`` (default ``library_path()``), atomically.

    Raises RuntimeError naming the compiler and its output when it fails."""
    path = path or library_path()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cc = [str(p) for p in sources() if p.suffix == ".cc"]
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(HERE), *cc, "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)  # concurrent builders each write their own file; last one wins
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.cache
def load() -> bool:
    """Builds (once per machine) and registers every kernel; False (warned) if impossible."""
    try:
        path = library_path()
        if not path.exists():
            build(path)
        lib = ctypes.CDLL(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return True
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"CPU kernels unavailable, using XLA's ops ({e}); choose the 'xla' kernel backend "
                      f"(--kernels xla) to silence this", stacklevel=3)
        return False
