"""Task registry. ``TASKS`` maps a task name to its class; ``get_task(name, **kw)`` builds one.

A task module registers itself with the :func:`register` decorator; a module listed in
``_TASK_MODULES`` is imported the first time the registry is read, so adding a task is one
line there (or an import of a module that uses ``@register``)."""

from __future__ import annotations

import importlib

from l2d_jax.errors import L2DError
from l2d_jax.evaluation.tasks.base import Example, Task, load_records, render_prompt

TASKS: dict[str, type] = {}

# Modules imported lazily by get_task()/task_names(); each must exist (an import error is raised).
_TASK_MODULES: list[str] = [
    "l2d_jax.evaluation.tasks.humaneval",
    "l2d_jax.evaluation.tasks.mbpp",
    "l2d_jax.evaluation.tasks.gsm8k",
    "l2d_jax.evaluation.tasks.mmlu",
    "l2d_jax.evaluation.tasks.mmlu_pro",
    "l2d_jax.evaluation.tasks.math_task",
    "l2d_jax.evaluation.tasks.arc",
    "l2d_jax.evaluation.tasks.piqa",
    "l2d_jax.evaluation.tasks.arithmetic",
]
_loaded = False


def register(cls: type) -> type:
    """Class decorator: ``TASKS[cls.name] = cls``."""
    TASKS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _TASK_MODULES:
        importlib.import_module(mod)


def task_names() -> list[str]:
    _load_all()
    return sorted(TASKS)


def get_task(name: str, **kw) -> Task:
    """``get_task("mbpp", source=None, limit=None, **task_options)``."""
    _load_all()
    if name not in TASKS:
        raise L2DError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kw)


__all__ = ["TASKS", "Example", "Task", "get_task", "load_records", "register", "render_prompt",
           "task_names"]
