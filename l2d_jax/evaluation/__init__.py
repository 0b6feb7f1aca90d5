"""Evaluation: tasks (``l2d_jax.evaluation.tasks``), the code sandbox and pass@k."""

from __future__ import annotations

from l2d_jax.evaluation.passk import aggregate_pass_at_k, pass_at_k
from l2d_jax.evaluation.sandbox import SandboxUnavailable, execute, sandbox_status

__all__ = ["SandboxUnavailable", "aggregate_pass_at_k", "execute", "pass_at_k", "sandbox_status"]
