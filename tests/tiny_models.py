"""Tiny random Hugging Face models (torch, seeded) for parity and conversion tests.

Every constant HF initialises (RMSNorm weights = 1, Qwen2 q/k/v biases = 0) is overwritten
with random values, and linear weights use std 0.1, so that parity checks are not vacuous.

- ``llama_llama3_tied``: Llama, llama3 rope scaling (original_max_position_embeddings 16,
  so a 40-token test sequence exercises the scaled band), tied embeddings.
- ``llama_gqa``: Llama, untied, 4 heads / 2 KV heads.
- ``qwen2_one_kv``: Qwen2, q/k/v biases, one KV head, untied.
- ``qwen3_qk_norm``: Qwen3 dense: per-head RMSNorm of q and k, head_dim (24) not hidden / heads.

Import torch lazily: this module is imported by fixtures that skip without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 128

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)

CONFIGS = {
    "llama_llama3_tied": dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True, initializer_range=0.1),
    "llama_gqa": dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, initializer_range=0.1),
    "qwen2_one_kv": dict(
        model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.1),
    "qwen3_qk_norm": dict(
        model_type="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.1),
}
SEEDS = {"llama_llama3_tied": 11, "llama_gqa": 12, "qwen2_one_kv": 13, "qwen3_qk_norm": 14}


def hub_style(hf: dict) -> dict:
    """A transformers-5 config dict rewritten the way hub config.json files spell RoPE."""
    hf = dict(hf)
    params = dict(hf.pop("rope_parameters", None) or {})
    if "rope_theta" in params:
        hf["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        hf["rope_scaling"] = params
    return hf


def build(name: str):
    """The seeded tiny torch model ``name`` (eval mode, float32)."""
    import torch
    import transformers

    kw = dict(CONFIGS[name])
    model_type = kw.pop("model_type")
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[model_type]
    torch.manual_seed(SEEDS[name])
    model = model_cls(config_cls(**kw)).eval()
    gen = torch.Generator().manual_seed(SEEDS[name] + 1000)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def tiny_tokenizer():
    """A word-level tokenizer over ``VOCAB`` ids with a chat template (no hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> "
                         "{% endfor %}{% if add_generation_prompt %}<s> assistant{% endif %}")
    return tok


def save(model, out_dir: str | Path, *, max_shard_size: str | None = None, rope_hub_style: bool = False,
         tokenizer=None) -> Path:
    """``save_pretrained`` as safetensors (sharded with ``max_shard_size``); config rewritten in
    hub RoPE style when asked."""
    out = Path(out_dir)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out), **kwargs)
    if rope_hub_style:
        path = out / "config.json"
        path.write_text(json.dumps(hub_style(json.loads(path.read_text())), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def state_dict_numpy(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
