"""The decoder block as pure functions on arrays: one definition for the main stream, the
L2D flow stream, training and decoding, scanned over stacked layers.

- ``decoder_block(h, weights, norms, rope, mask, ...)``: pre-norm attention + SwiGLU MLP with
  residuals. ``weights`` (``BlockWeights``) are the layer's projections (base, full copies or
  base + LoRA: ``Projection``); ``norms`` (``Modulation``) its RMSNorm weights and, for the
  L2D flow stream, the modulation's shifts and scales. A stream with k / v projections
  (the main stream) computes its keys / values (into the stacked KV cache at ``layer`` when
  one is given); a stream without them (the flow stream) attends to the ``kv`` it is given,
  the main stream's of the same layer.
- ``scan_layers(body, carry, xs, remat)``: ``lax.scan`` over the layer axis of stacked
  parameters, with a named rematerialisation policy (``REMAT_POLICIES``).
- the pieces: ``rms_norm``, ``rope_cos_sin``, ``apply_rope``, ``causal_mask``, ``attend``,
  ``attend_kv``, ``project`` (every projection that reads one input in one ``matmuls`` call),
  ``write_kv``.

Kernels are the caller's choice (``kernels.backend.Kernels``, static): with ``XLA`` nothing
here emits a custom call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from l2d_jax.kernels import cpu_attention, cpu_matvec
from l2d_jax.kernels.backend import XLA, Kernels
from l2d_jax.errors import UsageError

if TYPE_CHECKING:
    from l2d_jax.models.llm import LLMConfig

# name -> jax.checkpoint policy for the scanned block (None: no rematerialisation)
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each layer's inputs, recompute the rest
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection outputs
}


class Projection(NamedTuple):
    """y = x @ w (+ bias) (+ lora_scale * (x @ a) @ b): w (..., K, N), bias (..., N), a (..., K, r),
    b (..., r, N); a leading layer axis when stacked."""

    w: jax.Array
    bias: jax.Array | None = None
    a: jax.Array | None = None
    b: jax.Array | None = None


class BlockWeights(NamedTuple):
    """A layer's projections (k, v None for a stream that reads another stream's keys /
    values) and, with qk-norm, the per-head RMSNorm weights of q and k (hd,)."""

    q: Projection
    k: Projection | None
    v: Projection | None
    o: Projection
    gate: Projection
    up: Projection
    down: Projection
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


class Modulation(NamedTuple):
    """Per-layer norm weights of a stream and, for the modulated flow stream, shifts and
    scales. Any of the last four may be None. Shapes broadcast against (B, T, H)."""

    norm1: jax.Array
    norm2: jax.Array
    shift1: jax.Array | None = None
    scale1: jax.Array | None = None
    shift2: jax.Array | None = None
    scale2: jax.Array | None = None


# --------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in float32, cast back, then scale. x (..., H), weight (..., H)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, hd) float32 for integer positions (B, T) and inverse frequencies (hd/2,)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x (B, T, heads, hd); cos/sin (B, T, hd)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def causal_mask(q_slots: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """(B, Tq, S) bool: query at slot q may read cache slot s <= q where kv_valid.

    q_slots (Tq,) int cache slots of the queries, or (B, Tq): each row its own; kv_valid (B, S) bool.
    """
    s = jnp.arange(kv_valid.shape[1])
    q = q_slots if q_slots.ndim == 2 else q_slots[None]
    return (s[None, None, :] <= q[:, :, None]) & kv_valid[:, None, :]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q (B, Tq, H, hd), k/v heads-major (B, Hkv, S, hd), mask (B, Tq, S).

    Scores and softmax in float32, probabilities cast to the value dtype. Returns (B, Tq, H*hd).
    """
    b, tq, h, hd = q.shape
    hkv = k.shape[1]
    # heads ahead of positions on the small q/out: the (B, Hkv, Tq, G, S) scores are then
    # every dot's natural layout, and XLA transposes none of them (fwd or bwd); k/v come
    # heads-major (the cache's layout), so decoding reads the cache in place
    qg = q.reshape(b, tq, hkv, h // hkv, hd).transpose(0, 2, 1, 3, 4)
    scores = jnp.einsum("bktgd,bksd->bktgs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bktgs,bksd->bktgd", probs, v).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, tq, h * hd)


