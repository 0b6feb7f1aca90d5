"""HF parameter names <-> paths in the Flax LLM state (one table for every family)."""

from __future__ import annotations

import re

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "self_attn.q_proj": ("self_attn", "q_proj"),
    "self_attn.k_proj": ("self_attn", "k_proj"),
    "self_attn.v_proj": ("self_attn", "v_proj"),
    "self_attn.o_proj": ("self_attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"),
    "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
_NORMS = ("input_layernorm", "post_attention_layernorm")


def hf_to_path(name: str) -> tuple[tuple, bool] | None:
    """HF tensor name -> (path in the LLM state, transpose?) or None if not a base parameter.

    Linear weights are (out, in) in HF and (in, out) here, hence the transpose.
    """
    if name == "model.embed_tokens.weight":
        return ("embed_tokens",), False
    if name == "model.norm.weight":
        return ("norm", "weight"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    m = _LAYER.match(name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    for norm in _NORMS:
        if rest == f"{norm}.weight":
            return ("layers", i, norm, "weight"), False
    for prefix, parts in _LAYER_PARTS.items():
        if rest == f"{prefix}.weight":
            return ("layers", i, *parts, "kernel"), True
        if rest == f"{prefix}.bias":
            return ("layers", i, *parts, "bias"), False
    return None


def path_to_hf(path: tuple) -> tuple[str, bool]:
    """Inverse of ``hf_to_path``: (HF name, transpose?)."""
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight", False
    if path == ("norm", "weight"):
        return "model.norm.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    _, i, *parts = path
    if parts[0] in _NORMS:
        return f"model.layers.{i}.{parts[0]}.weight", False
    leaf = parts[-1]
    return f"model.layers.{i}.{parts[0]}.{parts[1]}.{'weight' if leaf == 'kernel' else 'bias'}", leaf == "kernel"
