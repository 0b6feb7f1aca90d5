"""Jitted generation: prefill (one program), then ONE ``lax.while_loop`` over new tokens
(another program). ``prefill`` may be shared by several ``generate`` calls on the same prompts
(e.g. an evaluation's step counts).

Per new token (spec sections 8 and 10): fresh noise x_0 = sigma * eps for the newest
position, the ODE from t = 0 to t_final with ``L2DModel.flow_only`` velocities that read the
cached main keys/values and the cached h_L, the final flow logits at t_final, a sampled
token, then the main path of that token (its K/V and h_L into the cache). ``ode_steps = 0``
is the base model alone. ``ode_steps`` (grid points), temperatures and the guidance weight
are run-time values: a sweep over them reuses one compiled program per
(batch, prompt bucket, max_new_tokens, solver method, sampler top_k, mesh layout).

A model larger than one device: ``sharding.inference_mesh`` places its parameters on a
(data, fsdp, tensor) mesh by the logical-axis rules; ``generate`` / ``prefill`` called inside
``sharding.gather_layers(mesh)`` then gather one stacked layer at a time (``generate_text``
does both).

PRNG: every random draw of row r at absolute position p uses a key derived from
(key, sample index of r, p), so a prompt gives the same tokens alone or in a padded batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2d_jax import nstep as nstep_lib
from l2d_jax import sharding as shd
from l2d_jax import solvers
from l2d_jax.kernels import backend
from l2d_jax.models.llm import LLM, init_cache, positions_from_mask
from l2d_jax.sampling import Sampler
from l2d_jax.errors import UsageError

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Static generation settings (part of the compiled program's identity)."""

    max_new_tokens: int = 64
    ode: nstep_lib.ODEOptions = nstep_lib.ODEOptions()
    max_ode_points: int = 64  # largest ode_steps a compiled program accepts
    return_logits: bool = False  # also return the (B, N, V) logits of every step
    kernels: str = "auto"  # CPU kernel backend (kernels/backend.py): "auto", "xla" or "cpu"

    def __post_init__(self):
        if self.kernels not in backend.BACKENDS:
            raise backend.KernelBackendError(f"GenerateOptions.kernels must be one of {backend.BACKENDS}, "
                                             f"got {self.kernels!r}")


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) int32; after EOS: eos_id
    lengths: jax.Array  # (B,) number of new tokens up to and including EOS
    nfe: jax.Array  # (B,) velocity evaluations per generated token (mean over the row's tokens;
    # adaptive solvers in per-sequence mode: each row's own count)
    logits: jax.Array | None  # (B, max_new_tokens, V) float32 when return_logits


def bucket_length(n: int, buckets=PROMPT_BUCKETS) -> int:
    """Smallest bucket >= n (multiples of the largest bucket beyond it)."""
    for b in buckets:
        if n <= b:
            return b
    top = buckets[-1]
    return -(-n // top) * top


def left_pad(prompts: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to `length` (default: the bucket of the longest).
    Returns ids (B, P) int32 and attention mask (B, P) int32."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    length = length or bucket_length(max(len(p) for p in prompts))
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise UsageError(f"prompt {i} has {len(p)} tokens, more than the padded length {length}")
        ids[i, length - len(p):] = p
        mask[i, length - len(p):] = 1
    return ids, mask


def _row_keys(key: jax.Array, sample_ids: jax.Array, positions: jax.Array, stream: int) -> jax.Array:
    """(B, 2) raw keys from (key, sample index, absolute position, stream)."""
    def one(s, p):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, stream), s), p)
    return jax.vmap(one)(sample_ids, positions)


class _Carry(NamedTuple):
    i: jax.Array  # step index
    cache: dict
    kv_valid: jax.Array  # (B, S)
    h_last: jax.Array  # (B, 1, H) main-stream h_L of the newest position
    position: jax.Array  # (B,) RoPE position of the newest token
    tokens: jax.Array  # (B, N)
    done: jax.Array  # (B,)
    nfe: jax.Array  # (B,) summed over tokens
    logits: jax.Array | None


