"""Multi-host evaluation and generation on 2 local CPU processes (gloo, coordinator on
localhost): ``l2d-jax eval`` and ``l2d-jax generate`` on a tiny random L2D checkpoint must
write what ONE process writes with the same command, each process generating its
contiguous share of the prompts (uneven shares: 3 MMLU examples, 3 prompts).

This file is also the worker script: ``python tests/test_multihost_eval.py CALLS_DIR -- ARGS
[:: ARGS ...]`` runs ``cli.main(ARGS)`` for each ``::``-separated command in one process and
writes ``CALLS_DIR/calls.<process>.json``: the exit code of each command ("codes") and, per
command, the number of prompts of every call of the runner's ``_batches`` in that process
(one per task: the process's share of the prompts pending at any step) ("calls").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from test_distributed import _dist_env, _env, _free_port, _start, _wait
from test_eval_runner import FIX, NEW, ROOT, _save_l2d, read_jsonl

THEN = "::"  # separates the worker's commands
OPTS = {"gsm8k": {"source": str(FIX / "gsm8k_test.jsonl"), "shots_source": str(FIX / "gsm8k_train.jsonl")},
        "mmlu": {"source": str(FIX / "mmlu_test.jsonl"), "shots_source": str(FIX / "mmlu_dev.jsonl"),
                 "limit": 3}}  # 3 examples: shares of 2 and 1
PROMPTS = ["What is 2 + 3?", "Say hi.", "Count to three."]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from jax_tiny import tiny_l2d

    from l2d_jax.config import tiny_tokenizer

    return str(_save_l2d(tiny_l2d(seed=3), tiny_tokenizer(), tmp_path_factory.mktemp("mh") / "l2d"))


def _eval_argv(ckpt: str, out: Path) -> list[str]:
    return ["eval", "--config", str(ROOT / "configs" / "benchmark.py"), "--ckpt", ckpt, "--steps", "0,4",
            "--out", str(out), "--tasks", "gsm8k,mmlu", "--batch-size", "2", "--no-progress",
            f"--config.task_options={OPTS!r}", "--config.dtype=float32", "--config.param_dtype=float32",
            f"--config.generation_max_len={NEW}"]


def _run_workers(tmp_path: Path, name: str, commands: list[list[str]], devices: int,
                 extra_env: dict | None = None) -> list[Path]:
    """Runs ``commands`` in 2 worker processes (``devices`` CPU devices each); their logs once
    both exited 0."""
    env = _env(devices, Path(os.environ.get("L2D_JAX_CACHE_DIR", tmp_path / "cache")))
    port = _free_port()
    args = [str(tmp_path), "--"] + [a for cmd in commands for a in [*cmd, THEN]][:-1]
    logs = [tmp_path / f"{name}{i}.log" for i in range(2)]
    procs = [_start(args, {**_dist_env(env, i, 2, port), **(extra_env or {})}, logs[i], script=__file__)
             for i in range(2)]
    _wait(procs, 300, logs)
    return logs


def _without_seconds(obj):
    """``obj`` without its "seconds" entries (wall times differ between runs)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _assert_same_eval(ours: Path, ref: Path) -> None:
    """Same results.json (but wall times), completions files and parts."""
    got, want = (json.loads((d / "results.json").read_text()) for d in (ours, ref))
    assert _without_seconds(got) == _without_seconds(want)
    for sub in ("completions", "parts"):
        assert _listing(ours / sub) == _listing(ref / sub)
    for name in _listing(ref / "completions"):
        assert read_jsonl(ours / "completions" / name) == read_jsonl(ref / "completions" / name), name


