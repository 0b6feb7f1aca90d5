"""``l2d-jax convert export``: an L2D model -> files the original PyTorch L2D loads.

``export_checkpoint(src, out)`` reads a converted L2D checkpoint or a training workdir (its
``export/``, else its newest ``checkpoints/<step>``) and writes, under ``out``:

- the original's full ``state_dict`` (original names, ``original_names``'s table; tensors the
  original module shares, LoRA ``wrapped_layer`` weights and a tied ``lm_head``, as separate
  identical copies): ``.safetensors``, or ``.bin`` / ``.pt`` (torch's zip format);
- the constructor arguments of ``FlowLlamaForCausalLM`` / ``FlowQwen2ForCausalLM``
  (``l2d_settings.json``, the goldens' form), the base model's HF config and a README saying
  how the original code (SakanaAI/L2D 456871e, transformers 4.46.3) loads them.

Streaming: the model is loaded in its stored dtype, sharded over this process's devices
(fsdp), and written one tensor at a time (each converted on the devices, then copied to the
host and written): the host holds the loaded model plus a tensor or two, never a float32
copy of the whole model. Outputs go to temporary names and are moved into place at the end
(uploaded, for ``gs://``), so a failure leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from etils import epath

from l2d_jax import checkpoint, sharding, storage
from l2d_jax.config import RANDOM_TINY, SMOLLM2_GGUF, ConfigError
from l2d_jax.convert.loading import CONFIG_JSON, EXPORT, latest_export_or_checkpoint, load_l2d, load_trained, model_kind
from l2d_jax.convert.original import STATE_SUFFIXES, constructor_dict_from_settings
from l2d_jax.convert.original_names import OriginalTensor, original_tensors, tensor_reader
from l2d_jax.errors import L2DError, UsageError

FORMATS = ("safetensors", "bin", "pt")
DTYPES = ("float32", "bfloat16")
ORIGINAL_CLASSES = {"llama": "FlowLlamaForCausalLM", "qwen2": "FlowQwen2ForCausalLM"}
ORIGINAL_COMMIT = "456871e"
TRANSFORMERS_VERSION = "4.46.3"
# directory OUT: these names; file OUT (e.g. model.safetensors): model.<suffix> beside it
STATE_STEM, SETTINGS_NAME, README_NAME, BASE_CONFIG_NAME = ("l2d_state", "l2d_settings.json", "README.md",
                                                            "base_config.json")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


@dataclasses.dataclass(frozen=True)
class ExportFiles:
    """Where one export writes (``export_files``)."""

    state: epath.Path
    settings: epath.Path
    readme: epath.Path
    base_config: epath.Path
    directory: bool  # OUT named a directory (created if missing), not the state file

    def all(self) -> list[epath.Path]:
        """Every file, the state last (moved into place last: present means complete)."""
        return [self.settings, self.base_config, self.readme, self.state]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    files: ExportFiles
    source: Path | epath.Path  # the checkpoint read: a converted dir or a workdir's checkpoints/<step>
    training_checkpoint: bool  # the source is a training checkpoint (the run has no export yet)
    tensors: int


def export_files(out: str | os.PathLike, fmt: str | None = None) -> ExportFiles:
    """The files of an export to ``out``: a ``.safetensors`` / ``.bin`` / ``.pt`` file name
    (its settings, README and base config beside it as ``NAME.l2d_settings.json``,
    ``NAME.README.md``, ``NAME.base_config.json``) or a directory (``l2d_state.<fmt>``,
    ``l2d_settings.json``, ``README.md``, ``base_config.json``; ``fmt`` default safetensors)."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    p = storage.as_path(out)
    suffix = Path(p.name).suffix.lower()
    if suffix in STATE_SUFFIXES:
        if fmt is not None and (fmt == "safetensors") != (suffix == ".safetensors"):
            raise UsageError(f"output {p} ends in {suffix}, but --format is {fmt}: drop --format or "
                             "name a directory")
        stem = p.name[:-len(suffix)]
        return ExportFiles(p, *(p.parent / f"{stem}.{n}" for n in (SETTINGS_NAME, README_NAME, BASE_CONFIG_NAME)),
                           directory=False)
    if p.exists() and not p.is_dir():
        raise L2DError(f"output {p} exists and is not a directory; name a directory or a file ending in "
                       f"{', '.join(STATE_SUFFIXES)}")
    return ExportFiles(p / f"{STATE_STEM}.{fmt or 'safetensors'}", p / SETTINGS_NAME, p / README_NAME,
                       p / BASE_CONFIG_NAME, directory=True)


