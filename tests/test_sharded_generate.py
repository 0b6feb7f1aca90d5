"""Generation with parameters sharded over a tensor-parallel mesh gives the single-device tokens.

Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before JAX starts). The
model's state is placed with ``sharding.state_shardings`` on a (data=1, fsdp=1, tensor=4)
mesh and on (data=2, fsdp=1, tensor=2) with the prompts sharded over the batch axes; the
jitted ``generate`` takes the sharded arrays as they are (no mesh context, no in/out
shardings) and XLA partitions the decode loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jax_tiny import tiny_l2d
from l2d_jax import sharding as shd
from l2d_jax.generate import GenerateOptions, generate, left_pad
from l2d_jax.sampling import Sampler

assert jax.device_count() == 8, jax.devices()
model = tiny_l2d(0)
prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6], [7]]
ids, mask = left_pad(prompts, 2)
opts = GenerateOptions(max_new_tokens=8)
runs = {"l2d_ode4_t1": dict(ode_steps=4, sampler=Sampler(1.0))}  # prefill, decode and the ODE

def tokens(m, ids, mask):
    out = {}
    for name, kw in runs.items():
        r = generate(m if kw["ode_steps"] else m.base, ids, mask, key=jax.random.PRNGKey(3), opts=opts, **kw)
        out[name] = np.asarray(r.tokens).tolist()
    return out

result = {"single": tokens(model, ids, mask)}
for name, (d, f, t) in {"tensor4": (1, 1, 4), "data2_tensor2": (2, 1, 2)}.items():
    mesh = shd.make_mesh(d, f, t, devices=jax.devices()[:d * f * t])
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, shd.state_shardings(state, mesh))
    sharded = nnx.merge(graphdef, state)
    specs = {str(v.sharding.spec) for v in jax.tree.leaves(nnx.state(sharded))}
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    result[name] = tokens(sharded, jax.device_put(ids, rows), jax.device_put(mask, rows))
    result[name + "_tensor_sharded_params"] = any("tensor" in s for s in specs)
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow  # ~35 s: three compilations of the L2D decode loop
def test_tensor_parallel_generation_matches_single_device(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")
    script = tmp_path / "sharded_generate.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(REPO / "tests")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    single = result["single"]
    assert len(single["l2d_ode4_t1"]) == 4 and len(single["l2d_ode4_t1"][0]) == 8
    for mesh in ("tensor4", "data2_tensor2"):
        assert result[mesh + "_tensor_sharded_params"], f"{mesh}: no parameter was sharded over tensor"
        assert result[mesh] == single, mesh
