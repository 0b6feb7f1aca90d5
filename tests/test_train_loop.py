"""The training loop end to end, from the CLI: logs, checkpoints, resume, export, bad input.

Default tests share ONE tiny run (``tiny_run``); restarts after SIGTERM / SIGKILL and the
restore onto another mesh run in subprocesses (8 fake CPU devices) and are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from l2d_jax import cli
from l2d_jax.train import loop, metrics

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tiny_test.py")

# 8 steps, validation + checkpoint every 4, keep the last 2, lr high enough to move the toy
RUN_OVERRIDES = ["--config.n_training_steps=8", "--config.n_epochs=2", "--config.peak_lr=1e-2", "--config.min_lr=1e-3",
                 "--config.n_warmup_steps=1", "--config.validate_interval=4", "--config.save_model_interval=4",
                 "--config.keep_checkpoints=2", "--config.num_t_bins=4", "--config.compute_nstep_loss=2"]


def conversations(n: int, long_ones: int = 0, category: str | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        row = {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                            {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}
        if category:
            row["category"] = category
        rows.append(row)
    for _ in range(long_ones):
        rows.append({"messages": [{"role": "user", "content": "Count: " + "1 2 3 4 5 " * 20},
                                  {"role": "assistant", "content": "6 7 8 9 10 " * 20}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(args: list[str], capsys=None) -> tuple[int, str]:
    code = cli.main(["train", "--config", CONFIG, "--no-progress", *args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One 8-step run on a local jsonl (48 short conversations + 2 longer than max_seq_len)."""
    root = tmp_path_factory.mktemp("tiny_run")
    train_file = write_jsonl(root / "train.jsonl", conversations(48, long_ones=2))
    valid_file = write_jsonl(root / "valid.jsonl", conversations(6))
    wd = root / "wd"
    t0 = time.time()
    code = cli.main(["train", "--config", CONFIG, "--workdir", str(wd), "--no-progress", *RUN_OVERRIDES,
                     "--config.data_source=auto", f"--config.train_filepaths={train_file}",
                     f"--config.valid_filepaths={valid_file}"])
    return {"code": code, "wd": wd, "seconds": time.time() - t0, "root": root}


def train_lines(wd: Path) -> list[dict]:
    return [r for r in metrics.read_jsonl(wd / metrics.JSONL) if "loss" in r]


def val_lines(wd: Path) -> list[dict]:
    return [r for r in metrics.read_jsonl(wd / metrics.JSONL) if "val_loss" in r]


def test_run_completes_and_writes_metrics_jsonl(tiny_run):
    assert tiny_run["code"] == 0
    lines = train_lines(tiny_run["wd"])
    assert [r["step"] for r in lines] == list(range(1, 9))
    for r in lines:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    vals = val_lines(tiny_run["wd"])
    assert [r["step"] for r in vals] == [4, 8]
    for r in vals:
        assert {"val_loss", "val_ppl", "val_acc_expected", "val_acc_greedy", "val_nstep_loss",
                "val_nstep_acc_greedy"} <= set(r)
        assert any(k.startswith("val_binned_loss/t0.0-0.2") for k in r)
        assert r["val_ppl"] == pytest.approx(np.exp(r["val_loss"]), rel=1e-6)
        assert 0 <= r["val_acc_greedy"] <= 1 and 0 <= r["val_acc_expected"] <= 1


def test_loss_goes_down(tiny_run):
    losses = [r["loss"] for r in train_lines(tiny_run["wd"])]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.03, losses
    vals = [r["val_loss"] for r in val_lines(tiny_run["wd"])]
    assert vals[-1] < vals[0], vals


def test_tensorboard_event_files_hold_the_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tiny_run["wd"] / metrics.TB_DIR
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("tensors", [])) | set(acc.Tags().get("scalars", []))
    assert {"loss", "lr", "tokens_per_s", "val_loss", "val_acc_greedy", "val_nstep_loss"} <= tags, tags
    steps = [e.step for e in acc.Tensors("loss")] if "loss" in acc.Tags().get("tensors", []) \
        else [e.step for e in acc.Scalars("loss")]
    assert sorted(steps) == list(range(1, 9))