QUERY_CHUNK = 512  # query rows per attention pass when a prefill attends over the cache


def attend_kv(q: jax.Array, kv: dict | tuple[jax.Array, jax.Array], layer: jax.Array | int, mask: jax.Array,
              kernel: bool = False) -> jax.Array:
    """``attend`` over one layer's keys/values: kv is either the stacked cache {"k", "v"}
    (L, B, Hkv, S, hd), read at ``layer`` (an int or a scan's traced index; in place by
    ``cpu_attention`` with ``kernel`` for a few float32 query rows), or the layer's own
    (k, v) pair (B, Hkv, S, hd)."""
    if isinstance(kv, dict):
        k, v = kv["k"], kv["v"]
        if kernel and cpu_attention.usable(q, k, v):
            return cpu_attention.attend(q, k, v, layer, mask, reference=attend)
        k, v = k[layer], v[layer]
    else:
        k, v = kv
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    b, tq = q.shape[:2]
    if tq <= QUERY_CHUNK or tq % QUERY_CHUNK:
        return attend(q, k, v, mask)
    # long sequences (a long prompt's prefill, training at 2048): query rows in chunks, so the
    # float32 scores are (B, H, chunk, S) at a time instead of (B, H, Tq, S); each row's
    # softmax is the same computation. (libtpu 0.0.42.1's compiler dies of a stack overflow on
    # a (16, 32, 2048, 2304) score tensor per device instead of reporting its memory.)
    n = tq // QUERY_CHUNK
    qc = q.reshape(b, n, QUERY_CHUNK, *q.shape[2:]).swapaxes(0, 1)
    mc = mask.reshape(mask.shape[0], n, QUERY_CHUNK, mask.shape[-1]).swapaxes(0, 1)  # batch may be 1
    out = jax.lax.map(lambda qm: attend(qm[0], k, v, qm[1]), (qc, mc))
    return out.swapaxes(0, 1).reshape(b, tq, -1)


def matmuls(x: jax.Array, ws: Sequence[jax.Array], kernel: bool = False) -> list[jax.Array]:
    """[x @ w for w in ws]: x (..., in), each w (in, out_i), as 2-D matmuls: (..., out_i).

    Flattening the leading axes keeps the weight gradient a plain x^T @ g; with two
    contracted axes (B, T) XLA:CPU transposes the output gradient g first. With ``kernel``,
    a few rows go through ``cpu_matvec``, all of ``ws`` in one call.
    """
    ys = cpu_matvec.matmuls(x.reshape(-1, x.shape[-1]), ws, kernel=kernel)
    return [y.reshape(x.shape[:-1] + y.shape[-1:]) for y in ys]


def project(x: jax.Array, projs: Sequence[Projection], dtype, *, lora_scale: float = 1.0,
            kernel: bool = False) -> list[jax.Array]:
    """Every projection of ``projs`` of one input x (..., in) in the compute ``dtype``: the
    kernels and the LoRA A's read x in one ``matmuls`` call; then bias and LoRA delta."""
    loras = [p for p in projs if p.a is not None]
    ws = [p.w for p in projs] + [p.a for p in loras]
    ys = matmuls(x.astype(dtype), [w.astype(dtype) for w in ws], kernel)
    xa = iter(ys[len(projs):])
    out = []
    for p, y in zip(projs, ys):
        if p.bias is not None:
            y = y + p.bias.astype(dtype)
        if p.a is not None:
            y = y + matmuls(next(xa), [p.b.astype(dtype)], kernel)[0] * lora_scale
        out.append(y)
    return out


