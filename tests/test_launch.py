"""The launch scripts' ``--dry-run`` output: the commands they would run (nothing runs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIG = "configs/llama_3.2_1b_instruct_lad_lora.py"


def run(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "L2D_"))}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_scripts_are_strict_bash():
    for name in ("tpu_pod.sh", "slurm_gpu.sbatch", "single_host.sh"):
        text = (LAUNCH / name).read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text, name
        assert subprocess.run(["bash", "-n", str(LAUNCH / name)]).returncode == 0, name


def test_single_host_devices_and_mesh():
    out = run("single_host.sh", "--dry-run", "0,1", CONFIG, "--config.peak_lr=3e-5").stdout
    assert "export CUDA_VISIBLE_DEVICES=0,1" in out
    cmd = out.strip().splitlines()[-1]
    assert "-m l2d_jax.cli train --config " + CONFIG in cmd
    assert "--config.mesh.data=2 --config.mesh.fsdp=1 --config.mesh.tensor=1" in cmd
    assert cmd.rstrip().endswith("--config.peak_lr=3e-5")

    out = run("single_host.sh", "--dry-run", "--mesh", "fsdp=2,tensor=2", "--workdir", "/tmp/run",
              "0,1,2,3", CONFIG).stdout
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in out
    assert "--workdir /tmp/run" in out
    assert "--config.mesh.data=-1 --config.mesh.fsdp=2 --config.mesh.tensor=2" in out

    out = run("single_host.sh", "--dry-run", "cpu:2", "configs/tiny_test.py").stdout
    assert "export JAX_PLATFORMS=cpu" in out and "--xla_force_host_platform_device_count=2" in out
    assert "CUDA_VISIBLE_DEVICES" not in out


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "0,1"], "expected DEVICES and CONFIG"),
    (["--dry-run", "0,1", "configs/missing.py"], "config file not found"),
    (["--dry-run", "gpu0", CONFIG], "DEVICES must be"),
    (["--dry-run", "--mesh", "pipeline=2", "0,1", CONFIG], "expected data=N,fsdp=N,tensor=N"),
])
def test_single_host_errors(args, message):
    proc = run("single_host.sh", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_tpu_pod_run_all_workers():
    out = run("tpu_pod.sh", "--dry-run", "run", "--zone", "us-central2-b", "--type", "v4-32", "--name", "pod1",
              "--config", CONFIG, "--workdir", "/mnt/shared/l1b", "--mesh", "data=4,fsdp=4",
              "--config.peak_lr=3e-5").stdout
    lines = out.strip().splitlines()
    # first the plan, here, for the slice's topology (v4-32: 16 chips)
    plan = lines.pop(0)
    assert "-m l2d_jax.cli plan --config " in plan and plan.split("--config ")[1].split()[0].endswith(CONFIG)
    assert "--aot-topology v4:2x2x4 --programs train --require-fit --mesh data=4,fsdp=4 --config.peak_lr=3e-5" in plan
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone=us-central2-b "
                               "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
    assert sum("l2d_jax.cli plan" in x for x in lines) == 0  # planned once, before creating
    scp = next(x for x in lines if " scp " in x)
    assert "--worker=all" in scp
    install = next(x for x in lines if "install.sh" in x)
    assert "--worker=all" in install and "jax[tpu]" in install
    train = next(x for x in lines if "l2d_jax.cli train" in x)
    assert "--worker=all" in train and "L2D_DISTRIBUTED=tpu" in train
    assert f"--config {CONFIG}" in train and "--workdir /mnt/shared/l1b" in train
    assert "--config.mesh.data=4 --config.mesh.fsdp=4" in train and "--config.peak_lr=3e-5" in train
    assert "nohup" in train and "l2d_train.pid" in train
    assert "tail -n +1 -F" in lines[-1] and "--worker=0" in lines[-1]


def test_tpu_pod_other_commands_and_env():
    env = {"TPU_NAME": "envpod", "ZONE": "europe-west4-a", "PROJECT": "proj", "ACCELERATOR_TYPE": "v5litepod-16"}
    out = run("tpu_pod.sh", "--dry-run", "create", "--spot", env=env).stdout
    assert "create envpod --zone=europe-west4-a --project=proj --accelerator-type=v5litepod-16" in out
    assert "--version=v2-alpha-tpuv5-lite" in out and "--spot" in out
    out = run("tpu_pod.sh", "--dry-run", "stop", env=env).stdout
    assert "--worker=all" in out and "kill -TERM" in out
    out = run("tpu_pod.sh", "--dry-run", "delete", env=env).stdout
    assert "tpu-vm delete envpod --zone=europe-west4-a --project=proj --quiet" in out
    out = run("tpu_pod.sh", "--dry-run", "install", "--repo", "https://example.com/l2d-jax.git", env=env).stdout
    assert "git clone --branch main https://example.com/l2d-jax.git" in out and "--worker=all" in out
    out = run("tpu_pod.sh", "--dry-run", "logs", "--worker", "3", env=env).stdout
    assert "--worker=3" in out
    proc = run("tpu_pod.sh", "--dry-run", "train", env=env, check=False)
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = run("tpu_pod.sh", "--dry-run", "create", check=False)
    assert proc.returncode == 2 and "--zone" in proc.stderr


def test_tpu_pod_refuses_a_run_the_plan_says_does_not_fit(tmp_path):
    """The plan's exit code 3 (--require-fit: does not fit) stops create/train unless --force."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"plan $*\"\nexit ${FAKE_PLAN_RC:-3}\n")
    fake.chmod(0o755)
    env = {"L2D_PYTHON": str(fake), "ZONE": "z", "ACCELERATOR_TYPE": "v5litepod-8"}
    proc = run("tpu_pod.sh", "create", "--config", CONFIG, env=env, check=False)
    assert proc.returncode == 3 and "does not fit v5litepod-8 (v5e:2x4)" in proc.stderr
    assert "gcloud" not in proc.stdout and "--aot-topology v5e:2x4" in proc.stdout
    env_no_gcloud = dict(env, PATH=f"{tmp_path}:/usr/bin:/bin")  # a "gcloud" that records it was called
    (tmp_path / "gcloud").write_text("#!/bin/sh\necho \"gcloud $*\"\n")
    (tmp_path / "gcloud").chmod(0o755)
    proc = run("tpu_pod.sh", "create", "--force", "--config", CONFIG, env=env_no_gcloud)
    assert "gcloud compute tpus tpu-vm create" in proc.stdout  # forced past the plan
    proc = run("tpu_pod.sh", "--dry-run", "plan", "--config", CONFIG, "--type", "v6e-8", env=env)
    assert "--aot-topology v6e:2x4" in proc.stdout
    proc = run("tpu_pod.sh", "plan", "--config", CONFIG, "--type", "v5p-8", env=dict(env, FAKE_PLAN_RC="0"))
    assert proc.returncode == 0 and "--aot-topology v5p:2x2x1" in proc.stdout
    proc = run("tpu_pod.sh", "plan", "--config", CONFIG, "--type", "v9-8", "--version", "x", env=env, check=False)
    assert proc.returncode == 2 and "--topology GEN:SHAPE" in proc.stderr


