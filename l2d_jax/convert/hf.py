"""Hugging Face checkpoints <-> the Flax ``LLM``.

Loading is tensor by tensor: the model is built abstractly (``nnx.eval_shape``), every
tensor is memory-mapped from its file, transposed and cast to the parameter dtype in ONE
host copy, and the map is dropped before the next tensor. Peak host memory is therefore the
model in its target dtype plus a few copies of the largest tensor, never twice the model.

safetensors is read through its header and ``numpy.memmap`` (``safe_open`` validates each
file first): the numpy backend of ``safe_open`` cannot produce bfloat16, and a per-tensor
map keeps the file pages of the other tensors out of the resident set. ``.bin`` files need
torch (the ``torch`` extra) and are read with ``torch.load(weights_only=True, mmap=True)``.

With a ``mesh``, each parameter's host copy goes straight onto its ``NamedSharding`` (the
logical-axis rules' placement, ``l2d_jax.sharding.param_shardings``): every device receives
only its shard of it (the whole of a parameter the rules replicate), so no device ever holds
the whole model unless the rules replicate it. Without one, parameters land on the default
device (zero-copy on CPU).

Names map through ``l2d_jax.convert.names``; nothing is permuted (RoPE is rotate-half on
both sides). With ``tie_word_embeddings`` an ``lm_head.weight`` in the files is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from l2d_jax.convert.names import hf_to_path, layer_paths, path_to_hf, stacked_path
from l2d_jax.errors import L2DError
from l2d_jax.models.llm import LLM, LLMConfig
from l2d_jax.sharding import RULES, param_shardings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One stored tensor: its HF name and shape, the file it lives in, and a reader.

    ``read()`` returns the stored values in their stored dtype, possibly as a memory map:
    convert them and drop the result before reading the next tensor.
    """

    name: str
    shape: tuple[int, ...]
    origin: str
    read: Callable[[], np.ndarray]


# --------------------------------------------------------------------------- config


def hf_config_of(src_dir: str | os.PathLike) -> dict:
    """The ``config.json`` dict of an HF model directory, checked to be a supported decoder."""
    src = _existing_dir(src_dir)
    path = src / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{src} has no {CONFIG_FILE}: not a Hugging Face model directory")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise L2DError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise L2DError(f"{path} does not hold a JSON object")
    LLMConfig.from_hf(hf)  # ValueError naming the supported architectures
    return hf


def _existing_dir(src_dir) -> Path:
    src = Path(src_dir)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if not src.is_dir():
        raise L2DError(f"{src} is not a directory (an HF model directory holds config.json and weights)")
    return src


# --------------------------------------------------------------------------- reading files


def hf_tensor_refs(src_dir: str | os.PathLike) -> dict[str, TensorRef]:
    """Every tensor of an HF directory (safetensors, sharded or not; else ``.bin``) by name."""
    src = _existing_dir(src_dir)
    files = _weight_files(src)
    refs: dict[str, TensorRef] = {}
    for f in files:
        refs.update(_safetensors_refs(f) if f.suffix == ".safetensors" else _bin_refs(f))
    return refs