class Prefilled(NamedTuple):
    """The prompts' main path in the cache, ready to decode ``max_new_tokens`` more. Built by
    ``prefill`` once and reusable by any number of ``generate`` calls (step counts, guidance
    weights, samplers): decoding never writes into it."""

    cache: dict  # {"k", "v"} (L, B, Hkv, P + N, hd)
    kv_valid: jax.Array  # (B, P + N) bool: real prompt tokens (new slots start False)
    h_last: jax.Array  # (B, 1, H) main-stream h_L of the last prompt position
    position: jax.Array  # (B,) RoPE position of the last prompt token


def _prefill(model, ids, mask, n_new: int, repeats: int, kernels: backend.Kernels) -> Prefilled:
    base = model if isinstance(model, LLM) else model.base
    b, p = ids.shape
    kv_valid = jnp.concatenate([mask.astype(bool), jnp.zeros((b, n_new), bool)], axis=1)
    positions = positions_from_mask(mask)
    pre = base(ids, positions, cache=init_cache(base.cfg, b, p + n_new), cache_index=0, kv_valid=kv_valid,
               kernels=kernels)
    out = Prefilled(pre.cache, kv_valid, pre.hidden[:, -1:], positions[:, -1])
    if repeats == 1:
        return out
    # samples of one prompt share its prefill: rows repeated after the forward, not before
    return Prefilled({k: jnp.repeat(c, repeats, axis=1) for k, c in out.cache.items()},
                     *(jnp.repeat(a, repeats, axis=0) for a in out[1:]))