def test_slurm_environment_and_srun():
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[001-004]",
           "L2D_COORDINATOR_PORT": "23456"}
    out = run("slurm_gpu.sbatch", "--dry-run", "--config", CONFIG, "--mesh", "data=4,fsdp=8",
              "--workdir", "/shared/run", "--config.micro_batch_size=2", env=env).stdout
    assert "export L2D_DISTRIBUTED=slurm" in out
    assert "export L2D_COORDINATOR_PORT=23456" in out
    assert "4 nodes, 4 processes" in out and "gpu[001-004]" in out
    srun = out.strip().splitlines()[-1]
    assert srun.startswith("srun ") and "--kill-on-bad-exit=1" in srun
    assert f"-m l2d_jax.cli train --config {CONFIG}" in srun and "--workdir /shared/run" in srun
    assert "--config.mesh.data=4 --config.mesh.fsdp=8 --config.mesh.tensor=1" in srun
    assert "--config.micro_batch_size=2" in srun
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --nodes=" in text and "#SBATCH --signal=TERM@" in text

    out = run("slurm_gpu.sbatch", "--dry-run", "--config", CONFIG).stdout
    assert "export L2D_COORDINATOR_PORT=12355" in out and "--config.mesh.data=-1" in out
    proc = run("slurm_gpu.sbatch", "--config", CONFIG, check=False)  # not inside a job
    assert proc.returncode == 2 and "sbatch" in proc.stderr
    proc = run("slurm_gpu.sbatch", "--dry-run", check=False)
    assert proc.returncode == 2 and "--config" in proc.stderr
