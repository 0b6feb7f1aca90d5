"""JAX's persistent compilation cache, so that restarts and repeated CLI calls skip XLA compiles.

The cache lives in ``$L2D_JAX_CACHE_DIR`` (default ``~/.cache/l2d_jax/xla``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV_VAR = "L2D_JAX_CACHE_DIR"
DEFAULT_DIR = Path("~/.cache/l2d_jax/xla")


def cache_dir() -> Path:
    """The configured cache directory (not created)."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at ``path`` (default: ``cache_dir()``).

    Returns the directory, or None (with a warning) when it cannot be created.
    """
    import jax

    directory = Path(path).expanduser() if path is not None else cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache disabled: cannot create {directory}: {e}", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory
