"""Shared fixtures. Nothing heavy at import: torch / transformers load inside fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # for `import tiny_models`
    sys.path.insert(0, str(TESTS_DIR))

from gcs_emulator import gcs  # noqa: E402, F401  (fixture: fake-gcs-server on 127.0.0.1)

_SHARED_GOLDENS = Path("/work/shared/goldens")


def golden_sets() -> list[Path]:
    """Every golden set folder (``<set>/base/`` + ``cases.npz``) under tests/goldens, else the
    shared copy."""
    for root in (TESTS_DIR / "goldens", _SHARED_GOLDENS):
        sets = sorted(p for p in root.glob("*") if (p / "base" / "config.json").is_file()
                      and (p / "cases.npz").is_file())
        if sets:
            return sets
    return []


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache_in_tmp(tmp_path_factory):
    """``cli.main`` enables JAX's persistent compilation cache; keep it out of ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("L2D_JAX_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
        yield


@pytest.fixture(scope="session")
def tiny_torch_models():
    """name -> seeded tiny torch model (see tests/tiny_models.py)."""
    pytest.importorskip("torch")
    import tiny_models

    return {name: tiny_models.build(name) for name in tiny_models.CONFIGS}


@pytest.fixture(scope="session")
def tiny_hf_dirs(tiny_torch_models, tmp_path_factory):
    """name -> HF directory (safetensors, with a tiny tokenizer). The llama3 model's config.json
    uses hub-style ``rope_theta`` + ``rope_scaling``; the others are transformers-5 style."""
    import tiny_models

    root = tmp_path_factory.mktemp("tiny_hf")
    return {name: tiny_models.save(model, root / name, rope_hub_style=(name == "llama_llama3_tied"),
                                   tokenizer=tiny_models.tiny_tokenizer())
            for name, model in tiny_torch_models.items()}


@pytest.fixture(scope="session")
def tiny_sharded_dir(tiny_torch_models, tmp_path_factory):
    """``llama_gqa`` saved as several safetensors shards with an index."""
    import tiny_models

    return tiny_models.save(tiny_torch_models["llama_gqa"], tmp_path_factory.mktemp("sharded") / "m",
                            max_shard_size="40KB")
