"""The benchmark runner end to end on the tiny random L2D model with a character tokenizer:
files and schema, rescore, step 0 == the base model's generate, resume, no recompilation
between step counts, base-model checkpoints, the ``l2d-jax eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from l2d_jax.errors import L2DError
from l2d_jax.evaluation import runner
from l2d_jax.evaluation.tasks import get_task

FIX = Path(__file__).resolve().parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
NEW = 8  # new tokens per completion (the protocol's 256 is too slow for a unit test)


def fixture_tasks():
    return [get_task("gsm8k", source=str(FIX / "gsm8k_test.jsonl"), shots_source=str(FIX / "gsm8k_train.jsonl")),
            get_task("mmlu", source=str(FIX / "mmlu_test.jsonl"), shots_source=str(FIX / "mmlu_dev.jsonl"))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from jax_tiny import tiny_l2d

    from l2d_jax.config import tiny_tokenizer
    from l2d_jax.generate import compiled_programs

    model, tok = tiny_l2d(seed=3), tiny_tokenizer()
    out = tmp_path_factory.mktemp("eval") / "run"
    before = compiled_programs()
    res = runner.evaluate(model, tok, fixture_tasks(), [0, 4], out_dir=out, batch_size=2,
                          max_new_tokens=NEW, progress=False, run_info={"model": "tiny"})
    return dict(model=model, tok=tok, out=out, res=res, compiled=compiled_programs() - before)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_files_and_schema(setup):
    out, res = setup["out"], setup["res"]
    for name in ("results.json", "results.md", "accuracy_vs_steps.png", "run.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"] == res["tasks"] and on_disk["accuracy"] == res["accuracy"]
    assert set(on_disk["accuracy"]) == {"base", "4"} and on_disk["steps"] == ["base", "4"]
    assert set(on_disk["tasks"]) == {"gsm8k", "mmlu"}
    for task in ("gsm8k", "mmlu"):
        for step in ("base", "4"):
            e = on_disk["tasks"][task][step]
            assert e["n"] == 4 and e["n_eval"] == 4 and e["n_skipped"] == 0
            assert 0.0 <= e["ci95"][0] <= e["accuracy"] <= e["ci95"][1] <= 1.0
            assert {"accuracy", "format_accuracy", "mean_nfe"} <= set(e)
            rows = read_jsonl(out / "completions" / f"{task}_{step}.jsonl")
            assert [r["id"] for r in rows] == [ex.id for ex in fixture_tasks()[0 if task == "gsm8k" else 1].examples()]
            for r in rows:
                assert {"id", "prompt", "completion", "extracted", "correct", "nfe"} <= set(r)
                assert r["prompt"].startswith("<s><|user|>") and r["prompt"].endswith("<|assistant|>")
        # midpoint with 4 grid points: 3 intervals x 2 evaluations per token
        assert on_disk["tasks"][task]["base"]["mean_nfe"] == 0.0
        assert on_disk["tasks"][task]["4"]["mean_nfe"] == pytest.approx(6.0)
    mean = np.mean([on_disk["tasks"][t]["4"]["accuracy"] for t in ("gsm8k", "mmlu")])
    assert on_disk["accuracy"]["4"] == pytest.approx(mean)
    md = (out / "results.md").read_text()
    assert "| gsm8k |" in md and "| **mean** |" in md
    assert (out / "accuracy_vs_steps.png").read_bytes()[:4] == b"\x89PNG"


def test_step_zero_is_the_base_models_generate(setup):
    """Each step-0 completion equals generate() of the BASE LLM on that prompt alone (same
    key and sample index): the base path, and rows independent of their batch mates."""
    from l2d_jax.generate import GenerateOptions, generate, left_pad
    from l2d_jax.sampling import Sampler

    model, tok, out = setup["model"], setup["tok"], setup["out"]
    task = fixture_tasks()[0]
    prompts, _ = runner.render_task(task, tok)
    rows = {r["id"]: r for r in read_jsonl(out / "completions" / "gsm8k_base.jsonl")}
    key = runner.task_key(0, "gsm8k")
    for p in prompts[:2]:
        ids, mask = left_pad([p.ids], tok.pad_token_id)
        o = generate(model.base, ids, mask, key=key, sampler=Sampler(1.0), eos_id=tok.eos_token_id,
                     sample_ids=[p.index], opts=GenerateOptions(max_new_tokens=NEW))
        new = np.asarray(o.tokens[0, : int(o.lengths[0])]).tolist()
        assert runner._decode(tok, new, (tok.eos_token_id,)) == rows[str(p.example.id)]["completion"]
        assert rows[str(p.example.id)]["prompt"] == p.text


def test_rescore_reproduces_and_follows_edited_completions(setup, tmp_path):
    import shutil

    res = setup["res"]
    out = tmp_path / "copy"
    shutil.copytree(setup["out"], out)
    again = runner.rescore(out, plot=False)
    assert again["tasks"] == json.loads((setup["out"] / "results.json").read_text())["tasks"]
    assert again["accuracy"] == res["accuracy"]
    # make one GSM8K completion correct: rescore must see it
    path = out / "completions" / "gsm8k_4.jsonl"
    rows = read_jsonl(path)
    rows[0]["completion"] = "2+3=5\n#### 5"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = runner.rescore(out, plot=False)
    base_acc = res["tasks"]["gsm8k"]["4"]["accuracy"]
    assert edited["tasks"]["gsm8k"]["4"]["accuracy"] == pytest.approx(base_acc + 0.25)
    assert read_jsonl(path)[0]["correct"] is True and read_jsonl(path)[0]["extracted"] == "5"
    assert json.loads((out / "results.json").read_text())["tasks"]["gsm8k"]["4"]["accuracy"] == \
        pytest.approx(base_acc + 0.25)


def test_rerun_is_resumable(setup, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(setup["out"], out)
    calls = []
    real = runner._generate_batch

    def counting(g, chunk, real_rows, ids, mask, labels, prefilled, ode_steps, *a, **kw):
        calls.append((ode_steps, real_rows))
        return real(g, chunk, real_rows, ids, mask, labels, prefilled, ode_steps, *a, **kw)

    monkeypatch.setattr(runner, "_generate_batch", counting)
    kw = dict(out_dir=out, batch_size=2, max_new_tokens=NEW, progress=False, run_info={"model": "tiny"})
    res = runner.evaluate(setup["model"], setup["tok"], fixture_tasks(), [0, 4], **kw)
    assert calls == []  # everything was finished
    assert res["tasks"] == setup["res"]["tasks"]
    # lose one row (an interrupted run): only that example is generated again, identically
    path = out / "completions" / "mmlu_4.jsonl"
    rows = read_jsonl(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    res = runner.evaluate(setup["model"], setup["tok"], fixture_tasks(), [0, 4], **kw)
    assert calls == [(4, 1)]  # one batch of one prompt, at step 4 only (its base row is there)
    assert [r["completion"] for r in read_jsonl(path)] == [r["completion"] for r in rows]
    # a different generation setting in the same directory is refused
    with pytest.raises(L2DError, match="different evaluation"):
        runner.evaluate(setup["model"], setup["tok"], fixture_tasks(), [0, 4],
                        **{**kw, "max_new_tokens": NEW + 1})


def test_step_counts_share_the_compiled_programs(setup, tmp_path, monkeypatch):
    """The first run compiled one program per prompt bucket; other step counts (and the base
    step) in a new run compile nothing, and each batch is prefilled once for all of them."""
    from l2d_jax import generate as gen_lib

    assert setup["compiled"] >= 1
    prefills = []
    real = gen_lib.prefill
    monkeypatch.setattr(gen_lib, "prefill", lambda *a, **kw: prefills.append(1) or real(*a, **kw))
    res = runner.evaluate(setup["model"], setup["tok"], fixture_tasks()[:1], [0, 2, 3, 8],
                          out_dir=tmp_path / "more", batch_size=2, max_new_tokens=NEW, progress=False,
                          plot=False)
    assert res["compiles"] == 0
    assert len(prefills) == 2  # 4 examples in batches of 2; 4 step counts each
    assert res["steps"] == ["base", "2", "3", "8"]
    nfe = {s: res["tasks"]["gsm8k"][s]["mean_nfe"] for s in res["steps"]}
    assert nfe == pytest.approx({"base": 0.0, "2": 2.0, "3": 4.0, "8": 14.0})


def test_base_models_run_step_zero_only(setup, tmp_path):
    with pytest.raises(L2DError, match="base model"):
        runner.evaluate(setup["model"].base, setup["tok"], fixture_tasks(), [0, 4], out_dir=tmp_path / "b",
                        progress=False)
    with pytest.raises(L2DError, match="grid points"):
        runner.parse_steps("0,1")
    assert runner.parse_steps("base,0,4,8") == ["base", 4, 8]


def test_statistics_helpers():
    lo, hi = runner.wilson_interval(5, 10)
    assert 0.23 < lo < 0.24 and 0.76 < hi < 0.77
    assert runner.ci95([1, 1, 1, 1]) == pytest.approx([runner.wilson_interval(4, 4)[0], 1.0])
    lo, hi = runner.ci95([0.5, 0.7, 0.1])
    assert 0 <= lo < 0.433 < hi <= 1
    assert runner.parse_label("8@g1.5") == (8, 1.5) and runner.step_label(8, 1.5, True) == "8@g1.5"


def _save_l2d(model, tok, path):
    from flax import nnx
    from jax_tiny import HF_CONFIG

    from l2d_jax import checkpoint

    return checkpoint.save_checkpoint(
        path, base_params=nnx.to_pure_dict(nnx.state(model.base, nnx.Param)), hf_config=HF_CONFIG,
        tokenizer=tok, kind="l2d", flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)),
        l2d_settings=model.settings.to_dict(), dtype="float32")


def test_cli_rejects_base_models_for_ode_steps(setup, tmp_path, capsys):
    from flax import nnx
    from jax_tiny import HF_CONFIG

    from l2d_jax import checkpoint
    from l2d_jax.cli import main

    base_dir = checkpoint.save_checkpoint(
        tmp_path / "base", base_params=nnx.to_pure_dict(nnx.state(setup["model"].base, nnx.Param)),
        hf_config=HF_CONFIG, tokenizer=setup["tok"], kind="base", dtype="float32")
    code = main(["eval", "--config", str(ROOT / "configs" / "benchmark.py"), "--ckpt", str(base_dir),
                 "--steps", "0,4", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "base model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_eval_on_a_converted_l2d_checkpoint(setup, tmp_path):
    from l2d_jax.cli import main

    ckpt = _save_l2d(setup["model"], setup["tok"], tmp_path / "l2d")
    opts = {"gsm8k": {"source": str(FIX / "gsm8k_test.jsonl"), "shots_source": str(FIX / "gsm8k_train.jsonl")}}
    out = tmp_path / "cli"
    argv = ["eval", "--config", str(ROOT / "configs" / "benchmark.py"), "--ckpt", str(ckpt), "--steps", "0,4",
            "--out", str(out), "--limit", "2", "--tasks", "gsm8k", "--batch-size", "2", "--no-progress",
            f"--config.task_options={opts!r}", "--config.dtype=float32", "--config.param_dtype=float32",
            f"--config.generation_max_len={NEW}"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["gsm8k"]["4"]["n"] == 2 and res["config"]["model"] == str(ckpt)
    # same completions as the in-process run on the same model (first two examples)
    mine = read_jsonl(setup["out"] / "completions" / "gsm8k_4.jsonl")[:2]
    theirs = read_jsonl(out / "completions" / "gsm8k_4.jsonl")
    assert [r["completion"] for r in theirs] == [r["completion"] for r in mine]
    assert main(["eval", "--rescore", "--out", str(out)]) == 0


DP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from jax_tiny import tiny_l2d
from l2d_jax.config import tiny_tokenizer
from l2d_jax.evaluation import runner
from l2d_jax.evaluation.tasks import get_task
import jax
task = get_task("gsm8k", source={test!r}, shots_source={train!r})
runner.evaluate(tiny_l2d(seed=3), tiny_tokenizer(), [task], [0, 4], out_dir=sys.argv[1], batch_size=3,
                max_new_tokens={new}, progress=False, plot=False)
print(jax.device_count())
"""


