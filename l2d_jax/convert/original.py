"""Original (PyTorch) L2D checkpoints <-> l2d-jax checkpoint directories.

The CLI-facing half of ``l2d_jax.convert.original_names`` (which holds the name table):

- ``read_state(path)``: an original ``state_dict`` (original names) from a ``.safetensors``
  file, a ``.bin`` / ``.pt`` file (torch, lazily imported) or the directory the original's
  training writes (``save_pretrained(..., safe_serialization=False)``: ``pytorch_model.bin``,
  possibly sharded with ``pytorch_model.bin.index.json``). Tensors are read lazily and keep
  their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``), so base tensors can be compared
  at the precision they were saved in.
- ``read_settings(path)``: L2D settings from a JSON of original constructor names or from an
  original training ``.cfg`` file (``settings_from_cfg``).
- ``convert_l2d_torch(...)``: STATE + base HF dir + SETTINGS -> checkpoint dir (kind "l2d").

Our own checkpoints (``load_l2d``) live in ``convert/loading.py``, ``convert export`` in
``convert/export.py`` (``constructor_dict_from_settings`` here is the settings it writes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from l2d_jax import checkpoint, solvers
from l2d_jax.convert import hf
from l2d_jax.convert.hf import _one_line, _torch_to_numpy, load_hf, local_tokenizer
from l2d_jax.convert.names import get_param, set_params
from l2d_jax.convert.original_names import StateMismatch, import_original_state, original_names
from l2d_jax.errors import L2DError, UsageError
from l2d_jax.models.l2d import abstract_l2d
from l2d_jax.models.llm import LLM
from l2d_jax.settings import L2DSettings, SettingsError

log = logging.getLogger(__name__)

STATE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_IGNORED_STATE_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- reading STATE


class LazyState(Mapping):
    """name -> numpy array, each tensor read (memory-mapped where possible) on access."""

    def __init__(self, readers: Mapping[str, Callable[[], np.ndarray]], origin: str):
        self._readers = dict(readers)
        self.origin = origin

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(self._readers[name]())

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __contains__(self, name) -> bool:
        return name in self._readers


def read_state(path: str | os.PathLike) -> LazyState:
    """An original state_dict (original names) from a file or a ``save_pretrained`` directory.

    Tensors keep their stored dtype; bfloat16 comes back as ``ml_dtypes.bfloat16``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"state {p} does not exist")
    if p.is_dir():
        files = hf._weight_files(p)  # index (safetensors or bin), model.safetensors, pytorch_model.bin
    elif p.suffix.lower() in STATE_SUFFIXES:
        files = [p]
    else:
        raise L2DError(f"state {p}: unsupported file type {p.suffix or '(none)'!r}; expected "
                       f"{', '.join(STATE_SUFFIXES)} or a directory written by save_pretrained")
    readers: dict[str, Callable[[], np.ndarray]] = {}
    for f in files:
        if f.suffix.lower() == ".safetensors":
            part = {name: ref.read for name, ref in hf._safetensors_refs(f).items()}
        else:
            part = _torch_readers(f)
        for name, read in part.items():
            if name in readers:
                raise L2DError(f"state {p}: tensor {name!r} appears in more than one file")
            if not _IGNORED_STATE_KEYS.fullmatch(name):
                readers[name] = read
    if not readers:
        raise L2DError(f"state {p} holds no tensors")
    return LazyState(readers, str(p))


