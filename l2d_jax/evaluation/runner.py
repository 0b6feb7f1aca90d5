"""Benchmark runner: several tasks x several ODE step counts in one run, resumable.

``evaluate(model, tokenizer, tasks, steps, out_dir=...)`` renders every task's few-shot
chat prompts once, then for each task and batch of prompts generates at every step count
with ``l2d_jax.generate`` (batched, jitted, the batch sharded over the process's devices),
scores each completion with the task, appends it to its file after every batch, and
writes, as soon as a task finishes:

- ``DIR/completions/<task>_<step>.jsonl``: one row per completion (id, sample, prompt,
  completion, extracted, correct, formatted, nfe, new_tokens, reference, meta, score),
  enough to recompute every score (:func:`rescore`);
- ``DIR/parts/<task>_<step>.json``: that entry of the results;
- ``DIR/results.json``, ``DIR/results.md``, ``DIR/accuracy_vs_steps.png``: rebuilt from all
  parts after each entry.

Schema of ``results.json`` (one schema for every consumer)::

    {"accuracy": {step: mean accuracy over the tasks that have this step},
     "mean_nfe": {step: mean over tasks of the mean NFE per generated token},
     "tasks": {task: {step: {"n", "n_eval", "n_skipped", "accuracy", "format_accuracy",
                             "ci95": [lo, hi], "mean_nfe", "pass_at_k" (code tasks),
                             "new_tokens", "seconds"}}},
     "steps": [step, ...], "task_names": [...], "config": {...}}

A step is ``"base"`` (the base model alone, ``ode_steps = 0``) or the number of ODE grid
points as a string (``"8"``); with several guidance weights a step reads ``"8@g1.5"``.
``n`` = examples scored, ``n_eval`` = completions scored (n x samples), ``n_skipped`` =
examples dropped because prompt + reference answer exceed ``max_seq_len`` tokens (the
original's filter). ``ci95`` is the Wilson interval when every example is scored 0/1, else
the normal interval of the per-example means. ``mean_nfe`` is token-weighted: velocity
evaluations per generated token (midpoint with N grid points: 2 (N - 1)).

Compilation: ``ode_steps``, the guidance weight and the temperatures are run-time values of
the compiled generation program, so every step count of a task reuses the programs
compiled for the first one (one per prompt-length bucket). Batches are the outer loop and
step counts the inner one: each batch's prompts are prefilled once (``generate.prefill``) and
every step count (and guidance weight) decodes from that cache.

Randomness: the key of a task is ``task_key(seed, task)``; row r of example i uses sample
index ``i * num_samples + j``, so a completion depends on (seed, task, example, sample,
step) only, not on the batch it ran in; hence resuming and re-batching give the same text.

Devices: each process builds ONE mesh over its own local devices (``mesh``: data x fsdp x
tensor sizes; default every device data-parallel, the model replicated; fsdp / tensor > 1
shard the model's parameters by the logical-axis rules, for a model larger than one device),
so a model-parallel group never spans hosts (its collectives stay on a host's links; a model
larger than one host's devices is not supported); batch rows go over (data, fsdp)
(``_prepare_mesh``).

Several processes (``jax.process_count() > 1``, after ``l2d_jax.distributed.initialize``;
every process runs the same ``evaluate`` call): data parallelism between hosts: for each
task, each process generates and scores its contiguous share (``process_shard``) of the
prompts still pending at some step; the rows are exchanged after every batch
(``gather_objects``) and only process 0 writes files. Process 0 alone reads ``out_dir``
(the run-file check, the rows already done) and shares what it found (``on_main``), so
every process agrees on the pending prompts and ``out_dir`` need only be on process 0's
storage. Example indices (hence sample indices and keys) are global: the files are those
of a one-process run, and a run may resume with another process count.

``out_dir`` may be ``gs://bucket/path`` (``l2d_jax.storage``): ``evaluate`` / ``rescore`` then
work on a local copy of it (its files downloaded first, so a rerun resumes) and upload new
and changed files when they return or fail; a killed run keeps what the last upload held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from l2d_jax import storage
from l2d_jax.convert import loading
from l2d_jax.errors import L2DError, UsageError

BASE = "base"
SHARED_CATEGORIES = ("math", "coding", "general_qa", "other")
RUN_FILE = "run.json"
# Settings that change completions: a rerun in the same out_dir must match them.
_FINGERPRINT_KEYS = ("model", "ode", "code_ode_temperature", "sampler", "ode_temperature", "seed",
                     "max_new_tokens", "num_samples", "chat_template", "chat_template_kwargs",
                     "max_seq_len", "guidance_categories", "stop_ids")


# =========================================================================== steps


def step_label(step, guidance: float | None = None, several_weights: bool = False) -> str:
    """``"base"`` for 0 / "base", else the grid-point count as a string (``"8"``);
    ``"8@g1.5"`` when several guidance weights are swept."""
    if isinstance(step, str) and step.strip().lower() in (BASE, "0"):
        return BASE
    try:
        n = int(step)
    except (TypeError, ValueError):
        raise L2DError(f"step {step!r}: use 'base' / 0 (the base model) or a grid-point count >= 2")
    if n == 0:
        return BASE
    if n < 2:
        raise L2DError(f"step {n}: ode_steps counts ODE grid points, so it is 0 (base model) or >= 2")
    if several_weights and guidance is not None:
        return f"{n}@g{guidance:g}"
    return str(n)


def parse_label(label: str) -> tuple[int, float | None]:
    """``"base"`` -> (0, None); ``"8"`` -> (8, None); ``"8@g1.5"`` -> (8, 1.5)."""
    if label == BASE:
        return 0, None
    if "@g" in label:
        n, g = label.split("@g", 1)
        return int(n), float(g)
    return int(label), None


def parse_steps(steps: str | Iterable) -> list:
    """``"0,2,4,8"`` or ``[0, "base", 4]`` -> ``["base", 2, 4, 8]`` style list (deduplicated)."""
    if isinstance(steps, str):
        steps = [s for s in steps.replace(" ", "").split(",") if s]
    out: list = []
    for s in steps:
        lab = step_label(s)
        v = BASE if lab == BASE else int(lab)
        if v not in out:
            out.append(v)
    if not out:
        raise L2DError("no step counts given")
    return out


def task_key(seed, task_name: str):
    """The PRNG key of one task: fold_in(PRNGKey(seed), crc32(task name)); ``seed`` is an int
    or a raw PRNG key."""
    import jax

    base = seed if getattr(seed, "shape", ()) else jax.random.PRNGKey(int(seed))
    return jax.random.fold_in(base, zlib.crc32(task_name.encode()) & 0x7FFFFFFF)


# =========================================================================== statistics


def wilson_interval(successes: float, n: int, z: float = 1.96) -> list[float]:
    if n <= 0:
        return [0.0, 0.0]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mcnemar_exact(wrong_to_right: int, right_to_wrong: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    n, k = wrong_to_right + right_to_wrong, min(wrong_to_right, right_to_wrong)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_vs_base(base_rows: dict, rows: dict) -> dict:
    """Before/after on the same problems: completions of a step count against the base
    model's, matched on (example id, sample). Counts of wrong -> right and right -> wrong and
    the exact McNemar p-value."""
    keys = sorted(set(base_rows) & set(rows))
    w2r = sum(1 for k in keys if not base_rows[k]["correct"] and rows[k]["correct"])
    r2w = sum(1 for k in keys if base_rows[k]["correct"] and not rows[k]["correct"])
    return {"n_pairs": len(keys), "wrong_to_right": w2r, "right_to_wrong": r2w,
            "mcnemar_p": mcnemar_exact(w2r, r2w)}


def ci95(values: Sequence[float]) -> list[float]:
    """Wilson interval for 0/1 values, else mean +- 1.96 standard errors (clipped to [0, 1])."""
    n = len(values)
    if n == 0:
        return [0.0, 0.0]
    v = np.asarray(values, np.float64)
    if np.all((v == 0) | (v == 1)):
        return wilson_interval(float(v.sum()), n)
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return [max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)]


# =========================================================================== prompts


@dataclasses.dataclass
class Prompt:
    index: int  # position in task.examples()
    example: Any
    text: str
    ids: list[int]


def chat_settings(tokenizer, chat_template: str | None, chat_template_kwargs: dict | None):
    """(template text or None, kwargs): a name from ``l2d_jax.train.templates.TEMPLATES``
    (``fixed_date_llama3``, ``base_llama``), Jinja text, or None (the tokenizer's own; the
    plain ``base_llama`` Question/Answer format when the tokenizer has none). The kwargs
    default to ``date_string="26 Jul 2024"`` (the original's fixed date; ignored by
    templates that do not read it)."""
    from l2d_jax.train import templates

    kwargs = {"date_string": templates.FIXED_DATE}
    kwargs.update(chat_template_kwargs or {})
    if chat_template in templates.TEMPLATES:
        return templates.TEMPLATES[chat_template], kwargs
    if chat_template:
        return chat_template, kwargs
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn("the tokenizer has no chat template: prompts use the plain 'base_llama' "
                      "### Question ### / ### Answer ### format", stacklevel=3)
        return templates.BASE_LLAMA, kwargs
    return None, kwargs


def render_task(task, tokenizer, *, chat_template=None, chat_template_kwargs=None,
                max_seq_len: int | None = None) -> tuple[list[Prompt], int]:
    """(prompts kept, number skipped) for ``task.examples()``: the chat-rendered prompt text and
    its token ids (``add_special_tokens=False``: the template writes BOS itself). An example is
    skipped when prompt + reference answer (``meta["target"]``) exceed ``max_seq_len``."""
    from l2d_jax.evaluation.tasks.base import render_prompt

    template, kwargs = chat_settings(tokenizer, chat_template, chat_template_kwargs)
    kept, skipped = [], 0
    for i, ex in enumerate(task.examples()):
        text = render_prompt(tokenizer, ex.prompt_messages, tokenize=False, chat_template=template, **kwargs)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_seq_len:
            target = ex.meta.get("target") if isinstance(ex.meta, dict) else None
            extra = len(tokenizer(str(target), add_special_tokens=False)["input_ids"]) if target else 0
            if len(ids) + extra > max_seq_len:
                skipped += 1
                continue
        kept.append(Prompt(i, ex, text, ids))
    return kept, skipped


def class_label(task, example, guidance_categories: Sequence[str] | None, num_classes: int) -> int | None:
    """The guidance class of an example: the index of its shared category
    (``meta["guidance_category"]``; code tasks: "coding") in ``guidance_categories`` (the
    original's order math, coding, general_qa, other); without ``guidance_categories``, the
    index of ``example.category`` in ``task.category_names()``. None: unconditional."""
    meta = example.meta if isinstance(example.meta, dict) else {}
    if guidance_categories:
        name = meta.get("guidance_category") or ("coding" if getattr(task, "is_code", False) else None)
        if name is None or name not in guidance_categories:
            return None
        idx = list(guidance_categories).index(name)
    else:
        if example.category is None:
            return None
        idx = task.category_names().index(example.category)
    if idx >= num_classes:
        raise L2DError(f"guidance class {idx} ({meta.get('guidance_category') or example.category!r}) "
                       f"but the model has {num_classes} classes; set guidance_categories to the "
                       "training run's list")
    return idx


# =========================================================================== files


def _label_file(label: str) -> str:
    return label.replace("/", "_")


def completions_path(out_dir, task: str, label: str) -> Path:
    return Path(out_dir) / "completions" / f"{task}_{_label_file(label)}.jsonl"


def part_path(out_dir, task: str, label: str) -> Path:
    return Path(out_dir) / "parts" / f"{task}_{_label_file(label)}.json"


def read_rows(path: Path) -> dict[tuple[str, int], dict]:
    """(id, sample) -> row of a completions file (a torn last line is ignored)."""
    rows: dict[tuple[str, int], dict] = {}
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[(str(r["id"]), int(r.get("sample", 0)))] = r
    return rows


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# =========================================================================== generation


@dataclasses.dataclass
class _Gen:
    """What the generation of one task needs (built once per evaluate call)."""

    model: Any
    tokenizer: Any
    sampler: Any
    ode_temperature: float | None
    batch_size: int
    pad_id: int
    eos_id: int
    stop_ids: tuple[int, ...]
    mesh: Any  # this process's mesh (None: one device); generation is traced under gather_layers(mesh)
    guided: bool
    num_classes: int
    guidance_categories: tuple[str, ...] | None


def _decode(tokenizer, tokens: Sequence[int], stop_ids: tuple[int, ...]) -> str:
    out = []
    for t in tokens:
        if int(t) in stop_ids:
            break
        out.append(int(t))
    return tokenizer.decode(out, skip_special_tokens=True)


def _batches(g: _Gen, prompts: list[Prompt]):
    """Yields (chunk of ``g.batch_size`` prompts, number of real ones, ids, mask): longest
    prompts first, the last chunk filled with copies of its first prompt."""
    from l2d_jax.generate import bucket_length, left_pad

    order = sorted(prompts, key=lambda p: (-len(p.ids), p.index))
    bs = g.batch_size
    for start in range(0, len(order), bs):
        chunk = order[start:start + bs]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (bs - real)
        ids, mask = left_pad([p.ids for p in chunk], g.pad_id, bucket_length(max(len(p.ids) for p in chunk)))
        if g.mesh is not None:
            import jax

            from l2d_jax.sharding import batch_sharding

            ids = jax.device_put(ids, batch_sharding(g.mesh, 2))
            mask = jax.device_put(mask, batch_sharding(g.mesh, 2))
        yield chunk, real, ids, mask


def _class_labels(g: _Gen, task, chunk: list[Prompt]) -> np.ndarray | None:
    """Guidance class per prompt (null class where none); None (unconditional batch) without
    guidance or when the batch's first item has none (the original's rule)."""
    if not g.guided or class_label(task, chunk[0].example, g.guidance_categories, g.num_classes) is None:
        return None
    labels = [class_label(task, p.example, g.guidance_categories, g.num_classes) for p in chunk]
    return np.asarray([g.num_classes if c is None else c for c in labels], np.int32)


def _generate_batch(g: _Gen, chunk: list[Prompt], real: int, ids, mask, labels, prefilled, ode_steps: int,
                    guidance: float | None, opts, key, num_samples: int) -> list[tuple]:
    """(prompt, sample, completion, nfe, new_tokens) for the real prompts of one batch."""
    from l2d_jax.generate import generate
    from l2d_jax.sharding import gather_layers

    sample_ids = np.asarray([p.index * num_samples + j for p in chunk for j in range(num_samples)], np.int32)
    with gather_layers(g.mesh):
        out = generate(g.model, ids, mask, key=key, ode_steps=ode_steps, sampler=g.sampler,
                       ode_temperature=g.ode_temperature, guidance=guidance, class_labels=labels,
                       eos_id=g.eos_id, sample_ids=sample_ids, num_return_sequences=num_samples, opts=opts,
                       prefilled=prefilled)
    tokens, lengths, nfe = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.nfe)
    results = []
    for i in range(real):
        for j in range(num_samples):
            r = i * num_samples + j
            results.append((chunk[i], j, _decode(g.tokenizer, tokens[r, : lengths[r]].tolist(), g.stop_ids),
                            float(nfe[r]), int(lengths[r])))
    return results


# =========================================================================== evaluate


def _resolve_tasks(tasks, limit, task_options, allow_unsandboxed) -> list:
    from l2d_jax.evaluation.tasks import get_task

    out = []
    for t in tasks:
        if isinstance(t, str):
            kw = dict((task_options or {}).get(t, {}))
            if limit is not None:
                kw["limit"] = limit
            task = get_task(t, **kw)
        else:
            task = t
            if limit is not None:
                task.limit = limit
        out.append(task)
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise L2DError(f"a task is listed twice: {names}")
    return out


def _check_code_ready(task, allow_unsandboxed: bool) -> None:
    if not getattr(task, "is_code", False):
        return
    if allow_unsandboxed:
        if hasattr(task, "allow_unsandboxed"):
            task.allow_unsandboxed = True
        task.options["allow_unsandboxed"] = True
    task.check_ready()


def _model_kind(model) -> str:
    from l2d_jax.models.llm import LLM

    return "base" if isinstance(model, LLM) else "l2d"


def default_ode(model, **overrides):
    """The paper's protocol: midpoint, x1 SAMPLED at ODE temperature 0 (i.e. the argmax), the
    rest (normalisation, final t, velocity schedule, rescaling) from the model's settings."""
    from l2d_jax.nstep import ODEOptions

    kw = dict(method="midpoint", x1_estimation="sample", temperature=0.0)
    kw.update(overrides)
    if _model_kind(model) == "l2d":
        return ODEOptions.from_settings(model.settings, **kw)
    return ODEOptions(**kw)


