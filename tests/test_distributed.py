"""Multi-process training (``l2d_jax.distributed``) on local CPU processes.

The slow test starts 2 processes with 1 CPU device each (gloo collectives, coordinator on
localhost) that train ``configs/tiny_test.py`` together through the real CLI, are SIGKILLed
after the checkpoint of step 2, resume with the same command and finish; their losses
(``metrics.jsonl``) must equal those of ONE process driving 2 devices with the same global
batches. The one-process reference reads its data as the two hosts do (each host its strided
shard of the conversations in its own order; ``SimulatedHosts`` concatenates the hosts' rows
in process order, which is how ``make_array_from_process_local_data`` lays them out).

This file is also the worker script: ``python tests/test_distributed.py MODE ... -- CLI ARGS``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_test.py")


# --------------------------------------------------------------------------- fast: settings


def test_resolve_explicit_from_env_and_arguments():
    from l2d_jax.distributed import Setup, resolve

    env = {"L2D_COORDINATOR": "10.0.0.1:1234", "L2D_NUM_PROCESSES": "4", "L2D_PROCESS_ID": "3",
           "L2D_LOCAL_DEVICE_IDS": "0,1"}
    assert resolve("auto", env=env) == Setup("explicit", "10.0.0.1:1234", 4, 3, (0, 1))
    assert resolve("explicit", process_id=1, env=env).process_id == 1  # arguments win
    assert resolve("explicit", "h:1", 2, 0, env={}) == Setup("explicit", "h:1", 2, 0, None)
    local = resolve("local", num_processes=2, process_id=1, env={"L2D_COORDINATOR_PORT": "4567"})
    assert local.coordinator == "localhost:4567" and local.mode == "local"


def test_resolve_slurm():
    from l2d_jax.distributed import first_slurm_host, resolve

    assert first_slurm_host("node[001-004,007],gpu1") == "node001"
    assert first_slurm_host("gpu17,gpu18") == "gpu17"
    assert first_slurm_host("a-b[3,5]") == "a-b3"
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "77",
           "SLURM_STEP_NODELIST": "gpu[12-13]", "SLURM_JOB_NODELIST": "gpu[10-13]",
           "SLURM_TASKS_PER_NODE": "8(x2)", "L2D_COORDINATOR_PORT": "23456"}
    s = resolve("auto", env=env)
    assert (s.mode, s.coordinator, s.num_processes, s.process_id) == ("slurm", "gpu12:23456", 16, 9)
    assert s.local_device_ids == (1,)  # one process per GPU, all GPUs visible
    s = resolve("slurm", env={**env, "CUDA_VISIBLE_DEVICES": "1"})
    assert s.local_device_ids is None  # SLURM already bound one GPU to the task
    one_per_node = {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"}
    one_per_node.update(SLURM_NTASKS="2", SLURM_TASKS_PER_NODE="1(x2)", SLURM_PROCID="1")
    s = resolve("slurm", env=one_per_node)
    assert (s.coordinator, s.local_device_ids) == ("gpu10:23456", None)  # job node list as fallback


def test_auto_detection_and_errors():
    from l2d_jax.distributed import DistributedError, detect_mode, resolve

    assert detect_mode({}) == "none"
    assert detect_mode({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n1"}) == "none"
    assert detect_mode({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) == "tpu"
    assert detect_mode({"TPU_WORKER_HOSTNAMES": "localhost"}) == "none"
    assert resolve("auto", env={}).mode == "none"
    assert resolve("tpu", env={}).coordinator is None  # JAX finds everything on TPU pods
    with pytest.raises(DistributedError, match="L2D_NUM_PROCESSES"):
        resolve("explicit", env={"L2D_COORDINATOR": "h:1", "L2D_PROCESS_ID": "0"})
    with pytest.raises(DistributedError, match="process_id=2"):
        resolve("explicit", "h:1", 2, 2, env={})
    with pytest.raises(DistributedError, match="host:port"):
        resolve("explicit", "nohost", 2, 0, env={})
    with pytest.raises(DistributedError, match="SLURM_STEP_NODELIST"):
        resolve("slurm", env={"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    with pytest.raises(DistributedError, match="expected one of"):
        resolve("mpi", env={})


def test_process_shard_covers_every_item_once():
    from l2d_jax.distributed import process_shard

    for n_items in (0, 1, 7, 8, 13):
        for n in (1, 2, 3, 4):
            parts = [process_shard(n_items, i, n) for i in range(n)]
            assert [i for r in parts for i in r] == list(range(n_items))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_single_process_helpers():
    import jax

    from l2d_jax import distributed, sharding as shd

    assert distributed.initialize("none").mode == "none"
    assert distributed.is_main_process()
    assert distributed.gather_objects([1, {"a": 2}]) == [1, {"a": 2}]
    assert distributed.on_main(lambda: (1, 2)) == (1, 2)  # one process: fn() itself
    mesh = shd.make_mesh(-1, 1, 1, devices=jax.devices()[:1])
    g = distributed.global_batch_from_local({"x": np.arange(6).reshape(2, 3)}, mesh)
    assert g["x"].shape == (2, 3) and np.array_equal(np.asarray(g["x"]), np.arange(6).reshape(2, 3))


# --------------------------------------------------------------------------- slow: processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), L2D_JAX_CACHE_DIR=str(cache),
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    for k in ("L2D_COORDINATOR", "L2D_NUM_PROCESSES", "L2D_PROCESS_ID", "L2D_DISTRIBUTED"):
        env.pop(k, None)
    return env


def _start(args: list[str], env: dict, log: Path, script: str = __file__) -> subprocess.Popen:
    """``python SCRIPT ARGS`` (by default this file's worker), its output appended to ``log``."""
    return subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait(procs, timeout: float, logs) -> None:
    deadline = time.time() + timeout
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"timed out; log {log}:\n{log.read_text()[-3000:]}")
        assert rc == 0, f"exit code {rc}; log {log}:\n{log.read_text()[-3000:]}"


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _dist_env(base: dict, pid: int, n: int, port: int) -> dict:
    return {**base, "L2D_DISTRIBUTED": "local", "L2D_NUM_PROCESSES": str(n), "L2D_PROCESS_ID": str(pid),
            "L2D_COORDINATOR_PORT": str(port)}


