"""Original (PyTorch) L2D parameter names <-> the ``flow`` / ``base`` state of ``L2DModel``.

``original_names(settings, cfg)`` lists every key of the original ``state_dict()`` for the
given settings, each either a parameter of ours (path + transpose flag) or an alias of
another key (LoRA ``wrapped_layer`` weights, shared projections, the tied LM head). Import
and export both walk this one table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from l2d_jax.convert.names import get_param, hf_to_path, set_params, stacked_path
from l2d_jax.models.llm import LLMConfig
from l2d_jax.errors import L2DError
from l2d_jax.settings import L2DSettings

_ATTN = ("q_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One original key: our state path (with 'base'/'flow' first) or the key it aliases."""

    name: str
    path: tuple | None = None
    transpose: bool = False
    alias_of: str | None = None
    trainable: bool = False


def _mlp_entries(prefix: str, ours: tuple, n_layers: int) -> list[Entry]:
    """Sequential MLP with SiLU at odd indices: linear j is at index 2j."""
    out = []
    for j in range(n_layers):
        out.append(Entry(f"{prefix}.{2 * j}.weight", ours + ("layers", j, "kernel"), True, trainable=True))
        out.append(Entry(f"{prefix}.{2 * j}.bias", ours + ("layers", j, "bias"), trainable=True))
    return out


def _base_entry(name: str) -> Entry:
    path, tr = hf_to_path(name)
    return Entry(name, ("base",) + path, tr)


def original_names(s: L2DSettings, cfg: LLMConfig) -> list[Entry]:
    """Every key of the original state_dict, in the original's order."""
    f = ("flow",)
    out: list[Entry] = []
    if s.flow_representation_space == "mapping":
        out += _mlp_entries("model.flow_token_embedder.embedder.layers_module",
                            f + ("token_embedder",), s.flow_representation_num_layers)
    elif s.flow_representation_space == "one-hot":
        out.append(Entry("model.flow_token_embedder.embedding_table.weight", f + ("one_hot_table",),
                         trainable=True))
    out += _mlp_entries("model.timestep_embedder.mlp", f + ("timestep_embedder",),
                        s.timestep_modulation_num_layers)
    if s.use_guidance:
        out.append(Entry("model.data_label_embedder.weight", f + ("label_embedder",), trainable=True))
    enc = ("model.flow_to_lm_encoder.embedder.layers_module" if s.flow_to_lm_timestep_rescaling
           else "model.flow_to_lm_encoder.layers_module")
    out += _mlp_entries(enc, f + ("flow_to_lm",), s.flow_to_lm_depth)
    out.append(_base_entry("model.embed_tokens.weight"))
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        for group, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            base_names = [f"{pre}.{group}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")] \
                if group == "self_attn" else [f"{pre}.{group}.{n}" for n in names]
            for bn in base_names:
                out.append(_base_entry(f"{bn}.weight"))
                if group == "self_attn" and cfg.attention_bias and not bn.endswith("o_proj"):
                    out.append(_base_entry(f"{bn}.bias"))
            for n in names:
                out += _flow_proj_entries(s, cfg, f"{pre}.{group}", n, f + ("layers", i, n))
        out.append(_base_entry(f"{pre}.input_layernorm.weight"))
        out.append(_base_entry(f"{pre}.post_attention_layernorm.weight"))
        out += _mlp_entries(f"{pre}.modulation_head.mlp", f + ("layers", i, "modulation"), 2)
    out.append(_base_entry("model.norm.weight"))
    out += _mlp_entries("model.modulation_head.mlp", f + ("final_head",), 2)
    if cfg.tie_word_embeddings:
        out.append(Entry("lm_head.weight", alias_of="model.embed_tokens.weight"))
    else:
        out.append(_base_entry("lm_head.weight"))
    if s.base_params_to_freeze == "none":
        out = [dataclasses.replace(e, trainable=True) if e.path and e.path[0] == "base" else e for e in out]
    return out


def _flow_proj_entries(s: L2DSettings, cfg: LLMConfig, pre: str, n: str, ours: tuple) -> list[Entry]:
    base = f"{pre}.{n}"
    flow = f"{pre}.flow_{n}"
    if not s.separate_flow_params:
        names = [f"{flow}.weight"] + ([f"{flow}.bias"] if n == "q_proj" and cfg.attention_bias else [])
        return [Entry(x, alias_of=x.replace("flow_", "")) for x in names]
    if s.use_lora:
        out = [Entry(f"{flow}.A", ours + ("A",), trainable=True), Entry(f"{flow}.B", ours + ("B",), trainable=True),
               Entry(f"{flow}.wrapped_layer.weight", alias_of=f"{base}.weight")]
        if n == "q_proj" and cfg.attention_bias:
            out.append(Entry(f"{flow}.wrapped_layer.bias", alias_of=f"{base}.bias"))
        return out
    out = [Entry(f"{flow}.weight", ours + ("kernel",), True, trainable=True)]
    if n == "q_proj" and cfg.attention_bias:
        out.append(Entry(f"{flow}.bias", ours + ("bias",), trainable=True))
    return out


class StateMismatch(L2DError, ValueError):
    """A checkpoint whose names, shapes or base tensors do not fit the settings."""


