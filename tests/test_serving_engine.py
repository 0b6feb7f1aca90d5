"""The continuous-batching engine (l2d_jax/serving): its tokens are ``generate``'s, row by row,
whatever shares the batch; requests come and go; nothing compiles after ``start``."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tiny import tiny_l2d, tiny_llm
from l2d_jax import generate as gen
from l2d_jax import nstep
from l2d_jax.errors import UsageError
from l2d_jax.kernels import backend
from l2d_jax.sampling import Sampler
from l2d_jax.serving import slots as slots_lib
from l2d_jax.serving.engine import Engine, EngineConfig
from l2d_jax.serving.requests import EngineClosed, EngineRequest, Finished, QueueFull, Token

MAX_POINTS = 8
NEW = 10


@pytest.fixture(scope="module")
def model():
    return tiny_l2d()


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, eos_id=-1, config=EngineConfig(slots=4, max_seq_len=64, max_ode_steps=MAX_POINTS,
                                                     max_queue=2))
    e.start()
    yield e
    e.stop(timeout=5)


def reference(model, r: EngineRequest, choice: int = 0) -> list[int]:
    """``generate``'s tokens for the request (what ``l2d-jax generate --seed`` runs)."""
    ids, mask = gen.left_pad([list(r.prompt_ids)], 0)
    ode = nstep.ODEOptions.from_settings(model.settings)
    out = gen.generate(model, ids, mask, key=jax.random.PRNGKey(r.seed), ode_steps=r.ode_steps,
                       sampler=Sampler(r.temperature, r.top_p, r.top_k), num_return_sequences=r.n,
                       opts=gen.GenerateOptions(max_new_tokens=r.max_tokens, ode=ode, max_ode_points=MAX_POINTS))
    return np.asarray(out.tokens[choice]).tolist()


class Collector:
    """Events of several requests, by request id."""

    def __init__(self):
        self.events: dict[int, list] = {}
        self.done = threading.Condition()

    def submit(self, engine: Engine, request: EngineRequest) -> int:
        events: list = []

        def on_event(ev):
            with self.done:
                events.append(ev)
                self.done.notify_all()

        rid = engine.submit(request, on_event)
        self.events[rid] = events
        return rid

    def wait(self, rid: int, n: int = 1, timeout: float = 120) -> list:
        deadline = time.monotonic() + timeout
        with self.done:
            while sum(isinstance(e, Finished) for e in self.events[rid]) < n:
                assert self.done.wait(max(0.0, deadline - time.monotonic())), f"request {rid} did not finish"
        return self.events[rid]

    @staticmethod
    def tokens(events, choice: int = 0) -> list[int]:
        return [e.token_id for e in events if isinstance(e, Token) and e.index == choice]


MIX = [EngineRequest((5, 6, 7, 8, 9), NEW, ode_steps=0, temperature=0.0, seed=1),
       EngineRequest((10, 11, 12), NEW, ode_steps=4, temperature=0.0, seed=2),
       EngineRequest(tuple(range(1, 21)), NEW, ode_steps=2, temperature=1.0, top_k=5, seed=3),
       EngineRequest((3,), NEW, ode_steps=8, temperature=0.8, top_p=0.9, seed=4)]


def test_each_request_gets_generates_tokens_alone_and_in_a_mixed_batch(model, engine):
    col = Collector()
    alone = {}
    for r in MIX:  # one at a time: the slot runs alone
        rid = col.submit(engine, r)
        alone[r] = col.tokens(col.wait(rid))
    together = [col.submit(engine, r) for r in MIX]  # all four share the batch
    for r, rid in zip(MIX, together):
        events = col.wait(rid)
        want = reference(model, r)
        assert alone[r] == want, r
        assert col.tokens(events) == want, r
        fin = [e for e in events if isinstance(e, Finished)]
        # generate's count: stages * (points - 1) velocity evaluations per token (midpoint: 2)
        assert fin == [Finished(0, "length", NEW, NEW * 2 * max(r.ode_steps - 1, 0))]


def test_choices_queueing_and_slot_moves_keep_every_sequence_exact(model, engine):
    """n = 3 choices, more requests than slots (the rest wait), sequences moved down into
    freed slots mid-flight: still generate's tokens (sample index = choice)."""
    col = Collector()
    many = EngineRequest((7, 8, 9), NEW, ode_steps=2, temperature=1.0, n=3, seed=11)
    short = EngineRequest((4, 5), 3, ode_steps=0, temperature=1.0, seed=12)
    late = EngineRequest((9, 9, 9, 9), NEW + 4, ode_steps=4, temperature=0.0, seed=13)
    ids = [col.submit(engine, r) for r in (short, many, late)]
    for r, rid in zip((short, many, late), ids):
        events = col.wait(rid, r.n)
        for c in range(r.n):
            assert col.tokens(events, c) == reference(model, r, c)
    assert engine.stats()["active_slots"] == 0


def test_nothing_compiles_while_serving(engine):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    col = Collector()
    # another prompt bucket, step counts and sampler settings: run-time values only
    rid = col.submit(engine, EngineRequest(tuple(range(1, 40)), 5, ode_steps=6, temperature=0.5, top_k=3,
                                           top_p=0.5, seed=5))
    col.submit(engine, EngineRequest((1,), 5, ode_steps=3, temperature=0.0))
    col.wait(rid)
    col.wait(rid + 1)
    assert compiles == []


