"""GGUF import: the Q/K un-permutation, synthetic GGUF files of the tiny models, and the real
SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loader."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2d_jax import checkpoint, cli
from l2d_jax.convert import gguf as G
from l2d_jax.errors import L2DError
from l2d_jax.models import llm

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def rel_err(a, ref):
    return float(np.max(np.abs(a - ref)) / max(1.0, float(np.max(np.abs(ref)))))


# --------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("n_head,head_dim,cols", [(9, 64, 576), (3, 64, 576), (4, 16, 64), (1, 8, 0)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols):
    rng = np.random.default_rng(n_head)
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)  # cols 0: a bias
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = G.permute_qk(w, n_head)
    assert not np.array_equal(permuted, w)  # it does move rows
    np.testing.assert_array_equal(G.unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(G.permute_qk(G.unpermute_qk(w, n_head), n_head), w)
    # llama.cpp's formula, written out: row (h, j, i) of HF goes to row (h, i, j) of GGUF
    expect = w.reshape(n_head, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    np.testing.assert_array_equal(permuted, expect)


def test_unpermute_matches_transformers_gguf_loader():
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((3 * 64, 576)).astype(np.float32)
    ref = LlamaTensorProcessor()._reverse_permute_weights(w, 9, 3)  # K: 9 heads, 3 KV heads
    np.testing.assert_array_equal(G.unpermute_qk(w, 3), ref)


def test_llama3_scaling_recovered_from_rope_freqs():
    """llama.cpp stores llama3 scaling as per-frequency factors; the parameters come back."""
    import math

    theta, dim, factor = 500000.0, 64, 32.0
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    factors = []
    for f in freqs:  # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    scaling = G._llama3_scaling_from_freqs(np.array(factors, np.float32), theta, dim)
    assert scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = llm.LLMConfig.from_hf(dict(model_type="llama", vocab_size=8, hidden_size=dim * 2,
                                     intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     rope_theta=theta, rope_scaling=scaling))
    # our scaled frequencies equal llama.cpp's base frequencies divided by its factors
    np.testing.assert_allclose(llm.rope_inv_freq(cfg), freqs / np.array(factors), rtol=1e-5)
    with pytest.raises(L2DError, match="rope_freqs"):
        G._llama3_scaling_from_freqs(np.linspace(1, 3, dim // 2), theta, dim)


# --------------------------------------------------------------------------- synthetic files


def write_gguf(torch_model, path):
    """A float32 GGUF of an HF torch model, written the way llama.cpp's converter does
    (Llama Q/K rows permuted, no output.weight when tied)."""
    import gguf

    c = torch_model.config
    arch = c.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    names = {v: k for k, v in G._GLOBAL_NAMES.items()}
    for name, tensor in torch_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            _, _, i, *rest = name.split(".")
            part = ".".join(rest[:-1])
            gname = f"blk.{i}.{next(k for k, v in G._BLOCK_NAMES.items() if v == part)}.{rest[-1]}"
        if arch == "llama" and ".attn_q." in gname:
            w = G.permute_qk(w, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            w = G.permute_qk(w, c.num_key_value_heads)
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_one_kv"])
def test_synthetic_gguf_matches_transformers(tiny_torch_models, tmp_path, name):
    import torch

    torch_model = tiny_torch_models[name]
    path = write_gguf(torch_model, tmp_path / f"{name}.gguf")
    model, hf, tokenizer = G.load_gguf(path)
    assert tokenizer is None  # no vocabulary in the file
    assert hf["model_type"] == torch_model.config.model_type
    assert hf["num_key_value_heads"] == torch_model.config.num_key_value_heads
    assert hf["tie_word_embeddings"] is False and hf["attention_bias"] == (name == "qwen2_one_kv")
    ids = np.random.RandomState(0).randint(0, 128, (2, 24))
    with torch.no_grad():
        ref = torch_model(torch.tensor(ids)).logits.numpy()
    assert np.max(np.abs(np.asarray(model(jnp.asarray(ids)).logits) - ref)) <= 1e-4


# --------------------------------------------------------------------------- SmolLM2 (real file)


@pytest.fixture(scope="module")
def smollm2_path():
    try:
        return G.smollm2_gguf_path()
    except L2DError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_path):
    return G.load_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path):
    """transformers' own GGUF loader (needs torch + accelerate), loaded once."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), dtype=torch.float32, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(str(smollm2_path.parent), **kw)


