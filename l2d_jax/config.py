"""Training configs: ml_collections ``.py`` files, flat keys named as the original's CLI.

A config file defines ``get_config(arg=None) -> ConfigDict`` (big_vision style); the files
in ``configs/`` start from ``configs/base.py`` (the original ``training.cfg`` plus its
training-CLI defaults, every value written out) and set a released model's values.

- ``load_config(path, overrides)``: loads ``path`` (``path:arg`` passes ``arg`` to
  ``get_config``), applies overrides such as ``--config.peak_lr=3e-5`` (also
  ``config.peak_lr=3e-5`` or ``peak_lr=3e-5``; nested ``mesh.fsdp=4``), each value parsed
  with the key's declared type (``SCHEMA``), and validates.
- ``validate_config(cfg)``: unknown keys (with the closest known key), wrong types (key,
  expected, got), bad choices, contradictory L2D settings (``L2DSettings.validate``) and a
  global batch that does not divide into micro-batches over the data-parallel devices, all
  reported together before any model is built.
- ``l2d_settings(cfg)``: the ``L2DSettings`` (every L2D key of the config has the
  ``L2DSettings`` field name; ``ode_kwargs`` comes from ``ode_solver`` / ``ode_solver_atol`` /
  ``ode_solver_rtol`` and ``guidance_modulation_num_classes`` from ``use_data_split_guidance`` /
  ``guidance_categories``, as the original's training script builds them).
- ``run_name`` / ``default_workdir``: ``<save_dir>/<wandb_run_name with '/' -> '_'>``, else the
  config file's stem; no timestamp, so a restarted run finds its checkpoints.

The model a config names (``pretrained_model_dir``: ``random:tiny``, ``smollm2-gguf``, a local
path or a hub id) is built by ``l2d_jax.convert.loading.build_base(cfg)``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import sys
import types
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from l2d_jax import solvers
from l2d_jax.models.block import REMAT_POLICIES
from l2d_jax.errors import L2DError
from l2d_jax.settings import L2DSettings, SettingsError


class ConfigError(L2DError, ValueError):
    """A config that cannot run: unknown keys, wrong types, contradictions."""


# --------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True)
class Spec:
    """Declared type of a config key.

    kind: bool | int | float | str | float_or_str | seq | dict. ``seq`` holds ``elem``
    values (exactly ``n`` when given); ``dict`` is a nested ConfigDict."""

    kind: str
    doc: str = ""
    nullable: bool = False
    elem: str | None = None
    n: int | None = None
    choices: tuple | None = None

    def describe(self) -> str:
        if self.kind == "seq":
            s = f"sequence of {self.elem}" + (f" (length {self.n})" if self.n else "")
        elif self.kind == "float_or_str":
            s = "float or str"
        elif self.kind == "dict":
            s = "ConfigDict"
        else:
            s = self.kind
        return s + (" or None" if self.nullable else "")


def _s(kind, doc="", **kw) -> Spec:
    return Spec(kind, doc, **kw)


DTYPES = ("bfloat16", "float32")
DATA_SOURCES = ("hf", "local", "tfds", "synthetic", "auto")
SCHEDULERS = ("warmup_decay", "warmup_linear", "warmup_cosine")
LOSS_NORMALIZATIONS = ("micro_batch_mean", "token_weighted")
ODE_SOLVERS = solvers.METHODS  # the registry in solvers.py
SHARED_TASKS = ("math", "coding", "general_qa", "other")  # the original's guidance categories
TEMPLATE_TYPES = ("fixed_date_llama3", "base_llama")
MESH_KEYS = ("data", "fsdp", "tensor")

# Training / data / logging keys (the original training CLI's names where it has one).
TRAINING_SCHEMA: dict[str, Spec] = {
    # model
    "pretrained_model_dir": _s("str", "base model: hub id, local HF dir, .gguf, converted dir, "
                                      "'random:tiny' or 'smollm2-gguf'"),
    "tokenizer_dir": _s("str", "tokenizer source (None: pretrained_model_dir)", nullable=True),
    "specified_template_type": _s("str", "named chat template for evaluation prompts (and for training "
                                         "data with train_data_template='specified')",
                                  nullable=True, choices=TEMPLATE_TYPES),
    "train_data_template": _s("str", "'original': the tokenizer's own template as the original's "
                                     "training did; 'specified': specified_template_type",
                              choices=("original", "specified")),
    "dtype": _s("str", "compute dtype", choices=DTYPES),
    "param_dtype": _s("str", "parameter dtype of the (frozen) base model", choices=DTYPES),
    "remat": _s("bool", "rematerialise decoder layers in the backward pass (alias: True = remat_policy full)"),
    "remat_policy": _s("str", "the scanned block's rematerialisation policy (none: keep every activation, "
                       "full: keep each layer's inputs, save_dots: keep the projections' outputs); "
                       "None: from remat", choices=tuple(REMAT_POLICIES), nullable=True),
    "shifted_labels": _s("bool", "labels already shifted (label i = token i+1, the original's training); "
                                 "False: HF-style unshifted labels"),
    # data
    "data_source": _s("str", "how train/valid_filepaths are read ('auto': per entry)", choices=DATA_SOURCES),
    "train_filepaths": _s("seq", "'hub_id,subset,split' | file.jsonl/.json/.parquet | "
                                 "'tfds:name/config:split' | 'synthetic:arithmetic:N'", elem="str"),
    "valid_filepaths": _s("seq", "as train_filepaths", elem="str"),
    "exclude_train_data_category": _s("seq", "rows whose 'category' is listed are skipped "
                                             "(train and valid, as the original)", elem="str"),
    "max_seq_len": _s("int", "a conversation is cut at its first turn with context + response longer"),
    "truncate_or_drop": _s("str", "the first too-long turn: 'drop' (original), 'truncate' it, or stop "
                           "with an 'error'", choices=("drop", "truncate", "error")),
    "seq_len_buckets": _s("seq", "padded lengths (static shapes); () = multiples of "
                                 "seq_len_bucket_size up to max_seq_len", elem="int"),
    "seq_len_bucket_size": _s("int", "bucket step when seq_len_buckets is ()"),
    "use_data_split_guidance": _s("bool", "class label per example from its data subset / category"),
    "guidance_categories": _s("seq", "guidance classes (subset of math, coding, general_qa, other)",
                              elem="str"),
    # batch and optimizer
    "micro_batch_size": _s("int", "examples per data-parallel device per micro-step"),
    "micro_valid_batch_size": _s("int", "validation examples per data-parallel device"),
    "n_samples_before_backprop": _s("int", "global examples per optimizer step"),
    "n_training_steps": _s("int", "optimizer steps (-1: n_epochs over the data; else min of both)"),
    "n_epochs": _s("int", "epochs"),
    "peak_lr": _s("float"),
    "min_lr": _s("float"),
    "n_warmup_steps": _s("int"),
    "scheduler_type": _s("str", choices=SCHEDULERS),
    "cosine_min_ratio": _s("float", "warmup_cosine: final lr / peak_lr (DeepSpeed cos_min_ratio)"),
    "weight_decay": _s("float", "AdamW decay, not applied to biases"),
    "adam_betas": _s("seq", elem="float", n=2),
    "adam_eps": _s("float"),
    "grad_clip": _s("float", "global-norm clip (0: off)"),
    "loss_normalization": _s("str", "'micro_batch_mean': token mean per micro-batch, averaged (original); "
                                    "'token_weighted': mean over all loss tokens of the step",
                             choices=LOSS_NORMALIZATIONS),
    "seed": _s("int"),
    # validation-time diagnostics
    "ode_solver": _s("str", "ODE method (becomes ode_kwargs)", choices=ODE_SOLVERS),
    "ode_solver_atol": _s("float"),
    "ode_solver_rtol": _s("float"),
    "compute_nstep_loss": _s("int", "validation loss after an ODE of this many grid points (<= 0: off)"),
    "num_t_bins": _s("int", "log the loss in this many t bins (0: off)"),
    "compute_diff_at_training": _s("bool", "also log the loss without the flow path"),
    # logging / saving
    "log_interval": _s("int", "steps between train-metric logs"),
    "validate_interval": _s("int", "steps between validations"),
    "save_model_interval": _s("int", "steps between checkpoints (a multiple of validate_interval)"),
    "save_dir": _s("str", "runs go to <save_dir>/<run name>"),
    "save_model": _s("bool"),
    "save_log": _s("bool"),
    "keep_checkpoints": _s("int", "checkpoints kept (oldest deleted)"),
    "profile_steps": _s("int", "trace this many steps after the first one (0: off)"),
    "save_wandb": _s("bool"),
    "wandb_project": _s("str"),
    "wandb_run_name": _s("str", "run name; '/' becomes '_' in directory names", nullable=True),
    "wandb_group_name": _s("str", nullable=True),
    # devices
    "mesh": _s("dict", "mesh axis sizes data / fsdp / tensor (one may be -1)"),
    "sharding_rules": _s("dict", "logical axis -> mesh axis overrides (l2d_jax.sharding.RULES)"),
}


def _spec_from_annotation(name: str, annotation: str) -> Spec:
    parts = [p.strip() for p in str(annotation).split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    if sorted(parts) == ["float", "str"]:
        return Spec("float_or_str", "L2D setting", nullable=nullable)
    if len(parts) == 1 and parts[0] in ("bool", "int", "float", "str"):
        return Spec(parts[0], "L2D setting", nullable=nullable)
    raise TypeError(f"L2DSettings.{name}: cannot map annotation {annotation!r} to a config type")


# Every L2DSettings field except ode_kwargs (built from ode_solver*), under its own name.
L2D_KEYS = tuple(f.name for f in dataclasses.fields(L2DSettings) if f.name != "ode_kwargs")
L2D_SCHEMA: dict[str, Spec] = {
    f.name: _spec_from_annotation(f.name, f.type)
    for f in dataclasses.fields(L2DSettings) if f.name != "ode_kwargs"}

SCHEMA: dict[str, Spec] = {**TRAINING_SCHEMA, **L2D_SCHEMA}

# Values that load as special base models.
RANDOM_TINY = "random:tiny"
SMOLLM2_GGUF = "smollm2-gguf"


# --------------------------------------------------------------------------- loading


def sibling_config(config_file: str, name: str) -> types.ModuleType:
    """The config module ``name`` next to ``config_file`` (how configs import ``base``)."""
    path = Path(config_file).resolve().parent / f"{name}.py"
    return _load_module(path)


def _load_module(path: Path) -> types.ModuleType:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    mod_name = "l2d_config_" + re.sub(r"\W", "_", str(path))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(mod_name, None)
        raise
    return module


def split_config_arg(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``configs/x.py:arg`` -> (configs/x.py, "arg"); a plain path -> (path, None)."""
    s = str(path)
    if not Path(s).exists() and ":" in s:
        head, arg = s.rsplit(":", 1)
        if head.endswith(".py"):
            return Path(head), arg
    return Path(s), None


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (), *, validate: bool = True,
                num_devices: int | None = None, process_count: int | None = None
                ) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of a config file, with ``--config.key=value`` overrides applied and
    (by default) validated. Errors are ``ConfigError`` naming the file and key."""
    file, arg = split_config_arg(path)
    module = _load_module(file.resolve())
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file} defines no get_config(arg=None)")
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except (TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{file}: get_config failed: {e}") from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{file}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    apply_overrides(cfg, overrides)
    if validate:
        validate_config(cfg, num_devices=num_devices, process_count=process_count)
    return cfg


# Keys added after runs were written, each with the value that reproduces those runs: a run's
# stored config.json (a workdir) that lacks one gets it (``stored_config``).
ADDED_KEYS = {"remat_policy": None}


def stored_config(values: dict) -> ml_collections.ConfigDict:
    """A run's stored config (``WORKDIR/config.json``) with the keys added since it was
    written (``ADDED_KEYS``) filled in."""
    return new_config({**ADDED_KEYS, **values})


def new_config(values: dict) -> ml_collections.ConfigDict:
    """A ConfigDict for the schema: types are checked by ``validate_config``, not on assignment
    (so a float key may take ``polynomial_...`` where the schema allows it)."""
    cfg = ml_collections.ConfigDict(type_safe=False)
    for k, v in values.items():
        if isinstance(v, dict):
            v = ml_collections.ConfigDict(v, type_safe=False)
        setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------- overrides


_OVERRIDE = re.compile(r"^(?:--)?(?:config\.)?([A-Za-z_][\w.]*)=(.*)$", re.S)


def _closest(key: str, known: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _str2bool(key: str, v: str) -> bool:
    lv = v.strip().lower()
    if lv in ("true", "t", "yes", "y", "1"):
        return True
    if lv in ("false", "f", "no", "n", "0"):
        return False
    raise ConfigError(f"{key}={v!r}: expected bool (true/false)")


def _parse_scalar(key: str, kind: str, raw: str) -> Any:
    try:
        if kind == "bool":
            return _str2bool(key, raw)
        if kind == "int":
            try:
                return int(raw)
            except ValueError:
                f = float(raw)
                if f.is_integer():
                    return int(f)
                raise
        if kind == "float":
            return float(raw)
        if kind == "float_or_str":
            try:
                return float(raw)
            except ValueError:
                return raw
        return raw
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected {kind}") from None


def parse_value(key: str, spec: Spec, raw: str) -> Any:
    """``raw`` (command-line text) as a value of ``spec``."""
    text = raw.strip()
    if spec.nullable and text in ("None", "none", "null"):
        return None
    if spec.kind == "seq":
        if text in ("", "()", "[]"):
            return ()
        if text[0] in "[(":
            try:
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ConfigError(f"{key}={raw!r}: not a valid list literal") from None
            items = [items] if isinstance(items, (str, int, float)) else list(items)
            return tuple(x if spec.elem == "str" and isinstance(x, str)
                         else _parse_scalar(key, spec.elem, str(x)) for x in items)
        return tuple(_parse_scalar(key, spec.elem, x.strip()) for x in text.split(","))
    return _parse_scalar(key, spec.kind, text)


def _parse_rule(raw: str):
    text = raw.strip()
    if text in ("None", "none", "null", ""):
        return None
    if text[0] in "[(":
        return tuple(ast.literal_eval(text))
    return tuple(x.strip() for x in text.split(",")) if "," in text else text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Applies ``[--][config.]key=value`` strings in order; values are parsed with the key's type."""
    for item in overrides or ():
        m = _OVERRIDE.match(item.strip())
        if not m:
            raise ConfigError(f"override {item!r}: expected --config.KEY=VALUE")
        path, raw = m.group(1), m.group(2)
        head, _, sub = path.partition(".")
        if head not in SCHEMA:
            raise ConfigError(f"override {item!r}: unknown key {head!r}{_closest(head, SCHEMA)}")
        spec = SCHEMA[head]
        if spec.kind == "dict":
            if not sub:
                raise ConfigError(f"override {item!r}: {head} is a group; set {head}.NAME=VALUE")
            group = cfg.get(head)
            if group is None:
                group = ml_collections.ConfigDict(type_safe=False)
                setattr(cfg, head, group)
            if head == "mesh":
                if sub not in MESH_KEYS:
                    raise ConfigError(f"override {item!r}: unknown mesh axis {sub!r}"
                                      f"{_closest(sub, MESH_KEYS)}")
                value = _parse_scalar(path, "int", raw)
            else:
                value = _parse_rule(raw)
            _set(group, sub, value)
            continue
        if sub:
            raise ConfigError(f"override {item!r}: {head} is not a group")
        _set(cfg, head, parse_value(head, spec, raw))
    return cfg


