"""Device mesh with named axes and logical-axis rules (MaxText style).

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters
sharded), ``tensor`` (tensor parallelism over heads / MLP / vocab). Every parameter carries
logical axis names in its ``axes`` metadata (see ``l2d_jax.models.llm``); ``RULES`` maps
each logical name to a mesh axis (or None = replicated). Rules are plain data, so a config
can override them.

Inference (``l2d-jax eval`` / ``generate``): ``inference_mesh`` builds each process's mesh
over ITS OWN local devices (``local_mesh``: one model-parallel group per host) and places the
model on it (``place_module``); hosts split the prompts between them. The loaders
(``l2d_jax.convert.loading.load_any(mesh=load_mesh(sizes))``) create every parameter straight
on that mesh (``param_shardings``): a device only ever receives its shards.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from l2d_jax.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (None: replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("flow_in", None),  # flow-path matrices are small: replicate
    ("flow_out", None),
    ("lora", None),
    ("classes", None),
    ("length", None),
    ("layers", None),  # the stacked layer axis: scanned over, never sharded by default
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 (fills the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise UsageError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise UsageError(f"{len(devices)} devices do not divide by fsdp*tensor*... = {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise UsageError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
                         f"devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


INFERENCE_MESH = {"data": -1, "fsdp": 1, "tensor": 1}  # every local device data-parallel


def local_mesh(sizes: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over THIS process's devices (default ``jax.local_devices()``):
    ``sizes`` overrides ``INFERENCE_MESH`` per axis, one size may be -1 (the remaining devices).
    UsageError, naming the fix, when the sizes cannot tile exactly these devices."""
    devices = list(jax.local_devices() if devices is None else devices)
    unknown = sorted(set(sizes or {}) - set(MESH_AXES))
    if unknown:
        raise UsageError(f"mesh axes {unknown}: the axes are {', '.join(MESH_AXES)}")
    full = {**INFERENCE_MESH, **{k: int(v) for k, v in (sizes or {}).items()}}
    text = ",".join(f"{k}={v}" for k, v in full.items())
    n, fixed = len(devices), int(np.prod([v for v in full.values() if v != -1]))
    fills = list(full.values()).count(-1)
    valid = fills <= 1 and all(v >= 1 or v == -1 for v in full.values())
    if not valid or (n % fixed if fills else fixed != n):
        tensor = full["tensor"] if full["tensor"] > 0 and n % full["tensor"] == 0 else 1
        raise UsageError(f"mesh {text} cannot tile the {n} local devices of this process (each process "
                         f"builds its own mesh over its local devices; processes split the prompts): use "
                         f"sizes >= 1 whose product is {n}, or one -1 for the rest, e.g. --mesh "
                         f"data=-1,fsdp=1,tensor={tensor}")
    return make_mesh(full["data"], full["fsdp"], full["tensor"], devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split on ``mesh``: data x fsdp."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def place_module(module: nnx.Module, mesh: Mesh, rules=RULES) -> nnx.Module:
    """Moves every Variable of ``module`` (in place; returned) onto ``mesh`` as its logical
    ``axes`` and ``rules`` say (``state_shardings``): sharded over fsdp / tensor where the
    rules map its dimensions there, replicated elsewhere. A stacked decoder parameter
    (L, ...) keeps its ``layers`` axis whole."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
    return module


def inference_mesh(model: nnx.Module, sizes: Mapping[str, int] | None = None, rules=RULES) -> Mesh | None:
    """THIS process's mesh for generation (``local_mesh(sizes)``) with ``model`` placed on it
    (``place_module``; nothing moves for a model loaded onto ``load_mesh(sizes)``), or None
    (nothing moved) when it is a single device. Trace generation under
    ``gather_layers(mesh, rules)``; put batches (B, ...) with ``batch_sharding``, B a multiple
    of ``data_parallel_size(mesh)``."""
    mesh = load_mesh(sizes)
    if mesh is not None:
        place_module(model, mesh, rules)
    return mesh


def load_mesh(sizes: Mapping[str, int] | None = None) -> Mesh | None:
    """The mesh to load a model straight onto (``convert.loading.load_any(mesh=...)``): THIS
    process's ``local_mesh(sizes)``, or None when that is a single device (load as without a
    mesh). A UsageError for sizes that cannot tile the local devices, before anything loads."""
    mesh = local_mesh(sizes)
    return None if mesh.size == 1 else mesh


def param_shardings(state, mesh: Mesh, rules=RULES) -> dict:
    """``state_shardings(state, mesh, rules)`` as a pure dict (``nnx.to_pure_dict``'s nesting):
    where a loader creates each parameter of an (abstract) state."""
    return nnx.to_pure_dict(state_shardings(state, mesh, rules))


def logical_to_spec(axes: Sequence[str | None] | None, rules=RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for logical axis names. A mesh axis is used at most once per array, and
    (given mesh and shape) only where it divides the dimension; otherwise that dim is replicated."""
    if axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and (mesh is None or mesh.shape[n] > 1))
        if names and mesh is not None and shape is not None:
            size = int(np.prod([mesh.shape[n] for n in names]))
            if shape[i] % size:
                names = ()
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*out)