def chat_ids(tokenizer) -> list[int]:
    return list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def test_smollm2_config_and_tokenizer(smollm2_ours, smollm2_transformers, smollm2_path):
    model, hf, tok = smollm2_ours
    ref_model, ref_tok = smollm2_transformers
    ref_cfg = ref_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "head_dim"):
        assert hf[key] == getattr(ref_cfg, key), key
    assert hf["rope_theta"] == ref_cfg.rope_parameters["rope_theta"]
    assert hf["rms_norm_eps"] == pytest.approx(ref_cfg.rms_norm_eps)
    import gguf

    template = gguf.GGUFReader(str(smollm2_path)).fields["tokenizer.chat_template"].contents()
    assert tok.chat_template == template == ref_tok.chat_template
    assert chat_ids(tok) == chat_ids(ref_tok)
    assert tok.decode(chat_ids(tok)).startswith("<|im_start|>system")
    for text in ["Hello world!", "  spaces\tand\nnewlines  ", "naïve café 東京 🙂", "x=1+2; print(x)"]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref_tok.bos_token, ref_tok.eos_token,
                                                             ref_tok.pad_token)


def test_smollm2_logits_match_transformers_gguf(smollm2_ours, smollm2_transformers):
    import torch

    model, _, tok = smollm2_ours
    ids = np.array([chat_ids(tok)])
    with torch.no_grad():
        ref = smollm2_transformers[0](torch.tensor(ids)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids)).logits)
    assert rel_err(out, ref) <= 1e-3


def greedy_ours(model, prompt: list[int], steps: int) -> list[int]:
    """Prefill, then one token at a time through the KV cache (argmax, no stopping)."""
    t = len(prompt)
    cache = llm.init_cache(model.cfg, 1, t + steps)
    kv_valid = jnp.ones((1, t + steps), bool)
    out = model(jnp.asarray([prompt]), cache=cache, cache_index=0, kv_valid=kv_valid)
    tokens = []
    for i in range(steps):
        tokens.append(int(jnp.argmax(out.logits[0, -1])))
        pos = t + i
        out = model(jnp.asarray([[tokens[-1]]]), jnp.asarray([[pos]]), cache=out.cache,
                    cache_index=pos, kv_valid=kv_valid)
    return tokens


def test_smollm2_greedy_tokens_match_transformers(smollm2_ours, smollm2_transformers):
    import torch

    model, _, tok = smollm2_ours
    prompt = chat_ids(tok)
    ids = torch.tensor([prompt])
    ref = []
    with torch.no_grad():
        past = None
        step_ids = ids
        for _ in range(20):
            out = smollm2_transformers[0](step_ids, cache=past, use_cache=True)
            past = out.cache
            ref.append(int(out.logits[0, -1].argmax()))
            step_ids = torch.tensor([[ref[-1]]])
    assert greedy_ours(model, prompt, 20) == ref
    assert "Paris" in tok.decode(ref)


def test_smollm2_cli_convert_bfloat16(smollm2_path, smollm2_ours, tmp_path):
    import l2d_jax

    out = tmp_path / "smollm2"
    assert cli.main(["convert", "gguf", str(smollm2_path), str(out), "--dtype", "bfloat16"]) == 0
    manifest = checkpoint.read_manifest(out)
    assert manifest["dtype"] == "bfloat16" and manifest["hf_config"]["model_type"] == "llama"
    restored = checkpoint.restore_params(out)
    # the bf16 conversion casts the dequantised float32 values once, as the f32 load keeps them
    expected = nnx.to_pure_dict(nnx.state(smollm2_ours[0], nnx.Param))
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
    model, tok = l2d_jax.load(out, dtype="bfloat16")
    assert tok.chat_template == smollm2_ours[2].chat_template
    assert chat_ids(tok) == chat_ids(smollm2_ours[2])
    json.dumps(manifest)  # plain data
