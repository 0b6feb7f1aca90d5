"""Flax NNX decoder-only LLM for the families L2D uses: Llama 2/3/3.x, SmolLM2, Qwen2/2.5.

Layout follows Hugging Face names (``embed_tokens``, ``layers[i].self_attn.q_proj`` ...) so
conversion is a transpose per matrix and nothing else: RoPE uses HF's rotate-half
convention, weights are never permuted. Kernels are stored ``(in, out)``.

Every parameter carries logical axis names in its ``axes`` metadata (``embed``, ``vocab``,
``heads``, ``kv_heads``, ``mlp``, ``norm``); ``l2d_jax.sharding`` maps them onto a mesh.

The math lives in small pure functions (``rms_norm``, ``rope_inv_freq``, ``apply_rope``,
``attend``, ``causal_mask``); the modules only hold parameters and wire them up. A KV
cache is a fixed-size pytree ``{"k": (L, B, Hkv, S, hd), "v": ...}`` so that decoding can
live inside ``jax.lax.while_loop``; heads-major, so attention reads it in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2d_jax.kernels import cpu_attention, cpu_decoder, cpu_matvec

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Shape and numerics of a decoder; built from an HF ``config.json`` dict."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # sorted items of the llama3 dict
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2: True)
    max_position_embeddings: int
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    @classmethod
    def from_hf(cls, hf: dict, dtype: str = "float32", param_dtype: str | None = None) -> "LLMConfig":
        """Reads an HF config dict (transformers 4 or 5 style). Raises ValueError when unsupported."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture model_type={model_type!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3/3.1/3.2, SmolLM2, Qwen2/2.5)"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is supported")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported; set it to false")
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        heads = hf["num_attention_heads"]
        rope_theta, scaling = _rope_settings(hf)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # HF Llama/Qwen2 default
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            dtype=dtype,
            param_dtype=param_dtype or dtype,
        )

    def replace(self, **kw) -> "LLMConfig":
        return dataclasses.replace(self, **kw)


def _rope_settings(hf: dict) -> tuple[float, tuple | None]:
    """(rope_theta, llama3 scaling items or None) from hub-style or transformers-5 keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or None
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if params and params.get("rope_type", "default") != "default":
        scaling = params
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [k for k in keys if k not in scaling]
    if absent:
        raise ValueError(f"llama3 rope scaling lacks {absent}")
    return theta, tuple(sorted((k, float(scaling[k])) for k in keys))


# --------------------------------------------------------------------------- pure math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalise in float32, cast back, then scale. x (..., H), weight (..., H)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(cfg: LLMConfig) -> np.ndarray:
    """Inverse frequencies (hd/2,) float32, with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv = inv.astype(np.float32)
    if cfg.rope_scaling is None:
        return inv
    s = dict(cfg.rope_scaling)
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, hd) float32 for integer positions (B, T)."""
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

    q_slots (Tq,) int cache slots of the queries; kv_valid (B, S) bool.
    """
    s = jnp.arange(kv_valid.shape[1])
    return (s[None, None, :] <= q_slots[None, :, None]) & kv_valid[:, None, :]


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


def attend_kv(q: jax.Array, kv: dict | tuple[jax.Array, jax.Array], layer: int, mask: jax.Array) -> jax.Array:
    """``attend`` over one layer's keys/values: kv is either the stacked cache {"k", "v"}
    (L, B, Hkv, S, hd), read at ``layer`` (in place by ``cpu_attention`` for a few float32
    query rows on one CPU device), or the layer's own (k, v) pair (B, Hkv, S, hd)."""
    if isinstance(kv, dict):
        k, v = kv["k"], kv["v"]
        if cpu_attention.usable(q, k, v):
            return cpu_attention.attend(q, k, v, layer, mask, reference=attend)
        k, v = k[layer], v[layer]
    else:
        k, v = kv
    return attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)


# --------------------------------------------------------------------------- modules


def _dtype(name: str):
    return jnp.dtype(name)