def _decode(model, pre: Prefilled, sample_ids, key, ode_steps, sampler, ode_temperature,
            guidance, class_labels, init_noise, eos_id, opts: GenerateOptions,
            kernels: backend.Kernels) -> GenerateOutput:
    is_l2d = not isinstance(model, LLM)
    base = model.base if is_l2d else model
    b = pre.kv_valid.shape[0]
    n_new = opts.max_new_tokens
    p = pre.kv_valid.shape[1] - n_new
    sigma = model.settings.noise_rescaling if is_l2d else 1.0
    d = model.settings.flow_dim(base.cfg.hidden_size) if is_l2d else 1
    guided = is_l2d and model.settings.use_guidance and class_labels is not None
    table, modulation_at = None, None
    if is_l2d:
        # once per call, and only when the ODE runs: Phi (V, D) where the x1 estimate needs
        # the whole table ("average"; "sample" computes the rows it draws, phi(y), on demand),
        # and for fixed grids the modulations at every stage time (the same for every token)
        tabulate = opts.ode.method in nstep_lib.FIXED_GRID and not guided
        whole_table = opts.ode.x1_estimation == "average"
        times = None
        if tabulate:
            times = solvers.stage_times(opts.ode.method, ode_steps, opts.ode.final_t, opts.max_ode_points)
            times = jnp.append(times.ravel(), jnp.float32(opts.ode.final_t))

        def tables():
            return (model.flow_table() if whole_table else None,
                    model.flow_modulation(times[:, None]) if tabulate else None)

        table, mods = jax.lax.cond(ode_steps >= 2, tables,
                                   lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(tables)))
        if not whole_table:
            table = functools.partial(model.flow_representation, kernels=kernels)
        if tabulate:
            modulation_at = nstep_lib.modulation_lookup(model, times, mods)

    def next_logits(c: _Carry):
        slot = p - 1 + c.i
        pos = c.position[:, None]

        def base_logits(_=None):  # inside the cond branch: no LM head pass when the ODE runs
            return base.head(c.h_last, kernels)[:, 0], jnp.zeros((b,), jnp.int32)

        if not is_l2d:
            return base_logits()

        def flow_logits(x, t, conditional):
            labels = class_labels if conditional else None
            mod = None if modulation_at is None else modulation_at(t)
            return model.flow_only(c.h_last, c.cache, x, t, pos, slot, c.kv_valid, labels, mod, kernels)

        def run_ode(_):
            if init_noise is None:
                eps = jax.vmap(lambda k: jax.random.normal(k, (1, d)))(_row_keys(key, sample_ids, c.position, 1))
            else:
                eps = init_noise[c.i]
            x0 = (eps * sigma).astype(jnp.float32)
            f = nstep_lib.make_velocity(
                flow_logits, table, opts.ode,
                delta=nstep_lib.temperature_delta(opts.ode.method, ode_steps, opts.ode.final_t),
                key=_row_keys(key, sample_ids, c.position, 2), temperature=ode_temperature,
                guidance=guidance, guided=guided)
            o = opts.ode
            sol = solvers.integrate(f, x0, o.method, final_t=o.final_t, num_points=ode_steps,
                                    max_points=opts.max_ode_points, atol=o.atol, rtol=o.rtol,
                                    per_sequence=o.per_sequence, max_steps=o.max_steps)
            nfe = jnp.broadcast_to(sol.nfe, (b,))  # adaptive per-sequence: one count per row
            return flow_logits(sol.x, jnp.float32(opts.ode.final_t), True)[:, 0], nfe

        return jax.lax.cond(ode_steps >= 2, run_ode, base_logits, None)

    def body(c: _Carry) -> _Carry:
        logits, nfe = next_logits(c)
        tok = sampler.next_tokens(logits, _row_keys(key, sample_ids, c.position, 0))
        tok = jnp.where(c.done, eos_id, tok)
        nfe_row = jnp.where(c.done, 0, nfe)
        tokens = c.tokens.at[:, c.i].set(tok)
        done = c.done | (tok == eos_id)
        slot = p + c.i
        kv_valid = c.kv_valid.at[:, slot].set(True)
        step = base(tok[:, None], (c.position + 1)[:, None], cache=c.cache, cache_index=slot, kv_valid=kv_valid,
                    kernels=kernels)
        all_logits = None if c.logits is None else c.logits.at[:, c.i].set(logits)
        return _Carry(c.i + 1, step.cache, kv_valid, step.hidden, c.position + 1, tokens, done,
                      c.nfe + nfe_row, all_logits)

    def cond(c: _Carry):
        return (c.i < n_new) & ~jnp.all(c.done)

    v = base.cfg.vocab_size
    init = _Carry(jnp.int32(0), pre.cache, pre.kv_valid, pre.h_last, pre.position,
                  jnp.full((b, n_new), eos_id, jnp.int32), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
                  jnp.zeros((b, n_new, v), jnp.float32) if opts.return_logits else None)
    out = jax.lax.while_loop(cond, body, init)
    is_eos = out.tokens == eos_id
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, out.i)
    lengths = jnp.minimum(first_eos, out.i).astype(jnp.int32)
    nfe = out.nfe / jnp.maximum(lengths, 1)
    return GenerateOutput(out.tokens, lengths, nfe, out.logits)


class _LayoutKeyedJit:
    """``jax.jit(fn)`` whose programs are traced under the ``sharding.gather_layers`` around
    the call (or ``lower``) and keyed on it: its layout ``layer_gather_layout()`` goes in as
    an extra static argument, so the same shapes traced with and without the context, or
    under another mesh, are distinct programs (no stale cache hit)."""

    def __init__(self, fn, static_argnames: tuple[str, ...]):
        def traced(*args, layout: tuple | None, **kwargs):
            with shd.gather_layers(*(layout or (None,))):
                return fn(*args, **kwargs)

        sig = inspect.signature(fn)  # fn's parameters, so static arguments may be positional
        traced.__signature__ = sig.replace(parameters=[
            *sig.parameters.values(), inspect.Parameter("layout", inspect.Parameter.KEYWORD_ONLY)])
        self._jit = jax.jit(traced, static_argnames=(*static_argnames, "layout"))

    def __call__(self, *args, **kwargs):
        return self._jit(*args, layout=shd.layer_gather_layout(), **kwargs)

    def lower(self, *args, **kwargs):
        return self._jit.lower(*args, layout=shd.layer_gather_layout(), **kwargs)

    def _cache_size(self) -> int:
        return self._jit._cache_size()


