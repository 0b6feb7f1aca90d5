"""Continuous batching on the device: B decode slots over one stacked KV cache, pure functions.

Every slot holds one sequence, left-aligned (its prompt in cache columns [0, P), the RoPE
position of a token is its column), with its own run-time settings: ODE grid points
(``ode_points``: 0 = the base model), sampler temperature / top-k / top-p, PRNG key and
sample index, guidance class and weight, token budget. Changing any of them never
recompiles: the programs are one ``insert`` per prompt bucket and one ``decode``.

``decode`` runs up to ``iterations`` iterations. In one iteration every slot does what its
sequence needs next, batched with the others:

- main part (slots in phase MAIN): push the pending token through the base model (its K/V
  into the cache at the slot's own column, h_L kept), then either sample the next token from
  the base logits (``ode_points`` = 0) or start that token's ODE (x_0 = sigma * eps);
- flow part (slots in phase FLOW): ONE flow evaluation, at the slot's own ODE stage: a
  stage of a fixed-grid step (``solvers.FixedGridSolver``: its input from the step's earlier
  stages, the velocity into the step's stage buffer, the step's update after its last
  stage), or, after the last step, the final logits at t_final, from which the token is
  sampled.

So a 0-step sequence emits a token every iteration whatever its neighbours do, and an
N-point sequence one every S (N - 1) + 1 iterations (S stages per step), the same count as
alone; each part runs only when some slot needs it.

The math is generate's (``generate._decode``), row by row: the same PRNG streams (key,
sample index, position of the newest token), the same stage times (``solvers._tables``),
velocity (``nstep.make_velocity``) and samplers (``sampling.sample_rows``), so a seeded
request gives ``l2d-jax generate``'s tokens whatever else shares the batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2d_jax import nstep as nstep_lib
from l2d_jax import solvers
from l2d_jax.generate import _row_keys
from l2d_jax.kernels import backend
from l2d_jax.models.llm import LLM, init_cache
from l2d_jax.sampling import sample_rows

MAIN, FLOW = 0, 1  # a slot's phase
FLOW_SHARE = (2, 3)  # with 0-step sequences running, the flow part runs in 2 of every 3 iterations
NO_TOKEN = -1


class Settings(NamedTuple):
    """One slot's request settings (scalars; (B,) arrays inside ``Slots``)."""

    ode_points: jax.Array  # int32: 0 or 2..max_points
    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, 0 = all
    top_p: jax.Array  # float32
    key: jax.Array  # (2,) uint32 raw PRNG key (the request's seed)
    sample_id: jax.Array  # int32: index of the choice (generate's sample index)
    class_label: jax.Array  # int32, -1 = none
    guidance: jax.Array  # float32 guidance weight
    max_tokens: jax.Array  # int32 new-token budget


class Slots(NamedTuple):
    """The decode state of B slots; S = the cache's columns (max_seq_len + 1 spare)."""

    cache: dict  # {"k", "v"} (L, B, Hkv, S, hd)
    length: jax.Array  # (B,) int32 tokens in the cache
    h_last: jax.Array  # (B, 1, H) main-stream h_L of the newest cached token
    pending: jax.Array  # (B,) int32 sampled token not yet in the cache (NO_TOKEN: none)
    active: jax.Array  # (B,) bool
    phase: jax.Array  # (B,) int32 MAIN or FLOW
    q: jax.Array  # (B,) int32 flow evaluations done for the current token
    x: jax.Array  # (B, 1, D) float32 ODE state at the start of the current step
    ks: jax.Array  # (stages, B, 1, D) float32 velocities of the current step's stages
    generated: jax.Array  # (B,) int32 new tokens so far
    nfe: jax.Array  # (B,) int32 velocity evaluations so far (generate's count)
    settings: Settings  # each field (B, ...)


class Emitted(NamedTuple):
    """What ``decode`` sampled, iteration by iteration: (iterations, B) each."""

    token: jax.Array  # int32, NO_TOKEN where a slot emitted nothing
    logprob: jax.Array  # float32 log-softmax of the raw logits at the token
    finished: jax.Array  # bool: the slot's sequence ended with this token


