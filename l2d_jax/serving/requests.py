"""What the HTTP layer hands the engine and what it gets back (host-side, plain Python).

``EngineRequest`` is one validated completion request in token ids; the engine answers with
``Event`` values delivered to the request's ``on_event`` callback, from the engine's thread:
``Token`` for every sampled token of a choice, then one ``Finished`` per choice (or one
``Failed`` for the whole request). The HTTP layer (``serving/api.py``) turns them into OpenAI
responses; it detokenizes and applies ``stop`` strings itself and cancels the request when a
stop string matched or the client went away.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    """One request: ``n`` choices of up to ``max_tokens`` new tokens after ``prompt_ids``.

    ode_steps: ODE grid points per token (0 = the base model, else 2..engine max);
    temperature 0 = greedy; top_k 0 = all; seed: the PRNG seed (the same tokens as
    ``l2d-jax generate --seed`` with the same settings; None: the engine draws one);
    class_label / guidance: the guidance class and weight (models with classes only).
    """

    prompt_ids: tuple[int, ...]
    max_tokens: int
    ode_steps: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    class_label: int | None = None
    guidance: float | None = None


@dataclasses.dataclass(frozen=True)
class Token:
    """A sampled token of choice ``index``: its id and log-probability under the model's
    distribution (log-softmax of the logits it was sampled from, before temperature/top-p)."""

    index: int
    token_id: int
    logprob: float


@dataclasses.dataclass(frozen=True)
class Finished:
    """Choice ``index`` ended: "stop" (EOS), "length" (max_tokens or the context is full) or
    "cancelled"; ``tokens`` new tokens, ``nfe`` flow (velocity) evaluations it spent."""

    index: int
    reason: Literal["stop", "length", "cancelled"]
    tokens: int
    nfe: int


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request failed inside the engine; the other requests go on."""

    message: str


Event = Token | Finished | Failed
OnEvent = Callable[[Event], None]


class QueueFull(Exception):
    """The engine's waiting queue is full: answer 429 and let the client retry."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests: answer 503."""