def _set(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    try:
        setattr(cfg, key, value)
    except TypeError:  # a type-safe ConfigDict from a hand-written config: replace the field
        with cfg.unlocked():
            del cfg[key]
            setattr(cfg, key, value)


# --------------------------------------------------------------------------- validation


def _type_ok(spec: Spec, value: Any) -> tuple[bool, Any]:
    """(ok, normalised value): ints widen to float, lists become tuples."""
    if value is None:
        return spec.nullable, value
    k = spec.kind
    if k == "bool":
        return isinstance(value, bool), value
    if k == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if k == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if k == "str":
        return isinstance(value, str), value
    if k == "float_or_str":
        if isinstance(value, str):
            return True, value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if k == "seq":
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False, value
        elem = Spec(spec.elem)
        out = []
        for x in value:
            ok, x = _type_ok(elem, x)
            if not ok:
                return False, value
            out.append(x)
        if spec.n is not None and len(out) != spec.n:
            return False, value
        return True, tuple(out)
    if k == "dict":
        return isinstance(value, (ml_collections.ConfigDict, dict)), value
    return True, value


def _describe_value(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def data_parallel_size(cfg, num_devices: int | None = None) -> int:
    """Devices the batch is split over: mesh data x fsdp (a -1 axis fills the devices)."""
    mesh = cfg.mesh
    sizes = [int(mesh.get(k, 1)) for k in MESH_KEYS]
    if -1 in sizes:
        if num_devices is None:
            import jax

            num_devices = jax.device_count()
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide by the fixed axes "
                              f"(product {known})")
        sizes[sizes.index(-1)] = num_devices // known
    return sizes[0] * sizes[1]


def accumulation_steps(cfg, num_devices: int | None = None) -> int:
    """Micro-steps per optimizer step: n_samples_before_backprop / (micro_batch_size x data parallel)."""
    return cfg.n_samples_before_backprop // (cfg.micro_batch_size * data_parallel_size(cfg, num_devices))


def batch_size_per_host(cfg, split: str = "train", num_devices: int | None = None,
                        process_count: int | None = None) -> int:
    """Rows each host feeds per micro-step (micro batch x data-parallel devices / hosts)."""
    if process_count is None:
        import jax

        process_count = jax.process_count()
    micro = cfg.micro_batch_size if split == "train" else cfg.micro_valid_batch_size
    total = micro * data_parallel_size(cfg, num_devices)
    if total % process_count:
        raise ConfigError(f"{'micro_batch_size' if split == 'train' else 'micro_valid_batch_size'}={micro} x "
                          f"data-parallel size {data_parallel_size(cfg, num_devices)} = {total} rows per "
                          f"micro-step do not divide over {process_count} hosts")
    return total // process_count


def total_training_steps(cfg, n_train_examples: int) -> int:
    """Optimizer steps: n_epochs x ceil(examples / n_samples_before_backprop), capped by a
    positive n_training_steps (the original takes the minimum of the two)."""
    per_epoch = max(1, math.ceil(n_train_examples / cfg.n_samples_before_backprop))
    from_epochs = per_epoch * cfg.n_epochs
    return from_epochs if cfg.n_training_steps <= 0 else min(cfg.n_training_steps, from_epochs)


def validate_config(cfg, *, num_devices: int | None = None, process_count: int | None = None):
    """Checks everything that can be checked before building a model; raises ``ConfigError``
    listing every problem (each names its key). Normalises in place (ints in float keys become
    floats, lists tuples) and returns ``cfg``. ``num_devices`` defaults to ``jax.device_count()``
    (only needed when a mesh axis is -1); ``process_count`` to ``jax.process_count()``."""
    errors: list[str] = []
    keys = list(cfg.keys())
    for k in keys:
        if k not in SCHEMA:
            errors.append(f"unknown key {k!r}{_closest(k, SCHEMA)}")
    for k in SCHEMA:
        if k not in keys:
            errors.append(f"missing key {k!r} (configs should start from configs/base.py)")
    for k, spec in SCHEMA.items():
        if k not in keys:
            continue
        ok, value = _type_ok(spec, cfg[k])
        if not ok:
            errors.append(f"{k}: expected {spec.describe()}, got {_describe_value(cfg[k])}")
            continue
        if value is not cfg[k] and spec.kind != "dict":
            _set(cfg, k, value)
        if spec.choices and value is not None and value not in spec.choices:
            errors.append(f"{k}={value!r}: expected one of {list(spec.choices)}"
                          f"{_closest(str(value), map(str, spec.choices))}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    errors += _check_values(cfg)
    if not errors:
        try:
            l2d_settings(cfg)
        except (SettingsError, ConfigError) as e:
            errors.append(f"L2D settings: {e}")
    if not errors:
        errors += _check_batch(cfg, num_devices, process_count)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def _check_values(cfg) -> list[str]:
    errors = []
    if not cfg.pretrained_model_dir:
        errors.append("pretrained_model_dir is empty: set it (a hub id, a local path, 'random:tiny', ...)")
    for k in ("micro_batch_size", "micro_valid_batch_size", "n_samples_before_backprop", "n_epochs",
              "max_seq_len", "log_interval", "validate_interval", "save_model_interval",
              "seq_len_bucket_size", "keep_checkpoints"):
        if cfg[k] < 1:
            errors.append(f"{k}={cfg[k]}: must be >= 1")
    if cfg.n_training_steps == 0 or cfg.n_training_steps < -1:
        errors.append(f"n_training_steps={cfg.n_training_steps}: use -1 (from n_epochs) or a positive count")
    if cfg.n_warmup_steps < 0:
        errors.append(f"n_warmup_steps={cfg.n_warmup_steps}: must be >= 0")
    if cfg.profile_steps < 0:
        errors.append(f"profile_steps={cfg.profile_steps}: must be >= 0")
    if not 0 < cfg.min_lr <= cfg.peak_lr:
        errors.append(f"min_lr={cfg.min_lr}, peak_lr={cfg.peak_lr}: need 0 < min_lr <= peak_lr")
    if cfg.validate_interval >= 1 and cfg.save_model_interval % cfg.validate_interval:
        errors.append(f"save_model_interval={cfg.save_model_interval} must be a multiple of "
                      f"validate_interval={cfg.validate_interval} (as in the original)")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.adam_eps <= 0:
        errors.append("weight_decay and grad_clip must be >= 0 and adam_eps > 0")
    if not all(0 <= b < 1 for b in cfg.adam_betas):
        errors.append(f"adam_betas={cfg.adam_betas}: each must be in [0, 1)")
    if not cfg.train_filepaths:
        errors.append("train_filepaths is empty")
    buckets = cfg.seq_len_buckets
    if buckets:
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            errors.append(f"seq_len_buckets={buckets}: must be positive and strictly increasing")
        elif buckets[-1] < cfg.max_seq_len:
            errors.append(f"seq_len_buckets={buckets}: the largest ({buckets[-1]}) must be >= "
                          f"max_seq_len={cfg.max_seq_len}")
    if cfg.use_data_split_guidance:
        cats = list(cfg.guidance_categories)
        if not cats:
            errors.append("use_data_split_guidance=True needs guidance_categories (e.g. "
                          f"{list(SHARED_TASKS)})")
        bad = [c for c in cats if c not in SHARED_TASKS]
        if bad:
            errors.append(f"guidance_categories: {bad} not among {list(SHARED_TASKS)}")
        if len(set(cats)) != len(cats):
            errors.append(f"guidance_categories={cats}: duplicates")
    mesh = cfg.mesh
    for k in mesh.keys():
        if k not in MESH_KEYS:
            errors.append(f"mesh.{k}: unknown mesh axis{_closest(k, MESH_KEYS)}; axes are {list(MESH_KEYS)}")
    sizes = [mesh.get(k, 1) for k in MESH_KEYS]
    if not all(isinstance(s, int) and not isinstance(s, bool) and (s >= 1 or s == -1) for s in sizes):
        errors.append(f"mesh={dict(mesh)}: sizes must be positive ints or -1")
    elif sizes.count(-1) > 1:
        errors.append(f"mesh={dict(mesh)}: at most one axis may be -1")
    for name, target in cfg.sharding_rules.items():
        flat = target if isinstance(target, (tuple, list)) else (target,)
        if any(t is not None and t not in MESH_KEYS for t in flat):
            errors.append(f"sharding_rules.{name}={target!r}: mesh axes are {list(MESH_KEYS)} (or None)")
    return errors


def _check_batch(cfg, num_devices, process_count) -> list[str]:
    try:
        dp = data_parallel_size(cfg, num_devices)
    except ConfigError as e:
        return [str(e)]
    errors = []
    per_step = cfg.micro_batch_size * dp
    if cfg.n_samples_before_backprop % per_step:
        errors.append(
            f"n_samples_before_backprop={cfg.n_samples_before_backprop} is not divisible by "
            f"micro_batch_size={cfg.micro_batch_size} x data-parallel size {dp} (mesh data x fsdp) = "
            f"{per_step}; use a multiple of {per_step} or change micro_batch_size / mesh")
    if process_count is None:
        import jax

        process_count = jax.process_count()
    for key in ("micro_batch_size", "micro_valid_batch_size"):
        rows = cfg[key] * dp
        if rows % process_count:
            errors.append(f"{key}={cfg[key]} x data-parallel size {dp} = {rows} rows do not divide over "
                          f"{process_count} hosts")
    return errors


# --------------------------------------------------------------------------- L2D settings


def ode_kwargs(cfg) -> dict:
    """The original's build_ode_solver: method (heun -> heun2), atol, rtol."""
    method = "heun2" if cfg.ode_solver == "heun" else cfg.ode_solver
    return {"atol": float(cfg.ode_solver_atol), "method": method, "rtol": float(cfg.ode_solver_rtol)}


def l2d_settings(cfg) -> L2DSettings:
    """``L2DSettings`` of a config (validated; contradictions raise ``SettingsError``)."""
    d = {k: cfg[k] for k in L2D_KEYS}
    n_cls = d.get("guidance_modulation_num_classes")
    if cfg.use_data_split_guidance:
        n = len(cfg.guidance_categories)
        if n_cls not in (None, 0, n):
            raise ConfigError(f"guidance_modulation_num_classes={n_cls} contradicts use_data_split_guidance "
                              f"with {n} guidance_categories (leave it 0: it is derived)")
        d["guidance_modulation_num_classes"] = n
    elif n_cls:
        raise ConfigError(f"guidance_modulation_num_classes={n_cls} needs use_data_split_guidance=True "
                          "(with guidance_categories); set it to 0")
    else:
        d["guidance_modulation_num_classes"] = 0
    d["ode_kwargs"] = ode_kwargs(cfg)
    return L2DSettings.from_dict(d)


# --------------------------------------------------------------------------- names


def run_name(cfg, config_path: str | os.PathLike | None = None) -> str:
    """``wandb_run_name`` with '/' replaced by '_', else the config file stem (no timestamp)."""
    if cfg.get("wandb_run_name"):
        return cfg.wandb_run_name.strip("/").replace("/", "_")
    if config_path is None:
        return "model"
    file, _ = split_config_arg(config_path)
    return file.stem


def default_workdir(cfg, config_path: str | os.PathLike | None = None) -> Path:
    """``<save_dir>/<run name>`` (save_dir defaults to ./experiments/lad/)."""
    return Path(cfg.get("save_dir") or "./experiments/lad/") / run_name(cfg, config_path)


# --------------------------------------------------------------------------- base model


# The tiny random Llama of tests/jax_tiny.py (shapes), built inside the package.
TINY_HF_CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False)
TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
TINY_CHARS = ("\n " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789"
              + ".,:;?!'\"()+-*/=#<>_")
TINY_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer (ids < 96) with a chat template, built offline.

    Specials: <unk> 0, <s> (BOS) 1, </s> (EOS, also pad) 2, role markers 3-5; then one id per
    character of ``TINY_CHARS``; unknown characters map to <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + tuple(TINY_CHARS))}
    assert len(vocab) <= TINY_HF_CONFIG["vocab_size"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(TINY_SPECIALS))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="</s>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok
