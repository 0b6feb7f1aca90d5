"""Optimizer of L2D training: AdamW (decoupled), global-norm clipping and the LR schedules.

As in the original (``pipeline/util.py`` + DeepSpeed, spec section 9):

- AdamW with betas (0.9, 0.95), eps 1e-8, decoupled weight decay 0.01 applied to every
  trainable parameter whose ORIGINAL name contains ``bias``, ``ln`` or ``LayerNorm`` NOT
  (among L2D's trainable parameters that is exactly the biases); ``decay_mask`` maps our
  parameter paths to the original names through ``l2d_jax.convert.original_names.original_names``.
- Gradients clipped to a global L2 norm of ``grad_clip`` (1.0) before the update, the way
  ``torch.nn.utils.clip_grad_norm_`` does it: scale ``min(1, max_norm / (norm + 1e-6))``.
- Schedules, as functions of optax's update count ``c`` (0 for the first update, so
  optimizer update k (1-based) has c = k - 1). The original's schedulers are stepped after
  every optimizer step and are constructed before the first one, which shifts them:

  ``warmup_decay`` (DeepSpeed ``WarmupDecayLR``, logarithmic warmup; W = max(2, n_warmup),
  S = total optimizer steps): the first update uses min_lr (the scheduler's state before its
  first step); update k >= 2 uses scheduler step s = k - 2::

      lr(s) = min_lr + (peak_lr - min_lr) * ln(s + 1) / ln(W)                  s < W
      lr(s) = min_lr + (peak_lr - min_lr) * max(0, (S - s) / max(1, S - W))    s >= W

  ``warmup_linear`` (torch ``LambdaLR``; its constructor already applies step 0, so update k
  uses s = k - 1; min_lr is not used, as in the original)::

      lr(s) = peak_lr * s / max(1, W)                              s < W  (W = n_warmup)
      lr(s) = peak_lr * max(0, (S - s) / max(1, S - W))            s >= W

  ``warmup_cosine`` (DeepSpeed ``WarmupCosineLR``, log warmup, W = max(2, n_warmup); the
  first update uses lr 0, the value it sets before its first step; update k >= 2 uses
  s = k - 2; r0 = min_lr / peak_lr, rc = ``cosine_min_ratio`` (0.1))::

      lr(s) = peak_lr * (r0 + (1 - r0) * ln(s + 1) / ln(W))                            s < W
      lr(s) = peak_lr * max(0, rc + (1 - rc) * (1 + cos(pi * (s - W + 1) / (S - W))) / 2)  s >= W
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from l2d_jax.errors import UsageError

SCHEDULES = ("warmup_decay", "warmup_linear", "warmup_cosine")
NO_DECAY_SUBSTRINGS = ("bias", "ln", "LayerNorm")  # the original's no_decay list


# --------------------------------------------------------------------------- schedules


def make_schedule(scheduler_type: str, *, peak_lr: float, min_lr: float, n_warmup_steps: int,
                  total_steps: int, cosine_min_ratio: float = 0.1) -> Callable[[Any], jax.Array]:
    """lr as a function of optax's update count (0-based; jnp or python ints). See module doc."""
    if scheduler_type not in SCHEDULES:
        raise UsageError(f"scheduler_type must be one of {SCHEDULES}, got {scheduler_type!r}")
    if total_steps < 1:
        raise UsageError(f"the schedule needs total_steps >= 1, got {total_steps}")
    peak, low, total = float(peak_lr), float(min_lr), int(total_steps)

    if scheduler_type == "warmup_linear":
        w = int(n_warmup_steps)

        def linear(count):
            s = jnp.asarray(count, jnp.float32)
            warm = s / max(1, w)
            decay = jnp.maximum(0.0, (total - s) / max(1, total - w))
            return peak * jnp.where(s < w, warm, decay)

        return linear

    w = max(2, int(n_warmup_steps))
    inv_log_w = 1.0 / math.log(w)

    if scheduler_type == "warmup_decay":
        def decay(count):
            s = jnp.asarray(count, jnp.float32) - 1.0
            warm = inv_log_w * jnp.log(jnp.maximum(s, 0.0) + 1.0)
            lin = jnp.maximum(0.0, (total - s) / max(1, total - w))
            gamma = jnp.where(s < w, warm, lin)
            return jnp.where(s < 0, low, low + (peak - low) * gamma)

        return decay

    r0, rc = low / peak if peak else 0.0, float(cosine_min_ratio)

    def cosine(count):
        s = jnp.asarray(count, jnp.float32) - 1.0
        warm = r0 + (1.0 - r0) * inv_log_w * jnp.log(jnp.maximum(s, 0.0) + 1.0)
        cos = (1.0 + jnp.cos(math.pi * (s - w + 1.0) / max(1, total - w))) / 2.0
        after = jnp.maximum(0.0, rc + (1.0 - rc) * cos)
        return jnp.where(s < 0, 0.0, peak * jnp.where(s < w, warm, after))

    return cosine


