"""The pure math of L2D, without model code (spec sections 1, 2, 3 and 8).

Flow representations, noise schedules, the noisy interpolation ``x_t``, the timestep
frequency embedding, the x1 estimate from logits, velocities, classifier-free guidance
and the training loss. Every function works on jnp arrays and is jit-able; string and
int arguments are configuration and must be static under jit. Shapes: batch B,
sequence T, flow dimension D, vocabulary V.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NOISE_SCHEDULES = ("identity", "cosmap")
RESCALINGS = ("mult", "div", "none")
VELOCITY_SCHEDULES = ("constant", "edm")
X1_ESTIMATIONS = ("average", "sample")


def _check_option(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def rescale_factor(rescaling: str, dim: int) -> float:
    """The factor s of ``flow_representation_rescaling``: sqrt(D), 1/sqrt(D) or 1."""
    _check_option("flow_representation_rescaling", rescaling, RESCALINGS)
    return {"mult": math.sqrt(dim), "div": 1 / math.sqrt(dim), "none": 1.0}[rescaling]


def normalize_flow(x: jax.Array, rescaling: str) -> jax.Array:
    """``s * x / max(||x||_2, 1e-12)`` over the last axis (F.normalize, then * s); (..., D)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True).astype(x.dtype)
    return x / jnp.maximum(norm, 1e-12) * rescale_factor(rescaling, x.shape[-1])


def apply_noise_schedule(t: jax.Array, schedule: str, minimum_training_noise: float) -> jax.Array:
    """``schedule(t) * (1 - minimum_training_noise)``; schedule identity or cosmap; t any shape."""
    _check_option("noise_schedule", schedule, NOISE_SCHEDULES)
    if not 0.0 <= minimum_training_noise < 1.0:
        raise ValueError(f"minimum_training_noise must be in [0, 1), got {minimum_training_noise!r}")
    if schedule == "cosmap":
        t = 1.0 - 1.0 / (jnp.tan(jnp.pi / 2 * t) + 1.0)
    return t * (1.0 - minimum_training_noise)


def sample_timesteps(
    key: jax.Array, shape: tuple[int, ...], schedule: str, minimum_training_noise: float
) -> jax.Array:
    """Training noise levels: U[0, 1) of ``shape`` (float32), then the noise schedule."""
    return apply_noise_schedule(jax.random.uniform(key, shape, jnp.float32), schedule, minimum_training_noise)


def interpolate(
    x0_noise_std_normal: jax.Array,
    x1: jax.Array,
    t: jax.Array,
    noise_rescaling: float,
    dtype: jnp.dtype,
) -> jax.Array:
    """``x_t = (1 - t) * sigma * eps + t * x1`` in ``dtype``; eps, x1 (B, T, D), t (B, T).

    As in the original, eps, x1 and t are cast to the model dtype before mixing (the t
    fed to the conditioning stays float32; that is the caller's business).
    """
    noise = x0_noise_std_normal.astype(dtype) * noise_rescaling
    t = jnp.asarray(t).astype(dtype)[..., None]
    return ((1.0 - t) * noise + x1.astype(dtype) * t).astype(dtype)


