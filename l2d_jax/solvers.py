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

Adaptive-step methods (``integrate_adaptive``): adaptive_heun, bosh3, fehlberg2 (the
original's) and dopri5 (ours), as torchdiffeq 0.2.5's RKAdaptiveStepsizeODESolver with a
given first step. ``integrate`` dispatches on the method name.
"""

from __future__ import annotations

import dataclasses

import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from l2d_jax.errors import UsageError

PyTree = Any
VelocityFn = Callable[[jax.Array, PyTree], PyTree]

_THIRD = np.float32(1 / 3)
_TWO_THIRDS = np.float32(2 / 3)


class ODESolution(NamedTuple):
    """x: the state at the final time; nfe: number of velocity calls (int32 scalar; for an
    adaptive method in per-sequence mode one count per batch row, (B,));
    trajectory: None, or the states at the grid points with a leading axis of length
    max_points (or N), entries past the last grid point equal to the final state.
    Adaptive methods only (None for fixed grids): steps, the steps attempted (accepted or
    rejected; per row in per-sequence mode); unfinished, bool, True where the step budget
    ``max_steps`` ran out (or the step size underflowed or became non-finite, where
    torchdiffeq raises) before final_t was reached: x then holds the last accepted state."""

    x: PyTree
    nfe: jax.Array
    trajectory: PyTree | None = None
    steps: jax.Array | None = None
    unfinished: jax.Array | None = None


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


_ALIASES = {"heun": "heun2"}


def _canonical_method(method: str) -> str:
    if method not in FIXED_GRID_METHODS:
        raise UsageError(
            f"ODE method must be one of {', '.join(map(repr, FIXED_GRID_METHODS))}, got {method!r}"
        )
    return _ALIASES.get(method, method)


def _schedule_np(method: str, num_points: int, final_t: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage times (N-1, S) and step sizes (N-1,), float32, of the N-point grid."""
    grid = _linspace_f32(num_points, final_t)
    t0, t1 = grid[:-1], grid[1:]
    dt = t1 - t0
    return np.stack(FIXED_GRID[method].stage_times(t0, dt, t1), axis=-1), dt


@functools.lru_cache(maxsize=64)
def _tables(method: str, max_points: int, final_t: float) -> tuple[np.ndarray, ...]:
    """Row N (2 <= N <= max_points) holds the N-point grid (max_points,), its stage times
    (max_points-1, S) and step sizes (max_points-1,); rows are padded past the grid."""
    n_stages = FIXED_GRID[method].stages
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
            raise UsageError(f"num_points (ode_steps) counts grid points and must be >= 2, got {n}")
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
            raise UsageError(f"num_points must be in [2, max_points={max_points}], got {n}")
    grids, times, dts = _tables(method, max_points, float(final_t))
    return jnp.asarray(grids)[n], jnp.asarray(times)[n], jnp.asarray(dts)[n], n


def time_grid(num_points: int | jax.Array, final_t: float, max_points: int | None = None) -> jax.Array:
    """``torch.linspace(0, final_t, N)`` in float32, bit for bit: (N,), or (max_points,)
    padded with final_t when max_points is given (then N may be traced)."""
    return _schedule("euler", num_points, final_t, max_points)[0]


def stage_times(method: str, num_points: int | jax.Array, final_t: float,
                max_points: int | None = None) -> jax.Array:
    """Every time at which ``integrate_fixed`` evaluates f on the N-point grid: (L-1, S)
    float32, bit for bit what it passes (S stages per step, L = max_points or N; rows past
    the grid hold final_t). Callers use it to tabulate what depends on t alone."""
    return _schedule(_canonical_method(method), num_points, final_t, max_points)[1]


def _cast(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.astype(like.dtype)


@dataclasses.dataclass(frozen=True)
class FixedGridSolver:
    """A fixed-grid explicit Runge-Kutta method, stage by stage: where its stages evaluate
    the velocity within a step (``stage_times(t0, dt, t1)``), the state each later stage
    evaluates it at (``inputs[j - 1](y0, dt, ks)`` from the earlier stages' velocities ks;
    stage 0 at y0) and the next state (``combine(y0, dt, ks)``), on array leaves, in
    torchdiffeq's order of operations. ``step`` runs one step; continuous batching
    (``serving/slots.py``) runs the stages one at a time, each batch row at its own stage."""

    stage_times: Callable
    inputs: tuple[Callable, ...]
    combine: Callable

    @property
    def stages(self) -> int:
        return len(self.inputs) + 1

    def stage_input(self, j: int, dt: jax.Array, y0: PyTree, ks: list[PyTree]) -> PyTree:
        """The state stage j evaluates the velocity at (ks: the velocities of stages < j)."""
        if j == 0:
            return y0
        return jax.tree.map(lambda y, *k: self.inputs[j - 1](y, dt, k), y0, *ks[:j])

    def next_state(self, dt: jax.Array, y0: PyTree, ks: list[PyTree]) -> PyTree:
        """The state after the step, from every stage's velocity ks."""
        return jax.tree.map(lambda y, *k: self.combine(y, dt, k), y0, *ks)

    def step(self, f: VelocityFn, ts: jax.Array, dt: jax.Array, y0: PyTree) -> PyTree:
        """One step from y0 with stage times ts (S,) and step size dt."""
        ks: list[PyTree] = []
        for j in range(self.stages):
            ks.append(f(ts[j], self.stage_input(j, dt, y0, ks)))
        return self.next_state(dt, y0, ks)


# The one registry of ODE methods: the fixed-grid ones here (and their aliases), the adaptive
# ones in ``_TABLEAUS`` below. Everything else (settings, configs, the converter of the
# original's settings, bench, the CLI's help) reads ``METHODS`` / ``FIXED_GRID_METHODS`` /
# ``ADAPTIVE_METHODS`` / ``num_stages``.
# Stage times of one step from (t0, dt, t1), float32 numpy arrays, in torchdiffeq's order
# of operations (every op rounded to float32; torch runs them as separate kernels).
FIXED_GRID = {
    "euler": FixedGridSolver(lambda t0, dt, t1: (t0,), (), lambda y, dt, k: y + _cast(dt, y) * k[0]),
    "midpoint": FixedGridSolver(
        lambda t0, dt, t1: (t0, t0 + np.float32(0.5) * dt),
        (lambda y, dt, k: y + k[0] * _cast(0.5 * dt, y),),
        lambda y, dt, k: y + _cast(dt, y) * k[1]),
    "heun2": FixedGridSolver(
        lambda t0, dt, t1: (t0, t0 + dt * np.float32(1.0)),
        (lambda y, dt, k: y + _cast(dt, y) * k[0],),
        lambda y, dt, k: y + _cast(dt, y) * (k[0] * 0.5 + k[1] * 0.5)),
    "heun3": FixedGridSolver(
        lambda t0, dt, t1: (t0, t0 + dt * _THIRD, t0 + dt * _TWO_THIRDS),
        (lambda y, dt, k: y + _cast(dt, y) * k[0] * (1 / 3), lambda y, dt, k: y + _cast(dt, y) * (k[1] * (2 / 3))),
        lambda y, dt, k: y + _cast(dt, y) * (k[0] * 0.25 + k[2] * 0.75)),
    # torchdiffeq's ``rk4`` (rk4_alt_step_func, the 3/8 rule)
    "rk4": FixedGridSolver(
        lambda t0, dt, t1: (t0, t0 + dt * _THIRD, t0 + dt * _TWO_THIRDS, t1),
        (lambda y, dt, k: y + _cast(dt, y) * k[0] * (1 / 3), lambda y, dt, k: y + _cast(dt, y) * (k[1] - k[0] * (1 / 3)),
         lambda y, dt, k: y + _cast(dt, y) * (k[0] - k[1] + k[2])),
        lambda y, dt, k: y + (k[0] + 3 * (k[1] + k[2]) + k[3]) * _cast(dt, y) * 0.125),
}
FIXED_GRID_METHODS = tuple(FIXED_GRID) + tuple(_ALIASES)


def num_stages(method: str) -> int:
    """Velocity evaluations per step of a fixed-grid method (an alias included)."""
    return FIXED_GRID[_canonical_method(method)].stages


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
    step, g = FIXED_GRID[method].step, _zero_at_one(f)

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
    nfe = jnp.asarray(FIXED_GRID[method].stages * (n - 1), jnp.int32)
    return ODESolution(x, nfe, trajectory)


# ---------------------------------------------------------------------------------------
# Adaptive-step Runge-Kutta methods (torchdiffeq 0.2.5, rk_common.RKAdaptiveStepsizeODESolver)
# ---------------------------------------------------------------------------------------


class _Tableau(NamedTuple):
    """torchdiffeq's _ButcherTableau (alpha, beta, c_sol, c_error), its interpolation
    weights ``mid`` and the order that sets the step-size exponent 1 / order."""

    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]
    mid: tuple[float, ...]
    order: int

    @property
    def fsal(self) -> bool:
        """The solution is the last stage's input (Dormand-Prince, Bogacki-Shampine)."""
        return self.c_sol[-1] == 0 and self.c_sol[:-1] == self.beta[-1]


_TABLEAUS = {
    "adaptive_heun": _Tableau(
        alpha=(1.0,), beta=((1.0,),), c_sol=(0.5, 0.5), c_error=(0.5, -0.5), mid=(0.5, 0.0), order=2
    ),
    "bosh3": _Tableau(
        alpha=(1 / 2, 3 / 4, 1.0),
        beta=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        c_sol=(2 / 9, 1 / 3, 4 / 9, 0.0),
        c_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        mid=(0.0, 0.5, 0.0, 0.0),
        order=3,
    ),
    "fehlberg2": _Tableau(
        alpha=(1 / 2, 1.0),
        beta=((1 / 2,), (1 / 256, 255 / 256)),
        c_sol=(1 / 512, 255 / 256, 1 / 512),
        c_error=(-1 / 512, 0.0, 1 / 512),
        mid=(0.0, 0.5, 0.0),
        order=2,
    ),
    "dopri5": _Tableau(
        alpha=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        beta=(
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        c_sol=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        c_error=(
            35 / 384 - 1951 / 21600,
            0.0,
            500 / 1113 - 22642 / 50085,
            125 / 192 - 451 / 720,
            -2187 / 6784 - -12231 / 42400,
            11 / 84 - 649 / 6300,
            -1.0 / 60.0,
        ),
        mid=(
            6025192743 / 30085553152 / 2,
            0.0,
            51252292925 / 65400821598 / 2,
            -2691868925 / 45128329728 / 2,
            187940372067 / 1594534317056 / 2,
            -1776094331 / 19743644256 / 2,
            11237099 / 235043384 / 2,
        ),
        order=5,
    ),
}
ADAPTIVE_METHODS = tuple(_TABLEAUS)
METHODS = FIXED_GRID_METHODS + ADAPTIVE_METHODS

# torchdiffeq's defaults (min_step 0, max_step inf) and L2D's first step
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2
FIRST_STEP = 0.05


class _Quartic(NamedTuple):
    """Coefficients of torchdiffeq's interpolating quartic e + d x + c x^2 + b x^3 + a x^4."""

    e: jax.Array
    d: jax.Array
    c: jax.Array
    b: jax.Array
    a: jax.Array


class _AdaptiveCarry(NamedTuple):
    y: PyTree  # last accepted state
    f: PyTree  # derivative carried to the next step (torchdiffeq's f1 = k[-1])
    t: jax.Array  # time of y (controller shape: () batch-wide, (B,) per sequence)
    dt: jax.Array  # size of the next step
    done: jax.Array  # reached final_t (or failed)
    failed: jax.Array  # step size underflowed or became non-finite
    nfe: jax.Array  # int32
    steps: jax.Array  # int32, steps attempted
    it: jax.Array  # int32 scalar, loop iterations
    x_out: PyTree  # the state at final_t once done
    trajectory: PyTree | None


def integrate_adaptive(
    f: VelocityFn,
    x0: PyTree,
    final_t: float,
    method: str,
    *,
    atol: float | jax.Array = 1e-5,
    rtol: float | jax.Array = 1e-5,
    per_sequence: bool = True,
    batch_axis: int = 0,
    max_steps: int = 1000,
    first_step: float | jax.Array = FIRST_STEP,
    num_points: int | jax.Array | None = None,
    max_points: int | None = None,
    return_trajectory: bool = False,
) -> ODESolution:
    """Integrates dx/dt = f(t, x) from 0 to final_t with an embedded Runge-Kutta pair.

    method: adaptive_heun (Heun-Euler 2(1)), bosh3 (Bogacki-Shampine 3(2)), fehlberg2
    (Fehlberg RK1(2)) or dopri5 (Dormand-Prince 5(4)), step for step as torchdiffeq 0.2.5's
    ``odeint(..., rtol, atol, method, options=dict(first_step=...))`` (the L2D original:
    first step 0.05): stages ``t0 + alpha_i dt`` (an ``alpha = 1`` stage at the float just
    below ``t0 + dt``), error ratio ``rms(err / (atol + rtol max(|y0|, |y1|)))`` (for a pytree
    state the largest over leaves), accept when <= 1, next step ``dt * min(10, max(0.9 /
    ratio^(1/order), 0.2 if rejected else 1))`` (10 when the ratio is 0), the last stage's
    derivative carried to the next step (FSAL for dopri5 and bosh3; torchdiffeq does the same
    for adaptive_heun and fehlberg2, reusing their last stage). Steps are not shortened to
    land on final_t: the step that passes it is interpolated there with torchdiffeq's
    quartic, as the original does. A velocity requested at t >= 1 is zero. NFE counts every
    velocity call, including the initial f(0, x0): 1 + stages * steps attempted
    (stages: adaptive_heun 1, fehlberg2 2, bosh3 3, dopri5 6).

    Two modes:
      per_sequence=False (batch-wide, the original): one step size, one error norm over the
        WHOLE state, one accept/reject for all rows; f(t, x) gets a scalar t and nfe is a
        scalar. Rows change each other's steps, so a row's result depends on its batch,
        and easy rows dilute a hard row's error in the RMS (it gets fewer steps than alone).
      per_sequence=True (ours): every row along ``batch_axis`` (of every leaf) has its own
        time, step size, error norm (over that row's elements) and accept/reject, all rows
        stepped together in one while_loop; f(t, x) gets t of shape (B,), one time per row,
        and must treat rows independently. A row that reached final_t stops changing
        (its velocities are still computed with the batch, then discarded); its nfe (B,)
        counts the calls while it was active. Each row gets what it would get alone (up to
        the rounding of f, which may differ with the batch size).

    atol, rtol and first_step may be traced. max_steps (static) bounds the loop iterations
    (= attempted steps of the slowest row); rows not at final_t when it runs out are flagged
    in ``unfinished``. return_trajectory: also the states at the N = num_points grid points
    ``linspace(0, final_t, N)`` (float32, as the original's output times; interpolated, the
    steps do not depend on them), padded to max_points as in integrate_fixed.
    """
    if method not in _TABLEAUS:
        raise UsageError(f"adaptive ODE method must be one of {', '.join(map(repr, ADAPTIVE_METHODS))}, "
                         f"got {method!r}")
    tab = _TABLEAUS[method]
    max_steps = operator.index(max_steps)
    leaves = jax.tree.leaves(x0)
    tdt = jnp.promote_types(leaves[0].dtype, jnp.float32)
    # the original's output times are float32 (torch.linspace), cast to the time dtype
    t_end = jnp.asarray(np.float32(final_t), tdt)

    if per_sequence:
        axis = batch_axis % leaves[0].ndim
        n_rows = leaves[0].shape[axis]
        if any(leaf.shape[batch_axis % leaf.ndim] != n_rows for leaf in leaves):
            raise ValueError("every leaf of x0 needs the same batch size along batch_axis")
        ctrl_shape: tuple[int, ...] = (n_rows,)

        def rows(s: jax.Array, leaf: jax.Array, lead: int = 0) -> jax.Array:
            """A per-row array (lead..., B) shaped to broadcast against (lead..., *leaf)."""
            ax = batch_axis % leaf.ndim
            return s.reshape(s.shape[:lead] + tuple(n_rows if i == ax else 1 for i in range(leaf.ndim)))

        def norm(v: jax.Array) -> jax.Array:
            ax = batch_axis % v.ndim
            other = tuple(i for i in range(v.ndim) if i != ax)
            return jnp.sqrt(jnp.mean(jnp.square(jnp.abs(v)), axis=other))

        def g(t: jax.Array, x: PyTree) -> PyTree:
            def call() -> PyTree:
                v = f(t, x)
                return jax.tree.map(lambda a, y: jnp.where(rows(t >= 1, y), 0, a.astype(y.dtype)), v, x)

            return lax.cond(jnp.all(t >= 1), lambda: jax.tree.map(jnp.zeros_like, x), call)

    else:
        ctrl_shape = ()

        def rows(s: jax.Array, leaf: jax.Array, lead: int = 0) -> jax.Array:
            return s.reshape(s.shape[:lead] + (1,) * leaf.ndim)

        def norm(v: jax.Array) -> jax.Array:
            return jnp.sqrt(jnp.mean(jnp.square(jnp.abs(v))))

        g = _zero_at_one(f)

    def tree_norm(tree: PyTree) -> jax.Array:
        return functools.reduce(jnp.maximum, [norm(v) for v in jax.tree.leaves(tree)])

    def combine(y: PyTree | None, ks: list[PyTree], coefs: list[jax.Array]) -> PyTree:
        """y + sum_j k_j * coef_j, as torchdiffeq's ``y0 + torch.sum(k * coefs, -1)``."""

        def leafwise(*args):
            base, kk = (args[0], args[1:]) if y is not None else (None, args)
            acc = None
            for k, c in zip(kk, coefs):
                term = k * rows(c, k).astype(k.dtype)
                acc = term if acc is None else acc + term
            return acc if base is None else base + acc

        return jax.tree.map(leafwise, *(([y] if y is not None else []) + ks))

    def coef(c: float, dt: jax.Array) -> jax.Array:
        return jnp.asarray(c, tdt) * dt

    def interp_coeffs(y0, y1, ks, dt):
        """torchdiffeq's _interp_fit: [e, d, c, b, a] of the quartic on [t0, t1]."""
        y_mid = combine(y0, ks, [coef(m, dt) for m in tab.mid])

        def fit(y0, y1, ym, f0, f1):
            h = rows(dt, y0).astype(y0.dtype)
            a = 2 * h * (f1 - f0) - 8 * (y1 + y0) + 16 * ym
            b = h * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * ym
            c = h * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * ym
            return _Quartic(y0, h * f0, c, b, a)

        return jax.tree.map(fit, y0, y1, y_mid, ks[0], ks[-1])

    def interp_eval(coeffs, s: jax.Array, lead: int = 0) -> PyTree:
        """Polynomial at x = s (lead..., *ctrl_shape) in [0, 1], as _interp_evaluate."""

        def ev(cs):
            e = cs[0]
            x = rows(s, e, lead).astype(e.dtype)
            total = e + x * cs[1]
            power = x
            for c in cs[2:]:
                power = power * x
                total = total + power * c
            return total

        return jax.tree.map(ev, coeffs, is_leaf=lambda c: isinstance(c, _Quartic))

    def optimal_step(dt: jax.Array, ratio: jax.Array) -> jax.Array:
        ratio = ratio.astype(tdt)
        dfactor = jnp.where(ratio < 1, jnp.asarray(1.0, tdt), jnp.asarray(_DFACTOR, tdt))
        factor = jnp.minimum(_IFACTOR, jnp.maximum(_SAFETY / ratio ** (1.0 / tab.order), dfactor))
        return dt * jnp.where(ratio == 0, jnp.asarray(_IFACTOR, tdt), factor)

    def select(mask: jax.Array, a: PyTree, b: PyTree) -> PyTree:
        return jax.tree.map(lambda u, v: jnp.where(rows(mask, u), u, v), a, b)

    grid = None
    if return_trajectory:
        if num_points is None:
            raise ValueError("return_trajectory needs num_points (the output grid)")
        grid = time_grid(num_points, final_t, max_points).astype(tdt)
        grid = jnp.broadcast_to(grid.reshape((-1,) + (1,) * len(ctrl_shape)), grid.shape + ctrl_shape)

    def body(c: _AdaptiveCarry) -> _AdaptiveCarry:
        t0, dt = c.t, c.dt
        t1 = t0 + dt
        # torchdiffeq asserts a finite dt (a non-finite one becomes min_step = 0) and t0 + dt > t0
        bad = ~c.done & ~(jnp.isfinite(dt) & (t1 > t0))
        active = ~c.done & ~bad
        ks = [c.f]
        yi = c.y
        for a, beta in zip(tab.alpha, tab.beta):
            ti = jnp.nextafter(t1, jnp.asarray(-jnp.inf, tdt)) if a == 1.0 else t0 + jnp.asarray(a, tdt) * dt
            yi = combine(c.y, ks, [coef(b, dt) for b in beta])
            ks.append(g(ti, yi))
        y1 = yi if tab.fsal else combine(c.y, ks, [coef(s, dt) for s in tab.c_sol])
        err = combine(None, ks, [coef(e, dt) for e in tab.c_error])

        def scaled(e, y0, y1):
            tol = (jnp.asarray(atol).astype(e.dtype) + jnp.asarray(rtol).astype(e.dtype)
                   * jnp.maximum(jnp.abs(y0), jnp.abs(y1)))
            return e / tol

        ratio = tree_norm(jax.tree.map(scaled, err, c.y, y1))
        accept = active & (ratio <= 1)
        dt_next = optimal_step(dt, ratio)
        finished = accept & (t1 >= t_end)

        coeffs = interp_coeffs(c.y, y1, ks, dt)
        span = t1 - t0
        x_end = interp_eval(coeffs, (t_end - t0) / span)
        x_out = select(finished, x_end, c.x_out)
        trajectory = c.trajectory
        if trajectory is not None:
            hit = accept & (grid > t0) & (grid <= t1)  # (L, *ctrl_shape)
            values = interp_eval(coeffs, (grid - t0) / span, lead=1)
            trajectory = jax.tree.map(lambda v, tr: jnp.where(rows(hit, tr[0], 1), v, tr), values, trajectory)

        return _AdaptiveCarry(
            y=select(accept, y1, c.y),
            f=select(accept, ks[-1], c.f),
            t=jnp.where(accept, t1, t0),
            dt=jnp.where(active, dt_next, dt),
            done=c.done | finished | bad,
            failed=c.failed | bad,
            nfe=c.nfe + jnp.where(active, len(tab.alpha), 0).astype(jnp.int32),
            steps=c.steps + active.astype(jnp.int32),
            it=c.it + 1,
            x_out=x_out,
            trajectory=trajectory,
        )

    def cond(c: _AdaptiveCarry) -> jax.Array:
        return (c.it < max_steps) & ~jnp.all(c.done)

    t_start = jnp.zeros(ctrl_shape, tdt)
    f0 = g(t_start, x0)
    trajectory = None
    if grid is not None:
        trajectory = jax.tree.map(lambda y: jnp.broadcast_to(y, (grid.shape[0],) + y.shape), x0)
    done = jnp.broadcast_to(t_start >= t_end, ctrl_shape)
    init = _AdaptiveCarry(
        y=x0, f=f0, t=t_start, dt=jnp.broadcast_to(jnp.asarray(first_step, tdt), ctrl_shape),
        done=done, failed=jnp.zeros(ctrl_shape, bool), nfe=jnp.ones(ctrl_shape, jnp.int32),
        steps=jnp.zeros(ctrl_shape, jnp.int32), it=jnp.int32(0), x_out=x0, trajectory=trajectory)
    out = lax.while_loop(cond, body, init)
    reached = out.done & ~out.failed
    x = select(reached, out.x_out, out.y)
    trajectory = out.trajectory
    if trajectory is not None:  # final_t (bit for bit x) and grid points a row never reached
        beyond = (grid >= t_end) | (grid > out.t)
        trajectory = jax.tree.map(lambda tr, v: jnp.where(rows(beyond, tr[0], 1), v, tr), trajectory, x)
    return ODESolution(x, out.nfe, trajectory, out.steps, ~reached)


def integrate(
    f: VelocityFn,
    x0: PyTree,
    method: str,
    *,
    final_t: float,
    num_points: int | jax.Array | None = None,
    max_points: int | None = None,
    atol: float | jax.Array = 1e-5,
    rtol: float | jax.Array = 1e-5,
    per_sequence: bool = True,
    batch_axis: int = 0,
    max_steps: int = 1000,
    first_step: float | jax.Array = FIRST_STEP,
    return_trajectory: bool = False,
) -> ODESolution:
    """Any method: fixed grids go to ``integrate_fixed`` (num_points grid points, >= 2; the
    adaptive-only arguments are ignored; f gets a scalar t), adaptive methods to
    ``integrate_adaptive`` (num_points only sets the trajectory's output grid; atol, rtol,
    per_sequence, batch_axis, max_steps, first_step apply; in per-sequence mode f gets t of
    shape (B,) and nfe is (B,))."""
    if method in _TABLEAUS:
        return integrate_adaptive(
            f, x0, final_t, method, atol=atol, rtol=rtol, per_sequence=per_sequence,
            batch_axis=batch_axis, max_steps=max_steps, first_step=first_step, num_points=num_points,
            max_points=max_points, return_trajectory=return_trajectory)
    if method not in FIXED_GRID_METHODS:
        raise UsageError(f"ODE method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if num_points is None:
        raise UsageError(f"fixed-grid method {method!r} needs num_points (grid points, >= 2)")
    return integrate_fixed(f, x0, num_points, final_t, method, max_points=max_points,
                           return_trajectory=return_trajectory)
