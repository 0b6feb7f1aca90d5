"""l2d_jax.diffusion against the goldens of the original PyTorch code and closed forms."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2d_jax import diffusion

GOLDENS = Path(__file__).parent / "goldens"
SETS = ("llama_lora", "llama_tied")
VEL_TAGS = ("t0", "t0p25", "t0p7")


@pytest.fixture(scope="module", params=SETS)
def golden(request) -> tuple[dict[str, np.ndarray], dict]:
    folder = GOLDENS / request.param
    with np.load(folder / "cases.npz") as cases:
        arrays = dict(cases)
    return arrays, json.loads((folder / "l2d_settings.json").read_text())


def jit_call(fn, *arrays, **config):
    """fn(*arrays, **config) compiled as one program (much faster than op-by-op dispatch)."""
    return jax.jit(functools.partial(fn, **config))(*arrays)


def rel_err(ours, ref) -> float:
    """max|ours - ref| / max(1, max|ref|), the goldens' error measure."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


# ---------------------------------------------------------------------------- goldens


@pytest.mark.parametrize(
    "name, temperature, normalize",
    [
        ("repr_weighted_T1p0", 1.0, False),
        ("repr_weighted_T0p5", 0.5, False),
        ("repr_weighted_T0_argmax", 0.0, False),
        ("repr_weighted_T1p0_normalized", 1.0, True),
    ],
)
def test_weighted_representation_golden(golden, name, temperature, normalize):
    cases, settings = golden
    ours = jit_call(
        diffusion.estimate_x1,
        cases["repr_logits"],
        cases["repr_table"],
        mode="average",
        temperature=temperature,
        normalize=normalize,
        rescaling=settings["flow_representation_rescaling"],
    )
    assert rel_err(ours, cases[name]) < 1e-5


@pytest.mark.parametrize("tag", VEL_TAGS)
def test_velocity_x1_golden(golden, tag):
    cases, _ = golden
    ours = jit_call(
        diffusion.estimate_x1,
        cases[f"vel_{tag}_logits"],
        cases["repr_table"],
        mode="average",
        temperature=1.0,
    )
    assert rel_err(ours, cases[f"vel_{tag}_x1"]) < 1e-5


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("index, tag", list(enumerate(VEL_TAGS)))
def test_velocity_golden(golden, index, tag, x64):
    cases, settings = golden
    if f"vel_{tag}" not in cases:
        pytest.skip(f"vel_{tag} is absent from this set (guidance sets)")
    with jax.enable_x64(x64):
        ours = jit_call(
            diffusion.velocity,
            cases[f"vel_{tag}_x1"],
            cases[f"vel_{tag}_xt"],
            cases["vel_timesteps"][index],
            schedule=settings["velocity_schedule"],
        )
        assert ours.dtype == (jnp.float64 if x64 else jnp.float32)
        assert rel_err(ours, cases[f"vel_{tag}"]) < (1e-12 if x64 else 1e-4)


def test_train_loss_golden(golden):
    cases, _ = golden
    loss, token_losses = jit_call(diffusion.cross_entropy_loss, cases["train_logits"], cases["train_labels"])
    assert loss.dtype == token_losses.dtype == jnp.float32
    assert rel_err(loss, cases["train_loss"]) < 1e-5
    assert rel_err(token_losses, cases["train_token_losses"]) < 1e-5
    shifted, _ = jit_call(
        diffusion.loss_for_labels, cases["train_logits"], cases["train_labels"], shifted=True
    )
    assert rel_err(shifted, cases["train_loss"]) < 1e-5


def test_train_unshifted_loss_golden(golden):
    cases, _ = golden
    loss, token_losses = jit_call(
        diffusion.loss_for_labels,
        cases["train_unshifted_logits"],
        cases["train_unshifted_labels"],
        shifted=False,
    )
    assert token_losses.shape == cases["train_unshifted_labels"][:, 1:].shape
    assert rel_err(loss, cases["train_unshifted_loss"]) < 1e-5


