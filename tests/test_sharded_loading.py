"""Loading a model straight into its sharded layout: ``load_any(..., mesh=...)``.

Sources (tiny, float32): a converted L2D checkpoint (format 2) and the format-1 one of
tests/fixtures/ckpt_v1, an HF directory and a converted base checkpoint of the same base
(tests/jax_tiny.py with 4 KV heads), and training checkpoints: the format-1 one of
tests/fixtures/workdir_v1 (per-layer parameters) and a format-2 copy of it (stacked). Each is
loaded in a 4-device worker onto the mesh fsdp=2 x tensor=2 and without a mesh. Checks:

- every parameter is an array on its rules' ``NamedSharding`` (``sharding.state_shardings``,
  what ``place_module`` gives), each leaf the rules split holds on a device only the shard
  its spec says (smaller than the whole), and the values equal the one-device load;
- no device receives a whole parameter: while loading onto the mesh, no ``jax.device_put``
  and no orbax restore target names a single device (a spy on both; the control run, the
  old way of loading onto one device and then placing, is caught by the same spy). The one
  exception is by design and not checked: the workdirs' ``random:tiny`` base is initialised
  on the default device, as training builds it, then placed (``build_base``);
- ``inference_mesh`` (what ``runner._prepare_mesh`` and ``generate_text`` call) moves
  nothing for a model loaded onto its mesh, and ``generate_cli`` / ``run_from_config`` hand
  ``load_any`` the mesh of their sizes (None for one device);
- generated tokens (greedy; the L2D checkpoint with 4 ODE grid points, the HF base with 0)
  equal the one-device load's.

Devices are fake CPU devices (XLA_FLAGS, read when JAX starts) in a subprocess running this
file: ``python tests/test_sharded_loading.py OUT.json SOURCES.json GROUP``, GROUP ``load`` or
``generate``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MESH = (1, 2, 2)  # data, fsdp, tensor
NEW = 6  # new tokens per generation
SOURCES = ("l2d", "l2d_v1", "hf", "converted_base", "workdir_v1", "workdir_v2")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """name -> path of every source (see the module docstring), built on one device."""
    from flax import nnx
    from jax_tiny import HF_CONFIG, tiny_l2d

    from l2d_jax import checkpoint
    from l2d_jax.config import tiny_tokenizer
    from l2d_jax.convert.hf import save_hf

    root = tmp_path_factory.mktemp("sharded_loading")
    model = tiny_l2d(seed=3, num_key_value_heads=4)
    hf_config = {**HF_CONFIG, "num_key_value_heads": 4}
    base_params = nnx.to_pure_dict(nnx.state(model.base, nnx.Param))
    out = {"l2d_v1": str(TESTS / "fixtures" / "ckpt_v1" / "l2d_tiny")}
    out["l2d"] = str(checkpoint.save_checkpoint(
        root / "l2d", kind="l2d", dtype="float32", tokenizer=tiny_tokenizer(), base_params=base_params,
        hf_config=hf_config, flow_params=nnx.to_pure_dict(nnx.state(model.flow, nnx.Param)),
        l2d_settings=model.settings.to_dict()))
    out["converted_base"] = str(checkpoint.save_checkpoint(
        root / "base", kind="base", dtype="float32", tokenizer=tiny_tokenizer(), base_params=base_params,
        hf_config=hf_config))
    out["hf"] = str(save_hf(model.base, hf_config, root / "hf", tokenizer=tiny_tokenizer()))
    wd = root / "wd"
    shutil.copytree(TESTS / "fixtures" / "workdir_v1" / "wd", wd)
    out["workdir_v1"] = str(wd / "checkpoints" / "2")
    out["workdir_v2"] = str(_format2_checkpoint(wd))
    path = root / "sources.json"
    path.write_text(json.dumps(out))
    return {"json": path, **out}


def _format2_checkpoint(wd: Path) -> Path:
    """``wd/checkpoints/3``: the format-1 checkpoint 2's state saved again with its layers
    stacked (as the training loop writes it now): step, params, Adam-like moments, key."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from l2d_jax import checkpoint

    with ocp.StandardCheckpointer() as ckptr:
        src = wd / "checkpoints" / "2" / "state"
        state = ckptr.restore(src.absolute(), checkpoint.local_abstract_tree(ckptr.metadata(src.absolute()).item_metadata.tree))
    params = {part: checkpoint.stack_layers(tree) for part, tree in state["params"].items()}
    assert 0 not in params["flow"]["layers"]  # stacked, not one subtree per layer
    moments = jax.tree.map(np.zeros_like, params)
    dst = (wd / "checkpoints" / "3" / "state").absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst, {"step": np.int32(3), "params": params, "opt_state": {"mu": moments, "nu": moments},
                         "key": np.zeros(2, np.uint32)})
    return dst.parent


