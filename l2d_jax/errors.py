"""User-facing errors. The CLI prints them as one line ``error: ...`` and exits with code 2."""

from __future__ import annotations


class L2DError(Exception):
    """A problem with the user's input (paths, files, configs), not a bug in l2d-jax."""
