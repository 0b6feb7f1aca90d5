"""``l2d-jax convert export``: an L2D model -> the original PyTorch L2D's state_dict, settings and
README, checked against the original's own records in the golden sets (state_dict key layout
``l2d_state_names.txt``, values ``l2d_state.safetensors``, constructor arguments
``l2d_settings.json``). The export of a training workdir is tested in test_train_loop.py (it
reuses that file's tiny run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import golden_sets
from l2d_jax import cli, storage
from l2d_jax.convert import export, original_names
from l2d_jax.convert.loading import load_l2d
from l2d_jax.convert.original import constructor_dict_from_settings, settings_from_constructor_dict
from l2d_jax.settings import L2DSettings

L2D_SETS = {p.name: p for p in golden_sets() if (p / "l2d_settings.json").is_file()}
SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}


def _convert(d: Path, out: Path) -> Path:
    assert cli.main(["convert", "l2d-torch", str(d / "l2d_state.safetensors"), "--base", str(d / "base"),
                     "--settings", str(d / "l2d_settings.json"), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """set name -> the golden converted by `convert l2d-torch` (JSON settings)."""
    root = tmp_path_factory.mktemp("converted")
    return {name: _convert(d, root / name) for name, d in L2D_SETS.items()}


def names_file(d: Path) -> list[tuple[str, tuple]]:
    """(name, shape) of every line of the original's recorded state_dict layout, in order."""
    out = []
    for line in (d / "l2d_state_names.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")[:2]
        out.append((name, tuple(int(x) for x in shape.strip("()").split(",") if x.strip())))
    return out


def read_safetensors(path: Path) -> tuple[list[tuple[str, tuple, str]], dict[str, np.ndarray]]:
    """([(name, shape, dtype) in file order], arrays) read with the safetensors library."""
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    layout = [(k, tuple(header[k]["shape"]), header[k]["dtype"]) for k in order]
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(order) and f.metadata() == {"format": "pt"}
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return layout, arrays


# --------------------------------------------------------------------------- the golden sets


