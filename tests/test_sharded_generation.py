"""Evaluation and generation with the model sharded over a (data, fsdp, tensor) mesh.

Tiny random L2D model (tests/jax_tiny.py with 4 KV heads, so that heads, KV heads, MLP,
embedding and vocabulary all divide by 2 and 4), float32. Checks:

- ``generate`` gives the one-device tokens (base path: ode_steps 0; L2D: 4 grid points;
  greedy and sampled) with the parameters placed by ``sharding.place_module`` on the meshes
  tensor=4, fsdp=2 x tensor=2 and data=2 x tensor=2, traced under ``gather_layers``, and no
  device holds a whole stacked decoder matrix;
- the ``gather_layers`` layout is part of the jitted programs' cache key: the same shapes
  and shardings with and without it compile separately, and a one-device call afterwards
  reuses its own programs;
- ``l2d-jax eval --mesh fsdp=2,tensor=2`` (one process, 4 devices) and ``--mesh tensor=2``
  on 2 processes of 2 devices each write the one-device run's completions;
- a mesh that does not tile the local devices is a UsageError naming the fix.

Devices are fake CPU devices in subprocesses (XLA_FLAGS is read when JAX starts). Every
subprocess compiles at ``--xla_backend_optimization_level=0`` (about half the compile time);
the runs compared are compiled alike (the reference of the eval checks runs with the same
flags, with the custom CPU kernels off as on several devices).

This file is also the worker of the generation checks: ``python tests/test_sharded_generation.py
OUT.json RUN[,RUN...]``, a RUN being ``single``, a name of ``MESHES`` or ``cache``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NEW = 8  # new tokens per completion
O0 = "--xla_backend_optimization_level=0"
NO_KERNELS = {"L2D_CPU_MATVEC": "0", "L2D_CPU_ATTENTION": "0", "L2D_CPU_DECODER": "0"}
MESHES = {"tensor4": (1, 1, 4), "fsdp2_tensor2": (1, 2, 2), "data2_tensor2": (2, 1, 2)}
STACKED_MATRICES = {f"base/layers/{m}/kernel" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                                         "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                                                         "mlp/down_proj")}


def _env(devices: int, cache: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {O0}",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2",
               L2D_JAX_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", **NO_KERNELS)
    for k in ("L2D_COORDINATOR", "L2D_NUM_PROCESSES", "L2D_PROCESS_ID", "L2D_DISTRIBUTED"):
        env.pop(k, None)
    return env


def _worker_results(tmp_path: Path, *groups: list[str]) -> dict:
    """The runs of every group, each group in its own 8-device worker process (in parallel)."""
    import subprocess

    procs = []
    for i, runs in enumerate(groups):
        out, log = tmp_path / f"worker{i}.json", tmp_path / f"worker{i}.log"
        procs.append((subprocess.Popen([sys.executable, __file__, str(out), ",".join(runs)], cwd=REPO,
                                       env=_env(8, tmp_path / "cache"), stdout=log.open("wb"),
                                       stderr=subprocess.STDOUT), out, log))
    result = {}
    for proc, out, log in procs:
        assert proc.wait(600) == 0, log.read_text()[-4000:]
        result.update(json.loads(out.read_text()))
    return result


# --------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Tokens and placements: the one-device run and tensor4 in one worker, the other two
    meshes in another, side by side (the same flags compile the same programs)."""
    return _worker_results(tmp_path_factory.mktemp("tokens"), ["single", "tensor4"], ["fsdp2_tensor2", "data2_tensor2"])


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_generate_gives_the_one_device_tokens(tokens, mesh):
    single = tokens["single"]
    assert set(single) == {"ode0_greedy", "ode0_sampled", "ode4_greedy", "ode4_sampled"}
    assert single["ode4_sampled"] != single["ode4_greedy"]  # sampling and the flow path matter
    assert single["ode4_greedy"] != single["ode0_greedy"]
    assert tokens[mesh]["tokens"] == single


@pytest.mark.parametrize("mesh", list(MESHES))
def test_no_device_holds_a_whole_stacked_matrix(tokens, mesh):
    """Every leaf the rules shard has the shard shape its spec says (the layers axis whole);
    the base decoder's seven stacked matrices are among them."""
    placed = tokens[mesh]["placement"]
    assert STACKED_MATRICES <= {p for p, leaf in placed.items() if leaf["sharded"]}
    for path, leaf in placed.items():
        assert leaf["shard"] == leaf["expected_shard"], path
        if path in STACKED_MATRICES:
            assert leaf["shard"][0] == leaf["shape"][0] and leaf["shard"] != leaf["shape"], path


