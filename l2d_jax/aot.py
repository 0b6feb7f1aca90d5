"""Ahead-of-time compilation of the real programs for a TPU topology (``l2d-jax plan --aot-topology``).

libtpu compiles for a TPU slice on a machine without one (``jax.experimental.topologies``,
as MaxText's ``train_compile.py``). For a training config and a TPU topology this compiles:

- ``train``: the jitted train step (``Trainer.train_step``) on the config's mesh;
- ``generate``: the two generation programs of ``l2d_jax.generate`` (``prefill`` and the
  decoding ``while`` loop) at the evaluation batch, prompt bucket and new-token count of
  ``configs/benchmark.py`` (or flags), the model placed on the evaluation mesh by the
  config's sharding rules.

Each program's report (``compile_program``): ``fits`` (compiled, and XLA's peak per device
within the chip's HBM), ``peak_bytes`` (argument + output - alias + temp, per device),
``compile_s``, ``host_peak_rss_bytes`` (this process, sampled while compiling), ``flops`` and
``bytes_accessed`` per device with every loop's trip count (``l2d_jax.roofline``: XLA's own
cost analysis counts a loop body once; it is kept as ``xla_cost``), ``roofline_step_s`` =
max(FLOPs / chip peak, bytes / HBM bandwidth) from ``CHIPS``, and ``suggestion``.

An out-of-memory compile (XLA's ``RESOURCE_EXHAUSTED``) is a result: ``fits: false``, the
shortfall, and ``suggestion``: the first of a ladder of changes (``plan_tpu.py``) that,
compiled, fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import resource
import threading
import time
import warnings
from typing import Callable, Mapping

from l2d_jax.errors import L2DError

GIB = 2**30


class AOTError(L2DError, ValueError):
    """A topology or program that cannot be compiled for a reason other than memory."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Datasheet figures of one TPU chip (bf16 peak, HBM, HBM bandwidth) and their source."""

    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    cores: int  # TensorCores per chip; in megacore mode (Cloud TPU VMs' default) one JAX device
    source: str
    accelerator: str  # GCP accelerator-type prefix (v5litepod-8, ...)


# Google Cloud TPU system-architecture pages (per chip), as of 2026-12.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1228e9, 2, "https://cloud.google.com/tpu/docs/v4", "v4"),
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB, 819e9, 1, "https://cloud.google.com/tpu/docs/v5e", "v5litepod"),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9, 2, "https://cloud.google.com/tpu/docs/v5p", "v5p"),
    "v6e": Chip("TPU v6e", 918e12, 32 * GIB, 1640e9, 1, "https://cloud.google.com/tpu/docs/v6e", "v6e"),
}

