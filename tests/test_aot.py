"""Ahead-of-time TPU compilation (``l2d-jax plan --aot-topology``): the real train step and
generation programs compile for v5e and v4 slices, the compiled HLO is sharded as asked, and
a program that does not fit gets ``fits: false`` and a change that, compiled, fits.

Needs libtpu (``pip install -e '.[tpu]'``; CI installs it and sets L2D_REQUIRE_LIBTPU=1, which
turns the skip into a failure). JAX itself stays on the CPU backend."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_test.py")
GEN_FLAGS = ["--gen-batch", "4", "--gen-prompt-len", "32", "--gen-new-tokens", "8", "--gen-steps", "4"]

if importlib.util.find_spec("libtpu") is None:
    if os.environ.get("L2D_REQUIRE_LIBTPU"):
        raise RuntimeError("L2D_REQUIRE_LIBTPU is set but libtpu is not installed (pip install -e '.[tpu]')")
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')", allow_module_level=True)


def _plan(capsys, tmp_path, *args) -> tuple[int, dict, str]:
    from l2d_jax.cli import main

    path = tmp_path / "plan.json"
    code = main(["plan", "--config", TINY, *args, "--json", str(path)])
    out = capsys.readouterr()
    return code, (json.loads(path.read_text()) if path.exists() else {}), out.out + out.err


PROGRAM_KEYS = {"fits", "peak_bytes", "compile_s", "host_peak_rss_bytes", "flops", "bytes_accessed",
                "roofline_step_s", "suggestion"}


@pytest.mark.parametrize("topology,mesh,gen_mesh", [
    ("v5e:2x2", "data=1,fsdp=2,tensor=2", "data=2,fsdp=1,tensor=2"),
    ("v4:2x2x1", "data=1,fsdp=2,tensor=2", "data=2,fsdp=1,tensor=2")])
def test_train_and_generation_compile_for_tpu(capsys, tmp_path, topology, mesh, gen_mesh):
    code, p, out = _plan(capsys, tmp_path, "--aot-topology", topology, "--mesh", mesh, "--gen-mesh", gen_mesh,
                         *GEN_FLAGS)
    assert code == 0, out
    a = p["aot"]
    # one device per chip, as on the VMs: v5e 16 GiB; v4 32 GiB (megacore: a v4-8 VM has 4 devices)
    assert a["topology"] == topology and a["num_devices"] == 4
    assert a["hbm_bytes_per_device"] == {"v5e:2x2": 16, "v4:2x2x1": 32}[topology] * 2**30
    for name in ("train", "generate"):
        r = a[name]
        assert PROGRAM_KEYS <= set(r), name
        assert r["fits"] is True and r["suggestion"] is None
        assert 0 < r["peak_bytes"] < a["hbm_bytes_per_device"]
        assert r["compile_s"] > 0 and r["host_peak_rss_bytes"] > 2**20
        assert r["flops"] > 0 and r["bytes_accessed"] > 0 and r["roofline_step_s"] > 0
    assert set(a["generate"]["programs"]) == {"prefill", "decode"}
    assert a["generate"]["shape"]["mesh"] == dict(zip(("data", "fsdp", "tensor"),
                                                       (int(x.split("=")[1]) for x in gen_mesh.split(","))))
    assert "libtpu" not in out.lower() and "could not determine" not in out  # libtpu's probing noise is off


def test_roofline_counts_every_loop_iteration():
    """XLA counts a loop body once; the roofline counts scan lengths and while trip counts."""
    import jax
    import jax.numpy as jnp

    from l2d_jax import roofline

    w = jnp.zeros((5, 16, 16), jnp.bfloat16)
    x = jnp.zeros((4, 16), jnp.float32)

    def f(w, x):
        x = jax.lax.scan(lambda c, wl: (c @ wl.astype(jnp.float32), None), x, w)[0]  # 5 matmuls
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w[0].astype(jnp.float32), c[1] + 1),
                                  (x, 0))[0]

    cost = roofline.program_cost(jax.make_jaxpr(f)(w, x), [True, False], while_trips=(3,))
    one = 2 * 4 * 16 * 16
    assert cost.flops == (5 + 3) * one
    # weights read: a (16, 16) f32 slice per matmul (cast from the bf16 parameter: still a parameter)
    assert cost.param_bytes == (5 + 3) * 16 * 16 * 4
    assert cost.activation_bytes == (5 + 3) * 2 * 4 * 16 * 4
    flops, nbytes = cost.per_device(num_devices=4, tensor=2)
    assert flops == cost.flops / 4 and nbytes == cost.param_bytes / 2 + cost.activation_bytes / 4


def _hlo_shapes(text: str, op: str) -> list[tuple[int, ...]]:
    """Result shapes of every ``op`` instruction of a compiled HLO text."""
    shapes = []
    for m in re.finditer(rf"= \(?([a-z0-9]+)\[([\d,]*)\][^=]*? {op}\(", text):
        shapes.append(tuple(int(d) for d in m.group(2).split(",") if d))
    return shapes


def _entry_parameter_shapes(text: str) -> list[tuple[int, ...]]:
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    return [tuple(int(d) for d in m.group(1).split(",") if d)
            for m in re.finditer(r"= [a-z0-9]+\[([\d,]*)\][^ ]* parameter\(", entry)]


def _tiny_cfg(mesh: dict):
    from l2d_jax import config as config_lib

    cfg = config_lib.load_config(TINY, ["dtype=bfloat16", "param_dtype=bfloat16"], validate=False)
    for k, v in mesh.items():
        cfg.mesh[k] = v
    return cfg


def test_compiled_train_step_holds_parameters_split_over_fsdp_and_tensor():
    import jax

    from l2d_jax import aot

    topo = aot.topology("v5e:2x2")
    program = aot.train_program(_tiny_cfg({"data": 1, "fsdp": 2, "tensor": 2}), topo.devices)
    lowered = program.lower()
    compiled = lowered.compile()
    frozen_in = compiled.input_shardings[0][1]
    shapes = jax.tree.leaves(lowered.args_info[0][1], is_leaf=lambda x: hasattr(x, "shape"))
    split = [(s.shape, sh) for s, sh in zip(shapes, jax.tree.leaves(frozen_in))
             if tuple(sh.shard_shape(s.shape)) != tuple(s.shape)]
    specs = {str(sh.spec) for _, sh in split}
    assert any("fsdp" in s and "tensor" in s for s in specs), specs  # weights split over both axes
    params = _entry_parameter_shapes(compiled.as_text())
    for shape, sh in split:  # the per-device program takes each split weight as its shard
        assert tuple(sh.shard_shape(shape)) in params, (shape, sh.spec)


def _split_weight_shapes(cfg, mesh) -> set[tuple[int, ...]]:
    """Whole shapes (stacked, and one layer's) of the weights split over some mesh axis."""
    import jax
    from flax import nnx

    from l2d_jax import config as config_lib, plan, sharding as shd
    from l2d_jax.models.llm import LLMConfig

    llm = LLMConfig.from_hf(plan.model_hf_config(cfg.pretrained_model_dir)[0], dtype="bfloat16",
                            param_dtype="bfloat16")
    state = nnx.state(plan.abstract_model(llm, config_lib.l2d_settings(cfg)))
    out = set()
    for var, sh in zip(jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
                       jax.tree.leaves(shd.state_shardings(state, mesh))):
        shape = tuple(var.get_value().shape)
        if any(sh.spec) and len(shape) >= 2:
            out.add(shape)
            if var.get_metadata().get("axes", (None,))[0] == "layers":  # one layer, sliced or not
                out.update({shape[1:], (1, *shape[1:])})
    return out


@pytest.mark.parametrize("gen_mesh,gathers_weights", [({"data": 2, "fsdp": 1, "tensor": 2}, False),
                                                       ({"data": 2, "fsdp": 2, "tensor": 1}, True)])
def test_decode_loop_never_gathers_tensor_sharded_weights(gen_mesh, gathers_weights):
    """Tensor-parallel decoding keeps each weight split (no all-gather of a whole weight in
    the program); with fsdp the layers ARE gathered whole, one at a time, which the same check
    sees (so it can fail)."""
    from l2d_jax import aot, config as config_lib, sharding as shd

    topo = aot.topology("v5e:2x2")
    cfg = _tiny_cfg({"data": 1, "fsdp": 1, "tensor": 1})
    bench = config_lib.load_config(REPO / "configs" / "benchmark.py", [], validate=False)
    shape = aot.GenerationShape(batch=4, prompt_len=32, new_tokens=8, steps=4, mesh=gen_mesh)
    prefill, decode = aot.generate_programs(cfg, bench, topo.devices, shape)
    text = decode.lower().compile().as_text()
    mesh = shd.make_mesh(**gen_mesh, devices=topo.devices)
    weights = _split_weight_shapes(cfg, mesh)
    gathered = [s for s in _hlo_shapes(text, "all-gather") if s in weights]
    assert bool(gathered) == gathers_weights, gathered
    assert " while(" in text  # one compiled decoding loop


def test_out_of_memory_gives_fits_false_and_a_verified_change(capsys, tmp_path):
    """A budget below the step's peak (--hbm-gib): not a crash but fits: false, the shortfall,
    and the first change of the ladder that compiles within the budget."""
    emitted = tmp_path / "overrides.txt"
    code, p, out = _plan(capsys, tmp_path, "--aot-topology", "v5e:2x2", "--mesh", "data=4,fsdp=1,tensor=1",
                         "--config.micro_batch_size=2", "--config.n_samples_before_backprop=16",
                         "--programs", "train", "--hbm-gib", "0.004", "--emit-overrides", str(emitted),
                         "--train-examples", "64")
    assert code == 0, out
    r = p["aot"]["train"]
    assert r["fits"] is False and r["oom"]["shortfall_bytes"] > 0
    s = r["suggestion"]
    assert s["fits"] is True and s["overrides"], s
    assert s["peak_bytes"] <= p["aot"]["hbm_bytes_per_device"] < r["peak_bytes"]
    assert "fits with:" in out and s["flags"] in out
    # --emit-overrides: the verified change as --config lines a launcher appends to `train`
    lines = emitted.read_text().splitlines()
    assert lines and all(x.startswith("--config.") for x in lines)
    if "mesh" in s["overrides"]:
        assert {f"--config.mesh.{k}={v}" for k, v in s["overrides"]["mesh"].items()} <= set(lines)
    from l2d_jax import config as config_lib, plan_tpu

    given = ["mesh.data=4", "micro_batch_size=2", "n_samples_before_backprop=16"]
    launched = config_lib.load_config(TINY, [*given, *(x[len("--config."):] for x in lines)], validate=False)
    compiled = plan_tpu.with_overrides(config_lib.load_config(TINY, given, validate=False), s["overrides"])
    for key in ("mesh", "sharding_rules", "remat_policy", "micro_batch_size"):
        assert launched.to_dict()[key] == compiled.to_dict()[key], key
    # the roofline epoch time of the suggestion, labelled as a lower bound
    assert p["epoch"]["roofline_epoch_s"] == pytest.approx(s["roofline_step_s"] * p["epoch"]["steps_per_epoch"])
    assert "roofline lower bound of one step" in out and "not a measurement" in out
    # --require-fit turns "does not fit" into exit code 3 (launch scripts refuse the run), and
    # --emit-overrides writes nothing when nothing fits
    code, _, _ = _plan(capsys, tmp_path, "--aot-topology", "v5e:2x2", "--mesh", "data=4,fsdp=1,tensor=1",
                       "--config.micro_batch_size=2", "--config.n_samples_before_backprop=16",
                       "--programs", "train", "--hbm-gib", "0.004", "--no-suggest", "--require-fit",
                       "--emit-overrides", str(emitted))
    assert code == 3 and not emitted.exists()


def test_generation_that_does_not_fit_gets_a_mesh_and_batch_that_do(capsys, tmp_path):
    """Generation's ladder: tensor parallelism, then a smaller batch; the change is given as
    plan flags and as the l2d-jax eval flags, and was compiled within the budget."""
    shape = ["--programs", "generate", "--gen-mesh", "data=4", "--gen-batch", "64", "--gen-prompt-len", "512",
             "--gen-new-tokens", "8", "--gen-steps", "4"]  # the KV cache dominates the peak
    code, p, out = _plan(capsys, tmp_path, "--aot-topology", "v5e:2x2", *shape, "--no-suggest")
    assert code == 0, out
    peak = p["aot"]["generate"]["peak_bytes"]
    budget = 0.6 * peak / 2**30
    code, p, out = _plan(capsys, tmp_path, "--aot-topology", "v5e:2x2", *shape, "--hbm-gib", f"{budget:.6f}")
    assert code == 0, out
    r = p["aot"]["generate"]
    assert r["fits"] is False and r["peak_bytes"] == peak
    s = r["suggestion"]
    assert s["fits"] is True and s["peak_bytes"] <= budget * 2**30, s
    assert s["overrides"]["gen_mesh"]["tensor"] == 2  # tiny: 2 KV heads
    assert s["eval_flags"].startswith("--mesh data=2,fsdp=1,tensor=2") and "l2d-jax eval --mesh" in out


def test_xla_out_of_memory_message_is_parsed():
    from l2d_jax import aot

    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(50.02G) exceeds available HBM (15.75G).")
    m = aot._OOM.search(msg)
    assert aot._size(m.group(1), m.group(2)) == int(50.02 * 2**30)
    assert aot._size(m.group(3), m.group(4)) == int(15.75 * 2**30)


def test_unknown_topology_is_a_clear_error(capsys):
    from l2d_jax.cli import main

    assert main(["plan", "--config", TINY, "--aot-topology", "v9z:2x2"]) != 0
    err = capsys.readouterr().err
    assert "GENERATION:SHAPE" in err and "Traceback" not in err


@pytest.mark.slow
def test_released_1b_lora_on_v5e_2x2_does_not_fit_and_the_suggestion_does():
    """The issue's case: the released 1B LoRA config (micro 4 x 2048) on v5e:2x2, fsdp 4:
    XLA runs out of HBM; the plan says so and finds a change that compiles and fits."""
    import subprocess
    import sys

    path = Path(os.environ.get("TMPDIR", "/tmp")) / "plan_1b_v5e.json"
    proc = subprocess.run([sys.executable, "-m", "l2d_jax.cli", "plan", "--config",
                           str(REPO / "configs" / "llama_3.2_1b_instruct_lad_lora.py"), "--aot-topology", "v5e:2x2",
                           "--mesh", "data=1,fsdp=4,tensor=1", "--programs", "train", "--json", str(path)],
                          capture_output=True, text=True, timeout=1500, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(path.read_text())["aot"]["train"]
    assert r["fits"] is False and "RESOURCE_EXHAUSTED" in r["oom"]["message"]
    assert r["suggestion"]["fits"] is True and r["suggestion"]["peak_bytes"] <= 16 * 2**30
