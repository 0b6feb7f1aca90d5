"""What a launcher and a runbook need from ``l2d-jax plan`` besides memory per device.

- ``checkpoint_sizes``: bytes of one training checkpoint (``WORKDIR/checkpoints/<step>/state``:
  what ``train/loop.py`` saves, i.e. ``TrainState``: the trainable parameters as float32 master
  copies, the optimizer state, the step and the run key; the frozen base is NOT saved), of the
  final ``WORKDIR/export`` (frozen base in ``param_dtype``, trainable parameters in float32, as
  ``loop._export`` writes them; plus the tokenizer files, not counted) and of a ``convert
  export`` state_dict (the original's full state_dict, frozen base included, every key a copy,
  float32 or bfloat16). Tensor bytes: orbax adds some metadata, and compresses the training
  checkpoint (zstd), so its files may be smaller.
- ``epoch``: optimizer steps per epoch of the training data (``config.total_training_steps``)
  and, given a roofline step time (``--aot-topology``), steps x that time: each step's
  roofline is a LOWER BOUND (peak FLOP/s or HBM bandwidth, whichever binds; nothing
  measured) for a step padded to the longest bucket, which the plan compiles; steps padded
  to shorter buckets cost less, so the epoch figure is an estimate, not a bound.
- ``analytic_fit``: without a TPU topology, the analytic per-device total against a budget
  (``--hbm-gib``), walking ``plan_tpu.train_candidates`` (the same ladder the compiled plan
  walks) until a change fits.
- ``--emit-overrides FILE``: the ``--config.KEY=VALUE`` lines of a training configuration that
  fits (none when the given one fits; else the verified suggestion), for launch scripts.
- ``run_plan``: the ``l2d-jax plan`` command.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

from l2d_jax import plan as plan_lib, plan_tpu

# The released configs train on five HuggingFaceTB/smoltalk subsets (configs/base.py); the
# figure quoted for the paper's training data is ~0.9 M (README). Not counted here (no network
# when planning); a run writes the exact number of examples (one per assistant turn, after
# filtering) to WORKDIR/data_stats.json (train.examples) when it starts.
RELEASED_TRAIN_EXAMPLES = 900_000
EXIT_NO_FIT = 3  # as --require-fit


# --------------------------------------------------------------------------- checkpoint sizes


def checkpoint_sizes(cfg, *, preset: str | None = None) -> dict:
    """Bytes (whole model, all devices together) of what a run writes; see the module doc."""
    import jax
    import numpy as np
    from flax import nnx

    from l2d_jax.convert.original_names import original_tensors

    llm_cfg, settings, train_state, frozen_state, _ = plan_lib.model_parts(cfg, preset)
    train_pure, frozen_pure = nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen_state)
    _, opt_state = plan_lib.optimizer_state(cfg, settings, llm_cfg, train_pure)

    def nbytes(tree, dtype=None) -> int:
        return sum(int(math.prod(x.shape)) * np.dtype(dtype or x.dtype).itemsize for x in jax.tree.leaves(tree))

    trainable_f32 = nbytes(train_pure, np.float32)
    step_and_key = np.dtype(np.int32).itemsize + 2 * np.dtype(np.uint32).itemsize  # TrainState.step, .key
    state = trainable_f32 + nbytes(opt_state) + step_and_key

    numel = sum(math.prod(t.shape) for t in original_tensors(plan_lib.abstract_model(llm_cfg, settings)))
    return {"train_checkpoint_bytes": state,
            "export_bytes": nbytes(frozen_pure) + trainable_f32,
            "original_state_dict_bytes": {"float32": 4 * numel, "bfloat16": 2 * numel},
            "keep_checkpoints": int(cfg.get("keep_checkpoints") or 0)}


# --------------------------------------------------------------------------- durations


def train_examples(cfg, given: int | None = None) -> tuple[int | None, str]:
    """(number of training examples, where it comes from) for ``epoch``. An example is one
    assistant turn (``train/data.py``), so only a run counts them exactly: ``given`` (from
    ``--train-examples``), or ~0.9 M for the released data mix, else unknown."""
    from l2d_jax.config import sibling_config

    if given:
        return int(given), "--train-examples"
    specs = tuple(cfg.get("train_filepaths") or ())
    released = sibling_config(str(Path(__file__).resolve().parents[1] / "configs" / "base.py"), "base")
    if specs and specs == tuple(released.get_config().train_filepaths):
        return RELEASED_TRAIN_EXAMPLES, ("approximate: the ~0.9 M quoted for the paper's smoltalk data; the exact "
                                         "count is train.examples in a run's WORKDIR/data_stats.json")
    return None, ("steps per epoch unknown: pass --train-examples N (train.examples in a run's "
                  "WORKDIR/data_stats.json; one example per assistant turn)")


def epoch(cfg, n_examples: int | None, step_s: float | None = None) -> dict:
    """Steps per epoch and of the whole run (the loop's ``total_training_steps``) and, with a
    roofline ``step_s``, their roofline LOWER-BOUND durations."""
    from l2d_jax import config as config_lib

    if not n_examples:
        return {"train_examples": None}
    out = {"train_examples": int(n_examples),
           "steps_per_epoch": max(1, math.ceil(n_examples / int(cfg.n_samples_before_backprop))),
           "total_steps": config_lib.total_training_steps(cfg, int(n_examples))}
    if step_s:
        out.update(roofline_step_s=step_s, roofline_epoch_s=step_s * out["steps_per_epoch"],
                   roofline_total_s=step_s * out["total_steps"])
    return out


# --------------------------------------------------------------------------- what fits


def analytic_fit(cfg, budget_bytes: int, *, preset: str | None = None, seq_len: int | None = None,
                 total_bytes: int | None = None) -> dict:
    """The analytic plan against ``budget_bytes`` per device: fits, and when not, the first
    change of ``plan_tpu``'s train ladder whose analytic total fits (``cfg.mesh`` resolved)."""
    from l2d_jax.models.llm import LLMConfig

    total = total_bytes if total_bytes is not None else plan_tpu.estimate_train(cfg, preset, seq_len)
    out = {"hbm_bytes_per_device": int(budget_bytes), "peak_bytes": total, "fits": total <= budget_bytes}
    if not out["fits"]:
        hf, _ = plan_lib.model_hf_config(cfg.pretrained_model_dir, preset=preset)
        llm = LLMConfig.from_hf(hf)
        n = math.prod(int(cfg.mesh[k]) for k in plan_lib.MESH_AXES)

        def build(over):
            est = plan_tpu.estimate_train(plan_tpu.with_overrides(cfg, over), preset, seq_len)
            return {"fits": est <= budget_bytes, "peak_bytes": est, "compile_s": None, "roofline_step_s": None}

        candidates = plan_tpu.train_candidates(cfg, n, (llm.num_heads, llm.num_kv_heads))
        out["suggestion"] = plan_tpu.search_ladder(candidates, build, lambda o: None, budget_bytes, max_tries=None)
    return out


def fitting_overrides(train: Mapping) -> list[str] | None:
    """The ``--config.*`` lines of a training program report that fits (``[]`` when it fits as
    given, the suggestion's when that fits), None when nothing fits."""
    if train["fits"]:
        return []
    s = train.get("suggestion") or {}
    return plan_tpu.config_overrides(s["overrides"]) if s.get("overrides") and s.get("fits") else None


def write_overrides(path: str | os.PathLike, lines: list[str] | None) -> bool:
    """Writes ``lines`` (one per line; an empty file for ``[]``); for None removes a stale
    ``path`` and writes nothing. Returns whether it wrote."""
    path = Path(path)
    if lines is None:
        path.unlink(missing_ok=True)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return True


# --------------------------------------------------------------------------- the command


def format_launch(sizes: Mapping, ep: Mapping, source: str) -> str:
    """Human-readable lines: checkpoint sizes and durations."""
    def gb(n):
        return f"{n / 1e9:.2f} GB"

    sd = sizes["original_state_dict_bytes"]
    lines = [f"checkpoint  one training checkpoint {gb(sizes['train_checkpoint_bytes'])} (keeps "
             f"{sizes['keep_checkpoints']}); export {gb(sizes['export_bytes'])}; convert export "
             f"{gb(sd['float32'])} float32 / {gb(sd['bfloat16'])} bfloat16"]
    if ep.get("steps_per_epoch"):
        line = (f"epoch       {ep['train_examples']:,} examples ({source}): {ep['steps_per_epoch']:,} steps per "
                f"epoch, {ep['total_steps']:,} in the run")
        if ep.get("roofline_epoch_s"):
            line += (f"; roofline ({ep['roofline_of']}) {ep['roofline_epoch_s'] / 3600:.1f} h per epoch, "
                     f"{ep['roofline_total_s'] / 3600:.1f} h in all: steps x the roofline lower bound of one step "
                     f"at {ep['roofline_seq_len']} tokens (not a measurement; steps padded to shorter buckets "
                     "cost less)")
        lines.append(line)
    else:
        lines.append(f"epoch       {source}")
    return "\n".join(lines)


def run_plan(args, repo: Path) -> int:
    """``l2d-jax plan`` (``cli._add_plan`` holds the flags)."""
    from l2d_jax import aot, config as config_lib

    if args.sweep:
        table = plan_tpu.sweep(plan_tpu.released_configs(repo), [s for s in args.slices.split(",") if s],
                               Path(args.sweep))
        print(plan_tpu.markdown_table(table["rows"], table["meta"]))
        return 0
    if not args.config:
        raise plan_lib.PlanError("plan needs --config FILE (or --sweep DIR)")
    budget = None if args.hbm_gib is None else int(args.hbm_gib * 2**30)
    if args.emit_overrides and not (args.aot_topology or budget):
        raise plan_lib.PlanError("--emit-overrides needs a memory to fit: --aot-topology GEN:SHAPE (compiled) or "
                                 "--hbm-gib G with --devices N (analytic)")
    topo = aot.topology(args.aot_topology, budget) if args.aot_topology else None
    cfg = config_lib.load_config(args.config, args.overrides, validate=False)
    mesh = dict(cfg.mesh)
    mesh.update(plan_lib.parse_mesh(args.mesh))
    n = args.devices or (topo.num_devices if topo is not None else None)
    if n is None and (args.xla or -1 in mesh.values()):
        import jax

        n = jax.device_count()
    sizes, n = plan_lib.resolve_mesh(mesh, n)
    for k, v in sizes.items():
        cfg.mesh[k] = v
    config_lib.validate_config(cfg, num_devices=n, process_count=1)
    result = plan_lib.plan(cfg, preset=args.model, seq_len=args.seq_len, gen_batch=args.gen_batch,
                           gen_len=args.gen_len)
    if args.xla:
        result["xla"] = plan_lib.xla_memory(cfg, preset=args.model, seq_len=args.seq_len)
    print(plan_lib.format_plan(result))
    train = None
    if topo is not None:
        bench = config_lib.load_config(args.bench_config or repo / "configs" / "benchmark.py", [], validate=False)
        generation = {k: v for k, v in dict(mesh=plan_lib.parse_mesh(args.gen_mesh) or None, batch=args.gen_batch,
                                            prompt_len=args.gen_prompt_len, new_tokens=args.gen_new_tokens,
                                            steps=args.gen_steps).items() if v is not None}
        result["aot"] = plan_tpu.aot_report(cfg, bench, topo, preset=args.model, seq_len=args.seq_len,
                                            generation=generation, suggest=not args.no_suggest,
                                            programs=tuple(p for p in args.programs.split(",") if p))
        print(plan_tpu.format_aot(result["aot"]))
        train = result["aot"].get("train")
    elif budget:
        train = result["analytic_fit"] = analytic_fit(cfg, budget, preset=args.model, seq_len=args.seq_len,
                                                      total_bytes=result["total_bytes"])
        print(format_analytic(train))
    result["checkpoint"] = checkpoint_sizes(cfg, preset=args.model)
    n_examples, source = train_examples(cfg, args.train_examples)
    step_s, of = None, None
    if topo is not None and train is not None:  # the roofline of what will run: as given, or the suggestion
        of = "as given" if train["fits"] else "the suggestion"
        step_s = (train if train["fits"] else train.get("suggestion") or {}).get("roofline_step_s")
    result["epoch"] = dict(epoch(cfg, n_examples, step_s), source=source, roofline_of=of if step_s else None,
                           roofline_seq_len=result["seq_len"] if step_s else None)
    print(format_launch(result["checkpoint"], result["epoch"], source))
    if args.json:
        print(f"wrote {plan_lib.write_json(result, args.json)}")
    code = 0
    if args.emit_overrides:
        if train is None:
            raise plan_lib.PlanError("--emit-overrides needs the train program (--programs train[,generate])")
        lines = fitting_overrides(train)
        if write_overrides(args.emit_overrides, lines):
            print(f"wrote {args.emit_overrides} ({len(lines)} override(s){': fits as given' if not lines else ''})")
        else:
            print(f"plan: nothing tried fits; {args.emit_overrides} not written")
            code = EXIT_NO_FIT
    reports = ([result["aot"][k] for k in ("train", "generate") if k in result["aot"]] if topo is not None
               else [train] if train is not None else [])
    if args.require_fit and not all(r["fits"] for r in reports):
        print("plan: does not fit as configured (see the suggestions above)")
        code = EXIT_NO_FIT
    return code


def format_analytic(a: Mapping) -> str:
    """Lines of ``analytic_fit``'s dict."""
    def gib(n):
        return f"{n / 2**30:.2f} GiB"

    lines = [f"analytic    fits {str(a['fits']).lower()} ({gib(a['peak_bytes'])} of {gib(a['hbm_bytes_per_device'])} "
             "per device; the analytic plan, not compiled)"]
    s = a.get("suggestion")
    if s:
        lines.append(f"            fits with: {s['flags']} ({gib(s['peak_bytes'])}, analytic)" if s.get("overrides")
                     else f"            {s['note']}")
    return "\n".join(lines)