def test_cancel_frees_the_slots_and_reports_the_choices(engine):
    col = Collector()
    rid = col.submit(engine, EngineRequest((1, 2, 3), 60, ode_steps=8, temperature=0.0, n=2, seed=0))
    with col.done:  # cancelled once it has started
        assert col.done.wait_for(lambda: any(isinstance(e, Token) for e in col.events[rid]), timeout=60)
    engine.cancel(rid)
    events = col.wait(rid, 2)
    fin = sorted((e for e in events if isinstance(e, Finished)), key=lambda e: e.index)
    assert [e.reason for e in fin] == ["cancelled", "cancelled"]
    assert all(e.tokens < 60 for e in fin)
    assert engine.stats()["active_slots"] == 0


def test_bad_requests_name_the_field(engine):
    cases = {"ode_steps": dict(ode_steps=1), "max_tokens": dict(max_tokens=0), "n": dict(n=5),
             "temperature": dict(temperature=-1.0), "top_p": dict(top_p=0.0), "top_k": dict(top_k=-2),
             "class_label": dict(class_label=1)}
    for field, kw in cases.items():
        with pytest.raises(UsageError, match=f"^{field}"):
            engine.submit(EngineRequest((1, 2), **{"max_tokens": 4, **kw}), lambda ev: None)
    with pytest.raises(UsageError, match="^ode_steps"):
        engine.submit(EngineRequest((1,), 4, ode_steps=MAX_POINTS + 1), lambda ev: None)
    with pytest.raises(UsageError, match="^prompt"):
        engine.submit(EngineRequest(tuple(range(65)), 4), lambda ev: None)


def test_a_full_queue_refuses_and_a_stopped_engine_closes():
    e = Engine(tiny_llm(), eos_id=-1, config=EngineConfig(slots=1, max_seq_len=32, max_queue=1,
                                                          iters_per_dispatch=2))
    e.start()
    gate, started = threading.Event(), threading.Event()
    first_events: list = []

    def held(ev):  # the engine thread waits here: the slot stays busy, the queue fills
        first_events.append(ev)
        started.set()
        gate.wait(60)

    e.submit(EngineRequest((1, 2), 5, temperature=0.0), held)
    assert started.wait(60)
    col = Collector()
    waiting = col.submit(e, EngineRequest((1, 2), 5, temperature=0.0))
    with pytest.raises(QueueFull):
        e.submit(EngineRequest((1, 2), 5), lambda ev: None)
    with pytest.raises(UsageError, match="^ode_steps: this is a base model"):
        e.submit(EngineRequest((1, 2), 5, ode_steps=4), lambda ev: None)
    gate.set()
    e.stop(timeout=60)  # both finish within the timeout
    assert [f.reason for f in first_events if isinstance(f, Finished)] == ["length"]
    assert [f.reason for f in col.events[waiting] if isinstance(f, Finished)] == ["length"]
    with pytest.raises(EngineClosed):
        e.submit(EngineRequest((1, 2), 5), lambda ev: None)


def test_decode_with_xla_ops_writes_each_rows_own_slot(model):
    """Without the CPU kernels the per-row KV write is a scatter (block.write_kv): the same
    tokens as generate, for rows at different lengths."""
    ode = nstep.ODEOptions.from_settings(model.settings)
    spec = slots_lib.Spec(2, 32, MAX_POINTS, -1, ode, backend.XLA)
    state = slots_lib.init_slots(model, spec)
    tables = slots_lib.make_tables(model, spec)
    reqs = [EngineRequest((3, 4, 5, 6, 7, 8, 9), 6, ode_steps=4, temperature=0.0, seed=0),
            EngineRequest((2,), 6, ode_steps=0, temperature=1.0, seed=9)]
    insert = jax.jit(slots_lib.insert, static_argnames="spec")
    for slot, r in enumerate(reqs):
        ids = np.zeros((16,), np.int32)
        ids[:len(r.prompt_ids)] = r.prompt_ids
        settings = slots_lib.request_settings(ode_points=r.ode_steps, temperature=r.temperature, top_k=0, top_p=1.0,
                                              seed=r.seed, sample_id=0, class_label=None, guidance=1.0,
                                              max_tokens=r.max_tokens)
        state = insert(model, state, jnp.int32(slot), jnp.asarray(ids), jnp.int32(len(r.prompt_ids)), settings,
                       spec=spec)
    state, out = jax.jit(slots_lib.decode, static_argnames=("iterations", "spec"))(model, state, tables, 64,
                                                                                    spec=spec)
    tokens = np.asarray(out.token)
    for slot, r in enumerate(reqs):
        assert [int(t) for t in tokens[:, slot] if t >= 0] == reference(model, r)


_MESH_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_serving_engine import *
m = tiny_l2d()
e = Engine(m, eos_id=-1, config=EngineConfig(slots=4, max_seq_len=64, max_ode_steps=MAX_POINTS,
                                             mesh={{"data": 2, "fsdp": 2}}))
e.start()
col = Collector()
ids = [col.submit(e, r) for r in MIX]
same = [col.tokens(col.wait(rid)) == reference(m, r) for r, rid in zip(MIX, ids)]
e.stop(5)
print("SAME", same)
"""


@pytest.mark.slow
def test_engine_on_a_mesh_gives_the_single_device_tokens(tmp_path):
    """--mesh data=2,fsdp=2 over 4 (fake) devices: parameters sharded, the slots' state
    replicated; every request's tokens are single-device generate's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    script = _MESH_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SAME [True, True, True, True]" in out.stdout
