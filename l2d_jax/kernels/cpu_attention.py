"""Decoding attention over one layer of the stacked KV cache on XLA:CPU, read in place, as an
FFI custom call (``cpu_attention.cc``).

At a few query rows XLA:CPU copies the layer's keys and values out of the stacked cache,
transposes the keys for its dot and runs a dozen small ops around the softmax: with a
1024-token prompt a SmolLM2-135M decoding step took 1.7x as long as with a 32-token one on
the 2-core host, for 8 % more bytes. The kernel reads each (row, kv head) slice of the layer once, for all the query heads
of its group, and spreads those slices over XLA's intra-op pool.

``attend(q, k, v, layer, mask, reference)`` is the entry point; ``usable(q, k, v)`` says
whether the kernel applies at trace time: q (B, T, H, hd) with 1 <= T <= ``MAX_ROWS``, k / v
(L, B, Hkv, S, hd), all float32, ``$L2D_CPU_ATTENTION`` not ``0`` and the kernel library
available (``library.py``). Callers fall back to XLA otherwise (``llm.attend_kv``).
Gradients go through ``reference`` (XLA's attention on the layer's slice).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from l2d_jax.kernels import library

MAX_ROWS = 8
TARGET = "l2d_cpu_attention_f32"
ENV_SWITCH = "L2D_CPU_ATTENTION"


def enabled() -> bool:
    """Whether programs traced now on this thread can use the kernel at all."""
    return library.available(ENV_SWITCH)


def usable(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    return (q.ndim == 4 and 1 <= q.shape[1] <= MAX_ROWS and k.ndim == 5 and k.shape == v.shape
            and all(a.dtype == jnp.float32 for a in (q, k, v)) and enabled())


def _call(q, k, v, layer, mask):
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(q, k, v, mask, layer=layer)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 5))
def _attend(q, k, v, layer, mask, reference):
    return _call(q, k, v, layer, mask)


def _attend_fwd(q, k, v, layer, mask, reference):
    return _call(q, k, v, layer, mask), (q, k, v, mask)


def _attend_bwd(layer, reference, res, g):
    q, k, v, mask = res
    b, t, h, hd = q.shape
    _, vjp = jax.vjp(lambda a, kk, vv: reference(a, kk[layer], vv[layer], mask).reshape(b, t, h, hd), q, k, v)
    return (*vjp(g), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, layer: int, mask: jax.Array,
           reference: Callable) -> jax.Array:
    """Attention of q (B, T, H, hd) over layer ``layer`` of k / v (L, B, Hkv, S, hd) under mask
    (B, T, S) bool: (B, T, H * hd). ``reference(q, k[layer], v[layer], mask)`` is the same
    attention in XLA, for gradients."""
    if not library.load():
        raise RuntimeError("cpu_attention: the kernel library is unavailable (see the warning); "
                           "llm.attend_kv falls back to XLA's attention")
    b, t, h, hd = q.shape
    if mask.shape != (b, t, k.shape[3]):
        raise ValueError(f"cpu_attention: mask {mask.shape} is not (B, T, S) = {(b, t, k.shape[3])}")
    return _attend(q, k, v, int(layer), mask, reference).reshape(b, t, h * hd)
