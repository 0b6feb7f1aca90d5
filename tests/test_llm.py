"""The Flax LLM against transformers (torch float32) and the recorded goldens."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_sets
from l2d_jax.convert.hf import load_hf, params_from_state_dict
from l2d_jax.models import llm
from l2d_jax.models.llm import LLMConfig

SEQ = 40  # > original_max_position_embeddings (16) of the llama3-scaled tiny model


def padded_batch(vocab: int, seed: int = 0):
    """Three rows, left-padded to SEQ: lengths 40, 33 and 10. Returns ids, mask, positions."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, (3, SEQ))
    mask = np.ones((3, SEQ), np.int64)
    mask[1, :7] = 0
    mask[2, :30] = 0
    ids[mask == 0] = 0
    return ids, mask, np.maximum(np.cumsum(mask, -1) - 1, 0)


def torch_logits(model, ids, mask, pos):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()


def ours(torch_model, **cfg_kw):
    cfg = LLMConfig.from_hf(torch_model.config.to_dict(), **cfg_kw)
    return params_from_state_dict(cfg, torch_model.state_dict())


def rel_err(a, ref):
    return float(np.max(np.abs(a - ref)) / max(1.0, float(np.max(np.abs(ref)))))


@pytest.mark.parametrize("name", ["llama_llama3_tied", "llama_gqa", "qwen2_one_kv", "qwen3_qk_norm"])
def test_logits_match_transformers_left_padded(tiny_torch_models, name):
    torch_model = tiny_torch_models[name]
    model = ours(torch_model)
    ids, mask, pos = padded_batch(model.cfg.vocab_size)
    ref = torch_logits(torch_model, ids, mask, pos)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)).logits)
    real = mask == 1
    assert np.max(np.abs(out - ref)[real]) <= 1e-4
    assert np.max(np.abs(ref)) > 1.0  # not a vacuous comparison


def test_llama3_config_styles_parse_the_same(tiny_torch_models, tiny_hf_dirs):
    import tiny_models

    v5 = tiny_torch_models["llama_llama3_tied"].config.to_dict()
    assert v5["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in v5
    hub = tiny_models.hub_style(v5)
    assert "rope_parameters" not in hub and hub["rope_scaling"]["rope_type"] == "llama3"
    assert LLMConfig.from_hf(hub) == LLMConfig.from_hf(v5)
    assert LLMConfig.from_hf(hub).rope_scaling is not None
    on_disk = json.loads((tiny_hf_dirs["llama_llama3_tied"] / "config.json").read_text())
    assert "rope_scaling" in on_disk and LLMConfig.from_hf(on_disk) == LLMConfig.from_hf(v5)


def test_hub_style_dir_matches_transformers(tiny_torch_models, tiny_hf_dirs):
    """The hub-style llama3 directory, loaded from disk, against the in-memory torch model."""
    torch_model = tiny_torch_models["llama_llama3_tied"]
    model, _ = load_hf(tiny_hf_dirs["llama_llama3_tied"])
    ids, mask, pos = padded_batch(model.cfg.vocab_size, seed=1)
    ref = torch_logits(torch_model, ids, mask, pos)
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)).logits)
    assert np.max(np.abs(out - ref)[mask == 1]) <= 1e-4


@pytest.mark.parametrize("name", ["llama_llama3_tied", "llama_gqa", "qwen2_one_kv", "qwen3_qk_norm"])
def test_kv_cache_decode_equals_full_forward(tiny_torch_models, name):
    """Prefill 30 tokens into a 48-slot cache, then decode the remaining 10 one at a time."""
    model = ours(tiny_torch_models[name])
    ids, mask, pos = padded_batch(model.cfg.vocab_size, seed=2)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(pos), attention_mask=jnp.asarray(mask)).logits)
    slots, prefill = 48, 30
    kv_valid = np.zeros((3, slots), bool)
    kv_valid[:, :SEQ] = mask == 1
    kv_valid = jnp.asarray(kv_valid)
    out = model(jnp.asarray(ids[:, :prefill]), jnp.asarray(pos[:, :prefill]),
                cache=llm.init_cache(model.cfg, 3, slots), cache_index=0, kv_valid=kv_valid)
    steps, cache = [np.asarray(out.logits)], out.cache
    for i in range(prefill, SEQ):
        out = model(jnp.asarray(ids[:, i:i + 1]), jnp.asarray(pos[:, i:i + 1]), cache=cache,
                    cache_index=i, kv_valid=kv_valid)
        steps.append(np.asarray(out.logits))
        cache = out.cache
    decoded = np.concatenate(steps, axis=1)
    assert np.max(np.abs(decoded - full)[mask == 1]) <= 1e-5