# --------------------------------------------------------------------------- the source


@dataclasses.dataclass(frozen=True)
class _Source:
    path: Path | epath.Path
    training_checkpoint: bool
    run_config: dict | None  # the training workdir's config.json, when the source is in one


def resolve_source(src: str | os.PathLike) -> _Source:
    """What to export for SRC: a converted L2D checkpoint as is; a training workdir's export,
    else its newest checkpoint; a ``checkpoints/<step>`` directory as is. L2DError otherwise."""
    p = storage.native(src, arrays=True)
    if not storage.is_remote(src) and not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    kind = model_kind(p)  # a bucket that cannot be read, or a missing remote path, raises here
    if kind == "workdir" and not (p / "state").is_dir():
        p = latest_export_or_checkpoint(p)  # L2DError naming both when there is neither (p's kind of path)
        kind = model_kind(p)
    if kind not in ("l2d", "workdir"):
        raise L2DError(f"{p} is neither a training workdir nor a converted L2D checkpoint (it is a base "
                       f"model or something else): pass a workdir of `l2d-jax train` (WORKDIR, WORKDIR/export "
                       "or WORKDIR/checkpoints/<step>) or a directory written by `l2d-jax convert l2d-torch`")
    training = kind == "workdir"
    wd = p.parent.parent if training else p.parent  # WORKDIR/checkpoints/<step>, WORKDIR/export
    if (training or p.name == EXPORT) and (wd / CONFIG_JSON).is_file():
        return _Source(p, training, json.loads((wd / CONFIG_JSON).read_text()))
    return _Source(p, training, None)


def _load(source: _Source):
    """(L2DModel in its stored dtype, sharded over the local devices; HF config dict)."""
    mesh = sharding.load_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    if not source.training_checkpoint:
        manifest = checkpoint.read_manifest(source.path)
        dtype = manifest["dtype"]
        model, _ = load_l2d(source.path, dtype=dtype, param_dtype=dtype, mesh=mesh)
        return model, dict(manifest["hf_config"])
    run = source.run_config or {}
    dtype = str(run.get("param_dtype") or "float32")
    try:
        model, _ = load_trained(source.path, dtype=dtype, param_dtype=dtype, mesh=mesh)
    except (OSError, ConfigError) as e:  # the base named in the run's config cannot be loaded
        wd = source.path.parent.parent
        raise L2DError(f"{source.path} is a training checkpoint (the run has not finished, so "
                       f"{wd}/export does not exist): it holds only the trained parameters, and its base "
                       f"model {run.get('pretrained_model_dir')!r} (pretrained_model_dir in {wd}/{CONFIG_JSON}) "
                       f"cannot be loaded here ({' '.join(str(e).split())[:200]}); make that base available "
                       f"at the same path or hub id and rerun, or finish the run (the same `l2d-jax train "
                       f"--workdir {wd}` command resumes it and writes {wd}/export)") from e
    return model, {}


def base_hf_config(model, hf_config: dict) -> dict:
    """The base's HF config for transformers 4.46 (``AutoConfig.from_pretrained`` of the file):
    the stored one with its architecture fields rewritten from the loaded model (RoPE as
    ``rope_theta`` / ``rope_scaling``: 4.46 does not read transformers 5's ``rope_parameters``)."""
    from l2d_jax.train.loop import llm_hf_config

    dropped = ("_name_or_path", "rope_parameters", "dtype")
    return {**{k: v for k, v in hf_config.items() if k not in dropped}, **llm_hf_config(model.cfg)}