def _run_worker(tmp_path: Path, sources: dict, group: str) -> dict:
    """The worker's results of ``group`` (4 fake CPU devices, test_sharded_generation's flags)."""
    import subprocess

    from test_sharded_generation import _env

    out, log = tmp_path / f"{group}.json", tmp_path / f"{group}.log"
    with log.open("wb") as f:
        rc = subprocess.run([sys.executable, __file__, str(out), str(sources["json"]), group], cwd=REPO,
                            env=_env(4, tmp_path / "cache"), stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def loaded(sources, tmp_path_factory) -> dict:
    return _run_worker(tmp_path_factory.mktemp("load"), sources, "load")


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("source", SOURCES)
def test_load_any_creates_every_parameter_on_its_sharding(loaded, source):
    r = loaded[source]
    assert r["kind"] == ("base" if source in ("hf", "converted_base") else "l2d")
    assert r["shardings_are_the_rules"], r["wrong_sharding"]
    assert r["mismatched_values"] == []
    split = {p for p, leaf in r["placement"].items() if leaf["sharded"]}
    stacked = {p for p in split if "/layers/" in f"/{p}" and p.endswith("kernel") and "self_attn" in p}
    assert stacked, "the stacked attention matrices of the base are split"
    for path, leaf in r["placement"].items():
        assert leaf["shard"] == leaf["expected_shard"], path
        if path in split:
            assert leaf["shard"] != leaf["shape"], path


@pytest.mark.parametrize("source", SOURCES)
def test_no_device_receives_a_whole_parameter_while_loading(loaded, source):
    r = loaded[source]
    assert r["placements_seen"] >= len(r["placement"])  # the spy saw every parameter placed...
    assert r["single_device_placements"] == []  # ...none onto one device
    # the spy sees the old way: loading onto one device, then placing on the mesh
    assert r["control_single_device_placements"] > 0


def test_callers_load_onto_their_mesh_and_placing_again_moves_nothing(loaded):
    c = loaded["callers"]
    want = {"data": MESH[0], "fsdp": MESH[1], "tensor": MESH[2]}
    assert c["generate_cli"] == want and c["run_from_config"] == want
    assert c["one_device"] == [None, None]  # a mesh of one device loads as without one
    assert c["moved_by_inference_mesh"] == 0 and c["leaves"] > 0


def test_sharded_loads_generate_the_one_device_tokens(sources, tmp_path):
    r = _run_worker(tmp_path, sources, "generate")
    for name in ("l2d", "hf"):
        assert len(r[name]["single"]) == 4 and all(len(row) == NEW for row in r[name]["single"])
        assert r[name]["sharded"] == r[name]["single"], name
    assert r["l2d"]["single"] != r["l2d_ode0"], "the flow path matters"
    assert r["l2d_ode0"] == r["hf"]["single"]  # the HF directory holds the L2D model's base


# --------------------------------------------------------------------------- worker side


class _Spy:
    """Records single-device placements of arrays: ``jax.device_put`` calls of l2d_jax code
    onto a device / a one-device sharding / none (the default device), and orbax restore
    targets on one device (orbax's own per-shard puts are not l2d_jax's)."""

    def __init__(self):
        self.placements: list[str] = []  # the single-device ones
        self.seen = 0  # arrays placed, anywhere

    def install(self, monkeypatch) -> None:
        import jax
        import orbax.checkpoint as ocp

        put, restore, spy = jax.device_put, ocp.Checkpointer.restore, self

        def device_put(x, device=None, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("l2d_jax"):
                spy.see(f"device_put in {caller}", x, device)
            return put(x, device, *args, **kwargs)

        def checkpointer_restore(self, directory, *args, **kwargs):
            item = getattr(kwargs.get("args"), "item", None)
            for leaf in jax.tree.leaves(item):
                if isinstance(leaf, jax.ShapeDtypeStruct):
                    spy.see(f"restore {directory}", leaf, leaf.sharding)
            return restore(self, directory, *args, **kwargs)

        monkeypatch.setattr(jax, "device_put", device_put)
        monkeypatch.setattr(ocp.Checkpointer, "restore", checkpointer_restore)

    def see(self, what: str, x, where) -> None:
        import jax

        def single(w) -> bool:
            return w is None or isinstance(w, jax.Device) or len(w.device_set) == 1

        def is_where(w) -> bool:
            return w is None or isinstance(w, (jax.Device, jax.sharding.Sharding))

        if is_where(where):
            leaves = [(where, leaf) for leaf in jax.tree.leaves(x)]
        else:  # a tree of shardings, a prefix of x's
            leaves = [(w, leaf) for w, sub in zip(jax.tree.leaves(where, is_leaf=is_where),
                                                  jax.tree.structure(where, is_leaf=is_where).flatten_up_to(x))
                      for leaf in jax.tree.leaves(sub)]
        leaves = [(w, leaf) for w, leaf in leaves if len(getattr(leaf, "shape", ())) >= 1]
        self.seen += len(leaves)
        self.placements += [f"{what}: {leaf.shape}" for w, leaf in leaves if single(w)]


def _load(source: str, mesh=None):
    """``load_any`` of a SOURCES path (the format-1 fixture has no tokenizer of its own)."""
    from l2d_jax.config import RANDOM_TINY
    from l2d_jax.convert import loading

    return loading.load_any(source, mesh=mesh, tokenizer_dir=RANDOM_TINY if "ckpt_v1" in source else None)


def _load_checks(sources: dict, mesh) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from test_sharded_generation import _placement as placement  # the worker has tests/ on sys.path

    from l2d_jax import sharding as shd

    result = {}
    for name in SOURCES:
        spy = _Spy()
        with pytest.MonkeyPatch.context() as mp:
            spy.install(mp)
            model, _, desc = _load(sources[name], mesh)
        one, _, _ = _load(sources[name])
        control = _Spy()
        with pytest.MonkeyPatch.context() as mp:
            control.install(mp)
            shd.place_module(_load(sources[name])[0], mesh)
        flat = nnx.to_flat_state(nnx.state(model))
        want = nnx.to_flat_state(shd.state_shardings(nnx.state(model), mesh))
        wrong = [f"{p}: {v.get_value().sharding}" for (p, v), (_, s) in zip(flat, want) if v.get_value().sharding != s]
        mismatched = ["/".join(map(str, p)) for (p, a), (_, b) in zip(flat, nnx.to_flat_state(nnx.state(one)))
                      if not np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))]
        assert len(flat) == len(jax.tree.leaves(nnx.state(one)))
        result[name] = dict(kind=desc["kind"], shardings_are_the_rules=not wrong, wrong_sharding=wrong[:5],
                            mismatched_values=mismatched, placement=placement(model, mesh),
                            single_device_placements=spy.placements[:10], placements_seen=spy.seen,
                            control_single_device_placements=len(control.placements))
    return result


