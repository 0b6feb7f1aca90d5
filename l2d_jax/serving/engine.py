"""The serving engine's host side: a waiting queue, slot assignment and the dispatch loop.

One thread owns the device state (``slots.Slots``) and loops: apply cancellations, prefill
waiting requests into free slots (``slots.insert``: one program per prompt bucket), run
``slots.decode`` for ``iters_per_dispatch`` iterations, then hand the sampled tokens to
each request's ``on_event`` callback and free the slots whose sequences ended. Every program
is compiled ahead of time by ``start`` (``jit(...).lower(...).compile()``); serving calls
only those executables, so it cannot compile again.

Isolation: a request whose prefill fails gets ``Failed`` and the others go on; a callback
that raises is logged and ignored; a failing decode dispatch fails the requests it was
running and restarts from empty slots.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from l2d_jax import nstep as nstep_lib
from l2d_jax import sharding as shd
from l2d_jax import solvers
from l2d_jax.errors import UsageError
from l2d_jax.generate import PROMPT_BUCKETS
from l2d_jax.kernels import backend
from l2d_jax.models.llm import LLM
from l2d_jax.serving import slots as slots_lib
from l2d_jax.serving.requests import (EngineClosed, EngineRequest, Failed, Finished, OnEvent, QueueFull,
                                      Token)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How many sequences run at once and what a request may ask for."""

    slots: int = 8  # decode slots (concurrent sequences)
    max_seq_len: int = 1024  # prompt + completion tokens per slot (the KV cache length)
    max_ode_steps: int = 16  # largest ode_steps accepted
    default_ode_steps: int | None = None  # None: 8 for an L2D model, 0 for a base model
    iters_per_dispatch: int = 8  # decode iterations per device dispatch
    max_queue: int = 64  # waiting requests beyond the running ones; more -> QueueFull
    kernels: str = "auto"  # CPU kernel backend (kernels/backend.py)
    mesh: dict | None = None  # {"data", "fsdp", "tensor"} sizes over this process's devices

    def validate(self) -> None:
        for name in ("slots", "max_seq_len", "iters_per_dispatch"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise UsageError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_ode_steps < 2:
            raise UsageError(f"max_ode_steps must be >= 2 (grid points), got {self.max_ode_steps}")
        if self.default_ode_steps is not None and not _valid_steps(self.default_ode_steps, self.max_ode_steps):
            raise UsageError(f"default_ode_steps must be 0 or 2..{self.max_ode_steps}, got {self.default_ode_steps}")


def _valid_steps(n: int, max_steps: int) -> bool:
    return n == 0 or 2 <= n <= max_steps


@dataclasses.dataclass
class _Request:
    id: int
    request: EngineRequest
    on_event: OnEvent
    seed: int
    open_choices: set[int]
    slots: dict[int, int] = dataclasses.field(default_factory=dict)  # slot -> choice index
    tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # choice -> new tokens
    nfe: dict[int, int] = dataclasses.field(default_factory=dict)  # choice -> velocity evaluations


class Engine:
    """Continuous batching over ``config.slots`` decode slots (see the module docstring)."""

    def __init__(self, model, eos_id: int, config: EngineConfig = EngineConfig()):
        config.validate()
        self.config = config
        self.is_l2d = not isinstance(model, LLM)
        settings = model.settings if self.is_l2d else None
        self.num_classes = settings.guidance_modulation_num_classes if self.is_l2d and settings.use_guidance else 0
        default = config.default_ode_steps
        if default is None:
            default = min(8, config.max_ode_steps) if self.is_l2d else 0
        if default and not self.is_l2d:
            raise UsageError("default_ode_steps must be 0 for a base model (it has no flow path)")
        self.default_ode_steps = default
        ode = nstep_lib.ODEOptions.from_settings(settings) if self.is_l2d else nstep_lib.ODEOptions()
        if ode.method not in solvers.FIXED_GRID_METHODS:
            raise UsageError(f"serving runs fixed-grid ODE solvers ({', '.join(solvers.FIXED_GRID_METHODS)}); "
                             f"the model's settings ask for {ode.method!r}")
        self._mesh = shd.inference_mesh(model, config.mesh)
        cfg = (model.base if self.is_l2d else model).cfg
        kernels = backend.resolve(config.kernels, cfg)
        self.model = model
        self.spec = slots_lib.Spec(config.slots, config.max_seq_len, config.max_ode_steps, int(eos_id), ode, kernels)
        self.buckets = sorted({b for b in PROMPT_BUCKETS if b < config.max_seq_len} | {config.max_seq_len})
        # decode programs over the first W slots: the running sequences are kept in the lowest
        # slots (``_compact``), so a lone request pays a batch-1 step
        self.widths = sorted({2 ** i for i in range(config.slots.bit_length()) if 2 ** i < config.slots}
                             | {config.slots})
        self._table = None
        self._lock = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._live: dict[int, _Request] = {}
        self._cancel: set[int] = set()
        self._free = list(range(config.slots))
        self._next_id = 0
        self._closing = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._exe: dict = {}
        self._state = None
        self.counters = collections.Counter()  # requests_total, tokens_total, nfe_total

    # ------------------------------------------------------------------ lifecycle

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Compiles every program (insert per prompt bucket, decode, release), then starts
        the dispatch thread."""
        say = progress or (lambda msg: log.info("%s", msg))
        spec = self.spec
        with shd.gather_layers(self._mesh):
            self._table = self._jit(slots_lib.make_tables, static_argnames="spec")(self.model, spec=spec)
            self._state = self._init_state()
            total = len(self.buckets) + len(self.widths)
            t0 = time.perf_counter()
            decode = self._jit(slots_lib.decode_prefix, static_argnames=("iterations", "spec", "width"),
                             donate_argnames="slots")
            for i, width in enumerate(self.widths):
                say(f"compiling decode for {width} of {spec.slots} slots ({spec.max_seq_len} tokens each, "
                    f"{self.config.iters_per_dispatch} iterations per dispatch) [{i + 1}/{total}]")
                self._exe[("decode", width)] = decode.lower(self.model, self._state, self._table,
                                                            self.config.iters_per_dispatch, spec, width).compile()
            self._exe["release"] = self._jit(slots_lib.release, donate_argnames="slots").lower(
                self._state, np.zeros((spec.slots,), bool)).compile()
            self._exe["move"] = self._jit(slots_lib.move, donate_argnames="slots").lower(
                self._state, np.int32(0), np.int32(0)).compile()
            settings = slots_lib.request_settings(ode_points=0, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                                  sample_id=0, class_label=None, guidance=1.0, max_tokens=1)
            insert = self._jit(slots_lib.insert, static_argnames="spec", donate_argnames="slots")
            for i, bucket in enumerate(self.buckets):
                say(f"compiling prefill for prompts up to {bucket} tokens [{i + 1 + len(self.widths)}/{total}]")
                self._exe[bucket] = insert.lower(self.model, self._state, np.int32(0), np.zeros((bucket,), np.int32),
                                                 np.int32(1), settings, spec).compile()
            say(f"compiled {len(self._exe)} programs in {time.perf_counter() - t0:.1f} s")
        self._thread = threading.Thread(target=self._loop, name="l2d-engine", daemon=True)
        self._thread.start()

    def _jit(self, fn, **kw):
        """jax.jit with, on a mesh, every output (the slots' state included) replicated: the
        ahead-of-time programs then always receive the shardings they were compiled for."""
        if self._mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            kw["out_shardings"] = NamedSharding(self._mesh, PartitionSpec())
        return jax.jit(fn, **kw)

    def _init_state(self) -> slots_lib.Slots:
        return self._jit(slots_lib.init_slots, static_argnames="spec")(self.model, spec=self.spec)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops accepting requests, lets the running and queued ones finish for up to
        ``timeout`` seconds, cancels the rest and joins the dispatch thread."""
        with self._lock:
            self._closing = True
            deadline = time.monotonic() + timeout
            while (self._queue or self._live) and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            self._cancel.update(self._live)
            for req in list(self._queue):
                self._cancel.add(req.id)
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))

    # ------------------------------------------------------------------ requests

    def submit(self, request: EngineRequest, on_event: OnEvent) -> int:
        """Queues a request; returns its id. Raises UsageError (naming the field) for a
        request this engine cannot serve, QueueFull or EngineClosed."""
        self._check(request)
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.config.max_queue + len(self._free):
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue {self.config.max_queue})")
            rid = self._next_id
            self._next_id += 1
            seed = request.seed if request.seed is not None else secrets.randbits(31)
            self._queue.append(_Request(rid, request, on_event, seed, set(range(request.n))))
            self.counters["requests_total"] += 1
            self._lock.notify_all()
        return rid

    def cancel(self, request_id: int) -> None:
        """Ends the request at the next dispatch boundary (its open choices: "cancelled")."""
        with self._lock:
            if any(r.id == request_id for r in self._queue) or request_id in self._live:
                self._cancel.add(request_id)
                self._lock.notify_all()

    def stats(self) -> dict:
        with self._lock:
            busy = self.config.slots - len(self._free)
            return dict(queue_length=len(self._queue), active_slots=busy, slots=self.config.slots,
                        tokens_total=self.counters["tokens_total"], nfe_total=self.counters["nfe_total"],
                        requests_total=self.counters["requests_total"], compiled_programs=len(self._exe))

    def _check(self, r: EngineRequest) -> None:
        c = self.config
        if not r.prompt_ids:
            raise UsageError("prompt: empty (it needs at least one token)")
        if len(r.prompt_ids) > c.max_seq_len:
            raise UsageError(f"prompt: {len(r.prompt_ids)} tokens, the context holds {c.max_seq_len}")
        if r.max_tokens < 1:
            raise UsageError(f"max_tokens: must be >= 1, got {r.max_tokens}")
        if not 1 <= r.n <= c.slots:
            raise UsageError(f"n: must be 1..{c.slots} (the server's slots), got {r.n}")
        if not self.is_l2d and r.ode_steps:
            raise UsageError(f"ode_steps: this is a base model (no flow path): only 0, got {r.ode_steps}")
        if not _valid_steps(r.ode_steps, c.max_ode_steps):
            raise UsageError(f"ode_steps: must be 0 or 2..{c.max_ode_steps} (grid points), got {r.ode_steps}")
        if r.temperature < 0:
            raise UsageError(f"temperature: must be >= 0, got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise UsageError(f"top_p: must be in (0, 1], got {r.top_p}")
        if r.top_k < 0:
            raise UsageError(f"top_k: must be >= 0, got {r.top_k}")
        if (r.class_label is not None or r.guidance is not None) and not self.num_classes:
            raise UsageError("class_label / guidance: this model has no guidance classes")
        if r.class_label is not None and not 0 <= r.class_label < self.num_classes:
            raise UsageError(f"class_label: must be 0..{self.num_classes - 1}, got {r.class_label}")

    # ------------------------------------------------------------------ the dispatch loop

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._queue or self._live or self._cancel or self._stopping):
                    self._lock.wait()
                if self._stopping and not self._live and not self._queue:
                    self._lock.notify_all()
                    return
                cancel, self._cancel = self._cancel, set()
                for req in [r for r in self._queue if r.id in cancel]:
                    self._queue.remove(req)
                    self._finish_all(req, "cancelled")
                admitted = []
                while self._queue and self._queue[0].request.n <= len(self._free):
                    req = self._queue.popleft()
                    req.slots = {self._free.pop(0): i for i in range(req.request.n)}
                    self._live[req.id] = req
                    admitted.append(req)
            with shd.gather_layers(self._mesh):
                self._release([self._live[i] for i in cancel if i in self._live])
                for req in admitted:
                    self._prefill(req)
                self._compact()
                if self._live:
                    self._dispatch()

    def _release(self, requests: list[_Request]) -> None:
        if not requests:
            return
        free = np.zeros((self.config.slots,), bool)
        for req in requests:
            free[list(req.slots)] = True
        self._state = self._exe["release"](self._state, free)
        for req in requests:
            self._finish_all(req, "cancelled")

    def _prefill(self, req: _Request) -> None:
        r = req.request
        bucket = next(b for b in self.buckets if b >= len(r.prompt_ids))
        ids = np.zeros((bucket,), np.int32)
        ids[:len(r.prompt_ids)] = r.prompt_ids
        try:
            for slot, choice in req.slots.items():
                settings = slots_lib.request_settings(
                    ode_points=r.ode_steps, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=req.seed,
                    sample_id=choice, class_label=r.class_label,
                    guidance=1.0 if r.guidance is None else r.guidance, max_tokens=r.max_tokens)
                # host (numpy) arguments: the executables take them as they are (a jnp
                # conversion would compile a staging program per new shape)
                self._state = self._exe[bucket](self.model, self._state, np.int32(slot), ids,
                                                np.int32(len(r.prompt_ids)), settings)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            log.exception("prefill of request %d failed", req.id)
            self._fail(req, f"prefill failed: {e}")

    def _compact(self) -> None:
        """Moves running sequences from the highest slots into free lower ones."""
        with self._lock:
            owner = {slot: req for req in self._live.values() for slot in req.slots}
            busy = sorted(owner)
            moves = []
            while busy and self._free and self._free[0] < busy[-1]:
                dst, src = self._free.pop(0), busy.pop()
                bisect.insort(self._free, src)
                bisect.insort(busy, dst)
                req = owner.pop(src)
                req.slots[dst] = req.slots.pop(src)
                owner[dst] = req
                moves.append((src, dst))
        for src, dst in moves:
            self._state = self._exe["move"](self._state, np.int32(src), np.int32(dst))

    def _dispatch(self) -> None:
        busy = [slot for req in list(self._live.values()) for slot in req.slots]
        width = next(w for w in self.widths if w > max(busy, default=0))
        try:
            self._state, out = self._exe[("decode", width)](self.model, self._state, self._table)
            tokens, logprobs, finished = (np.asarray(a) for a in out)
            nfe = np.asarray(self._state.nfe)
        except Exception as e:  # noqa: BLE001 - fail what was running, keep serving
            log.exception("decode dispatch failed")
            with self._lock:
                running = list(self._live.values())
            for req in running:
                self._fail(req, f"decode failed: {e}")
            with shd.gather_layers(self._mesh):
                self._state = self._init_state()
            return
        owner = {slot: req for req in list(self._live.values()) for slot in req.slots}
        for slot, req in owner.items():
            req.nfe[req.slots[slot]] = int(nfe[slot])
        eos = self.spec.eos_id
        for it in range(tokens.shape[0]):
            for slot in np.flatnonzero(tokens[it] >= 0):
                req = owner.get(int(slot))
                if req is None:
                    continue
                choice, tok = req.slots[int(slot)], int(tokens[it, slot])
                if tok != eos:
                    req.tokens[choice] += 1
                    self.counters["tokens_total"] += 1
                    self._emit(req, Token(choice, tok, float(logprobs[it, slot])))
                if finished[it, slot]:
                    self._end_choice(req, int(slot), "stop" if tok == eos else "length")

    # ------------------------------------------------------------------ bookkeeping

    def _emit(self, req: _Request, event) -> None:
        try:
            req.on_event(event)
        except Exception:  # noqa: BLE001 - a client's callback must not stop the engine
            log.exception("on_event of request %d raised", req.id)

    def _end_choice(self, req: _Request, slot: int, reason: str) -> None:
        choice = req.slots.pop(slot)
        with self._lock:
            bisect.insort(self._free, slot)
            self.counters["nfe_total"] += req.nfe.get(choice, 0)
            req.open_choices.discard(choice)
            if not req.open_choices:
                self._live.pop(req.id, None)
            self._lock.notify_all()
        self._emit(req, Finished(choice, reason, req.tokens[choice], req.nfe.get(choice, 0)))

    def _drop(self, req: _Request) -> list[int]:
        """Frees every slot of ``req`` and forgets it; returns its open choices."""
        with self._lock:
            for slot in req.slots:
                bisect.insort(self._free, slot)
            req.slots.clear()
            self._live.pop(req.id, None)
            open_choices, req.open_choices = sorted(req.open_choices), set()
            self._lock.notify_all()
        return open_choices

    def _finish_all(self, req: _Request, reason: str) -> None:
        """Ends every open choice of ``req`` (cancelled, or the engine stopping)."""
        for choice in self._drop(req):
            self._emit(req, Finished(choice, reason, req.tokens[choice], req.nfe.get(choice, 0)))

    def _fail(self, req: _Request, message: str) -> None:
        self._drop(req)
        self._emit(req, Failed(message))