def _prepare_mesh(model, data_parallel: bool, mesh_sizes: Mapping[str, int] | None = None):
    """(mesh or None, data-parallel size data x fsdp): THIS process's mesh over its own local
    devices (``sharding.local_mesh(mesh_sizes)``; default data=-1: every device
    data-parallel) with the model's parameters placed on it by the logical-axis rules:
    replicated on a data-only mesh, sharded over fsdp / tensor otherwise (one model-parallel
    group per host; nothing moves for a model loaded onto this mesh, ``run_from_config``'s).
    With several processes each has its own mesh: they generate different prompts, and
    nothing crosses hosts but the finished rows. None (nothing moved) for a single device, or
    without ``data_parallel`` (then fsdp and tensor must be 1)."""
    from l2d_jax import sharding as shd

    if not data_parallel:
        if any((mesh_sizes or {}).get(axis, 1) != 1 for axis in ("fsdp", "tensor")):
            raise UsageError(f"mesh {dict(mesh_sizes)} shards the model, but data_parallel=False runs it on one "
                             "device: pass data_parallel=True")
        return None, 1
    mesh = shd.inference_mesh(model, mesh_sizes)
    return mesh, 1 if mesh is None else shd.data_parallel_size(mesh)


@storage.local_working_copy("out_dir")
def evaluate(model, tokenizer, tasks: Sequence, steps: Sequence = (BASE,), *, out_dir,
             batch_size: int = 16, ode=None, code_ode_temperature: float | str | None = "polynomial_1_1.0",
             sampler=None, ode_temperature: float | None = None,
             guidance: float | Sequence[float] | None = None,
             guidance_categories: Sequence[str] | None = SHARED_CATEGORIES,
             key: int = 0, limit: int | None = None, max_new_tokens: int | None = None,
             num_samples: int | None = None, max_seq_len: int | None = 2048,
             max_ode_points: int | None = None, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, task_options: dict | None = None,
             stop_ids: Sequence[int] = (), data_parallel: bool = True,
             mesh: Mapping[str, int] | None = None, allow_unsandboxed: bool = False, progress: bool = True,
             run_info: dict | None = None, plot: bool = True) -> dict:
    """Evaluates ``model`` on ``tasks`` at each of ``steps``; returns the results dict (see
    the module docstring) and writes it under ``out_dir``.

    model: an ``L2DModel`` or a base ``LLM`` (then only the step "base"/0 is allowed).
    tasks: names (``get_task(name, limit=limit, **task_options[name])``) or Task objects.
    steps: "base"/0 and/or grid-point counts >= 2. batch_size: prompts per generate call
    of a process (rounded up to a multiple of its mesh's data x fsdp; rows = prompts x
    samples). mesh: {data, fsdp, tensor} sizes of each process's mesh over its local devices
    (``_prepare_mesh``; the model is placed on it in place). ode: an
    ``ODEOptions`` (default :func:`default_ode`: midpoint, sampled x1 at temperature 0);
    code tasks use ``code_ode_temperature`` instead (the original: ``polynomial_1_1.0``).
    sampler: next-token ``Sampler`` (default temperature 1.0, no top-k / top-p).
    guidance: CFG weight(s); several weights are swept as extra steps ``"N@gW"`` (None:
    the model's ``nstep_guidance_parameter``). guidance_categories: class names in class
    index order (None: index of the example's category in ``task.category_names()``).
    key: an integer seed (or a raw PRNG key). limit: first N examples of each task.
    max_new_tokens / num_samples:
    override the tasks' values. max_seq_len: skip examples whose prompt + reference exceed
    it. chat_template: a name (``fixed_date_llama3``, ``base_llama``), Jinja text, or None
    (the tokenizer's). stop_ids: extra token ids that end a completion (besides EOS).
    allow_unsandboxed: let code tasks run generated code without the sandbox. run_info:
    recorded in ``run.json`` (its "model" entry is part of the resume check).

    Several processes: every one calls this with the same arguments (collective; see the
    module docstring) and gets the results; only process 0 writes.
    """
    from l2d_jax import distributed
    from l2d_jax.generate import GenerateOptions, compiled_programs
    from l2d_jax.sampling import Sampler

    out = Path(out_dir)
    kind = _model_kind(model)
    step_values = parse_steps(steps)
    weights = list(guidance) if isinstance(guidance, (list, tuple)) else [guidance]
    several = len(weights) > 1
    runs: list[tuple[str, int, float | None]] = []
    for s in step_values:
        if s == BASE:
            runs.append((BASE, 0, None))
        else:
            for w in weights:
                runs.append((step_label(s, w, several), int(s), w))
    if kind == "base" and any(n for _, n, _ in runs):
        bad = [lab for lab, n, _ in runs if n]
        raise L2DError(f"the model is a base model (no flow path): only step 'base' / 0 can run, "
                       f"not {', '.join(bad)}. Pass an L2D checkpoint for ODE steps.")
    sampler = Sampler(1.0) if sampler is None else sampler
    if ode is None:
        ode = default_ode(model)
    from l2d_jax.nstep import FIXED_GRID

    if ode.method not in FIXED_GRID and len({n for _, n, _ in runs if n}) > 1:
        raise L2DError(f"ode method {ode.method!r} is adaptive: its step count only switches the flow path "
                       "on (the solver picks its own steps; see mean_nfe), so give one step >= 2 besides 0")
    max_points = max_ode_points or max([64] + [n for _, n, _ in runs])
    task_objs = _resolve_tasks(tasks, limit, task_options, allow_unsandboxed)
    for t in task_objs:
        _check_code_ready(t, allow_unsandboxed)

    config = {
        "model": (run_info or {}).get("model"), "model_kind": kind,
        "ode": dataclasses.asdict(ode), "code_ode_temperature": code_ode_temperature,
        "sampler": {"temperature": float(sampler.temperature), "top_p": float(sampler.top_p),
                    "top_k": int(sampler.top_k)},
        "ode_temperature": ode_temperature,
        "seed": np.asarray(key).tolist() if getattr(key, "shape", ()) else int(key),
        "max_new_tokens": max_new_tokens,
        "num_samples": num_samples, "chat_template": chat_template,
        "chat_template_kwargs": chat_template_kwargs or {}, "max_seq_len": max_seq_len,
        "guidance_categories": list(guidance_categories) if guidance_categories else None,
        "stop_ids": [int(s) for s in stop_ids], "guidance": weights if several else weights[0],
        "batch_size": batch_size, "limit": limit, "run_info": run_info or {},
        "task_sources": {t.name: t.source for t in task_objs},
    }
    distributed.on_main(lambda: _check_run_file(out, config))

    placed, dp = _prepare_mesh(model, data_parallel, mesh)
    bs = -(-max(1, int(batch_size)) // dp) * dp
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    guided = kind == "l2d" and bool(model.settings.use_guidance)
    gen = _Gen(model=model, tokenizer=tokenizer, sampler=sampler, ode_temperature=ode_temperature,
               batch_size=bs, pad_id=int(pad), eos_id=-1 if eos is None else int(eos),
               stop_ids=tuple(int(s) for s in stop_ids) + (() if eos is None else (int(eos),)),
               mesh=placed, guided=guided,
               num_classes=int(model.settings.guidance_modulation_num_classes or 0) if guided else 0,
               guidance_categories=tuple(guidance_categories) if guidance_categories else None)

    compiles_before = compiled_programs()
    for task in task_objs:
        n_samples = int(num_samples or task.num_samples)
        n_new = int(max_new_tokens or task.max_new_tokens)
        task_ode = ode
        if task.is_code and code_ode_temperature is not None:
            task_ode = dataclasses.replace(ode, temperature=code_ode_temperature)
        opts = GenerateOptions(max_new_tokens=n_new, ode=task_ode, max_ode_points=max_points)
        prompts, skipped = render_task(task, tokenizer, chat_template=chat_template,
                                       chat_template_kwargs=chat_template_kwargs, max_seq_len=max_seq_len)
        _run_task(gen, task, runs, prompts, skipped, opts, task_key(key, task.name), n_samples, out,
                  progress, plot)
    results = distributed.on_main(lambda: write_results(out, plot=plot), default=_jsonable)
    results["compiles"] = compiled_programs() - compiles_before
    return results


def _check_run_file(out: Path, config: dict) -> None:
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in _FINGERPRINT_KEYS if json.dumps(old.get(k), sort_keys=True, default=_jsonable)
                != json.dumps(config.get(k), sort_keys=True, default=_jsonable)]
        if diff:
            raise L2DError(f"{out} holds results of a different evaluation (differs in: {', '.join(diff)}); "
                           "use another out_dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, config)


def _run_task(gen: _Gen, task, runs: list[tuple[str, int, Any]], prompts: list[Prompt], skipped: int,
              opts, key, n_samples: int, out: Path, progress: bool, plot: bool) -> None:
    """Generates and scores, for every (label, ode_steps, guidance) of ``runs``, the rows of
    this task that its completions file lacks, then writes each file (example order) and
    part. Batches are the outer loop and the runs the inner one, so each batch's prompts
    are prefilled ONCE (``generate.prefill``) and every step count decodes from that cache.

    Several processes: process 0 reads the files and names each run's pending prompts;
    each process takes its contiguous share (``process_shard``) of the prompts pending for
    any run; after every batch the processes exchange their new rows (``_share_rows``) and
    process 0 appends them, so an interrupted run resumes from the rows written. Only
    process 0 writes."""
    from l2d_jax import distributed
    from l2d_jax.generate import prefill
    from l2d_jax.sharding import gather_layers

    main = distributed.is_main_process()
    paths = {label: completions_path(out, task.name, label) for label, _, _ in runs}
    rows: dict[str, dict[tuple[str, int], dict]] = {label: {} for label in paths}

    def pending_indices() -> dict[str, list[int]]:
        found = {}
        for label, path in paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows[label].update(read_rows(path))
            found[label] = [i for i, p in enumerate(prompts)
                            if any((str(p.example.id), j) not in rows[label] for j in range(n_samples))]
        return found

    pending = {label: set(ix) for label, ix in distributed.on_main(pending_indices).items()}
    union = sorted(set().union(*pending.values()))
    seconds = {label: 0.0 for label in paths}
    if union:
        bar = None
        if progress and main:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(map(len, pending.values())), desc=f"{task.name} {', '.join(paths)}", unit="ex",
                       file=sys.stderr, leave=True, dynamic_ncols=True)
        with contextlib.ExitStack() as stack:
            files = {label: stack.enter_context(open(path, "a", encoding="utf-8"))
                     for label, path in paths.items()} if main else {}

            def keep(new_rows: list[dict]) -> None:  # process 0: every process's new rows
                if not main:
                    return
                for row in new_rows:
                    label = row.pop("_label")
                    rows[label][(row["id"], row["sample"])] = row
                    files[label].write(json.dumps(row, default=_jsonable) + "\n")
                for f in files.values():
                    f.flush()
                if bar is not None:  # one update per batch: tqdm may skip the display of rapid ones
                    bar.update(sum(row["sample"] == 0 for row in new_rows))

            mine = [prompts[union[i]] for i in distributed.process_shard(len(union))]
            for chunk, real, ids, mask in _batches(gen, mine):
                with gather_layers(gen.mesh):
                    pre = prefill(gen.model, ids, mask, opts.max_new_tokens, n_samples, opts.kernels)
                labels = _class_labels(gen, task, chunk)
                new_rows = []
                for label, ode_steps, weight in runs:
                    if not any(p.index in pending[label] for p in chunk[:real]):
                        continue
                    t0 = time.perf_counter()
                    items = [it for it in _generate_batch(gen, chunk, real, ids, mask, labels, pre, ode_steps,
                                                          weight, opts, key, n_samples)
                             if it[0].index in pending[label]]
                    scores = task.score_many([(p.example, c) for p, _, c, _, _ in items])
                    new_rows += [dict(_row(p, j, c, nfe, n_tok, sc), _label=label)
                                 for (p, j, c, nfe, n_tok), sc in zip(items, scores)]
                    seconds[label] += time.perf_counter() - t0
                keep(_share_rows(new_rows, False)[0])
            done = False
            while not done:  # the other processes' last batches
                new_rows, done = _share_rows([], True)
                keep(new_rows)
        if bar is not None:
            bar.close()
    if not main:
        return
    for label, ode_steps, weight in runs:
        _write_part(task, label, ode_steps, weight, prompts, skipped, rows[label], n_samples, out,
                    seconds[label] if pending[label] else None)
    write_results(out, plot=plot)


