"""Per-device memory plan of a training config, from shapes alone (``l2d-jax plan``).

Nothing here loads weights or runs a model: the base model's shape comes from its HF
``config.json`` (a local directory, a converted checkpoint's ``l2d_jax.json``, the local
hub cache, or the built-in ``l2d_jax.presets`` for the released models' hub ids), the
parameters are ``nnx.eval_shape`` structs, and activations are counted by tracing one
micro-step abstractly.

What is counted, per device (bytes), for ONE optimizer step of ``l2d_jax.train.step``:

- ``params_bytes``: the frozen base in ``param_dtype`` plus the trainable parameters as
  float32 master copies, each tensor divided by the product of the mesh axes that its
  logical axes map to (``l2d_jax.sharding.logical_to_spec``: the same rules and the same
  "only where the axis divides the dimension" test as the real placement).
- ``optimizer_bytes``: ``optax`` state of the config's optimizer (``eval_shape`` of
  ``tx.init``), sharded like the parameters (counters replicated).
- ``gradient_bytes``: two float32 copies of the trainable parameters (the accumulator of
  the ``lax.scan`` over micro-steps and one micro-step's gradient).
- ``activation_bytes_no_remat`` / ``activation_bytes_remat``: what one micro-step keeps for
  its backward pass plus the working set of the loss. The residuals are those JAX's
  autodiff saves (``saved_residuals`` of the micro-step loss) under the policy
  ``dots_with_no_batch_dims_saveable``: matmul outputs are kept, element-wise results are
  recomputed inside fusions, as XLA does; plus, per layer, the attention probabilities of
  the differentiated stream(s) in the compute dtype (rows x heads x length^2; kept by
  XLA:GPU, recomputed by XLA:CPU). The micro-step is traced
  at its per-device shape: ``micro_batch_size`` rows of the longest padded length, and a
  tensor-parallel shard of the model (heads, KV heads, MLP width and vocabulary divided by
  ``tensor`` where they divide), once with 1 and once with 2 decoder layers: the difference
  is one layer's share, the rest the part outside the layers, and the L-layer figure is
  linear in L. With remat (``remat=True``: each layer under ``jax.checkpoint``) a layer keeps
  only its inputs, and one layer's activations are live again while it is recomputed. The
  loss working set is ``LOGITS_COPIES`` float32 (rows, length, vocab shard) arrays (logits,
  log-probabilities, their gradient). ``activation_bytes`` is the one the config's
  ``remat`` selects.
- ``gathered_bytes`` (fsdp > 1): weights all-gathered over ``fsdp``: everything outside the
  decoder layers (embedding table, LM head: used at both ends of the step) and two decoder
  layers (the one being computed and the next one, prefetched), base and flow alike, each
  tensor that fsdp shards at its size after tensor sharding only.
- ``batch_bytes``: the step's token ids and labels on this device.
- ``total_bytes`` = params + optimizer + gradients + activations + gathered + batch: the
  training step's peak estimate.
- ``kv_cache_bytes``: generation's KV cache for ``gen_batch`` sequences of ``gen_len``
  tokens (compute dtype), batch over data x fsdp and KV heads over tensor where they
  divide; ``generate_total_bytes`` adds the parameters in their own dtypes.

Checked against XLA: ``xla_memory`` lowers and compiles the REAL jitted train step
(``Trainer.train_step``) for abstract inputs on a mesh of local (e.g. fake CPU) devices or
an ahead-of-time TPU topology (``aot_topology``, needs libtpu) and returns XLA's
``memory_analysis()`` sizes. ``tests/test_plan.py`` holds the plan within 20% of XLA's
peak (argument + output - aliased + temp bytes) for a ~60M-parameter Llama.
"""

from __future__ import annotations

import functools
import json
import math
import os
import types
from pathlib import Path
from typing import Any, Mapping

from l2d_jax.errors import L2DError

MESH_AXES = ("data", "fsdp", "tensor")
LOGITS_COPIES = 3  # float32 (rows, length, vocab) arrays live at the loss: logits, log-probs, gradient

