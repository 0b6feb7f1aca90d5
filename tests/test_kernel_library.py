"""Building and loading the CPU kernels' shared library (l2d_jax/kernels/library.py)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from l2d_jax.kernels import backend, cpu_matvec, library
from l2d_jax.models import block
from tests.jax_tiny import tiny_llm

pytestmark = pytest.mark.skipif(not library.load(), reason="no C++ compiler")


def test_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv(library.ENV_DIR, str(tmp_path))
    monkeypatch.setenv("CXX", "/bin/false")
    library.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="(?s)CPU kernels unavailable.*'xla' kernel backend"):
            assert not library.load()
        cfg = tiny_llm().cfg
        assert backend.resolve("auto", cfg) == backend.XLA  # auto falls back
        with pytest.raises(backend.KernelBackendError, match="did not build"):
            backend.resolve("cpu", cfg)
        x, w = jnp.ones((1, 8), jnp.float32), jnp.ones((8, 4), jnp.float32)
        q = jnp.ones((1, 1, 2, 8), jnp.float32)
        cache = {"k": jnp.ones((1, 1, 1, 3, 8), jnp.float32), "v": jnp.ones((1, 1, 1, 3, 8), jnp.float32)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.testing.assert_allclose(cpu_matvec.matmul(x, w), np.full((1, 4), 8.0))
            out = block.attend_kv(q, cache, 0, jnp.ones((1, 1, 3), bool))
        np.testing.assert_allclose(out, np.ones((1, 1, 16)), rtol=1e-6)
        assert not list(tmp_path.glob("*.so"))  # the failed build left nothing behind
    finally:
        library.load.cache_clear()
    monkeypatch.undo()
    assert library.load() and backend.resolve("auto", tiny_llm().cfg) == backend.Kernels(True, True, True)


def test_build_is_keyed_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv(library.ENV_DIR, str(tmp_path))
    path = library.library_path()
    assert path.parent == tmp_path and path.name.startswith("l2d_cpu_kernels-")
    assert library.build() == path and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left over
    names = [p.name for p in library.sources()]
    assert {"cpu_matvec.cc", "cpu_attention.cc", "parallel.h"} <= set(names)
