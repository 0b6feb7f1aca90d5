"""``l2d-jax verify-torch`` against the shipped golden sets, and that it fails when it must."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import golden_sets
from l2d_jax import cli
from l2d_jax.verify import classify

SETS = golden_sets()


def _run(folder: Path, tmp_path: Path, capsys) -> tuple[int, dict, str]:
    out = tmp_path / f"{folder.name}.json"
    code = cli.main(["verify-torch", str(folder), "--json", str(out)])
    return code, json.loads(out.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("folder", SETS, ids=[p.name for p in SETS])
def test_every_case_of_the_golden_set_passes(folder, tmp_path, capsys):
    code, report, printed = _run(folder, tmp_path, capsys)
    assert code == 0, printed
    assert report["set"] == folder.name and report["passed"] is True
    assert report["unknown_keys"] == [] and report["skipped"] == []
    with np.load(folder / "cases.npz") as z:
        keys = list(z.files)
    kinds = {k: classify(k)[0] for k in keys}
    assert all(kind in ("case", "input") for kind in kinds.values())  # nothing skipped or unknown
    names = {c["name"] for c in report["cases"]}
    assert {k for k, kind in kinds.items() if kind == "case"} <= names  # every output checked
    with np.load(folder / "train_grads.npz") as z:
        assert {f"train_grads.npz:{k}" for k in z.files} <= names  # every gradient checked
    for c in report["cases"]:
        assert set(c) >= {"name", "err", "tol", "passed"}
        assert c["passed"] and c["err"] <= c["tol"], c
    assert "fwd_logits" in printed and "pass" in printed


def _copy(src: Path, dst: Path, cases: dict, with_l2d: bool = True) -> Path:
    """A golden folder sharing src's files (symlinks) with its own cases.npz."""
    dst.mkdir()
    names = ["base", "meta.json"] + (["l2d_settings.json", "l2d_state.safetensors"] if with_l2d else [])
    for name in names:
        os.symlink(src / name, dst / name)
    np.savez(dst / "cases.npz", **cases)
    return dst


def _subset(src: Path, prefixes: tuple[str, ...]) -> dict:
    with np.load(src / "cases.npz") as z:
        return {k: z[k] for k in z.files if k.startswith(prefixes)}


@pytest.fixture(scope="module")
def lora_dir() -> Path:
    return next(p for p in SETS if p.name == "llama_lora")


def test_doctored_logits_fail(lora_dir, tmp_path, capsys):
    cases = _subset(lora_dir, ("fwd_", "base_pad_"))
    cases["fwd_logits"] = cases["fwd_logits"].copy()
    cases["fwd_logits"][1, 4, 17] += 1e-2
    folder = _copy(lora_dir, tmp_path / "doctored", cases)
    code, report, _ = _run(folder, tmp_path, capsys)
    assert code == 1 and report["passed"] is False
    by_name = {c["name"]: c for c in report["cases"]}
    assert by_name["fwd_logits"]["passed"] is False and by_name["fwd_logits"]["err"] > 2e-4
    assert all(c["passed"] for n, c in by_name.items() if n != "fwd_logits")  # only the doctored one
    assert {s["name"] for s in report["skipped"]} >= {"train_logits", "train_grads.npz"}  # absent: notices


def test_unknown_key_fails(lora_dir, tmp_path, capsys):
    cases = _subset(lora_dir, ("fwd_",))
    cases["fwd_logits_at_t_half"] = cases["fwd_logits"]
    folder = _copy(lora_dir, tmp_path / "unknown", cases)
    code, report, printed = _run(folder, tmp_path, capsys)
    assert code == 1 and report["passed"] is False
    assert report["unknown_keys"] == ["fwd_logits_at_t_half"]
    assert all(c["passed"] for c in report["cases"])  # everything it knows passes
    assert "fwd_logits_at_t_half" in printed


def test_base_only_folder_checks_only_base_cases(lora_dir, tmp_path, capsys):
    cases = _subset(lora_dir, ("base_pad_", "base_logits_hf", "fwd_input_ids"))
    folder = _copy(lora_dir, tmp_path / "base_only", cases, with_l2d=False)
    assert sorted(p.name for p in folder.iterdir()) == ["base", "cases.npz", "meta.json"]
    code, report, _ = _run(folder, tmp_path, capsys)
    assert code == 0 and report["passed"] is True
    assert sorted(c["name"] for c in report["cases"]) == ["base_logits_hf", "base_pad_logits_hf"]
    assert [s["name"] for s in report["skipped"]] == ["base_long_logits_hf"]  # absent: a notice


def test_nothing_checked_fails(lora_dir, tmp_path, capsys):
    folder = _copy(lora_dir, tmp_path / "inputs_only", _subset(lora_dir, ("fwd_input_ids", "fwd_noise")),
                   with_l2d=False)
    code, report, _ = _run(folder, tmp_path, capsys)
    assert code == 1 and report["cases"] == [] and report["passed"] is False


def test_not_a_golden_folder_is_a_one_line_error(tmp_path, capsys):
    code = cli.main(["verify-torch", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "cases.npz" in err