class Spec(NamedTuple):
    """Static facts of the programs (hashable)."""

    slots: int
    max_seq_len: int
    max_points: int  # largest ode_points
    eos_id: int
    ode: nstep_lib.ODEOptions
    kernels: backend.Kernels


def _flow_dim(model) -> int:
    return model.settings.flow_dim(model.base.cfg.hidden_size) if _is_l2d(model) else 1


def _is_l2d(model) -> bool:
    return not isinstance(model, LLM)


def _base(model) -> LLM:
    return model.base if _is_l2d(model) else model


def _stages(spec: Spec) -> int:
    return solvers.num_stages(spec.ode.method)


def empty_settings(b: int) -> Settings:
    z = jnp.zeros((b,), jnp.int32)
    return Settings(z, jnp.zeros((b,), jnp.float32), z, jnp.ones((b,), jnp.float32), jnp.zeros((b, 2), jnp.uint32),
                    z, z - 1, jnp.ones((b,), jnp.float32), z)


def init_slots(model, spec: Spec) -> Slots:
    """Every slot free."""
    base, b = _base(model), spec.slots
    d = _flow_dim(model)
    z = jnp.zeros((b,), jnp.int32)
    return Slots(init_cache(base.cfg, b, spec.max_seq_len + 1), z, jnp.zeros((b, 1, base.cfg.hidden_size),
                 jnp.dtype(base.cfg.dtype)), z + NO_TOKEN, jnp.zeros((b,), bool), z, z,
                 jnp.zeros((b, 1, d), jnp.float32), jnp.zeros((_stages(spec), b, 1, d), jnp.float32), z, z,
                 empty_settings(b))


def insert(model, slots: Slots, slot: jax.Array, ids: jax.Array, length: jax.Array, settings: Settings,
           spec: Spec) -> Slots:
    """Prefills a prompt into slot ``slot``: ids (P,) int32 right-padded to a bucket P <=
    max_seq_len, ``length`` real tokens; the slot's sequence starts (phase MAIN, nothing
    pending: its first token comes from the prompt's h_L)."""
    base = _base(model)
    p = ids.shape[0]
    valid = jnp.arange(p) < length
    out = base(ids[None], jnp.arange(p)[None], cache=init_cache(base.cfg, 1, p), cache_index=0,
               kv_valid=valid[None], kernels=spec.kernels, head=False)
    cache = {k: jax.lax.dynamic_update_slice(slots.cache[k], out.cache[k].astype(slots.cache[k].dtype),
                                             (0, slot, 0, 0, 0)) for k in ("k", "v")}
    h = jax.lax.dynamic_slice_in_dim(out.hidden, length - 1, 1, axis=1)  # (1, 1, H)

    def put(a, v):
        return a.at[slot].set(v)

    return slots._replace(
        cache=cache, length=put(slots.length, length), h_last=put(slots.h_last, h[0].astype(slots.h_last.dtype)),
        pending=put(slots.pending, NO_TOKEN), active=put(slots.active, True), phase=put(slots.phase, MAIN),
        q=put(slots.q, 0), generated=put(slots.generated, 0), nfe=put(slots.nfe, 0),
        settings=jax.tree.map(put, slots.settings, settings))


def release(slots: Slots, free: jax.Array) -> Slots:
    """Stops the slots where ``free`` (B,) bool (cancelled requests)."""
    return slots._replace(active=slots.active & ~free)


def _batch_axis(path) -> int:
    """The slot axis of a ``Slots`` leaf: 1 for the cache (L, B, ...) and ks (stages, B, ...)."""
    return 1 if path[0].name in ("cache", "ks") else 0


def _map_rows(fn, slots: Slots, *rest) -> Slots:
    return jax.tree_util.tree_map_with_path(lambda path, a, *r: fn(a, _batch_axis(path), *r), slots, *rest)