@pytest.mark.slow
def test_data_parallel_over_two_devices_gives_the_same_completions(setup, tmp_path):
    """Two (CPU) devices: the batch is sharded over a data mesh (3 prompts -> 4 rows), and the
    completions equal the single-device run's."""
    import os
    import subprocess
    import sys

    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT.format(tests=str(ROOT / "tests"), test=str(FIX / "gsm8k_test.jsonl"),
                                       train=str(FIX / "gsm8k_train.jsonl"), new=NEW))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "dp"
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "2"
    for step in ("base", "4"):
        mine = [r["completion"] for r in read_jsonl(setup["out"] / "completions" / f"gsm8k_{step}.jsonl")]
        theirs = [r["completion"] for r in read_jsonl(out / "completions" / f"gsm8k_{step}.jsonl")]
        assert theirs == mine


def test_guidance_class_labels_follow_the_shared_categories():
    from l2d_jax.evaluation.tasks.base import Example

    cats = runner.SHARED_CATEGORIES  # math, coding, general_qa, other
    gsm, mmlu = fixture_tasks()
    assert runner.class_label(gsm, gsm.examples()[0], cats, 4) == 0
    mm = mmlu.examples()
    assert [runner.class_label(mmlu, e, cats, 4) for e in mm] == [2, 0, 2, 0]  # anatomy / hs math
    # without shared categories: the index of the example's category in the task's list
    assert [runner.class_label(mmlu, e, None, 4) for e in mm] == [0, 1, 0, 1]
    assert runner.class_label(gsm, gsm.examples()[0], None, 4) is None  # no category: unconditional
    code = get_task("mbpp")
    assert runner.class_label(code, Example("x", [], None), cats, 4) == 1  # code tasks: "coding"
    with pytest.raises(L2DError, match="classes"):
        runner.class_label(mmlu, mm[0], cats, 2)