@pytest.mark.parametrize("name", ["llama_llama3_tied", "llama_gqa", "qwen2_one_kv"])
def test_bfloat16_forward_close_to_float32(tiny_torch_models, name):
    """bfloat16 params + compute vs float32 on the same weights.

    err = max|bf16 - f32| / max(1, max|f32|) over real positions of a padded batch; measured
    0.013-0.024 over these three models x four batches (logits up to ~3.7; bf16 keeps 8
    significant bits, a relative step of 2^-8 = 0.004, and the error accumulates over two
    layers and the head). Bound 0.06 (2.5x the worst measured); a wrong cast or a missing
    layer gives errors of order 1.
    """
    torch_model = tiny_torch_models[name]
    f32 = ours(torch_model)
    b16 = ours(torch_model, dtype="bfloat16", param_dtype="bfloat16")
    assert b16.embed_tokens[...].dtype == jnp.bfloat16
    ids, mask, pos = padded_batch(f32.cfg.vocab_size, seed=3)
    args = (jnp.asarray(ids), jnp.asarray(pos))
    ref = np.asarray(f32(*args, attention_mask=jnp.asarray(mask)).logits)
    out = b16(*args, attention_mask=jnp.asarray(mask)).logits
    assert out.dtype == jnp.float32  # logits are returned in float32
    real = mask == 1
    err = rel_err(np.asarray(out)[real], ref[real])
    assert 0 < err <= 0.06, err


@pytest.mark.parametrize("golden", golden_sets(), ids=lambda p: p.name)
def test_golden_base_cases(golden):
    """Recorded HF logits of the golden base models (left-padded batch and plain forward)."""
    model, _ = load_hf(golden / "base")
    cases = np.load(golden / "cases.npz")
    checked = 0
    if "base_pad_input_ids" in cases:
        mask = cases["base_pad_attention_mask"]
        out = np.asarray(model(jnp.asarray(cases["base_pad_input_ids"]),
                               jnp.asarray(cases["base_pad_position_ids"]),
                               attention_mask=jnp.asarray(mask)).logits)
        real = mask == 1
        assert rel_err(out[real], cases["base_pad_logits_hf"][real]) <= 2e-4
        checked += 1
    for ids_key, ref_key in (("fwd_input_ids", "base_logits_hf"),
                             ("base_long_input_ids", "base_long_logits_hf")):
        if ids_key in cases and ref_key in cases:
            out = np.asarray(model(jnp.asarray(cases[ids_key])).logits)
            assert rel_err(out, cases[ref_key]) <= 2e-4, ids_key
            checked += 1
    assert checked >= 1


def test_long_prefill_attends_in_query_chunks_with_the_same_result():
    """A prefill of more than QUERY_CHUNK positions attends in chunks of query rows (bounded
    float32 scores); every row is the same softmax, so the result equals one pass."""
    import jax
    import jax.numpy as jnp

    from l2d_jax.models import block

    b, hkv, g, hd = 2, 2, 2, 8
    tq = 2 * block.QUERY_CHUNK
    s = tq + 16
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, tq, hkv * g, hd))
    k = jax.random.normal(keys[1], (1, b, hkv, s, hd))
    v = jax.random.normal(keys[2], (1, b, hkv, s, hd))
    causal = jnp.arange(s)[None, :] <= jnp.arange(tq)[:, None]
    mask = jnp.broadcast_to(causal, (b, tq, s)).at[0, :, :3].set(False)  # row 0 left-padded
    shared = block.attend_kv(q, {"k": k, "v": v}, 0, causal[None])  # one mask for every row (training)
    assert float(jnp.max(jnp.abs(shared - block.attend(q, k[0], v[0], causal[None])))) <= 1e-6
    chunked = block.attend_kv(q, {"k": k, "v": v}, 0, mask)
    whole = block.attend(q, k[0], v[0], mask)
    assert chunked.shape == whole.shape == (b, tq, hkv * g * hd)
    assert float(jnp.max(jnp.abs(chunked - whole))) <= 1e-6
    # and its gradient (training at 2048 tokens takes this path)
    def loss(f):
        return lambda q: jnp.sum(jnp.sin(f(q)))
    g_chunked = jax.grad(loss(lambda q: block.attend_kv(q, {"k": k, "v": v}, 0, mask)))(q)
    g_whole = jax.grad(loss(lambda q: block.attend(q, k[0], v[0], mask)))(q)
    assert float(jnp.max(jnp.abs(g_chunked - g_whole))) <= 1e-5