def move(slots: Slots, src: jax.Array, dst: jax.Array) -> Slots:
    """Slot ``src``'s sequence moved to slot ``dst`` (src becomes free): the engine keeps the
    running sequences in the lowest slots so that ``decode`` can run on a prefix of them."""
    def one(a, axis):
        row = jax.lax.dynamic_index_in_dim(a, src, axis, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(a, row, dst, axis)
    moved = _map_rows(one, slots)
    return moved._replace(active=moved.active.at[src].set(False))


def decode_prefix(model, slots: Slots, tables: Tables, iterations: int, spec: Spec,
                  width: int) -> tuple[Slots, Emitted]:
    """``decode`` on slots [0, width) only (the others idle): a program of that batch size,
    so one running sequence costs a batch-1 step, not a batch-B one."""
    if width == spec.slots:
        return decode(model, slots, tables, iterations, spec)
    head = _map_rows(lambda a, axis: jax.lax.slice_in_dim(a, 0, width, axis=axis), slots)
    head, out = decode(model, head, tables, iterations, spec._replace(slots=width))
    slots = _map_rows(lambda a, axis, h: jax.lax.dynamic_update_slice_in_dim(a, h, 0, axis), slots, head)
    pad = spec.slots - width
    return slots, Emitted(*(jnp.pad(x, ((0, 0), (0, pad)), constant_values=c)
                            for x, c in zip(out, (NO_TOKEN, 0.0, False))))


def _stage_tables(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """Stage times (max_points + 1, max_points - 1, S) and step sizes (max_points + 1,
    max_points - 1) of every grid size, as generate reads them (``solvers._tables``)."""
    _, times, dts = solvers._tables(solvers._canonical_method(spec.ode.method), spec.max_points,
                                    float(spec.ode.final_t))
    return times, dts


class Tables(NamedTuple):
    """What the flow part reads instead of recomputing it per evaluation (``make_tables``)."""

    phi: jax.Array | None  # (V, D) ``model.flow_table()`` for "average" x1 estimation
    times: jax.Array | None  # (K,) float32 every stage time of every grid, and t_final, sorted
    modulation: object | None  # FlowModulation at those times (no guidance classes), else None


def stage_time_set(spec: Spec) -> np.ndarray:
    """Every time a flow evaluation of any grid size <= max_points happens at, sorted (K,)."""
    times, _ = _stage_tables(spec)
    return np.unique(np.append(times[2:].ravel(), np.float32(spec.ode.final_t)))


def make_tables(model, spec: Spec) -> Tables:
    """The flow path's per-model tables: Phi for "average" x1 estimation, and the per-layer
    modulations at every stage time (they depend on t alone without guidance classes; for
    SmolLM2's released settings the modulation heads are ~half a flow evaluation's weights)."""
    if isinstance(model, LLM):
        return Tables(None, None, None)
    phi = model.flow_table() if spec.ode.x1_estimation == "average" else None
    if model.settings.use_guidance:
        return Tables(phi, None, None)
    times = jnp.asarray(stage_time_set(spec))
    return Tables(phi, times, model.flow_modulation(times[:, None]))


def decode(model, slots: Slots, tables: Tables, iterations: int, spec: Spec) -> tuple[Slots, Emitted]:
    """Up to ``iterations`` iterations (fewer when every slot is idle); see the module doc."""
    b = spec.slots
    base = _base(model)
    cols = jnp.arange(spec.max_seq_len + 1)
    is_l2d = _is_l2d(model)
    stages = _stages(spec)
    solver = solvers.FIXED_GRID[solvers._canonical_method(spec.ode.method)]
    times, dts = (jnp.asarray(a) for a in _stage_tables(spec))
    guided = is_l2d and model.settings.use_guidance
    sigma = model.settings.noise_rescaling if is_l2d else 1.0
    final_t = jnp.float32(spec.ode.final_t)

    def sample(s: Slots, logits, rows):
        st = s.settings
        keys = _row_keys_rows(st.key, st.sample_id, s.length - 1, 0)
        tok = sample_rows(logits, keys, st.temperature, st.top_k, st.top_p)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        return jnp.where(rows, tok, NO_TOKEN), logprob

    def main_part(s: Slots):
        push = s.active & (s.phase == MAIN) & (s.pending != NO_TOKEN)
        index = jnp.minimum(s.length, spec.max_seq_len)  # idle rows write the spare column
        out = base(jnp.maximum(s.pending, 0)[:, None], index[:, None], cache=s.cache, cache_index=index,
                   kv_valid=cols[None] <= index[:, None], kernels=spec.kernels, head=False)
        h_last = jnp.where(push[:, None, None], out.hidden.astype(s.h_last.dtype), s.h_last)
        s = s._replace(cache=out.cache, h_last=h_last, length=s.length + push,
                       pending=jnp.where(push, NO_TOKEN, s.pending))
        ready = s.active & (s.phase == MAIN)
        base_rows = ready & (s.settings.ode_points == 0)
        tok, logprob = jax.lax.cond(base_rows.any(), lambda: sample(s, base.head(s.h_last, spec.kernels)[:, 0],
                                                                    base_rows),
                                    lambda: (jnp.full((b,), NO_TOKEN, jnp.int32), jnp.zeros((b,), jnp.float32)))
        if not is_l2d:
            return s, tok, logprob
        start = ready & ~base_rows  # the next token's ODE begins: x_0 = sigma * eps
        eps = jax.vmap(lambda k: jax.random.normal(k, (1, s.x.shape[-1])))(
            _row_keys_rows(s.settings.key, s.settings.sample_id, s.length - 1, 1))
        x = jnp.where(start[:, None, None], (eps * sigma).astype(jnp.float32), s.x)
        s = s._replace(x=x, phase=jnp.where(start, FLOW, s.phase), q=jnp.where(start, 0, s.q))
        return s, tok, logprob

    def flow_part(s: Slots):
        st = s.settings
        rows = s.active & (s.phase == FLOW)
        n = jnp.clip(st.ode_points, 2, spec.max_points)
        steps = stages * (n - 1)
        final = rows & (s.q >= steps)
        i, j = jnp.minimum(s.q, steps - 1) // stages, jnp.minimum(s.q, steps - 1) % stages
        t = jnp.where(final, final_t, times[n, i, j])
        dt = dts[n, i].reshape(b, 1, 1)
        ks = list(s.ks)
        candidates = [solver.stage_input(k, dt, s.x, ks) for k in range(stages)]
        x_in = jnp.select([j.reshape(b, 1, 1) == k for k in range(stages)], candidates)
        x_in = jnp.where(final.reshape(b, 1, 1), s.x, x_in)
        position = s.length - 1
        kv_valid = cols[None] < s.length[:, None]
        labels = jnp.where(st.class_label >= 0, st.class_label, model.settings.guidance_modulation_num_classes) \
            if guided else None

        modulation = None
        if tables.modulation is not None:  # each row's t is one of tables.times
            k = jnp.searchsorted(tables.times, t)
            modulation = type(tables.modulation)(tables.modulation.layers[:, :, k], tables.modulation.final[k])

        def flow_logits(x, tt, conditional):
            return model.flow_only(s.h_last, s.cache, x, tt, position[:, None], position, kv_valid,
                                   labels if conditional else None, modulation, spec.kernels)[:, 0]

        logits = flow_logits(x_in, t, True)
        uncond = None
        if guided:
            has_label = st.class_label >= 0
            uncond = jax.lax.cond((rows & ~final & has_label).any(), lambda: flow_logits(x_in, t, False),
                                  lambda: logits)
        velocity = functools.partial(
            nstep_lib.make_velocity, table=tables.phi if tables.phi is not None else functools.partial(
                model.flow_representation, kernels=spec.kernels), opts=spec.ode,
            delta=nstep_lib.temperature_delta(spec.ode.method, n, spec.ode.final_t),
            key=_row_keys_rows(st.key, st.sample_id, position, 2))
        v = velocity(lambda x, tt, c: logits[:, None])(t, x_in)
        if guided:  # rows with a class mix in the unconditional velocity; rows without run unguided (generate)
            guided_v = velocity(lambda x, tt, c: (logits if c else uncond)[:, None],
                                guidance=st.guidance.reshape(b, 1, 1), guided=True)(t, x_in)
            v = jnp.where(st.class_label.reshape(b, 1, 1) >= 0, guided_v, v)
        v = jnp.where((t >= 1).reshape(b, 1, 1), 0.0, v.astype(jnp.float32))  # integrate_fixed: zero at t >= 1
        evaluating = rows & ~final
        new_ks = jnp.stack([jnp.where((evaluating & (j == k)).reshape(b, 1, 1), v, s.ks[k]) for k in range(stages)])
        stepped = solver.next_state(dt, s.x, list(new_ks))
        x = jnp.where((evaluating & (j == stages - 1)).reshape(b, 1, 1), stepped, s.x)
        tok, logprob = sample(s, logits, final)
        s = s._replace(x=x, ks=new_ks, q=s.q + evaluating, nfe=s.nfe + evaluating,
                       phase=jnp.where(final, MAIN, s.phase))
        return s, tok, logprob

    def emit(s: Slots, tok):
        got = tok != NO_TOKEN
        generated = s.generated + got
        done = got & ((tok == spec.eos_id) | (generated >= s.settings.max_tokens) | (s.length >= spec.max_seq_len))
        return s._replace(pending=jnp.where(got, tok, s.pending), generated=generated,
                          active=s.active & ~done), done

    def iteration(carry):
        i, s, out = carry
        s, tok, logprob = jax.lax.cond((s.active & (s.phase == MAIN)).any(), main_part,
                                       lambda s: (s, jnp.full((b,), NO_TOKEN, jnp.int32), jnp.zeros((b,), jnp.float32)), s)
        if is_l2d:
            # while 0-step sequences run, every third iteration is theirs alone (no flow part):
            # they would otherwise go at the pace of main step + flow evaluation, the ODE
            # sequences lose a third of their stages' pace instead (FLOW_SHARE)
            base_rows = (s.active & (s.settings.ode_points == 0)).any()
            flow_turn = ~base_rows | (i % FLOW_SHARE[1] < FLOW_SHARE[0])
            s, tok_f, logprob_f = jax.lax.cond((s.active & (s.phase == FLOW)).any() & flow_turn, flow_part,
                                               lambda s: (s, jnp.full((b,), NO_TOKEN, jnp.int32), jnp.zeros((b,), jnp.float32)),
                                               s)
            tok, logprob = jnp.where(tok_f != NO_TOKEN, tok_f, tok), jnp.where(tok_f != NO_TOKEN, logprob_f, logprob)
        s, done = emit(s, tok)
        out = Emitted(out.token.at[i].set(tok), out.logprob.at[i].set(logprob), out.finished.at[i].set(done))
        return i + 1, s, out

    out = Emitted(jnp.full((iterations, b), NO_TOKEN, jnp.int32), jnp.zeros((iterations, b), jnp.float32),
                  jnp.zeros((iterations, b), bool))
    _, slots, out = jax.lax.while_loop(lambda c: (c[0] < iterations) & c[1].active.any(), iteration,
                                       (jnp.int32(0), slots, out))
    return slots, out


def _row_keys_rows(keys: jax.Array, sample_ids: jax.Array, positions: jax.Array, stream: int) -> jax.Array:
    """generate's ``_row_keys`` with one request key per row: (B, 2)."""
    return jax.vmap(lambda k, s, p: _row_keys(k, s[None], p[None], stream)[0])(keys, sample_ids, positions)


def request_settings(*, ode_points: int, temperature: float, top_k: int, top_p: float, seed: int, sample_id: int,
                     class_label: int | None, guidance: float, max_tokens: int) -> Settings:
    """A slot's ``Settings`` (host values -> arrays); the key is ``jax.random.PRNGKey(seed)``,
    as ``l2d-jax generate --seed``."""
    return Settings(np.int32(ode_points), np.float32(temperature), np.int32(top_k), np.float32(top_p),
                    np.asarray(jax.random.PRNGKey(seed)), np.int32(sample_id),
                    np.int32(-1 if class_label is None else class_label), np.float32(guidance), np.int32(max_tokens))
