"""l2d_jax.solvers adaptive methods: torchdiffeq 0.2.5's step sequence (batch-wide mode),
error within tolerance, per-sequence step control, zero velocity from t = 1, step budget,
and generation with an adaptive solver."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2d_jax import solvers

METHODS = ("adaptive_heun", "bosh3", "fehlberg2", "dopri5")
STAGES = {"adaptive_heun": 1, "fehlberg2": 2, "bosh3": 3, "dopri5": 6}

# a (2, 4) state: row 0 has slow rates (easy), row 1 fast ones (hard)
A = np.array([[0.1, -0.2, 0.15, -0.05], [-6.0, 4.0, -3.0, 5.0]])
X0 = np.array([[1.0, -0.5, 2.0, 0.25], [-1.0, 0.8, 0.1, 1.5]])
DECAY, L2D, NONAUTO, LOUD_AT_ONE = 0, 1, 2, 3


def family(t, x, which, a):
    """Three test ODEs, picked by a traced index (one compiled solver serves all three):
    DECAY: dx/dt = a x (1 - t)^6, so x(1) = x0 exp(a / 7) (smooth through t = 1, where the
      solver zeroes the velocity anyway);
    L2D: the L2D shape (tanh(2x) - x) / (1 - t), NaN from t = 1 (must never be used there);
    NONAUTO: dx/dt = (1 + t) sin(x) a;
    LOUD_AT_ONE: DECAY, but 1e6 from t = 1 (a solver that used it there would be far off).
    a: the rates, like x. In per-sequence mode t is (B,), one time per row."""
    tt = t if jnp.ndim(t) == 0 else t[:, None]
    terms = (a * x * (1 - tt) ** 6,
             jnp.where(tt >= 1, jnp.nan, (jnp.tanh(2 * x) - x) / (1 - tt)),
             (1 + tt) * jnp.sin(x) * a,
             jnp.where(tt >= 1, 1e6, a * x * (1 - tt) ** 6))
    return sum(jnp.where(which == i, v, 0.0) for i, v in enumerate(terms))


TRACES = []


@functools.partial(jax.jit, static_argnames=("method", "per_sequence", "max_steps"))
def solve(x0, which, tol, method, per_sequence, max_steps=1000, rates=A):
    TRACES.append((method, per_sequence, max_steps))
    return solvers.integrate(lambda t, x: family(t, x, which, rates), x0, method, final_t=1.0,
                             atol=tol, rtol=tol, per_sequence=per_sequence, max_steps=max_steps,
                             num_points=5, return_trajectory=not per_sequence)


# From torchdiffeq 0.2.5 (an external reference, computed outside the tests):
# odeint(ode_fn, X0 float64, torch.linspace(0, 1, 2), rtol=tol, atol=tol, method=method,
# options=dict(first_step=0.05)) with ode_fn as the L2D original's (every call counted, zero
# velocity for t >= 1): (NFE, final state).
TORCHDIFFEQ = {
    ("adaptive_heun", L2D, 1e-05): (299, [[0.9575043212855465, -0.9574997158920144, 0.9575099414907546, 0.9574941416381121], [-0.9575043212855465, 0.9575028249054597, 0.9574814387684111, 0.957507352970692]]),  # noqa: E501
    ("adaptive_heun", NONAUTO, 0.001): (37, [[1.129033472108991, -0.37556958057371986, 2.1912721252769374, 0.2323659340950451], [-0.0004111028302441802, 3.123967606644094, 0.0013645036294013583, 3.13915916952327]]),  # noqa: E501
    ("bosh3", L2D, 1e-05): (208, [[0.9575054679771346, -0.957483096708223, 0.9575327769117818, 0.9574560286535333], [-0.9575054679771346, 0.9574981984791793, 0.9573943876393292, 0.9575201979161171]]),  # noqa: E501
    ("bosh3", NONAUTO, 0.001): (34, [[1.1296956469928383, -0.3750423684029045, 2.1921506331804106, 0.23228299171282935], [-7.156756873496314e-05, 3.1385261572381524, 0.0009101197349784423, 3.142007788288305]]),  # noqa: E501
    ("fehlberg2", L2D, 1e-05): (77, [[0.9576531381209975, -0.9553516889556727, 0.9604884171770006, 0.9525733543118986], [-0.9576531381209975, 0.9569033054870459, 0.9462177909407687, 0.959179093755868]]),  # noqa: E501
    ("fehlberg2", NONAUTO, 0.001): (7, [[1.1305343881847714, -0.37290557036388067, 2.194834987377038, 0.2320683082742074], [-5.86566737185962, 1.6973871412751143, 0.06298232703272916, 0.724345358462839]]),  # noqa: E501
    ("dopri5", L2D, 1e-05): (271, [[0.957564377272795, -0.9566297964198908, 0.9587067870057193, 0.9555004096552085], [-0.957564377272795, 0.9572605728324317, 0.9529345546693151, 0.958180359551701]]),  # noqa: E501
    ("dopri5", NONAUTO, 0.001): (49, [[1.1305377603152822, -0.3743466929360638, 2.193298864956691, 0.23217498524545646], [-0.00017260403610664315, 3.1300389778690105, 0.0011114512443487772, 3.140345137854079]]),  # noqa: E501
}

# Global error allowed, in units of atol + rtol |x|. torchdiffeq's fehlberg2 controls the
# error of its first-order solution (tiny error constant) but advances the second-order one
# from the first-order stage's derivative, so its error runs at ~100-300 tolerances here.
ERROR_FACTOR = {"adaptive_heun": 5.0, "bosh3": 5.0, "fehlberg2": 500.0, "dopri5": 5.0}


@pytest.mark.parametrize("method", METHODS)
def test_batch_wide_matches_torchdiffeq(method):
    with jax.enable_x64(True):
        for which in (L2D, NONAUTO):
            tol = 1e-5 if which == L2D else 1e-3
            nfe, ref = TORCHDIFFEQ[method, which, tol]
            sol = solve(jnp.asarray(X0), which, tol, method, False)
            assert sol.nfe.shape == () and int(sol.nfe) == nfe
            assert int(sol.nfe) == 1 + STAGES[method] * int(sol.steps) and not bool(sol.unfinished)
            np.testing.assert_allclose(np.asarray(sol.x), ref, rtol=1e-10, atol=1e-12)
            # the output grid's ends: x0, and the final state
            np.testing.assert_array_equal(sol.trajectory[0], X0)
            np.testing.assert_array_equal(sol.trajectory[-1], sol.x)


@pytest.mark.parametrize("method", METHODS)
def test_error_within_tolerance_and_nfe_grows_when_tightened(method):
    exact = X0 * np.exp(A / 7)
    with jax.enable_x64(True):
        for per_sequence in (False, True):
            nfes = []
            for tol in (1e-3, 1e-5):
                sol = solve(jnp.asarray(X0), DECAY, tol, method, per_sequence)
                assert not np.asarray(sol.unfinished).any()
                bound = ERROR_FACTOR[method] * (tol + tol * np.abs(exact))
                assert (np.abs(np.asarray(sol.x) - exact) <= bound).all(), (per_sequence, tol)
                nfes.append(np.asarray(sol.nfe))
            # (dopri5's easy row takes its minimum of 3 steps, 0.05, 0.5, 5, at both)
            assert (nfes[1] >= nfes[0]).all() and nfes[1].sum() > nfes[0].sum(), (per_sequence, nfes)
            if not per_sequence:
                # the grid points, interpolated with torchdiffeq's quartic: less accurate than
                # the steps (bosh3's midpoint value is half an Euler step; up to ~40 tolerances)
                t = np.linspace(0, 1, 5)[:, None, None]
                exact_grid = X0 * np.exp(A * (1 - (1 - t) ** 7) / 7)
                err = np.abs(np.asarray(sol.trajectory) - exact_grid)
                assert (err <= 20 * ERROR_FACTOR[method] * (tol + tol * np.abs(exact_grid))).all()


@pytest.mark.parametrize("method", METHODS)
def test_per_sequence_rows_have_their_own_steps(method):
    with jax.enable_x64(True):
        per_row = solve(jnp.asarray(X0), DECAY, 1e-5, method, True)
        batch = solve(jnp.asarray(X0), DECAY, 1e-5, method, False)
        nfe = np.asarray(per_row.nfe)
        assert nfe.shape == (2,) and nfe[0] < nfe[1]  # the easy row stops early
        np.testing.assert_array_equal(nfe, 1 + STAGES[method] * np.asarray(per_row.steps))
        # one count for the whole batch, rows step together; the RMS norm over the whole
        # batch averages the hard row's error with the easy row's
        assert batch.nfe.shape == () and nfe[0] < int(batch.nfe) <= nfe[1]
        # each row gets what it gets alone: batch-wide on a batch of copies of that row
        for r in range(2):
            copies = jnp.asarray(np.stack([X0[r], X0[r]]))
            alone = solve(copies, DECAY, 1e-5, method, False, rates=np.stack([A[r], A[r]]))
            assert int(alone.nfe) == nfe[r]
            np.testing.assert_allclose(np.asarray(per_row.x)[r], np.asarray(alone.x)[0], rtol=1e-12)


def test_velocity_is_zero_from_t_one():
    """torchdiffeq's last stages land on and past t = 1, where the solver must use a zero
    velocity, not f: the L2D-shaped velocity (NaN there) still gives a finite result, and a
    velocity that is 1e6 there gives the exact solution of its smooth part, x0 exp(a / 7)."""
    exact = X0 * np.exp(A / 7)
    with jax.enable_x64(True):
        for per_sequence in (False, True):
            for method in METHODS:
                sol = solve(jnp.asarray(X0), L2D, 1e-3, method, per_sequence)
                assert np.isfinite(np.asarray(sol.x)).all()
                loud = np.asarray(solve(jnp.asarray(X0), LOUD_AT_ONE, 1e-6, method, per_sequence).x)
                np.testing.assert_allclose(loud, exact, rtol=1e-3, atol=1e-4, err_msg=method)


def test_traced_tolerances_do_not_recompile():
    with jax.enable_x64(True):
        solve(jnp.asarray(X0), DECAY, 1e-3, "bosh3", True)
        n = len(TRACES)
        for tol in (1e-2, 1e-4, 3e-6):
            solve(jnp.asarray(X0), DECAY, tol, "bosh3", True)
        assert len(TRACES) == n


def test_step_budget_flag():
    with jax.enable_x64(True):
        sol = solve(jnp.asarray(X0), DECAY, 1e-5, "adaptive_heun", True, max_steps=5)
        np.testing.assert_array_equal(np.asarray(sol.unfinished), [True, True])
        np.testing.assert_array_equal(np.asarray(sol.steps), [5, 5])
        np.testing.assert_array_equal(np.asarray(sol.nfe), [6, 6])
        assert np.isfinite(np.asarray(sol.x)).all()


def test_dispatch_and_float32():
    f = lambda t, x: -x  # noqa: E731
    x0 = jnp.ones((2, 3))
    fixed = solvers.integrate(f, x0, "midpoint", final_t=1.0, num_points=5)
    ref = solvers.integrate_fixed(f, x0, 5, 1.0, "midpoint")
    np.testing.assert_array_equal(fixed.x, ref.x)
    assert int(fixed.nfe) == 8 and fixed.unfinished is None
    with pytest.raises(ValueError, match="num_points"):
        solvers.integrate(f, x0, "rk4", final_t=1.0)
    with pytest.raises(ValueError, match="dopri5"):
        solvers.integrate(f, x0, "dopri8", final_t=1.0)
    # float32 state (generation): float32 times, close to the exact exp(-0.9)
    sol = solvers.integrate(f, x0, "dopri5", final_t=0.9, atol=1e-6, rtol=1e-6)
    assert sol.x.dtype == jnp.float32 and sol.nfe.dtype == jnp.int32 and sol.nfe.shape == (2,)
    np.testing.assert_allclose(sol.x, np.exp(-0.9), rtol=1e-5)


@pytest.mark.slow  # ~15-50 s on CPU: compiles generation (and nstep) with an adaptive solver inside
def test_generate_and_nstep_with_adaptive_solvers():
    import jax_tiny

    from l2d_jax.generate import GenerateOptions, generate
    from l2d_jax.nstep import ODEOptions, nstep

    model = jax_tiny.tiny_l2d()
    ids = jnp.array([[5, 6, 7, 8], [0, 0, 9, 10]], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 1, 1]], jnp.int32)
    opts = GenerateOptions(max_new_tokens=3, max_ode_points=8,
                           ode=ODEOptions(method="bosh3", atol=1e-3, rtol=1e-3, per_sequence=True))
    out = generate(model, ids, mask, key=jax.random.PRNGKey(0), ode_steps=2, opts=opts)
    tokens, nfe = np.asarray(out.tokens), np.asarray(out.nfe)
    assert tokens.shape == (2, 3) and ((tokens >= 0) & (tokens < 96)).all()
    assert nfe.shape == (2,) and (nfe > 0).all()

    # nstep over every position, dopri5, one step size per row, with the output grid
    x0 = 64.0 * jax.random.normal(jax.random.PRNGKey(1), (2, 4, 16))
    ode = ODEOptions(method="dopri5", atol=1e-4, rtol=1e-4, x1_estimation="average", temperature=1.0)
    res = nstep(model, ids, x0, 5, ode, attention_mask=mask, return_trajectory=True)
    assert res.nfe.shape == (2,) and (np.asarray(res.nfe) > 1).all()
    assert res.trajectory.shape == (5, 2, 4, 16) and np.isfinite(np.asarray(res.logits)).all()
    np.testing.assert_array_equal(res.trajectory[0], x0)
    np.testing.assert_array_equal(res.trajectory[-1], res.x)