def write_kv(cache: dict, layer: jax.Array | int, k: jax.Array, v: jax.Array, cache_index: jax.Array | int) -> dict:
    """The stacked cache with layer ``layer``'s slots [cache_index, cache_index + T) set to
    k / v (B, T, Hkv, hd); only those slots are written (in place in a loop or scan).
    cache_index: one slot for every row, or (B,) one per row (then T = 1: a scatter)."""
    if jnp.ndim(cache_index) == 1:
        if k.shape[1] != 1:
            raise ValueError("a per-row cache_index writes one position per row (T = 1)")
        rows = jnp.arange(k.shape[0])

        def scatter(buf, x):  # buf[layer, b, :, cache_index[b]] = x[b, 0]
            return buf.at[layer, rows, :, cache_index].set(x[:, 0].astype(buf.dtype))
        return {"k": scatter(cache["k"], k), "v": scatter(cache["v"], v)}

    def put(buf, x):
        zero = jnp.zeros((), jnp.int32)
        start = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype).transpose(0, 2, 1, 3)[None], start)
    return {"k": put(cache["k"], k), "v": put(cache["v"], v)}


def _shift(x, s):
    return x if s is None else x + s.astype(x.dtype)


def _scale(x, s):
    return x if s is None else x * s.astype(x.dtype)


# --------------------------------------------------------------------------- the block


def decoder_block(h: jax.Array, w: BlockWeights, norms: Modulation, rope: tuple[jax.Array, jax.Array],
                  mask: jax.Array, *, cfg: LLMConfig, kv: dict | tuple | None = None,
                  layer: jax.Array | int = 0, cache_index: jax.Array | int = 0, lora_scale: float = 1.0,
                  kernels: Kernels = XLA) -> tuple[jax.Array, dict | tuple]:
    """One decoder layer of a stream. h (B, T, H); rope: cos, sin (B, T, hd); mask (B, T, S).

    With k / v projections (main stream): the new keys / values go into ``kv``, the stacked
    cache {"k", "v"} (L, B, Hkv, S, hd), at layer ``layer`` and slots [cache_index,
    cache_index + T), or without a cache (``kv`` None) are attended to directly. Without them
    (flow stream): attends to ``kv``, the main stream's cache (read at ``layer``) or its (k, v)
    pair of this layer (B, Hkv, T, hd). Returns (h_out, kv attended to): the written cache, or
    the (k, v) pair.
    """
    dt = jnp.dtype(cfg.dtype)
    b, t, _ = h.shape
    hd = cfg.head_dim

    def proj(x, ps):
        return project(x, ps, dt, lora_scale=lora_scale, kernel=kernels.matvec)

    x = _shift(rms_norm(h, norms.norm1, cfg.rms_norm_eps), norms.shift1)
    own_kv = w.k is not None
    q, *kv_new = proj(x, [w.q, w.k, w.v] if own_kv else [w.q])
    q = q.reshape(b, t, cfg.num_heads, hd)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, cfg.rms_norm_eps)
    q = apply_rope(q, *rope)
    if own_kv:
        k, v = (y.reshape(b, t, cfg.num_kv_heads, hd) for y in kv_new)
        if w.k_norm is not None:
            k = rms_norm(k, w.k_norm, cfg.rms_norm_eps)
        k = apply_rope(k, *rope)
        kv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if kv is None else write_kv(kv, layer, k, v,
                                                                                             cache_index)
    elif kv is None:
        raise ValueError("a stream without k / v projections needs the kv it attends to")
    (o,) = proj(attend_kv(q, kv, layer, mask, kernels.attention), [w.o])
    h = h + _scale(o, norms.scale1)
    x = _shift(rms_norm(h, norms.norm2, cfg.rms_norm_eps), norms.shift2)
    gate, up = proj(x, [w.gate, w.up])
    (m,) = proj(jax.nn.silu(gate) * up, [w.down])  # SwiGLU
    return h + _scale(m, norms.scale2), kv


def scan_layers(body: Callable, carry, xs, remat: str = "none"):
    """``lax.scan(body, carry, xs)`` over the leading (layer) axis of ``xs``, the body under
    ``jax.checkpoint`` with the named policy of ``REMAT_POLICIES`` (none: as is)."""
    if remat not in REMAT_POLICIES:
        raise UsageError(f"remat policy must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    policy = REMAT_POLICIES[remat]
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    return jax.lax.scan(body, carry, xs)