def state_shardings(state, mesh: Mesh, rules=RULES, *, compute: bool = False):
    """NamedShardings for an nnx.State (or abstract state), from each Variable's ``axes``:
    where it is stored, or with ``compute`` where a step computes with it: gathered over
    data / fsdp, except a stacked decoder-layer parameter, which keeps its stored sharding
    and is gathered one layer at a time inside the scan (``gather_layer``)."""
    def one(var):
        axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
        value = var.get_value() if isinstance(var, nnx.Variable) else var  # also ShapeDtypeStruct
        spec = logical_to_spec(axes, rules, mesh, getattr(value, "shape", None))
        return NamedSharding(mesh, without_axes(spec, GATHERED) if compute and not _stacked(axes) else spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch-major arrays (B, ...): B over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def rules_from_config(overrides: Mapping[str, str | None] | None) -> tuple:
    """RULES with per-name overrides (e.g. from a config's ``sharding_rules``)."""
    table = dict(RULES)
    table.update(overrides or {})
    return tuple(table.items())


def without_axes(spec: P, axes: tuple[str, ...]) -> P:
    """``spec`` with the mesh axes ``axes`` removed (those dimensions gathered)."""
    out = []
    for entry in spec:
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(n for n in names if n not in axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


GATHERED = ("data", "fsdp")  # mesh axes a parameter is all-gathered over for the computation
_layer_gather = threading.local()


def _stacked(axes) -> bool:
    """Whether logical ``axes`` are those of a stacked decoder-layer parameter."""
    return bool(axes) and axes[0] == "layers"


@contextlib.contextmanager
def gather_layers(mesh: Mesh | None, rules=RULES):
    """While a program is traced inside, ``gather_layer`` all-gathers one layer's parameters
    over data / fsdp inside the scan over layers (FSDP one layer at a time: the stacked
    parameters stay sharded, and only the layer being computed, or recomputed in the
    backward pass, is whole on a device). Outside, or with ``mesh`` None, ``gather_layer``
    does nothing. A jitted function must make ``layer_gather_layout()`` part of its cache
    key (a static argument), since the context changes what is traced."""
    before = getattr(_layer_gather, "value", None)
    _layer_gather.value = None if mesh is None else (mesh, rules)
    try:
        yield
    finally:
        _layer_gather.value = before


def layer_gather_layout() -> tuple[Mesh, tuple] | None:
    """(mesh, rules) of the innermost ``gather_layers`` around this call, or None."""
    return getattr(_layer_gather, "value", None)


def gather_layer(state):
    """One layer's slice of a stacked module's state (inside the scan body) constrained to
    its compute sharding: its logical axes without the leading ``layers``, mapped by the
    rules, without the data / fsdp axes. The identity outside ``gather_layers``."""
    layout = layer_gather_layout()
    if layout is None:
        return state
    mesh, rules = layout

    def one(var):
        axes = var.get_metadata().get("axes")
        if not _stacked(axes):
            return var
        value = var.get_value()
        stored = logical_to_spec(axes[1:], rules, mesh, value.shape)
        gathered = NamedSharding(mesh, without_axes(stored, GATHERED))
        return var.replace(_all_gather(value, gathered, NamedSharding(mesh, stored)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _all_gather(x: jax.Array, gathered: NamedSharding, stored: NamedSharding) -> jax.Array:
    """x constrained to ``gathered``; its cotangent constrained back to ``stored`` (the layer's
    gradient is reduce-scattered inside the backward scan, so the stacked gradient stays
    sharded like the parameters instead of whole on every device)."""
    return jax.lax.with_sharding_constraint(x, gathered)


def _all_gather_fwd(x, gathered, stored):
    return jax.lax.with_sharding_constraint(x, gathered), None


def _all_gather_bwd(gathered, stored, _, ct):
    return (jax.lax.with_sharding_constraint(ct, stored),)


_all_gather.defvjp(_all_gather_fwd, _all_gather_bwd)