def _write_part(task, label: str, ode_steps: int, weight, prompts: list[Prompt], skipped: int,
                rows: dict[tuple[str, int], dict], n_samples: int, out: Path, seconds: float | None) -> None:
    """Rewrites one (task, step)'s completions in example order and writes its part (seconds
    None: nothing was generated now; the part's earlier figure is kept)."""
    path = completions_path(out, task.name, label)
    ordered = [rows[(str(p.example.id), j)] for p in prompts for j in range(n_samples)]
    extra = [r for k, r in rows.items() if k[0] not in {str(p.example.id) for p in prompts}]
    _rewrite_rows(path, ordered + extra)
    entry = summarize(task, [[rows[(str(p.example.id), j)]["score"] for j in range(n_samples)]
                             for p in prompts], ordered)
    entry["n_skipped"] = int(skipped)
    if getattr(task, "num_dropped", 0):
        entry["n_dropped"] = int(task.num_dropped)
    old = part_path(out, task.name, label)
    if seconds is None and old.is_file():
        seconds = json.loads(old.read_text()).get("seconds", 0.0)
    entry["seconds"] = seconds or 0.0
    entry["ode_steps"] = ode_steps
    if weight is not None:
        entry["guidance"] = weight
    entry["ids"] = [str(p.example.id) for p in prompts]
    entry["task"], entry["step"] = task.name, label
    _write_json(old, entry)