# The model goes in as a pytree (an NNX module is one): flattening it costs ~9 ms per call on
# SmolLM2-135M where nnx.split + a static graphdef cost ~85 ms, i.e. ~2.5 ms per token of a
# 32-token batch-1 call.
_prefill_jit = _LayoutKeyedJit(_prefill, static_argnames=("n_new", "repeats", "kernels"))
_decode_jit = _LayoutKeyedJit(_decode, static_argnames=("opts", "kernels"))


def _llm_cfg(model):
    return model.cfg if isinstance(model, LLM) else model.base.cfg


def compiled_programs() -> int:
    """How many generation programs (prefill + decode) have been compiled in this process."""
    try:
        return _prefill_jit._cache_size() + _decode_jit._cache_size()
    except AttributeError:  # a private API of jax.jit; without it compiles are not counted
        return 0


def prefill(model, ids, mask, max_new_tokens: int, num_return_sequences: int = 1,
            kernels: str = "auto") -> Prefilled:
    """The main path of left-padded prompts ids/mask (B, P) into a cache with room for
    ``max_new_tokens`` (``opts.max_new_tokens`` of the ``generate`` calls that reuse it);
    with ``num_return_sequences`` > 1 each prompt's rows are repeated (B * n rows).
    ``kernels``: the CPU kernel backend (``kernels/backend.py``). Traced under the enclosing
    ``sharding.gather_layers`` (as ``generate``)."""
    return _prefill_resolved(model, ids, mask, max_new_tokens, num_return_sequences,
                             backend.resolve(kernels, _llm_cfg(model)))


def _prefill_resolved(model, ids, mask, max_new_tokens: int, repeats: int, kernels: backend.Kernels) -> Prefilled:
    return _prefill_jit(model, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), int(max_new_tokens),
                        int(repeats), kernels)


