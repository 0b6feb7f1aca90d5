"""What fits a TPU slice, and the change that makes it fit (``l2d-jax plan --aot-topology``, ``--sweep``).

``aot_report`` compiles a training config's train step and its generation programs for a TPU
topology (``l2d_jax.aot``) and, for a program that does not fit, walks a ladder of changes
from the smallest up, compiling each until one fits (the ``suggestion``, verified):

- train: full remat; the data axis turned into fsdp (parameters, gradients and optimizer
  state sharded; with ``SHARD_FLOW``, so that the flow path's own matrices are sharded too);
  both; then halving the micro batch (more accumulation steps, same optimizer step); then
  tensor parallelism.
- The analytic plan (no topology, ``l2d_jax.plan_launch``) walks the same train ladder,
  comparing the analytic per-device total with the budget instead of compiling.
- generate: tensor parallelism over the heads (the largest size dividing the devices and
  the KV heads); then halving the evaluation batch.

A change whose analytic estimate (``l2d_jax.plan``) is over ``SKIP_ABOVE`` x the HBM is not
compiled, and at most ``MAX_TRIES`` are. ``sweep`` runs every released config on a list of
slices, one process per pair (memory and host RSS of one pair at a time), resumable, and
writes ``sweep.json`` and a Markdown table.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from l2d_jax import aot

MAX_TRIES = 3
SKIP_ABOVE = 1.5  # candidates estimated above this x HBM are not compiled
SLICES = ("v5p:2x2x1", "v5e:2x4", "v4:2x2x1", "v6e:2x4")  # 8-chip-class slices (v5p-8, v5e-8, v4-8, v6e-8)


# The flow path's own matrices (modulation heads, token embedder, LoRA factors; logical axes
# flow_in / flow_out) are replicated by default (sharding.RULES). Once the parameters are
# sharded over fsdp they are the largest replicated part left (Llama-3.1-8B: ~0.2 B parameters,
# 0.75 GiB float32 + 1.5 GiB of Adam moments per device), so the sharding rungs shard them too.
SHARD_FLOW = {"sharding_rules.flow_in": "fsdp", "sharding_rules.flow_out": "tensor"}


def _shard_flow(cfg) -> dict:
    """``SHARD_FLOW`` minus the rules the config already sets."""
    rules = dict(cfg.get("sharding_rules") or {})
    return {k: v for k, v in SHARD_FLOW.items() if k.split(".", 1)[1] not in rules}


def _flags(overrides: Mapping) -> str:
    parts = []
    for key, value in overrides.items():
        if key in ("mesh", "gen_mesh"):
            flag = "--mesh" if key == "mesh" else "--gen-mesh"
            parts.append(f"{flag} " + ",".join(f"{k}={v}" for k, v in value.items()))
        elif key == "gen_batch":
            parts.append(f"--gen-batch {value}")
        else:
            parts.append(f"--config.{key}={value}")
    return " ".join(parts)


def config_overrides(overrides: Mapping) -> list[str]:
    """A train ladder change as ``--config.KEY=VALUE`` arguments, one per item (the mesh as
    all three ``--config.mesh.*`` sizes): what ``l2d-jax plan --emit-overrides`` writes."""
    out = []
    for key, value in overrides.items():
        if key in ("gen_mesh", "gen_batch"):
            raise ValueError(f"{key} is an evaluation flag, not a training config override")
        if key == "mesh":
            out += [f"--config.mesh.{k}={int(value[k])}" for k in ("data", "fsdp", "tensor")]
        else:
            out.append(f"--config.{key}={value}")
    return out


def with_overrides(cfg, overrides: Mapping):
    """A copy of ``cfg`` with a ladder change applied (``mesh``: axis sizes; dotted keys such
    as ``sharding_rules.flow_in``: one entry of a sub-dict)."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        if key == "mesh":
            for k, v in value.items():
                out.mesh[k] = v
        elif "." in key:
            parent, name = key.split(".", 1)
            out[parent] = {**dict(out.get(parent) or {}), name: value}
        else:
            out[key] = value
    if overrides.get("remat_policy") not in (None, "none"):
        out.remat = True
    return out