def _share_rows(local: list[dict], done: bool) -> tuple[list[dict], bool]:
    """(every process's new rows in process order, whether every process has finished its
    share). Collective: each process calls it once per batch with ``done`` False, then with
    no rows and ``done`` True until every process is done. One process: its own rows."""
    from l2d_jax.distributed import gather_objects

    got = gather_objects([{"rows": local, "done": done}], default=_jsonable)
    return [r for g in got for r in g["rows"]], all(g["done"] for g in got)


def _row(p: Prompt, sample: int, completion: str, nfe: float, n_tok: int, score: dict) -> dict:
    ex = p.example
    return {"id": str(ex.id), "sample": sample, "index": p.index, "prompt": p.text,
            "completion": completion, "extracted": score.get("extracted"),
            "correct": bool(score.get("correct")), "formatted": bool(score.get("formatted")),
            "nfe": nfe, "new_tokens": n_tok, "reference": ex.reference, "category": ex.category,
            "meta": ex.meta, "score": score}


def _rewrite_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=_jsonable) + "\n")
    os.replace(tmp, path)


def summarize(task, per_example: list[list[dict]], rows: list[dict]) -> dict:
    """One results entry: the task's aggregate plus n_eval, ci95, mean_nfe, new_tokens."""
    agg = dict(task.aggregate(per_example))
    per = [sum(bool(s.get("correct")) for s in ss) / len(ss) for ss in per_example if ss]
    agg["n_eval"] = sum(len(ss) for ss in per_example)
    agg["ci95"] = ci95(per)
    toks = sum(int(r.get("new_tokens", 0)) for r in rows)
    agg["mean_nfe"] = (sum(float(r.get("nfe", 0.0)) * int(r.get("new_tokens", 0)) for r in rows) / toks
                       if toks else 0.0)
    agg["new_tokens"] = toks
    return agg