def base_model_id(hf_config: dict, run_config: dict | None) -> str | None:
    """The base model's hub id or directory: the HF config's ``_name_or_path``, else the
    training run's ``pretrained_model_dir`` (not ``random:tiny`` / ``smollm2-gguf``), else None."""
    if hf_config.get("_name_or_path"):
        return str(hf_config["_name_or_path"])
    spec = (run_config or {}).get("pretrained_model_dir")
    return str(spec) if spec and spec not in (RANDOM_TINY, SMOLLM2_GGUF) else None


# --------------------------------------------------------------------------- tensors


def _nbytes(t: OriginalTensor) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * jnp.dtype(t.dtype).itemsize


def safetensors_header(plan: list[OriginalTensor]) -> bytes:
    """The safetensors preamble (8-byte little-endian length, JSON header padded to 8 bytes)
    for the plan's tensors laid out back to back in plan order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in plan:
        header[t.name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + _nbytes(t)]}
        offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(path: Path, plan: list[OriginalTensor], read: Callable[[OriginalTensor], np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header(plan))
        for t in plan:
            f.write(np.ascontiguousarray(read(t)).reshape(-1).view(np.uint8).data)


def _write_torch(path: Path, plan: list[OriginalTensor], read: Callable[[OriginalTensor], np.ndarray]) -> None:
    """torch.save's zip format, tensor by tensor: the file is laid out without data
    (``skip_data``, from fake tensors), then each tensor is copied into its place through a
    shared memory map that is closed again before the next one."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    with FakeTensorMode():
        fake = {t.name: torch.empty(t.shape, dtype=dtypes[t.dtype]) for t in plan}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, str(path))
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        for t in plan:
            mapped = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            with warnings.catch_warnings():  # a read-only host array, only read from here
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                mapped[t.name].copy_(_numpy_to_torch(read(t)))
            del mapped


