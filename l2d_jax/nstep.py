"""Multi-step (ODE) inference of the flow path over positions whose main stream is cached.

``make_velocity`` turns ``L2DModel.flow_only`` into the ODE's right-hand side
``f(t, x) -> v`` (spec section 8): logits -> x1 estimate -> velocity, with the temperature
schedule evaluated at ``t + delta`` and optional classifier-free guidance. ``nstep`` runs the
whole thing for a sequence (the original's ``nstep_inference`` with
``precompute_non_flow_path=True``): the main path once, then only flow evaluations.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from l2d_jax import diffusion, solvers

FIXED_GRID = solvers.FIXED_GRID_METHODS  # the registry in solvers.py


@dataclasses.dataclass(frozen=True)
class ODEOptions:
    """How x1 is estimated and the ODE integrated (static under jit).

    ``temperature`` is the original's ``nstep_temperature_schedule`` (a float, 0 = argmax x1,
    or ``"polynomial_<p>_<end_t>"``); a float may be overridden per call at run time.

    ``method``: a fixed grid (``FIXED_GRID``; ``ode_steps`` = grid points) or an adaptive one
    (``solvers.ADAPTIVE_METHODS``: adaptive_heun, bosh3, fehlberg2, dopri5), for which
    ``ode_steps`` only switches the flow path on (any value >= 2; it sets no step count) and
    ``atol``/``rtol`` (the original's ``ode_kwargs``), ``per_sequence`` (each batch row its
    own step sizes, as if alone; False: one step size and error norm for the whole batch, as
    the original) and ``max_steps`` (step budget per token) apply; see
    ``solvers.integrate_adaptive``.
    """

    method: str = "midpoint"
    x1_estimation: str = "sample"
    temperature: float | str = 0.0
    normalize_x1: bool = False
    clamp: bool = False
    final_t: float = 1.0
    velocity_schedule: str = "constant"
    rescaling: str = "mult"
    atol: float = 1e-5
    rtol: float = 1e-5
    per_sequence: bool = True
    max_steps: int = 1000

    @classmethod
    def from_settings(cls, s, **overrides) -> "ODEOptions":
        """Defaults from an L2DSettings (the original model's nstep_* attributes)."""
        kw = dict(method=s.ode.get("method", "midpoint"), x1_estimation=s.nstep_x1_estimation,
                  temperature=0.0 if s.nstep_temperature_schedule is None else s.nstep_temperature_schedule,
                  normalize_x1=s.nstep_normalize_x1_predictions, clamp=s.nstep_clamp_predictions,
                  final_t=s.nstep_final_timestep, velocity_schedule=s.velocity_schedule,
                  rescaling=s.flow_representation_rescaling or "none",
                  atol=s.ode.get("atol", 1e-5), rtol=s.ode.get("rtol", 1e-5))
        kw.update(overrides)
        return cls(**kw)


def temperature_delta(method: str, num_points, final_t: float) -> jax.Array:
    """Offset at which the temperature schedule is read: the step (euler, heun, rk), half
    of it (midpoint), 0 (adaptive). Float32 as the original's torch.linspace difference."""
    if method not in FIXED_GRID:
        return jnp.float32(0.0)
    n = jnp.asarray(num_points, jnp.float32)
    final = jnp.float32(final_t)
    step = final / (n - 1.0)
    delta = final - (final - step)
    return delta / 2 if method == "midpoint" else delta


def make_velocity(flow_logits: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
                  table: jax.Array | Callable[[jax.Array], jax.Array], opts: ODEOptions, *,
                  delta: jax.Array, key: jax.Array | None = None,
                  temperature: jax.Array | None = None, guidance: jax.Array | None = None,
                  guided: bool = False) -> Callable:
    """The ODE right-hand side f(t, x).

    flow_logits(x, t, conditional: bool) -> logits (B, T, V); table: Phi (V, D) float32, or
    a function ids -> Phi[ids] for "sample" x1 estimation (``diffusion.estimate_x1``);
    key: one raw key (2,) or one per batch row (B, 2), needed for x1 sampling at T > 0;
    temperature: run-time override of a constant schedule; guided: mix conditional and
    unconditional velocities with weight ``guidance``. t may be a scalar or (B,), one time
    per batch row (adaptive solvers in per-sequence mode; continuous batching, where delta,
    temperature and guidance may be (B,) too).
    """
    def temp_at(t, d):
        if temperature is not None:
            return temperature
        return diffusion.temperature_at(opts.temperature, t + d)

    def x1_of(logits, t, k, d=delta):
        return diffusion.estimate_x1(logits, table, opts.x1_estimation, temp_at(t, d), key=k,
                                     clamp=opts.clamp, normalize=opts.normalize_x1, rescaling=opts.rescaling)

    def one(x, t, conditional):
        logits = flow_logits(x, t, conditional)
        if jnp.ndim(t) == 1:  # one time per row: each row its own temperature and key
            salt = jax.lax.bitcast_convert_type(t.astype(jnp.float32), jnp.int32) * 2 + int(conditional)
            keys = None
            if key is not None and key.ndim == 1:
                keys = jax.vmap(lambda r, s: jax.random.fold_in(jax.random.fold_in(key, r), s))(
                    jnp.arange(t.shape[0]), salt)
            elif key is not None:
                keys = jax.vmap(jax.random.fold_in)(key, salt)
            per_row = jnp.broadcast_to(delta, t.shape)
            x1 = jax.vmap(x1_of)(logits, t, keys, per_row)
            t_rows = t.reshape(t.shape + (1,) * (x.ndim - 2))
            return diffusion.velocity(x1.astype(x.dtype), x, t_rows.astype(x.dtype), opts.velocity_schedule)
        if key is None:
            x1 = x1_of(logits, t, None)
        else:
            salt = jax.lax.bitcast_convert_type(jnp.float32(t), jnp.int32) * 2 + int(conditional)
            if key.ndim == 1:
                x1 = x1_of(logits, t, jax.random.fold_in(key, salt))
            else:  # one key per batch row: rows draw independently of their batch mates
                keys = jax.vmap(lambda k: jax.random.fold_in(k, salt))(key)
                x1 = jax.vmap(lambda lg, k: x1_of(lg, t, k))(logits, keys)
        return diffusion.velocity(x1.astype(x.dtype), x, t.astype(x.dtype), opts.velocity_schedule)

    def f(t, x):
        v = one(x, t, True)
        if guided:
            v = diffusion.guidance_mix(v, one(x, t, False), guidance)
        return v

    return f


def modulation_lookup(model, times: jax.Array, table) -> Callable[[jax.Array], object]:
    """``at(t)`` -> ``model.flow_modulation`` for a scalar t, broadcasting against any (B, T),
    read from ``table`` = ``model.flow_modulation(times[:, None])`` (computed once for the
    times (K,)) when t is one of them, else computed.

    Generation tabulates the fixed-grid stage times (``solvers.stage_times``): the per-layer
    modulation heads then run once per call instead of once per velocity evaluation (for
    SmolLM2 they are ~17 % of a flow evaluation's bytes), and an evaluation reads its row of
    the table in one piece. Unconditional only (no class labels): with guidance labels the
    caller computes the modulation itself."""
    layers = jnp.moveaxis(table.layers, 2, 0)  # (K, L, F, 1, H): one time's rows together

    def at(t: jax.Array):
        hit = times == t

        def row():
            k = jnp.argmax(hit)
            return type(table)(layers[k][:, :, None], table.final[k][None])

        return jax.lax.cond(hit.any(), row, lambda: model.flow_modulation(jnp.full((1, 1), t, jnp.float32)))

    return at


class NStepOutput(NamedTuple):
    trajectory: jax.Array | None  # (N or max_points, B, T, D) states at the grid points
    x: jax.Array  # (B, T, D) final state
    logits: jax.Array  # (B, T, V) float32 logits at (x_final, t_final)
    nfe: jax.Array  # number of velocity evaluations


def nstep(model, input_ids: jax.Array, x0: jax.Array, num_points, opts: ODEOptions, *,
          positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
          class_labels: jax.Array | None = None, guidance: float | jax.Array | None = None,
          key: jax.Array | None = None, temperature: jax.Array | None = None,
          max_points: int | None = None, return_trajectory: bool = False) -> NStepOutput:
    """ODE over every position of ``input_ids`` (B, T) from x0 (B, T, D) (already scaled by
    noise_rescaling), with the main path computed once. ``num_points`` (grid points, >= 2)
    may be traced; for adaptive methods it only sets the trajectory's output grid, and
    ``nfe`` is (B,) in per-sequence mode."""
    b, n = input_ids.shape
    kv_valid = jnp.ones((b, n), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    from l2d_jax.models.llm import init_cache

    main = model.base(input_ids, positions, cache=init_cache(model.cfg, b, n), cache_index=0, kv_valid=kv_valid)
    table = model.flow_table()
    guided = model.settings.use_guidance and class_labels is not None

    def flow_logits(x, t, conditional):
        labels = class_labels if conditional else None
        return model.flow_only(main.hidden, main.cache, x, t, positions, 0, kv_valid, labels)

    g = model.settings.nstep_guidance_parameter if guidance is None else guidance
    f = make_velocity(flow_logits, table, opts, delta=temperature_delta(opts.method, num_points, opts.final_t),
                      key=key, temperature=temperature, guidance=jnp.float32(1.0 if g is None else g),
                      guided=guided)
    sol = solvers.integrate(f, x0, opts.method, final_t=opts.final_t, num_points=num_points,
                            max_points=max_points, atol=opts.atol, rtol=opts.rtol,
                            per_sequence=opts.per_sequence, max_steps=opts.max_steps,
                            return_trajectory=return_trajectory)
    t_final = jnp.float32(opts.final_t)
    logits = flow_logits(sol.x, t_final, True)
    return NStepOutput(sol.trajectory, sol.x, logits, sol.nfe)