# =========================================================================== results files


def _label_sort_key(label: str):
    n, g = parse_label(label)
    return (n, -1.0 if g is None else g)


def collect_results(out_dir) -> dict:
    """results.json content from every ``parts/*.json`` under ``out_dir``."""
    out = Path(out_dir)
    config = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
    tasks: dict[str, dict] = {}
    for p in sorted((out / "parts").glob("*.json")):
        entry = json.loads(p.read_text())
        task, label = entry.get("task"), entry.get("step")
        if task is None or label is None:
            continue
        e = {k: v for k, v in entry.items() if k not in ("ids", "task", "step")}
        tasks.setdefault(task, {})[label] = e
    labels = sorted({lab for t in tasks.values() for lab in t}, key=_label_sort_key)
    for t in tasks:
        tasks[t] = {lab: tasks[t][lab] for lab in labels if lab in tasks[t]}
        base_path = completions_path(out, t, BASE)
        if BASE in tasks[t] and base_path.is_file():
            base_rows = read_rows(base_path)
            for lab, e in tasks[t].items():
                path = completions_path(out, t, lab)
                if lab != BASE and path.is_file():
                    e["paired_vs_base"] = paired_vs_base(base_rows, read_rows(path))
    acc, nfe = {}, {}
    for lab in labels:
        have = [tasks[t][lab] for t in tasks if lab in tasks[t]]
        acc[lab] = float(np.mean([e["accuracy"] for e in have]))
        nfe[lab] = float(np.mean([e.get("mean_nfe", 0.0) for e in have]))
    return {"accuracy": acc, "mean_nfe": nfe, "tasks": tasks, "steps": labels,
            "task_names": sorted(tasks), "config": config}


