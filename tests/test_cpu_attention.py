"""The XLA:CPU decoding-attention custom call (l2d_jax/kernels/cpu_attention.{py,cc}).

Compared with ``block.attend`` (XLA) on the layer's slice, on shapes that hit each path of the
kernel: grouped query heads, several query rows, keys not a multiple of the 8-key blocks,
head sizes that are a multiple of 64 (vector paths), of neither 8 nor 64 (plain loops), a
layer big enough to split over the thread pool, and fully masked rows.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2d_jax.kernels import cpu_attention, library
from l2d_jax.models import block as llm

pytestmark = pytest.mark.skipif(not library.load(), reason="no C++ compiler")

# (B, T, H, Hkv, S, hd, L)
SHAPES = [(1, 1, 9, 3, 40, 64, 3), (3, 2, 8, 2, 1000, 64, 2), (2, 8, 4, 4, 7, 64, 1),
          (2, 3, 4, 2, 37, 12, 2), (1, 1, 4, 1, 333, 128, 1), (1, 2, 6, 3, 19, 72, 1)]


def _inputs(shape, seed=0):
    b, t, h, hkv, s, hd, layers = shape
    rng = np.random.default_rng(seed)
    q = jnp.asarray(3 * rng.standard_normal((b, t, h, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((layers, b, hkv, s, hd)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((layers, b, hkv, s, hd)), jnp.float32)
    mask = rng.random((b, t, s)) > 0.3
    mask[0, 0] = False  # a row with nothing to attend to: XLA averages all values
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_xla_attention_on_each_layer(shape):
    q, k, v, mask = _inputs(shape)
    for layer in range(k.shape[0]):
        fn = jax.jit(lambda a, kk, vv, m, i=layer: cpu_attention.attend(a, kk, vv, i, m, llm.attend))
        # the compiled program is the one call on the stacked cache: nothing copies or slices
        # the layer out of it
        hlo = fn.lower(q, k, v, mask).compile().as_text()
        entry = hlo[hlo.index("ENTRY"):]
        assert entry.count(f'custom_call_target="{cpu_attention.TARGET}"') == 1
        assert not re.search(r" (copy|slice|dynamic-slice|fusion)\(", entry)
        got = fn(q, k, v, mask)
        want = llm.attend(q, k[layer], v[layer], mask)
        assert got.shape == want.shape == (q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}")


def test_gradient_goes_through_xla_attention():
    q, k, v, mask = _inputs((2, 1, 4, 2, 20, 64, 2))

    def loss(f, a, kk, vv):
        return jnp.sum(jnp.sin(f(a, kk, vv)))

    kernel = lambda a, kk, vv: cpu_attention.attend(a, kk, vv, 1, mask, llm.attend)  # noqa: E731
    xla = lambda a, kk, vv: llm.attend(a, kk[1], vv[1], mask)  # noqa: E731
    got = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[1][0]))  # layer 0 is not read


def test_dispatch_rules_and_errors():
    q, k, v, mask = _inputs((1, 1, 4, 2, 16, 64, 2))
    cache = {"k": k, "v": v}

    def uses_kernel(q, kv, mask, kernel=True):
        fn = jax.jit(lambda a, c, m: llm.attend_kv(a, c, 1, m, kernel))
        return cpu_attention.TARGET in fn.lower(q, kv, mask).as_text()

    assert uses_kernel(q, cache, mask)
    assert not uses_kernel(q, (k[1], v[1]), mask)  # a layer's own pair (training): XLA
    assert not uses_kernel(q.astype(jnp.bfloat16), cache, mask)
    many = jnp.ones((1, cpu_attention.MAX_ROWS + 1, 4, 64), jnp.float32)
    assert not uses_kernel(many, cache, jnp.ones((1, cpu_attention.MAX_ROWS + 1, 16), bool))
    assert not uses_kernel(q, cache, mask, kernel=False)  # the xla backend
    with pytest.raises(ValueError, match="mask"):
        cpu_attention.attend(q, k, v, 0, mask[:, :, :5], llm.attend)


def test_layer_index_of_a_scan():
    """In a scan over layers the layer is a traced operand: each step reads its own layer."""
    q, k, v, mask = _inputs((2, 1, 4, 2, 24, 64, 3))

    def per_layer(kernel):
        def body(_, i):
            return None, llm.attend_kv(q, {"k": k, "v": v}, i, mask, kernel)
        return jax.jit(lambda: jax.lax.scan(body, None, jnp.arange(3))[1])()

    np.testing.assert_allclose(per_layer(True), per_layer(False), rtol=1e-5, atol=1e-5)
