"""The one checkpoint layout of l2d-jax, written atomically and restored against abstract targets.

::

    CKPT_DIR/l2d_jax.json   {"format_version": 2, "kind": "base"|"l2d", "hf_config": {...},
                             "dtype": "<param dtype>", "l2d_settings": {...} (kind l2d only)}
    CKPT_DIR/tokenizer/     tokenizer.save_pretrained (incl. the chat template); absent when
                            the source had no tokenizer
    CKPT_DIR/base/          orbax checkpoint of the base parameters (the LLM's pure dict)
    CKPT_DIR/flow/          orbax checkpoint of the flow parameters (kind l2d only)

Format 2 stores the decoder layers stacked (``layers/<param>`` with a leading layer axis, as
the model holds them); format 1 (before 2026-12-07) stored one subtree per layer
(``layers/<i>/<param>``). Format 1 directories still load: ``restore_params`` restores each
layer onto its share of the target's sharding (``per_layer_target``) and stacks the layers
straight onto the target (``stacked_onto``); untargeted, onto this process's first device.

CKPT_DIR may be local or ``gs://bucket/path`` (``l2d_jax.storage``). Local writes go to
``CKPT_DIR.tmp-<pid>`` and are moved onto ``CKPT_DIR`` with ``os.replace`` when complete; in a
bucket (no directory rename there) the parts are written in place and the manifest is written
last: a directory without ``l2d_jax.json`` is not a checkpoint. On any error the partial
directory is removed, so a failed write leaves nothing readable. Conversion writes are
single-process (training checkpoints belong to the training loop).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from l2d_jax import storage
from l2d_jax.errors import L2DError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one subtree per layer, stacked on load
MANIFEST = "l2d_jax.json"
TOKENIZER_DIR = "tokenizer"
KINDS = ("base", "l2d")
# a training WORKDIR (train/loop.py): its checkpoints, its final export (this layout), its config
WORKDIR_CHECKPOINTS = "checkpoints"
WORKDIR_EXPORT = "export"
WORKDIR_CONFIG = "config.json"
PARTS = ("base", "flow")
_MIN_IN_FLIGHT_BYTES = 16 * 2**20


# --------------------------------------------------------------------------- output directories


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> epath.Path:
    """Raises unless ``out_dir`` (local or ``gs://``) is absent, empty, or ``overwrite`` is
    set; also when a bucket cannot be reached. Call before slow work. Returns it absolute."""
    out = storage.check_access(out_dir, arrays=True, write=True)
    if out.exists() and not out.is_dir():
        raise L2DError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise L2DError(f"output directory {out} exists and is not empty; pass --overwrite "
                       "(overwrite=True) to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yields a directory whose content becomes ``out_dir`` when the block succeeds.

    Local: a fresh temporary directory that replaces ``out_dir`` (``os.replace``); on any
    exception it is removed and ``out_dir`` is left as it was. In a bucket: ``out_dir`` itself,
    emptied first (its manifest deleted before anything else, so it never reads as complete
    while mixed); the block must write the manifest last; on an exception it is removed.
    """
    out = check_output_dir(out_dir, overwrite)
    if storage.is_remote(out):
        (out / MANIFEST).unlink(missing_ok=True)
        storage.rmtree(out)
        try:
            yield out
        except BaseException:
            storage.rmtree(out)
            raise
        return
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        # a failed orbax save may still have writer threads finishing: remove again at exit
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- save / read


def save_checkpoint(out_dir: str | os.PathLike, *, base_params: Mapping, hf_config: Mapping,
                    tokenizer=None, kind: str = "base", flow_params: Mapping | None = None,
                    l2d_settings: Mapping | None = None, dtype: str, overwrite: bool = False) -> Path | epath.Path:
    """Writes the layout above. ``base_params`` / ``flow_params``: pure dicts of arrays.

    Pass JAX arrays (on any device): orbax writes them a few at a time. numpy leaves (e.g. from
    ``jax.device_get``) go through orbax's numpy path, which holds a full extra copy (measured:
    +330 MiB while saving a 358 MiB model).

    ``dtype``: the parameter dtype recorded in the manifest. Returns ``out_dir``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "l2d" and flow_params is None:
        raise ValueError("an 'l2d' checkpoint needs flow_params")
    if kind == "base" and (flow_params is not None or l2d_settings is not None):
        raise ValueError("a 'base' checkpoint takes no flow_params / l2d_settings; use kind='l2d'")
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": kind,
                                "hf_config": _jsonable(hf_config), "dtype": str(dtype)}
    if l2d_settings is not None:
        manifest["l2d_settings"] = _jsonable(l2d_settings)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _orbax_save(tmp / "base", base_params)
        if flow_params is not None:
            _orbax_save(tmp / "flow", flow_params)
        if tokenizer is not None:
            with storage.staged_dir(tmp / TOKENIZER_DIR) as tok_dir:
                tokenizer.save_pretrained(str(tok_dir))
        storage.atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))  # last
    return storage.native(out_dir)


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """The checked ``l2d_jax.json`` of a converted checkpoint directory (local or ``gs://``)."""
    path = storage.as_path(ckpt_dir, arrays=True) / MANIFEST
    if not storage.exists(ckpt_dir, arrays=True):
        raise FileNotFoundError(f"{ckpt_dir} does not exist")
    if not path.is_file():
        raise L2DError(f"{ckpt_dir} is not an l2d-jax checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise L2DError(f"{path} is not valid JSON: {e}") from None
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise L2DError(f"{path}: format_version {version!r} is not supported (this l2d-jax reads "
                       f"{', '.join(map(str, READABLE_VERSIONS))}); convert the model again")
    if manifest.get("kind") not in KINDS:
        raise L2DError(f"{path}: kind {manifest.get('kind')!r} is not one of {KINDS}")
    for key in ("hf_config", "dtype"):
        if key not in manifest:
            raise L2DError(f"{path} lacks {key!r}")
    return manifest


def restore_params(ckpt_dir: str | os.PathLike, part: str = "base", target: Mapping | None = None) -> dict:
    """Restores the pure dict of ``part`` ("base" or "flow").

    ``target``: a pytree of ``jax.ShapeDtypeStruct`` (with shardings, and possibly other
    dtypes than stored): arrays are restored straight onto those shardings and cast. Without a
    target every array lands on the default device in its stored dtype, and the numeric keys of
    layer lists come back as ints.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    path = storage.as_path(ckpt_dir, arrays=True) / part
    if not path.is_dir():
        raise L2DError(f"checkpoint {ckpt_dir} has no {part}/ part")
    import orbax.checkpoint as ocp

    version = read_manifest(ckpt_dir)["format_version"]
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            tree = ckptr.restore(path, local_abstract_tree(ckptr.metadata(path).item_metadata.tree))
            return stack_layers(tree) if version == 1 else tree
        if version == 1 and "layers" in target:
            tree = ckptr.restore(path, {**target, "layers": per_layer_target(target["layers"])})
            return {**tree, "layers": stacked_onto(tree["layers"], target["layers"])}
        return ckptr.restore(path, target)


def map_layer_stacks(tree, fn):
    """``tree`` (a training state: params, optimizer moments, ...) with ``fn`` applied to every
    decoder-layer stack, i.e. the ``layers`` entry of a dict found under a ``base`` / ``flow``
    key, at any depth (optax states are tuples / NamedTuples of such dicts)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            if k in PARTS and isinstance(v, Mapping) and "layers" in v:
                out[k] = {kk: fn(vv) if kk == "layers" else map_layer_stacks(vv, fn) for kk, vv in v.items()}
            else:
                out[k] = map_layer_stacks(v, fn)
        return out
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_layer_stacks(v, fn) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_layer_stacks(v, fn) for v in tree)
    return tree


def per_layer_target(stack):
    """A stacked abstract subtree (ShapeDtypeStructs with a leading layer axis and
    NamedShardings) -> the format-1 target: {i: that layer's ShapeDtypeStructs}."""
    from jax.sharding import NamedSharding, PartitionSpec

    def one(a, i):
        sharding = a.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding)

    n = jax.tree.leaves(stack)[0].shape[0]
    return {i: jax.tree.map(lambda a, i=i: one(a, i), stack) for i in range(n)}


def stacked(per_layer: Mapping):
    """{i: subtree} of arrays -> one subtree whose arrays have a leading layer axis."""
    return jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[per_layer[i] for i in range(len(per_layer))])


