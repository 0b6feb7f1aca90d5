"""ODE solvers for L2D inference (spec section 8), as torchdiffeq 0.2.5 computes them.

A velocity function has the signature ``f(t, x) -> v``: t a scalar array, x (and v) a
pytree of arrays. Fixed-grid methods (``integrate_fixed``): euler, midpoint, heun2
(alias heun), heun3, rk4 (torchdiffeq's 3/8 rule). The grid is
``torch.linspace(0, final_t, N)`` in float32 (N grid points, N - 1 steps); step sizes and
stage times are float32 and cast to the state's time dtype (float64 for a float64
state) before ``f`` is called; a velocity requested at t >= 1 is taken as zero.

Grid and stage times are tabulated on the host with numpy: XLA contracts
multiply-adds into FMAs (differently per backend), so computing them in the loop would
not reproduce torch's float32 values bit for bit. The step count N may be a traced int
when ``max_points`` is given (tables for every N <= max_points, O(max_points^2) floats).
Adaptive-step methods (adaptive_heun, bosh3, fehlberg2, dopri5) get their own integrator
beside ``integrate_fixed``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any
VelocityFn = Callable[[jax.Array, PyTree], PyTree]

_THIRD = np.float32(1 / 3)
_TWO_THIRDS = np.float32(2 / 3)


class ODESolution(NamedTuple):
    """x: the state at the final time; nfe: number of velocity calls (int32 scalar);
    trajectory: None, or the states at the grid points with a leading axis of length
    max_points (or N), entries past the last grid point equal to the final state."""

    x: PyTree
    nfe: jax.Array
    trajectory: PyTree | None = None


def _linspace_f32(num_points: int, final_t: float) -> np.ndarray:
    """``torch.linspace(0, final_t, N)`` in float32: (N,).

    torch computes ``start + step * i`` for i < N // 2 and ``end - step * (N - 1 - i)``
    after, with a fused multiply-add (its AVX2/AVX512 and CUDA kernels). For N < 2^28 the
    float64 product and difference below are exact, so the cast rounds once, as an FMA does.
    """
    end = np.float32(final_t)
    step = end / np.float32(num_points - 1)
    i = np.arange(num_points)
    head = step * i.astype(np.float32)
    tail = (np.float64(end) - np.float64(step) * (num_points - 1 - i)).astype(np.float32)
    return np.where(i < num_points // 2, head, tail)


# Stage times of one step from (t0, dt, t1), float32 numpy arrays, in torchdiffeq's order
# of operations (every op rounded to float32; torch runs them as separate kernels).
_STAGE_TIMES = {
    "euler": lambda t0, dt, t1: (t0,),
    "midpoint": lambda t0, dt, t1: (t0, t0 + np.float32(0.5) * dt),
    "heun2": lambda t0, dt, t1: (t0, t0 + dt * np.float32(1.0)),
    "heun3": lambda t0, dt, t1: (t0, t0 + dt * _THIRD, t0 + dt * _TWO_THIRDS),
    "rk4": lambda t0, dt, t1: (t0, t0 + dt * _THIRD, t0 + dt * _TWO_THIRDS, t1),
}
_ALIASES = {"heun": "heun2"}
FIXED_GRID_METHODS = tuple(_STAGE_TIMES) + tuple(_ALIASES)


def _num_stages(method: str) -> int:
    return len(_STAGE_TIMES[method](0.0, 0.0, 0.0))


def _canonical_method(method: str) -> str:
    if method not in FIXED_GRID_METHODS:
        raise ValueError(
            f"ODE method must be one of {', '.join(map(repr, FIXED_GRID_METHODS))}, got {method!r}"
        )
    return _ALIASES.get(method, method)


def _schedule_np(method: str, num_points: int, final_t: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage times (N-1, S) and step sizes (N-1,), float32, of the N-point grid."""
    grid = _linspace_f32(num_points, final_t)
    t0, t1 = grid[:-1], grid[1:]
    dt = t1 - t0
    return np.stack(_STAGE_TIMES[method](t0, dt, t1), axis=-1), dt