def test_forward_interpolation_golden(golden):
    cases, settings = golden
    ours = jit_call(
        diffusion.interpolate,
        cases["fwd_noise"],
        cases["fwd_target_repr"],
        cases["fwd_timesteps"],
        noise_rescaling=settings["noise_rescaling"],
        dtype=jnp.float32,
    )
    assert ours.dtype == jnp.float32
    assert rel_err(ours, cases["fwd_flow_representation_embeds"]) < 1e-5


def test_train_interpolation_golden(golden):
    cases, settings = golden
    targets, mask = diffusion.flow_targets(jnp.asarray(cases["train_labels"]), shifted=True)
    assert bool(mask.all())
    ours = jit_call(
        diffusion.interpolate,
        cases["train_noise"],
        cases["repr_table"][np.asarray(targets)],
        cases["train_timesteps"],
        noise_rescaling=settings["noise_rescaling"],
        dtype=jnp.float32,
    )
    assert rel_err(ours, cases["train_flow_representation_embeds"]) < 1e-5


# ---------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    "rescaling, norm", [("mult", math.sqrt(8)), ("div", 1 / math.sqrt(8)), ("none", 1.0)]
)
def test_normalize_flow(rescaling, norm):
    x = jax.random.normal(jax.random.key(0), (3, 5, 8)) * 7.0
    y = jit_call(diffusion.normalize_flow, x, rescaling=rescaling)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), norm, rtol=1e-6)
    unit = np.asarray(x) / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y) / norm, unit, atol=1e-6)
    assert not np.asarray(jit_call(diffusion.normalize_flow, jnp.zeros((2, 8)), rescaling=rescaling)).any()


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="noise_schedule.*'identity', 'cosmap'.*'linear'"):
        diffusion.apply_noise_schedule(jnp.zeros(3), "linear", 0.0)
    with pytest.raises(ValueError, match="minimum_training_noise"):
        diffusion.apply_noise_schedule(jnp.zeros(3), "identity", 1.0)
    with pytest.raises(ValueError, match="flow_representation_rescaling"):
        diffusion.normalize_flow(jnp.ones((2, 4)), "sqrt")
    with pytest.raises(ValueError, match="velocity_schedule"):
        diffusion.velocity(jnp.ones(4), jnp.zeros(4), 0.5, "linear")
    with pytest.raises(ValueError, match="nstep_x1_estimation"):
        diffusion.estimate_x1(jnp.zeros((2, 4)), jnp.eye(4), "mean", 1.0)
    with pytest.raises(ValueError, match="key"):
        diffusion.estimate_x1(jnp.zeros((2, 4)), jnp.eye(4), "sample", 1.0)


def test_noise_schedules():
    t = np.linspace(0.0, 0.99, 23, dtype=np.float32)
    schedule = functools.partial(jit_call, diffusion.apply_noise_schedule, t)
    np.testing.assert_allclose(schedule(schedule="identity", minimum_training_noise=0.0), t)
    cosmap = 1.0 - 1.0 / (np.tan(np.pi * t.astype(np.float64) / 2) + 1.0)
    np.testing.assert_allclose(schedule(schedule="cosmap", minimum_training_noise=0.0), cosmap, atol=1e-6)
    np.testing.assert_allclose(
        schedule(schedule="cosmap", minimum_training_noise=0.1), 0.9 * cosmap, atol=1e-6
    )
    s = jit_call(
        diffusion.sample_timesteps,
        jax.random.key(1),
        shape=(4, 1000),
        schedule="identity",
        minimum_training_noise=0.25,
    )
    assert s.shape == (4, 1000) and s.dtype == jnp.float32
    assert float(s.min()) >= 0.0 and float(s.max()) < 0.75 and float(s.max()) > 0.7


def test_timestep_frequency_embedding():
    t = np.array([[0.0, 0.3, 1.0], [0.5, 0.25, 0.999]], np.float32)
    emb = jit_call(diffusion.timestep_frequency_embedding, t, dim=16)
    assert emb.shape == (2, 3, 16) and emb.dtype == jnp.float32
    freqs = np.exp(-np.log(10000.0) * np.arange(8) / 8)
    args = t.astype(np.float64)[..., None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-6)
    assert diffusion.timestep_frequency_embedding(jnp.float32(0.5), 256).shape == (256,)
    with pytest.raises(ValueError, match="even"):
        diffusion.timestep_frequency_embedding(jnp.zeros(2), 7)