def _torch_readers(path: Path) -> dict[str, Callable[[], np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise L2DError(f"{path} is a PyTorch checkpoint; reading it needs torch "
                       "(pip install 'l2d-jax[torch]'), or save the state as .safetensors") from None
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise L2DError(f"{path}: cannot read PyTorch checkpoint ({_one_line(e)})") from None
    for wrapper in ("model_state_dict", "state_dict"):  # torch.save({"model_state_dict": sd})
        if isinstance(obj, Mapping) and set(obj) == {wrapper} and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise L2DError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    out = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise L2DError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = lambda t=t: _torch_to_numpy(t)
    return out


# --------------------------------------------------------------------------- SETTINGS


@dataclasses.dataclass
class SettingsInfo:
    """What reading a settings file did besides producing settings."""

    source: str
    ignored: list[str] = dataclasses.field(default_factory=list)  # keys that are not L2D settings
    warnings: list[str] = dataclasses.field(default_factory=list)
    defaulted: list[str] = dataclasses.field(default_factory=list)  # taken from the training CLI's defaults


def read_settings(path: str | os.PathLike) -> tuple[L2DSettings, SettingsInfo]:
    """L2D settings from a JSON of original constructor names or an original ``.cfg`` file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"settings file {p} does not exist")
    if p.suffix.lower() == ".cfg":
        return settings_from_cfg(p)
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise L2DError(f"settings {p} is neither an original .cfg file nor valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise L2DError(f"settings {p} does not hold a JSON object")
    info = SettingsInfo(str(p))
    return settings_from_constructor_dict(d, info), info


def settings_from_constructor_dict(d: Mapping, info: SettingsInfo | None = None) -> L2DSettings:
    """L2DSettings from original constructor keyword arguments, with the original's meanings
    of the values the dataclass cannot hold: ``base_params_to_freeze = None`` is ``"none"``,
    ``ode_kwargs.options`` (adaptive first step) is implied and dropped."""
    d = dict(d)
    if "base_params_to_freeze" in d and d["base_params_to_freeze"] is None:
        d["base_params_to_freeze"] = "none"
    if isinstance(d.get("base_params_to_freeze"), str):
        d["base_params_to_freeze"] = d["base_params_to_freeze"].lower()
    ode = d.get("ode_kwargs")
    if isinstance(ode, Mapping) and "options" in ode:
        ode = dict(ode)
        options = ode.pop("options")
        if info is not None and options != {"first_step": 0.05}:
            info.warnings.append(f"ode_kwargs.options={options!r} ignored (l2d-jax uses first_step 0.05)")
        d["ode_kwargs"] = ode
    return L2DSettings.from_dict(d)


def constructor_dict_from_settings(settings: L2DSettings) -> dict:
    """The reverse of ``settings_from_constructor_dict``: the keyword arguments of the original
    ``FlowLlamaForCausalLM`` / ``FlowQwen2ForCausalLM`` besides ``model_or_model_id`` and
    ``model_loading_kwargs`` (JSON-ready), with ``ode_kwargs.options`` as the original's
    ``build_ode_solver`` sets it for adaptive solvers."""
    d = settings.to_dict()
    if d["ode_kwargs"].get("method") in solvers.ADAPTIVE_METHODS:
        d["ode_kwargs"] = {**d["ode_kwargs"], "options": {"first_step": 0.05}}
    return d


# The original training CLI (training.py get_custom_arguments): key -> (type, default).
_B, _I, _F, _S = "bool", "int", "float", "str"
TRAINING_CLI_SETTINGS: dict[str, tuple[str, Any]] = {
    "base_params_to_freeze": (_S, "all"),
    "noise_schedule": (_S, "identity"),
    "minimum_training_noise": (_F, None),
    "minimum_training_noise_units": (_S, "time"),
    "flow_representation_space": (_S, "mapping"),
    "flow_representation_dim": (_I, 256),
    "flow_representation_num_layers": (_I, 1),
    "flow_representation_normalize": (_B, True),
    "flow_representation_rescaling": (_S, "mult"),
    "noise_rescaling": (_F, 256.0),
    "flow_to_lm_translation_depth": (_I, 2),
    "flow_to_lm_hidden_size": (_I, 256),
    "flow_to_lm_timestep_rescaling": (_F, 1.0),
    "flow_to_lm_rescale_in_float32": (_B, True),
    "preserve_behavior_at_flow_start": (_B, True),
    "modulate_hidden_states": (_B, False),
    "full_dit_modulation": (_B, True),
    "timestep_modulation_num_layers": (_I, 2),
    "timestep_modulation_freq_embedding_size": (_I, 256),
    "timestep_modulation_hidden_size": (_I, 2048),
    "guidance_modulation_training_dropout": (_F, 0.2),
    "nstep_guidance_parameter": (_F, 1.0),
    "freeze_modulation_at_flow_start": (_B, True),
    "separate_flow_params": (_B, True),
    "separate_flow_params_with_lora": (_B, False),
    "flow_lora_rank": (_I, 32),
    "flow_lora_alpha": (_F, None),
    "nstep_final_timestep": (_F, 1.0),
    "nstep_x1_estimation": (_S, "sample"),
    "nstep_normalize_x1_predictions": (_B, False),
    "nstep_clamp_predictions": (_B, False),
    "nstep_temperature_schedule": ("str_or_float", 0.0),
    "reinit_flow_params": (_B, False),
}
# Training-CLI keys that become constructor settings through build_model / build_ode_solver.
TRAINING_CLI_DERIVED: dict[str, tuple[str, Any]] = {
    "use_data_split_guidance": (_B, False),
    "guidance_categories": ("list", None),
    "ode_solver": (_S, "midpoint"),
    "ode_solver_atol": (_F, 1e-5),
    "ode_solver_rtol": (_F, 1e-5),
}
# the solvers the original's build_ode_solver accepts (dopri5 is ours only)
FIXED_GRID_SOLVERS = solvers.FIXED_GRID_METHODS
ADAPTIVE_SOLVERS = tuple(m for m in solvers.ADAPTIVE_METHODS if m != "dopri5")


def parse_cfg(path: str | os.PathLike) -> list[tuple[str, str, int]]:
    """``(key, raw value, line number)`` of an original ``.cfg`` file, in order.

    The format of configargparse's default parser (which the original uses): ``key = value``
    (or ``key: value``, or ``key value``), a bare ``key`` meaning true, ``#`` / ``;`` comments
    (inline after whitespace), ``[SECTION]`` headers that do not scope the keys.
    """
    items = []
    for n, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;" or (line.startswith("[") and line.endswith("]")):
            continue
        line = re.sub(r"\s[;#].*$", "", line).strip()
        m = re.fullmatch(r"([^:=;#\s]+?)\s*(?:[:=\s]\s*(.*))?", line)
        if m is None:
            raise L2DError(f"{path}:{n}: cannot parse line {raw.strip()!r}")
        items.append((m.group(1), "true" if m.group(2) is None else m.group(2).strip(), n))
    return items


def _str2bool(key: str, v: str) -> bool:
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise L2DError(f"{key} = {v!r}: a boolean (true/false) was expected")


def _lenient_float(key: str, v: str, info: SettingsInfo) -> float:
    """float(v); a value with stray letters (``64com.0``) is read without them, with a warning."""
    try:
        return float(v)
    except ValueError:
        pass
    cleaned = re.sub(r"[^0-9eE+\-.]", "", v)
    try:
        value = float(cleaned)
    except ValueError:
        raise L2DError(f"{key} = {v!r}: a number was expected") from None
    info.warnings.append(f"{key} = {v!r} is not a number (the original's argument parser would reject it); "
                         f"using {value!r}, the value without its stray characters")
    return value


def _convert_value(key: str, kind: str, v: str, info: SettingsInfo):
    if kind == _B:
        return _str2bool(key, v)
    if kind == _I:
        try:
            return int(v)
        except ValueError:
            raise L2DError(f"{key} = {v!r}: an integer was expected") from None
    if kind == _F:
        return _lenient_float(key, v, info)
    if kind == "str_or_float":
        try:
            return float(v)
        except ValueError:
            return v
    if kind == "list":
        v = v.strip()
        if v.startswith("[") and v.endswith("]"):
            try:
                return [str(x) for x in json.loads(v)]
            except json.JSONDecodeError:
                return [x.strip().strip("'\"") for x in v[1:-1].split(",") if x.strip()]
        return v.split()
    return v


def settings_from_cfg(path: str | os.PathLike) -> tuple[L2DSettings, SettingsInfo]:
    """L2D settings from an original training ``.cfg`` file.

    Keys that are constructor arguments map directly; ``ode_solver`` / ``ode_solver_atol`` /
    ``ode_solver_rtol`` become ``ode_kwargs`` and ``use_data_split_guidance`` /
    ``guidance_categories`` become ``guidance_modulation_num_classes`` (the number of
    categories), as the original's ``build_model`` does. Keys the file does not set take the
    original training CLI's defaults (which differ from the constructor's). Every other key
    (training, data, logging; ``lad`` ...) is listed in ``info.ignored``.
    """
    info = SettingsInfo(str(path))
    values: dict[str, Any] = {}
    for key, raw, n in parse_cfg(path):
        spec = TRAINING_CLI_SETTINGS.get(key) or TRAINING_CLI_DERIVED.get(key)
        if spec is None:
            if key == "lad":
                values["lad"] = _str2bool(key, raw)
            if key not in info.ignored:
                info.ignored.append(key)
            continue
        values[key] = _convert_value(key, spec[0], raw, info)
    if not values.get("lad", False):
        info.warnings.append("the file does not set lad = True (the original would train the plain "
                             "base model); L2D settings it does not give take the training CLI's defaults")
    values.pop("lad", None)
    for key, (_, default) in {**TRAINING_CLI_SETTINGS, **TRAINING_CLI_DERIVED}.items():
        if key not in values:
            values[key] = default
            info.defaulted.append(key)
    d = {k: values[k] for k in TRAINING_CLI_SETTINGS}
    solver = values["ode_solver"]
    if solver == "heun":
        solver = "heun2"
    if solver not in FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS:
        raise SettingsError(f"ode_solver = {solver!r} is not supported; use one of "
                            f"{', '.join(FIXED_GRID_SOLVERS + ADAPTIVE_SOLVERS)}")
    # build_ode_solver adds options=dict(first_step=0.05) for adaptive solvers; l2d-jax implies it.
    d["ode_kwargs"] = {"atol": values["ode_solver_atol"], "rtol": values["ode_solver_rtol"], "method": solver}
    if values["use_data_split_guidance"]:
        cats = values["guidance_categories"]
        if not cats:
            raise SettingsError("use_data_split_guidance = True needs guidance_categories (a non-empty list)")
        d["guidance_modulation_num_classes"] = len(cats)
    else:
        d["guidance_modulation_num_classes"] = 0
    try:
        return settings_from_constructor_dict(d, info), info
    except SettingsError as e:
        raise SettingsError(f"{path}: {e}") from None


# --------------------------------------------------------------------------- models


def l2d_from_original(base: LLM, settings: L2DSettings, state: Mapping[str, np.ndarray]):
    """An L2DModel around ``base`` with every flow parameter taken from an original state_dict.

    Base tensors in ``state`` must equal ``base``'s (compared at the lower precision of the
    two); aliases may be absent. With ``base_params_to_freeze = "none"`` (the base trained
    too) the base tensors of ``state`` replace ``base``'s instead. Raises StateMismatch
    naming the first offending key.
    """
    settings.validate(hidden_size=base.cfg.hidden_size)
    graphdef, abstract = nnx.split(abstract_l2d(base.cfg, settings))
    pure = nnx.to_pure_dict(abstract)
    pure["base"] = nnx.to_pure_dict(nnx.state(base))
    check_base = True
    if settings.base_params_to_freeze == "none":
        base_values = {}
        for e in original_names(settings, base.cfg):
            if e.alias_of is None and e.path[0] == "base":
                if e.name not in state:
                    raise StateMismatch(f"checkpoint lacks {e.name!r} (base_params_to_freeze='none': "
                                        "the base was trained, so the state must hold it)")
                value = np.asarray(state[e.name])
                ours = get_param(pure, e.path)
                want = tuple(ours.shape[::-1]) if e.transpose else tuple(ours.shape)
                if tuple(value.shape) != want:
                    raise StateMismatch(f"tensor {e.name!r} has shape {tuple(value.shape)}, the settings "
                                        f"expect {want}")
                base_values[e.path] = value.T if e.transpose else value
        set_params(pure, base_values)
        for e in original_names(settings, base.cfg):  # shared tensors must be saved equal
            if e.alias_of is not None and e.name in state and not np.array_equal(
                    np.asarray(state[e.name]), np.asarray(state[e.alias_of])):
                raise StateMismatch(f"tensor {e.name!r} differs from {e.alias_of!r}, which it shares "
                                    "storage with in the original model")
        check_base = False
    nnx.replace_by_pure_dict(abstract, pure)
    model = import_original_state(nnx.merge(graphdef, abstract), state, check_base=check_base)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    leftover = [path for path, v in leaves if isinstance(v, jax.ShapeDtypeStruct)]
    if leftover:
        raise StateMismatch(f"the settings' name table leaves flow parameter "
                            f"{jax.tree_util.keystr(leftover[0])} unset")
    return model


# --------------------------------------------------------------------------- commands


def convert_l2d_torch(state_path: str | os.PathLike, base_dir: str | os.PathLike,
                      settings_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                      dtype: str = "float32", overwrite: bool = False,
                      report: Callable[[str], None] | None = None) -> Path:
    """An original L2D state (file or training output dir) + its base HF dir + its settings
    (JSON or ``.cfg``) -> an l2d-jax checkpoint directory of kind "l2d".

    ``report`` receives one-line notices (warnings, ignored cfg keys). Nothing is left at
    ``out_dir`` when this fails.
    """
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    report = report or log.warning
    checkpoint.check_output_dir(out_dir, overwrite)  # fail before the slow part
    settings, info = read_settings(settings_path)
    for w in info.warnings:
        report(f"warning: {w}")
    if info.ignored:
        report(f"ignored {len(info.ignored)} key(s) of {info.source} that are not L2D settings: "
               f"{', '.join(info.ignored)}")
    state = read_state(state_path)
    base, hf_config = load_hf(base_dir, dtype=dtype)
    model = l2d_from_original(base, settings, state)
    del base, state
    tokenizer = local_tokenizer(base_dir)
    return checkpoint.save_checkpoint(
        out_dir, base_params=nnx.to_pure_dict(nnx.state(model.base, nnx.Param)), hf_config=hf_config,
        tokenizer=tokenizer, kind="l2d", flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)),
        l2d_settings=settings.to_dict(), dtype=dtype, overwrite=overwrite)