def test_code_task_entries_get_pass_at_k_and_a_normal_interval():
    task = get_task("mbpp")
    per_example = [[{"correct": j < c, "formatted": True} for j in range(10)] for c in (0, 3, 10)]
    rows = [{"nfe": 14.0, "new_tokens": 5}] * 30
    e = runner.summarize(task, per_example, rows)
    assert e["n"] == 3 and e["n_eval"] == 30 and e["mean_nfe"] == 14.0
    assert e["accuracy"] == pytest.approx((0 + 0.3 + 1) / 3)
    assert e["pass_at_k"]["pass@1"] == pytest.approx(e["accuracy"])
    assert e["pass_at_k"]["pass@10"] == pytest.approx(2 / 3)
    lo, hi = e["ci95"]
    assert lo < e["accuracy"] < hi


def test_paired_comparison_with_the_base_model():
    """Counts of wrong -> right / right -> wrong on the same (id, sample) and the exact
    McNemar p-value (hand values: 2 * P(X <= k), X ~ Bin(b + c, 1/2))."""
    from l2d_jax.evaluation.runner import mcnemar_exact, paired_vs_base

    assert mcnemar_exact(9, 9) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(1, 10) == pytest.approx(2 * 12 / 2048)
    assert mcnemar_exact(0, 0) == 1.0
    base = {("a", 0): {"correct": True}, ("b", 0): {"correct": False}, ("c", 0): {"correct": False},
            ("d", 0): {"correct": True}, ("only_base", 0): {"correct": False}}
    after = {("a", 0): {"correct": False}, ("b", 0): {"correct": True}, ("c", 0): {"correct": True},
             ("d", 0): {"correct": True}}
    assert paired_vs_base(base, after) == {"n_pairs": 4, "wrong_to_right": 2, "right_to_wrong": 1,
                                           "mcnemar_p": 1.0}