@storage.local_working_copy("out_dir")
def write_results(out_dir, plot: bool = True) -> dict:
    """Rebuilds results.json / results.md / accuracy_vs_steps.png from the parts."""
    out = Path(out_dir)
    res = collect_results(out)
    _write_json(out / "results.json", res)
    res["out_dir"] = str(out)
    (out / "results.md").write_text(results_markdown(res))
    if plot and res["tasks"]:
        plot_results(res, out / "accuracy_vs_steps.png")
    return res


def results_markdown(res: dict) -> str:
    labels = res["steps"]
    lines = ["# Accuracy vs. ODE steps", ""]
    cfg = res.get("config", {})
    if cfg:
        ode = cfg.get("ode") or {}
        lines.append(f"model: `{cfg.get('model')}` ({cfg.get('model_kind')}); ODE {ode.get('method')}, "
                     f"x1 {ode.get('x1_estimation')} at T={ode.get('temperature')}; token temperature "
                     f"{(cfg.get('sampler') or {}).get('temperature')}; seed {cfg.get('seed')}")
        lines.append("")
    head = "| task | " + " | ".join("base" if lab == BASE else f"{lab} steps" for lab in labels) + " |"
    lines += ["Accuracy (%) with 95% interval; mean NFE per token in brackets.", "", head,
              "|" + "---|" * (len(labels) + 1)]
    for task, by_label in res["tasks"].items():
        cells = []
        for lab in labels:
            e = by_label.get(lab)
            if e is None:
                cells.append("")
                continue
            lo, hi = e.get("ci95", [0, 0])
            cell = f"{100 * e['accuracy']:.2f} ({100 * lo:.1f}-{100 * hi:.1f})"
            if lab != BASE:
                cell += f" [{e.get('mean_nfe', 0):.1f}]"
            cell += f" n={e['n']}"
            cells.append(cell)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * res['accuracy'][lab]:.2f}**" for lab in labels) + " |")
    lines += ["", "Format accuracy (%): an answer could be extracted.", "",
              "| task | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for task, by_label in res["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(
            f"{100 * by_label[lab]['format_accuracy']:.2f}" if lab in by_label else "" for lab in labels) + " |")
    paired = [(t, lab, e["paired_vs_base"]) for t, b in res["tasks"].items() for lab, e in b.items()
              if "paired_vs_base" in e]
    if paired:
        lines += ["", "Paired with the base model on the same problems (exact McNemar test).", "",
                  "| task | step | pairs | wrong -> right | right -> wrong | p |", "|---|---|---|---|---|---|"]
        for t, lab, pv in paired:
            lines.append(f"| {t} | {lab} | {pv['n_pairs']} | {pv['wrong_to_right']} | {pv['right_to_wrong']} | "
                         f"{pv['mcnemar_p']:.3g} |")
    code = {t: b for t, b in res["tasks"].items() if any("pass_at_k" in e for e in b.values())}
    if code:
        lines += ["", "pass@k (%)", "", "| task | step | " + "pass@k |", "|---|---|---|"]
        for task, by_label in code.items():
            for lab, e in by_label.items():
                pk = e.get("pass_at_k") or {}
                lines.append(f"| {task} | {lab} | " + ", ".join(f"{k}: {100 * v:.2f}" for k, v in pk.items()) + " |")
    return "\n".join(lines) + "\n"


