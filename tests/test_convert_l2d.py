"""``l2d-jax convert l2d-torch``: original PyTorch L2D checkpoints (safetensors, .bin, the
training's save_pretrained directory in bf16) and settings (JSON, original .cfg); ``convert export``
is tested in test_export.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import TESTS_DIR, golden_sets
from jax_tiny import HF_CONFIG, tiny_llm
from l2d_jax import checkpoint, cli
from l2d_jax.convert.hf import save_hf
from l2d_jax.convert.loading import load_l2d
from l2d_jax.convert.original import read_settings
from l2d_jax.convert.original_names import export_original_state
from l2d_jax.models.l2d import FLOW, L2DModel, abstract_l2d
from l2d_jax.models.llm import LLMConfig

L2D_SETS = [p for p in golden_sets() if (p / "l2d_settings.json").is_file()]
CFG_DIR = TESTS_DIR / "original_cfgs"
CFGS = sorted(CFG_DIR.glob("*.cfg"))


def _set(name: str) -> Path:
    return next(p for p in L2D_SETS if p.name == name)


def _convert(state, base, settings, out, *extra) -> int:
    return cli.main(["convert", "l2d-torch", str(state), "--base", str(base), "--settings", str(settings),
                     str(out), *extra])


def _rel(a, ref) -> float:
    return float(np.max(np.abs(np.asarray(a) - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def _fwd_logits(model, cases):
    return np.asarray(model(jnp.asarray(cases["fwd_input_ids"]), jnp.asarray(cases["fwd_timesteps"]),
                            jnp.asarray(cases["fwd_flow_representation_embeds"])).logits)


# --------------------------------------------------------------------------- golden sets


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """set name -> checkpoint dir converted by the CLI from l2d_state.safetensors + JSON settings."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for d in L2D_SETS:
        assert _convert(d / "l2d_state.safetensors", d / "base", d / "l2d_settings.json", root / d.name) == 0
        out[d.name] = root / d.name
    return out


@pytest.mark.parametrize("name", [p.name for p in L2D_SETS])
def test_converted_golden_set_reproduces_forward(converted, name):
    d = _set(name)
    manifest = checkpoint.read_manifest(converted[name])
    assert manifest["kind"] == "l2d" and manifest["l2d_settings"]["flow_lora_rank"] == 4
    model, tokenizer = load_l2d(converted[name])
    assert tokenizer is None  # the golden base dirs hold no tokenizer
    with np.load(d / "cases.npz") as cases:
        assert _rel(_fwd_logits(model, cases), cases["fwd_logits"]) <= 2e-4
        assert _rel(model(jnp.asarray(cases["fwd_input_ids"])).logits, cases["base_logits_hf"]) <= 2e-4


def test_convert_to_bfloat16(tmp_path):
    d = _set("llama_lora")
    assert _convert(d / "l2d_state.safetensors", d / "base", d / "l2d_settings.json", tmp_path / "out",
                    "--dtype", "bfloat16") == 0
    assert checkpoint.read_manifest(tmp_path / "out")["dtype"] == "bfloat16"
    model, _ = load_l2d(tmp_path / "out", dtype="bfloat16")
    assert model.flow.layers.q_proj.A[...].dtype == jnp.bfloat16
    ref = load_file(str(d / "l2d_state.safetensors"))
    exported = export_original_state(model)
    assert all(np.array_equal(exported[k], v.astype(ml_dtypes.bfloat16).astype(np.float32)) for k, v in ref.items())


def test_bin_state_file(converted, tmp_path):
    torch = pytest.importorskip("torch")
    d = _set("llama_lora")
    ref = load_file(str(d / "l2d_state.safetensors"))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in ref.items()}, tmp_path / "state.bin")
    assert _convert(tmp_path / "state.bin", d / "base", d / "l2d_settings.json", tmp_path / "out") == 0
    model, _ = load_l2d(tmp_path / "out")
    exported = export_original_state(model)
    assert all(np.array_equal(exported[k], v) for k, v in ref.items())


def _names_with_alias(d: Path) -> set[str]:
    return {line.split("\t")[0] for line in (d / "l2d_state_names.txt").read_text().splitlines()
            if "alias_of=" in line}


