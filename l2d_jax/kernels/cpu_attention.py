"""Decoding attention over one layer of the stacked KV cache on XLA:CPU, read in place, as an
FFI custom call (``cpu_attention.cc``).

At a few query rows XLA:CPU copies the layer's keys and values out of the stacked cache,
transposes the keys for its dot and runs a dozen small ops around the softmax: with a
1024-token prompt a SmolLM2-135M decoding step took 1.7x as long as with a 32-token one on
the 2-core host, for 8 % more bytes. The kernel reads each (row, kv head) slice of the layer once, for all the query heads
of its group, and spreads those slices over XLA's intra-op pool.

``attend(q, k, v, layer, mask, reference)`` is the entry point; ``usable(q, k, v)`` says
whether the kernel applies to the shapes: q (B, T, H, hd) with 1 <= T <= ``MAX_ROWS``, k / v
(L, B, Hkv, S, hd), all float32. Whether kernels are used at all is the caller's kernel
backend (``kernels/backend.py``); ``block.attend_kv`` falls back to XLA otherwise.
Gradients go through ``reference`` (XLA's attention on the layer's slice).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from l2d_jax.kernels import library

MAX_ROWS = 8
TARGET = "l2d_cpu_attention_f32"


def usable(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether ``attend`` applies to these shapes and dtypes (the caller chose the kernel
    backend; ``library.load()`` says whether the kernels are built)."""
    return (q.ndim == 4 and 1 <= q.shape[1] <= MAX_ROWS and k.ndim == 5 and k.shape == v.shape
            and all(a.dtype == jnp.float32 for a in (q, k, v)))


def _call(q, k, v, layer, mask):
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(q, k, v, mask, layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, k, v, layer, mask, reference):
    return _call(q, k, v, layer, mask)


def _attend_fwd(q, k, v, layer, mask, reference):
    return _call(q, k, v, layer, mask), (q, k, v, layer, mask)


def _attend_bwd(reference, res, g):
    q, k, v, layer, mask = res
    b, t, h, hd = q.shape
    _, vjp = jax.vjp(lambda a, kk, vv: reference(a, kk[layer], vv[layer], mask).reshape(b, t, h, hd), q, k, v)
    no_grad = np.zeros(jnp.shape(layer), jax.dtypes.float0)
    return (*vjp(g), no_grad, np.zeros(mask.shape, jax.dtypes.float0))


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layer: jax.Array | int, mask: jax.Array,
           reference: Callable) -> jax.Array:
    """Attention of q (B, T, H, hd) over layer ``layer`` (an int or a traced int32 scalar: a
    scan's index) of k / v (L, B, Hkv, S, hd) under mask (B, T, S) bool: (B, T, H * hd).
    ``reference(q, k[layer], v[layer], mask)`` is the same attention in XLA, for gradients."""
    if not library.load():
        raise RuntimeError("cpu_attention: the kernel library is unavailable (see the warning); "
                           "choose the xla kernel backend")
    b, t, h, hd = q.shape
    if mask.shape != (b, t, k.shape[3]):
        raise ValueError(f"cpu_attention: mask {mask.shape} is not (B, T, S) = {(b, t, k.shape[3])}")
    return _attend(q, k, v, jnp.asarray(layer, jnp.int32), mask.astype(bool), reference).reshape(b, t, h * hd)
