"""User-facing errors. The CLI prints them as one line ``error: ...`` and exits with code 2."""

from __future__ import annotations


class L2DError(Exception):
    """A problem with the user's input (paths, files, configs), not a bug in l2d-jax."""


class UsageError(L2DError, ValueError):
    """A value the user chose (a CLI flag, a config or model setting) that cannot work; the
    message names the value and what would. (A ValueError too, for callers of the library.)"""