def stacked_onto(per_layer: Mapping, target):
    """``stacked(per_layer)`` computed straight onto the shardings of ``target`` (the stacked
    subtree's ShapeDtypeStructs): each device stacks its own shards of the layers, so no
    device holds more of a stacked array than its shard."""
    layers = [per_layer[i] for i in range(len(per_layer))]
    return jax.tree.map(lambda t, *xs: _stack(t.sharding)(*xs), target, *layers)


@functools.lru_cache(maxsize=64)
def _stack(sharding):
    """A jitted stack of its arguments whose output lands on ``sharding``."""
    return jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=sharding)


def stack_layers(part: Mapping) -> dict:
    """A format-1 part (``layers`` a dict of per-layer subtrees keyed 0..L-1) in the format-2
    layout (one subtree whose arrays have a leading layer axis); other parts unchanged."""
    part = dict(part)
    if per_layer(part):
        part["layers"] = stacked(part["layers"])
    return part


def per_layer(part: Mapping) -> bool:
    """Whether ``part`` is in the format-1 layout: ``layers`` a dict of per-layer subtrees
    keyed 0..L-1 (digit keys as ints, as ``local_abstract_tree`` gives them)."""
    layers = part.get("layers")
    return isinstance(layers, Mapping) and bool(layers) and all(isinstance(k, int) for k in layers)