def schedule_from_config(cfg: Mapping, total_steps: int) -> Callable[[Any], jax.Array]:
    """``make_schedule`` with the config keys of the original (scheduler_type, peak_lr, ...)."""
    return make_schedule(cfg.get("scheduler_type", "warmup_decay"), peak_lr=cfg["peak_lr"],
                         min_lr=cfg.get("min_lr", 1e-6), n_warmup_steps=cfg.get("n_warmup_steps", 0),
                         total_steps=total_steps, cosine_min_ratio=cfg.get("cosine_min_ratio", 0.1))


# --------------------------------------------------------------------------- clipping


class ClipState(NamedTuple):
    """Empty state (clipping is stateless)."""


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_``: g * min(1, max_norm / (||g||_2 + 1e-6)).

    (optax's ``clip_by_global_norm`` has no 1e-6; the difference is below 1e-6 relative.)
    ``max_norm`` <= 0 disables clipping.
    """
    def init(params):
        del params
        return ClipState()

    def update(updates, state, params=None):
        del params
        if max_norm <= 0:
            return updates, state
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- weight-decay mask


def _path_key(path) -> tuple:
    out = []
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
        out.append(key)
    return tuple(out)


def decay_mask(params: Mapping, settings=None, llm_cfg=None) -> Any:
    """Pytree of bools like ``params`` (a pure dict with top-level "flow" and maybe "base"):
    True where weight decay applies.

    With ``settings`` and ``llm_cfg`` the decision is the original's: the parameter's
    original name (``convert.original_names.original_names``) contains none of ``bias``, ``ln``,
    ``LayerNorm``. Paths the table does not know (and everything without settings) fall back
    to our own name: no decay for a leaf called ``bias`` (or whose path mentions ``norm``
    weights of LayerNorm style, i.e. containing ``ln`` / ``LayerNorm`` as a path element).
    """
    names: dict[tuple, str] = {}
    if settings is not None and llm_cfg is not None:
        from l2d_jax.convert.names import stacked_path
        from l2d_jax.convert.original_names import original_names

        # keyed by the stacked parameter (every layer's name follows one pattern)
        names = {stacked_path(tuple(e.path))[0]: e.name for e in original_names(settings, llm_cfg)
                 if e.path is not None and e.alias_of is None}

    def one(path, _leaf):
        key = _path_key(path)
        name = names.get(key)
        if name is not None:
            return not any(s in name for s in NO_DECAY_SUBSTRINGS)
        return not (key and (key[-1] == "bias" or any(str(k) in ("ln", "LayerNorm") for k in key)))

    return jax.tree_util.tree_map_with_path(one, params)


# --------------------------------------------------------------------------- the optimizer


def make_optimizer(cfg: Mapping, total_steps: int, mask: Any = None) -> tuple[optax.GradientTransformation,
                                                                               Callable[[Any], jax.Array]]:
    """(clip -> AdamW with masked decoupled weight decay, the lr schedule) from the config.

    Keys: peak_lr, min_lr, n_warmup_steps, scheduler_type, cosine_min_ratio (0.1),
    weight_decay (0.01), adam_betas ((0.9, 0.95)), adam_eps (1e-8), grad_clip (1.0).
    ``mask``: ``decay_mask(params, ...)`` (or a callable params -> mask); None = decay all.
    """
    schedule = schedule_from_config(cfg, total_steps)
    b1, b2 = cfg.get("adam_betas", (0.9, 0.95))
    tx = optax.chain(
        clip_by_global_norm_torch(float(cfg.get("grad_clip", 1.0) or 0.0)),
        optax.adamw(schedule, b1=float(b1), b2=float(b2), eps=float(cfg.get("adam_eps", 1e-8)),
                    weight_decay=float(cfg.get("weight_decay", 0.01)), mask=mask),
    )
    return tx, schedule
