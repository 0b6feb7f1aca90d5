"""HF checkpoints <-> l2d-jax: conversion CLI, checkpoint layout, round trips, bad input, memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import l2d_jax
from l2d_jax import checkpoint, cli
from l2d_jax.convert.hf import llm_to_hf_state, load_hf, save_hf

NAMES = ["llama_llama3_tied", "llama_gqa", "qwen2_one_kv"]
IDS = np.array([[5, 17, 99, 3, 64, 2, 8, 120, 33, 7, 1, 0]])


def logits(model, ids=IDS):
    return np.asarray(model(jnp.asarray(ids)).logits)


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", NAMES)
def test_cli_convert_hf_then_load(tiny_hf_dirs, tmp_path, capsys, name):
    src, out = tiny_hf_dirs[name], tmp_path / "converted"
    code, err = run_cli(capsys, "convert", "hf", src, out)
    assert code == 0, err
    manifest = checkpoint.read_manifest(out)
    assert manifest["format_version"] == 2 and manifest["kind"] == "base"
    assert manifest["dtype"] == "float32"
    assert manifest["hf_config"] == json.loads((src / "config.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["base", "l2d_jax.json", "tokenizer"]

    direct, tok_direct = l2d_jax.load(src)
    converted, tok_converted = l2d_jax.load(out)
    assert_trees_equal(params_of(converted), params_of(direct))
    np.testing.assert_array_equal(logits(converted), logits(direct))
    assert tok_converted.chat_template == tok_direct.chat_template
    chat = [{"role": "user", "content": "w3 w4 w5"}]
    assert (tok_converted.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                              return_dict=False)
            == tok_direct.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                              return_dict=False))


def test_sharded_safetensors(tiny_sharded_dir, tiny_hf_dirs, tiny_torch_models):
    assert (tiny_sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(tiny_sharded_dir.glob("*.safetensors"))) > 2
    sharded, _ = load_hf(tiny_sharded_dir)
    single, _ = load_hf(tiny_hf_dirs["llama_gqa"])
    assert_trees_equal(params_of(sharded), params_of(single))
    import torch

    with torch.no_grad():
        ref = tiny_torch_models["llama_gqa"](torch.tensor(IDS)).logits.numpy()
    assert np.max(np.abs(logits(sharded) - ref)) <= 1e-4


def test_bfloat16_safetensors_source(tiny_torch_models, tmp_path):
    """bf16 files (the usual hub dtype): read without going through float32 torch tensors."""
    import copy

    import torch

    model_bf16 = copy.deepcopy(tiny_torch_models["qwen2_one_kv"]).to(torch.bfloat16)
    model_bf16.save_pretrained(str(tmp_path))
    header = json.loads(_safetensors_header(tmp_path / "model.safetensors"))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    expected = {k: v.float().numpy() for k, v in model_bf16.state_dict().items()}

    ours32, _ = load_hf(tmp_path)
    state32 = llm_to_hf_state(ours32)
    for name, value in state32.items():
        np.testing.assert_array_equal(value, expected[name])  # bf16 -> f32 is exact
    ours16, _ = load_hf(tmp_path, dtype="bfloat16")
    assert ours16.embed_tokens[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours16.embed_tokens[...]).astype(np.float32),
                                  expected["model.embed_tokens.weight"])


def test_pytorch_bin_checkpoint(tiny_hf_dirs, tiny_torch_models, tmp_path):
    import torch

    shutil.copy(tiny_hf_dirs["llama_gqa"] / "config.json", tmp_path / "config.json")
    torch.save(tiny_torch_models["llama_gqa"].state_dict(), tmp_path / "pytorch_model.bin")
    from_bin, _ = load_hf(tmp_path)
    from_safetensors, _ = load_hf(tiny_hf_dirs["llama_gqa"])
    assert_trees_equal(params_of(from_bin), params_of(from_safetensors))


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_through_transformers(tiny_hf_dirs, tiny_torch_models, tmp_path, name):
    """ours -> llm_to_hf_state -> HF dir -> transformers from_pretrained: same logits (1e-5)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, hf_config = load_hf(tiny_hf_dirs[name])
    state = llm_to_hf_state(model)
    torch_state = tiny_torch_models[name].state_dict()
    expected_names = set(torch_state) - ({"lm_head.weight"} if model.cfg.tie_word_embeddings else set())
    assert set(state) == expected_names
    for k, v in state.items():
        np.testing.assert_array_equal(v, torch_state[k].numpy())

    save_hf(model, hf_config, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reloaded(torch.tensor(IDS)).logits.numpy()
    assert np.max(np.abs(logits(model) - ref)) <= 1e-5


def test_convert_bfloat16_and_restore(tiny_hf_dirs, tmp_path, capsys):
    out = tmp_path / "bf16"
    code, err = run_cli(capsys, "convert", "hf", tiny_hf_dirs["llama_gqa"], out, "--dtype", "bfloat16")
    assert code == 0, err
    assert checkpoint.read_manifest(out)["dtype"] == "bfloat16"
    params = checkpoint.restore_params(out)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == 2  # the layers stacked
    model16, _ = l2d_jax.load(out, dtype="bfloat16")
    model32, _ = l2d_jax.load(tiny_hf_dirs["llama_gqa"])
    ref = logits(model32)
    assert np.max(np.abs(logits(model16) - ref)) / max(1.0, np.max(np.abs(ref))) <= 0.06


def test_restore_onto_target_shardings(tiny_hf_dirs, tmp_path, capsys):
    from l2d_jax.convert.loading import abstract_llm, load_converted_base
    from l2d_jax.models.llm import LLMConfig

    out = tmp_path / "ckpt"
    assert run_cli(capsys, "convert", "hf", tiny_hf_dirs["qwen2_one_kv"], out)[0] == 0
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cfg = LLMConfig.from_hf(checkpoint.read_manifest(out)["hf_config"])
    _, _, abstract = abstract_llm(cfg)
    shardings = jax.tree.map(lambda _: replicated, abstract)
    _, _, target = abstract_llm(cfg, shardings)
    restored = checkpoint.restore_params(out, "base", target)
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored))
    model, manifest = load_converted_base(out, shardings=shardings)
    assert manifest["kind"] == "base"
    assert all(x.sharding == replicated for x in jax.tree.leaves(params_of(model)))


