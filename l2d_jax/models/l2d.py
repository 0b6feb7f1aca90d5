"""The L2D diffusion (flow) path beside a frozen Flax LLM.

``L2DModel`` holds two halves, ``base`` (the frozen ``LLM``) and ``flow`` (every new,
trainable parameter), so ``nnx.split(model, FLOW, ...)`` gives the trainable pytree.

Per layer l the main stream h runs the unchanged base layer; the flow stream f runs the
same layer shape with the base norms (weights shifted by the modulation), its own query /
output / MLP projections (base, full copies or base + LoRA) and attention over the MAIN
stream's keys and values of layer l. The final hidden state is ``h_L + r(t) * f_L``. Both
streams are ``block.decoder_block``, scanned together over the stacked layers (``flow.layers``
is one ``FlowLayer`` with a leading layer axis, like ``base.layers``).

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
from l2d_jax.kernels.backend import XLA, Kernels
from l2d_jax.models.block import BlockWeights, Modulation, Projection, decoder_block, project, scan_layers
from l2d_jax.models.llm import LLM, DecoderLayer, Linear, LLMConfig, LLMOutput, layer_slices, stack_modules
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

    def __call__(self, x: jax.Array, kernel: bool = False) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x, kernel) if i == 0 else layer(jax.nn.silu(x), kernel)
        return x

    def projections(self) -> list[Projection]:
        return [lin.projection() for lin in self.layers]


class LoRA(nnx.Module):
    """Low-rank delta (x @ A @ B) * alpha / r beside a frozen base projection (applied by
    ``block.project``; alpha / r is ``L2DSettings.lora_scale``)."""

    def __init__(self, din: int, dout: int, rank: int, cfg: LLMConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.A = nnx.Param(jax.random.normal(rngs.params(), (din, rank), pd) / rank, axes=("flow_in", "lora"))
        self.B = nnx.Param(jnp.zeros((rank, dout), pd), axes=("lora", "flow_out"))


def _modulation_head(c: int, out: int, cfg: LLMConfig, rngs: nnx.Rngs) -> MLP:
    """Linear(C, C), SiLU, Linear(C, out) with the last layer zero: starts as a no-op."""
    head = MLP([c, c, out], cfg, rngs)
    last = head.layers[-1]
    last.kernel[...] = jnp.zeros_like(last.kernel[...])
    return head


PROJ_NAMES = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base_projection(layer: DecoderLayer, name: str) -> Linear:
    return getattr(layer.self_attn if name in ("q_proj", "o_proj") else layer.mlp, name)


class FlowLayer(nnx.Module):
    """Per-layer flow parameters: the modulation head and the flow projections (None: the
    base layer's). ``FlowPath.layers`` is one of these stacked over the layers."""

    def __init__(self, s: L2DSettings, cfg: LLMConfig, rngs: nnx.Rngs, copy_base: bool = False):
        """``copy_base``: full flow copies will be set to the base weights (by ``FlowPath``)
        instead of drawn from torch's default init."""
        h, c = cfg.hidden_size, s.cond_dim(cfg.hidden_size)
        k = 6 if s.full_dit_modulation else 2
        self.modulation = _modulation_head(c, k * h, cfg, rngs)
        shapes = {"q_proj": (h, cfg.num_heads * cfg.head_dim), "o_proj": (cfg.num_heads * cfg.head_dim, h),
                  "gate_proj": (h, cfg.intermediate_size), "up_proj": (h, cfg.intermediate_size),
                  "down_proj": (cfg.intermediate_size, h)}
        # full copies are as large as the base projections: sharded like them
        axes = {"q_proj": ("embed", "heads"), "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"),
                "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed")}
        for name in PROJ_NAMES:
            din, dout = shapes[name]
            if not s.separate_flow_params:
                proj = None
            elif s.use_lora:
                proj = LoRA(din, dout, s.flow_lora_rank, cfg, rngs)
            else:
                bias = name == "q_proj" and cfg.attention_bias
                proj = Linear(din, dout, axes[name], bias=bias, cfg=cfg, rngs=rngs)
                if s.reinit_flow_params or not copy_base:
                    pd = proj.kernel[...].dtype
                    proj.kernel[...] = torch_default_uniform(rngs.params(), (din, dout), pd, din)
                    if bias:
                        proj.bias[...] = torch_default_uniform(rngs.params(), (dout,), pd, din)
            setattr(self, name, nnx.data(proj))

    def weights(self, base: DecoderLayer) -> BlockWeights:
        """The flow stream's projections beside base layer(s) ``base`` (stacked or not): own
        full copies, base + LoRA, or the base's; no k / v (it reads the main stream's)."""
        def proj(name: str) -> Projection:
            own, shared = getattr(self, name), _base_projection(base, name).projection()
            if isinstance(own, Linear):
                return own.projection()
            return shared._replace(a=own.A[...], b=own.B[...]) if isinstance(own, LoRA) else shared

        q_norm = base.self_attn.q_norm
        return BlockWeights(proj("q_proj"), None, None, proj("o_proj"), proj("gate_proj"), proj("up_proj"),
                            proj("down_proj"), None if q_norm is None else q_norm.weight[...])

    def copy_from(self, base: DecoderLayer) -> None:
        """Sets the full flow copies (``Linear``) to the base layer's weights."""
        for name in PROJ_NAMES:
            own = getattr(self, name)
            if isinstance(own, Linear):
                src = _base_projection(base, name)
                own.kernel[...] = src.kernel[...].astype(own.kernel[...].dtype)
                if own.bias is not None:
                    own.bias[...] = src.bias[...].astype(own.bias[...].dtype)


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
        copy_base = base is not None and not s.reinit_flow_params
        self.layers = stack_modules([FlowLayer(s, cfg, rngs, copy_base) for _ in range(cfg.num_layers)])
        if copy_base:
            self.layers.copy_from(base.layers)
        self.final_head = _modulation_head(c, h, cfg, rngs)


