"""The launch scripts, run for real with stand-ins for what they call: a stub planner
(``L2D_PYTHON`` / ``PYTHON``: writes the ``--emit-overrides`` and ``--json`` files it is given)
and, where a test leaves ``--dry-run``, stub ``gcloud`` / ``srun`` / ``nvidia-smi`` on PATH that
record their arguments. A ``gcloud`` that fails the test guards every ``--dry-run``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CONFIG = "configs/llama_3.2_1b_instruct_lad_lora.py"
CONFIG_8B = "configs/llama_3.1_8b_instruct_lad.py"
TOKEN = "hf_SeCrEt0123456789"

# The stub planner: `-c CODE` is Python (the launch scripts read the plan's JSON with it); a plan
# call is logged to $STUB_LOG, writes $FAKE_OVERRIDES (printf %b) unless FAKE_PLAN_RC=3 and
# the JSON's resolved mesh, and exits $FAKE_PLAN_RC.
STUB_PY = r"""#!/usr/bin/env bash
if [ "$1" = -c ]; then exec python3 "$@"; fi
echo "$*" >> "$STUB_LOG"
echo "stub planner: $*"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in --emit-overrides) ov="${args[i+1]}" ;; --json) js="${args[i+1]}" ;; esac
done
echo "${FAKE_JSON:-{\"mesh\": {\"data\": 8, \"fsdp\": 1, \"tensor\": 1\}\}}" > "$js"
rc=${FAKE_PLAN_RC:-0}
if [ "$rc" != 3 ] || [ -n "${FAKE_WRITE_ON_3:-}" ]; then printf '%b' "${FAKE_OVERRIDES:-}" > "$ov"; fi
exit $rc
"""
# A command that records its arguments (one call per line) to $STUB_LOG.<name>, copies a
# `gcloud ... scp SRC ...` source file to $STUB_LOG.scp.<n>, and exits $<NAME>_RC.
STUB_CMD = r"""#!/usr/bin/env bash
name=$(basename "$0")
printf '%s\n' "$name $*" >> "$STUB_LOG.$name"
if [ "$name" = gcloud ] && [ "$4" = scp ]; then cp "$5" "$STUB_LOG.scp.$(wc -l < "$STUB_LOG.gcloud")"; fi
if [ "$name" = nvidia-smi ]; then
  case "$*" in *memory.total*) printf '81559\n81559\n' ;; *) printf 'GPU 0: H100\nGPU 1: H100\n' ;; esac
fi
if [ "$name" = srun ]; then case "$*" in *"env --require gpu"*) exit "${SRUN_ENV_RC:-0}" ;; esac; fi
exit 0
"""
FAIL_GCLOUD = "#!/bin/sh\necho 'gcloud was called' >&2\ntouch \"$STUB_LOG.gcloud-called\"\nexit 99\n"


@pytest.fixture
def stubs(tmp_path):
    """env for `run`: stub planner, PATH with the stub commands (gcloud fails: for dry runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    files = {"python": STUB_PY, "srun": STUB_CMD, "nvidia-smi": STUB_CMD, "gcloud": FAIL_GCLOUD}
    for name, text in files.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    return {"L2D_PYTHON": str(bin_dir / "python"), "PYTHON": str(bin_dir / "python"), "STUB_LOG": str(log),
            "PATH": f"{bin_dir}:/usr/bin:/bin", "L2D_PLAN_CACHE": str(tmp_path / "plans"), "HOME": str(tmp_path)}


def real_gcloud(env: dict) -> dict:
    """The stubs' env with a recording gcloud instead of the failing one."""
    (Path(env["PATH"].split(":")[0]) / "gcloud").write_text(STUB_CMD)
    return env


def run(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "TPU_", "L2D_", "HF_", "XLA_PYTHON"))
            and k not in ("ZONE", "PROJECT", "WORKDIR", "CONFIG", "MESH", "PYTHON")}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    if env and env.get("STUB_LOG"):
        assert not Path(env["STUB_LOG"] + ".gcloud-called").exists(), "a dry run called gcloud"
    return proc


def line_with(out: str, *needles: str) -> str:
    hits = [x for x in out.splitlines() if all(n in x for n in needles)]
    assert len(hits) == 1, (needles, out)
    return hits[0]


