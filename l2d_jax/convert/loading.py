"""One entry point for every model source: HF directory, GGUF file, converted checkpoint.

``load(path)`` -> (LLM, tokenizer or None); ``convert(kind, src, out_dir)`` writes the
checkpoint layout of ``l2d_jax.checkpoint`` from an HF directory or a GGUF file.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from flax import nnx

from l2d_jax import checkpoint
from l2d_jax.errors import L2DError
from l2d_jax.models.llm import LLM, LLMConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
CONVERT_KINDS = ("hf", "gguf")


def source_kind(path: str | os.PathLike) -> str:
    """"gguf" (a .gguf file), "converted" (has l2d_jax.json) or "hf" (has config.json)."""
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


def load(path: str | os.PathLike, dtype: str = "float32", param_dtype: str | None = None):
    """(model, tokenizer or None) from an HF dir, a .gguf file or a converted checkpoint dir.

    The model is an ``LLM``, or an ``L2DModel`` for a converted checkpoint of kind "l2d".
    Parameters end up in ``param_dtype`` (default ``dtype``), computation runs in ``dtype``.
    """
    kind = source_kind(path)
    if kind == "gguf":
        from l2d_jax.convert.gguf import load_gguf

        model, _, tokenizer = load_gguf(path, dtype=dtype, param_dtype=param_dtype)
        return model, tokenizer
    if kind == "hf":
        from l2d_jax.convert.hf import load_hf

        model, _ = load_hf(path, dtype=dtype, param_dtype=param_dtype)
        return model, load_tokenizer(path)
    if checkpoint.read_manifest(path)["kind"] == "l2d":
        from l2d_jax.convert.l2d_torch import load_l2d

        return load_l2d(path, dtype=dtype, param_dtype=param_dtype)
    model, _ = load_converted_base(path, dtype=dtype, param_dtype=param_dtype)
    return model, load_tokenizer(path)


def load_converted_base(ckpt_dir: str | os.PathLike, dtype: str = "float32",
                        param_dtype: str | None = None, shardings=None) -> tuple[LLM, dict]:
    """(base LLM, manifest) of a converted checkpoint; params restored straight into
    ``param_dtype`` and, when given, ``shardings`` (a pure dict of shardings like the params)."""
    manifest = checkpoint.read_manifest(ckpt_dir)
    cfg = LLMConfig.from_hf(manifest["hf_config"], dtype=dtype, param_dtype=param_dtype)
    graphdef, state, target = abstract_llm(cfg, shardings)
    nnx.replace_by_pure_dict(state, checkpoint.restore_params(ckpt_dir, "base", target))
    return nnx.merge(graphdef, state), manifest


def abstract_llm(cfg: LLMConfig, shardings=None):
    """(graphdef, abstract state, pure dict of ShapeDtypeStruct) of an LLM, built without memory.

    Leaves carry ``shardings`` (a matching pure dict) or the default device.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(state)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), pure)
    else:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              pure, shardings)
    return graphdef, state, target


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of an HF dir, a .gguf file or a converted dir; None when there is none."""
    kind = source_kind(path)
    if kind == "gguf":
        from l2d_jax.convert.gguf import gguf_tokenizer

        return gguf_tokenizer(path)
    directory = Path(path) / checkpoint.TOKENIZER_DIR if kind == "converted" else Path(path)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def convert(kind: str, src: str | os.PathLike, out_dir: str | os.PathLike, *,
            dtype: str = "float32", overwrite: bool = False) -> Path:
    """Converts an HF directory (kind "hf") or a GGUF file (kind "gguf") into a checkpoint dir.

    Parameters are stored in ``dtype``. Nothing is left at ``out_dir`` when this fails.
    """
    if kind not in CONVERT_KINDS:
        raise ValueError(f"convert kind must be one of {CONVERT_KINDS}, got {kind!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    checkpoint.check_output_dir(out_dir, overwrite)  # fail before the slow part
    if kind == "hf":
        from l2d_jax.convert.hf import load_hf

        if source_kind(src) != "hf":
            raise L2DError(f"{src} is not a Hugging Face model directory")
        model, hf_config = load_hf(src, dtype=dtype)
        tokenizer = load_tokenizer(src)
    else:
        from l2d_jax.convert.gguf import load_gguf

        if source_kind(src) != "gguf":
            raise L2DError(f"{src} is not a .gguf file")
        model, hf_config, tokenizer = load_gguf(src, dtype=dtype)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
    return checkpoint.save_checkpoint(out_dir, base_params=params, hf_config=hf_config,
                                      tokenizer=tokenizer, kind="base", dtype=dtype,
                                      overwrite=overwrite)


# --------------------------------------------------------------------------- any source


def _hub_or_path(spec: str) -> str:
    p = Path(spec).expanduser()
    if p.exists():
        return str(p)
    from l2d_jax.config import resolve_model_path

    return resolve_model_path(spec)


def model_kind(ckpt) -> str:
    """"l2d" (converted L2D checkpoint), "workdir" (a training workdir or one of its
    ``checkpoints/<step>``), "base" (HF dir, .gguf, converted base checkpoint) or "hub"
    (not a local path: a hub id of a base model)."""
    from l2d_jax import checkpoint

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
                  tokenizer_dir: str | None = None):
    """(model, tokenizer, description) for ``ckpt``: a converted L2D checkpoint (kind "l2d":
    an ``L2DModel``), a training workdir or one of its ``checkpoints/<step>`` (its export when
    the run finished, else the newest checkpoint: ``l2d_jax.train.loop.load_trained``), or a
    base model (HF directory or hub id, ``.gguf`` file, converted base checkpoint: an ``LLM``,
    step 0 only)."""
    kind = model_kind(ckpt)
    desc = {"ckpt": str(ckpt), "kind": "l2d" if kind in ("l2d", "workdir") else "base"}
    if kind == "l2d":
        from l2d_jax.convert.l2d_torch import load_l2d

        model, tok = load_l2d(Path(ckpt).expanduser(), dtype=dtype, param_dtype=param_dtype)
    elif kind == "workdir":
        try:
            from l2d_jax.train.loop import latest_export_or_checkpoint, load_trained
        except ImportError as e:  # pragma: no cover - present in a full install
            raise L2DError(f"{ckpt} looks like a training workdir, but l2d_jax.train.loop (needed to "
                           "read it) is not available; pass an exported checkpoint directory") from e
        p = Path(ckpt).expanduser()
        if (p / "state").is_dir():
            desc["resolved"] = str(p)
        else:
            desc["resolved"] = str(latest_export_or_checkpoint(p))
        model, tok = load_trained(p, dtype=dtype, param_dtype=param_dtype)
    else:
        path = _hub_or_path(str(ckpt))
        model, tok = load(path, dtype=dtype, param_dtype=param_dtype)
    return model, _tokenizer(tok, tokenizer_dir, ckpt), desc


def _tokenizer(tok, tokenizer_dir, path):
    if tokenizer_dir:
        from l2d_jax.config import load_tokenizer

        return load_tokenizer(tokenizer_dir)
    if tok is None:
        raise L2DError(f"{path} has no tokenizer; set tokenizer_dir (--config.tokenizer_dir=PATH)")
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