class FlowModulation(NamedTuple):
    """Everything the flow stream takes from (t, class), broadcasting against (B, T, H):
    ``layers`` (L, F, ..., H) stacks per layer the ``Modulation`` fields it has (norm1, norm2
    and, with full DiT modulation, shift1, scale1, shift2, scale2), one array that a
    generation step reads in one piece; ``final`` (..., H) is the final scale r."""

    layers: jax.Array
    final: jax.Array


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

    def flow_representation(self, ids: jax.Array, kernels: Kernels = XLA) -> jax.Array:
        """phi(ids): (...,) int -> (..., D) in the compute dtype (spec section 1)."""
        s, flow = self.settings, self.flow
        if s.flow_representation_space == "one-hot":
            x = jnp.take(flow.one_hot_table[...], ids, axis=0).astype(jnp.dtype(self.cfg.dtype))
        else:
            x = self.base.embed(ids)
            if flow.token_embedder is not None:
                x = flow.token_embedder(x, kernels.matvec)
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

    def _chunks(self, head: Sequence[Projection], cond: Conditioning, n: int) -> tuple[list, list | None]:
        """A modulation head (Linear, SiLU, Linear: ``MLP.projections()``) on c_t (and c_0),
        split into n chunks each.

        The hidden layer runs once on stack([c_t, c_0]); the last layer runs separately on
        each half, as the original's two calls do: identical rows give identical z(t) and
        z(0) where t = 0, and the last bias's gradient, +g and -g summed separately, cancels
        to exactly 0 where the difference is taken.
        """
        dt = jnp.dtype(self.cfg.dtype)
        both = cond.c_t[None] if cond.c_0 is None else jnp.stack([cond.c_t, cond.c_0])
        hidden = jax.nn.silu(project(both, head[:1], dt)[0])
        zt = jnp.split(project(hidden[0], head[1:], dt)[0], n, axis=-1)
        z0 = None if cond.c_0 is None else jnp.split(project(hidden[1], head[1:], dt)[0], n, axis=-1)
        return zt, z0

    def layer_modulation(self, head: Sequence[Projection], norms: Modulation, cond: Conditioning) -> Modulation:
        """The flow stream's effective norm weights, shifts and scales of one layer (spec 5)
        from its modulation head and the base layer's norm weights ``norms``."""
        s = self.settings
        n = 6 if s.full_dit_modulation else 2
        freeze = s.freeze_modulation_at_flow_start
        # z(0) of the per-layer heads matters only under freeze (the final head always uses c_0)
        zt, z0 = self._chunks(head, cond if freeze else cond._replace(c_0=None), n)
        g1, g2 = norms.norm1, norms.norm2
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
        (rt,), r0 = self._chunks(self.flow.final_head.projections(), cond, 1)
        return rt if r0 is None else rt - r0[0]

    def flow_modulation(self, t: jax.Array, class_labels: jax.Array | None = None) -> FlowModulation:
        """Per-layer modulations and the final scale for per-token t (B, T) and class
        labels (B, T) or None. Depends on nothing else, so generation can tabulate it."""
        cond = self.conditioning(t, class_labels)

        def one(xs):
            fields = [x for x in self.layer_modulation(*xs, cond) if x is not None]
            return jnp.stack(jnp.broadcast_arrays(*fields))

        layers = jax.lax.map(one, (self.flow.layers.modulation.projections(), self.base.layers.norms()))
        return FlowModulation(layers, self.final_scale(cond))

    # ------------------------------------------------------------------ flow stream

    def flow_input(self, x_t: jax.Array, t: jax.Array, kernels: Kernels = XLA) -> jax.Array:
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
        return x if self.flow.flow_to_lm is None else self.flow.flow_to_lm(x, kernels.matvec)

    def flow_weights(self) -> BlockWeights:
        """The flow stream's stacked projections (L, ...) (``FlowLayer.weights``)."""
        return self.flow.layers.weights(self.base.layers)

    # ------------------------------------------------------------------ entry points

    def __call__(self, input_ids: jax.Array, t: jax.Array | float | None = None,
                 x_t: jax.Array | None = None, positions: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None, class_labels: jax.Array | None = None,
                 cache: dict | None = None, cache_index: jax.Array | int = 0,
                 kv_valid: jax.Array | None = None, kernels: Kernels = XLA, remat: str = "none") -> LLMOutput:
        """Main and flow streams together, one scan over the layers.

        input_ids (B, T); t scalar, (B,) or (B, T); x_t (B, T, D) the noisy flow input (None:
        base model only); class_labels (B,) or (B, T) (guidance; None = null class);
        remat: the scanned block's rematerialisation policy (``block.REMAT_POLICIES``).
        Returns logits (B, T, V) float32, the main stream's h_L (B, T, H) and the cache.
        """
        if x_t is None:
            return self.base(input_ids, positions, attention_mask=attention_mask, cache=cache,
                             cache_index=cache_index, kv_valid=kv_valid, kernels=kernels, remat=remat)
        s, base, cfg = self.settings, self.base, self.cfg
        b, n = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(n), (b, n))
        t = broadcast_t(t, b, n)
        class_labels = broadcast_labels(class_labels, b, n)
        mask = base.mask(n, attention_mask=attention_mask, cache=cache, cache_index=cache_index,
                         kv_valid=kv_valid)
        rope = base.rope(positions)
        cond = self.conditioning(t, class_labels)
        h, f = base.embed(input_ids), self.flow_input(x_t, t, kernels)

        base_stack, base_of = layer_slices(base.layers)
        flow_stack, flow_of = layer_slices(self.flow.layers)

        def body(carry, xs):
            h, f, cache = carry
            base_state, flow_state, i = xs
            base_layer, flow_layer = base_of(base_state), flow_of(flow_state)
            norms = base_layer.norms()
            mod = self.layer_modulation(flow_layer.modulation.projections(), norms, cond)
            h, kv = decoder_block(h, base_layer.weights(), mod if s.modulate_hidden_states else norms, rope, mask,
                                  cfg=cfg, kv=cache, layer=i, cache_index=cache_index, kernels=kernels)
            f, _ = decoder_block(f, flow_layer.weights(base_layer), mod, rope, mask, cfg=cfg, kv=kv, layer=i,
                                 lora_scale=s.lora_scale, kernels=kernels)
            return (h, f, None if cache is None else kv), None

        xs = (base_stack, flow_stack, jnp.arange(cfg.num_layers))
        (h, f, cache), _ = scan_layers(body, (h, f, cache), xs, remat)
        logits = base.head(h + self.final_scale(cond) * f, kernels)
        return LLMOutput(logits, h, cache)

    def flow_only(self, h_last: jax.Array, cache: dict, x_t: jax.Array, t: jax.Array | float,
                  positions: jax.Array, cache_index: jax.Array | int, kv_valid: jax.Array,
                  class_labels: jax.Array | None = None,
                  modulation: FlowModulation | None = None, kernels: Kernels = XLA) -> jax.Array:
        """Flow stream only, for T new positions whose main stream is already in the cache.

        h_last (B, T, H): cached main-stream h_L at those positions; cache: the main K/V
        (L, B, Hkv, S, hd); x_t (B, T, D); positions (B, T); cache_index: slot of the first
        of them; kv_valid (B, S); modulation: ``flow_modulation(t, class_labels)`` when the
        caller already has it (then class_labels is unused). Returns logits (B, T, V) float32.
        """
        b, n, _ = x_t.shape
        cfg = self.cfg
        t = broadcast_t(t, b, n)
        if modulation is None:
            modulation = self.flow_modulation(t, broadcast_labels(class_labels, b, n))
        mask = self.base.mask(n, cache=cache, cache_index=cache_index, kv_valid=kv_valid)
        rope = self.base.rope(positions)
        f = self.flow_input(x_t, t, kernels)
        mods = modulation.layers
        out = self._kernel_flow(f[:, 0], rope, mask[:, 0], cache, cache_index, mods) \
            if n == 1 and kernels.decoder else None
        if out is not None:
            f = out[:, None]
        else:
            base_stack, base_of = layer_slices(self.base.layers)
            flow_stack, flow_of = layer_slices(self.flow.layers)

            def body(f, xs):
                base_state, flow_state, mod, i = xs
                w = flow_of(flow_state).weights(base_of(base_state))
                f, _ = decoder_block(f, w, Modulation(*mod), rope, mask, cfg=cfg, kv=cache, layer=i,
                                     lora_scale=self.settings.lora_scale, kernels=kernels)
                return f, None

            f, _ = scan_layers(body, f, (base_stack, flow_stack, mods, jnp.arange(cfg.num_layers)))
        return self.base.head(h_last + modulation.final * f, kernels)

    def _kernel_flow(self, f, rope, mask, cache, cache_index, mods) -> jax.Array | None:
        """One new position per sequence, f (B, H), through the whole flow stack in one
        ``cpu_decoder`` call reading the main stream's cache; None where it does not apply.
        mods: the stacked modulation (L, F, ..., H)."""
        b = f.shape[0]
        rows = mods.reshape(mods.shape[:2] + (-1, mods.shape[-1]))  # (L, F, 1 or B, H)
        weights = self.flow_weights()
        if rows.shape[2] not in (1, b) or not cpu_decoder.usable(f, cache, weights, rows):
            return None
        out, _ = cpu_decoder.run(f, rope[0][:, 0], rope[1][:, 0], mask, cache_index, cache, weights, rows,
                                 num_heads=self.cfg.num_heads, eps=self.cfg.rms_norm_eps,
                                 lora_scale=self.settings.lora_scale, write_kv=False)
        return out


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


def abstract_l2d(cfg: LLMConfig, settings: L2DSettings) -> L2DModel:
    """An L2DModel with abstract (ShapeDtypeStruct) parameters, built without memory."""
    return nnx.eval_shape(lambda: L2DModel(LLM(cfg, rngs=nnx.Rngs(0)), settings, rngs=nnx.Rngs(0)))