def plot_results(res: dict, path) -> None:
    """Accuracy vs. step count per task and the mean over tasks (error bars: ci95); the base
    model as a dashed horizontal line in the same colour."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = dict(res["tasks"])
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    xs_all = set()
    n_series = len(series) + 1
    for i, (task, by_label) in enumerate(list(series.items()) + [("mean", None)]):
        dodge = 2.0 ** (0.025 * (i - (n_series - 1) / 2))  # keep error bars apart on the log axis
        color = "black" if task == "mean" else colors[i % len(colors)]
        if task == "mean":
            points = {lab: (res["accuracy"][lab], None) for lab in res["steps"]}
        else:
            points = {lab: (e["accuracy"], e.get("ci95")) for lab, e in by_label.items()}
        by_weight: dict = {}
        for lab, (acc, ci) in points.items():
            n, g = parse_label(lab)
            if n == 0:
                ax.axhline(100 * acc, color=color, ls="--", lw=1, alpha=0.7)
                continue
            by_weight.setdefault(g, []).append((n, acc, ci))
        for g, pts in by_weight.items():
            pts.sort()
            xs_all.update(p[0] for p in pts)
            x = [p[0] * dodge for p in pts]
            y = [100 * p[1] for p in pts]
            err = None
            if all(p[2] for p in pts):
                err = np.array([[100 * (p[1] - p[2][0]) for p in pts], [100 * (p[2][1] - p[1]) for p in pts]])
                err = np.clip(err, 0, None)
            name = task if g is None else f"{task} (g={g:g})"
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color,
                        lw=2.5 if task == "mean" else 1.5, label=name)
        if not by_weight and any(parse_label(lab)[0] == 0 for lab in points):
            ax.plot([], [], color=color, ls="--", label=f"{task} (base)")
    if xs_all:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs_all))
        ax.set_xticklabels([str(x) for x in sorted(xs_all)])
        ax.minorticks_off()
    ax.set_xlabel("ODE grid points per token (dashed: base model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs. ODE steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


# =========================================================================== rescore


@storage.local_working_copy("out_dir")
def rescore(out_dir, *, allow_unsandboxed: bool = False, plot: bool = True) -> dict:
    """Recomputes every (task, step) entry from ``completions/*.jsonl`` with the tasks' own
    ``score`` / ``aggregate`` (no model, no dataset download: references are in the rows),
    rewrites the parts and results files and returns the results."""
    from l2d_jax.evaluation.tasks import get_task
    from l2d_jax.evaluation.tasks.base import Example

    out = Path(out_dir)
    for part in sorted((out / "parts").glob("*.json")):
        entry = json.loads(part.read_text())
        name, label = entry["task"], entry["step"]
        task = get_task(name)
        _check_code_ready(task, allow_unsandboxed)
        rows = read_rows(completions_path(out, name, label))
        ids = entry.get("ids") or sorted({k[0] for k in rows})
        by_id: dict[str, list[dict]] = {}
        for (rid, j), r in sorted(rows.items(), key=lambda kv: (kv[1].get("index", 0), kv[0][1])):
            if rid in ids:
                by_id.setdefault(rid, []).append(r)
        pairs, flat = [], []
        for rid in ids:
            for r in by_id.get(rid, []):
                ex = Example(id=r["id"], prompt_messages=[], reference=r.get("reference"),
                             category=r.get("category"), meta=r.get("meta") or {})
                pairs.append((ex, r["completion"]))
                flat.append(r)
        scores = task.score_many(pairs)
        per_example, k = [], 0
        for rid in ids:
            m = len(by_id.get(rid, []))
            per_example.append([dict(s) for s in scores[k:k + m]])
            k += m
        new = summarize(task, per_example, flat)
        for key in ("n_skipped", "n_dropped", "seconds", "ode_steps", "guidance", "ids", "task", "step"):
            if key in entry:
                new[key] = entry[key]
        _write_json(part, new)
        for r, s in zip(flat, scores):
            r.update(score=s, extracted=s.get("extracted"), correct=bool(s.get("correct")),
                     formatted=bool(s.get("formatted")))
        _rewrite_rows(completions_path(out, name, label), list(rows.values()))
    return write_results(out, plot=plot)


# =========================================================================== config / CLI


def load_eval_config(path, overrides: Iterable[str] = ()):
    """``get_config()`` of an eval config file (``configs/benchmark.py``) with ``key=value``
    overrides, each parsed as the type of the key's current value."""
    import ast

    from l2d_jax.config import load_config

    import ml_collections

    cfg = ml_collections.ConfigDict(load_config(path, validate=False).to_dict(), type_safe=False)
    for item in overrides or ():
        item = item[2:] if item.startswith("--") else item
        item = item[len("config."):] if item.startswith("config.") else item
        if "=" not in item:
            raise L2DError(f"override {item!r}: use key=value")
        k, raw = item.split("=", 1)
        if k not in cfg:
            import difflib

            close = difflib.get_close_matches(k, list(cfg.keys()), n=1)
            raise L2DError(f"override {item!r}: unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        old = cfg[k]
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise L2DError(f"override {item!r}: {k} takes true/false")
            value = raw.lower() in ("true", "1", "yes")
        elif isinstance(old, (int, float)) and not isinstance(old, bool):
            try:
                value = type(old)(raw) if not (isinstance(old, int) and "." in raw) else float(raw)
            except ValueError:
                value = raw  # e.g. a float key given "polynomial_1_1.0"
        elif isinstance(old, (tuple, list)):
            value = tuple(ast.literal_eval(raw)) if raw.strip()[:1] in "([" else tuple(
                s for s in raw.split(",") if s)
        elif isinstance(old, str) or old is None:
            value = raw
        else:
            value = ast.literal_eval(raw)
        cfg[k] = value
    return cfg


def run_from_config(cfg, ckpt: str, *, steps=None, out_dir=None, limit=None, tasks=None,
                    batch_size=None, allow_unsandboxed=None, progress: bool = True, model=None,
                    tokenizer=None, mesh: str | None = None) -> dict:
    """What ``l2d-jax eval`` does: load ``ckpt``, build the tasks and settings from ``cfg``
    (``configs/benchmark.py`` keys), run :func:`evaluate`. Arguments given here override the
    config's (``mesh``: ``"data=N,fsdp=N,tensor=N"``, any subset, over the config's ``mesh``
    dict). A base model with steps other than 0 is rejected before anything is loaded when
    the checkpoint kind can be told from its files. The model loads straight onto this
    process's mesh (``sharding.load_mesh``: each device receives only its shards), so
    :func:`evaluate` moves nothing. Several processes: each loads the model onto its own
    devices and calls :func:`evaluate` (collective)."""
    from l2d_jax.plan import parse_mesh
    from l2d_jax.sharding import load_mesh

    steps = parse_steps(steps if steps is not None else cfg.get("steps", "0,8"))
    task_names = [t for t in str(tasks if tasks is not None else cfg.get("tasks", "")).replace(" ", "").split(",") if t]
    if limit is None:
        limit = cfg.get("limit", -1)
    limit = None if limit is None or int(limit) < 0 else int(limit)
    mesh_sizes = {**dict(cfg.get("mesh") or {}), **parse_mesh(mesh)}
    target = load_mesh(mesh_sizes)  # a wrong mesh fails before the weights load
    if out_dir:
        storage.check_access(out_dir, write=True)  # so do a bad scheme and an unwritable bucket
    if model is None:
        _reject_base_early(ckpt, steps)
        model, tokenizer, desc = loading.load_any(ckpt, dtype=cfg.get("dtype", "float32"),
                                                  param_dtype=cfg.get("param_dtype") or None,
                                                  tokenizer_dir=cfg.get("tokenizer_dir") or None, mesh=target)
    else:
        desc = {"ckpt": str(ckpt)}
    out = out_dir or cfg.get("out_dir") or str(Path("eval_results") / (Path(str(ckpt)).name or "model"))
    ode, sampler = eval_ode_and_sampler(model, cfg)
    g = cfg.get("nstep_guidance_parameter", -1.0)
    guidance = None if g is None or (isinstance(g, (int, float)) and g < 0) else g
    options = {k: dict(v) for k, v in (cfg.get("task_options") or {}).items()}
    return evaluate(
        model, tokenizer, task_names, steps, out_dir=out,
        batch_size=int(batch_size or cfg.get("micro_batch_size", 16)), ode=ode,
        code_ode_temperature=_temp(cfg.get("code_nstep_temperature_schedule", "polynomial_1_1.0")),
        sampler=sampler,
        guidance=guidance, guidance_categories=tuple(cfg.get("guidance_categories") or ()) or None,
        key=int(cfg.get("seed", 0)), limit=limit, max_new_tokens=int(cfg.get("generation_max_len", 256)),
        num_samples=int(cfg.get("generation_num_return_sequences", 1)),
        max_seq_len=int(cfg.get("max_seq_len", 2048)) or None,
        chat_template=cfg.get("chat_template") or None, task_options=options, mesh=mesh_sizes,
        allow_unsandboxed=bool(cfg.get("allow_unsandboxed", False) if allow_unsandboxed is None
                               else allow_unsandboxed),
        progress=progress, run_info={"model": str(ckpt), **desc})


def eval_ode_and_sampler(model, cfg):
    """(ODEOptions, Sampler) of an evaluation config (``configs/benchmark.py`` keys) for
    ``model`` (an L2DModel or LLM, abstract or not: only its settings are read)."""
    from l2d_jax.sampling import Sampler

    ode = default_ode(model, method=cfg.get("ode_solver", "midpoint"),
                      x1_estimation=cfg.get("nstep_x1_estimation", "sample"),
                      temperature=_temp(cfg.get("nstep_temperature_schedule", 0.0)),
                      atol=float(cfg.get("ode_solver_atol", 1e-5)), rtol=float(cfg.get("ode_solver_rtol", 1e-5)),
                      per_sequence=bool(cfg.get("ode_per_sequence", True)),
                      max_steps=int(cfg.get("ode_max_steps", 1000)))
    sampler = Sampler(float(cfg.get("generation_temperature", 1.0)), float(cfg.get("generation_top_p", 1.0)),
                      int(cfg.get("generation_top_k", 0)))
    return ode, sampler


def _temp(v):
    """A temperature schedule value: a float, or a "polynomial_..." string."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return float(v)


def _reject_base_early(ckpt: str, steps) -> None:
    """Fails fast (before loading weights) for a base model asked for ODE steps."""
    if not any(s != BASE for s in steps) or loading.model_kind(ckpt) not in ("base", "hub"):
        return
    bad = ", ".join(str(s) for s in steps if s != BASE)
    raise L2DError(f"{ckpt} is a base model (no flow path): only step 0 ('base') can run, not {bad}. "
                   "Use --steps 0, or pass an L2D checkpoint (converted, kind 'l2d') or a training workdir.")
