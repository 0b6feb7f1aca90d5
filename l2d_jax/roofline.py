"""FLOPs and memory traffic of a traced program, loop trip counts included (``l2d-jax plan``).

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, whatever its trip count
(checked on a TPU compile: a ``scan`` of 1 and of 10 matmuls report the same FLOPs), and our
programs are loops: decoder layers, micro-steps, generated tokens, ODE steps. So the roofline
of a program is counted here on its jaxpr instead, where every loop's length is known (``scan``)
or given (``while``: the caller passes the trip count of each nesting depth, e.g. generated
tokens, then ODE steps). Counted:

- ``flops``: 2 x (output elements) x (contracted size) of every ``dot_general``, the
  dominant cost of a transformer; element-wise work is left out.
- bytes: the operands and outputs of every ``dot_general``, the HBM traffic of a program
  whose element-wise work is fused into its matmuls. Operands that are (slices, casts,
  reshapes of) the program's parameters are counted apart (``param_bytes``), because a
  device reads its tensor-parallel share of a weight whatever its data-parallel share of the
  batch is.
- ``lax.cond``: its most expensive branch; ``remat`` / ``jit`` / custom-derivative calls:
  their bodies (a rematerialised forward appears in the backward pass and is counted there).

``per_device`` turns the global counts into one device's: FLOPs and activation bytes divided
by the devices, parameter bytes by the tensor-parallel size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# primitives whose output is still "a parameter" when an input is (layout and dtype changes)
_LAYOUT = {"convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
           "slice", "dynamic_slice", "gather", "copy", "copy_p", "sharding_constraint", "concatenate",
           "optimization_barrier"}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Global (whole-mesh) counts of a program."""

    flops: float = 0.0
    param_bytes: float = 0.0  # matmul operands read from the parameters
    activation_bytes: float = 0.0  # other matmul operands and all matmul outputs

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.param_bytes + o.param_bytes, self.activation_bytes + o.activation_bytes)

    def __mul__(self, n: float) -> "Cost":
        return Cost(self.flops * n, self.param_bytes * n, self.activation_bytes * n)

    def per_device(self, num_devices: int, tensor: int) -> tuple[float, float]:
        """(FLOPs, bytes) of one device (see the module doc)."""
        return (self.flops / num_devices,
                self.param_bytes / max(tensor, 1) + self.activation_bytes / num_devices)


def _nbytes(aval) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _inner(eqn):
    """(jaxpr, consts-free) of a call-like eqn whose invars map 1:1 onto the body's, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is not None:
            return getattr(j, "jaxpr", j)
    return None


def _walk(jaxpr, is_param: Sequence[bool], trips: Sequence[int], depth: int) -> tuple[Cost, list[bool]]:
    """(cost, which outvars are parameter-derived) of ``jaxpr`` given which invars are."""
    flags = {v: f for v, f in zip(jaxpr.invars, is_param)}

    def flag(v) -> bool:
        return flags.get(v, False) if not hasattr(v, "val") else False

    total = Cost()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [flag(v) for v in eqn.invars]
        outs = [False] * len(eqn.outvars)
        if name == "dot_general":
            pb = sum(_nbytes(v.aval) for v, f in zip(eqn.invars, ins) if f)
            ab = sum(_nbytes(v.aval) for v, f in zip(eqn.invars, ins) if not f) + _nbytes(eqn.outvars[0].aval)
            total += Cost(_dot_flops(eqn), pb, ab)
        elif name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            c, _ = _walk(body, ins, trips, depth)
            total += c * eqn.params["length"]
        elif name == "while":
            nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            body = eqn.params["body_jaxpr"].jaxpr
            c, _ = _walk(body, ins[nc:nc + nb] + ins[nc + nb:], trips, depth + 1)
            total += c * (trips[depth] if depth < len(trips) else 1)
            outs = ins[nc + nb:]  # a carried parameter stays one
        elif name == "cond":
            best = None
            for branch in eqn.params["branches"]:
                c, o = _walk(branch.jaxpr, ins[1:], trips, depth)
                if best is None or c.flops > best[0].flops:
                    best = (c, o)
            total += best[0]
            outs = best[1]
        elif (body := _inner(eqn)) is not None and len(body.invars) == len(ins):
            c, outs = _walk(body, ins, trips, depth)
            total += c
        elif name in _LAYOUT and any(ins):
            outs = [True] * len(eqn.outvars)
        for v, f in zip(eqn.outvars, outs):
            flags[v] = f
    return total, [flag(v) for v in jaxpr.outvars]


def program_cost(closed_jaxpr, is_param: Sequence[bool], while_trips: Sequence[int] = ()) -> Cost:
    """Global cost of ``jax.make_jaxpr(f)(*args)``; ``is_param``: per flattened argument,
    whether it is a model parameter; ``while_trips``: trip count of the ``while`` loops at
    each nesting depth (deeper ones, and any beyond the list, count once)."""
    jaxpr = closed_jaxpr.jaxpr
    if len(is_param) != len(jaxpr.invars):
        raise ValueError(f"is_param has {len(is_param)} entries for {len(jaxpr.invars)} arguments")
    return _walk(jaxpr, list(is_param), list(while_trips), 0)[0]