def generate(model, ids, mask, *, key=None, ode_steps: int = 0, sampler: Sampler = Sampler(0.0),
             ode_temperature: float | None = None, guidance: float | None = None,
             class_labels=None, init_noise=None, eos_id: int = -1, sample_ids=None,
             num_return_sequences: int = 1, opts: GenerateOptions = GenerateOptions(),
             prefilled: Prefilled | None = None) -> GenerateOutput:
    """Generates up to ``opts.max_new_tokens`` tokens for a left-padded batch.

    model: an LLM or an L2DModel; ids/mask (B, P) from ``left_pad``; ode_steps: grid points
    of the per-token ODE (0 = base model; else 2..opts.max_ode_points; for an adaptive
    ``opts.ode.method`` any value >= 2 just switches the flow path on); ode_temperature
    overrides a constant x1-estimation temperature at run time; guidance: the CFG weight
    (used when the model has guidance classes and class_labels (B,) are given);
    init_noise (max_new_tokens, B, 1, D): standard-normal draws to use instead of the PRNG;
    eos_id: stop token (-1: none); num_return_sequences: samples per prompt (rows repeated,
    sample index folded into the PRNG); prefilled: ``prefill(model, ids, mask,
    opts.max_new_tokens, num_return_sequences)`` of these prompts, to share one prefill
    between several calls (otherwise computed here).

    A model placed on a mesh (``sharding.inference_mesh``): call inside
    ``sharding.gather_layers(mesh, rules)`` to gather the stacked layers' parameters one layer
    at a time (FSDP); the layout is part of the compiled programs' identity.
    """
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    n = int(num_return_sequences)
    b = ids.shape[0] * n
    if class_labels is not None and n > 1:
        class_labels = jnp.repeat(jnp.asarray(class_labels), n, axis=0)
    if sample_ids is None:
        sample_ids = jnp.tile(jnp.arange(n, dtype=jnp.int32), ids.shape[0])
    if ode_steps and isinstance(model, LLM):
        raise UsageError("ode_steps > 0 needs an L2D model; this is a base model (use ode_steps=0)")
    if ode_steps == 1 or ode_steps < 0 or ode_steps > opts.max_ode_points:
        raise UsageError(f"ode_steps counts ODE grid points: 0 (base model) or 2..{opts.max_ode_points} "
                         f"(raise GenerateOptions.max_ode_points), got {ode_steps}")
    kernels = backend.resolve(opts.kernels, _llm_cfg(model))  # once per call, for both programs
    if prefilled is None:
        prefilled = _prefill_resolved(model, ids, mask, opts.max_new_tokens, n, kernels)
    want = (b, ids.shape[1] + opts.max_new_tokens)
    if tuple(prefilled.kv_valid.shape) != want:
        raise UsageError(f"prefilled holds {tuple(prefilled.kv_valid.shape)} (rows, prompt + new slots); these "
                         f"prompts with num_return_sequences={n} and max_new_tokens={opts.max_new_tokens} "
                         f"need {want}: build it with prefill(model, ids, mask, {opts.max_new_tokens}, {n})")
    g = guidance
    if g is None and not isinstance(model, LLM):
        g = model.settings.nstep_guidance_parameter
    return _decode_jit(
        model, prefilled, jnp.asarray(sample_ids, jnp.int32),
        jax.random.PRNGKey(0) if key is None else key, jnp.int32(ode_steps), sampler,
        None if ode_temperature is None else jnp.float32(ode_temperature),
        jnp.float32(1.0 if g is None else g),
        None if class_labels is None else jnp.asarray(class_labels, jnp.int32),
        None if init_noise is None else jnp.asarray(init_noise, jnp.float32),
        # the resolved Kernels are the program's identity, not the name asked for ("auto" = "cpu" here)
        jnp.int32(eos_id), dataclasses.replace(opts, kernels="auto"), kernels)