def _save_pretrained_dir(d: Path, out: Path, state: dict, *, shards: int = 2) -> Path:
    """What the original's training writes (save_pretrained, safe_serialization=False) with
    the bf16 model: config.json + sharded bf16 pytorch_model-*.bin + index, alias keys absent."""
    import torch

    out.mkdir()
    config = json.loads((d / "base" / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, torch_dtype="bfloat16")))
    names = [k for k in state if k not in _names_with_alias(d)]
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: torch.from_numpy(np.asarray(state[k], np.float32).copy()).to(torch.bfloat16) for k in part},
                   out / fname)
        weight_map.update({k: fname for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def test_save_pretrained_dir_bf16_sharded_without_aliases(tmp_path):
    pytest.importorskip("torch")
    d = _set("llama_tied")  # LoRA wrapped_layer aliases and the tied lm_head are both dropped
    ref = load_file(str(d / "l2d_state.safetensors"))
    state_dir = _save_pretrained_dir(d, tmp_path / "run", ref)
    assert "lm_head.weight" in _names_with_alias(d)
    assert _convert(state_dir, d / "base", d / "l2d_settings.json", tmp_path / "out") == 0
    model, _ = load_l2d(tmp_path / "out")
    exported = export_original_state(model)
    base = load_file(str(d / "base" / "model.safetensors"))
    trainable = {line.split("\t")[0] for line in (d / "l2d_state_names.txt").read_text().splitlines()
                 if "\ttrainable" in line}
    for k, v in ref.items():
        if k in trainable:  # flow tensors: the bf16 values of the state, exactly
            assert np.array_equal(exported[k], v.astype(ml_dtypes.bfloat16).astype(np.float32)), k
        elif k in base:  # base tensors: --base's float32 values (the state's are their bf16 casts)
            assert np.array_equal(exported[k], base[k]), k


def test_bf16_state_dir_with_a_different_base_tensor_fails(tmp_path, capsys):
    pytest.importorskip("torch")
    d = _set("llama_lora")
    ref = dict(load_file(str(d / "l2d_state.safetensors")))
    name = "model.layers.1.self_attn.v_proj.weight"
    ref[name] = ref[name] * 1.01  # a different base, even at bf16 precision
    state_dir = _save_pretrained_dir(d, tmp_path / "run", ref, shards=1)
    code = _convert(state_dir, d / "base", d / "l2d_settings.json", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2 and name in err and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- .cfg settings


# Values by hand from each file (and, where the file is silent, the original training CLI's
# defaults: noise 256, C 2048, freeze True, no LoRA, alpha None).
CFG_EXPECT = {
    "lad_lora": dict(flow_representation_dim=256, noise_rescaling=64.0, timestep_modulation_hidden_size=256,
                     freeze_modulation_at_flow_start=False, separate_flow_params=True,
                     separate_flow_params_with_lora=True, flow_lora_rank=32, flow_lora_alpha=32.0,
                     full_dit_modulation=True, nstep_x1_estimation="sample", nstep_temperature_schedule=0.0,
                     flow_to_lm_rescale_in_float32=True, minimum_training_noise=0.0,
                     guidance_modulation_num_classes=0, nstep_guidance_parameter=1.0),
    "lad": dict(flow_representation_dim=256, noise_rescaling=64.0, timestep_modulation_hidden_size=256,
                freeze_modulation_at_flow_start=False, separate_flow_params=True,
                separate_flow_params_with_lora=False, flow_lora_rank=32, flow_lora_alpha=None),
    "no_lad": dict(noise_rescaling=256.0, timestep_modulation_hidden_size=2048, flow_representation_dim=256,
                   freeze_modulation_at_flow_start=True, separate_flow_params=True,
                   separate_flow_params_with_lora=False, flow_lora_rank=32, flow_lora_alpha=None,
                   minimum_training_noise=None, nstep_x1_estimation="sample"),
}


def _cfg_kind(path: Path) -> str:
    return "lad_lora" if path.stem.endswith("_lad_lora") else "lad" if path.stem.endswith("_lad") else "no_lad"


@pytest.mark.parametrize("path", CFGS, ids=[p.name for p in CFGS])
def test_every_original_cfg_imports(path):
    settings, info = read_settings(path)
    for key, value in CFG_EXPECT[_cfg_kind(path)].items():
        assert getattr(settings, key) == value, key
    assert settings.ode == {"method": "midpoint", "atol": 1e-5, "rtol": 1e-5}
    if _cfg_kind(path) != "no_lad":
        assert {"lad", "compute_diff_at_training", "compute_nstep_loss", "peak_lr"} <= set(info.ignored)
    # usable with a (tiny) base: the flow path's parameter tree builds
    cfg = LLMConfig.from_hf(HF_CONFIG)
    state = nnx.state(abstract_l2d(cfg, settings))
    d = settings.flow_representation_dim
    assert state["flow"]["token_embedder"]["layers"][0]["kernel"].shape == (cfg.hidden_size, d)


def test_cfg_typo_is_read_with_a_warning():
    settings, info = read_settings(CFG_DIR / "qwen_2.5_1.5b_instruct_lad.cfg")
    assert settings.noise_rescaling == 64.0
    (warning,) = [w for w in info.warnings if "noise_rescaling" in w]
    assert "64com.0" in warning and "64.0" in warning


def test_cfg_layout_rules(tmp_path):
    cfg = tmp_path / "x.cfg"
    cfg.write_text("[LAD]\nlad\nflow_lora_rank: 8  # inline comment\nseparate_flow_params_with_lora = yes\n"
                   "ode_solver = heun\nuse_data_split_guidance = True\n"
                   'guidance_categories = ["math", "code", "chat"]\n[OTHER]\nnoise_rescaling 16\n')
    settings, info = read_settings(cfg)
    assert settings.flow_lora_rank == 8 and settings.use_lora and settings.noise_rescaling == 16.0
    assert settings.ode["method"] == "heun2" and settings.guidance_modulation_num_classes == 3
    assert not info.warnings


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    """A tiny base HF dir (from JAX) with a tokenizer, which the conversion carries over."""
    pytest.importorskip("transformers")
    import tiny_models

    return save_hf(tiny_llm(5), HF_CONFIG, tmp_path_factory.mktemp("tiny") / "base",
                   tokenizer=tiny_models.tiny_tokenizer())


@pytest.mark.parametrize("cfg_name", ["llama_3.2_1b_instruct_lad_lora.cfg", "qwen_2.5_1.5b_instruct_lad.cfg"])
def test_cli_convert_with_cfg_settings(cfg_name, tiny_base_dir, tmp_path, capsys):
    """A JAX flow path with a cfg's settings, exported as the original's state and converted
    back through the CLI with that .cfg: same parameters, same logits."""
    settings, _ = read_settings(CFG_DIR / cfg_name)
    from l2d_jax.convert.hf import load_hf

    base, _ = load_hf(tiny_base_dir)
    model = L2DModel(base, settings, rngs=nnx.Rngs(7))
    flow = nnx.state(model, FLOW)
    leaves, treedef = jax.tree_util.tree_flatten(flow)
    keys = jax.random.split(jax.random.PRNGKey(8), len(leaves))
    nnx.update(model, jax.tree_util.tree_unflatten(
        treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    state = export_original_state(model)
    save_file(state, str(tmp_path / "state.safetensors"))
    assert _convert(tmp_path / "state.safetensors", tiny_base_dir, CFG_DIR / cfg_name, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "ignored" in err and "compute_nstep_loss" in err
    assert ("warning: noise_rescaling" in err) == cfg_name.startswith("qwen_2.5_1.5b_instruct_lad.")
    loaded, tokenizer = load_l2d(tmp_path / "out")
    assert tokenizer is not None and tokenizer.convert_tokens_to_ids("w0") == 4
    assert all(np.array_equal(v, state[k]) for k, v in export_original_state(loaded).items())
    ids = jnp.arange(10).reshape(2, 5)
    t = jnp.linspace(0.0, 0.9, 10).reshape(2, 5)
    x_t = 64.0 * jax.random.normal(jax.random.PRNGKey(9), (2, 5, 256))
    forward = nnx.jit(lambda m, i, tt, x: m(i, tt, x).logits)  # one program for both models
    np.testing.assert_array_equal(np.asarray(forward(loaded, ids, t, x_t)), np.asarray(forward(model, ids, t, x_t)))


# --------------------------------------------------------------------------- errors


def _error_cases(tmp: Path) -> dict:
    lora, tied = _set("llama_lora"), _set("llama_tied")
    ref = dict(load_file(str(lora / "l2d_state.safetensors")))
    extra = dict(ref, **{"model.layers.0.mlp.flow_gate_proj.C": np.zeros((4, 4), np.float32)})
    save_file(extra, str(tmp / "extra.safetensors"))
    bad_cfg = tmp / "bad.cfg"
    bad_cfg.write_text("[LAD]\nlad = True\nflow_representation_dim = abc\n")
    bad_json = tmp / "bad.json"
    bad_json.write_text(json.dumps(dict(json.loads((lora / "l2d_settings.json").read_text()),
                                        separate_flow_params=False)))
    state, base, settings = lora / "l2d_state.safetensors", lora / "base", lora / "l2d_settings.json"
    return {
        "unknown key": ((tmp / "extra.safetensors", base, settings), "model.layers.0.mlp.flow_gate_proj.C"),
        "wrong base": ((state, tied / "base", settings), "wrong --base"),
        "bad cfg value": ((state, base, bad_cfg), "flow_representation_dim"),
        "contradictory settings": ((state, base, bad_json), "separate_flow_params_with_lora"),
        "missing state": ((tmp / "nope.safetensors", base, settings), "nope.safetensors"),
        "state of unknown type": ((lora / "meta.json", base, settings), "meta.json"),
    }


@pytest.mark.parametrize("case", ["unknown key", "wrong base", "bad cfg value", "contradictory settings",
                                  "missing state", "state of unknown type"])
def test_convert_errors_are_one_line_and_leave_nothing(case, tmp_path, capsys):
    (state, base, settings), named = _error_cases(tmp_path)[case]
    out = tmp_path / "out"
    code = _convert(state, base, settings, out)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_convert_refuses_a_non_empty_output_dir(converted, tmp_path, capsys):
    d = _set("llama_lora")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = _convert(d / "l2d_state.safetensors", d / "base", d / "l2d_settings.json", out)
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _convert(d / "l2d_state.safetensors", d / "base", d / "l2d_settings.json", out, "--overwrite") == 0
    assert (out / checkpoint.MANIFEST).is_file() and not (out / "keep.txt").exists()
