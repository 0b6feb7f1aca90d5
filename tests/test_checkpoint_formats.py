"""Checkpoint format 2 (stacked layers) and the format-1 directories written before it.

``fixtures/ckpt_v1/l2d_tiny`` is a tiny L2D checkpoint (LoRA flow path, perturbed away from
its init) written by l2d-jax's format-1 code (commit 84a7835, per-layer subtrees), with
``l2d_tiny_expected.npz``: that code's logits of the model on fixed inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2d_jax import checkpoint
from l2d_jax.convert.loading import load_l2d

FIXTURE = Path(__file__).parent / "fixtures" / "ckpt_v1"


def _expected_logits(model):
    want = np.load(FIXTURE / "l2d_tiny_expected.npz")
    got = model(jnp.asarray(want["ids"]), jnp.asarray(want["t"]), jnp.asarray(want["x_t"])).logits
    return np.asarray(got), want["logits"]


def test_format1_checkpoint_loads_stacked_and_gives_the_same_logits():
    assert json.loads((FIXTURE / "l2d_tiny" / checkpoint.MANIFEST).read_text())["format_version"] == 1
    model, _ = load_l2d(FIXTURE / "l2d_tiny")
    assert model.base.layers.self_attn.q_proj.kernel[...].shape == (2, 32, 32)  # stacked on load
    assert model.flow.layers.q_proj.A[...].shape[0] == 2
    got, want = _expected_logits(model)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    base = checkpoint.restore_params(FIXTURE / "l2d_tiny", "base")  # untargeted: stacked too
    assert base["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 64, 32)


def test_saved_again_as_format2(tmp_path):
    model, _ = load_l2d(FIXTURE / "l2d_tiny")
    manifest = checkpoint.read_manifest(FIXTURE / "l2d_tiny")
    out = checkpoint.save_checkpoint(
        tmp_path / "v2", base_params=nnx.to_pure_dict(nnx.state(model.base, nnx.Param)),
        hf_config=manifest["hf_config"], kind="l2d", flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)),
        l2d_settings=manifest["l2d_settings"], dtype="float32")
    assert checkpoint.read_manifest(out)["format_version"] == checkpoint.FORMAT_VERSION == 2
    flow = checkpoint.restore_params(out, "flow")
    assert set(flow["layers"]) >= {"q_proj", "modulation"}  # one stacked subtree, not one per layer
    again, _ = load_l2d(out)
    got, want = _expected_logits(again)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_format1_training_workdir_resumes_and_loads(tmp_path):
    """``fixtures/workdir_v1/wd``: checkpoint 2 of a 4-step ``configs/tiny_test.py`` run by the
    format-1 code (per-layer parameters and Adam moments). The run resumes from it and
    steps 3-4 give that code's losses (``v1_train_metrics.jsonl``); ``load_trained`` reads it."""
    import shutil

    from l2d_jax import cli
    from l2d_jax.train import loop, metrics

    wd = tmp_path / "wd"
    shutil.copytree(FIXTURE.parent / "workdir_v1" / "wd", wd)
    model, _ = loop.load_trained(wd / loop.CHECKPOINTS / "2")
    assert model.flow.layers.q_proj.A[...].shape[0] == 2
    config = Path(__file__).parent.parent / "configs" / "tiny_test.py"
    assert cli.main(["train", "--config", str(config), "--workdir", str(wd), "--no-progress"]) == 0
    want = {r["step"]: r["loss"] for r in metrics.read_jsonl(FIXTURE.parent / "workdir_v1" / "v1_train_metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in metrics.read_jsonl(wd / metrics.JSONL) if "loss" in r}
    assert sorted(got) == [3, 4]  # resumed at 2, not restarted (nothing quarantined)
    assert not list((wd / loop.CHECKPOINTS).glob("corrupt-*"))
    for s in (3, 4):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6)