def encode_prompts(tokenizer, prompts: list[str], chat: bool = True, system: str | None = None) -> list[list[int]]:
    """Token ids per prompt; with ``chat`` the tokenizer's chat template wraps each prompt as
    one user turn (plus an optional system turn) and opens the assistant turn."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = []
        for p in prompts:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return out
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def generate_text(model, tokenizer, prompts: list[str], *, chat: bool = True, system: str | None = None,
                  batch_size: int = 8, class_label: int | None = None, mesh: Mapping[str, int] | None = None,
                  **kwargs) -> list[dict]:
    """Generates completions for text prompts in batches of min(batch_size, number of
    prompts) rows (rounded up to a multiple of the mesh's data x fsdp), all left-padded to
    the bucket length of the longest prompt (a batch short of prompts is filled with copies
    of its first prompt, so every batch has the same shape).

    Returns one record per prompt and return sequence: prompt, completion, new_tokens,
    nfe_per_token, seconds (wall time of its batch, shared by its rows). class_label: the
    guidance class of every prompt. mesh: {data, fsdp, tensor} sizes of this process's mesh
    (``sharding.local_mesh``; default: every local device data-parallel, the model
    replicated); fsdp / tensor > 1 shard the model's parameters (placed in place).
    kwargs go to ``generate`` (ode_steps, sampler, opts, key, num_return_sequences, ...).

    Several processes (``jax.process_count() > 1``): collective; each process generates its
    contiguous share of the prompts (``l2d_jax.distributed.process_shard``) on its own mesh,
    and every process returns all records in prompt order (``gather_objects``). A row's
    tokens depend neither on the process count nor on the batch shape.
    """
    import time

    from l2d_jax.distributed import gather_objects, process_shard

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    kwargs.setdefault("eos_id", -1 if eos is None else int(eos))
    n_ret = kwargs.get("num_return_sequences", 1)
    encoded = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    length = bucket_length(max(len(e) for e in encoded))
    placed = shd.inference_mesh(model, mesh)
    dp = 1 if placed is None else shd.data_parallel_size(placed)
    rows = -(-min(batch_size, len(encoded)) // dp) * dp
    if class_label is not None:
        kwargs["class_labels"] = np.full((rows,), class_label, np.int32)
    mine = process_shard(len(encoded))
    records = []
    for start in range(mine.start, mine.stop, rows):
        chunk = encoded[start:min(start + rows, mine.stop)]
        real = len(chunk)
        ids, mask = left_pad(chunk + [chunk[0]] * (rows - real), pad, length)
        if placed is not None:
            ids, mask = (jax.device_put(a, shd.batch_sharding(placed)) for a in (ids, mask))
        t0 = time.perf_counter()
        with shd.gather_layers(placed):
            out = generate(model, ids, mask, **kwargs)
        tokens = np.asarray(out.tokens)
        lengths, nfe = np.asarray(out.lengths), np.asarray(out.nfe)
        seconds = time.perf_counter() - t0
        for r in range(real * n_ret):
            new = tokens[r, :lengths[r]].tolist()
            records.append(dict(prompt=prompts[start + r // n_ret],
                                completion=tokenizer.decode(new, skip_special_tokens=True),
                                new_tokens=int(lengths[r]), nfe_per_token=float(nfe[r]), seconds=seconds))
    return gather_objects(records)


def generate_cli(model_path: str, prompts: list[str], *, steps: int | None = None, solver: str = "midpoint",
                 max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 ode_temperature: str | float | None = None, x1_estimation: str | None = None,
                 guidance: float | None = None, class_label: int | None = None,
                 num_return_sequences: int = 1, batch_size: int = 8, seed: int = 0,
                 dtype: str = "float32", system: str | None = None, chat: bool = True,
                 mesh: str | Mapping[str, int] | None = None) -> list[dict]:
    """What ``l2d-jax generate`` does: load any model source, then ``generate_text`` (with
    several processes: every process loads the model, generates its share of the prompts and
    returns all records). mesh: ``"data=N,fsdp=N,tensor=N"`` (any subset) or a dict, this
    process's mesh over its local devices (``generate_text``); the model loads straight onto
    it (``sharding.load_mesh``: each device receives only its shards)."""
    from l2d_jax.convert.loading import load_any
    from l2d_jax.errors import L2DError
    from l2d_jax.plan import parse_mesh

    if not prompts:
        raise L2DError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    target = shd.load_mesh(mesh)  # a wrong mesh fails before the weights load
    model, tokenizer, _ = load_any(model_path, dtype=dtype, mesh=target)
    is_l2d = not isinstance(model, LLM)
    steps = (8 if is_l2d else 0) if steps is None else steps
    ode_kw = {}
    temperature_override = None
    if is_l2d:
        ode_kw = dict(method=solver)
        if x1_estimation:
            ode_kw["x1_estimation"] = x1_estimation
        if ode_temperature is not None:
            try:
                temperature_override = float(ode_temperature)
            except ValueError:
                ode_kw["temperature"] = ode_temperature  # a schedule string: static
    ode = nstep_lib.ODEOptions.from_settings(model.settings, **ode_kw) if is_l2d else nstep_lib.ODEOptions()
    opts = GenerateOptions(max_new_tokens=max_new_tokens, ode=ode, max_ode_points=max(64, steps))
    return generate_text(model, tokenizer, prompts, chat=chat, system=system, batch_size=batch_size,
                         class_label=class_label, mesh=mesh, ode_steps=steps,
                         sampler=Sampler(temperature, top_p, top_k), ode_temperature=temperature_override,
                         guidance=guidance,
                         num_return_sequences=num_return_sequences, key=jax.random.PRNGKey(seed), opts=opts)
