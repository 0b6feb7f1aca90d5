"""The L2D diffusion (flow) path beside a frozen Flax LLM.

``L2DModel`` holds two halves, ``base`` (the frozen ``LLM``) and ``flow`` (every new,
trainable parameter), so ``nnx.split(model, FLOW, ...)`` gives the trainable pytree.

Per layer l the main stream h runs the unchanged base layer; the flow stream f runs the
same layer shape with the base norms (weights shifted by the modulation), its own query /
output / MLP projections (base, full copies or base + LoRA) and attention over the MAIN
stream's keys and values of layer l. The final hidden state is ``h_L + r(t) * f_L``.

Two entry points:
- ``__call__``: main and flow streams together (training, full forward).
- ``flow_only``: only the flow stream for the newest positions, reading the main stream's
  cached keys/values and cached ``h_L`` (each ODE velocity during generation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from l2d_jax import diffusion
from l2d_jax.kernels import cpu_decoder
from l2d_jax.models.llm import (LLM, Linear, LLMConfig, LLMOutput, Modulation, apply_rope, attend_kv, linears,
                                matmul)
from l2d_jax.settings import L2DSettings

FLOW = nnx.PathContains("flow")  # filter: the trainable flow half of an L2DModel


# --------------------------------------------------------------------------- initialisers


def xavier_uniform(key, shape, dtype):
    """Glorot uniform for a (in, out) kernel, as torch.nn.init.xavier_uniform_."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_uniform(key, shape, dtype, fan_in):
    """torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(din: int, dout: int, cfg: LLMConfig, rngs: nnx.Rngs) -> Linear:
    """A new Linear layer of the flow path: xavier-uniform weights, zero bias."""
    lin = Linear(din, dout, ("flow_in", "flow_out"), bias=True, cfg=cfg, rngs=rngs)
    lin.kernel[...] = xavier_uniform(rngs.params(), (din, dout), lin.kernel[...].dtype)
    return lin


class MLP(nnx.Module):
    """Linear layers with SiLU between them and none after the last. dims = [in, ..., out]."""

    def __init__(self, dims: list[int], cfg: LLMConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([_linear(a, b, cfg, rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(jax.nn.silu(x))
        return x


class LoRA(nnx.Module):
    """Low-rank delta (x @ A @ B) * alpha / r beside a frozen base projection (x @ A is taken
    together with the base projection, ``FlowLayer.project``; ``delta`` does the rest)."""

    def __init__(self, din: int, dout: int, rank: int, scale: float, cfg: LLMConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.A = nnx.Param(jax.random.normal(rngs.params(), (din, rank), pd) / rank, axes=("flow_in", "lora"))
        self.B = nnx.Param(jnp.zeros((rank, dout), pd), axes=("lora", "flow_out"))
        self.scale = scale
        self.dtype = jnp.dtype(cfg.dtype)

    def delta(self, xa: jax.Array) -> jax.Array:
        """(x @ A) (..., r) -> the delta (..., out)."""
        return matmul(xa.astype(self.dtype), self.B[...].astype(self.dtype)) * self.scale


def _modulation_head(c: int, out: int, cfg: LLMConfig, rngs: nnx.Rngs) -> MLP:
    """Linear(C, C), SiLU, Linear(C, out) with the last layer zero: starts as a no-op."""
    head = MLP([c, c, out], cfg, rngs)
    last = head.layers[-1]
    last.kernel[...] = jnp.zeros_like(last.kernel[...])
    return head


PROJ_NAMES = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base_projection(layer, name: str) -> Linear:
    return getattr(layer.self_attn if name in ("q_proj", "o_proj") else layer.mlp, name)


class FlowLayer(nnx.Module):
    """Per-layer flow parameters: the modulation head and the flow projections."""

    def __init__(self, s: L2DSettings, cfg: LLMConfig, rngs: nnx.Rngs, base_layer=None):
        h, c = cfg.hidden_size, s.cond_dim(cfg.hidden_size)
        k = 6 if s.full_dit_modulation else 2
        self.modulation = _modulation_head(c, k * h, cfg, rngs)
        shapes = {"q_proj": (h, cfg.num_heads * cfg.head_dim), "o_proj": (cfg.num_heads * cfg.head_dim, h),
                  "gate_proj": (h, cfg.intermediate_size), "up_proj": (h, cfg.intermediate_size),
                  "down_proj": (cfg.intermediate_size, h)}
        for name in PROJ_NAMES:
            din, dout = shapes[name]
            if not s.separate_flow_params:
                proj = None
            elif s.use_lora:
                proj = LoRA(din, dout, s.flow_lora_rank, s.lora_scale, cfg, rngs)
            else:
                bias = name == "q_proj" and cfg.attention_bias
                proj = Linear(din, dout, ("flow_in", "flow_out"), bias=bias, cfg=cfg, rngs=rngs)
                if s.reinit_flow_params or base_layer is None:
                    pd = proj.kernel[...].dtype
                    proj.kernel[...] = torch_default_uniform(rngs.params(), (din, dout), pd, din)
                    if bias:
                        proj.bias[...] = torch_default_uniform(rngs.params(), (dout,), pd, din)
                else:
                    src = _base_projection(base_layer, name)
                    proj.kernel[...] = src.kernel[...].astype(proj.kernel[...].dtype)
                    if bias:
                        proj.bias[...] = src.bias[...].astype(proj.bias[...].dtype)
            setattr(self, name, nnx.data(proj))

    def project(self, base_layer, names: Sequence[str], x: jax.Array) -> list[jax.Array]:
        """The flow stream's projections ``names`` of one input x (..., in): base, full copy,
        or base + LoRA each; every weight that reads x (kernels, LoRA A's) in one call."""
        projs = [getattr(self, name) for name in names]
        lins = [p if isinstance(p, Linear) else _base_projection(base_layer, n) for n, p in zip(names, projs)]
        loras = [p for p in projs if isinstance(p, LoRA)]
        ys = linears(x, lins, [p.A[...] for p in loras])
        xa = iter(ys[len(lins):])
        return [y + p.delta(next(xa)) if isinstance(p, LoRA) else y for p, y in zip(projs, ys)]


class FlowPath(nnx.Module):
    """Every trainable parameter of L2D (spec sections 1, 3, 4, 5, 6, 7)."""

    def __init__(self, s: L2DSettings, cfg: LLMConfig, rngs: nnx.Rngs, base: LLM | None = None):
        h, d, c = cfg.hidden_size, s.flow_dim(cfg.hidden_size), s.cond_dim(cfg.hidden_size)
        pd = jnp.dtype(cfg.param_dtype)
        token_embedder, one_hot = None, None
        if s.flow_representation_space == "mapping":
            token_embedder = MLP([h] + [d] * s.flow_representation_num_layers, cfg, rngs)
        elif s.flow_representation_space == "one-hot":
            one_hot = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, d), pd),
                                axes=("vocab", "flow_out"))
        self.token_embedder = nnx.data(token_embedder)
        self.one_hot_table = nnx.data(one_hot)
        f_dims = [s.timestep_modulation_freq_embedding_size] + [c] * s.timestep_modulation_num_layers
        self.timestep_embedder = MLP(f_dims, cfg, rngs)
        first, last = self.timestep_embedder.layers[0], self.timestep_embedder.layers[-1]
        first.kernel[...] = 0.02 * jax.random.normal(rngs.params(), first.kernel[...].shape, pd)
        last.kernel[...] = 0.02 * jax.random.normal(rngs.params(), last.kernel[...].shape, pd)
        depth = s.flow_to_lm_depth
        hid = s.flow_to_lm_hidden(h)
        self.flow_to_lm = nnx.data(MLP([d] + [hid] * (depth - 1) + [h], cfg, rngs) if depth > 0 else None)
        self.label_embedder = nnx.data(nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (s.guidance_modulation_num_classes + 1, c), pd),
            axes=("classes", "flow_out")) if s.use_guidance else None)
        base_layers = base.layers if base is not None else [None] * cfg.num_layers
        self.layers = nnx.List([FlowLayer(s, cfg, rngs, bl) for bl in base_layers])
        self.final_head = _modulation_head(c, h, cfg, rngs)


class FlowModulation(NamedTuple):
    """Everything the flow stream takes from (t, class), broadcasting against (B, T, H):
    ``layers`` (L, F, ..., H) stacks per layer the ``Modulation`` fields it has (norm1, norm2
    and, with full DiT modulation, shift1, scale1, shift2, scale2), one array that a
    generation step reads in one piece; ``final`` (..., H) is the final scale r."""

    layers: jax.Array
    final: jax.Array

    def layer(self, i: int) -> Modulation:
        return Modulation(*self.layers[i])


class Conditioning(NamedTuple):
    """Conditioning vectors c_t and c_0 (B, T, C) in the compute dtype; c_0 None if unused."""

    c_t: jax.Array
    c_0: jax.Array | None


class L2DModel(nnx.Module):
    """Frozen base LLM + L2D flow path."""

    def __init__(self, base: LLM, settings: L2DSettings, *, rngs: nnx.Rngs):
        settings.validate(hidden_size=base.cfg.hidden_size)
        self.settings = settings
        self.cfg = base.cfg
        self.base = base
        self.flow = FlowPath(settings, base.cfg, rngs, base)

    # ------------------------------------------------------------------ token -> flow space

    def flow_representation(self, ids: jax.Array) -> jax.Array:
        """phi(ids): (...,) int -> (..., D) in the compute dtype (spec section 1)."""
        s, flow = self.settings, self.flow
        if s.flow_representation_space == "one-hot":
            x = jnp.take(flow.one_hot_table[...], ids, axis=0).astype(jnp.dtype(self.cfg.dtype))
        else:
            x = self.base.embed(ids)
            if flow.token_embedder is not None:
                x = flow.token_embedder(x)
        if s.flow_representation_normalize:
            x = diffusion.normalize_flow(x, s.flow_representation_rescaling or "none")
        return x

    def flow_table(self) -> jax.Array:
        """Phi: the whole vocabulary in flow space, (V, D) float32. Compute once per call."""
        return self.flow_representation(jnp.arange(self.cfg.vocab_size)).astype(jnp.float32)

    # ------------------------------------------------------------------ conditioning

    def conditioning(self, t: jax.Array, class_labels: jax.Array | None) -> Conditioning:
        """c_t (and c_0 when needed) from per-token t (B, T) and class labels (B, T) or None."""
        s, flow = self.settings, self.flow
        dt = jnp.dtype(self.cfg.dtype)
        need_c0 = s.subtract_flow_start
        ts = jnp.stack([t, jnp.zeros_like(t)]) if need_c0 else t[None]
        emb = diffusion.timestep_frequency_embedding(ts, s.timestep_modulation_freq_embedding_size)
        c = flow.timestep_embedder(emb).astype(dt)
        if s.use_guidance:
            labels = (jnp.full(t.shape, s.guidance_modulation_num_classes, jnp.int32)
                      if class_labels is None else class_labels)
            c = c + jnp.take(flow.label_embedder[...], labels, axis=0).astype(dt)[None]
        return Conditioning(c[0], c[1] if need_c0 else None)

    def _chunks(self, head: MLP, cond: Conditioning, n: int) -> tuple[list, list | None]:
        """A modulation head on c_t (and c_0), split into n chunks each.

        The hidden layer runs once on stack([c_t, c_0]); the last layer runs separately on
        each half, as the original's two calls do: identical rows give identical z(t) and
        z(0) where t = 0, and the last bias's gradient, +g and -g summed separately, cancels
        to exactly 0 where the difference is taken.
        """
        both = cond.c_t[None] if cond.c_0 is None else jnp.stack([cond.c_t, cond.c_0])
        hidden = jax.nn.silu(head.layers[0](both))
        last = head.layers[1]
        zt = jnp.split(last(hidden[0]), n, axis=-1)
        z0 = None if cond.c_0 is None else jnp.split(last(hidden[1]), n, axis=-1)
        return zt, z0

    def layer_modulation(self, i: int, cond: Conditioning) -> Modulation:
        """The flow stream's effective norm weights, shifts and scales for layer i (spec 5)."""
        s, layer = self.settings, self.base.layers[i]
        n = 6 if s.full_dit_modulation else 2
        freeze = s.freeze_modulation_at_flow_start
        # z(0) of the per-layer heads matters only under freeze (the final head always uses c_0)
        zt, z0 = self._chunks(self.flow.layers[i].modulation, cond if freeze else cond._replace(c_0=None), n)
        g1, g2 = layer.input_layernorm.weight[...], layer.post_attention_layernorm.weight[...]
        if s.full_dit_modulation:
            w1, sh1, sc1, w2, sh2, sc2 = zt
        else:
            (w1, w2), sh1 = zt, None
        norm1 = g1.astype(w1.dtype) + w1
        norm2 = g2.astype(w2.dtype) + w2
        if freeze:
            norm1, norm2 = norm1 - z0[0], norm2 - z0[3 if s.full_dit_modulation else 1]
        if not s.full_dit_modulation:
            return Modulation(norm1, norm2)
        if freeze:
            sh1, sh2 = sh1 - z0[1], sh2 - z0[4]
            sc1, sc2 = (1.0 + sc1) - z0[2], (1.0 + sc2) - z0[5]
        return Modulation(norm1, norm2, sh1, sc1, sh2, sc2)

    def final_scale(self, cond: Conditioning) -> jax.Array:
        """r = M_f(c_t) - M_f(c_0) (or M_f(c_t)): (B, T, H)."""
        (rt,), r0 = self._chunks(self.flow.final_head, cond, 1)
        return rt if r0 is None else rt - r0[0]

    def flow_modulation(self, t: jax.Array, class_labels: jax.Array | None = None) -> FlowModulation:
        """Per-layer modulations and the final scale for per-token t (B, T) and class
        labels (B, T) or None. Depends on nothing else, so generation can tabulate it."""
        cond = self.conditioning(t, class_labels)
        fields = [[x for x in self.layer_modulation(i, cond) if x is not None] for i in range(self.cfg.num_layers)]
        return FlowModulation(jnp.stack([jnp.stack(jnp.broadcast_arrays(*f)) for f in fields]),
                              self.final_scale(cond))

    # ------------------------------------------------------------------ flow stream

    def flow_input(self, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """g(x_t): (B, T, D) -> (B, T, H) with the optional timestep rescaling (spec 4)."""
        s = self.settings
        dt = jnp.dtype(self.cfg.dtype)
        x = x_t.astype(dt)
        c = s.flow_to_lm_timestep_rescaling
        if c:
            in_dtype = x.dtype
            if s.flow_to_lm_rescale_in_float32:
                x = x.astype(jnp.float32)
            d = x.shape[-1]
            v1 = {"mult": 1.0, "div": 1.0 / d ** 2}.get(s.flow_representation_rescaling, 1.0 / d)
            tt = t.astype(jnp.float32)[..., None]
            std = jnp.sqrt(jnp.square(1 - tt) * s.noise_rescaling ** 2 + jnp.square(tt) * v1)
            x = x / std.astype(x.dtype) * c
            x = x.astype(in_dtype)
        return x if self.flow.flow_to_lm is None else self.flow.flow_to_lm(x)

    def flow_layer(self, i: int, f: jax.Array, kv: dict | tuple[jax.Array, jax.Array], mask: jax.Array,
                   rope, mod: Modulation) -> jax.Array:
        """One layer of the flow stream. f (B, T, H); kv: the main stream's keys/values, the
        stacked cache or this layer's (k, v) (``llm.attend_kv``)."""
        cfg, base_layer, flow_layer = self.cfg, self.base.layers[i], self.flow.layers[i]
        b, t, _ = f.shape
        a = base_layer.input_layernorm(f, mod.norm1)
        a = a if mod.shift1 is None else a + mod.shift1
        (q,) = flow_layer.project(base_layer, ["q_proj"], a)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), *rope)
        (o,) = flow_layer.project(base_layer, ["o_proj"], attend_kv(q, kv, i, mask))
        f = f + (o if mod.scale1 is None else mod.scale1 * o)
        x = base_layer.post_attention_layernorm(f, mod.norm2)
        x = x if mod.shift2 is None else x + mod.shift2
        gate, up = flow_layer.project(base_layer, ["gate_proj", "up_proj"], x)
        (m,) = flow_layer.project(base_layer, ["down_proj"], jax.nn.silu(gate) * up)  # SwiGLU
        return f + (m if mod.scale2 is None else mod.scale2 * m)

    def flow_decoder_layer(self, i: int) -> cpu_decoder.Layer:
        """The projections of layer i of the flow stream as ``cpu_decoder`` runs them (those
        ``flow_layer`` uses)."""
        base_layer, flow_layer = self.base.layers[i], self.flow.layers[i]

        def proj(name: str) -> cpu_decoder.Projection:
            own, base = getattr(flow_layer, name), _base_projection(base_layer, name)
            lin = own if isinstance(own, Linear) else base
            bias = None if lin.bias is None else lin.bias[...]
            if isinstance(own, LoRA):
                return cpu_decoder.Projection(lin.kernel[...], bias, own.A[...], own.B[...])
            return cpu_decoder.Projection(lin.kernel[...], bias)

        return cpu_decoder.Layer(proj("q_proj"), None, None, proj("o_proj"), proj("gate_proj"), proj("up_proj"),
                                 proj("down_proj"))

    # ------------------------------------------------------------------ entry points

    def __call__(self, input_ids: jax.Array, t: jax.Array | float | None = None,
                 x_t: jax.Array | None = None, positions: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None, class_labels: jax.Array | None = None,
                 cache: dict | None = None, cache_index: jax.Array | int = 0,
                 kv_valid: jax.Array | None = None) -> LLMOutput:
        """Main and flow streams together.

        input_ids (B, T); t scalar, (B,) or (B, T); x_t (B, T, D) the noisy flow input (None:
        base model only); class_labels (B,) or (B, T) (guidance; None = null class).
        Returns logits (B, T, V) float32, the main stream's h_L (B, T, H) and the cache.
        """
        if x_t is None:
            return self.base(input_ids, positions, attention_mask=attention_mask, cache=cache,
                             cache_index=cache_index, kv_valid=kv_valid)
        s, base = self.settings, self.base
        b, n = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(n), (b, n))
        t = broadcast_t(t, b, n)
        class_labels = broadcast_labels(class_labels, b, n)
        mask = base.mask(n, attention_mask=attention_mask, cache=cache, cache_index=cache_index,
                         kv_valid=kv_valid)
        rope = base.rope(positions)
        cond = self.conditioning(t, class_labels)
        h, f = base.embed(input_ids), self.flow_input(x_t, t)
        for i, layer in enumerate(base.layers):
            mod = self.layer_modulation(i, cond)
            h, cache, kv = layer(h, rope, mask, cache, i, cache_index,
                                 mod if s.modulate_hidden_states else None)
            f = self.flow_layer(i, f, kv, mask, rope, mod)
        logits = base.head(h + self.final_scale(cond) * f)
        return LLMOutput(logits, h, cache)

    def flow_only(self, h_last: jax.Array, cache: dict, x_t: jax.Array, t: jax.Array | float,
                  positions: jax.Array, cache_index: jax.Array | int, kv_valid: jax.Array,
                  class_labels: jax.Array | None = None,
                  modulation: FlowModulation | None = None) -> jax.Array:
        """Flow stream only, for T new positions whose main stream is already in the cache.

        h_last (B, T, H): cached main-stream h_L at those positions; cache: the main K/V
        (L, B, Hkv, S, hd); x_t (B, T, D); positions (B, T); cache_index: slot of the first
        of them; kv_valid (B, S); modulation: ``flow_modulation(t, class_labels)`` when the
        caller already has it (then class_labels is unused). Returns logits (B, T, V) float32.
        """
        b, n, _ = x_t.shape
        t = broadcast_t(t, b, n)
        if modulation is None:
            modulation = self.flow_modulation(t, broadcast_labels(class_labels, b, n))
        mask = self.base.mask(n, cache=cache, cache_index=cache_index, kv_valid=kv_valid)
        rope = self.base.rope(positions)
        f = self.flow_input(x_t, t)
        stack = [self.flow_decoder_layer(i) for i in range(self.cfg.num_layers)] if n == 1 else None
        mods = modulation.layers
        rows = mods.reshape(mods.shape[:2] + (-1, mods.shape[-1])) if stack else None  # (L, F, 1 or B, H)
        if stack and rows.shape[2] in (1, b) and cpu_decoder.usable(f[:, 0], cache, stack, rows):
            # one new position per sequence: the whole stack in one custom call
            f, _ = cpu_decoder.run(f[:, 0], rope[0][:, 0], rope[1][:, 0], mask[:, 0], cache_index, cache, stack,
                                   rows, num_heads=self.cfg.num_heads, eps=self.cfg.rms_norm_eps,
                                   lora_scale=self.settings.lora_scale, write_kv=False)
            f = f[:, None]
        else:
            for i in range(self.cfg.num_layers):
                f = self.flow_layer(i, f, cache, mask, rope, modulation.layer(i))
        return self.base.head(h_last + modulation.final * f)


def broadcast_t(t, b: int, n: int) -> jax.Array:
    """A scalar, (B,), (B, 1) or (B, T) t -> (B, T) float32."""
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 1:
        t = t[:, None]
    return jnp.broadcast_to(t, (b, n))


def broadcast_labels(labels, b: int, n: int) -> jax.Array | None:
    """(B,) or (B, T) class labels -> (B, T) int32; None stays None."""
    if labels is None:
        return None
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim == 1:
        labels = labels[:, None]
    return jnp.broadcast_to(labels, (b, n))


def init_l2d(base: LLM, settings: L2DSettings, seed: int = 0) -> L2DModel:
    """The flow path initialised as the spec says (section 7) beside ``base``, in one jit."""
    settings.validate(hidden_size=base.cfg.hidden_size)
    return nnx.jit(lambda b: L2DModel(b, settings, rngs=nnx.Rngs(seed)))(base)