def planner_calls(env) -> list[str]:
    path = Path(env["STUB_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def test_scripts_are_strict_bash():
    for name in ("tpu_pod.sh", "slurm_gpu.sbatch", "single_host.sh"):
        text = (LAUNCH / name).read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text, name
    for name in ("tpu_pod.sh", "slurm_gpu.sbatch", "single_host.sh", "plan_gate.sh"):
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


# ------------------------------------------------------------------------------- tpu_pod.sh


def test_tpu_pod_dry_run_v5e_8_story(stubs):
    """User story A: 1B LoRA on a v5e-8 with a bucket workdir: supported image, the TPU
    install, the planner's change appended to train, the token forwarded but never printed."""
    env = dict(stubs, HF_TOKEN=TOKEN, FAKE_OVERRIDES="--config.remat_policy=full\n")
    proc = run("tpu_pod.sh", "--dry-run", "run", "--zone", "us-west4-a", "--type", "v5litepod-8",
               "--config", CONFIG, "--workdir", "gs://my-bucket/runs/l1b", env=env)
    out = proc.stdout
    assert TOKEN not in out + proc.stderr and "HF_TOKEN=<set>" in out
    # the plan: compiled for v5e:2x4 here, its overrides file and verdict, the mesh it planned
    [call] = planner_calls(env)
    assert call.startswith(f"-m l2d_jax.cli plan --config {REPO / CONFIG} --aot-topology v5e:2x4 "
                           "--programs train --require-fit --emit-overrides ")
    assert line_with(out, "# plan: ", "--emit-overrides")
    assert "# plan verdict: fits with the planner's change: --config.remat_policy=full" in out
    assert "# mesh: data=8,fsdp=1,tensor=1" in out
    # the image: documented for v5e, its python named; the install brings a Python >= 3.11
    assert "# image: v2-alpha-tpuv5-lite (Ubuntu 22.04, python3 3.10" in out and ">= 3.11" in out
    create = line_with(out, "tpu-vm create")
    assert "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite" in create
    install = line_with(out, "--worker=all", "install.sh")
    assert "./install.sh --venv .venv --target tpu && .venv/bin/python -m l2d_jax.cli env --require tpu" in install
    assert "--worker=all" in install and "jax[tpu]" not in install and "torch" not in install
    # the token travels as a file, the remote command reads it
    scp = line_with(out, " scp ", ".l2d_hf_token")
    assert "'<HF_TOKEN file>' l2d-jax:~/.l2d_hf_token" in scp and "--worker=all" in scp
    train = line_with(out, "l2d_jax.cli train")
    assert 'export HF_TOKEN="$(cat ~/.l2d_hf_token)"' in train and "L2D_DISTRIBUTED=none" in train
    assert "--workdir gs://my-bucket/runs/l1b" in train
    assert ("--config.mesh.data=8 --config.mesh.fsdp=1 --config.mesh.tensor=1 --config.remat_policy=full\" "
            "> ~/l2d_train.log") in train
    assert "setsid nohup" in train and "l2d_train.pid" in train
    assert "tail -n +1 -F ~/l2d_train.log" in out.strip().splitlines()[-1]
    assert "WARNING" not in proc.stderr  # a bucket: nothing to warn about


def test_tpu_pod_multi_worker_local_workdir(stubs):
    """v4-32 (4 workers): the plan gets --mesh and the overrides; a local workdir warns loudly."""
    env = dict(stubs, FAKE_JSON='{"aot": {"train_mesh": {"data": 4, "fsdp": 4, "tensor": 1}}}')
    proc = run("tpu_pod.sh", "--dry-run", "train", "--zone", "us-central2-b", "--type", "v4-32", "--name", "pod1",
               "--config", CONFIG, "--workdir", "/mnt/shared/l1b", "--mesh", "data=4,fsdp=4",
               "--config.peak_lr=3e-5", env=env)
    [call] = planner_calls(env)
    assert "--aot-topology v4:2x2x4 --programs train --require-fit --mesh data=4,fsdp=4 --config.peak_lr=3e-5" in call
    assert "# plan verdict: fits as configured" in proc.stdout and "# mesh: data=4,fsdp=4,tensor=1" in proc.stdout
    assert "local path on a multi-worker slice (v4-32)" in proc.stderr and "gs://BUCKET/PATH" in proc.stderr
    assert "delete` destroys it" in proc.stderr
    assert "HF_TOKEN is not set" in proc.stderr
    train = line_with(proc.stdout, "l2d_jax.cli train")
    assert "ssh pod1 --zone=us-central2-b --worker=all" in train and "L2D_DISTRIBUTED=tpu" in train
    assert f"--config {CONFIG}" in train and "--workdir /mnt/shared/l1b" in train
    assert ("--config.mesh.data=4 --config.mesh.fsdp=4 --config.peak_lr=3e-5 "
            "--config.mesh.data=4 --config.mesh.fsdp=4 --config.mesh.tensor=1\"") in train
    assert "HF_TOKEN" not in train


def test_tpu_pod_eval_and_export(stubs):
    env = dict(stubs, ZONE="europe-west4-a", ACCELERATOR_TYPE="v4-8", HF_TOKEN=TOKEN, HF_HOME="/data/hf")
    proc = run("tpu_pod.sh", "--dry-run", "eval", "--workdir", "gs://b-1/runs/l1b", env=env)
    assert TOKEN not in proc.stdout + proc.stderr and planner_calls(env) == []
    cmd = line_with(proc.stdout, "l2d_jax.cli eval")
    assert "--worker=all" in cmd and "HF_HOME=/data/hf" in cmd and "l2d_eval.pid" in cmd
    assert ("eval --config configs/benchmark.py --ckpt gs://b-1/runs/l1b --tasks gsm8k,math --steps 0,2,8,16 "
            "--out gs://b-1/runs/l1b/eval/benchmark") in cmd
    assert (" && .venv/bin/python -m l2d_jax.cli eval --config configs/benchmark_code.py --ckpt gs://b-1/runs/l1b "
            "--tasks humaneval --steps 0,2,8,16 --out gs://b-1/runs/l1b/eval/benchmark_code") in cmd
    assert "> ~/l2d_eval.log" in cmd and "kill -0" in cmd  # refuses to start while the chips train

    out = run("tpu_pod.sh", "--dry-run", "eval", "--workdir", "gs://b-1/r", "--tasks", "math", "--steps", "0,8",
              "--limit", "20", "--eval-out", "gs://b-2/ev", "--eval-mesh", "tensor=4", env=env).stdout
    cmd = line_with(out, "l2d_jax.cli eval")
    assert "--tasks math --steps 0,8 --out gs://b-2/ev/benchmark --no-progress --limit 20 --mesh tensor=4" in cmd
    assert "benchmark_code" not in cmd

    out = run("tpu_pod.sh", "--dry-run", "eval", "--workdir", "gs://b-1/r", env=dict(env, HF_HOME=f"{env['HOME']}/hf")).stdout
    assert "HF_HOME=$HOME/hf;" in line_with(out, "l2d_jax.cli eval")  # this machine's home -> the workers'
    out = run("tpu_pod.sh", "--dry-run", "export", "--workdir", "gs://b-1/runs/l1b", env=env).stdout
    cmd = line_with(out, "convert export")
    assert "--worker=0" in cmd and "JAX_PLATFORMS=cpu" in cmd
    assert ".venv/bin/python -m l2d_jax.cli convert export gs://b-1/runs/l1b gs://b-1/runs/l1b/original'" in cmd
    out = run("tpu_pod.sh", "--dry-run", "export", "--workdir", "gs://b-1/r", "--export-out", "gs://b-1/x/l1b.safetensors",
              env=env).stdout
    assert "convert export gs://b-1/r gs://b-1/x/l1b.safetensors" in out


@pytest.mark.parametrize("args,code,message", [
    (["eval"], 2, "eval needs --workdir"),
    (["export"], 2, "export needs --workdir"),
    (["eval", "--workdir", "gs://b-1/r", "--steps", "0,eight"], 2, "--steps 0,eight"),
    (["train", "--workdir", "gs://My_Bucket/run", "--config", CONFIG], 2, "'My_Bucket' is not a bucket name"),
    (["train", "--workdir", "gs://ab/run", "--config", CONFIG], 2, "is not a bucket name"),
    (["train", "--workdir", "gs:/bucket/run", "--config", CONFIG], 2, "a bucket URI is gs://BUCKET/PATH"),
    (["eval", "--workdir", "gs://b-1/r", "--eval-out", "gs://-bad/x"], 2, "not a bucket name"),
    (["train"], 2, "train needs --config"),
    (["run"], 2, "run needs --config"),
    (["train", "--config", CONFIG, "--mesh", "data=2,pipe=4", "--no-plan"], 2, "--mesh data=2,pipe=4: expected"),
    (["plan", "--config", CONFIG, "--type", "v9-8", "--version", "x"], 2, "--topology GEN:SHAPE"),
    (["train", "--config", CONFIG, "--config.run_name=$(rm)", "--no-plan"], 2, "cannot be passed to the workers"),
])
def test_tpu_pod_refusals(stubs, args, code, message):
    proc = run("tpu_pod.sh", "--dry-run", "--zone", "z", *args, env=stubs, check=False)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert "gcloud compute" not in proc.stdout


def test_tpu_pod_needs_a_zone(stubs):
    proc = run("tpu_pod.sh", "--dry-run", "create", env=stubs, check=False)
    assert proc.returncode == 2 and "--zone ZONE (or export ZONE=...) is required" in proc.stderr


def test_tpu_pod_plan_gate(stubs):
    """Nothing fits (exit 3): create/train refused unless --force; a failing plan stops; the
    planner's exit 3 with an overrides file (--require-fit: not AS GIVEN) is a fitting change;
    a fitting plan is cached."""
    env = dict(stubs, ZONE="z", ACCELERATOR_TYPE="v5litepod-8", FAKE_PLAN_RC="3")
    proc = run("tpu_pod.sh", "--dry-run", "train", "--config", CONFIG, "--workdir", "gs://b-1/r", env=env, check=False)
    assert proc.returncode == 3 and "does not fit v5litepod-8 (v5e:2x4)" in proc.stderr
    assert "# plan verdict: does NOT fit" in proc.stdout and "l2d_jax.cli train" not in proc.stdout
    proc = run("tpu_pod.sh", "create", "--config", CONFIG, env=env, check=False)  # not a dry run: no gcloud either
    assert proc.returncode == 3 and not Path(env["STUB_LOG"] + ".gcloud").exists()
    forced = run("tpu_pod.sh", "create", "--force", "--config", CONFIG, env=real_gcloud(dict(env)))
    assert "--force" in forced.stderr
    assert "tpu-vm create l2d-jax --zone=z" in Path(env["STUB_LOG"] + ".gcloud").read_text()

    proc = run("tpu_pod.sh", "plan", "--config", CONFIG, env=dict(env, FAKE_PLAN_RC="1"), check=False)
    assert proc.returncode == 1 and "the plan failed (exit 1)" in proc.stderr

    fits = dict(env, FAKE_PLAN_RC="3", FAKE_WRITE_ON_3="1", FAKE_OVERRIDES="--config.micro_batch_size=2\n")
    n = len(planner_calls(env))
    out = run("tpu_pod.sh", "--dry-run", "train", "--config", CONFIG, "--workdir", "gs://b-1/r", env=fits).stdout
    assert "--config.micro_batch_size=2\" > ~/l2d_train.log" in line_with(out, "l2d_jax.cli train")
    out = run("tpu_pod.sh", "--dry-run", "train", "--config", CONFIG, "--workdir", "gs://b-1/r", env=fits).stdout
    assert len(planner_calls(env)) == n + 1 and "# plan (cached: " in out  # the second one: no planner
    assert "--config.micro_batch_size=2\" > ~/l2d_train.log" in line_with(out, "l2d_jax.cli train")
    out = run("tpu_pod.sh", "--dry-run", "plan", "--config", CONFIG, "--type", "v6e-8", env=fits).stdout
    assert "--aot-topology v6e:2x4" in out and "gcloud" not in out
    out = run("tpu_pod.sh", "--dry-run", "train", "--no-plan", "--config", CONFIG, "--workdir", "gs://b-1/r",
              env=fits).stdout
    assert "# plan" not in out and "--config.micro_batch_size" not in out


def test_tpu_pod_token_never_on_a_command_line(stubs):
    """A real (non-dry) train with a recording gcloud: the token reaches the workers only as the
    scp'd file; no gcloud argument holds it; the local copy is removed."""
    env = real_gcloud(dict(stubs, ZONE="z", ACCELERATOR_TYPE="v5litepod-8", HF_TOKEN=TOKEN))
    proc = run("tpu_pod.sh", "train", "--config", CONFIG, "--workdir", "gs://b-1/r", env=env)
    calls = Path(env["STUB_LOG"] + ".gcloud").read_text()
    assert TOKEN not in calls + proc.stdout + proc.stderr
    [scp] = [line for line in calls.splitlines() if " scp " in line]
    sent = scp.split()[5]
    assert not Path(sent).exists()  # the temporary file is gone
    [copy] = Path(env["STUB_LOG"]).parent.glob("log.scp.*")
    assert copy.read_text() == TOKEN
    assert calls.splitlines()[-1].startswith("gcloud compute tpus tpu-vm ssh l2d-jax --zone=z --worker=all --command=")


def test_tpu_pod_other_commands_and_env(stubs):
    env = dict(stubs, TPU_NAME="envpod", ZONE="europe-west4-a", PROJECT="proj", ACCELERATOR_TYPE="v6e-8")
    out = run("tpu_pod.sh", "--dry-run", "create", "--spot", "--no-plan", env=env).stdout
    assert "create envpod --zone=europe-west4-a --project=proj --accelerator-type=v6e-8" in out
    assert "--version=v2-alpha-tpuv6e" in out and "--spot" in out
    for tpu_type, image in (("v4-8", "tpu-ubuntu2204-base"), ("v5p-8", "v2-alpha-tpuv5")):
        out = run("tpu_pod.sh", "--dry-run", "create", "--type", tpu_type, env=env).stdout
        assert f"--version={image}" in out and f"# image: {image} (" in out
    out = run("tpu_pod.sh", "--dry-run", "stop", env=env).stdout
    assert "--worker=all" in out and "kill -TERM -- -$(cat $p)" in out and "l2d_eval.pid" in out
    proc = run("tpu_pod.sh", "--dry-run", "delete", "--workdir", "/home/me/run", env=env)
    assert "tpu-vm delete envpod --zone=europe-west4-a --project=proj --quiet" in proc.stdout
    assert "/home/me/run on the VM is lost" in proc.stderr
    out = run("tpu_pod.sh", "--dry-run", "install", "--repo", "https://example.com/l2d-jax.git", env=env).stdout
    assert "git clone --branch main https://example.com/l2d-jax.git" in out and "--target tpu" in out
    out = run("tpu_pod.sh", "--dry-run", "logs", "--worker", "3", "--log", "l2d_eval.log", env=env).stdout
    assert "--worker=3" in out and "~/l2d_eval.log" in out
    assert "--eval-out" in run("tpu_pod.sh", "--help").stdout


# ------------------------------------------------------------------------------- slurm_gpu.sbatch


def test_slurm_dry_run_plans_checks_gpus_and_trains(stubs):
    """User story B on 2 nodes: the analytic plan for 16 GPUs of nvidia-smi's memory x 0.92,
    the planner's mesh and change appended, the `env --require gpu` step, offline exports."""
    env = dict(stubs, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="gpu[001-002]",
               SLURM_GPUS_ON_NODE="8", L2D_COORDINATOR_PORT="23456", HF_TOKEN=TOKEN, HF_HOME="/shared/hf",
               FAKE_OVERRIDES="--config.mesh.data=2\n--config.mesh.fsdp=4\n--config.mesh.tensor=2\n"
                              "--config.remat_policy=full\n")
    proc = run("slurm_gpu.sbatch", "--dry-run", "--offline", "--config", CONFIG_8B, "--workdir", "/shared/runs/l8b",
               "--config.micro_batch_size=2", env=env)
    out = proc.stdout
    assert TOKEN not in out + proc.stderr and "HF_TOKEN=<set>" in out
    assert "2 node(s) x 8 GPUs = 16 devices, 2 process(es)" in out and "gpu[001-002]" in out
    assert "79.6 GiB (nvidia-smi) x XLA_PYTHON_CLIENT_MEM_FRACTION 0.92 = 73.2 GiB" in out
    [call] = planner_calls(env)
    assert call.startswith(f"-m l2d_jax.cli plan --config {CONFIG_8B} --devices 16 --hbm-gib 73.2 --require-fit "
                           "--config.micro_batch_size=2 --emit-overrides ")
    assert "# mesh: data=2,fsdp=4,tensor=2" in out
    for var in ("L2D_DISTRIBUTED=slurm", "L2D_COORDINATOR_PORT=23456", "HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1",
                "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"):
        assert f"export {var}" in out
    check, train = out.strip().splitlines()[-2:]
    assert check.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 ")
    assert check.endswith("-m l2d_jax.cli env --require gpu")
    assert train.startswith("srun --kill-on-bad-exit=1 ")
    assert f"-m l2d_jax.cli train --config {CONFIG_8B} --no-progress --workdir /shared/runs/l8b" in train
    assert train.endswith("--config.micro_batch_size=2 --config.mesh.data=2 --config.mesh.fsdp=4 "
                          "--config.mesh.tensor=2 --config.remat_policy=full")
    assert "mesh.data=-1" not in train

    # no SLURM, no nvidia-smi: 1 node x 8 GPUs of 80 GiB; the planner's resolved mesh is pinned
    env = dict(stubs, PATH=f"{Path(stubs['PATH'].split(':')[0]).parent / 'none'}:/usr/bin:/bin")
    out = run("slurm_gpu.sbatch", "--dry-run", "--config", CONFIG, "--hbm-gib", "40", env=env).stdout
    assert "1 node(s) x 8 GPUs = 8 devices" in out and "40 GiB (--hbm-gib)" in out and "--hbm-gib 36.8" in out
    assert out.strip().endswith("--config.mesh.data=8 --config.mesh.fsdp=1 --config.mesh.tensor=1")
    assert "HF_HUB_OFFLINE" not in out
    out = run("slurm_gpu.sbatch", "--dry-run", "--no-plan", "--mesh", "data=2,tensor=4", "--config", CONFIG,
              env=env).stdout
    assert "# plan" not in out and out.strip().endswith("--config.mesh.data=2 --config.mesh.tensor=4")


def test_slurm_refusals(stubs):
    proc = run("slurm_gpu.sbatch", "--dry-run", "--config", CONFIG, env=dict(stubs, FAKE_PLAN_RC="3"), check=False)
    assert proc.returncode == 3 and "does not fit 2 GPUs of 73.2 GiB" in proc.stderr  # nvidia-smi: 2 and "srun" not in proc.stdout
    proc = run("slurm_gpu.sbatch", "--config", CONFIG, env=stubs, check=False)  # not inside a job
    assert proc.returncode == 2 and "sbatch" in proc.stderr
    proc = run("slurm_gpu.sbatch", "--dry-run", env=stubs, check=False)
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = run("slurm_gpu.sbatch", "--dry-run", "--config", CONFIG, "--mesh", "pipe=2", env=stubs, check=False)
    assert proc.returncode == 2 and "expected data=N,fsdp=N,tensor=N" in proc.stderr
    proc = run("slurm_gpu.sbatch", "--dry-run", "--config", CONFIG, "--hbm-gib", "lots", env=stubs, check=False)
    assert proc.returncode == 2 and "--hbm-gib lots" in proc.stderr
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --nodes=" in text and "#SBATCH --signal=TERM@" in text
    assert "./install.sh --venv .venv --target cuda12" in text and "HF_HUB_OFFLINE=1" in text


@pytest.mark.parametrize("env_rc", [3, 0])
def test_slurm_job_refuses_without_gpus(stubs, env_rc):
    """Inside a job (stub srun): `env --require gpu` failing stops the job before training."""
    env = dict(stubs, SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="1", SRUN_ENV_RC=str(env_rc))
    proc = run("slurm_gpu.sbatch", "--config", CONFIG, env=env, check=False)
    calls = Path(env["STUB_LOG"] + ".srun").read_text().splitlines()
    assert "env --require gpu" in calls[0]
    if env_rc:
        assert proc.returncode == 3 and "JAX does not see a GPU" in proc.stderr and "--target cuda12" in proc.stderr
        assert len(calls) == 1
    else:
        assert proc.returncode == 0 and len(calls) == 2 and "l2d_jax.cli train" in calls[1]


def test_plan_gate_reads_a_real_plan_json():
    """The mesh comes from the JSON `l2d-jax plan --json` writes: the sweep's v5e-8 plan of the
    1B LoRA config (aot.train_mesh), with a change's mesh keys applied over it."""
    sweep = REPO / "docs/bench/tpu_aot/sweep/llama_3.2_1b_instruct_lad_lora__v5e_2x4.json"
    assert json.loads(sweep.read_text())["aot"]["train_mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    script = f'source {LAUNCH / "plan_gate.sh"} && plan_mesh python3 "$@"'
    out = subprocess.run(["bash", "-c", script, "_", str(sweep), "--config.mesh.data=4", "--config.remat_policy=full",
                          "--config.mesh.tensor=2"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "data=4,fsdp=1,tensor=2"