def _caller_checks(sources: dict, mesh) -> dict:
    """The mesh ``generate_cli`` / ``run_from_config`` hand ``load_any`` (stopped there), and
    what ``inference_mesh`` moves of a model loaded onto its mesh."""
    import jax
    from flax import nnx

    from l2d_jax import sharding as shd
    from l2d_jax.convert import loading
    from l2d_jax.evaluation import runner
    from l2d_jax.generate import generate_cli

    class Stop(Exception):
        pass

    seen = []

    def load_any(*args, mesh=None, **kwargs):
        seen.append(None if mesh is None else dict(mesh.shape))
        raise Stop

    sizes = {"data": MESH[0], "fsdp": MESH[1], "tensor": MESH[2]}
    cfg = runner.load_eval_config(str(REPO / "configs" / "benchmark.py"), [])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_any", load_any)
        for call in (lambda m: generate_cli(sources["hf"], ["hi"], mesh=m),
                     lambda m: runner.run_from_config(cfg, sources["l2d"], steps="0", mesh=m)):
            for m, n in ((sizes, 4), ({"data": 1}, 1)):  # n: local devices
                mp.setattr(jax, "local_devices", lambda *a, n=n, **k: jax.devices()[:n])
                with pytest.raises(Stop):
                    call(",".join(f"{k}={v}" for k, v in m.items()))
    model, _, _ = loading.load_any(sources["l2d"], mesh=mesh)
    before = jax.tree.leaves(nnx.state(model))
    assert shd.inference_mesh(model, sizes) == mesh
    after = jax.tree.leaves(nnx.state(model))
    return dict(generate_cli=seen[0], run_from_config=seen[2], one_device=[seen[1], seen[3]],
                moved_by_inference_mesh=sum(a is not b for a, b in zip(before, after)), leaves=len(after))


def _generate_checks(sources: dict, mesh) -> dict:
    import jax
    import numpy as np

    from l2d_jax import sharding as shd
    from l2d_jax.convert import loading
    from l2d_jax.generate import GenerateOptions, generate, left_pad
    from l2d_jax.sampling import Sampler

    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6], [7]], 2)
    opts = GenerateOptions(max_new_tokens=NEW, max_ode_points=4)
    rows = shd.batch_sharding(mesh)

    def tokens(model, ode_steps, placed) -> list:
        kw = dict(key=jax.random.PRNGKey(3), opts=opts, ode_steps=ode_steps, sampler=Sampler(0.0))
        if not placed:
            return np.asarray(generate(model, ids, mask, **kw).tokens).tolist()
        with shd.gather_layers(mesh):
            return np.asarray(generate(model, jax.device_put(ids, rows), jax.device_put(mask, rows), **kw).tokens).tolist()

    out: dict = {}
    for name, steps in (("l2d", 4), ("hf", 0)):
        one = loading.load_any(sources[name])[0]
        out[name] = {"single": tokens(one, steps, False),
                     "sharded": tokens(loading.load_any(sources[name], mesh=mesh)[0], steps, True)}
        if name == "l2d":
            out["l2d_ode0"] = tokens(one, 0, False)
    return out


def _worker(out_path: str, sources_path: str, group: str) -> None:
    import jax

    from l2d_jax import sharding as shd

    assert jax.device_count() == 4, jax.devices()
    sources = json.loads(Path(sources_path).read_text())
    mesh = shd.make_mesh(*MESH)
    if group == "load":
        result = _load_checks(sources, mesh)
        result["callers"] = _caller_checks(sources, mesh)
    else:
        result = _generate_checks(sources, mesh)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    _worker(*sys.argv[1:4])