def test_checkpoints_keep_the_last_two_and_the_export_loads(tiny_run):
    from l2d_jax.convert.loading import load_l2d

    wd = tiny_run["wd"]
    assert sorted(int(p.name) for p in (wd / loop.CHECKPOINTS).iterdir() if p.name.isdigit()) == [4, 8]
    assert loop.latest_export_or_checkpoint(wd) == wd / loop.EXPORT
    model, tok = load_l2d(wd / loop.EXPORT)
    assert tok is not None and model.settings.flow_lora_rank == 4
    model2, _ = loop.load_trained(wd)  # a workdir is accepted too
    a = np.asarray(model.flow.final_head.layers[0].kernel[...])
    b = np.asarray(model2.flow.final_head.layers[0].kernel[...])
    np.testing.assert_array_equal(a, b)
    # without the export, the newest training checkpoint is what a workdir means
    bare = tiny_run["root"] / "no_export"
    shutil.copytree(wd, bare, ignore=shutil.ignore_patterns(loop.EXPORT))
    ckpt = loop.latest_export_or_checkpoint(bare)
    assert ckpt == bare / loop.CHECKPOINTS / "8"
    model3, _ = loop.load_trained(bare)
    np.testing.assert_array_equal(np.asarray(model3.flow.final_head.layers[0].kernel[...]), a)
    # restored whole onto this process's first device, not onto the saved shardings
    import jax

    assert model3.flow.final_head.layers[0].kernel[...].sharding.device_set == {jax.local_devices()[0]}