@pytest.mark.parametrize("name", sorted(L2D_SETS))
def test_export_has_the_originals_layout_values_and_settings(converted, name, tmp_path):
    d = L2D_SETS[name]
    out = tmp_path / "export"
    assert cli.main(["convert", "export", str(converted[name]), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base_config.json", "l2d_settings.json",
                                                     "l2d_state.safetensors"]
    layout, arrays = read_safetensors(out / "l2d_state.safetensors")
    # names AND order as the original's state_dict(), shapes in its (out, in) layout
    assert [(n, s) for n, s, _ in layout] == names_file(d)
    assert {dt for _, _, dt in layout} == {"F32"}
    ref = load_file(str(d / "l2d_state.safetensors"))
    for k, v in ref.items():
        np.testing.assert_allclose(arrays[k], v, rtol=0, atol=1e-6 * max(1.0, float(np.abs(v).max())), err_msg=k)
    # the constructor arguments, exactly the golden's (which the original was built with)
    assert json.loads((out / "l2d_settings.json").read_text()) == json.loads((d / "l2d_settings.json").read_text())
    base = json.loads((d / "base" / "config.json").read_text())
    config = json.loads((out / "base_config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "rope_theta"):
        assert config[key] == base[key], key
    readme = (out / "README.md").read_text()
    for text in ("FlowLlamaForCausalLM(base, **json.load(f))", "load_state_dict(state, strict=True)",
                 'load_file("l2d_state.safetensors")', "456871e", "transformers==4.46.3", "torch.float32",
                 "BASE_MODEL_ID_OR_DIR"):  # the golden base records no hub id
        assert text in readme, text


def test_bfloat16_export_and_round_trip(converted, tmp_path, capsys):
    d = L2D_SETS["llama_tied"]
    out = tmp_path / "tied.safetensors"  # a file name: the rest beside it
    assert cli.main(["convert", "export", str(converted["llama_tied"]), str(out), "--dtype", "bfloat16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tied.README.md", "tied.base_config.json", "tied.l2d_settings.json", "tied.safetensors"]
    layout, arrays = read_safetensors(out)
    assert [(n, s) for n, s, _ in layout] == names_file(d) and {dt for _, _, dt in layout} == {"BF16"}
    ref = load_file(str(d / "l2d_state.safetensors"))
    assert all(arrays[k].dtype == ml_dtypes.bfloat16 and np.array_equal(arrays[k], v.astype(ml_dtypes.bfloat16))
               for k, v in ref.items())
    assert 'load_file("tied.safetensors")' in (tmp_path / "tied.README.md").read_text()
    # float32 export -> convert l2d-torch -> the same checkpoint
    f32 = tmp_path / "f32" / "tied.safetensors"
    f32.parent.mkdir()
    assert cli.main(["convert", "export", str(converted["llama_tied"]), str(f32)]) == 0
    again = _convert_with(f32, d, tmp_path / "again")
    model, _ = load_l2d(again)
    assert all(np.array_equal(v, ref[k]) for k, v in original_names.export_original_state(model).items())
    # nothing is replaced without --overwrite
    capsys.readouterr()
    assert cli.main(["convert", "export", str(converted["llama_tied"]), str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--overwrite" in err
    assert cli.main(["convert", "export", str(converted["llama_tied"]), str(out), "--overwrite"]) == 0
    assert read_safetensors(out)[0][0][2] == "F32"


def _convert_with(state: Path, d: Path, out: Path) -> Path:
    assert cli.main(["convert", "l2d-torch", str(state), "--base", str(d / "base"), "--settings",
                     str(d / "l2d_settings.json"), str(out)]) == 0
    return out


def test_export_bin_and_pt(converted, tmp_path):
    torch = pytest.importorskip("torch")
    d = L2D_SETS["llama_lora"]
    ref = load_file(str(d / "l2d_state.safetensors"))
    out = tmp_path / "exported.bin"
    assert cli.main(["convert", "export", str(converted["llama_lora"]), str(out)]) == 0
    got = torch.load(out, weights_only=True)
    assert [(k, tuple(v.shape)) for k, v in got.items()] == names_file(d)
    assert all(got[k].dtype == torch.float32 and np.array_equal(got[k].numpy(), v) for k, v in ref.items())
    ptrs = {got[k].untyped_storage().data_ptr() for k in got}
    assert len(ptrs) == len(got)  # aliases are separate copies
    # a directory with --format pt, bfloat16
    assert cli.main(["convert", "export", str(converted["llama_lora"]), str(tmp_path / "dir"), "--format", "pt",
                     "--dtype", "bfloat16"]) == 0
    got = torch.load(tmp_path / "dir" / "l2d_state.pt", weights_only=True)
    assert all(got[k].dtype == torch.bfloat16 and np.array_equal(
        got[k].float().numpy(), v.astype(ml_dtypes.bfloat16).astype(np.float32)) for k, v in ref.items())
    assert 'torch.load("l2d_state.pt"' in (tmp_path / "dir" / "README.md").read_text()


# --------------------------------------------------------------------------- settings


def test_constructor_dict_round_trip():
    """settings -> the original's keyword arguments -> settings is the identity, for the golden
    settings and for values the two directions treat specially."""
    variants = [settings_from_constructor_dict(json.loads((d / "l2d_settings.json").read_text()))
                for d in L2D_SETS.values()]
    base = variants[0]
    variants += [base.replace(base_params_to_freeze="none"),
                 base.replace(ode_kwargs=(("atol", 1e-4), ("method", "dopri5"), ("rtol", 1e-3))),
                 base.replace(guidance_modulation_num_classes=3, nstep_guidance_parameter=1.5,
                              nstep_temperature_schedule="polynomial_2_0.5", nstep_x1_estimation="average")]
    for s in variants:
        d = constructor_dict_from_settings(s)
        assert json.loads(json.dumps(d)) == d  # JSON-ready
        assert settings_from_constructor_dict(d) == s
    # an adaptive solver gets the options the original's build_ode_solver adds
    assert constructor_dict_from_settings(variants[-2])["ode_kwargs"] == {
        "atol": 1e-4, "rtol": 1e-3, "method": "dopri5", "options": {"first_step": 0.05}}
    assert set(constructor_dict_from_settings(base)) == {f for f in L2DSettings.__dataclass_fields__}


def _save_l2d(model, hf: dict, out: Path) -> Path:
    from flax import nnx

    from l2d_jax import checkpoint

    return checkpoint.save_checkpoint(
        out, base_params=nnx.to_pure_dict(nnx.state(model.base, nnx.Param)), hf_config=hf, kind="l2d",
        flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)), l2d_settings=model.settings.to_dict(),
        dtype="float32")


def test_qwen2_gets_its_class_and_biases_and_qwen3_is_refused(tmp_path, capsys):
    """A Qwen2 base: FlowQwen2ForCausalLM, q/k/v biases and the LoRA-wrapped q bias (the
    original's names); Qwen3 has no flow class in the original: a one-line error."""
    from jax_tiny import HF_CONFIG, tiny_l2d

    hf = dict(HF_CONFIG, model_type="qwen2", _name_or_path="Qwen/Qwen2.5-1.5B-Instruct")
    ckpt = _save_l2d(tiny_l2d(model_type="qwen2"), hf, tmp_path / "qwen2")
    assert cli.main(["convert", "export", str(ckpt), str(tmp_path / "out")]) == 0
    layout, _ = read_safetensors(tmp_path / "out" / "l2d_state.safetensors")
    names = {n: s for n, s, _ in layout}
    for n in ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.v_proj.bias",
              "model.layers.1.self_attn.flow_q_proj.wrapped_layer.bias"):
        assert names[n] == (HF_CONFIG["hidden_size"] if "q_proj" in n else 16,), n  # 2 KV heads x head_dim 8
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "FlowQwen2ForCausalLM(base, **json.load(f))" in readme
    assert 'from_pretrained("Qwen/Qwen2.5-1.5B-Instruct", torch_dtype=dtype)' in readme
    assert json.loads((tmp_path / "out" / "base_config.json").read_text())["model_type"] == "qwen2"
    ckpt = _save_l2d(tiny_l2d(model_type="qwen3"), dict(HF_CONFIG, model_type="qwen3"), tmp_path / "qwen3")
    assert cli.main(["convert", "export", str(ckpt), str(tmp_path / "out3")]) == 2
    assert "no flow model for model_type 'qwen3'" in capsys.readouterr().err and not (tmp_path / "out3").exists()


# --------------------------------------------------------------------------- errors, atomicity


def test_source_that_is_no_l2d_model(tmp_path, capsys):
    base_dir = L2D_SETS["llama_lora"] / "base"  # an HF base model
    (tmp_path / "empty").mkdir()
    for src in (base_dir, tmp_path / "empty"):
        assert cli.main(["convert", "export", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "neither a training workdir nor a converted L2D checkpoint" in err
        assert "WORKDIR/checkpoints/<step>" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["convert", "export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_nothing(converted, tmp_path, monkeypatch):
    reads = []

    def failing_reader(model):
        read = original_names.tensor_reader(model)

        def one(t):
            if len(reads) == 5:
                raise RuntimeError("disk full")
            reads.append(t.name)
            return read(t)
        return one

    monkeypatch.setattr(export, "tensor_reader", failing_reader)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_checkpoint(converted["llama_lora"], out)
    assert len(reads) == 5 and list(tmp_path.iterdir()) == []  # no directory, no temporary file


def test_format_and_suffix_disagree(tmp_path, capsys):
    assert cli.main(["convert", "export", str(tmp_path), str(tmp_path / "x.bin"), "--format", "safetensors"]) == 2
    assert "--format" in capsys.readouterr().err


# --------------------------------------------------------------------------- gs://, several devices


def test_export_to_and_from_a_bucket(gcs, converted, tmp_path):
    """OUT in a bucket (a directory and a file name), SRC in a bucket: the same bytes as a local export."""
    local = tmp_path / "local"
    assert cli.main(["convert", "export", str(converted["llama_lora"]), str(local)]) == 0
    want = (local / "l2d_state.safetensors").read_bytes()
    assert cli.main(["convert", "export", str(converted["llama_lora"]), f"{gcs}/exports/dir"]) == 0
    for name in ("l2d_state.safetensors", "l2d_settings.json", "base_config.json", "README.md"):
        assert storage.as_path(f"{gcs}/exports/dir/{name}").read_bytes() == (local / name).read_bytes(), name
    storage.copy_tree(converted["llama_lora"], f"{gcs}/ckpts/lora")
    assert cli.main(["convert", "export", f"{gcs}/ckpts/lora", f"{gcs}/exports/lora.safetensors"]) == 0
    assert storage.as_path(f"{gcs}/exports/lora.safetensors").read_bytes() == want
    assert storage.as_path(f"{gcs}/exports/lora.l2d_settings.json").is_file()


_SHARDED = """
import sys
import jax
from flax import nnx
from l2d_jax.convert import export, original_names
seen = []
def spy(model):
    seen.extend(jax.tree.leaves(nnx.state(model)))
    return original_names.tensor_reader(model)
export.tensor_reader = spy
export.export_checkpoint(sys.argv[1], sys.argv[2])
total = sum(x.nbytes for x in seen)
held = {d: 0 for d in jax.local_devices()}
for x in seen:
    for shard in x.addressable_shards:
        held[shard.device] += shard.data.nbytes
print("sharded", max(held.values()) / total)
"""


@pytest.mark.slow
def test_export_loads_the_model_sharded_over_the_local_devices(converted, tmp_path):
    """4 (fake) devices: the model is loaded split over them (fsdp), and the file is the same."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    out = subprocess.run([sys.executable, "-c", _SHARDED, str(converted["llama_lora"]), str(tmp_path / "four")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "sharded" in out.stdout, out.stderr[-3000:]
    assert float(out.stdout.split("sharded")[1]) < 0.75  # no device holds the whole model
    assert cli.main(["convert", "export", str(converted["llama_lora"]), str(tmp_path / "one")]) == 0
    assert ((tmp_path / "four" / "l2d_state.safetensors").read_bytes()
            == (tmp_path / "one" / "l2d_state.safetensors").read_bytes())