def _require_torch(path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise L2DError(f"writing {path} needs torch (pip install 'l2d-jax[torch]'); "
                       "or write .safetensors") from None


def _numpy_to_torch(a: np.ndarray):
    import ml_dtypes
    import torch

    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------- the export


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str | None = None,
                      dtype: str = "float32", overwrite: bool = False) -> ExportResult:
    """Exports SRC (a converted L2D checkpoint or a training workdir) for the original code:
    the state_dict (``dtype``), its settings, the base HF config and a README (``export_files``
    names them). Existing files are replaced only with ``overwrite``."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    files = export_files(out, fmt)
    for f in files.all():
        if f.exists() and not overwrite:
            raise L2DError(f"output {f} exists; pass --overwrite (overwrite=True) to replace it")
    if not files.directory and not storage.is_remote(files.state) and not files.state.parent.is_dir():
        raise FileNotFoundError(f"output directory {files.state.parent} does not exist")
    suffix = Path(files.state.name).suffix.lower()
    if suffix != ".safetensors":
        _require_torch(files.state)
    source = resolve_source(src)
    model, hf_config = _load(source)
    model_type = model.cfg.model_type
    if model_type not in ORIGINAL_CLASSES:
        raise L2DError(f"the original L2D has no flow model for model_type {model_type!r} (only "
                       f"{', '.join(ORIGINAL_CLASSES)}); this checkpoint cannot be exported for it")
    plan = original_tensors(model, dtype)
    settings = constructor_dict_from_settings(model.settings)
    base_id = base_model_id(hf_config, source.run_config)
    base_config = base_hf_config(model, hf_config)
    readme = readme_text(files, class_name=ORIGINAL_CLASSES[model_type], base_id=base_id, dtype=dtype,
                         tensors=len(plan), source=source)
    write = _write_safetensors if suffix == ".safetensors" else _write_torch
    with _staged(files) as (settings_tmp, config_tmp, readme_tmp, state_tmp):
        settings_tmp.write_text(json.dumps(settings, indent=1) + "\n")
        config_tmp.write_text(json.dumps(base_config, indent=1, sort_keys=True) + "\n")
        readme_tmp.write_text(readme)
        write(state_tmp, plan, tensor_reader(model))
    return ExportResult(files, source.path, source.training_checkpoint, len(plan))


@contextlib.contextmanager
def _staged(files: ExportFiles) -> Iterator[list[Path]]:
    """Local paths to write ``files.all()`` to, moved into place in that order (uploaded, for
    a bucket) only when the block succeeds; the temporary files, and an output directory
    this created, are removed when it fails."""
    remote = storage.is_remote(files.state)
    out_dir = files.state.parent
    created = files.directory and not remote and not out_dir.exists()
    if created:
        Path(out_dir).mkdir(parents=True)
    tmpdir = tempfile.mkdtemp(prefix="l2d_jax_export_") if remote else None
    tmps = [Path(tmpdir) / f.name if remote else Path(f).with_name(f".{f.name}.tmp-{os.getpid()}")
            for f in files.all()]
    try:
        yield tmps
        for tmp, f in zip(tmps, files.all()):
            if remote:
                epath.Path(tmp).copy(f, overwrite=True)
            else:
                os.replace(tmp, f)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def readme_text(files: ExportFiles, *, class_name: str, base_id: str | None, dtype: str, tensors: int,
                source: _Source) -> str:
    """The README written beside an export: how the original code loads it."""
    torch_dtype = f"torch.{dtype}"
    base = base_id or "BASE_MODEL_ID_OR_DIR"
    state, settings, config = files.state.name, files.settings.name, files.base_config.name
    if state.endswith(".safetensors"):
        read_state = f'from safetensors.torch import load_file\nstate = load_file("{state}")'
    else:
        read_state = f'state = torch.load("{state}", map_location="cpu", weights_only=True)'
    origin = ("the newest training checkpoint (the run had not finished)" if source.training_checkpoint
              else "a converted L2D checkpoint")
    base_note = ("" if base_id else
                 "\nReplace BASE_MODEL_ID_OR_DIR with the base model the flow path was trained on (the "
                 "checkpoint does not record it), or build the base from the config as shown.\n")
    return f"""# L2D model for the original PyTorch code

Exported by `l2d-jax convert export` from {origin}: `{source.path}`.

- `{state}`: the full `state_dict()` of `{class_name}` ({tensors} tensors, original names,
  {dtype}; tensors the module shares, LoRA `wrapped_layer` weights and a tied `lm_head`, are
  stored as separate identical copies, as `state_dict()` lists them).
- `{settings}`: every constructor argument of `{class_name}` besides `model_or_model_id` and
  `model_loading_kwargs`.
- `{config}`: the base model's Hugging Face config (architecture only; every weight is in
  `{state}`).

Base model: `{base}`.
{base_note}
## Loading it

Needs the original code, <https://github.com/SakanaAI/L2D> at commit {ORIGINAL_COMMIT}, with
Python 3.11, `transformers=={TRANSFORMERS_VERSION}`, `torchdiffeq==0.2.5`, `torch` (the
repository pins 2.4.0) and `safetensors`. Run from the repository root so that `flow_llms`
imports:

```python
import json
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from flow_llms import {class_name}

dtype = {torch_dtype}  # the original trains in torch.bfloat16; load_state_dict casts
base = AutoModelForCausalLM.from_pretrained("{base}", torch_dtype=dtype)
# or, without downloading the base weights (they are all in the state file):
# base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("{config}"), torch_dtype=dtype)
with open("{settings}") as f:
    model = {class_name}(base, **json.load(f))
{read_state}
model.load_state_dict(state, strict=True)  # every key present, none left over
model.eval()
tokenizer = AutoTokenizer.from_pretrained("{base}")
```

The original's benchmark pipeline reads a `.bin` / `.pt` file given as
`from_checkpoint_path` (`torch.load`, then `load_state_dict(strict=True)`); its model
settings must then equal `{settings}`.
"""
