"""l2d_jax.solvers: the torch float32 time grid, orders of accuracy, traced step counts."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2d_jax import solvers

GOLDENS = Path(__file__).parent / "goldens"
STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "heun2": 2, "heun3": 3, "rk4": 4}


@pytest.mark.parametrize("golden_set", ["llama_lora", "llama_tied"])
def test_time_grid_golden_bits(golden_set):
    with np.load(GOLDENS / golden_set / "cases.npz") as cases:
        grids = {k: cases[k] for k in cases.files if k.startswith("nstep_") and k.endswith("_tgrid")}
    assert grids
    traced = jax.jit(lambda n: solvers.time_grid(n, 1.0, max_points=8))
    for name, ref in grids.items():
        n = int(name.split("_s")[1].split("_")[0])
        assert ref.shape == (n,) and ref.dtype == np.float32
        ours = np.asarray(solvers.time_grid(n, 1.0))
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
        padded = np.asarray(traced(n))
        np.testing.assert_array_equal(padded[:n].view(np.uint32), ref.view(np.uint32))
        np.testing.assert_array_equal(padded[n:], np.float32(1.0))


def test_time_grid_matches_torch_linspace():
    torch = pytest.importorskip("torch")
    for final_t in (1.0, 0.9, 0.7, 1 / 3):
        for n in range(2, 130):
            ref = torch.linspace(0, final_t, n).numpy()
            ours = np.asarray(solvers.time_grid(n, final_t))
            np.testing.assert_array_equal(
                ours.view(np.uint32), ref.view(np.uint32), err_msg=f"N={n}, final_t={final_t}"
            )


def linear_ode(t, x):
    """dx/dt = (1 + t) x, so x(T) = x(0) exp(T + T^2 / 2)."""
    return (1.0 + t) * x


@pytest.mark.parametrize(
    "method, order, steps",
    [("euler", 1, 8), ("midpoint", 2, 8), ("heun", 2, 8), ("heun3", 3, 4), ("rk4", 4, 4)],
)
def test_order_of_accuracy(method, order, steps):
    # float64 state; final t 0.5 < 1 (the velocity is never forced to zero) with grids of
    # 2^k steps, whose points are exact in float32 (the time grid is float32)
    with jax.enable_x64(True):
        x0 = jnp.array([1.0, -0.5], jnp.float64)
        exact = np.asarray(x0) * np.exp(0.5 + 0.5**2 / 2)
        run = jax.jit(lambda n: solvers.integrate_fixed(linear_ode, x0, n, 0.5, method, max_points=33).x)
        errors = [np.abs(np.asarray(run(k * steps + 1)) - exact).max() for k in (1, 2, 4)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(0.85 * 2**order < r < 1.15 * 2**order for r in ratios), (errors, ratios)


@pytest.mark.parametrize(
    "method, quadrature",
    [  # one step of x' = t^3 over [0, h]: the method's nodes and weights (torchdiffeq's tableaus)
        ("euler", lambda h: 0.0),
        ("midpoint", lambda h: h * (h / 2) ** 3),
        ("heun2", lambda h: h * (0.0 + h**3) / 2),
        ("heun3", lambda h: h * 0.75 * (2 * h / 3) ** 3),
        ("rk4", lambda h: h * (0.0 + 3 * (h / 3) ** 3 + 3 * (2 * h / 3) ** 3 + h**3) / 8),  # 3/8 rule
    ],
)
def test_single_step_nodes_and_weights(method, quadrature):
    with jax.enable_x64(True):
        sol = solvers.integrate_fixed(lambda t, x: jnp.full_like(x, t**3), jnp.zeros(1), 2, 0.5, method)
    np.testing.assert_allclose(sol.x, [quadrature(0.5)], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4"])
def test_traced_steps_match_static_and_do_not_retrace(method):
    traces = []

    def solve(x0, n):
        traces.append(None)
        return solvers.integrate_fixed(linear_ode, x0, n, 0.9, method, max_points=12, return_trajectory=True)

    jitted = jax.jit(solve)
    x0 = jnp.array([[1.0, 2.0], [-3.0, 0.5]])
    for n in (2, 12, 7):
        traced = jitted(x0, n)
        static = jax.jit(lambda x: solvers.integrate_fixed(linear_ode, x, n, 0.9, method))(x0)
        # different programs: XLA may contract multiply-adds differently, so not bit-equal
        np.testing.assert_allclose(traced.x, static.x, rtol=1e-6)
        np.testing.assert_array_equal(traced.trajectory[n - 1], traced.x)
        assert int(traced.nfe) == int(static.nfe) == STAGES[method] * (n - 1)
    assert len(traces) == 1


@pytest.mark.parametrize("method", list(STAGES))
def test_nfe_counts(method):
    calls = []

    def f(t, x):
        jax.debug.callback(lambda: calls.append(None))
        return -x

    sol = solvers.integrate_fixed(f, jnp.ones(3), 6, 0.9, method)
    jax.effects_barrier()
    assert int(sol.nfe) == len(calls) == STAGES[method] * 5


@pytest.mark.parametrize("method", list(STAGES))
def test_trajectory(method):
    # constant velocity: every method is exact, x(t) = x0 + c t at the grid points
    x0 = jnp.array([1.0, -2.0, 0.5])
    c = jnp.array([0.5, 1.0, -3.0])
    sol = solvers.integrate_fixed(lambda t, x: c, x0, 5, 0.8, method, max_points=9, return_trajectory=True)
    assert sol.trajectory.shape == (9, 3)
    np.testing.assert_array_equal(sol.trajectory[0], x0)
    grid = np.asarray(solvers.time_grid(5, 0.8))
    np.testing.assert_allclose(sol.trajectory[:5], np.asarray(x0) + np.asarray(c) * grid[:, None], atol=1e-6)
    np.testing.assert_array_equal(sol.trajectory[5:], np.broadcast_to(sol.x, (4, 3)))
    plain = solvers.integrate_fixed(lambda t, x: c, x0, 5, 0.8, method, return_trajectory=True)
    assert plain.trajectory.shape == (5, 3)
    assert solvers.integrate_fixed(lambda t, x: c, x0, 5, 0.8, method).trajectory is None


def test_velocity_is_zero_from_t_one():
    # heun2 with one step to t = 1: k1 = f(0) = 1, k2 = f(1) -> 0, x = 0.5 (not 1)
    sol = solvers.integrate_fixed(lambda t, x: jnp.ones_like(x), jnp.zeros(2), 2, 1.0, "heun2")
    np.testing.assert_allclose(sol.x, 0.5)

    # a velocity that blows up at t = 1 is never evaluated there
    def singular(t, x):
        return jnp.where(t >= 1, jnp.nan, (1.0 - x) / (1.0 - t))

    for method in ("heun3", "rk4"):
        sol = solvers.integrate_fixed(singular, jnp.zeros(2), 5, 1.0, method)
        assert np.isfinite(np.asarray(sol.x)).all()


def test_time_dtype_and_pytree_state():
    seen = []

    def f(t, x):
        seen.append(t.dtype)
        return {"a": -x["a"], "b": x["b"] * t}

    with jax.enable_x64(True):
        x0 = {"a": jnp.ones(2, jnp.float64), "b": jnp.ones((2, 3), jnp.float64)}
        sol = solvers.integrate_fixed(f, x0, 4, 0.9, "midpoint", return_trajectory=True)
        assert sol.x["a"].dtype == jnp.float64 and sol.trajectory["b"].shape == (4, 2, 3)
        assert set(seen) == {jnp.dtype(jnp.float64)}
    seen.clear()
    sol = solvers.integrate_fixed(f, {"a": jnp.ones(2), "b": jnp.ones(3)}, 4, 0.9, "rk4")
    assert sol.x["b"].dtype == jnp.float32 and set(seen) == {jnp.dtype(jnp.float32)}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="ODE method.*'euler'"):
        solvers.integrate_fixed(linear_ode, jnp.ones(2), 4, 1.0, "dopri5")
    with pytest.raises(ValueError, match=">= 2"):
        solvers.integrate_fixed(linear_ode, jnp.ones(2), 1, 1.0, "euler")
    with pytest.raises(ValueError, match="max_points"):
        solvers.integrate_fixed(linear_ode, jnp.ones(2), 9, 1.0, "euler", max_points=8)
    with pytest.raises(ValueError, match="max_points"):
        jax.jit(lambda n: solvers.integrate_fixed(linear_ode, jnp.ones(2), n, 1.0, "euler").x)(4)
    with pytest.raises(ValueError, match="max_points"):
        jax.jit(lambda n: solvers.time_grid(n, 1.0))(4)
