"""HF parameter names <-> paths in the Flax LLM state (one table for every family).

Paths name one layer's tensor as ``("layers", i, ...)`` (HF's view); the state stores the
layers stacked, ``("layers", ...)`` with the layer on the leading axis: ``stacked_path``
maps one to the other, ``get_param`` reads such a path from a state's pure dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

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
_HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # qk-norm (Qwen3)
STACKS = ("base", "flow")  # the halves of an L2DModel whose "layers" are stacked


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
    for norm in _HEAD_NORMS:
        if rest == f"{norm}.weight":
            return ("layers", i, *norm.split("."), "weight"), False
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
    if parts[0] in _NORMS or ".".join(parts[:2]) in _HEAD_NORMS:
        return f"model.layers.{i}.{'.'.join(parts[:-1])}.weight", False
    leaf = parts[-1]
    return f"model.layers.{i}.{parts[0]}.{parts[1]}.{'weight' if leaf == 'kernel' else 'bias'}", leaf == "kernel"


def stacked_path(path: tuple) -> tuple[tuple, int | None]:
    """A one-layer path ``(["base" | "flow"], "layers", i, ...)`` -> (the stacked parameter's
    path without ``i``, i); any other path -> (path, None). (The ``layers`` of the flow path's
    small MLPs are lists, not stacks: they are never at those positions.)"""
    for j in (0, 1):
        if (len(path) > j + 1 and path[j] == "layers" and isinstance(path[j + 1], int)
                and (j == 0 or path[0] in STACKS)):
            return path[:j + 1] + path[j + 2:], path[j + 1]
    return path, None


def layer_paths(path: tuple, num_layers: int) -> list[tuple[tuple, int | None]]:
    """Inverse of ``stacked_path`` for a base LLM's pure dict: a stacked ``("layers", ...)``
    path -> [(one-layer path, i)] for each layer; any other path -> [(path, None)]."""
    if path[0] != "layers":
        return [(path, None)]
    return [(("layers", i) + path[1:], i) for i in range(num_layers)]


def get_param(tree, path: tuple):
    """The value at a one-layer or plain ``path`` of a pure dict with stacked layers (an
    abstract stacked leaf gives the abstract layer)."""
    stacked, layer = stacked_path(path)
    leaf = _walk(tree, stacked)
    if layer is None:
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[layer]


def _walk(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def set_params(tree: dict, values: Mapping[tuple, np.ndarray]) -> None:
    """Writes ``values`` (one-layer or plain path -> array, cast to the leaf's dtype) into a
    pure dict with stacked layers. The layers of one stacked parameter are gathered in one
    host buffer (holding its current values, zeros for an abstract leaf) that replaces it
    once, instead of one device copy of the whole stack per layer."""
    buffers: dict[tuple, np.ndarray] = {}
    for path, value in values.items():
        stacked, layer = stacked_path(path)
        current = _walk(tree, stacked)
        if layer is None:
            _walk(tree, stacked[:-1])[stacked[-1]] = jnp.asarray(value, current.dtype)
            continue
        if stacked not in buffers:
            buffers[stacked] = (np.zeros(current.shape, current.dtype) if isinstance(current, jax.ShapeDtypeStruct)
                                else np.array(current))
        buffers[stacked][layer] = np.asarray(value).astype(buffers[stacked].dtype)
    for stacked, buf in buffers.items():
        _walk(tree, stacked[:-1])[stacked[-1]] = jnp.asarray(buf)
