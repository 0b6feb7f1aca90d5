"""Benchmarks: schema, sanity of the figures, no recompilation across ODE step counts, plot;
presets and the released settings."""

import configparser
import json
import sys
from pathlib import Path

import pytest

from l2d_jax import bench, presets
from l2d_jax.settings import L2DSettings

CFGS = Path(__file__).parent / "original_cfgs"
GENERATE_KEYS = {"batch", "ode_steps", "solver", "new_tokens", "tokens_per_s", "ms_per_token",
                 "nfe_per_token", "compile_s", "ideal_cost_ratio", "bandwidth_bound_tokens_per_s",
                 "decode_tokens_per_s", "recompiles"}
MACHINE_KEYS = {"cpu_model", "cpu_cores", "jax_version", "jax_backend", "device_kind",
                "memory_bandwidth_gbps"}


@pytest.fixture(scope="module")
def machine():
    info = bench.machine_info(bandwidth=False)
    info["bandwidth"] = bench.measure_bandwidth(mbytes=16, repeats=2)  # small: a smoke test
    info["memory_bandwidth_gbps"] = info["bandwidth"]["memory_bandwidth_gbps"]
    return info


@pytest.fixture(scope="module")
def tiny():
    return presets.random_model("tiny", "float32", l2d="lora")


def test_bench_generate_tiny(tiny, machine, tmp_path):
    model, _ = tiny
    report = bench.bench_generate(model, batches=(1, 2), steps=(0, 2, 4), new_tokens=3, prompt_len=8,
                                  repeats=1, machine=machine, progress=False, model_name="tiny",
                                  profile=False)
    assert MACHINE_KEYS <= set(report["machine"])
    # measured again at the end (same array size); the bound takes the higher figure
    end = report["machine"]["bandwidth_at_end"]
    assert end["array_mb"] == machine["bandwidth"]["array_mb"]
    bw = report["machine"]["memory_bandwidth_gbps"]
    assert bw == max(machine["memory_bandwidth_gbps"], end["memory_bandwidth_gbps"])
    for key in ("bytes_main_step", "bytes_flow_eval", "xla_bytes_main_step", "xla_bytes_flow_eval",
                "layer_matvec_gbps"):
        assert report[key] > 0, key
    # compiled with XLA's dots for the count: the CPU matvec custom call would hide its reads
    assert report["xla_bytes_main_step"] >= 0.9 * report["bytes_main_step"]
    rows = report["results"]
    assert len(rows) == 6
    for r in rows:
        assert GENERATE_KEYS <= set(r)
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0
        assert r["bandwidth_bound_tokens_per_s"] == pytest.approx(r["batch"] * bw * 1e9 / r["bytes_per_step"])
        assert r["fraction_of_bound"] == pytest.approx(r["decode_tokens_per_s"] / r["bandwidth_bound_tokens_per_s"])
        assert r["layer_matvec_bound_tokens_per_s"] > 0 and r["fraction_of_layer_matvec_bound"] > 0
        assert r["recompiles"] == 0, "ode_steps must be a run-time value"
        if r["ode_steps"] == 0:
            assert r["ideal_cost_ratio"] == 1 and r["nfe_per_token"] == 0
        else:
            assert r["ideal_cost_ratio"] > 1
            assert r["nfe_per_token"] == 2 * (r["ode_steps"] - 1)
    for b in (1, 2):
        first = [r for r in rows if r["batch"] == b][0]
        assert first["compiles"] == 1 and first["compile_s"] > 0
    ratios = [r["ideal_cost_ratio"] for r in rows if r["batch"] == 1]
    assert ratios == sorted(ratios)
    out = bench.write_json(report, tmp_path / "generate.json")
    assert json.loads(out.read_text())["results"][0]["batch"] == 1
    png = bench.plot_generate(report, out.with_suffix(".png"))
    if png is not None:
        assert png.stat().st_size > 1000


def test_byte_counts_match_parameter_bytes(tiny):
    model, _ = tiny
    c = bench.byte_counts(model, context=10, batch=1)
    base = model.base
    assert c["main_parts"]["layers"] + c["main_parts"]["lm_head"] == bench._nb(base)  # tied: embed = head
    p = c["flow_parts"]
    fl = model.flow.layers  # stacked: every layer at once
    assert p["flow_projections"] == sum(bench._nb(getattr(fl, n)) for n in ("q_proj", "o_proj", "gate_proj",
                                                                           "up_proj", "down_proj"))
    assert bench.ideal_cost_ratio(100, 50, 0) == 1.0
    assert bench.ideal_cost_ratio(100, 50, 2) == 2.5