@pytest.mark.slow
def test_two_processes_evaluate_like_one_and_resume(ckpt, tmp_path, capsys):
    from l2d_jax.cli import main

    ref = tmp_path / "ref"
    t0 = time.time()
    assert main(_eval_argv(ckpt, ref)) == 0
    t_ref = time.time() - t0
    res = json.loads((ref / "results.json").read_text())
    assert {t: {s: e["n"] for s, e in by.items()} for t, by in res["tasks"].items()} == \
        {"gsm8k": {"base": 4, "4": 4}, "mmlu": {"base": 3, "4": 3}}
    # an interrupted run: a row of gsm8k_4 and all of mmlu_base lost
    resume = tmp_path / "resume"
    shutil.copytree(ref, resume)
    rows = (resume / "completions" / "gsm8k_4.jsonl").read_text().splitlines(keepends=True)
    (resume / "completions" / "gsm8k_4.jsonl").write_text("".join(rows[:-1]))
    (resume / "completions" / "mmlu_base.jsonl").unlink()
    (resume / "parts" / "mmlu_base.json").unlink()

    multi = tmp_path / "multi"
    t0 = time.time()
    other = [*_eval_argv(ckpt, multi), f"--config.generation_max_len={NEW + 1}"]  # refused by process 0
    logs = _run_workers(tmp_path, "eval", [_eval_argv(ckpt, multi), _eval_argv(ckpt, resume), other],
                        devices=2)
    t_multi = time.time() - t0
    _assert_same_eval(multi, ref)
    _assert_same_eval(resume, ref)
    for part in ("gsm8k_base", "mmlu_4"):  # finished parts keep their time: not generated again
        assert json.loads((resume / "parts" / f"{part}.json").read_text())["seconds"] == \
            json.loads((ref / "parts" / f"{part}.json").read_text())["seconds"]
    # each process generated its contiguous share of the pending prompts
    reports = [json.loads((tmp_path / f"calls.{i}.json").read_text()) for i in range(2)]
    # (per task: its share of the prompts pending at any step; gsm8k then mmlu)
    assert reports[0]["calls"] == [[2, 2], [1, 2], []]
    assert reports[1]["calls"] == [[2, 1], [0, 1], []]
    # process 0's error (another setting in the same out_dir) stops every process
    assert reports[0]["codes"] == reports[1]["codes"] == [0, 0, 2]
    assert "process 0 failed: L2DError" in logs[1].read_text()
    assert "| **mean** |" in logs[0].read_text() and "| **mean** |" not in logs[1].read_text()
    with capsys.disabled():
        print(f"\none process {t_ref:.0f} s, two processes (fresh, resume, refused) {t_multi:.0f} s")


def _generate_argv(ckpt: str, jsonl: Path) -> list[str]:
    argv = ["generate", ckpt, "--steps", "4", "--temperature", "1.0", "--num-return-sequences", "2",
            "--batch-size", "2", "--max-new-tokens", str(NEW), "--seed", "5", "--jsonl", str(jsonl)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    return argv


@pytest.mark.slow
def test_two_processes_generate_like_one(ckpt, tmp_path):
    from l2d_jax.cli import main

    assert main(_generate_argv(ckpt, tmp_path / "ref.jsonl")) == 0
    want = read_jsonl(tmp_path / "ref.jsonl")
    assert [r["prompt"] for r in want] == [p for p in PROMPTS for _ in range(2)]
    env = {"L2D_DISTRIBUTED": ""}  # the flag starts the processes
    argv = [*_generate_argv(ckpt, tmp_path / "multi.jsonl"), "--distributed", "local"]
    logs = _run_workers(tmp_path, "gen", [argv], devices=1, extra_env=env)
    assert _without_seconds(read_jsonl(tmp_path / "multi.jsonl")) == _without_seconds(want)
    assert "### Say hi." in logs[0].read_text() and "###" not in logs[1].read_text()


# --------------------------------------------------------------------------- worker side


def _worker(argv: list[str]) -> int:
    import faulthandler

    from l2d_jax import cli
    from l2d_jax.evaluation import runner

    faulthandler.dump_traceback_later(240, repeat=True)
    calls_dir, rest = Path(argv[0]), argv[argv.index("--") + 1:]
    commands, cmd = [], []
    for a in rest + [THEN]:
        if a == THEN:
            commands.append(cmd)
            cmd = []
        else:
            cmd.append(a)
    calls: list[list] = []
    real = runner._batches

    def counting(g, prompts):
        calls[-1].append(len(prompts))
        return real(g, prompts)

    runner._batches = counting
    codes = []
    for cmd in commands:
        calls.append([])
        codes.append(cli.main(cmd))
    import jax

    (calls_dir / f"calls.{jax.process_index()}.json").write_text(json.dumps({"codes": codes, "calls": calls}))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