@functools.lru_cache(maxsize=64)
def _tables(method: str, max_points: int, final_t: float) -> tuple[np.ndarray, ...]:
    """Row N (2 <= N <= max_points) holds the N-point grid (max_points,), its stage times
    (max_points-1, S) and step sizes (max_points-1,); rows are padded past the grid."""
    n_stages = _num_stages(method)
    grids = np.full((max_points + 1, max_points), np.float32(final_t), np.float32)
    times = np.full((max_points + 1, max_points - 1, n_stages), np.float32(final_t), np.float32)
    dts = np.zeros((max_points + 1, max_points - 1), np.float32)
    for n in range(2, max_points + 1):
        grids[n, :n] = _linspace_f32(n, final_t)
        times[n, : n - 1], dts[n, : n - 1] = _schedule_np(method, n, final_t)
    return grids, times, dts


def _schedule(
    method: str, num_points: int | jax.Array, final_t: float, max_points: int | None
) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """Grid (L,), stage times (L-1, S), step sizes (L-1,) and N, with L = max_points or N.

    A static N is checked; a traced N (needs max_points) is clipped to [2, max_points].
    """
    if max_points is None:
        try:
            n = operator.index(num_points)
        except TypeError:
            raise ValueError("num_points is traced: pass a static max_points to size the grid") from None
        if n < 2:
            raise ValueError(f"num_points (ode_steps) counts grid points and must be >= 2, got {n}")
        times, dts = _schedule_np(method, n, final_t)
        return jnp.asarray(_linspace_f32(n, final_t)), jnp.asarray(times), jnp.asarray(dts), n
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    try:
        n = operator.index(num_points)
    except TypeError:
        n = jnp.clip(num_points, 2, max_points)
    else:
        if not 2 <= n <= max_points:
            raise ValueError(f"num_points must be in [2, max_points={max_points}], got {n}")
    grids, times, dts = _tables(method, max_points, float(final_t))
    return jnp.asarray(grids)[n], jnp.asarray(times)[n], jnp.asarray(dts)[n], n


def time_grid(num_points: int | jax.Array, final_t: float, max_points: int | None = None) -> jax.Array:
    """``torch.linspace(0, final_t, N)`` in float32, bit for bit: (N,), or (max_points,)
    padded with final_t when max_points is given (then N may be traced)."""
    return _schedule("euler", num_points, final_t, max_points)[0]


