"""``l2d-jax env``: versions, JAX backend, accelerators seen without JAX, ``--require``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from l2d_jax import cli
from l2d_jax.environment import REQUIRE_EXIT, accelerator_warnings, backend_kind, detect_accelerators

REPO = Path(__file__).resolve().parent.parent


def fake_nvidia_smi(bin_dir: Path, *, names: str = "NVIDIA H100 80GB HBM3", rc: int = 0) -> Path:
    """An executable ``nvidia-smi`` that prints GPU names like the real ``--query-gpu=name``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '{names}\\n'\nexit {rc}\n")
    exe.chmod(0o755)
    return exe


def test_cli_on_this_cpu_machine_with_a_fake_gpu_warns_and_require_gpu_exits_3(tmp_path):
    """A real CLI process: JAX runs on the CPU here; a fake nvidia-smi makes a GPU 'present'."""
    fake_nvidia_smi(tmp_path / "bin")
    (tmp_path / "root" / "dev").mkdir(parents=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "L2D_PROBE_ROOT": str(tmp_path / "root"),
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "L2D_SOMETHING": "x"}
    proc = subprocess.run([sys.executable, "-m", "l2d_jax.cli", "env", "--json", "--require", "gpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == REQUIRE_EXIT, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "cpu" and report["device_kinds"] == {"cpu": report["device_count"]}
    assert report["versions"]["jax"] == jax.__version__ and report["process_count"] == 1
    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["accelerators"] == {"gpu": ["nvidia-smi: NVIDIA H100 80GB HBM3"], "tpu": []}
    assert report["env"]["JAX_PLATFORMS"] == "cpu" and report["env"]["L2D_SOMETHING"] == "x"
    assert "PATH" not in report["env"]
    (warning,) = report["warnings"]
    assert "GPU present" in warning and "unset JAX_PLATFORMS" in warning
    assert "WARNING" in proc.stderr and "GPU present" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --require gpu: JAX's default backend is cpu") and "--target cuda12" in last
    assert "Traceback" not in proc.stderr


def test_require_cpu_passes_and_tpu_fails_in_process(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("L2D_PROBE_ROOT", str(tmp_path))  # no /dev at all: nothing seen
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert cli.main(["env", "--require", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "jax backend cpu" in out and f"jax {jax.__version__}" in out and "WARNING" not in err
    assert cli.main(["env", "--require", "tpu"]) == REQUIRE_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --require tpu") and "--target tpu" in err and len(err.splitlines()) == 1


def test_detect_accelerators_reads_a_fake_dev_tree_and_nvidia_smi(tmp_path):
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").touch()  # the VFIO control node exists on hosts without a TPU
    empty_path = str(tmp_path / "nothing")
    assert detect_accelerators(tmp_path, path=empty_path) == {"gpu": [], "tpu": []}
    (dev / "vfio" / "0").touch()  # v5e / v6e: one IOMMU group per chip
    (dev / "accel0").touch()  # v4 and older
    (dev / "nvidia0").touch()
    found = detect_accelerators(tmp_path, path=empty_path)
    assert found == {"gpu": [str(dev / "nvidia0")], "tpu": [str(dev / "accel0"), str(dev / "vfio" / "0")]}
    broken = fake_nvidia_smi(tmp_path / "bin", names="", rc=9)  # the tool without a driver / GPU
    assert detect_accelerators(tmp_path / "nowhere", path=str(broken.parent))["gpu"] == []
    fake_nvidia_smi(tmp_path / "bin2", names="NVIDIA A100-SXM4-40GB\\nNVIDIA A100-SXM4-40GB")
    gpus = detect_accelerators(tmp_path / "nowhere", path=str(tmp_path / "bin2"))["gpu"]
    assert gpus == ["nvidia-smi: NVIDIA A100-SXM4-40GB"] * 2


@pytest.mark.parametrize("backend, kind", [("cuda", "gpu"), ("gpu", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"),
                                           ("cpu", "cpu"), (None, None), ("METAL", None)])
def test_backend_kind(backend, kind):
    assert backend_kind(backend) == kind


def test_warnings_name_the_fix_for_each_cause():
    tpu = {"gpu": [], "tpu": ["/dev/accel0"]}
    gpu = {"gpu": ["/dev/nvidia0"], "tpu": []}
    (w,) = accelerator_warnings(tpu, "cpu", {"libtpu": None}, {})
    assert "TPU present (/dev/accel0) but JAX runs on cpu" in w and "./install.sh --venv DIR --target tpu" in w
    (w,) = accelerator_warnings(gpu, "cpu", {"jax-cuda12-plugin": None}, {"JAX_PLATFORMS": "cpu"})
    assert "unset JAX_PLATFORMS" in w
    (w,) = accelerator_warnings(gpu, "cpu", {"jax-cuda12-plugin": None}, {})
    assert "--target cuda12" in w
    (w,) = accelerator_warnings(gpu, "cpu", {"jax-cuda12-plugin": "0.10.2"}, {"JAX_PLATFORMS": "cuda,cpu"})
    assert "did not load it" in w and "jax-cuda12-plugin" in w
    assert accelerator_warnings(gpu, "cuda", {}, {}) == [] and accelerator_warnings(tpu, "tpu", {}, {}) == []
    assert accelerator_warnings({"gpu": [], "tpu": []}, "cpu", {}, {}) == []