def test_gather_layers_is_part_of_the_programs_cache_key(tmp_path):
    """Base model (ode_steps 0), in this order: one device; fsdp=2 x tensor=2 without
    gather_layers; the same arrays with it (must compile prefill and decode again, not reuse
    the programs traced without it); one device again (its own programs). Each gives the
    one-device tokens."""
    r = _worker_results(tmp_path, ["cache"])["cache"]
    assert r.pop("compiled") == {"single": 2, "sharded_plain": 2, "sharded_gathered": 2, "single_again": 0}
    assert all(tokens == r["single"] for tokens in r.values())


def test_a_mesh_that_does_not_tile_the_local_devices_is_a_usage_error(tmp_path, capsys):
    from l2d_jax.cli import main
    from l2d_jax.errors import UsageError
    from l2d_jax.sharding import local_mesh

    devices = [object()] * 8  # only counted
    with pytest.raises(UsageError, match=r"tensor=3 cannot tile the 8 local devices.*--mesh data=-1,fsdp=1,tensor=1"):
        local_mesh({"tensor": 3}, devices=devices)
    with pytest.raises(UsageError, match=r"data=2,fsdp=1,tensor=2 cannot tile the 8 .* product is 8"):
        local_mesh({"data": 2, "tensor": 2}, devices=devices)
    with pytest.raises(UsageError, match="the axes are data, fsdp, tensor"):
        local_mesh({"model": 2}, devices=devices)
    # the CLI checks before loading anything (the model paths do not exist)
    config = str(REPO / "configs" / "benchmark.py")
    for mesh in (["--mesh", "tensor=2"], ["--config.mesh={'fsdp': 2}"]):  # the flag, the config's key
        assert main(["eval", "--config", config, "--ckpt", str(tmp_path / "none"), "--steps", "0",
                     "--out", str(tmp_path / "o"), *mesh]) == 2
        assert "cannot tile the 1 local devices" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "none"), "--prompt", "hi", "--mesh", "fsdp=2"]) == 2
    assert "cannot tile the 1 local devices" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "none"), "--prompt", "hi", "--mesh", "width=2"]) == 2
    assert "expected comma-separated data=N,fsdp=N,tensor=N" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from flax import nnx
    from jax_tiny import HF_CONFIG, tiny_l2d

    from l2d_jax import checkpoint
    from l2d_jax.config import tiny_tokenizer

    model = tiny_l2d(seed=3, num_key_value_heads=4)
    return str(checkpoint.save_checkpoint(
        tmp_path_factory.mktemp("sharded_eval") / "l2d", kind="l2d", dtype="float32", tokenizer=tiny_tokenizer(),
        base_params=nnx.to_pure_dict(nnx.state(model.base, nnx.Param)),
        hf_config={**HF_CONFIG, "num_key_value_heads": 4},
        flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)), l2d_settings=model.settings.to_dict()))


def _eval_argv(ckpt: str, out: Path, *mesh: str) -> list[str]:
    from test_eval_runner import FIX

    opts = {"gsm8k": {"source": str(FIX / "gsm8k_test.jsonl"), "shots_source": str(FIX / "gsm8k_train.jsonl")}}
    return ["eval", "--config", str(REPO / "configs" / "benchmark.py"), "--ckpt", ckpt, "--steps", "0,4",
            "--out", str(out), "--tasks", "gsm8k", "--limit", "3", "--batch-size", "2", "--no-progress",
            f"--config.task_options={opts!r}", "--config.dtype=float32", "--config.param_dtype=float32",
            f"--config.generation_max_len={NEW}", *mesh]


def _start_eval(tmp_path: Path, name: str, argv: list[str], env: dict):
    """One ``cli.main(argv)`` in a worker process (tests/test_multihost_eval.py's) with ``env``."""
    from test_distributed import _start

    log = tmp_path / f"{name}.log"
    return _start([str(tmp_path / name), "--", *argv], env, log, script=str(TESTS / "test_multihost_eval.py")), log


def _completions(out: Path) -> dict[str, list[str]]:
    from test_eval_runner import read_jsonl

    return {p.name: [r["completion"] for r in read_jsonl(p)] for p in sorted((out / "completions").glob("*.jsonl"))}


@pytest.fixture(scope="module")
def reference_eval(ckpt, tmp_path_factory):
    """(out dir, worker process, log) of the one-device eval, started here, awaited by the user."""
    tmp = tmp_path_factory.mktemp("reference_eval")
    (tmp / "ref").mkdir()
    proc, log = _start_eval(tmp, "ref", _eval_argv(ckpt, tmp / "out"), _env(1, tmp / "cache"))
    return tmp / "out", proc, log


def _await(procs_logs, timeout: float = 300) -> None:
    from test_distributed import _wait

    procs, logs = zip(*procs_logs)
    _wait(list(procs), timeout, list(logs))