@pytest.mark.slow
def test_two_processes_helpers(tmp_path):
    """process_shard + gather_objects + on_main + global_batch_from_local across 2 real processes."""
    env = _env(1, tmp_path / "cache")
    port = _free_port()
    logs = [tmp_path / f"helpers{i}.log" for i in range(2)]
    procs = [_start(["helpers", str(tmp_path)], _dist_env(env, i, 2, port), logs[i]) for i in range(2)]
    _wait(procs, 180, logs)
    for i in range(2):
        out = json.loads((tmp_path / f"helpers{i}.json").read_text())
        assert out["gathered"] == [{"item": k, "by": 0 if k < 4 else 1} for k in range(7)]
        assert out["global_sum"] == 6 and out["global_shape"] == [4, 3]
        assert out["main"] == (i == 0) and out["process_count"] == 2
        assert out["on_main"] == {"from": 0, "x": 0.5}
        assert out["error"] == ("ZeroDivisionError" if i == 0 else "DistributedError: process 0 failed: "
                                "ZeroDivisionError: division by zero")


@pytest.mark.slow
def test_two_processes_train_kill_resume_match_one_process(tmp_path):
    cache = tmp_path / "cache"
    # fsdp over the 2 devices: the frozen base is sharded ACROSS the processes (and gathered
    # for the export), the batch rows too
    cli = ["train", "--config", TINY, "--no-progress", "--config.mesh.data=1", "--config.mesh.fsdp=2"]

    # one process, 2 devices, the two hosts' data layout
    ref = tmp_path / "ref"
    log = tmp_path / "ref.log"
    t0 = time.time()
    _wait([_start(["reference", "2", "--", *cli, "--workdir", str(ref)], _env(2, cache), log)], 600, [log])
    t_ref = time.time() - t0

    # two processes, 1 device each: killed after checkpoint 2, then resumed
    wd = tmp_path / "dist"
    env = _env(1, cache)
    port = _free_port()
    logs = [tmp_path / f"dist{i}.log" for i in range(2)]
    marks = tmp_path / "marks"
    marks.mkdir()
    procs = [_start(["hold-after", "2", str(marks), "--", *cli, "--workdir", str(wd)],
                    _dist_env(env, i, 2, port), logs[i]) for i in range(2)]
    deadline = time.time() + 600
    while len(list(marks.glob("ready.*"))) < 2:
        for p, lg in zip(procs, logs):
            if p.poll() is not None:
                pytest.fail(f"a worker exited early ({p.returncode}):\n{lg.read_text()[-3000:]}")
        if time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail("the workers did not reach the checkpoint of step 2:\n" + logs[0].read_text()[-3000:])
        time.sleep(0.5)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert sorted(_losses(wd)) == [1, 2], "metrics of steps 1-2 before the kill"
    assert (wd / "checkpoints" / "2").is_dir()

    port = _free_port()
    procs = [_start(["run", "--", *cli, "--workdir", str(wd)], _dist_env(env, i, 2, port), logs[i])
             for i in range(2)]
    _wait(procs, 600, logs)
    assert "resumed from" in logs[0].read_text()

    ours, want = _losses(wd), _losses(ref)
    assert sorted(want) == [1, 2, 3, 4] and sorted(ours) == sorted(want)
    for step in want:
        assert abs(ours[step] - want[step]) <= 1e-5 * max(1.0, abs(want[step])), (step, ours[step], want[step])
    assert (wd / "export").is_dir()
    print(f"reference run {t_ref:.0f} s; losses {want}")