def _cast(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.astype(like.dtype)


def _euler_step(f: VelocityFn, ts: jax.Array, dt: jax.Array, y0: PyTree) -> PyTree:
    k1 = f(ts[0], y0)
    return jax.tree.map(lambda y, a: y + _cast(dt, y) * a, y0, k1)


def _midpoint_step(f: VelocityFn, ts: jax.Array, dt: jax.Array, y0: PyTree) -> PyTree:
    half = 0.5 * dt
    k1 = f(ts[0], y0)
    y_mid = jax.tree.map(lambda y, a: y + a * _cast(half, y), y0, k1)
    k2 = f(ts[1], y_mid)
    return jax.tree.map(lambda y, b: y + _cast(dt, y) * b, y0, k2)


def _heun2_step(f: VelocityFn, ts: jax.Array, dt: jax.Array, y0: PyTree) -> PyTree:
    k1 = f(ts[0], y0)
    k2 = f(ts[1], jax.tree.map(lambda y, a: y + _cast(dt, y) * a, y0, k1))
    return jax.tree.map(lambda y, a, b: y + _cast(dt, y) * (a * 0.5 + b * 0.5), y0, k1, k2)


def _heun3_step(f: VelocityFn, ts: jax.Array, dt: jax.Array, y0: PyTree) -> PyTree:
    k1 = f(ts[0], y0)
    k2 = f(ts[1], jax.tree.map(lambda y, a: y + _cast(dt, y) * a * (1 / 3), y0, k1))
    k3 = f(ts[2], jax.tree.map(lambda y, b: y + _cast(dt, y) * (b * (2 / 3)), y0, k2))
    return jax.tree.map(lambda y, a, c: y + _cast(dt, y) * (a * 0.25 + c * 0.75), y0, k1, k3)


def _rk4_step(f: VelocityFn, ts: jax.Array, dt: jax.Array, y0: PyTree) -> PyTree:
    """torchdiffeq's ``rk4`` (rk4_alt_step_func, the 3/8 rule)."""
    k1 = f(ts[0], y0)
    k2 = f(ts[1], jax.tree.map(lambda y, a: y + _cast(dt, y) * a * (1 / 3), y0, k1))
    k3 = f(ts[2], jax.tree.map(lambda y, a, b: y + _cast(dt, y) * (b - a * (1 / 3)), y0, k1, k2))
    k4 = f(ts[3], jax.tree.map(lambda y, a, b, c: y + _cast(dt, y) * (a - b + c), y0, k1, k2, k3))
    return jax.tree.map(
        lambda y, a, b, c, d: y + (a + 3 * (b + c) + d) * _cast(dt, y) * 0.125, y0, k1, k2, k3, k4
    )


_STEPS = {
    "euler": _euler_step,
    "midpoint": _midpoint_step,
    "heun2": _heun2_step,
    "heun3": _heun3_step,
    "rk4": _rk4_step,
}


def _zero_at_one(f: VelocityFn) -> VelocityFn:
    """f, cast to the state's dtypes, and zero wherever t >= 1 (f is not evaluated there)."""

    def g(t: jax.Array, x: PyTree) -> PyTree:
        return lax.cond(
            t >= 1,
            lambda: jax.tree.map(jnp.zeros_like, x),
            lambda: jax.tree.map(_cast, f(t, x), x),
        )

    return g


def integrate_fixed(
    f: VelocityFn,
    x0: PyTree,
    num_points: int | jax.Array,
    final_t: float,
    method: str,
    max_points: int | None = None,
    return_trajectory: bool = False,
) -> ODESolution:
    """Integrates dx/dt = f(t, x) from 0 to final_t on the N = num_points grid.

    x0: pytree of float arrays (its leaves share one dtype class; t is passed to f in
    promote(dtype, float32)). num_points may be traced when max_points (static) is given;
    a traced N is clipped to [2, max_points]. method: one of FIXED_GRID_METHODS.
    Returns ODESolution(x_final, nfe = stages * (N - 1), trajectory (L, ...) or None)
    with L = max_points or N.
    """
    method = _canonical_method(method)
    _, times, dts, n = _schedule(method, num_points, final_t, max_points)
    time_dtype = jnp.promote_types(jax.tree.leaves(x0)[0].dtype, jnp.float32)
    times = times.astype(time_dtype)
    length = times.shape[0] + 1
    step, g = _STEPS[method], _zero_at_one(f)

    def body(i: jax.Array, carry: tuple[PyTree, PyTree]) -> tuple[PyTree, PyTree]:
        y, trajectory = carry
        y = step(g, times[i], dts[i], y)
        if trajectory is not None:
            trajectory = jax.tree.map(lambda tr, v: tr.at[i + 1].set(v), trajectory, y)
        return y, trajectory

    trajectory = None
    if return_trajectory:
        trajectory = jax.tree.map(lambda y: jnp.broadcast_to(y, (length,) + y.shape), x0)
    x, trajectory = lax.fori_loop(0, n - 1, body, (x0, trajectory))
    if trajectory is not None:
        past_end = jnp.arange(length) >= n
        trajectory = jax.tree.map(
            lambda tr, v: jnp.where(past_end.reshape((-1,) + (1,) * v.ndim), v, tr), trajectory, x
        )
    nfe = jnp.asarray(_num_stages(method) * (n - 1), jnp.int32)
    return ODESolution(x, nfe, trajectory)