def test_existing_output_needs_overwrite(tiny_hf_dirs, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert run_cli(capsys, "convert", "hf", tiny_hf_dirs["llama_gqa"], out)[0] == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = run_cli(capsys, "convert", "hf", tiny_hf_dirs["qwen2_one_kv"], out)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert checkpoint.read_manifest(out)["hf_config"]["model_type"] == "llama"
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    code, err = run_cli(capsys, "convert", "hf", tiny_hf_dirs["qwen2_one_kv"], out, "--overwrite")
    assert code == 0, err
    assert checkpoint.read_manifest(out)["hf_config"]["model_type"] == "qwen2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary dirs left


def test_failed_write_leaves_nothing(tiny_hf_dirs, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)
    out = tmp_path / "ckpt"
    assert cli.main(["convert", "hf", str(tiny_hf_dirs["llama_gqa"]), str(out)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_enables_compilation_cache(tiny_hf_dirs, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "xla"
    monkeypatch.setenv("L2D_JAX_CACHE_DIR", str(cache))
    assert run_cli(capsys, "convert", "hf", tiny_hf_dirs["llama_gqa"], tmp_path / "out")[0] == 0
    assert cache.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(cache)


def test_cli_help_lists_convert_kinds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "hf" in out and "gguf" in out


# --------------------------------------------------------------------------- bad input


def _safetensors_header(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8:8 + int.from_bytes(raw[:8], "little")]


def _break(kind: str, src: Path, dst: Path) -> tuple[Path, list[str]]:
    """A broken copy of ``src``; returns (the path to convert, substrings the error must name)."""
    from safetensors.numpy import load_file, save_file

    if kind == "nonexistent":
        return dst / "no_such_dir", ["does not exist", "no_such_dir"]
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if kind == "missing_config":
        (dst / "config.json").unlink()
        return dst, ["config.json"]
    if kind == "unsupported_arch":
        config = json.loads((dst / "config.json").read_text())
        config["model_type"] = "gpt2"
        (dst / "config.json").write_text(json.dumps(config))
        return dst, ["unsupported architecture", "gpt2", "llama", "qwen2"]
    state = load_file(str(weights))
    if kind == "wrong_shape":
        name = "model.layers.1.mlp.up_proj.weight"
        state[name] = np.zeros((128, 60), np.float32)
        save_file(state, str(weights))
        return dst, [name, "(128, 60)", "(128, 64)"]
    if kind == "missing_tensor":
        name = "model.layers.0.self_attn.k_proj.weight"
        del state[name]
        save_file(state, str(weights))
        return dst, [name]
    if kind == "truncated":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: len(raw) // 2])
        return dst, ["truncated", str(weights)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nonexistent", "missing_config", "unsupported_arch", "wrong_shape",
                                  "missing_tensor", "truncated"])
def test_bad_input_is_one_clear_line(tiny_hf_dirs, tmp_path, capsys, kind):
    src, needles = _break(kind, tiny_hf_dirs["llama_gqa"], tmp_path / "src")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "convert", "hf", src, out)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_bad_gguf_input(tmp_path, capsys):
    code, err = run_cli(capsys, "convert", "gguf", tmp_path / "missing.gguf", tmp_path / "out")
    assert code == 2 and "does not exist" in err
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    code, err = run_cli(capsys, "convert", "gguf", bogus, tmp_path / "out")
    assert code == 2 and "bogus.gguf" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- peak memory

_RSS_CHILD = textwrap.dedent("""
    import json, sys

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint, safetensors  # noqa: F401
    from flax import nnx  # noqa: F401
    from l2d_jax import checkpoint, cli  # noqa: F401
    from l2d_jax.convert import hf, loading  # noqa: F401
    jnp.zeros(8).block_until_ready()
    base = status("VmRSS:")
    code = cli.main(["convert", "hf", sys.argv[1], sys.argv[2]])
    print(json.dumps({"code": code, "base": base, "peak": status("VmHWM:")}))
""")


def _synthetic_checkpoint(out: Path) -> tuple[int, int]:
    """A 163M-parameter float32 Llama in 14 shards; returns (total bytes, largest tensor bytes)."""
    from safetensors.numpy import save_file

    vocab, hidden, inter, layers = 8192, 1024, 2816, 12
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab,
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=512, hidden_act="silu")))
    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    shards = [lambda: {"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append(lambda p=p: {
            **{f"{p}self_attn.{x}_proj.weight": rand(hidden, hidden) for x in "qkvo"},
            f"{p}mlp.gate_proj.weight": rand(inter, hidden), f"{p}mlp.up_proj.weight": rand(inter, hidden),
            f"{p}mlp.down_proj.weight": rand(hidden, inter),
            f"{p}input_layernorm.weight": np.ones(hidden, np.float32),
            f"{p}post_attention_layernorm.weight": np.ones(hidden, np.float32)})
    shards.append(lambda: {"model.norm.weight": np.ones(hidden, np.float32),
                           "lm_head.weight": rand(vocab, hidden)})
    weight_map, total, largest = {}, 0, 0
    for k, make in enumerate(shards):
        tensors = make()
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file))
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        largest = max(largest, *(t.nbytes for t in tensors.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total, largest


def test_conversion_peak_memory_is_not_twice_the_model(tmp_path):
    """Peak RSS growth of `l2d-jax convert hf` (in a subprocess) on a 652 MiB float32 model.

    Bound: model + 4 x largest tensor (32 MiB) + 64 MiB of runtime slack = 844 MiB, while a
    loader that holds a second copy of the model would need >= 1304 MiB. Measured on 2 CPU
    cores: 689-690 MiB (model + ~37 MiB: the mapped source tensor while loading, which JAX
    adopts without a copy, and orbax's bounded in-flight writes). Before JAX adopted the
    converted copy in place, its asynchronous host copies queued up on a busy 2-core CI
    machine (953 MiB).
    """
    total, largest = _synthetic_checkpoint(tmp_path / "src")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "src"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    growth = result["peak"] - result["base"]
    bound = total + 4 * largest + 64 * 2**20
    print(f"model {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"peak RSS growth {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB")
    assert 2 * total > bound  # the test can tell one copy of the model from two
    assert growth <= bound, f"peak RSS grew by {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB"
    assert growth >= total  # sanity: the model itself was in memory