def timestep_frequency_embedding(t: jax.Array, dim: int) -> jax.Array:
    """float32 ``[cos(t * freqs), sin(t * freqs)]``, freqs_k = exp(-ln(1e4) k / (dim/2)).

    t any shape -> shape + (dim,). freqs are computed as the original does, in float32.
    """
    if dim % 2:
        raise ValueError(f"timestep_modulation_freq_embedding_size must be even, got {dim}")
    half = dim // 2
    freqs = np.exp(np.float32(-math.log(10000)) * np.arange(half, dtype=np.float32) / np.float32(half))
    args = jnp.asarray(t).astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def parse_temperature_schedule(value: float | int | str) -> tuple[str, tuple[float, ...]]:
    """``nstep_temperature_schedule`` -> ("constant", (T,)) or ("polynomial", (p, e)).

    A number (or a numeric string) is a constant temperature (0 = greedy);
    ``"polynomial_p_e"`` means ``T(t) = (1 - t/e)^p`` for t < e, else 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"nstep_temperature_schedule must be a number or 'polynomial_p_e', got {value!r}")
    if not isinstance(value, str):
        return "constant", (float(value),)
    text = value.strip().lower()
    try:
        return "constant", (float(text),)
    except ValueError:
        pass
    parts = text.split("_")
    try:
        if len(parts) != 3 or parts[0] != "polynomial":
            raise ValueError
        p, e = float(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(
            f"nstep_temperature_schedule {value!r} is malformed: expected a number or "
            "'polynomial_<p>_<end_t>', e.g. 'polynomial_1_1.0'"
        ) from None
    if not e > 0:
        raise ValueError(f"nstep_temperature_schedule {value!r}: end_t must be > 0")
    return "polynomial", (p, e)


def temperature_at(schedule: float | int | str, t: jax.Array) -> jax.Array:
    """The x1-estimation temperature at flow time t (t may be traced); same shape as t."""
    kind, params = parse_temperature_schedule(schedule)
    t = jnp.asarray(t)
    if kind == "constant":
        return jnp.full(t.shape, params[0], jnp.result_type(t.dtype, jnp.float32))
    p, e = params
    return jnp.where(t >= e, 0.0, (1.0 - (1.0 / e) * t) ** p)


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def estimate_x1(
    logits: jax.Array,
    table: jax.Array | Callable[[jax.Array], jax.Array],
    mode: str,
    temperature: float | jax.Array,
    key: jax.Array | None = None,
    clamp: bool = False,
    normalize: bool = False,
    rescaling: str = "mult",
) -> jax.Array:
    """x1 estimate (..., D) float32 from logits (..., V) and the flow table Phi (V, D).

    mode "average": softmax(logits/T) @ Phi; "sample": Phi[y], y ~ softmax(logits/T)
    (needs ``key``). T <= 0: Phi[argmax logits] in either mode. ``clamp`` (average mode)
    snaps to the row of Phi with the largest inner product; otherwise ``normalize``
    renormalises as ``normalize_flow``. Neither applies when T <= 0. T may be traced.
    ``table`` may also be a function ids (...,) -> Phi[ids] (..., D) that computes the rows
    it is asked for: all that "sample" mode reads ("average" needs the table).
    """
    _check_option("nstep_x1_estimation", mode, X1_ESTIMATIONS)
    if mode == "sample" and key is None:
        raise ValueError("estimate_x1 with mode 'sample' needs a PRNG key")
    if callable(table) and mode == "average":
        raise ValueError("x1 estimation 'average' needs the whole flow table Phi (V, D), not a row function")
    rows = table if callable(table) else table.__getitem__
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    positive = temperature > 0
    safe_temperature = jnp.where(positive, temperature, 1.0)

    def stochastic() -> jax.Array:
        scaled = logits / safe_temperature
        if mode == "sample":
            x1 = rows(jax.random.categorical(key, scaled, axis=-1)).astype(jnp.float32)
        else:
            phi = table.astype(jnp.float32)
            x1 = _matmul(jax.nn.softmax(scaled, axis=-1), phi)
            if clamp:
                x1 = phi[jnp.argmax(_matmul(x1, phi.T), axis=-1)]
        return normalize_flow(x1, rescaling) if normalize and not clamp else x1

    return lax.cond(positive, stochastic, lambda: rows(jnp.argmax(logits, axis=-1)).astype(jnp.float32))


def velocity(x1_hat: jax.Array, x: jax.Array, t: jax.Array, schedule: str) -> jax.Array:
    """``(x1_hat - x) / (1 - t)`` ("constant") or ``/ (1 - t)^2`` ("edm") in x's dtype.

    x1_hat, x (..., D); t scalar or broadcastable to x.shape[:-1].
    """
    _check_option("velocity_schedule", schedule, VELOCITY_SCHEDULES)
    one_minus_t = 1.0 - jnp.asarray(t).astype(x.dtype)[..., None]
    denominator = one_minus_t if schedule == "constant" else one_minus_t**2
    return (x1_hat.astype(x.dtype) - x) / denominator


def guidance_mix(v_cond: jax.Array, v_null: jax.Array, g: float | jax.Array) -> jax.Array:
    """Classifier-free guidance ``g * v_cond + (1 - g) * v_null``."""
    return g * v_cond + (1 - g) * v_null


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, ignore_index: int = -100
) -> tuple[jax.Array, jax.Array]:
    """float32 cross entropy: (mean over non-ignored tokens, per-token losses, 0 where ignored).

    logits (..., V), labels (...). Like torch, the mean is NaN when every label is ignored.
    """
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    losses = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    return losses.sum() / valid.sum(), losses


def loss_for_labels(
    logits: jax.Array, labels: jax.Array, shifted: bool, ignore_index: int = -100
) -> tuple[jax.Array, jax.Array]:
    """The L2D training loss for logits (B, T, V) and labels (B, T); see cross_entropy_loss.

    shifted: labels[i] is the target of position i (per-token losses (B, T)); unshifted
    (HF style): CE of logits[:, :-1] against labels[:, 1:] (per-token losses (B, T-1)).
    """
    if shifted:
        return cross_entropy_loss(logits, labels, ignore_index)
    return cross_entropy_loss(logits[:, :-1], labels[:, 1:], ignore_index)


def flow_targets(
    labels: jax.Array, shifted: bool, ignore_index: int = -100
) -> tuple[jax.Array, jax.Array]:
    """Token ids (B, T) whose flow representation is x1 at each position, and a (B, T) mask.

    Ignored labels become token 0. shifted: the labels themselves, mask all True.
    Unshifted: position i encodes labels[i + 1]; the last position has no target (id 0,
    mask False: the original feeds a zero flow vector there, so zero x_t with the mask).
    """
    targets = jnp.where(labels == ignore_index, 0, labels)
    mask = jnp.ones(labels.shape, bool)
    if shifted:
        return targets, mask
    pad = jnp.zeros(labels.shape[:-1] + (1,), labels.dtype)
    return jnp.concatenate([targets[..., 1:], pad], -1), mask.at[..., -1].set(False)