def _orbax_save(path: epath.Path, tree: Mapping) -> None:
    """Orbax PyTree save (restorable by ``StandardCheckpointer``) that stays near one model in memory.

    Orbax's defaults hold a host copy of every array plus zstd buffers while writing (about a
    second model); capping in-flight bytes at twice the largest array and skipping compression
    (which gains little on float weights) bounds the extra memory by a few arrays.
    """
    import orbax.checkpoint as ocp

    largest = max((int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)), default=0)
    gb = max(2 * largest, _MIN_IN_FLIGHT_BYTES) / 1e9
    # several JAX processes (training's export runs on process 0 only): this process writes
    # alone, without orbax's cross-process barriers (which would wait for the others forever)
    solo = {} if jax.process_count() == 1 else {"multiprocessing_options": ocp.options.MultiprocessingOptions(
        primary_host=jax.process_index(), active_processes={jax.process_index()})}
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=gb, save_device_host_concurrent_gb=gb,
                                          use_compression=False, **solo)
    with ocp.Checkpointer(handler, **solo) as ckptr:
        ckptr.save(storage.as_path(path, arrays=True), args=ocp.args.PyTreeSave(dict(tree)))


def local_abstract_tree(tree) -> dict:
    """Restore targets for an orbax metadata tree: every array whole on this process's first
    device (not on the shardings it was saved with, which may name other processes' devices);
    digit keys of layer lists as ints."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def convert(node):
        if isinstance(node, Mapping):
            return {(int(k) if isinstance(k, str) and k.isdigit() else k): convert(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(convert(v) for v in node)
        if not hasattr(node, "shape"):
            return node
        return jax.ShapeDtypeStruct(tuple(node.shape), node.dtype, sharding=device)

    return convert(tree)


def _jsonable(obj):
    """Round-trips through JSON so that the manifest holds plain data (and fails early if not)."""
    try:
        return json.loads(json.dumps(obj))
    except TypeError as e:
        raise ValueError(f"checkpoint metadata is not JSON-serialisable: {e}") from None
