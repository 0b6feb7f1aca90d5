"""The XLA:CPU few-row matmul custom call (l2d_jax/kernels/cpu_matvec.{py,cc}).

Every test compares against float64 numpy or XLA's own dot, on shapes that hit each split of
the kernel: narrow (K, N) split over the rows of w (partial sums added up), wide (K, N) split
over columns, the (N, K) layout split over outputs, sizes that are not multiples of the
unrolling (4 or 8 rows, 16 columns), and matrices too small to split; and calls with several
weights that share the input (their columns split as one concatenated matrix, across the
weights' boundaries).
"""

from __future__ import annotations

import functools

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2d_jax.kernels import cpu_matvec, library

pytestmark = pytest.mark.skipif(not library.load(), reason="no C++ compiler")

SHAPES = [(576, 576), (576, 192), (1536, 576), (576, 1536), (576, 8192), (37, 5), (3, 3000), (130, 1)]


def _has_custom_call(fn, *args) -> bool:
    """Traced afresh (a new function each time): the kernel switch is read at trace time."""
    return cpu_matvec.TARGET in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


# groups of weights sharing the input: q/k/v (narrow, row split), gate/up + two LoRA A's
# (wide, column split across weight boundaries), odd sizes, one tiny weight among big ones;
# and every single shape as a group of one
GROUPS = [(576, (576, 192, 192)), (576, (1536, 1536, 32, 32)), (37, (5, 3000, 1)), (130, (1, 7)),
          (576, (49152 // 16, 576))] + [(k, (n,)) for k, n in SHAPES]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_matches_float64(rows, transposed):
    """Each group is one custom call; every output matches float64."""
    rng = np.random.default_rng(rows)
    for k, ns in GROUPS:
        x = rng.standard_normal((rows, k)).astype(np.float32)
        ws = [rng.standard_normal((n, k) if transposed else (k, n)).astype(np.float32) for n in ns]
        fn = jax.jit(lambda a, *b: cpu_matvec.matmuls(a, b, transposed=transposed, kernel=True))
        hlo = fn.lower(x, *ws).as_text()
        assert hlo.count(f"custom_call @{cpu_matvec.TARGET}(") == 1
        for w, got in zip(ws, fn(x, *ws), strict=True):
            want = x.astype(np.float64) @ (w.T if transposed else w).astype(np.float64)
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4 * np.sqrt(k),
                                       err_msg=f"{(k, ns)}")


def test_several_weights_gradient_and_errors():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 40)), jnp.float32)
    ws = tuple(jnp.asarray(rng.standard_normal((40, n)), jnp.float32) for n in (24, 3, 50))

    def loss(a, b, f):
        return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(f(a, b)))

    got = jax.grad(loss, argnums=(0, 1))(x, ws, lambda a, b: cpu_matvec.matmuls(a, b, kernel=True))
    want = jax.grad(loss, argnums=(0, 1))(x, ws, lambda a, b: [a @ w for w in b])
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not contract"):
        cpu_matvec.matmuls(x, [ws[0], jnp.ones((41, 3), jnp.float32)])


def test_dispatch_rules():
    x1 = jnp.ones((1, 64), jnp.float32)
    w = jnp.ones((64, 32), jnp.float32)
    mm = functools.partial(cpu_matvec.matmul, kernel=True)
    assert _has_custom_call(mm, x1, w)
    many = jnp.ones((cpu_matvec.MAX_ROWS + 1, 64), jnp.float32)
    assert not _has_custom_call(mm, many, w)  # matrix-matrix: XLA's dot
    assert not _has_custom_call(mm, x1.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert not _has_custom_call(cpu_matvec.matmul, x1, w)  # the xla backend (kernel=False)


def test_gradient_and_vmap_match_xla():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 40)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    for transposed, ww in ((False, w), (True, w.T)):
        def loss(a, b, f):
            return jnp.sum(jnp.sin(f(a, b, transposed)))

        got = jax.grad(loss, argnums=(0, 1))(x, ww, lambda a, b, t: cpu_matvec.matmul(a, b, transposed=t, kernel=True))
        want = jax.grad(loss, argnums=(0, 1))(x, ww, lambda a, b, t: cpu_matvec._xla(a, (b,), t)[0])
        for g, h in zip(got, want):
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
    xs = jnp.asarray(rng.standard_normal((3, 1, 40)), jnp.float32)
    got = jax.vmap(lambda a: cpu_matvec.matmul(a, w))(xs)
    np.testing.assert_allclose(got, xs @ w, rtol=1e-5, atol=1e-5)


def test_concurrent_calls_are_correct():
    """Two host threads run kernel programs at once, both splitting over XLA's intra-op pool
    (each call claims only its own parts); both results stay exact."""
    rng = np.random.default_rng(1)
    ws = [jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32) for _ in range(2)]
    xs = [jnp.asarray(rng.standard_normal((1, 576)), jnp.float32) for _ in range(2)]
    fn = jax.jit(lambda a, b: cpu_matvec.matmul(a, b, kernel=True))
    wants = [np.asarray(x, np.float64) @ np.asarray(w, np.float64) for x, w in zip(xs, ws)]
    errors = []

    def worker(i):
        for _ in range(50):
            got = np.asarray(fn(xs[i], ws[i]))
            if not np.allclose(got, wants[i], rtol=1e-4, atol=1e-3):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
