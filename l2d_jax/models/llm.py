"""Flax NNX decoder-only LLM for the families L2D uses: Llama 2/3/3.x, SmolLM2, Qwen2/2.5.

Layout follows Hugging Face names (``embed_tokens``, ``layers[i].self_attn.q_proj`` ...) so
conversion is a transpose per matrix and nothing else: RoPE uses HF's rotate-half
convention, weights are never permuted. Kernels are stored ``(in, out)``.

Every parameter carries logical axis names in its ``axes`` metadata (``embed``, ``vocab``,
``heads``, ``kv_heads``, ``mlp``, ``norm``); ``l2d_jax.sharding`` maps them onto a mesh.

Layers are stored STACKED: ``layers`` is one ``DecoderLayer`` whose every parameter has a
leading layer axis (logical name ``layers``), and the forward pass is one ``lax.scan`` of
``block.decoder_block`` over it (XLA compiles one layer, not L copies). The math lives in
``models/block.py`` (pure functions); the modules only hold parameters and hand them out as
``block.BlockWeights``. A KV cache is a fixed-size pytree ``{"k": (L, B, Hkv, S, hd), "v":
...}`` so that decoding can live inside ``jax.lax.while_loop``; heads-major, so attention
reads it in place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2d_jax.kernels import cpu_decoder, cpu_matvec
from l2d_jax.kernels.backend import XLA, Kernels
from l2d_jax.models.block import (BlockWeights, Modulation, Projection, causal_mask, decoder_block, matmuls,
                                  rms_norm, rope_cos_sin, scan_layers)
from l2d_jax.sharding import gather_layer
from l2d_jax.errors import UsageError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


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
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)

    @classmethod
    def from_hf(cls, hf: dict, dtype: str = "float32", param_dtype: str | None = None) -> "LLMConfig":
        """Reads an HF config dict (transformers 4 or 5 style). Raises ValueError when unsupported."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UsageError(
                f"unsupported architecture model_type={model_type!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3/3.1/3.2, SmolLM2, Qwen2/2.5, Qwen3 dense)"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise UsageError(f"config.json lacks required keys {missing}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UsageError(f"unsupported hidden_act {hf['hidden_act']!r}; only 'silu' is supported")
        if hf.get("use_sliding_window"):
            raise UsageError("use_sliding_window=True is not supported; set it to false")
        if hf.get("mlp_bias"):
            raise UsageError("mlp_bias=True is not supported")
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
            qk_norm=model_type == "qwen3",
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
        raise UsageError(f"unsupported rope scaling type {kind!r}; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    absent = [k for k in keys if k not in scaling]
    if absent:
        raise UsageError(f"llama3 rope scaling lacks {absent}")
    return theta, tuple(sorted((k, float(scaling[k])) for k in keys))


# --------------------------------------------------------------------------- RoPE


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


# --------------------------------------------------------------------------- modules


def _dtype(name: str):
    return jnp.dtype(name)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out) with logical axes."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], *, bias: bool, cfg: LLMConfig,
                 rngs: nnx.Rngs, init_std: float = 0.02):
        pd = _dtype(cfg.param_dtype)
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), (din, dout), pd), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), pd), axes=(axes[1],)) if bias else None
        self.dtype = _dtype(cfg.dtype)

    def projection(self) -> Projection:
        """This layer as a ``block.Projection`` (its arrays, stacked or not)."""
        return Projection(self.kernel[...], None if self.bias is None else self.bias[...])

    def __call__(self, x: jax.Array, kernel: bool = False) -> jax.Array:
        """x (..., in) -> (..., out) in the compute dtype (not for stacked layers)."""
        y = matmuls(x.astype(self.dtype), [self.kernel[...].astype(self.dtype)], kernel)[0]
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: LLMConfig):
        self.weight = nnx.Param(jnp.ones((dim,), _dtype(cfg.param_dtype)), axes=("norm",))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = Linear(h, cfg.num_heads * hd, ("embed", "heads"), bias=b, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=b, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_kv_heads * hd, ("embed", "kv_heads"), bias=b, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, h, ("heads", "embed"), bias=False, cfg=cfg, rngs=rngs)
        self.q_norm = nnx.data(RMSNorm(hd, cfg) if cfg.qk_norm else None)
        self.k_norm = nnx.data(RMSNorm(hd, cfg) if cfg.qk_norm else None)


class MLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(h, m, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(m, h, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the modules' common type whose every parameter is theirs stacked along a
    new leading axis, with the logical axis name ``layers`` prepended to its ``axes``."""
    graphdef, _ = nnx.split(modules[0])
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules])
    for _, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes")
        if axes is not None:
            var.set_metadata(axes=("layers",) + tuple(axes))
    return nnx.merge(graphdef, state)


def layer_slices(stacked: nnx.Module) -> tuple[nnx.State, Callable[[nnx.State], nnx.Module]]:
    """(state, layer): the state of a stacked module (``stack_modules``) for a scan to slice,
    and the function that makes one layer's module of its slice inside the scan body (its
    parameters all-gathered there under ``sharding.gather_layers``)."""
    graphdef, state = nnx.split(stacked)
    return state, lambda one: nnx.merge(graphdef, gather_layer(one))


class DecoderLayer(nnx.Module):
    """One decoder layer's parameters; ``LLM.layers`` is one of these with every parameter
    stacked over the layers (``stack_modules``)."""

    def __init__(self, cfg: LLMConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)

    def projection_groups(self) -> tuple[list[Linear], ...]:
        """The layer's projections in the order a step reads them, grouped by shared input
        (each group is one ``block.project`` call): (q, k, v), (o,), (gate, up), (down,)."""
        attn, mlp = self.self_attn, self.mlp
        return [attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj], [mlp.down_proj]

    def weights(self) -> BlockWeights:
        """The projections (and qk-norm weights) as ``block.decoder_block`` takes them."""
        attn, mlp = self.self_attn, self.mlp
        projs = [lin.projection() for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                               mlp.up_proj, mlp.down_proj)]
        qk = [None if n is None else n.weight[...] for n in (attn.q_norm, attn.k_norm)]
        return BlockWeights(*projs, *qk)

    def norms(self) -> Modulation:
        """The RMSNorm weights (H,) (stacked: (L, H)) of the unmodulated stream."""
        return Modulation(self.input_layernorm.weight[...], self.post_attention_layernorm.weight[...])


class LLMOutput(NamedTuple):
    logits: jax.Array | None  # (B, T, V) float32 (None: asked for h_L only)
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
        self.layers = stack_modules([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, cfg=cfg, rngs=rngs)

    def embed(self, ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, H) in the compute dtype."""
        return jnp.take(self.embed_tokens[...], ids, axis=0).astype(_dtype(self.cfg.dtype))

    def head(self, h: jax.Array, kernels: Kernels = XLA) -> jax.Array:
        """Final norm and LM head in the compute dtype, logits cast to float32. h (B, T, H)."""
        x = self.norm(h)
        if self.lm_head is None:
            # contract with the (V, H) table as stored: a `.T` here makes XLA materialise
            # the transposed table inside generation's while loop on every step
            table = self.embed_tokens[...].astype(x.dtype)
            logits = cpu_matvec.matmul(x.reshape(-1, x.shape[-1]), table, transposed=True, kernel=kernels.matvec)
            logits = logits.reshape(x.shape[:-1] + table.shape[:1])
        else:
            logits = self.lm_head(x, kernels.matvec)
        return logits.astype(jnp.float32)

    def rope(self, positions: jax.Array):
        """cos, sin (B, T, hd) float32 for positions (B, T)."""
        return rope_cos_sin(positions, rope_inv_freq(self.cfg))

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None, cache: dict | None = None,
                 cache_index: jax.Array | int = 0, kv_valid: jax.Array | None = None,
                 kernels: Kernels = XLA, remat: str = "none", head: bool = True) -> LLMOutput:
        """Forward pass.

        input_ids (B, T); positions (B, T) RoPE positions (default 0..T-1).
        Without a cache: attention_mask (B, T) (1 = real token) masks padded keys.
        With a cache: the new tokens go to slots [cache_index, cache_index + T) and kv_valid
        (B, S) says which cache slots hold real tokens (including the new ones); cache_index
        may be (B,), one slot per row, for one new token per row (continuous batching).
        kernels: the CPU kernels allowed (``kernels.backend``); remat: the scanned block's
        rematerialisation policy (``block.REMAT_POLICIES``); head: False skips the LM head
        (``logits`` None) for a caller that only needs h_L.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = self.mask(t, attention_mask=attention_mask, cache=cache, cache_index=cache_index,
                         kv_valid=kv_valid)
        rope = self.rope(positions)
        h = self.embed(input_ids)
        if cache is not None and t == 1 and kernels.decoder:
            out = self._kernel_step(h[:, 0], rope, mask[:, 0], cache, cache_index, kernels, head)
            if out is not None:
                return out
        stacked, layer_of = layer_slices(self.layers)

        def body(carry, xs):
            h, cache = carry
            state, i = xs
            layer = layer_of(state)
            h, kv = decoder_block(h, layer.weights(), layer.norms(), rope, mask, cfg=self.cfg, kv=cache, layer=i,
                                  cache_index=cache_index, kernels=kernels)
            return (h, None if cache is None else kv), None

        (h, cache), _ = scan_layers(body, (h, cache), (stacked, jnp.arange(self.cfg.num_layers)), remat)
        return LLMOutput(self.head(h, kernels) if head else None, h, cache)

    def _kernel_step(self, h, rope, mask, cache, cache_index, kernels, head: bool) -> LLMOutput | None:
        """One new position per sequence, h (B, H), through the whole stack in one
        ``cpu_decoder`` call (its k / v written into the cache); None where it does not apply."""
        weights, norms = self.layers.weights(), self.layers.norms()
        stacked_norms = jnp.stack([norms.norm1, norms.norm2], axis=1)[:, :, None]  # (L, 2, 1, H)
        if not cpu_decoder.usable(h, cache, weights, stacked_norms):
            return None
        out, cache = cpu_decoder.run(h, rope[0][:, 0], rope[1][:, 0], mask, cache_index, cache, weights,
                                     stacked_norms, num_heads=self.cfg.num_heads, eps=self.cfg.rms_norm_eps,
                                     write_kv=True)
        return LLMOutput(self.head(out[:, None], kernels) if head else None, out[:, None], cache)

    def mask(self, t: int, *, attention_mask=None, cache=None, cache_index=0, kv_valid=None):
        """(B, T, S) attention mask shared by the main and the flow streams; cache_index
        a scalar or (B,) (one slot per row)."""
        q_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(t)
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