def matmuls(x: jax.Array, ws: Sequence[jax.Array]) -> list[jax.Array]:
    """[x @ w for w in ws]: x (..., in), each w (in, out_i), as 2-D matmuls: (..., out_i).

    Flattening the leading axes keeps the weight gradient a plain x^T @ g; with two
    contracted axes (B, T) XLA:CPU transposes the output gradient g first. A few rows
    (decoding) on a single CPU device go through ``cpu_matvec``, all of ``ws`` in one call.
    """
    ys = cpu_matvec.matmuls(x.reshape(-1, x.shape[-1]), ws)
    return [y.reshape(x.shape[:-1] + y.shape[-1:]) for y in ys]


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., in) @ w (in, out): (..., out), as ``matmuls``."""
    return matmuls(x, [w])[0]


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out) with logical axes."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, bias: bool, cfg: LLMConfig,
                 rngs: nnx.Rngs, init_std: float = 0.02):
        pd = _dtype(cfg.param_dtype)
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (din, dout), pd), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), pd), axes=(axes[1],)) if bias else None
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return linears(x, [self])[0]


def linears(x: jax.Array, layers: Sequence[Linear], extra: Sequence[jax.Array] = ()) -> list[jax.Array]:
    """[layer(x) for layer in layers] + [x @ w for w in extra], as one ``matmuls`` call (for
    projections that read the same input: q/k/v, gate/up, a LoRA's A). x (..., in); all in
    the first layer's compute dtype."""
    dtype = layers[0].dtype
    ws = [layer.kernel[...] for layer in layers] + list(extra)
    ys = matmuls(x.astype(dtype), [w.astype(dtype) for w in ws])
    out = [y if layer.bias is None else y + layer.bias[...].astype(dtype) for layer, y in zip(layers, ys)]
    return out + ys[len(layers):]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: LLMConfig):
        self.weight = nnx.Param(jnp.ones((dim,), _dtype(cfg.param_dtype)), axes=("norm",))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array, weight: jax.Array | None = None) -> jax.Array:
        """``weight`` overrides the stored weight (modulated norms of the L2D path)."""
        return rms_norm(x, self.weight[...] if weight is None else weight, self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = Linear(h, cfg.num_heads * hd, ("embed", "heads"), bias=b, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=b, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=b, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, h, ("heads", "embed"), bias=False, cfg=cfg, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(m, h, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)


class Modulation(NamedTuple):
    """Per-layer modulation of a stream: effective norm weights, shifts and scales.

    Any field may be None (no shift / no scale). Shapes broadcast against (B, T, H).
    """

    norm1: jax.Array
    norm2: jax.Array
    shift1: jax.Array | None = None
    scale1: jax.Array | None = None
    shift2: jax.Array | None = None
    scale2: jax.Array | None = None


def _shift(x, s):
    return x if s is None else x + s.astype(x.dtype)


def _scale(x, s):
    return x if s is None else x * s.astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)

    def projection_groups(self) -> tuple[list[Linear], ...]:
        """The layer's projections in the order a step reads them, grouped by shared input
        (each group is one ``linears`` call): (q, k, v), (o,), (gate, up), (down,)."""
        attn, mlp = self.self_attn, self.mlp
        return [attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]

    def __call__(self, h: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
                 cache: dict | None = None, layer: int = 0, cache_index: jax.Array | int = 0,
                 mod: Modulation | None = None):
        """Main-stream step of layer ``layer``. h (B, T, H); cache: the stacked KV cache
        {"k", "v"} (L, B, Hkv, S, hd) or None.

        The new keys/values are written into the cache's slots [cache_index, cache_index + T)
        of this layer only (in place under jit). Returns (h_out, cache, kv): kv is what was
        attended to, for the flow stream (``attend_kv``): the cache, or without one this
        call's own (k, v) (B, Hkv, T, hd).
        """
        cfg = self.cfg
        qkv, o_proj, gate_up, down = self.projection_groups()
        b, t, _ = h.shape
        x = self.input_layernorm(h, None if mod is None else mod.norm1)
        x = _shift(x, None if mod is None else mod.shift1)
        q, k, v = linears(x, qkv)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            kv = cache = write_kv(cache, layer, k, v, cache_index)
        else:
            kv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        (o,) = linears(attend_kv(q, kv, layer, mask), o_proj)
        h = h + _scale(o, None if mod is None else mod.scale1)
        x = self.post_attention_layernorm(h, None if mod is None else mod.norm2)
        x = _shift(x, None if mod is None else mod.shift2)
        gate, up = linears(x, gate_up)
        (m,) = linears(jax.nn.silu(gate) * up, down)  # SwiGLU
        return h + _scale(m, None if mod is None else mod.scale2), cache, kv

    def decoder_layer(self) -> cpu_decoder.Layer:
        """This layer's projections as ``cpu_decoder`` runs them."""
        def proj(lin: Linear) -> cpu_decoder.Projection:
            return cpu_decoder.Projection(lin.kernel[...], None if lin.bias is None else lin.bias[...])

        attn, mlp = self.self_attn, self.mlp
        return cpu_decoder.Layer(*map(proj, (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                             mlp.up_proj, mlp.down_proj)))


def write_kv(cache: dict, layer: int, k: jax.Array, v: jax.Array, cache_index: jax.Array | int) -> dict:
    """The stacked cache with layer ``layer``'s slots [cache_index, cache_index + T) set to
    k / v (B, T, Hkv, hd); only those slots are written (no per-layer slice and re-stack)."""
    def put(buf, x):
        zero = jnp.zeros((), jnp.int32)
        start = (jnp.int32(layer), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype).transpose(0, 2, 1, 3)[None], start)
    return {"k": put(cache["k"], k), "v": put(cache["v"], v)}