def test_cli_eval_with_fsdp_and_tensor_writes_the_one_device_completions(ckpt, reference_eval, tmp_path):
    ref_out, *ref = reference_eval
    (tmp_path / "mesh").mkdir()
    started = _start_eval(tmp_path, "mesh", _eval_argv(ckpt, tmp_path / "out", "--mesh", "fsdp=2,tensor=2"),
                          _env(4, tmp_path / "cache"))
    _await([tuple(ref), started])
    want = _completions(ref_out)
    assert set(want) == {"gsm8k_base.jsonl", "gsm8k_4.jsonl"} and all(len(c) == 3 for c in want.values())
    assert _completions(tmp_path / "out") == want


@pytest.mark.slow  # ~30-45 s on 2 cores: two gloo processes and the reference start, load and compile
def test_two_processes_with_tensor_parallel_groups_write_the_one_device_completions(ckpt, reference_eval, tmp_path):
    from test_distributed import _dist_env, _free_port, _start

    ref_out, *ref = reference_eval
    argv = _eval_argv(ckpt, tmp_path / "out", "--mesh", "tensor=2")
    port, env = _free_port(), _env(2, tmp_path / "cache")
    logs = [tmp_path / f"mh{i}.log" for i in range(2)]
    procs = [_start([str(tmp_path), "--", *argv], _dist_env(env, i, 2, port), logs[i],
                    script=str(TESTS / "test_multihost_eval.py")) for i in range(2)]
    _await([tuple(ref), *zip(procs, logs)])
    assert _completions(tmp_path / "out") == _completions(ref_out)
    # each process generated its share (2 + 1 of the 3 prompts) on its own 2-device mesh
    calls = [json.loads((tmp_path / f"calls.{i}.json").read_text())["calls"] for i in range(2)]
    assert calls == [[[2]], [[1]]]


# --------------------------------------------------------------------------- worker side


def _placement(model, mesh) -> dict:
    """path -> shape, shard shape on the first device, the shard shape its rules' spec gives,
    and whether the spec shards it."""
    import numpy as np
    from flax import nnx

    from l2d_jax import sharding as shd

    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        spec = shd.logical_to_spec(var.get_metadata().get("axes"), shd.RULES, mesh, value.shape)
        expected = [int(n // np.prod([mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ())]))
                    for n, e in zip(value.shape, tuple(spec) + (None,) * value.ndim)]
        shard = list(value.addressable_shards[0].data.shape)
        out["/".join(map(str, path))] = dict(shape=list(value.shape), shard=shard, expected_shard=expected,
                                             sharded=any(e is not None for e in spec))
    return out


def _worker(out_path: str, runs: str) -> None:
    import jax
    import numpy as np
    from jax_tiny import tiny_l2d

    from l2d_jax import sharding as shd
    from l2d_jax.generate import GenerateOptions, compiled_programs, generate, left_pad
    from l2d_jax.sampling import Sampler

    assert jax.device_count() == 8, jax.devices()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6], [7]], 2)
    opts = GenerateOptions(max_new_tokens=NEW, max_ode_points=4)
    calls = {f"ode{n}_{name}": dict(ode_steps=n, sampler=Sampler(temperature))
             for n in (0, 4) for name, temperature in (("greedy", 0.0), ("sampled", 1.0))}

    def run(model, ids, mask, calls) -> dict:
        return {name: np.asarray(generate(model, ids, mask, key=jax.random.PRNGKey(3), opts=opts, **kw).tokens).tolist()
                for name, kw in calls.items()}

    def placed(d, f, t, model):
        mesh = shd.make_mesh(d, f, t, devices=jax.devices()[:d * f * t])
        shd.place_module(model, mesh)
        rows = shd.batch_sharding(mesh)
        return mesh, model, jax.device_put(ids, rows), jax.device_put(mask, rows)

    result: dict = {}
    for name in runs.split(","):
        if name == "single":
            result[name] = run(tiny_l2d(0, num_key_value_heads=4), ids, mask, calls)
        elif name in MESHES:
            mesh, model, rows_ids, rows_mask = placed(*MESHES[name], tiny_l2d(0, num_key_value_heads=4))
            with shd.gather_layers(mesh):
                result[name] = {"tokens": run(model, rows_ids, rows_mask, calls),
                                "placement": _placement(model, mesh)}
        else:  # cache: the base model's programs (ode_steps 0), sampled
            single = tiny_l2d(0, num_key_value_heads=4).base
            mesh, model, rows_ids, rows_mask = placed(1, 2, 2, tiny_l2d(0, num_key_value_heads=4).base)
            order = {"single": (single, ids, mask, None), "sharded_plain": (model, rows_ids, rows_mask, None),
                     "sharded_gathered": (model, rows_ids, rows_mask, mesh), "single_again": (single, ids, mask, None)}
            out: dict = {"compiled": {}}
            for key, (m, i, k, gathering) in order.items():
                before = compiled_programs()
                with shd.gather_layers(gathering):
                    out[key] = run(m, i, k, {"sampled": calls["ode0_sampled"]})
                out["compiled"][key] = compiled_programs() - before
            result[name] = out
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    _worker(*sys.argv[1:3])
