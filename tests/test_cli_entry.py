"""The ``l2d-jax`` console script re-runs itself once so that glibc backs XLA's large
buffers (the weights) with transparent huge pages (``cli.entry`` / ``cli.hugepages_env``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2d_jax import cli

linux_glibc = pytest.mark.skipif(cli.hugepages_env({}) is None, reason="not Linux with glibc")


@linux_glibc
def test_hugepages_env_adds_the_tunable_once_and_keeps_others():
    env = cli.hugepages_env({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + cli.HUGEPAGES_TUNABLE}
    assert cli.hugepages_env(env) is None  # already set: no second re-run
    assert cli.hugepages_env({"L2D_HUGEPAGES": "0"}) is None  # opted out


@linux_glibc
def test_entry_reruns_the_cli_with_the_tunable(monkeypatch):
    calls = []
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("L2D_HUGEPAGES", raising=False)
    monkeypatch.setattr(sys, "argv", ["l2d-jax", "bench", "generate", "--batch", "1"])
    monkeypatch.setattr(cli, "main", lambda: 0)
    cli.entry(execve=lambda *a: calls.append(a))
    (path, argv, env), = calls
    assert argv == [sys.executable, "-m", "l2d_jax.cli", "bench", "generate", "--batch", "1"]
    assert path == sys.executable and env["GLIBC_TUNABLES"] == cli.HUGEPAGES_TUNABLE


@linux_glibc
def test_the_rerun_process_backs_large_buffers_with_huge_pages():
    """What the tunable buys: a 64 MB XLA buffer on huge pages (the host's THP mode allows it)."""
    code = ("import jax.numpy as jnp; x = jnp.ones((16 << 20,), jnp.float32).block_until_ready(); "
            "from l2d_jax.bench import _huge_pages_mb; print(_huge_pages_mb())")
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are off on this host")
    env = cli.hugepages_env({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    got = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    assert got >= 32


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    """The project's own errors (UsageError, L2DError) exit 2 with one line; a plain
    ValueError from inside is a bug and propagates with its traceback."""
    from l2d_jax import plan as plan_lib
    from l2d_jax.errors import UsageError

    config = str(Path(__file__).parent.parent / "configs" / "tiny_test.py")
    args = ["plan", "--config", config, "--mesh", "data=1"]

    def user_error(*a, **k):
        raise UsageError("mesh data=3 does not divide the 2 devices; use data=1 or data=2")

    monkeypatch.setattr(plan_lib, "plan", user_error)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: mesh data=3 does not divide the 2 devices; use data=1 or data=2"

    def bug(*a, **k):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(plan_lib, "plan", bug)
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(args)