# --------------------------------------------------------------------------- worker side


class SimulatedHosts:
    """The datasets of ``n`` simulated hosts as one: a batch of b rows is the hosts' batches of
    b / n rows each, concatenated in process order, padded to the longest (as the hosts agree
    on one length per micro-batch)."""

    def __init__(self, hosts):
        self.hosts = hosts

    def __len__(self):
        return sum(len(h) for h in self.hosts)

    def global_size(self):
        return len(self)

    def state(self):
        return {"epoch": self.hosts[0].state()["epoch"], "hosts": [h.state() for h in self.hosts]}

    def restore(self, state):
        for h, s in zip(self.hosts, state["hosts"]):
            h.restore(s)

    def batches(self, rows: int):
        from l2d_jax.train.data import Batch

        n = len(self.hosts)
        assert rows % n == 0, (rows, n)
        eos = self.hosts[0].eos_id
        for parts in zip(*(h.batches(rows // n) for h in self.hosts)):
            t = max(p.input_ids.shape[1] for p in parts)

            def cat(arrays, fill):
                return np.concatenate([np.pad(a, ((0, 0), (0, t - a.shape[1])), constant_values=fill)
                                       for a in arrays])

            classes = None if parts[0].class_labels is None else np.concatenate([p.class_labels for p in parts])
            yield Batch(cat([p.input_ids for p in parts], eos), cat([p.labels for p in parts], -100), classes)


def _worker(argv: list[str]) -> int:
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("L2D_TEST_TRACEBACK_AFTER", "300")), repeat=True)
    mode, rest = argv[0], argv[1:]
    cli_args = rest[rest.index("--") + 1:] if "--" in rest else []
    opts = rest[:rest.index("--")] if "--" in rest else rest
    if mode == "helpers":
        return _helpers(Path(opts[0]))
    from l2d_jax import cli

    if mode == "reference":
        from l2d_jax.train import data as data_lib

        hosts, original = int(opts[0]), data_lib.make_dataset

        def make_dataset(cfg, tokenizer, split="train", **kw):
            if split != "train":
                return original(cfg, tokenizer, split, **kw)
            return SimulatedHosts([original(cfg, tokenizer, split, process_index=i, process_count=hosts)
                                   for i in range(hosts)])

        data_lib.make_dataset = make_dataset
    elif mode == "hold-after":
        import jax

        from l2d_jax.train import loop

        step_no, marks = int(opts[0]), Path(opts[1])
        save = loop.Checkpoints.save

        def hold(self, step, *a, **kw):
            save(self, step, *a, **kw)
            if step == step_no:
                self.wait()  # the checkpoint is committed
                (marks / f"ready.{jax.process_index()}").touch()
                time.sleep(3600)  # the test SIGKILLs us here

        loop.Checkpoints.save = hold
    elif mode != "run":
        raise SystemExit(f"unknown worker mode {mode}")
    return cli.main(cli_args)


def _helpers(out_dir: Path) -> int:
    from l2d_jax import distributed

    distributed.initialize_from_env()
    import jax

    from l2d_jax import sharding as shd

    me = jax.process_index()
    mine = [{"item": k, "by": me} for k in distributed.process_shard(7)]
    gathered = distributed.gather_objects(mine)
    shared = distributed.on_main(lambda: {"from": me, "x": np.float32(0.5)}, default=float)
    try:
        distributed.on_main(lambda: 1 / 0)
    except Exception as e:  # noqa: BLE001 - the test looks at what each process got
        error = type(e).__name__ + (f": {e}" if me else "")
    mesh = shd.make_mesh(-1, 1, 1)
    g = distributed.global_batch_from_local(np.full((2, 3), me, np.int32), mesh)
    total = int(jax.jit(lambda x: x.sum())(g))
    (out_dir / f"helpers{me}.json").write_text(json.dumps(
        {"gathered": gathered, "on_main": shared, "error": error, "global_sum": total,
         "global_shape": list(g.shape), "main": distributed.is_main_process(),
         "process_count": jax.process_count()}))
    distributed.sync("helpers done")
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