def import_original_state(model, state: Mapping[str, np.ndarray], *, check_base: bool = True):
    """Loads an original state_dict (numpy arrays, original names) into ``model`` (L2DModel).

    Flow tensors are copied (transposed where the original stores (out, in)); base tensors
    and aliases present in ``state`` must equal what ``model`` already holds (its base came
    from the base checkpoint): the first that differs raises StateMismatch. Aliases may be
    absent (the original's ``save_pretrained`` drops tied duplicates). Returns the model.
    """
    entries = original_names(model.settings, model.cfg)
    known = {e.name for e in entries}
    unknown = sorted(set(state) - known)
    if unknown:
        raise StateMismatch(f"checkpoint has {len(unknown)} key(s) the settings do not define, first: "
                            f"{unknown[0]!r} (check the L2D settings match the checkpoint)")
    gd, st = nnx.split(model)
    pure = nnx.to_pure_dict(st)
    by_name = {e.name: e for e in entries}
    flow_values = {}
    for e in entries:
        if e.name not in state:
            if e.alias_of is None and (e.trainable or not check_base):
                raise StateMismatch(f"checkpoint lacks {e.name!r}")
            continue
        value = np.asarray(state[e.name])
        target = by_name[e.alias_of] if e.alias_of else e
        ours = get_param(pure, target.path)
        want = tuple(ours.shape[::-1]) if target.transpose else tuple(ours.shape)
        if tuple(value.shape) != want:
            raise StateMismatch(f"tensor {e.name!r} has shape {tuple(value.shape)}, the settings expect {want}")
        value = value.T if target.transpose else value
        if e.alias_of is None and e.path[0] == "flow":
            flow_values[e.path] = value
        elif check_base and not same_base_tensor(ours, value):
            raise StateMismatch(f"base tensor {e.name!r} differs from the base model's (wrong --base?)")
    set_params(pure, flow_values)
    nnx.replace_by_pure_dict(st, pure)
    return nnx.merge(gd, st)


def same_base_tensor(ours, stored) -> bool:
    """Whether a base tensor stored in a checkpoint equals ours, compared at the LOWER of the
    two precisions: a bfloat16 state (the original trains and saves in bf16) holds the base
    cast to bf16 (round to nearest even, as torch casts), and a base loaded in bf16 holds a
    float32 state's values rounded the same way. Equal precisions compare exactly."""
    import ml_dtypes

    ours, stored = np.asarray(ours), np.asarray(stored)
    kinds = [a.dtype for a in (ours, stored)]
    if all(np.issubdtype(k, np.floating) or k == ml_dtypes.bfloat16 for k in kinds):
        low = min(kinds, key=lambda k: ml_dtypes.finfo(k).nmant)
        ours, stored = ours.astype(low), stored.astype(low)
    return bool(np.array_equal(ours.astype(np.float32), stored.astype(np.float32)))


@dataclasses.dataclass(frozen=True)
class OriginalTensor:
    """One key of the original state_dict as an export writes it."""

    name: str
    source: Entry  # the entry holding the values (an alias's target: aliases are copies)
    shape: tuple  # in the original's layout
    dtype: str


def original_tensors(model, dtype: str = "float32") -> list[OriginalTensor]:
    """Every key of the original state_dict of ``model`` (L2DModel), in order, with its shape
    in the original and the export ``dtype``; no data is read."""
    pure = nnx.to_pure_dict(nnx.state(model))
    entries = original_names(model.settings, model.cfg)
    by_name = {e.name: e for e in entries}
    out = []
    for e in entries:
        src = by_name[e.alias_of] if e.alias_of else e
        shape = tuple(get_param(pure, src.path).shape)  # one layer's shape for a stacked leaf
        out.append(OriginalTensor(e.name, src, shape[::-1] if src.transpose else shape, dtype))
    return out


@functools.partial(jax.jit, static_argnames=("dtype", "transpose"))
def _original_layout(x, layer, *, dtype: str, transpose: bool):
    if layer is not None:
        x = jax.lax.dynamic_index_in_dim(x, layer, keepdims=False)
    x = x.astype(dtype)
    return x.T if transpose else x


def tensor_reader(model) -> Callable[[OriginalTensor], np.ndarray]:
    """``read(tensor)``: one tensor of ``original_tensors(model)`` as a host array, sliced,
    cast and transposed where the model's arrays live (sharded arrays stay sharded until
    the one result is copied to the host). An alias is read again each time, not cached."""
    pure = nnx.to_pure_dict(nnx.state(model))

    def read(t: OriginalTensor) -> np.ndarray:
        stacked, layer = stacked_path(t.source.path)
        out = np.asarray(_original_layout(get_param(pure, stacked), layer, dtype=t.dtype,
                                          transpose=t.source.transpose))
        assert out.shape == t.shape, (t.name, out.shape, t.shape)
        return out

    return read


def export_original_state(model, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The original's full state_dict (aliases as separate copies), original names, in host
    memory (``convert/export.py`` streams the same tensors to a file instead)."""
    read = tensor_reader(model)
    return {t.name: read(t) for t in original_tensors(model, dtype)}