def _weight_files(src: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise L2DError(f"{index} is not a valid weight index ({e!r})") from None
            files = [src / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{index} lists {f.name}, which does not exist in {src}")
            return files
    if (src / SAFETENSORS_FILE).is_file():
        return [src / SAFETENSORS_FILE]
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        return shards
    if (src / BIN_FILE).is_file():
        return [src / BIN_FILE]
    raise FileNotFoundError(
        f"{src} holds no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or {BIN_INDEX})")


def _safetensors_refs(path: Path) -> dict[str, TensorRef]:
    from safetensors import safe_open

    try:  # validates the header and that the file holds every byte the header promises
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
        header, data_start = _safetensors_header(path)
    except (L2DError, FileNotFoundError):
        raise
    except Exception as e:  # SafetensorError, OSError, struct/JSON errors
        raise L2DError(f"{path}: truncated or corrupt safetensors file ({_one_line(e)})") from None
    refs = {}
    for name in names:
        entry = header[name]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise L2DError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        refs[name] = TensorRef(name, shape, str(path), functools.partial(
            _map_tensor, str(path), data_start + start, end - start, np.dtype(dtype), shape))
    return refs


def _safetensors_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise L2DError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file of {size})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data_start = 8 + n
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if data_start + end > size:
        raise L2DError(f"{path}: truncated safetensors file ({size} bytes, the header needs {data_start + end})")
    return header, data_start


def _map_tensor(path: str, offset: int, nbytes: int, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if nbytes == 0:
        return np.zeros(shape, dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(nbytes,))
    return raw.view(dtype).reshape(shape)


def _bin_refs(path: Path) -> dict[str, TensorRef]:
    try:
        import torch
    except ImportError:
        raise L2DError(f"{path} is a PyTorch .bin checkpoint; reading it needs torch "
                       "(pip install 'l2d-jax[torch]'), or convert it to safetensors") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise L2DError(f"{path}: cannot read PyTorch checkpoint ({_one_line(e)})") from None
    return {name: TensorRef(name, tuple(t.shape), str(path), functools.partial(_torch_to_numpy, t))
            for name, t in state.items()}


def _torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy without upcasting (bfloat16 through an int16 view)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- building the model


def load_hf(src_dir: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None, *,
            mesh: Mesh | None = None, rules=RULES) -> tuple[LLM, dict]:
    """An HF model directory -> (LLM with params in ``param_dtype`` (default ``dtype``), hf_config).

    ``mesh``: every parameter is created sharded on it as ``rules`` say (``build_llm``)."""
    hf = hf_config_of(src_dir)
    cfg = LLMConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype)
    return build_llm(cfg, hf_tensor_refs(src_dir), source=str(src_dir), mesh=mesh, rules=rules), hf


def params_from_state_dict(cfg: LLMConfig | Mapping, state_dict: Mapping) -> LLM:
    """An LLM from an in-memory HF state dict (numpy arrays or torch tensors).

    ``cfg``: an ``LLMConfig`` or an HF config dict.
    """
    if not isinstance(cfg, LLMConfig):
        cfg = LLMConfig.from_hf(dict(cfg))
    refs = {}
    for name, value in state_dict.items():
        read = (functools.partial(_torch_to_numpy, value) if hasattr(value, "detach")
                else functools.partial(np.asarray, value))
        refs[name] = TensorRef(name, tuple(value.shape), "state_dict", read)
    return build_llm(cfg, refs, source="state_dict")


def build_llm(cfg: LLMConfig, refs: Mapping[str, TensorRef], source: str = "checkpoint", *,
              mesh: Mesh | None = None, rules=RULES) -> LLM:
    """Fills an abstractly built LLM tensor by tensor. Checks every name and shape first.

    A stacked parameter (L, ...) is one aligned host buffer filled layer by layer. Each
    finished host copy is put onto its ``NamedSharding`` on ``mesh`` (``rules``), so a device
    receives only its shard; without a mesh JAX adopts it on the default device without
    another copy."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(state)
    shardings = None if mesh is None else param_shardings(state, mesh, rules)
    stacked = dict(_flatten(pure))  # stacked path -> ShapeDtypeStruct
    expected = dict(_layer_paths(stacked))  # one-layer path -> (shape, dtype)
    plan = _plan(cfg, refs, expected, source)
    buffers: dict[tuple, np.ndarray] = {}
    for path, (ref, transpose) in plan.items():
        target, layer = stacked_path(path)
        if layer is None:
            _set(pure, path, _convert(ref.read(), transpose, expected[path][1], _get(shardings, path)))
            continue
        if target not in buffers:
            buffers[target] = _aligned_empty(stacked[target].shape, np.dtype(stacked[target].dtype))
        values = ref.read()
        np.copyto(buffers[target][layer], values.T if transpose else values, casting="unsafe")
        del values
    for target, host in buffers.items():
        _set(pure, target, jax.device_put(host, _get(shardings, target)))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _layer_paths(stacked: Mapping[tuple, object]) -> Iterable[tuple[tuple, tuple]]:
    """(one-layer path, (shape, dtype)) of every tensor HF stores, from the stacked paths."""
    for path, leaf in stacked.items():
        for one, layer in layer_paths(path, leaf.shape[0]):
            yield one, (tuple(leaf.shape if layer is None else leaf.shape[1:]), leaf.dtype)


def _plan(cfg: LLMConfig, refs: Mapping[str, TensorRef], expected: dict, source: str) -> dict:
    """path -> (TensorRef, transpose?) for every parameter; raises on missing / misshapen tensors."""
    plan, ignored = {}, []
    for name, ref in refs.items():
        mapped = hf_to_path(name)
        if mapped is None or mapped[0] not in expected:
            ignored.append(name)
            continue
        path, transpose = mapped
        shape = expected[path][0]
        want = shape[::-1] if transpose else shape
        if tuple(ref.shape) != tuple(want):
            raise L2DError(f"tensor {name} in {ref.origin} has shape {tuple(ref.shape)}, "
                           f"expected {tuple(want)} from config.json")
        plan[path] = (ref, transpose)
    missing = [path_to_hf(p)[0] for p in expected if p not in plan]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise L2DError(f"{source} lacks tensor {', '.join(missing[:3])}{more}")
    ignored = [n for n in ignored if not (n == "lm_head.weight" and cfg.tie_word_embeddings)
               and not n.endswith("rotary_emb.inv_freq")]
    if ignored:
        log.warning("ignoring %d tensors that are not base-model parameters: %s",
                    len(ignored), ", ".join(ignored[:5]))
    return plan


def _convert(values: np.ndarray, transpose: bool, dtype, sharding: NamedSharding | None = None) -> jax.Array:
    """Transpose + cast in one host copy, put onto ``sharding`` (None: the default device,
    which adopts it without copying again).

    The copy is 64-byte aligned so that ``jax.device_put`` on CPU aliases it (zero-copy);
    otherwise JAX would make a second host copy, asynchronously, and on a busy machine the
    queued copies add up.
    """
    src = values.T if transpose else values
    host = _aligned_empty(src.shape, np.dtype(dtype))
    np.copyto(host, src, casting="unsafe")
    del values, src
    return jax.device_put(host, sharding)


def _aligned_empty(shape: tuple, dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an ``align``-byte boundary."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _flatten(tree: Mapping, prefix: tuple = ()) -> Iterable[tuple[tuple, object]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _get(tree: Mapping | None, path: tuple):
    """The leaf of ``tree`` at ``path``; None for no tree."""
    for key in path if tree is not None else ():
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


# --------------------------------------------------------------------------- tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def local_tokenizer(directory: str | os.PathLike):
    """The HF tokenizer saved in ``directory`` (transformers' AutoTokenizer), or None when it
    holds no tokenizer files. A converted checkpoint keeps it in its ``tokenizer/``."""
    from l2d_jax.checkpoint import MANIFEST, TOKENIZER_DIR

    d = Path(directory)
    if (d / MANIFEST).is_file():
        d = d / TOKENIZER_DIR
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


# --------------------------------------------------------------------------- export


def llm_to_hf_state(model: LLM) -> dict[str, np.ndarray]:
    """HF-named numpy arrays of the model's parameters, in their parameter dtype.

    With tied embeddings there is no ``lm_head.weight`` (HF does not store it either).
    """
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for path, value in _flatten(pure):
        arr = np.asarray(value)
        for one, layer in layer_paths(path, arr.shape[0]):
            a = arr if layer is None else arr[layer]
            name, transpose = path_to_hf(one)
            out[name] = np.ascontiguousarray(a.T) if transpose else a
    return out


def save_hf(model: LLM, hf_config: Mapping, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Writes an HF model directory (config.json, model.safetensors, tokenizer files if given)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config)
    config["torch_dtype"] = config["dtype"] = model.cfg.param_dtype
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(llm_to_hf_state(model), str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
