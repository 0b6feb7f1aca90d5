"""Few-row float32 matrix products on XLA:CPU as an FFI custom call (``cpu_matvec.cc``).

Batch-1 decoding is a chain of matrix-vector products, each bound by reading its weights.
XLA:CPU's dots reach about half to two thirds of the host's streaming read bandwidth on
them; the custom call reads each weight once, row by row, split over the cores, and makes
batch-1 decoding of SmolLM2-135M 1.4-1.5x faster on the 2-core host (``docs/bench/cpu``).

``matmuls(x, [w1, w2, ...], transposed=..., kernel=...)`` (several weights that share the
input, e.g. q/k/v, read in one call) and ``matmul(x, w, ...)`` are the entry points. They use
the kernel when the caller's kernel backend allows it (``kernel=True``, ``backend.py``) and
``x`` is (M, K) with 1 <= M <= ``MAX_ROWS``, ``x`` and the weights float32; XLA's dots
otherwise (same result up to float32 summation order).

Gradients go through XLA's dots (``custom_vjp``); under ``vmap`` the call runs per example.
The kernel splits each matrix over XLA's intra-op thread pool (no threads of its own).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from l2d_jax.kernels import library

# Measured on the 2-core host on the SmolLM2 layer shapes: ahead of XLA's dot at 1, 2, 4 and 8
# rows (1.1-1.4x); more rows turn compute-bound, where XLA's matrix-matrix products belong.
MAX_ROWS = 8
TARGET = "l2d_cpu_matvec_f32"


def usable(x: jax.Array, ws: tuple[jax.Array, ...]) -> bool:
    """Whether the kernel takes these shapes and dtypes."""
    return (x.ndim == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.dtype == jnp.float32
            and all(w.ndim == 2 and w.dtype == jnp.float32 for w in ws))


def _call(x: jax.Array, ws: tuple[jax.Array, ...], transposed: bool) -> tuple[jax.Array, ...]:
    outs = tuple(jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if transposed else w.shape[1]),
                                      jnp.float32) for w in ws)
    return tuple(jax.ffi.ffi_call(TARGET, outs, vmap_method="sequential")(x, *ws, transposed=transposed))


def _xla(x: jax.Array, ws: tuple[jax.Array, ...], transposed: bool) -> tuple[jax.Array, ...]:
    # contract with w as stored: a `.T` of the (V, H) table would be materialised per call
    return tuple(jnp.einsum("mk,nk->mn", x, w) if transposed else x @ w for w in ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel(x: jax.Array, ws: tuple[jax.Array, ...], transposed: bool) -> tuple[jax.Array, ...]:
    return _call(x, ws, transposed)


def _kernel_fwd(x, ws, transposed):
    return _call(x, ws, transposed), (x, ws)


def _kernel_bwd(transposed, res, g):
    x, ws = res
    _, vjp = jax.vjp(lambda a, b: _xla(a, b, transposed), x, ws)
    return vjp(g)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def matmuls(x: jax.Array, ws: Sequence[jax.Array], *, transposed: bool = False,
            kernel: bool = False) -> list[jax.Array]:
    """[x @ w for w in ws]: x (M, K), each w (K, N_i), or (N_i, K) contracted as x @ w.T when
    ``transposed``; outputs (M, N_i). With ``kernel`` (and ``usable``) the kernel reads all of
    them in one call (one split over the cores, as if they were one matrix concatenated along N)."""
    ws = tuple(ws)
    for w in ws:
        if w.ndim != 2 or w.shape[1 if transposed else 0] != x.shape[-1]:
            raise ValueError(f"matmuls: x {x.shape} does not contract with a weight {w.shape} "
                             f"({'transposed' if transposed else 'not transposed'})")
    if kernel and usable(x, ws):
        if not library.load():
            raise RuntimeError("cpu_matvec: the kernel library is unavailable; choose the xla kernel backend")
        return list(_kernel(x, ws, transposed))
    return list(_xla(x, ws, transposed))


def matmul(x: jax.Array, w: jax.Array, *, transposed: bool = False, kernel: bool = False) -> jax.Array:
    """x (M, K) @ w (K, N), or x @ w.T for w (N, K) when ``transposed``: (M, N)."""
    return matmuls(x, (w,), transposed=transposed, kernel=kernel)[0]
