"""Few-row decoding through a whole stack of decoder layers on XLA:CPU in one FFI custom call
(``cpu_decoder.cc``): the main stream of a new token (its keys / values written into the
cache in place) or the L2D flow stream of one ODE evaluation (reading that cache).

A batch-1 decoding step is reading the weights once. Between the matrix products XLA runs
~25 small ops per layer, each a step of its executor, and each product or attention call
wakes the intra-op pool again; this call runs norms, projections (with LoRA deltas and
biases), RoPE, the cache write, attention, the SwiGLU MLP and the modulation's shifts and
scales of every layer, spread over the pool's threads as one team with a barrier per phase.

``run(h, cos, sin, mask, slot, cache, weights, modulation, ...)`` is the entry point. The
weights are the model's stacked parameters (``block.BlockWeights``, every array with a
leading layer axis), read in place. ``usable(...)`` says whether the shapes fit: h (M, H)
with 1 <= M <= ``MAX_ROWS`` rows (one new position per sequence), everything float32, LoRA
ranks <= ``MAX_LORA_RANK``; ``unsupported(cfg)`` names a block feature of the model that the
kernel does not implement (the kernel backend then refuses it, ``backend.py``). Callers
(``LLM.__call__``, ``L2DModel.flow_only``) run the scanned block otherwise. It has no
gradient: decoding with a KV cache is not trained through (differentiating raises an error
that says how to turn the kernel off).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np

from l2d_jax.kernels import library

MAX_ROWS = 8
MAX_LORA_RANK = 64
TARGET = "l2d_cpu_decoder_f32"


def unsupported(cfg) -> str | None:
    """The first feature of an ``LLMConfig``'s decoder block that this kernel does not
    implement (None: it runs the model's block exactly). It implements RMSNorm, q/k/v biases,
    rotate-half RoPE, grouped-query attention, SwiGLU and the L2D modulation."""
    if getattr(cfg, "qk_norm", False):
        return "qk_norm (per-head RMSNorm of q and k)"
    if cfg.head_dim > 512 or cfg.head_dim % 2:
        return f"head_dim {cfg.head_dim} (needs an even head_dim <= 512)"
    return None


def usable(h: jax.Array, cache: dict, weights, modulation: jax.Array) -> bool:
    """Whether ``run`` takes these shapes and dtypes: see the module docstring."""
    projs = tuple(weights)[:7]  # q, k, v, o, gate, up, down (the block's qk-norm is refused earlier)
    arrays = [h, cache["k"], cache["v"], modulation, *jax.tree.leaves(projs)]
    ranks = [p.a.shape[-1] for p in projs if p is not None and p.a is not None]
    return (h.ndim == 2 and 1 <= h.shape[0] <= MAX_ROWS and all(a.dtype == jnp.float32 for a in arrays)
            and max(ranks, default=0) <= MAX_LORA_RANK)


def _flat(weights) -> list[jax.Array]:
    """The stacked buffers in the kernel's order (4 per projection, size 0 for "none")."""
    empty = jnp.zeros((0,), jnp.float32)
    return [empty if x is None else x for p in tuple(weights)[:7] for x in (p if p is not None else (None,) * 4)]


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
        "the model without a cache, or use the xla kernel backend")


_kernel.defvjp(_kernel_fwd, lambda *a: None)


def run(h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, slot: jax.Array | int, cache: dict,
        weights, modulation: jax.Array, *, num_heads: int, eps: float,
        lora_scale: float = 1.0, write_kv: bool) -> tuple[jax.Array, dict]:
    """The stream h (M, H) through the stacked layers ``weights`` (``block.BlockWeights`` of
    (L, ...) arrays; k / v None for a stream that only reads the cache): layer i reads /
    writes cache layer i.

    cos / sin (M, hd) RoPE of the new position; mask (M, S) bool the cache slots it attends
    to; slot: cache slot of the new position (written with ``write_kv``), one for every row or
    (M,) one per row; cache {"k", "v"}
    (L, M, Hkv, S, hd); modulation (L, F, R, H), R = 1 (every row) or M: per layer the
    effective RMSNorm weights norm1, norm2 and, with F = 6, shift1, scale1, shift2, scale2
    (``llm.Modulation``'s order). Returns (h_out (M, H), cache) (the same cache without
    ``write_kv``).
    """
    if not library.load():
        raise RuntimeError("cpu_decoder: the kernel library is unavailable (see the warning)")
    m, hid = h.shape
    k, v = cache["k"], cache["v"]
    n_layers = weights[0].w.shape[0]
    if (n_layers != k.shape[0] or k.shape[1] != m or mask.shape != (m, k.shape[3])
            or modulation.shape[:2] not in ((n_layers, 2), (n_layers, 6)) or modulation.ndim != 4
            or modulation.shape[2] not in (1, m) or modulation.shape[3] != hid):
        raise ValueError(f"cpu_decoder: {n_layers} layers, h {h.shape}, mask {mask.shape}, modulation "
                         f"{modulation.shape} do not fit the cache {k.shape} (L, M, Hkv, S, hd)")
    args = [h, cos.reshape(m, -1), sin.reshape(m, -1), mask.astype(bool), jnp.asarray(slot, jnp.int32), k, v,
            modulation, *_flat(weights)]
    outs = _kernel(tuple(args), int(num_heads), np.float32(eps), np.float32(lora_scale), bool(write_kv))
    return outs[0], ({"k": outs[1], "v": outs[2]} if write_kv else cache)