def test_temperature_schedules():
    assert diffusion.parse_temperature_schedule(0.0) == ("constant", (0.0,))
    assert diffusion.parse_temperature_schedule(1) == ("constant", (1.0,))
    assert diffusion.parse_temperature_schedule("0.5") == ("constant", (0.5,))
    assert diffusion.parse_temperature_schedule("Polynomial_2_0.5") == ("polynomial", (2.0, 0.5))
    for bad in ("polynomial_1", "poly_1_1.0", "polynomial_a_1.0", "polynomial_1_0", True, None):
        with pytest.raises(ValueError, match="nstep_temperature_schedule"):
            diffusion.parse_temperature_schedule(bad)
    t = jnp.array([0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(diffusion.temperature_at(0.7, t), [0.7] * 5)
    np.testing.assert_allclose(diffusion.temperature_at("polynomial_1_1.0", t), [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(diffusion.temperature_at("polynomial_2_0.5", t), [1.0, 0.25, 0.0, 0.0, 0.0])
    traced = jax.jit(lambda s: diffusion.temperature_at("polynomial_3_0.8", s))
    np.testing.assert_allclose(traced(jnp.float32(0.4)), 0.5**3, rtol=1e-6)
    np.testing.assert_allclose(traced(jnp.float32(0.9)), 0.0)


def test_estimate_x1_traced_temperature():
    keys = jax.random.split(jax.random.key(2))
    logits = jax.random.normal(keys[0], (2, 5, 16)) * 3
    table = jax.random.normal(keys[1], (16, 4))
    rows = np.asarray(table)[np.argmax(np.asarray(logits), -1)]
    for mode in ("average", "sample"):
        fn = jax.jit(
            lambda T, mode=mode: diffusion.estimate_x1(logits, table, mode, T, key=keys[0], normalize=True)
        )
        np.testing.assert_array_equal(fn(jnp.float32(0.0)), rows)  # no normalisation when greedy
        np.testing.assert_array_equal(fn(jnp.float32(-1.0)), rows)
        assert np.isfinite(np.asarray(fn(jnp.float32(0.3)))).all()
    p = np.exp(np.asarray(logits, np.float64) / 0.3)
    p /= p.sum(-1, keepdims=True)
    ours = jax.jit(lambda T: diffusion.estimate_x1(logits, table, "average", T))(jnp.float32(0.3))
    np.testing.assert_allclose(ours, p @ np.asarray(table, np.float64), atol=1e-5)


def test_estimate_x1_sample_mode():
    table = jnp.arange(12.0).reshape(3, 4)
    peaked = jnp.tile(jnp.array([0.0, 40.0, 0.0]), (6, 1))
    np.testing.assert_array_equal(
        jit_call(diffusion.estimate_x1, peaked, table, mode="sample", temperature=1.0, key=jax.random.key(3)),
        np.tile(table[1], (6, 1)),
    )
    logits = jnp.tile(jnp.log(jnp.array([0.2, 0.8, 1e-9])), (20000, 1))
    for temperature, p1 in ((1.0, 0.8), (0.5, 0.64 / 0.68)):
        key = jax.random.key(4)
        x1 = jit_call(diffusion.estimate_x1, logits, table, mode="sample", temperature=temperature, key=key)
        is_row1 = np.all(np.asarray(x1) == np.asarray(table[1]), axis=-1)
        assert np.all(is_row1 | np.all(np.asarray(x1) == np.asarray(table[0]), axis=-1))
        assert abs(is_row1.mean() - p1) < 0.015


def test_estimate_x1_from_a_row_function_equals_the_table():
    """"sample" mode (and greedy x1) read only the rows they pick: a function ids -> rows
    gives what the table gives, for sampled and greedy rows; "average" needs the table."""
    keys = jax.random.split(jax.random.key(5))
    logits = jax.random.normal(keys[0], (3, 2, 16)) * 3
    table = jax.random.normal(keys[1], (16, 4))
    calls = []

    def rows(ids):
        calls.append(ids.shape)
        return table[ids] * 1.0

    for temperature in (0.0, 0.7):
        want = diffusion.estimate_x1(logits, table, "sample", temperature, key=keys[0], normalize=True)
        got = diffusion.estimate_x1(logits, rows, "sample", temperature, key=keys[0], normalize=True)
        np.testing.assert_array_equal(got, want)
    assert set(calls) == {(3, 2)}  # never the whole vocabulary
    with pytest.raises(ValueError, match="needs the whole flow table"):
        diffusion.estimate_x1(logits, rows, "average", 0.7)


def test_estimate_x1_clamp_and_normalize():
    # p @ table = 0.5 * (r0 + r1) = (1, 1.5); its inner product is largest with r2 = (0.2, 3),
    # which is not the argmax row.
    table = jnp.array([[2.0, 0.0], [0.0, 3.0], [0.2, 3.0]])
    logits = jnp.log(jnp.array([[0.5, 0.5, 1e-12]]))
    clamped = jit_call(
        diffusion.estimate_x1, logits, table, mode="average", temperature=1.0, clamp=True, normalize=True
    )
    np.testing.assert_array_equal(clamped, table[2:3])  # clamp wins over normalize
    normalized = jit_call(
        diffusion.estimate_x1,
        logits,
        table,
        mode="average",
        temperature=1.0,
        normalize=True,
        rescaling="none",
    )
    np.testing.assert_allclose(normalized, [[1 / math.sqrt(3.25), 1.5 / math.sqrt(3.25)]], rtol=1e-5)


@pytest.mark.parametrize("schedule, power", [("constant", 1), ("edm", 2)])
def test_velocity_schedules(schedule, power):
    x = jax.random.normal(jax.random.key(5), (2, 3, 4))
    x1 = jax.random.normal(jax.random.key(6), (2, 3, 4))
    t = jnp.array([[0.0, 0.5, 0.9], [0.25, 0.75, 0.1]])
    expected = (np.asarray(x1) - np.asarray(x)) / (1 - np.asarray(t))[..., None] ** power
    np.testing.assert_allclose(jit_call(diffusion.velocity, x1, x, t, schedule=schedule), expected, rtol=1e-5)
    np.testing.assert_allclose(
        jit_call(diffusion.velocity, x1, x, 0.5, schedule=schedule),
        (np.asarray(x1) - np.asarray(x)) / 0.5**power,
        rtol=1e-6,
    )


def test_guidance_mix():
    v_cond, v_null = jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])
    np.testing.assert_allclose(diffusion.guidance_mix(v_cond, v_null, 1.5), [0.0, 3.5])
    np.testing.assert_allclose(diffusion.guidance_mix(v_cond, v_null, 1.0), v_cond)


def test_cross_entropy_by_hand():
    logits = jnp.array([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    loss, per_token = jit_call(diffusion.cross_entropy_loss, logits, jnp.array([[1, -100]]))
    np.testing.assert_allclose(per_token, [[math.log(4 / 3), 0.0]], rtol=1e-6)
    np.testing.assert_allclose(loss, math.log(4 / 3), rtol=1e-6)


def test_flow_targets_unshifted():
    labels = jnp.array([[-100, 5, 7, -100], [3, 4, -100, 9]])
    targets, mask = diffusion.flow_targets(labels, shifted=False)
    np.testing.assert_array_equal(targets, [[5, 7, 0, 0], [4, 0, 9, 0]])
    np.testing.assert_array_equal(mask, [[True, True, True, False]] * 2)
    targets, mask = diffusion.flow_targets(labels, shifted=True)
    np.testing.assert_array_equal(targets, [[0, 5, 7, 0], [3, 4, 0, 9]])
    assert bool(mask.all())


def test_interpolate_model_dtype():
    eps = jnp.ones((1, 2, 4))
    x1 = jnp.full((1, 2, 4), 2.0)
    t = jnp.array([[0.0, 0.3]], jnp.float32)
    out = jit_call(diffusion.interpolate, eps, x1, t, noise_rescaling=64.0, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    t_bf16 = float(jnp.bfloat16(0.3))  # t is cast to the model dtype first
    np.testing.assert_allclose(np.asarray(out[0, 1], np.float32), (1 - t_bf16) * 64 + 2 * t_bf16, rtol=1e-2)
    np.testing.assert_array_equal(np.asarray(out[0, 0], np.float32), 64.0)