TPU_INSTALL_HINT = ("ahead-of-time compilation for a TPU topology needs libtpu, which is not installed: "
                    "`./install.sh` (or `pip install -e '.[tpu]'`: libtpu must match the pinned jax), "
                    "then run `l2d-jax plan` again")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice for AOT compilation: its name, chip, devices (abstract) and per-device share."""

    name: str
    chip: Chip
    devices: tuple
    hbm_budget: int | None = None  # plan against less HBM than the chip has (headroom)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def devices_per_chip(self) -> int:
        chips = 1
        for n in self.name.split(":")[1].split("x"):
            chips *= int(n)
        return max(1, self.num_devices // chips)

    @property
    def hbm_bytes_per_device(self) -> int:
        chip = self.chip.hbm_bytes // self.devices_per_chip
        return chip if self.hbm_budget is None else min(chip, self.hbm_budget)

    @property
    def peak_flops_per_device(self) -> float:
        return self.chip.peak_flops / self.devices_per_chip

    @property
    def hbm_bandwidth_per_device(self) -> float:
        return self.chip.hbm_bandwidth / self.devices_per_chip


def _quiet_libtpu_env(generation: str, chips: int) -> dict:
    """Environment that keeps libtpu from probing for a TPU host (and printing "could not
    determine TPU accelerator type" / worker-hostname errors) on a machine without TPUs; left
    alone on a TPU VM (``/dev/accel*`` or ``/dev/vfio`` present), where libtpu needs its probes."""
    if os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):
        return {}
    chip = CHIPS[generation]
    return {"TPU_ACCELERATOR_TYPE": f"{chip.accelerator}-{chips * chip.cores}",
            "TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1",
            # compile-only: several processes (a sweep, tests beside a plan) may load libtpu at once
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology(name: str, hbm_budget: int | None = None) -> Topology:
    """The devices of a TPU topology such as ``v5e:2x4`` or ``v4:2x2x1`` (``hbm_budget``:
    bytes per device to plan against, when less than the chip's). AOTError naming the
    install command when libtpu is missing."""
    m = re.match(r"^(v\d+[a-z]?):(\d+(?:x\d+)*)$", name)
    if not m or m.group(1) not in CHIPS:
        raise AOTError(f"--aot-topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
                       f"{', '.join(CHIPS)}, e.g. v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4")
    chips = 1
    for n in m.group(2).split("x"):
        chips *= int(n)
    for k, v in _quiet_libtpu_env(m.group(1), chips).items():
        os.environ.setdefault(k, v)
    from jax.experimental import topologies

    # Two-TensorCore chips (v4, v5p) run in megacore mode on Cloud TPU VMs: one JAX device of the
    # chip's whole HBM (a v4-8 VM has 4 devices of 32 GiB). libtpu's compile-only default for v4
    # is one device per core (8 of 16 GiB), a mesh the real slice would refuse.
    options = {"chip_config_name": "megacore"} if CHIPS[m.group(1)].cores == 2 else {}
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **options)
    except (RuntimeError, ImportError, NotImplementedError, ValueError) as e:
        msg = " ".join(str(e).split())
        if "support not installed" in msg or "libtpu" in msg.lower() and "not found" in msg.lower():
            raise AOTError(f"{TPU_INSTALL_HINT} (JAX said: {msg[:200]})") from e
        raise AOTError(f"--aot-topology {name}: {msg[:300]}") from e
    return Topology(name, CHIPS[m.group(1)], tuple(topo.devices), hbm_budget)


# --------------------------------------------------------------------------- one program


@dataclasses.dataclass
class Program:
    """A program to compile: ``lower()`` -> a ``jax.stages.Lowered``; ``cost()`` -> its
    global ``roofline.Cost`` (trip counts included); ``tensor``: the tensor-parallel size."""

    name: str
    lower: Callable
    cost: Callable
    tensor: int = 1


class _RSSSampler:
    """Peak resident memory of this process while a block runs (VmRSS read every 20 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


# XLA:TPU's words: "... the total memory required for HLO temporaries (50.02G) exceeds available HBM (15.75G)"
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def _size(value: str, unit: str) -> int:
    return int(float(value) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _is_oom(e: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


def compile_program(program: Program, topo: Topology) -> dict:
    """Compiles ``program`` and reports it (see the module doc); an out-of-memory compile
    gives ``fits: False`` with ``oom`` (XLA's message, required/available bytes when given)."""
    t0 = time.perf_counter()
    out: dict = {"fits": False, "peak_bytes": None, "compile_s": None, "host_peak_rss_bytes": None,
                 "flops": None, "bytes_accessed": None, "roofline_step_s": None, "suggestion": None}
    with _RSSSampler() as rss, warnings.catch_warnings():
        # a persistent compilation cache (l2d_jax.compilation_cache) cannot hold a compile-only
        # TPU executable; JAX warns on the lookup and compiles
        warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
        try:
            compiled = program.lower().compile()
        except Exception as e:  # noqa: BLE001 - XLA's errors have no narrower public type
            if not _is_oom(e):
                raise
            compiled, msg = None, " ".join(str(e).split())
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    out["host_peak_rss_bytes"] = int(rss.peak)
    if compiled is None:
        m = _OOM.search(msg)
        oom = {"message": msg[:600]}
        if m:
            oom["required_bytes"] = _size(m.group(1), m.group(2))
            oom["available_bytes"] = _size(m.group(3), m.group(4))
            oom["shortfall_bytes"] = oom["required_bytes"] - oom["available_bytes"]
        out["oom"] = oom
        return out
    mem = compiled.memory_analysis()
    parts = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    peak = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
    out["memory"] = parts
    out["peak_bytes"] = peak
    out["fits"] = peak <= topo.hbm_bytes_per_device
    if not out["fits"]:
        out["oom"] = {"required_bytes": peak, "available_bytes": topo.hbm_bytes_per_device,
                      "shortfall_bytes": peak - topo.hbm_bytes_per_device}
    xla = compiled.cost_analysis() or {}
    if isinstance(xla, list):  # older jax: one dict per program
        xla = xla[0] if xla else {}
    out["xla_cost"] = {"flops": float(xla.get("flops", 0.0)), "bytes_accessed": float(xla.get("bytes accessed", 0.0)),
                       "note": "XLA counts each loop body once"}
    flops, nbytes = program.cost().per_device(topo.num_devices, program.tensor)
    out["flops"], out["bytes_accessed"] = flops, nbytes
    out["roofline_step_s"] = max(flops / topo.peak_flops_per_device, nbytes / topo.hbm_bandwidth_per_device)
    out["roofline_bound"] = "compute" if flops / topo.peak_flops_per_device >= nbytes / topo.hbm_bandwidth_per_device \
        else "memory"
    return out


def combine(reports: Mapping[str, dict]) -> dict:
    """One report of programs that run one after another (generation: prefill, then the
    decoding loop): fits if all do, peak = the largest, times and costs summed (each
    program's cost already counts its loops)."""
    rs = list(reports.values())
    fits = all(r["fits"] for r in rs)
    out = {"fits": fits,
           "peak_bytes": max((r["peak_bytes"] or 0 for r in rs), default=0) if fits else
           next((r["peak_bytes"] for r in rs if not r["fits"]), None),
           "compile_s": round(sum(r["compile_s"] or 0 for r in rs), 2),
           "host_peak_rss_bytes": max(r["host_peak_rss_bytes"] or 0 for r in rs),
           "suggestion": None, "programs": dict(reports)}
    if fits:
        for key in ("flops", "bytes_accessed", "roofline_step_s"):
            out[key] = sum(r[key] for r in rs)
    else:
        out.update(flops=None, bytes_accessed=None, roofline_step_s=None)
        out["oom"] = next(r.get("oom") for r in rs if not r["fits"])
    return out


# --------------------------------------------------------------------------- the programs


def _is_param_flags(args, n_param_args: int) -> list[bool]:
    """Per flattened leaf of ``args``: whether it belongs to the first ``n_param_args``."""
    import jax

    return [i < n_param_args for i, a in enumerate(args) for _ in jax.tree.leaves(a)]


def _model_shape(cfg, preset: str | None, dtype: str, param_dtype: str):
    """(LLMConfig, L2DSettings) of a training config, for the given dtypes."""
    from l2d_jax import config as config_lib, plan as plan_lib
    from l2d_jax.models.llm import LLMConfig

    hf, _ = plan_lib.model_hf_config(cfg.pretrained_model_dir, preset=preset)
    return LLMConfig.from_hf(hf, dtype=dtype, param_dtype=param_dtype), config_lib.l2d_settings(cfg)


def train_program(cfg, devices, *, preset: str | None = None, seq_len: int | None = None) -> Program:
    """The real jitted train step (``Trainer.train_step``) of ``cfg`` on its mesh over
    ``devices``, for abstract inputs (no weights): the state, the frozen base and one step's
    batch (accumulation x micro rows x the longest bucket)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from l2d_jax import plan as plan_lib, sharding as shd
    from l2d_jax.train import optim, step as step_lib

    devices = list(devices)
    sizes, _ = plan_lib.resolve_mesh(dict(cfg.get("mesh") or {}), len(devices))
    mesh = shd.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)
    rules = shd.rules_from_config(dict(cfg.get("sharding_rules") or {}))
    llm_cfg, settings = _model_shape(cfg, preset, cfg.dtype, cfg.param_dtype)
    model = plan_lib.abstract_model(llm_cfg, settings)
    tx, schedule = optim.make_optimizer(cfg, 1000, mask=lambda p: optim.decay_mask(p, settings, llm_cfg))
    trainer = step_lib.Trainer(model, step_lib.StepConfig.from_config(cfg), tx, schedule, mesh, rules)
    buckets = tuple(cfg.get("seq_len_buckets") or ())
    length = int(seq_len or (buckets[-1] if buckets else cfg.max_seq_len))
    state = trainer.abstract_state_with_shardings()
    _, _, frozen_state = nnx.split(model, plan_lib.trainable_filter(settings), ...)
    frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(frozen_state), trainer.frozen_shardings)
    batch = {}
    for name, sharding in trainer.batch_shardings(accumulated=True).items():
        shape = (trainer.accum, trainer.micro_rows) + (() if name == "class_labels" else (length,))
        batch[name] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)

    def cost():
        from l2d_jax import roofline

        flags = ([False] * len(jax.tree.leaves(state.step))
                 + [True] * len(jax.tree.leaves(state.params))
                 + [False] * len(jax.tree.leaves((state.opt_state, state.key)))
                 + [True] * len(jax.tree.leaves(frozen)) + [False] * len(jax.tree.leaves(batch)))
        return roofline.program_cost(jax.make_jaxpr(trainer.train_step)(state, frozen, batch), flags)

    return Program("train", lambda: trainer.train_step.lower(state, frozen, batch), cost, sizes["tensor"])


@dataclasses.dataclass(frozen=True)
class GenerationShape:
    """What one evaluation ``generate`` call holds: global rows, prompt bucket, new tokens,
    ODE grid points (0: the base model) and the mesh it runs on."""

    batch: int
    prompt_len: int
    new_tokens: int
    steps: int
    mesh: Mapping[str, int]

    @classmethod
    def from_benchmark(cls, bench, num_devices: int, **overrides) -> "GenerationShape":
        """Defaults of an evaluation config (``configs/benchmark.py``): batch =
        ``micro_batch_size`` (rounded up to the data-parallel size), prompt = the bucket of
        ``max_seq_len - generation_max_len`` (the longest prompt the evaluation keeps),
        ``generation_max_len`` new tokens, the largest of ``steps``, the config's mesh."""
        from l2d_jax import generate as gen, plan as plan_lib

        mesh, _ = plan_lib.resolve_mesh(dict(overrides.pop("mesh", None) or bench.get("mesh") or {"data": -1}),
                                        num_devices)
        new = int(overrides.pop("new_tokens", None) or bench.get("generation_max_len", 256))
        prompt = int(overrides.pop("prompt_len", None)
                     or gen.bucket_length(max(int(bench.get("max_seq_len", 2048)) - new, 1)))
        steps = overrides.pop("steps", None)
        if steps is None:
            steps = max(int(s) if str(s).strip().isdigit() else 0 for s in str(bench.get("steps", "0")).split(","))
        dp = mesh["data"] * mesh["fsdp"]
        batch = int(overrides.pop("batch", None) or bench.get("micro_batch_size", 64))
        return cls(-(-batch // dp) * dp, prompt, new, int(steps), mesh)


def generate_programs(cfg, bench, devices, shape: GenerationShape, *, preset: str | None = None) -> list[Program]:
    """``prefill`` and ``decode`` (``l2d_jax.generate``) of the L2D model of training config
    ``cfg`` with evaluation config ``bench``'s dtypes, ODE and sampler, at ``shape``, the
    parameters placed by the sharding rules on ``shape.mesh`` over ``devices``."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from l2d_jax import generate as gen, plan as plan_lib, roofline, sharding as shd
    from l2d_jax.evaluation import runner
    from l2d_jax.kernels import backend

    sizes = dict(shape.mesh)
    mesh = shd.make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=list(devices))
    rules = shd.rules_from_config(dict(cfg.get("sharding_rules") or {}))
    dtype = bench.get("dtype", "bfloat16")
    llm_cfg, settings = _model_shape(cfg, preset, dtype, bench.get("param_dtype") or dtype)
    graphdef, state = nnx.split(plan_lib.abstract_model(llm_cfg, settings))
    shardings = shd.state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                                     sharding=s)),
                         state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    model = nnx.merge(graphdef, state)
    b, p, n = shape.batch, shape.prompt_len, shape.new_tokens
    rows = shd.batch_sharding(mesh, 1)
    ids = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=shd.batch_sharding(mesh, 2))
    kernels = backend.resolve("xla", llm_cfg)

    def layout():  # FSDP: one layer's weights gathered at a time inside the scans over layers
        return shd.gather_layers(mesh, rules) if sizes["fsdp"] > 1 else contextlib.nullcontext()

    ode, sampler = runner.eval_ode_and_sampler(model, bench)
    opts = gen.GenerateOptions(max_new_tokens=n, ode=ode, max_ode_points=max(64, shape.steps))
    scalar = NamedSharding(mesh, P())
    prefill_lowered = {}

    def lower_prefill():
        with layout():
            prefill_lowered["x"] = gen._prefill_jit.lower(model, ids, ids, n, 1, kernels)
        return prefill_lowered["x"]

    @functools.cache  # decode's lowering and its cost both ask: prefill is compiled for it once
    def prefilled():
        """The decode's input: prefill's output, placed as XLA placed it (when compiled)."""
        lowered = prefill_lowered.get("x") or lower_prefill()
        try:
            placed = lowered.compile().output_shardings
        except Exception:  # noqa: BLE001 - prefill itself out of memory: the rules' placement
            kv = "tensor" if llm_cfg.num_kv_heads % sizes["tensor"] == 0 else None
            batch_axes = ("data", "fsdp")
            placed = gen.Prefilled({k: NamedSharding(mesh, P(None, batch_axes, kv)) for k in ("k", "v")},
                                   NamedSharding(mesh, P(batch_axes)), NamedSharding(mesh, P(batch_axes)),
                                   NamedSharding(mesh, P(batch_axes)))
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), lowered.out_info, placed)

    def decode_args():
        return (model, prefilled(), jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
                jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=scalar), jax.ShapeDtypeStruct((), jnp.int32),
                sampler, None, jax.ShapeDtypeStruct((), jnp.float32), None, None, jax.ShapeDtypeStruct((), jnp.int32))

    def lower_decode():
        with layout():
            return gen._decode_jit.lower(*decode_args(), opts, kernels)

    def prefill_cost():
        f = functools.partial(gen._prefill, n_new=n, repeats=1, kernels=kernels)
        with layout():
            return roofline.program_cost(jax.make_jaxpr(f)(model, ids, ids), _is_param_flags((model, ids, ids), 1))

    def decode_cost():
        args = decode_args()
        f = functools.partial(gen._decode, opts=opts, kernels=kernels)
        with layout():
            jaxpr = jax.make_jaxpr(f)(*args)
        # the decoding loop runs once per new token; inside it the ODE's loop once per interval
        return roofline.program_cost(jaxpr, _is_param_flags(args, 1), (n, max(shape.steps - 1, 1)))

    return [Program("prefill", lower_prefill, prefill_cost, sizes["tensor"]),
            Program("decode", lower_decode, decode_cost, sizes["tensor"])]