def test_convert_export_of_the_workdir_and_of_its_newest_checkpoint(tiny_run, tmp_path, capsys):
    """``convert export WORKDIR`` exports WORKDIR/export; without an export, the newest training
    checkpoint (with a note). Both hold the final weights (tests/test_export.py checks the
    layout against the original's records)."""
    from safetensors.numpy import load_file

    from l2d_jax.convert.original import settings_from_constructor_dict

    wd = tiny_run["wd"]
    capsys.readouterr()
    assert cli.main(["convert", "export", str(wd), str(tmp_path / "a")]) == 0
    assert "note:" not in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(wd, bare, ignore=shutil.ignore_patterns(loop.EXPORT))
    assert cli.main(["convert", "export", str(bare), str(tmp_path / "b.safetensors")]) == 0
    assert f"training checkpoint {bare / loop.CHECKPOINTS / '8'}" in capsys.readouterr().err
    a, b = load_file(str(tmp_path / "a" / "l2d_state.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    model, _ = loop.load_trained(wd)
    np.testing.assert_array_equal(a["model.modulation_head.mlp.0.weight"],
                                  np.asarray(model.flow.final_head.layers[0].kernel[...]).T)
    assert "model.layers.1.self_attn.flow_q_proj.A" in a and "lm_head.weight" in a
    settings = json.loads((tmp_path / "a" / "l2d_settings.json").read_text())
    assert settings_from_constructor_dict(settings) == model.settings
    assert "BASE_MODEL_ID_OR_DIR" in (tmp_path / "b.README.md").read_text()  # random:tiny has no hub id
    # a checkpoint whose base cannot be rebuilt: one line saying what to do
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "pretrained_model_dir": str(tmp_path / "moved")}))
    assert cli.main(["convert", "export", str(bare), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    assert str(tmp_path / "moved") in err and f"l2d-jax train --workdir {bare}" in err


def test_too_long_turns_are_dropped_and_counted(tiny_run):
    stats = json.loads((tiny_run["wd"] / loop.DATA_STATS).read_text())
    assert stats["train"]["dropped"] == 2
    assert stats["train"]["examples"] == 48


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tiny_run, caplog):
    wd = tiny_run["root"] / "wd_truncated"
    shutil.copytree(tiny_run["wd"], wd)
    shutil.rmtree(wd / loop.EXPORT)
    for f in (wd / loop.CHECKPOINTS / "8" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    cfg = json.loads((wd / loop.CONFIG_JSON).read_text())
    code = cli.main(["train", "--config", CONFIG, "--workdir", str(wd), "--no-progress", *RUN_OVERRIDES,
                     "--config.data_source=auto", f"--config.train_filepaths={cfg['train_filepaths'][0]}",
                     f"--config.valid_filepaths={cfg['valid_filepaths'][0]}"])
    assert code == 0
    assert list((wd / loop.CHECKPOINTS).glob("corrupt-8-*"))
    assert (wd / loop.EXPORT).is_dir()
    before = {r["step"]: r["loss"] for r in train_lines(tiny_run["wd"])}
    after = {r["step"]: r["loss"] for r in train_lines(wd)}
    assert sorted(after) == list(range(1, 9))
    for s in (5, 6, 7, 8):  # redone from checkpoint 4: the same losses
        assert after[s] == pytest.approx(before[s], rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------- bad input


def test_unknown_config_key(capsys):
    code, err = run_cli(["--config.peek_lr=1e-3"], capsys)
    assert code == 2 and "peek_lr" in err and "peak_lr" in err


def test_batch_that_does_not_divide(capsys, tmp_path):
    code, err = run_cli(["--workdir", str(tmp_path), "--config.micro_batch_size=2",
                         "--config.n_samples_before_backprop=3"], capsys)
    assert code == 2 and "n_samples_before_backprop=3" in err and "micro_batch_size=2" in err


def test_missing_dataset_file(capsys, tmp_path):
    code, err = run_cli(["--workdir", str(tmp_path / "wd"), "--config.data_source=local",
                         f"--config.train_filepaths={tmp_path / 'nope.jsonl'}"], capsys)
    assert code == 2 and "nope.jsonl" in err and "not found" in err


def test_empty_dataset_after_filtering(capsys, tmp_path):
    f = write_jsonl(tmp_path / "edit.jsonl", conversations(4, category="editing"))
    code, err = run_cli(["--workdir", str(tmp_path / "wd"), "--config.data_source=local",
                         f"--config.train_filepaths={f}"], capsys)
    assert code == 2 and "no train examples" in err and "editing" in err


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
    wd = tmp_path / "wd"
    code, err = run_cli(["--workdir", str(wd), "--config.peak_lr=1e30", "--config.n_training_steps=6",
                         "--config.save_model_interval=2", "--config.validate_interval=2",
                         "--config.compute_nstep_loss=0"], capsys)
    assert code == 2, err
    assert "non-finite loss at step" in err
    step = int(err.split("non-finite loss at step")[1].split()[0])
    good = sorted(int(p.name) for p in (wd / loop.CHECKPOINTS).iterdir() if p.name.isdigit())
    assert good and max(good) < step
    assert f"checkpoints/{max(good)}" in err
    assert not (wd / loop.EXPORT).exists()


# --------------------------------------------------------------------------- restarts (slow)


def _spawn(wd: Path, extra: list[str], devices: int = 1, mesh: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    args = [sys.executable, "-m", "l2d_jax.cli", "train", "--config", CONFIG, "--workdir", str(wd), "--no-progress",
            "--config.n_training_steps=10", "--config.peak_lr=1e-2", "--config.min_lr=1e-3",
            "--config.n_warmup_steps=1", "--config.validate_interval=2", "--config.save_model_interval=2",
            "--config.keep_checkpoints=3", "--config.compute_nstep_loss=0",
            "--config.sharding_rules.flow_in=fsdp", *extra]
    if mesh:
        d, f, t = mesh.split(",")
        args += [f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, wd: Path, step: int, timeout: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if any(r["step"] >= step for r in train_lines(wd)):
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = tmp_path_factory.mktemp("uninterrupted") / "wd"
    code, err = _finish(_spawn(wd, [], devices=8, mesh="2,2,2"))
    assert code == 0, err[-3000:]
    return {r["step"]: r["loss"] for r in train_lines(wd)}


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_the_restart_continues_the_same_curve(uninterrupted, tmp_path):
    wd = tmp_path / "wd"
    proc = _spawn(wd, [], devices=8, mesh="2,2,2")
    _wait_for_step(proc, wd, 3)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == loop.EXIT_PREEMPTED, err[-3000:]
    saved = sorted(int(p.name) for p in (wd / loop.CHECKPOINTS).iterdir() if p.name.isdigit())
    assert saved and max(saved) >= 3
    code, err = _finish(_spawn(wd, [], devices=8, mesh="2,2,2"))
    assert code == 0, err[-3000:]
    assert "resumed from" in err
    curve = {r["step"]: r["loss"] for r in train_lines(wd)}
    assert sorted(curve) == sorted(uninterrupted)
    for s, v in uninterrupted.items():
        assert curve[s] == pytest.approx(v, rel=1e-6, abs=1e-6), s


@pytest.mark.slow
def test_sigkill_then_restart_on_another_mesh_resumes_from_the_last_checkpoint(uninterrupted, tmp_path):
    wd = tmp_path / "wd"
    proc = _spawn(wd, [], devices=8, mesh="2,2,2")
    _wait_for_step(proc, wd, 5)
    proc.kill()
    proc.communicate()
    saved = sorted(int(p.name) for p in (wd / loop.CHECKPOINTS).iterdir() if p.name.isdigit())
    assert saved
    # restart on a different mesh: (4, 2, 1) instead of (2, 2, 2); flow params sharded on fsdp
    code, err = _finish(_spawn(wd, [], devices=8, mesh="4,2,1"))
    assert code == 0, err[-3000:]
    assert f"resumed from {wd / loop.CHECKPOINTS}/{max(saved)}" in err
    curve = {r["step"]: r["loss"] for r in train_lines(wd)}
    assert sorted(curve) == sorted(uninterrupted)
    for s, v in uninterrupted.items():
        assert curve[s] == pytest.approx(v, rel=1e-5, abs=1e-5), s


# --------------------------------------------------------------------------- metrics pieces


def test_jsonl_truncation_and_validation_scalars(tmp_path):
    path = tmp_path / metrics.JSONL
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    metrics.truncate_jsonl(path, 3)
    assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]
    sums = {"loss_sum": 20.0, "n_tokens": 10.0, "prob_sum": 4.0, "greedy_correct": 5.0,
            "binned_loss_sum": np.array([2.0, 0.0]), "binned_count": np.array([1.0, 0.0]),
            "nstep_loss_sum": 10.0, "nstep_prob_sum": 6.0, "nstep_greedy_correct": 7.0}
    out = metrics.validation_scalars(sums, num_t_bins=2, nstep_points=4)
    assert out["val_loss"] == 2.0 and out["val_ppl"] == pytest.approx(np.exp(2.0))
    assert out["val_acc_expected"] == 0.4 and out["val_acc_greedy"] == 0.5
    assert out["val_binned_loss/t0.0-0.5"] == 2.0 and np.isnan(out["val_binned_loss/t0.5-1.0"])
    assert out["val_nstep_loss"] == 1.0 and out["val_nstep_acc_greedy"] == 0.7


def test_bin_keys_are_the_originals_names_and_never_merge_bins():
    assert metrics.bin_keys(10) == [f"t{i / 10:.1f}-{(i + 1) / 10:.1f}" for i in range(10)]  # original
    assert metrics.bin_keys(20)[:2] == ["t0.00-0.05", "t0.05-0.10"]  # one decimal would merge bins
    for n in (3, 7, 20, 64):
        keys = metrics.bin_keys(n)
        assert len(set(keys)) == n and float(keys[-1].split("-")[1]) == 1.0
    out = metrics.binned_scalars(np.arange(20.0), np.ones(20))
    assert len([k for k in out if k.startswith("binned_loss/")]) == 20


def test_plot_training_png(tmp_path):
    path = tmp_path / metrics.JSONL
    assert metrics.plot_training(path, tmp_path / "a.png") is None  # nothing logged yet
    rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 11)]
    rows += [{"step": s, "val_loss": 1.0 / s, **metrics.binned_scalars(np.linspace(1, 0.2, 5) / s, np.ones(5), "val_")}
             for s in (5, 10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = metrics.plot_training(path, tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_logger_without_clu_writes_jsonl_and_warns(tmp_path, monkeypatch, caplog):
    """A bare accelerator image has no clu / TensorFlow: training still logs (console, jsonl)."""
    import builtins

    real_import = builtins.__import__

    def no_clu(name, *args, **kwargs):
        if name == "clu" or name.startswith("clu."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_clu)
    with caplog.at_level("INFO", logger="l2d_jax.train"):
        logger = metrics.MetricsLogger(tmp_path, progress=False)
        logger.log_train(1, {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0})
        logger.close()
    assert "clu is not installed" in caplog.text and "loss=2.5" in caplog.text
    assert metrics.read_jsonl(tmp_path / metrics.JSONL) == [{"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0}]
    assert not (tmp_path / metrics.TB_DIR).exists()


def test_profiler_writes_a_trace(tmp_path):
    import jax
    import jax.numpy as jnp

    prof = metrics.Profiler(tmp_path, [2, 3], start_step=0)
    f = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))
    for s in range(1, 5):
        prof.before(s)
        y = f(x)
        prof.after(s, block_on=y)
    prof.close()
    assert list((tmp_path / metrics.PROFILE_DIR).rglob("*.xplane.pb"))


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (optional: save_wandb=True needs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = metrics.MetricsLogger(tmp_path, wandb_config={"project": "l2d-jax-test", "name": "t", "config": {"a": 1}},
                                   progress=False)
    for s in (1, 2):
        logger.log_train(s, {"loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 10.0})
    logger.log_validation(2, {"val_loss": 0.5})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