class LLMOutput(NamedTuple):
    logits: jax.Array  # (B, T, V) float32
    hidden: jax.Array  # (B, T, H) last hidden state BEFORE the final norm (h_L)
    cache: dict | None


class LLM(nnx.Module):
    """The frozen base decoder. ``__call__`` runs it; ``head`` maps h_L to logits."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pd),
            axes=("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, cfg=cfg, rngs=rngs)

    def embed(self, ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, H) in the compute dtype."""
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(_dtype(self.cfg.dtype))

    def head(self, h: jax.Array) -> jax.Array:
        """Final norm and LM head in the compute dtype, logits cast to float32. h (B, T, H)."""
        x = self.norm(h)
        if self.lm_head is None:
            # contract with the (V, H) table as stored: a `.T` here makes XLA materialise
            # the transposed table inside generation's while loop on every step
            table = self.embed_tokens[...].astype(x.dtype)
            logits = cpu_matvec.matmul(x.reshape(-1, x.shape[-1]), table, transposed=True)
            logits = logits.reshape(x.shape[:-1] + table.shape[:1])
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32)

    def rope(self, positions: jax.Array):
        """cos, sin (B, T, hd) float32 for positions (B, T)."""
        return rope_cos_sin(positions, rope_inv_freq(self.cfg))

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | int = 0, kv_valid: jax.Array | None = None) -> LLMOutput:
        """Forward pass.

        input_ids (B, T); positions (B, T) RoPE positions (default 0..T-1).
        Without a cache: attention_mask (B, T) (1 = real token) masks padded keys.
        With a cache: the new tokens go to slots [cache_index, cache_index + T) and kv_valid
        (B, S) says which cache slots hold real tokens (including the new ones).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = self.mask(t, attention_mask=attention_mask, cache=cache, cache_index=cache_index,
                         kv_valid=kv_valid)
        rope = self.rope(positions)
        h = self.embed(input_ids)
        stack = [layer.decoder_layer() for layer in self.layers] if cache is not None and t == 1 else None
        norms = None if stack is None else jnp.stack(
            [jnp.stack([ly.input_layernorm.weight[...], ly.post_attention_layernorm.weight[...]]) for ly in self.layers]
        )[:, :, None]  # (L, 2, 1, H)
        if stack and cpu_decoder.usable(h[:, 0], cache, stack, norms):
            # one new position per sequence: the whole stack in one custom call
            out, cache = cpu_decoder.run(h[:, 0], rope[0][:, 0], rope[1][:, 0], mask[:, 0], cache_index, cache,
                                         stack, norms, num_heads=self.cfg.num_heads, eps=self.cfg.rms_norm_eps,
                                         write_kv=True)
            h = out[:, None]
        else:
            for i, layer in enumerate(self.layers):
                h, cache, _ = layer(h, rope, mask, cache, i, cache_index)
        return LLMOutput(self.head(h), h, cache)

    def mask(self, t: int, *, attention_mask=None, cache=None, cache_index=0, kv_valid=None):
        """(B, T, S) attention mask shared by the main and the flow streams."""
        q_slots = cache_index + jnp.arange(t)
        if cache is None:
            valid = (jnp.ones((1, t), bool) if attention_mask is None else attention_mask.astype(bool))
        else:
            if kv_valid is None:
                raise ValueError("a cached forward needs kv_valid (B, S)")
            valid = kv_valid.astype(bool)
        return causal_mask(q_slots, valid)


def init_cache(cfg: LLMConfig, batch: int, length: int, dtype: str | None = None) -> dict:
    """Zero KV cache {"k", "v"}: (L, B, Hkv, S, hd) each (heads-major), in the compute dtype by default."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    dt = _dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions for a left-padded batch: 0.. over real tokens, 0 on pads. (B, T) -> (B, T)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def init_llm(cfg: LLMConfig, seed: int = 0) -> LLM:
    """A randomly initialised LLM, built inside one jit (eager init dispatches op by op)."""
    return nnx.jit(lambda: LLM(cfg, rngs=nnx.Rngs(seed)))()