def test_bench_forward_tiny_no_torch(tiny, machine):
    model, hf = tiny
    report = bench.bench_forward(model, hf, batches=(1,), seq=8, new_tokens=3, repeats=1, torch=False,
                                 machine=machine, progress=False)
    kinds = {(r["kind"], r["impl"]) for r in report["results"]}
    assert kinds == {("forward", "l2d_jax"), ("decode", "l2d_jax")}
    for r in report["results"]:
        assert {"kind", "impl", "batch", "tokens_per_s", "seconds", "compile_s"} <= set(r)
        assert r["tokens_per_s"] > 0
    assert report["ratios"] == []


@pytest.mark.slow
def test_bench_forward_tiny_vs_torch(tiny, machine):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    model, hf = tiny
    report = bench.bench_forward(model.base, hf, batches=(1,), seq=8, new_tokens=3, repeats=1,
                                 machine=machine, progress=False)
    assert {(r["kind"], r["impl"]) for r in report["results"]} == {
        ("forward", "l2d_jax"), ("decode", "l2d_jax"), ("forward", "torch"), ("decode", "torch")}
    assert {(r["kind"], r["batch"]) for r in report["ratios"]} == {("forward", 1), ("decode", 1)}
    assert all(r["ours_over_torch"] > 0 for r in report["ratios"])


def test_torch_model_has_our_weights(tiny):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import jax.numpy as jnp
    import numpy as np

    model, hf = tiny
    tm, device = bench._torch_model(model.base, hf, "float32")
    ids = bench.random_prompts(1, 6, hf["vocab_size"])
    ours = np.asarray(model.base(jnp.asarray(ids)).logits)
    with torch.inference_mode():
        theirs = tm(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_presets_parse_and_have_the_published_shapes():
    from l2d_jax.models.llm import LLMConfig

    expect = {"smollm2-135m": (576, 1536, 30, 9, 3, 49152, True),
              "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True),
              "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256, False),
              "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
              "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064, False)}
    for name, shape in expect.items():
        c = LLMConfig.from_hf(presets.hf_config(name))
        assert (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                c.vocab_size, c.tie_word_embeddings) == shape, name
    assert LLMConfig.from_hf(presets.hf_config("qwen2.5-1.5b")).attention_bias
    assert dict(LLMConfig.from_hf(presets.hf_config("llama-3.2-1b")).rope_scaling)["factor"] == 32.0
    with pytest.raises(ValueError, match="known"):
        presets.hf_config("gpt2")


@pytest.mark.parametrize("name,settings", [("llama_3.2_1b_instruct_lad_lora.cfg", presets.RELEASED_LORA),
                                           ("llama_3.2_1b_instruct_lad.cfg", presets.RELEASED_FULL)])
def test_released_settings_match_the_original_cfgs(name, settings):
    cp = configparser.ConfigParser()
    cp.read(CFGS / name)
    fields = set(L2DSettings.__dataclass_fields__)
    original = {k: v for k, v in cp["LAD"].items() if k in fields}
    original["noise_rescaling"] = cp["LAD"]["noise_rescaling"]
    assert set(original) == set(settings)
    for k, v in original.items():
        ours = settings[k]
        if isinstance(ours, bool):
            assert v == str(ours), k
        elif isinstance(ours, (int, float)):
            assert float(v) == float(ours), k
        else:
            assert v == ours, k
    L2DSettings.from_dict(settings)


def test_cli_and_bench_import_nothing_heavy():
    """The GPU machine has no gguf / tensorflow / clu / datasets: imports must stay lazy."""
    import subprocess

    code = ("import sys, l2d_jax.cli, l2d_jax.bench, l2d_jax.presets; l2d_jax.cli.build_parser(); "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'gguf', 'tensorflow', 'clu', 'datasets', 'tensorflow_datasets', 'torch', 'matplotlib'}); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "", f"imported at import time: {out.stdout}"
