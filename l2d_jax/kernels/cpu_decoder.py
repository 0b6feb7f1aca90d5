"""Few-row decoding through a whole stack of decoder layers on XLA:CPU in one FFI custom call
(``cpu_decoder.cc``): the main stream of a new token (its keys / values written into the
cache in place) or the L2D flow stream of one ODE evaluation (reading that cache).

A batch-1 decoding step is reading the weights once. Between the matrix products XLA runs
~25 small ops per layer, each a step of its executor, and each product or attention call
wakes the intra-op pool again; this call runs norms, projections (with LoRA deltas and
biases), RoPE, the cache write, attention, the SwiGLU MLP and the modulation's shifts and
scales of every layer, spread over the pool's threads as one team with a barrier per phase.

``run(h, cos, sin, mask, slot, cache, layers, modulation, ...)`` is the entry point;
``usable(...)`` says whether it applies at trace time: h (M, H) with 1 <= M <= ``MAX_ROWS``
rows (one new position per sequence), everything float32, LoRA ranks <= ``MAX_LORA_RANK``,
``$L2D_CPU_DECODER`` not ``0`` and the kernel library available (``library.py``). Callers
(``LLM.__call__``, ``L2DModel.flow_only``) fall back to their per-layer code otherwise. It has no gradient: decoding with a KV cache is not
trained through (differentiating raises an error that says how to turn the kernel off).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2d_jax.kernels import library

MAX_ROWS = 8
MAX_LORA_RANK = 64
TARGET = "l2d_cpu_decoder_f32"
ENV_SWITCH = "L2D_CPU_DECODER"


class Projection(NamedTuple):
    """y = x @ w (+ bias) (+ lora_scale * (x @ a) @ b): w (K, N), bias (N,), a (K, r), b (r, N)."""

    w: jax.Array
    bias: jax.Array | None = None
    a: jax.Array | None = None
    b: jax.Array | None = None


class Layer(NamedTuple):
    """The projections of one decoder layer of a stream (k, v None for a stream that only
    reads the cache)."""

    q: Projection
    k: Projection | None
    v: Projection | None
    o: Projection
    gate: Projection
    up: Projection
    down: Projection


def enabled() -> bool:
    """Whether programs traced now on this thread can use the kernel at all."""
    return library.available(ENV_SWITCH)


def usable(h: jax.Array, cache: dict, layers: Sequence[Layer], modulation: jax.Array) -> bool:
    """Whether ``run`` applies: see the module docstring."""
    arrays = [h, cache["k"], cache["v"], modulation, *jax.tree.leaves(list(layers))]
    ranks = [p.a.shape[-1] for ly in layers for p in ly if p is not None and p.a is not None]
    return (h.ndim == 2 and 1 <= h.shape[0] <= MAX_ROWS and all(a.dtype == jnp.float32 for a in arrays)
            and max(ranks, default=0) <= MAX_LORA_RANK and enabled())


def _flat(layers: Sequence[Layer]) -> list[jax.Array]:
    """The layers' buffers in the kernel's order (28 per layer, size 0 for "none")."""
    empty = jnp.zeros((0,), jnp.float32)
    return [empty if x is None else x for ly in layers for p in ly
            for x in (p if p is not None else (None,) * 4)]


def _call(args, num_heads, eps, lora_scale, write_kv):
    h, k, v = args[0], args[5], args[6]
    outs = (jax.ShapeDtypeStruct(h.shape, jnp.float32),)
    aliases = {}
    if write_kv:
        outs += (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
        aliases = {5: 1, 6: 2}
    return jax.ffi.ffi_call(TARGET, outs, input_output_aliases=aliases, vmap_method="sequential")(
        *args, num_heads=num_heads, eps=eps, lora_scale=lora_scale, write_kv=write_kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _kernel(args, num_heads, eps, lora_scale, write_kv):
    return _call(args, num_heads, eps, lora_scale, write_kv)


def _kernel_fwd(args, num_heads, eps, lora_scale, write_kv):
    raise NotImplementedError(
        "cpu_decoder has no gradient: it runs few-row decoding with a KV cache; differentiate "
        "the model without a cache, or set L2D_CPU_DECODER=0")


_kernel.defvjp(_kernel_fwd, lambda *a: None)


def run(h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, slot: jax.Array | int, cache: dict,
        layers: Sequence[Layer], modulation: jax.Array, *, num_heads: int, eps: float,
        lora_scale: float = 1.0, write_kv: bool) -> tuple[jax.Array, dict]:
    """The stream h (M, H) through ``layers`` (layer i reads / writes cache layer i).

    cos / sin (M, hd) RoPE of the new position; mask (M, S) bool the cache slots it attends
    to; slot: cache slot of the new position (written with ``write_kv``); cache {"k", "v"}
    (L, M, Hkv, S, hd); modulation (L, F, R, H), R = 1 (every row) or M: per layer the
    effective RMSNorm weights norm1, norm2 and, with F = 6, shift1, scale1, shift2, scale2
    (``llm.Modulation``'s order). Returns (h_out (M, H), cache) (the same cache without
    ``write_kv``).
    """
    if not library.load():
        raise RuntimeError("cpu_decoder: the kernel library is unavailable (see the warning)")
    m, hid = h.shape
    k, v = cache["k"], cache["v"]
    if (len(layers) != k.shape[0] or k.shape[1] != m or mask.shape != (m, k.shape[3])
            or modulation.shape[:2] not in ((len(layers), 2), (len(layers), 6)) or modulation.ndim != 4
            or modulation.shape[2] not in (1, m) or modulation.shape[3] != hid):
        raise ValueError(f"cpu_decoder: {len(layers)} layers, h {h.shape}, mask {mask.shape}, modulation "
                         f"{modulation.shape} do not fit the cache {k.shape} (L, M, Hkv, S, hd)")
    args = [h, cos.reshape(m, -1), sin.reshape(m, -1), mask.astype(bool), jnp.asarray(slot, jnp.int32), k, v,
            modulation, *_flat(layers)]
    outs = _kernel(tuple(args), int(num_heads), np.float32(eps), np.float32(lora_scale), bool(write_kv))
    return outs[0], ({"k": outs[1], "v": outs[2]} if write_kv else cache)
