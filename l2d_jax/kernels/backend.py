"""Which CPU kernels a traced program may use: chosen once, outside the models.

``Kernels`` is a small frozen (hashable) value that the model code takes as a static
argument; a jitted function that receives it as a static argument (``GenerateOptions``
carries the resolved value) recompiles when it changes, so switching backends needs no
``jax.clear_caches()``. The default everywhere is ``XLA`` (no custom call), so training,
sharded programs and ahead-of-time TPU compiles never see one.

``resolve(name, cfg)`` turns a backend name into ``Kernels``:

- ``"xla"``: XLA's own ops only.
- ``"cpu"``: every kernel (``cpu_matvec``, ``cpu_attention``, ``cpu_decoder``) where the
  shapes allow it; raises when they cannot run here (not a single CPU device, compute dtype
  not float32, no kernel library).
- ``"auto"`` (default): ``"cpu"`` on a single CPU device with a float32 model and a built
  library, ``"xla"`` otherwise. The switches ``L2D_CPU_MATVEC=0``, ``L2D_CPU_ATTENTION=0``
  and ``L2D_CPU_DECODER=0`` turn single kernels off (read here, at resolve time).

A kernel that does not implement a feature of the model's decoder block is refused for
that model with a logged reason (``cpu_decoder.unsupported``): the program then runs the
scanned block with XLA's ops for that part.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax

from l2d_jax.errors import L2DError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xla", "cpu")
SWITCHES = {"matvec": "L2D_CPU_MATVEC", "attention": "L2D_CPU_ATTENTION", "decoder": "L2D_CPU_DECODER"}


class KernelBackendError(L2DError, ValueError):
    """A kernel backend that cannot run here (named, with the reason and the fix)."""


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The CPU custom calls a program may use (each still only where its shapes fit)."""

    matvec: bool = False  # few-row float32 products (cpu_matvec)
    attention: bool = False  # few-row attention over the stacked cache, in place (cpu_attention)
    decoder: bool = False  # a one-position step through the whole layer stack (cpu_decoder)


XLA = Kernels()


def _cpu_problem(dtype: str) -> str | None:
    """Why the CPU kernels cannot run here, or None."""
    from l2d_jax.kernels import library

    if jax.default_backend() != "cpu":
        return f"the default JAX backend is {jax.default_backend()!r}, not cpu"
    if jax.device_count() != 1:
        return f"{jax.device_count()} devices (a custom call has no SPMD partitioning rule)"
    if str(dtype) != "float32":
        return f"the model computes in {dtype} (the kernels are float32)"
    if not library.load():
        return "the kernel library did not build (see the warning; install a C++ compiler)"
    return None


def host_kernels(dtype: str = "float32") -> Kernels:
    """The kernels "auto" turns on here for a model computing in ``dtype``, before the
    architecture check: XLA where they cannot run, else each unless its switch is ``0``."""
    if _cpu_problem(dtype) is not None:
        return XLA
    return Kernels(**{k: os.environ.get(env, "1") != "0" for k, env in SWITCHES.items()})


_refusals_logged: set[str] = set()


def resolve(name: str, cfg) -> Kernels:
    """``Kernels`` for backend ``name`` and a model of ``LLMConfig`` ``cfg`` (see the module doc)."""
    if name not in BACKENDS:
        raise KernelBackendError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    if name == "xla":
        return XLA
    problem = _cpu_problem(cfg.dtype)
    if problem is not None and name == "cpu":
        raise KernelBackendError(f"kernel backend 'cpu' cannot run here: {problem}; use 'auto' or 'xla'")
    kernels = host_kernels(cfg.dtype)
    if kernels.decoder:
        from l2d_jax.kernels import cpu_decoder

        reason = cpu_decoder.unsupported(cfg)
        if reason is not None:
            if reason not in _refusals_logged:  # once per reason, not per generate call
                _refusals_logged.add(reason)
                log.warning("cpu_decoder kernel refused for this model (%s): its steps run the scanned block",
                            reason)
            kernels = dataclasses.replace(kernels, decoder=False)
    return kernels