# Hub ids of the released configs' base models -> built-in presets (case-insensitive).
HUB_PRESETS = {
    "meta-llama/llama-3.2-1b-instruct": "llama-3.2-1b",
    "meta-llama/llama-3.2-1b": "llama-3.2-1b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "qwen/qwen2.5-1.5b-instruct": "qwen2.5-1.5b",
    "qwen/qwen2.5-1.5b": "qwen2.5-1.5b",
    "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
    "qwen/qwen2.5-7b": "qwen2.5-7b",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "smollm2-gguf": "smollm2-135m",
}


class PlanError(L2DError, ValueError):
    """A plan that cannot be made: unknown model shape, bad mesh, batch sizes."""


# --------------------------------------------------------------------------- mesh


def parse_mesh(text: str | None) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` (any subset; ``-1`` fills) -> {axis: size}."""
    if not text:
        return {}
    out: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise PlanError(f"--mesh {text!r}: expected comma-separated data=N,fsdp=N,tensor=N "
                            f"(axes {', '.join(MESH_AXES)}), got {part!r}")
        try:
            out[name] = int(value)
        except ValueError:
            raise PlanError(f"--mesh {text!r}: {name}={value!r} is not an integer") from None
    return out


def resolve_mesh(mesh: Mapping[str, int], num_devices: int | None = None) -> tuple[dict[str, int], int]:
    """({data, fsdp, tensor} sizes, number of devices). One size may be -1 (needs
    ``num_devices``); the product must equal ``num_devices`` when given. PlanError otherwise."""
    sizes = {k: int(mesh.get(k, 1)) for k in MESH_AXES}
    text = " x ".join(f"{k}={v}" for k, v in sizes.items())
    bad = [k for k, v in sizes.items() if v < 1 and v != -1]
    if bad or list(sizes.values()).count(-1) > 1:
        raise PlanError(f"mesh {text}: sizes must be >= 1, with at most one -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices is None:
            raise PlanError(f"mesh {text} has a -1 axis: give the number of devices (--devices N) or "
                            "every axis size")
        if num_devices % known:
            raise PlanError(f"mesh {text}: {num_devices} devices do not divide by the fixed axes "
                            f"(product {known}); choose sizes whose product divides {num_devices}")
        sizes[next(k for k, v in sizes.items() if v == -1)] = num_devices // known
    total = math.prod(sizes.values())
    if num_devices is not None and total != num_devices:
        raise PlanError(f"mesh {' x '.join(f'{k}={v}' for k, v in sizes.items())} = {total} devices does not "
                        f"match the {num_devices} devices (--devices); the product of the axes must equal "
                        "the device count")
    return sizes, total


def _mesh_like(sizes: Mapping[str, int]):
    """What ``sharding.logical_to_spec`` needs of a mesh (``.shape``), without devices."""
    return types.SimpleNamespace(shape=dict(sizes), axis_names=MESH_AXES)


# --------------------------------------------------------------------------- model shape


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {path}: {e}") from e


def model_hf_config(spec: str, *, preset: str | None = None) -> tuple[dict, str]:
    """(HF config dict, where it came from) for a config's ``pretrained_model_dir``.

    ``preset``: a ``l2d_jax.presets`` name that overrides ``spec``. Otherwise, in order:
    ``random:tiny`` (the tiny test model), ``random:<preset>``, a local HF directory
    (``config.json``) or converted checkpoint (``l2d_jax.json``), a known hub id (the
    released configs' base models: built-in presets), a hub id in the local hub cache."""
    from l2d_jax import presets

    if preset:
        return presets.hf_config(preset), f"preset {preset}"
    from l2d_jax.config import RANDOM_TINY, TINY_HF_CONFIG

    if spec == RANDOM_TINY:
        return dict(TINY_HF_CONFIG), "random:tiny"
    if spec.startswith("random:"):
        return presets.hf_config(spec.split(":", 1)[1]), spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_json(path / "config.json"), str(path / "config.json")
        if (path / "l2d_jax.json").is_file():
            meta = _read_json(path / "l2d_jax.json")
            if "hf_config" in meta:
                return dict(meta["hf_config"]), str(path / "l2d_jax.json")
        raise PlanError(f"{path} has neither config.json nor l2d_jax.json")
    known = HUB_PRESETS.get(spec.lower())
    if known:
        return presets.hf_config(known), f"preset {known} (for {spec})"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if isinstance(cached, str):
            return _read_json(Path(cached)), cached
    except Exception:  # noqa: BLE001 - not a hub id, no hub client: fall through
        pass
    raise PlanError(f"no model shape for pretrained_model_dir={spec!r}: not a local directory, not one of "
                    f"the built-in hub ids ({', '.join(sorted(HUB_PRESETS))}) and not in the local hub "
                    f"cache; pass --model PRESET (one of {', '.join(presets.PRESETS)}) or a directory "
                    "holding its config.json")


def _shard_llm_config(llm_cfg, tensor: int):
    """The per-device shard of the model under tensor parallelism: heads, KV heads, MLP
    width and vocabulary divided by ``tensor`` where they divide (else kept whole)."""
    if tensor <= 1:
        return llm_cfg

    def div(n: int) -> int:
        return n // tensor if n % tensor == 0 else n

    heads_ok = llm_cfg.num_heads % tensor == 0 and llm_cfg.num_kv_heads % tensor == 0
    return llm_cfg.replace(
        num_heads=llm_cfg.num_heads // tensor if heads_ok else llm_cfg.num_heads,
        num_kv_heads=llm_cfg.num_kv_heads // tensor if heads_ok else llm_cfg.num_kv_heads,
        intermediate_size=div(llm_cfg.intermediate_size), vocab_size=div(llm_cfg.vocab_size))


@functools.lru_cache(maxsize=8)
def abstract_model(llm_cfg, settings):
    """An ``L2DModel`` of ShapeDtypeStructs (no memory; cached: treat it as read-only)."""
    from flax import nnx

    from l2d_jax.models.l2d import L2DModel
    from l2d_jax.models.llm import LLM

    return nnx.eval_shape(lambda: L2DModel(LLM(llm_cfg, rngs=nnx.Rngs(0)), settings, rngs=nnx.Rngs(1)))


def trainable_filter(settings):
    from flax import nnx

    from l2d_jax.models.l2d import FLOW

    return nnx.Param if settings.base_params_to_freeze == "none" else FLOW


# --------------------------------------------------------------------------- bytes


def _nbytes(shape, dtype) -> int:
    import numpy as np

    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def _divisors(state, sizes: Mapping[str, int], rules) -> Any:
    """Per leaf of an nnx.State (pure dict): the number of shards (product of mesh axes)."""
    import jax
    from flax import nnx

    from l2d_jax import sharding as shd

    mesh = _mesh_like(sizes)

    def one(var):
        value = var.get_value()
        spec = shd.logical_to_spec(var.get_metadata().get("axes"), rules, mesh, value.shape)
        n = 1
        for entry in spec:
            for name in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
                n *= sizes[name]
        return n

    return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _sharded_bytes(pure, divisors, dtype=None) -> int:
    import jax

    leaves, divs = jax.tree.leaves(pure), jax.tree.leaves(divisors)
    assert len(leaves) == len(divs)
    return sum(-(-_nbytes(x.shape, dtype or x.dtype) // d) for x, d in zip(leaves, divs))


def _count(pure) -> int:
    import jax

    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(pure))


def _residual_bytes(llm_cfg, settings, rows: int, length: int, remat: bool) -> int:
    """Bytes one micro-step keeps for its backward pass (see the module doc). ``remat``:
    decoder layers under ``jax.checkpoint`` (their inputs are saved), no outer policy
    (it would override the layers' own)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    from l2d_jax.train.step import loss_terms

    model = abstract_model(llm_cfg, settings)
    graphdef, train, frozen = nnx.split(model, trainable_filter(settings), ...)
    train = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), train)
    guided = settings.use_guidance

    def objective(train, frozen, ids, labels, keys, classes):
        m = nnx.merge(graphdef, train, frozen)
        terms = loss_terms(m, ids, labels, keys, class_labels=classes if guided else None, train=True,
                           remat="full" if remat else "none")
        return terms.losses.sum()

    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    keys = jax.ShapeDtypeStruct((rows, 2), jnp.uint32)
    classes = jax.ShapeDtypeStruct((rows,), jnp.int32)
    f = objective if remat else jax.checkpoint(objective, policy=policy)
    residuals = saved_residuals(f, train, frozen, ids, ids, keys, classes)
    return sum(_nbytes(aval.shape, aval.dtype) for aval, why in residuals
               if not why.startswith("from the argument") and hasattr(aval, "shape"))


@functools.lru_cache(maxsize=64)
def _saved_bytes(shard_cfg, settings, rows: int, length: int) -> dict[str, int]:
    """Residual bytes of one micro-step, split into the part outside the decoder layers, one
    layer's activations, and one layer's inputs (what a rematerialised layer keeps), from
    traces of the same model with 1 and 2 layers (layers are identical, so the bytes are
    linear in their number)."""
    nr1, nr2, r1, r2 = (_residual_bytes(shard_cfg.replace(num_layers=n), settings, rows, length, remat=r)
                        for r in (False, True) for n in (1, 2))
    layer = max(nr2 - nr1, 0)
    outside = max(nr1 - layer, 0)
    # attention probabilities of the streams that are differentiated (the flow stream; the main
    # stream too when the base trains), in the compute dtype: XLA:GPU keeps them for the
    # backward pass (no fused attention kernel here); the dots policy above leaves them out
    streams = 2 if settings.base_params_to_freeze == "none" else 1
    layer += streams * _nbytes((rows, shard_cfg.num_heads, length, length), shard_cfg.dtype)
    return {"outside": outside, "layer": layer, "layer_inputs": max(min(r2 - r1, layer), 0)}


def _gathered_bytes(halves, sizes: Mapping[str, int], rules) -> int:
    """Weights all-gathered over fsdp at once: the parts outside the decoder layers (embedding
    table, LM head, ...: used at both ends of the step, so they stay gathered) and two decoder
    layers (the one computed and the next, prefetched), base and flow parameters alike. A
    tensor counts with its size after tensor sharding only, and only if fsdp shards it.
    ``halves``: (nnx.State, pure dict, dtype or None) of the frozen and trainable parts."""
    import jax

    tensor_only = dict(sizes, data=1, fsdp=1)
    per_layer = 0  # one layer's gathered bytes (layers are stacked: a stacked leaf / L)
    ends = 0
    for state, pure, dtype in halves:
        if not jax.tree.leaves(pure):
            continue
        full, partial = _divisors(state, sizes, rules), _divisors(state, tensor_only, rules)
        flat = jax.tree_util.tree_flatten_with_path(pure)[0]
        for (path, x), d_full, d_part in zip(flat, jax.tree.leaves(full), jax.tree.leaves(partial)):
            if d_full == d_part:
                continue  # not sharded over fsdp (or data): nothing is gathered
            keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
            nbytes = -(-_nbytes(x.shape, dtype or x.dtype) // d_part)
            if len(keys) > 2 and keys[1] == "layers":
                per_layer += -(-nbytes // x.shape[0])
            else:
                ends += nbytes
    return ends + 2 * per_layer


# --------------------------------------------------------------------------- the plan


def model_parts(cfg, preset: str | None = None):
    """(LLMConfig, L2DSettings, trainable nnx.State, frozen nnx.State, shape source) of a
    training config, abstract (ShapeDtypeStructs; the states in their declared dtypes)."""
    from flax import nnx

    from l2d_jax import config as config_lib
    from l2d_jax.models.llm import LLMConfig

    hf, source = model_hf_config(cfg.pretrained_model_dir, preset=preset)
    llm_cfg = LLMConfig.from_hf(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    settings = config_lib.l2d_settings(cfg)
    _, train_state, frozen_state = nnx.split(abstract_model(llm_cfg, settings), trainable_filter(settings), ...)
    return llm_cfg, settings, train_state, frozen_state, source


def optimizer_state(cfg, settings, llm_cfg, train_pure):
    """(optax transform, abstract optimizer state) of the training loop's optimizer over the
    trainable parameters as float32 master copies (``train_pure``: their pure dict)."""
    import jax
    import jax.numpy as jnp

    from l2d_jax.train import optim

    abstract_f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), train_pure)
    tx, _ = optim.make_optimizer(cfg, 1000, mask=lambda p: optim.decay_mask(p, settings, llm_cfg))
    return tx, jax.eval_shape(tx.init, abstract_f32)


def plan(cfg, *, mesh: Mapping[str, int] | None = None, num_devices: int | None = None,
         preset: str | None = None, seq_len: int | None = None, gen_batch: int | None = None,
         gen_len: int | None = None) -> dict:
    """The memory plan of ``cfg`` (a loaded training config) as a dict (see the module doc).

    mesh: axis sizes overriding the config's ``mesh``; num_devices: devices to plan for
    (default: the mesh's product; needed when an axis is -1); preset: a model preset
    instead of ``pretrained_model_dir``; seq_len: padded length (default: the largest
    bucket); gen_batch / gen_len: generation batch (global, default micro_valid_batch_size x
    data x fsdp) and cache length (default max_seq_len) for ``kv_cache_bytes``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from l2d_jax import sharding as shd

    mesh_cfg = dict(cfg.get("mesh") or {})
    mesh_cfg.update(mesh or {})
    sizes, n_dev = resolve_mesh(mesh_cfg, num_devices)
    rules = shd.rules_from_config(dict(cfg.get("sharding_rules") or {}))
    dp, tensor = sizes["data"] * sizes["fsdp"], sizes["tensor"]
    mb = int(cfg.micro_batch_size)
    n_step = int(cfg.n_samples_before_backprop)
    if n_step % (mb * dp):
        raise PlanError(f"n_samples_before_backprop={n_step} is not a multiple of micro_batch_size={mb} x "
                        f"data-parallel devices {dp} (data={sizes['data']} x fsdp={sizes['fsdp']}) = {mb * dp}")
    accum = n_step // (mb * dp)
    buckets = tuple(cfg.get("seq_len_buckets") or ())
    length = int(seq_len or (buckets[-1] if buckets else cfg.max_seq_len))

    llm_cfg, settings, train_state, frozen_state, source = model_parts(cfg, preset)
    train_pure, frozen_pure = nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen_state)
    train_div = _divisors(train_state, sizes, rules) if jax.tree.leaves(train_pure) else {}
    frozen_div = _divisors(frozen_state, sizes, rules) if jax.tree.leaves(frozen_pure) else {}

    trainable_bytes = _sharded_bytes(train_pure, train_div, jnp.float32)
    frozen_bytes = _sharded_bytes(frozen_pure, frozen_div)
    params_bytes = trainable_bytes + frozen_bytes

    # optimizer state: the loop's optimizer, sharded like the parameters
    import optax

    tx, opt_state = optimizer_state(cfg, settings, llm_cfg, train_pure)
    opt_div = optax.tree_utils.tree_map_params(tx, lambda _, d: d, opt_state, train_div,
                                               transform_non_params=lambda _: 1)
    optimizer_bytes = sum(-(-_nbytes(x.shape, x.dtype) // d)
                          for x, d in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_div)))
    gradient_bytes = 2 * trainable_bytes

    # activations of one micro-step on one device
    shard_cfg = _shard_llm_config(llm_cfg, tensor)
    vocab_shard = shard_cfg.vocab_size
    logits_bytes = LOGITS_COPIES * _nbytes((mb, length, vocab_shard), "float32")
    saved = _saved_bytes(shard_cfg, settings, mb, length)
    n_layers = llm_cfg.num_layers
    act_no_remat = saved["outside"] + n_layers * saved["layer"] + logits_bytes
    # remat: each layer's inputs, plus one layer's activations recomputed in the backward pass
    act_remat = saved["outside"] + n_layers * saved["layer_inputs"] + saved["layer"] + logits_bytes
    from l2d_jax.train.step import remat_policy

    use_remat = remat_policy(cfg) != "none"  # the analytic figure counts "full" (each layer's inputs)
    activation_bytes = act_remat if use_remat else act_no_remat

    gathered_bytes = 0
    if sizes["fsdp"] > 1:
        gathered_bytes = _gathered_bytes([(frozen_state, frozen_pure, None), (train_state, train_pure, "float32")],
                                         sizes, rules)
    batch_bytes = 2 * accum * mb * length * 4  # input_ids + labels, int32

    total = params_bytes + optimizer_bytes + gradient_bytes + activation_bytes + gathered_bytes + batch_bytes

    # generation: KV cache (compute dtype) + parameters in their own dtypes
    g_batch = int(gen_batch or int(cfg.get("micro_valid_batch_size") or mb) * dp)
    g_len = int(gen_len or cfg.max_seq_len)
    kv_heads_div = tensor if llm_cfg.num_kv_heads % tensor == 0 else 1
    rows_dev = -(-g_batch // dp) if g_batch % dp == 0 else g_batch
    kv_cache_bytes = 2 * _nbytes((llm_cfg.num_layers, rows_dev, g_len, llm_cfg.num_kv_heads // kv_heads_div,
                                  llm_cfg.head_dim), cfg.dtype)
    gen_params = _sharded_bytes(train_pure, train_div) + frozen_bytes

    return {
        "config": str(cfg.get("wandb_run_name") or ""),
        "model": source,
        "mesh": sizes,
        "num_devices": n_dev,
        "param_count": {"trainable": _count(train_pure), "frozen": _count(frozen_pure)},
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "micro_batch_size": mb,
        "accumulation_steps": accum,
        "seq_len": length,
        "remat": bool(use_remat),
        "params_bytes": params_bytes,
        "trainable_params_bytes": trainable_bytes,
        "frozen_params_bytes": frozen_bytes,
        "optimizer_bytes": optimizer_bytes,
        "gradient_bytes": gradient_bytes,
        "activation_bytes_remat": act_remat,
        "activation_bytes_no_remat": act_no_remat,
        "activation_bytes": activation_bytes,
        "logits_bytes": logits_bytes,
        "gathered_bytes": gathered_bytes,
        "batch_bytes": batch_bytes,
        "total_bytes": total,
        "kv_cache_bytes": kv_cache_bytes,
        "generation": {"batch": g_batch, "length": g_len},
        "generate_total_bytes": gen_params + kv_cache_bytes,
    }


def format_plan(p: Mapping) -> str:
    """A human-readable table of ``plan``'s dict."""
    def gib(n):
        return f"{n / 2**30:9.3f} GiB"

    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    lines = [f"model      {p['model']}",
             f"mesh       {mesh} ({p['num_devices']} devices)",
             f"params     trainable {p['param_count']['trainable']:,}, frozen {p['param_count']['frozen']:,}",
             f"batch      micro {p['micro_batch_size']} rows/device x {p['seq_len']} tokens, "
             f"{p['accumulation_steps']} accumulation steps, remat {p['remat']}",
             "per device:",
             f"  params              {gib(p['params_bytes'])}  (trainable f32 {gib(p['trainable_params_bytes'])})",
             f"  optimizer           {gib(p['optimizer_bytes'])}",
             f"  gradients           {gib(p['gradient_bytes'])}",
             f"  activations         {gib(p['activation_bytes'])}  (remat {gib(p['activation_bytes_remat'])}, "
             f"no remat {gib(p['activation_bytes_no_remat'])})",
             f"  fsdp gathered       {gib(p['gathered_bytes'])}",
             f"  total (training)    {gib(p['total_bytes'])}",
             f"  KV cache            {gib(p['kv_cache_bytes'])}  (generation: {p['generation']['batch']} x "
             f"{p['generation']['length']} tokens)",
             f"  total (generation)  {gib(p['generate_total_bytes'])}"]
    if "xla" in p:
        x = p["xla"]
        lines.append(f"XLA ({x['device']}): peak {gib(x['peak_bytes'])} = argument {gib(x['argument_bytes'])} + "
                     f"output {gib(x['output_bytes'])} - alias {gib(x['alias_bytes'])} + temp {gib(x['temp_bytes'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- XLA's own numbers


def xla_memory(cfg, *, devices=None, preset: str | None = None, seq_len: int | None = None) -> dict:
    """XLA's ``memory_analysis()`` of the REAL jitted train step (``aot.train_program``),
    compiled for abstract inputs (no weights) on ``devices`` (default: the local devices; or
    ``aot.topology(...).devices`` for a TPU slice). Bytes per device: argument, output,
    alias (outputs reusing donated arguments), temp, and
    ``peak_bytes = argument + output - alias + temp``."""
    import jax

    from l2d_jax import aot

    devices = list(jax.devices() if devices is None else devices)
    m = aot.train_program(cfg, devices, preset=preset, seq_len=seq_len).lower().compile().memory_analysis()
    out = {"device": f"{devices[0].platform} x {len(devices)}",
           "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    out["argument_output_temp_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


def write_json(p: Mapping, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(p, indent=2, sort_keys=True) + "\n")
    return path