def _divisors_up(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def train_candidates(cfg, num_devices: int, heads: tuple[int, int]) -> Iterator[dict]:
    """Config overrides, smallest change first (see the module doc)."""
    from l2d_jax.train.step import remat_policy

    mesh = {k: int(cfg.mesh[k]) for k in ("data", "fsdp", "tensor")}
    dp = mesh["data"] * mesh["fsdp"]
    full = {} if remat_policy(cfg) == "full" else {"remat_policy": "full"}
    sharded = {"mesh": dict(mesh, data=1, fsdp=dp)} if mesh["data"] > 1 else {}
    if dp > 1:
        sharded.update(_shard_flow(cfg))
    seen = []
    for c in (full, sharded, {**sharded, **full}):
        if c and c not in seen:
            seen.append(c)
            yield c
    micro, n_step = int(cfg.micro_batch_size), int(cfg.n_samples_before_backprop)
    base = {**sharded, **full}
    m = micro // 2
    while m >= 1:
        if n_step % (m * dp) == 0:
            yield {**base, "micro_batch_size": m}
        m //= 2
    for t in _divisors_up(num_devices // mesh["tensor"]):
        tensor = mesh["tensor"] * t
        if heads[0] % tensor or heads[1] % tensor or num_devices % tensor:
            continue
        rest = num_devices // tensor
        if n_step % (micro * rest):
            continue
        yield {**full, "mesh": {"data": 1, "fsdp": rest, "tensor": tensor}, **_shard_flow(cfg)}


def generate_candidates(shape: aot.GenerationShape, num_devices: int, heads: tuple[int, int]) -> Iterator[dict]:
    """Generation overrides (``gen_mesh``, ``gen_batch``), smallest change first."""
    tensors = [t for t in _divisors_up(num_devices) if t > shape.mesh["tensor"]
               and heads[0] % t == 0 and heads[1] % t == 0]
    base = {"gen_mesh": {"data": num_devices // tensors[-1], "fsdp": 1, "tensor": tensors[-1]}} if tensors else {}
    if base:
        yield base
    mesh = base.get("gen_mesh", shape.mesh)
    b = shape.batch // 2
    while b >= mesh["data"] * mesh["fsdp"]:
        yield {**base, "gen_batch": b}
        b //= 2


def estimate_train(cfg, preset, seq_len) -> float:
    """The analytic plan's training bytes per device (inf for a change the plan rejects)."""
    from l2d_jax import plan

    try:
        return plan.plan(cfg, preset=preset, seq_len=seq_len)["total_bytes"]
    except plan.PlanError:
        return math.inf


def search_ladder(candidates, build, estimate, hbm_bytes: int, max_tries: int | None = MAX_TRIES) -> dict:
    """The first candidate that ``build`` says fits (a compile, or the analytic plan);
    ``tried`` lists the others. ``estimate``: analytic bytes (None: unknown) that skip a
    candidate above ``SKIP_ABOVE`` x ``hbm_bytes`` unbuilt; ``max_tries``: builds at most."""
    tried = []
    for overrides in candidates:
        if max_tries is not None and len(tried) >= max_tries:
            break
        est = estimate(overrides)
        if est is not None and est > SKIP_ABOVE * hbm_bytes:
            continue
        report = build(overrides)
        entry = {"overrides": overrides, "flags": _flags(overrides), "fits": report["fits"],
                 "peak_bytes": report["peak_bytes"], "compile_s": report["compile_s"]}
        if "gen_mesh" in overrides or "gen_batch" in overrides:  # the same change for l2d-jax eval
            entry["eval_flags"] = " ".join(
                ([f"--mesh {','.join(f'{k}={v}' for k, v in overrides['gen_mesh'].items())}"]
                 if "gen_mesh" in overrides else [])
                + ([f"--batch-size {overrides['gen_batch']}"] if "gen_batch" in overrides else []))
        if report["fits"]:
            return dict(entry, roofline_step_s=report["roofline_step_s"], tried=tried)
        tried.append(entry)
    return {"overrides": None, "fits": False, "tried": tried,
            "note": "none of the changes tried fits: a larger slice (more devices, or more HBM per device)"}


def aot_report(cfg, bench, topo: aot.Topology, *, preset: str | None = None, seq_len: int | None = None,
               generation: Mapping | None = None, suggest: bool = True, programs=("train", "generate")) -> dict:
    """The ``aot`` section of ``l2d-jax plan`` (see the module doc). ``cfg``'s mesh must be
    resolved for ``topo``; ``generation``: ``GenerationShape.from_benchmark`` overrides."""
    from l2d_jax.models.llm import LLMConfig
    from l2d_jax import plan as plan_lib

    hf, _ = plan_lib.model_hf_config(cfg.pretrained_model_dir, preset=preset)
    llm = LLMConfig.from_hf(hf)
    heads = (llm.num_heads, llm.num_kv_heads)
    out = {"topology": topo.name, "chip": topo.chip.name, "num_devices": topo.num_devices,
           "devices_per_chip": topo.devices_per_chip, "hbm_bytes_per_device": topo.hbm_bytes_per_device,
           "peak_flops_per_device": topo.peak_flops_per_device,
           "hbm_bandwidth_per_device": topo.hbm_bandwidth_per_device, "chip_source": topo.chip.source}
    if "train" in programs:
        out["train_mesh"] = {k: int(cfg.mesh[k]) for k in ("data", "fsdp", "tensor")}

        def build(over):
            return aot.compile_program(aot.train_program(with_overrides(cfg, over), topo.devices, preset=preset,
                                                         seq_len=seq_len), topo)

        train = build({})
        if not train["fits"] and suggest:
            train["suggestion"] = search_ladder(
                train_candidates(cfg, topo.num_devices, heads), build,
                lambda o: estimate_train(with_overrides(cfg, o), preset, seq_len), topo.hbm_bytes_per_device)
        out["train"] = train
    if "generate" in programs:
        shape = aot.GenerationShape.from_benchmark(bench, topo.num_devices, **dict(generation or {}))

        def build_gen(over):
            s = aot.GenerationShape.from_benchmark(
                bench, topo.num_devices, **{**dict(generation or {}), "mesh": over.get("gen_mesh", shape.mesh),
                                            "batch": over.get("gen_batch", shape.batch)})
            reports = {p.name: aot.compile_program(p, topo)
                       for p in aot.generate_programs(cfg, bench, topo.devices, s, preset=preset)}
            return aot.combine(reports)

        gen = build_gen({})
        gen["shape"] = {"batch": shape.batch, "prompt_len": shape.prompt_len, "new_tokens": shape.new_tokens,
                        "steps": shape.steps, "mesh": dict(shape.mesh)}
        if not gen["fits"] and suggest:
            gen["suggestion"] = search_ladder(generate_candidates(shape, topo.num_devices, heads), build_gen,
                                              lambda o: None, topo.hbm_bytes_per_device)
        out["generate"] = gen
    return out


def format_aot(a: Mapping) -> str:
    """Human-readable lines of ``aot_report``'s dict."""
    def gib(n):
        return "-" if n is None else f"{n / 2**30:.2f} GiB"

    lines = [f"AOT {a['topology']} ({a['chip']}, {a['num_devices']} devices, {gib(a['hbm_bytes_per_device'])} "
             "HBM each)"]
    for name in ("train", "generate"):
        r = a.get(name)
        if r is None:
            continue
        step = "-" if r.get("roofline_step_s") is None else f"{r['roofline_step_s'] * 1e3:.1f} ms"
        lines.append(f"  {name:9s} fits {str(r['fits']).lower():5s} peak {gib(r['peak_bytes'])}, compile "
                     f"{r['compile_s']:.1f} s, host RSS {gib(r['host_peak_rss_bytes'])}, roofline {step}")
        if r.get("oom", {}).get("shortfall_bytes"):
            lines.append(f"            short by {gib(r['oom']['shortfall_bytes'])}")
        s = r.get("suggestion")
        if s:
            if s.get("overrides"):
                lines.append(f"            fits with: {s['flags']} (peak {gib(s['peak_bytes'])}, verified by compiling)")
                if s.get("eval_flags"):
                    lines.append(f"            (l2d-jax eval {s['eval_flags']})")
            else:
                lines.append(f"            {s['note']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sweep


def released_configs(repo: Path) -> list[Path]:
    """The released training configs (``configs/*_lad*.py``), smallest model first."""
    return sorted((repo / "configs").glob("*_lad*.py"), key=lambda p: (_size_key(p.name), p.name))


def _size_key(name: str) -> float:
    import re

    m = re.search(r"_(\d+(?:\.\d+)?)([bm])_", name)
    return float(m.group(1)) * (1e-3 if m and m.group(2) == "m" else 1) if m else math.inf


def sweep(configs: Sequence[Path], slices: Sequence[str], out_dir: Path, *, timeout_s: int = 1800) -> dict:
    """``l2d-jax plan --aot-topology`` for every (config, slice), one process each (resumable:
    a pair whose JSON exists is not rerun); returns and writes ``sweep.json`` and ``README.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for topo in slices:  # slice by slice: every config gets one slice before any gets two
        for cfg in configs:
            path = out_dir / f"{cfg.stem}__{topo.replace(':', '_')}.json"
            if path.exists():
                continue
            t0 = time.perf_counter()
            print(f"[sweep] {cfg.name} on {topo} ...", flush=True)
            cmd = [sys.executable, "-m", "l2d_jax.cli", "plan", "--config", str(cfg), "--aot-topology", topo,
                   "--json", str(path), *_fit_batch(cfg, aot.topology(topo).num_devices)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise aot.AOTError(f"sweep: {' '.join(cmd)} exited {proc.returncode}")
            print(f"[sweep] {cfg.name} on {topo}: {time.perf_counter() - t0:.0f} s", flush=True)
    return write_table(out_dir)


def _fit_batch(path: Path, num_devices: int) -> list[str]:
    """Overrides that make a config valid on ``num_devices`` data-parallel devices: the micro
    batch lowered so that micro x devices divides the samples per optimizer step (the step
    itself unchanged)."""
    from l2d_jax import config as config_lib

    cfg = config_lib.load_config(path, [], validate=False)
    micro, n_step = int(cfg.micro_batch_size), int(cfg.n_samples_before_backprop)
    if n_step % (micro * num_devices) == 0 or n_step % num_devices:
        return []
    return [f"--config.micro_batch_size={max(1, math.gcd(micro, n_step // num_devices))}"]


def write_table(out_dir: Path) -> dict:
    """Collects a sweep's JSON files into ``sweep.json`` and the Markdown table ``README.md``."""
    import jax

    rows = []
    for path in out_dir.glob("*__*.json"):
        p = json.loads(path.read_text())
        rows.append({"config": path.name.split("__")[0], "plan": p})
    order = {s: i for i, s in enumerate(SLICES)}
    rows.sort(key=lambda r: (order.get(r["plan"].get("aot", {}).get("topology"), len(order)),
                             _size_key(r["config"] + ".py"), r["config"]))
    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # noqa: BLE001
        libtpu = "?"
    meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "libtpu": libtpu}
    (out_dir / "sweep.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, sort_keys=True) + "\n")
    (out_dir / "README.md").write_text(markdown_table(rows, meta))
    return {"meta": meta, "rows": rows}


def _cell(r: Mapping) -> str:
    if r is None:
        return "-"
    gib = (r.get("peak_bytes") or 0) / 2**30
    if r["fits"]:
        return f"yes {gib:.1f} GiB, {r['compile_s']:.0f} s, {r['roofline_step_s'] * 1e3:.0f} ms"
    s = r.get("suggestion") or {}
    if s.get("overrides"):
        return (f"no; fits with `{s['flags']}`: {s['peak_bytes'] / 2**30:.1f} GiB, {s['compile_s']:.0f} s, "
                f"{s['roofline_step_s'] * 1e3:.0f} ms")
    tried = len(s.get("tried", []))
    return f"no; none of {tried} change(s) compiled fits: a larger slice" if s else "no (out of memory)"


def markdown_table(rows: Sequence[Mapping], meta: Mapping) -> str:
    """The sweep as Markdown: one row per (config, slice), train and generate columns."""
    lines = [f"# TPU AOT sweep: released configs x slices ({meta['date']}, jax {meta['jax']}, libtpu {meta['libtpu']})",
             "",
             "Produced by `l2d-jax plan --sweep docs/bench/tpu_aot/sweep` on a CPU-only host (2 cores, 24 GiB):",
             "each cell is XLA's compile for that TPU slice: fits / peak HBM per device / compile wall time /",
             "roofline time (train: one optimizer step; generate: one evaluation call, prefill + every new",
             "token at the benchmark's largest step count). Not fitting: the smallest change found that",
             "fits, itself compiled. Shapes: the config's mesh (data over all devices unless set), train at",
             "the longest bucket; generate at `configs/benchmark.py` (batch, prompt bucket, new tokens).",
             "Every chip is one device, as on Cloud TPU VMs (v4 and v5p in megacore mode: v4-8 = 4 x 32 GiB). Compile",
             "times depend on the host's load (README: the figures' conditions).",
             "",
             "| config | slice (devices) | train as planned | train | generate (eval mesh) | generate |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        p = row["plan"]
        a = p.get("aot", {})
        mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
        train = f"{mesh}; micro {p['micro_batch_size']} x {p['seq_len']}, {p['accumulation_steps']} accum"
        g = (a.get("generate") or {}).get("shape", {})
        gen = (",".join(f"{k}={v}" for k, v in g.get("mesh", {}).items() if v > 1) +
               f"; {g.get('batch')} x {g.get('prompt_len')} + {g.get('new_tokens')}, {g.get('steps')} points")
        lines.append(f"| {row['config']} | {a.get('topology', '?')} ({a.get('num_devices')}) | {train} | "
                     f"{_cell(a.get('train'))} | {gen} | {_cell(a.get('generate'))} |")
    return "\n".join(lines) + "\n"
