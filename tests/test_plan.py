"""``l2d-jax plan``: per-device memory from shapes, checked against XLA's memory analysis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_test.py")
KEYS = {"params_bytes", "optimizer_bytes", "activation_bytes_remat", "activation_bytes_no_remat",
        "activation_bytes", "kv_cache_bytes", "total_bytes", "mesh", "num_devices"}

# A Llama shape of ~59M base parameters (+ ~9.6M L2D LoRA flow parameters): big enough that
# parameters, optimizer state and activations all matter, small enough to compile on CPU.
LLAMA_60M = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=512,
                 intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=64, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False)


def _plan_cli(capsys, *args):
    from l2d_jax.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_keys_and_remat(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out, err = _plan_cli(capsys, "--config", TINY, "--mesh", "data=2,fsdp=2,tensor=2", "--json", str(path))
    assert code == 0, err
    assert "total (training)" in out and "KV cache" in out
    p = json.loads(path.read_text())
    assert KEYS <= set(p)
    assert p["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and p["num_devices"] == 8
    assert 0 < p["activation_bytes_remat"] < p["activation_bytes_no_remat"]
    assert p["activation_bytes"] == p["activation_bytes_no_remat"]  # tiny_test: remat False
    parts = ("params_bytes", "optimizer_bytes", "gradient_bytes", "activation_bytes", "gathered_bytes",
             "batch_bytes")
    assert p["total_bytes"] == sum(p[k] for k in parts)
    assert all(isinstance(p[k], int) and p[k] > 0 for k in parts if k != "gathered_bytes")
    # micro 1 x (data 2 x fsdp 2) = 4 rows per micro-step; 8 per step -> 2 accumulation steps
    assert p["accumulation_steps"] == 2 and p["micro_batch_size"] == 1 and p["seq_len"] == 64

    code, _, err = _plan_cli(capsys, "--config", TINY, "--mesh", "data=1", "--config.remat=True",
                             "--json", str(path))
    assert code == 0, err
    q = json.loads(path.read_text())
    assert q["remat"] and q["activation_bytes"] == q["activation_bytes_remat"]


def test_sharding_divides_parameter_bytes():
    from l2d_jax import config as config_lib, plan

    cfg = config_lib.load_config(TINY, ["dtype=float32"], validate=False)
    one = plan.plan(cfg, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    fsdp = plan.plan(cfg, mesh={"data": 1, "fsdp": 4, "tensor": 1})
    data = plan.plan(cfg, mesh={"data": 4, "fsdp": 1, "tensor": 1})
    assert data["params_bytes"] == one["params_bytes"]  # data parallel: replicated
    # fsdp shards the base's embed axis (hidden 32 divides by 4); flow parameters stay replicated
    assert fsdp["trainable_params_bytes"] == one["trainable_params_bytes"]
    assert fsdp["frozen_params_bytes"] < one["frozen_params_bytes"] / 3
    assert one["param_count"]["frozen"] * 4 == one["frozen_params_bytes"]
    assert one["gathered_bytes"] == 0 < fsdp["gathered_bytes"]


@pytest.mark.parametrize("config,preset", [
    ("llama_3.2_1b_instruct_lad_lora.py", "llama-3.2-1b"), ("llama_3.1_8b_instruct_lad.py", "llama-3.1-8b"),
    ("llama_3.1_8b_instruct_lad_lora.py", "llama-3.1-8b"), ("qwen_2.5_1.5b_instruct_lad.py", "qwen2.5-1.5b"),
    ("qwen_2.5_7b_instruct_lad_lora.py", "qwen2.5-7b"), ("smollm2_135m_instruct_lad_lora.py", "smollm2-135m"),
    ("tiny_test.py", None)])
def test_released_configs_map_to_presets(config, preset):
    from l2d_jax import config as config_lib, plan, presets

    cfg = config_lib.load_config(REPO / "configs" / config, validate=False)
    hf, source = plan.model_hf_config(cfg.pretrained_model_dir)
    if preset is None:
        assert source == "random:tiny"
    else:
        assert hf == presets.PRESETS[preset] and preset in source


def test_model_shape_sources(tmp_path):
    from l2d_jax import plan

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_60M))
    assert plan.model_hf_config(str(tmp_path))[0] == LLAMA_60M
    assert plan.model_hf_config("whatever", preset="qwen2.5-7b")[0]["hidden_size"] == 3584
    assert plan.model_hf_config("random:llama-3.1-8b")[0]["num_hidden_layers"] == 32
    with pytest.raises(plan.PlanError, match="--model PRESET"):
        plan.model_hf_config("no-such-org/no-such-model-xyz")


def test_bad_mesh_is_a_clear_error(capsys):
    code, _, err = _plan_cli(capsys, "--config", TINY, "--mesh", "data=3", "--devices", "8")
    assert code == 2
    assert "data=3 x fsdp=1 x tensor=1 = 3 devices does not match the 8 devices" in err
    code, _, err = _plan_cli(capsys, "--config", TINY, "--mesh", "data=-1,tensor=3", "--devices", "8")
    assert code == 2 and "8 devices do not divide by the fixed axes (product 3)" in err
    code, _, err = _plan_cli(capsys, "--config", TINY, "--mesh", "data=2,pipe=2")
    assert code == 2 and "data=N,fsdp=N,tensor=N" in err
    # a mesh that fits the devices but not the batch: the config's own batch check
    code, _, err = _plan_cli(capsys, "--config", TINY, "--mesh", "data=16")
    assert code == 2 and "n_samples_before_backprop=8" in err


def test_aot_topology_without_libtpu_says_what_to_install(capsys, monkeypatch):
    from jax.experimental import topologies

    def missing(**_):  # what jax raises when libtpu is not installed
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See "
                           "https://github.com/jax-ml/jax#installation")

    monkeypatch.setattr(topologies, "get_topology_desc", missing)
    code, _, err = _plan_cli(capsys, "--config", TINY, "--aot-topology", "v5e:2x2")
    assert code == 2
    assert "needs libtpu" in err and "pip install -e '.[tpu]'" in err and "Traceback" not in err
    code, _, err = _plan_cli(capsys, "--config", TINY, "--aot-topology", "v5e-2x2")
    assert code == 2 and "GENERATION:SHAPE" in err


@pytest.mark.slow  # ~2 x 40 s: compiles the real train step for a ~69M-parameter model twice
def test_plan_within_20_percent_of_xla(tmp_path):
    """Planner total vs XLA's peak for the REAL train step (``Trainer.train_step`` lowered and
    compiled for abstract inputs on 8 fake CPU devices). XLA's peak per device is argument +
    output - alias + temp bytes: the output state reuses the donated input state (alias), so
    counting output and argument both would count the state twice. float32: XLA:CPU has no
    bf16 matmul and keeps float32 copies of bf16 operands, which accelerators do not."""
    model = tmp_path / "llama60m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_60M))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2",
               L2D_JAX_CACHE_DIR=str(tmp_path / "cache"))
    overrides = [f"--config.pretrained_model_dir={model}", "--config.dtype=float32", "--config.param_dtype=float32",
                 "--config.max_seq_len=256", "--config.micro_batch_size=1", "--config.n_samples_before_backprop=16"]
    results = {}
    for mesh in ("data=8,fsdp=1,tensor=1", "data=2,fsdp=2,tensor=2"):
        out = tmp_path / f"{mesh}.json"
        proc = subprocess.run([sys.executable, "-m", "l2d_jax.cli", "plan", "--config",
                               str(REPO / "configs" / "llama_3.2_1b_instruct_lad_lora.py"), "--mesh", mesh,
                               "--xla", "--json", str(out), *overrides],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        p = json.loads(out.read_text())
        assert p["param_count"]["frozen"] + p["param_count"]["trainable"] > 50e6
        ratio = p["total_bytes"] / p["xla"]["peak_bytes"]
        results[mesh] = (p["total_bytes"], p["xla"]["peak_bytes"], ratio)
        assert p["activation_bytes_remat"] < p["activation_bytes_no_remat"]
    print(results)
    for mesh, (ours, xla, ratio) in results.items():
        assert 0.8 <= ratio <= 1.2, f"{mesh}: plan {ours / 1e6:.1f} MB vs XLA {xla / 1e6:.1f} MB (ratio {ratio:.3f})"
