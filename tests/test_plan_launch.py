"""``l2d-jax plan`` for launchers: --emit-overrides (analytic), checkpoint sizes against a real
run's files, steps per epoch. The compiled (--aot-topology) --emit-overrides is in test_aot.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_test.py")
GIB = 2**30


def _plan(capsys, *args) -> tuple[int, str, str]:
    from l2d_jax.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _load(config: str, lines: list[str]):
    """The config as a launcher runs it: the emitted lines as --config overrides."""
    from l2d_jax import config as config_lib

    assert all(line.startswith("--config.") for line in lines), lines
    return config_lib.load_config(config, [line[len("--config."):] for line in lines], validate=False)


def _total(cfg) -> int:
    from l2d_jax import plan

    return plan.plan(cfg)["total_bytes"]


def test_analytic_emit_overrides_fits_as_given_over_budget_and_nothing_fits(capsys, tmp_path):
    from l2d_jax import config as config_lib

    out = tmp_path / "ov.txt"
    base = ["--config", TINY, "--mesh", "data=8", "--devices", "8"]
    as_given = _total(config_lib.load_config(TINY, ["mesh.data=8"], validate=False))

    # fits as given: an empty file
    code, stdout, err = _plan(capsys, *base, "--hbm-gib", f"{2 * as_given / GIB:.9f}", "--emit-overrides", str(out))
    assert code == 0, err
    assert out.read_text() == "" and "fits as given" in stdout

    # over budget: the lines of a configuration whose analytic total fits the budget
    budget = 0.9 * as_given
    code, stdout, err = _plan(capsys, *base, "--hbm-gib", f"{budget / GIB:.9f}", "--emit-overrides", str(out))
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert lines and "fits with:" in stdout
    cfg = _load(TINY, ["--config.mesh.data=8", *lines])
    assert _total(cfg) <= budget < as_given

    # nothing fits: exit 3, the stale file removed, nothing written
    code, stdout, err = _plan(capsys, *base, "--hbm-gib", "0.000001", "--emit-overrides", str(out))
    assert code == 3, err
    assert not out.exists() and "not written" in stdout


def test_emit_overrides_without_a_budget_is_a_one_line_error(capsys, tmp_path):
    code, _, err = _plan(capsys, "--config", TINY, "--emit-overrides", str(tmp_path / "ov.txt"))
    assert code == 2
    assert "--aot-topology" in err and "--hbm-gib" in err and "Traceback" not in err
    assert not (tmp_path / "ov.txt").exists()


def test_lad_8b_on_8_gpus_emits_fsdp_and_sharded_flow_matrices(capsys, tmp_path):
    """The issue's case: 8B _lad on 8 x 80 GB replicates its float32 flow copies on data=8; the
    emitted change shards them (fsdp over all devices) and the flow path's own matrices
    (sharding_rules), which a mesh change alone leaves replicated."""
    from l2d_jax import plan

    config = str(REPO / "configs" / "llama_3.1_8b_instruct_lad.py")
    out = tmp_path / "ov.txt"
    code, _, err = _plan(capsys, "--config", config, "--devices", "8", "--hbm-gib", "74", "--emit-overrides", str(out))
    assert code == 0, err
    lines = out.read_text().splitlines()
    assert {"--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.sharding_rules.flow_in=fsdp",
            "--config.sharding_rules.flow_out=tensor"} <= set(lines)
    chosen = plan.plan(_load(config, lines))
    mesh_only = plan.plan(_load(config, [x for x in lines if "sharding_rules" not in x]))
    assert chosen["total_bytes"] <= 74 * GIB
    # replicated flow matrices cost every device the same bytes again in Adam moments and gradients
    assert chosen["trainable_params_bytes"] < 0.9 * mesh_only["trainable_params_bytes"]


def test_steps_per_epoch_and_roofline_epoch_time(capsys, tmp_path):
    from l2d_jax import config as config_lib, plan_launch

    cfg = config_lib.load_config(TINY, [], validate=False)  # 8 samples per step, n_training_steps=4
    n, source = plan_launch.train_examples(cfg)  # synthetic conversations: examples are per turn
    assert n is None and "--train-examples" in source
    ep = plan_launch.epoch(cfg, 64, step_s=0.5)
    assert ep["steps_per_epoch"] == 8 and ep["total_steps"] == 4  # n_training_steps=4 caps the run
    assert ep["roofline_epoch_s"] == 4.0 and ep["roofline_total_s"] == 2.0
    released = config_lib.load_config(str(REPO / "configs" / "llama_3.2_1b_instruct_lad_lora.py"), [], validate=False)
    n, source = plan_launch.train_examples(released)
    assert n and "approximate" in source and "data_stats.json" in source
    path = tmp_path / "p.json"
    code, stdout, err = _plan(capsys, "--config", TINY, "--mesh", "data=1", "--train-examples", "1000",
                              "--config.n_training_steps=-1", "--config.n_epochs=2", "--json", str(path))
    assert code == 0, err
    e = json.loads(path.read_text())["epoch"]
    assert (e["steps_per_epoch"], e["total_steps"]) == (125, 250)  # ceil(1000 / 8), two epochs
    assert "125 steps per epoch" in stdout and "roofline" not in e


def _orbax_array_bytes(path: Path) -> tuple[int, set]:
    """Bytes and dtypes of the arrays an orbax checkpoint holds (from its own metadata)."""
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return (sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves),
            {str(np.dtype(x.dtype)) for x in leaves})


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow  # a training run (~25-60 s on 2 shared cores)
def test_checkpoint_sizes_match_a_real_runs_files(tmp_path):
    """One tiny run (base in bfloat16 as the released configs keep it): the planned bytes equal
    what the run's training checkpoint and export hold, and what convert export writes."""
    from l2d_jax import cli, config as config_lib, plan_launch

    overrides = ["--config.n_training_steps=1", "--config.validate_interval=1", "--config.save_model_interval=1",
                 "--config.compute_nstep_loss=-1", "--config.param_dtype=bfloat16"]
    wd = tmp_path / "wd"
    assert cli.main(["train", "--config", TINY, "--workdir", str(wd), "--no-progress", *overrides]) == 0
    cfg = config_lib.load_config(TINY, [o[len("--config."):] for o in overrides], validate=False)
    sizes = plan_launch.checkpoint_sizes(cfg)

    state = wd / "checkpoints" / "1" / "state"
    stored, _ = _orbax_array_bytes(state)
    assert stored == sizes["train_checkpoint_bytes"]
    # on disk: compressed arrays plus orbax's metadata files (tens of KiB at this size)
    assert _disk_bytes(state) <= sizes["train_checkpoint_bytes"] + 160 * 1024

    base, base_dtypes = _orbax_array_bytes(wd / "export" / "base")
    flow, flow_dtypes = _orbax_array_bytes(wd / "export" / "flow")
    assert base_dtypes == {"bfloat16"} and flow_dtypes == {"float32"}
    assert base + flow == sizes["export_bytes"]
    on_disk = _disk_bytes(wd / "export" / "base") + _disk_bytes(wd / "export" / "flow")  # not compressed
    assert sizes["export_bytes"] <= on_disk <= sizes["export_bytes"] + 160 * 1024

    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"sd_{dtype}.safetensors"
        assert cli.main(["convert", "export", str(wd / "export"), str(out), "--dtype", dtype]) == 0
        raw = out.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        assert len(raw) - 8 - header_len == sizes["original_state_dict_bytes"][dtype]
