"""The L2D model against the original's golden gradients and state layout, plus exact
properties: t = 0 gives the base model, a fresh flow path changes nothing, import/export is
lossless, and bad settings / checkpoints are rejected naming the offending key."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from conftest import golden_sets
from jax_tiny import HF_CONFIG, LORA_SETTINGS, tiny_llm
from l2d_jax.convert.original import l2d_from_original, read_settings
from l2d_jax.convert.names import stacked_path
from l2d_jax.convert.original_names import StateMismatch, export_original_state, original_names
from l2d_jax.models.l2d import FLOW, L2DModel, abstract_l2d
from l2d_jax.models.llm import LLM, LLMConfig
from l2d_jax.settings import L2DSettings, SettingsError
from l2d_jax.verify import Golden, grads_by_original_name, rel_err, train_grads

L2D_SETS = [p for p in golden_sets() if (p / "l2d_settings.json").is_file()]
SET_IDS = [p.name for p in L2D_SETS]


@pytest.fixture(scope="module", params=L2D_SETS, ids=SET_IDS)
def golden(request):
    return Golden(request.param)


@pytest.fixture(scope="module")
def lora_golden():
    path = next(p for p in L2D_SETS if p.name == "llama_lora")
    return Golden(path)


def _grads(g: Golden):
    return g.memo("test_grads", lambda: train_grads(
        g.model, jnp.asarray(g["train_input_ids"]), jnp.asarray(g["train_labels"]),
        jnp.asarray(g["train_timesteps"]), jnp.asarray(g["train_noise"])))


# --------------------------------------------------------------------------- gradients


def test_gradients_cover_only_flow_and_match_golden(golden):
    grads = _grads(golden)
    pure = nnx.to_pure_dict(grads)
    assert set(pure) == {"flow"}  # the base gets no gradient at all
    n_flow = len(jax.tree.leaves(nnx.state(golden.model, FLOW)))
    assert len(jax.tree.leaves(grads)) == n_flow
    ours = grads_by_original_name(golden.model, grads)
    assert set(ours) == set(golden.grads)  # every trainable parameter of the original, no other
    for name, ref in golden.grads.items():
        assert ours[name].shape == ref.shape, name
        assert rel_err(ours[name], ref) <= 1e-4, name
    # head(c_t) - head(c_0) cancels the final head's last bias: exactly zero, as in the original
    zero = "model.modulation_head.mlp.2.bias"
    assert not np.any(golden.grads[zero])
    assert not np.any(ours[zero])
    assert all(np.abs(v).max() > 1e-4 for k, v in ours.items() if k != zero)  # the others are not vacuous


def test_cancelled_bias_gradient_is_exactly_zero(lora_golden):
    ours = grads_by_original_name(lora_golden.model, _grads(lora_golden))
    assert not np.any(ours["model.modulation_head.mlp.2.bias"])


def _flat(tree) -> dict:
    """path tuple (dict keys) -> leaf of a pure dict."""
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adamw_one_step_by_hand(lora_golden):
    """optax.adamw with the original's hyper-parameters (betas (0.9, 0.95), eps 1e-8, weight
    decay 0.01 except on parameters whose ORIGINAL name contains bias / ln / LayerNorm), one
    step from the golden-checked gradients, against numpy."""
    g = lora_golden
    names = {stacked_path(tuple(e.path))[0]: e.name for e in original_names(g.settings, g.model.cfg)
             if e.alias_of is None}  # per stacked parameter
    pure_p = nnx.to_pure_dict(nnx.state(g.model, FLOW))
    pure_g = nnx.to_pure_dict(_grads(g))
    flat_p, flat_g = _flat(pure_p), _flat(pure_g)
    decay = {path: not any(s in names[path] for s in ("bias", "ln", "LayerNorm")) for path in flat_p}
    assert 0 < sum(decay.values()) < len(decay)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: decay[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)], pure_p)
    lr, b1, b2, eps, wd = 1e-4, 0.9, 0.95, 1e-8, 0.01
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=mask)
    updates, _ = tx.update(pure_g, tx.init(pure_p), pure_p)
    new_params = optax.apply_updates(pure_p, updates)
    flat_u, flat_new = _flat(updates), _flat(new_params)
    for path, p in flat_p.items():
        p64, g64 = np.asarray(p, np.float64), np.asarray(flat_g[path], np.float64)
        m = (1 - b1) * g64  # moments after one step from zero
        v = (1 - b2) * g64 ** 2
        m_hat, v_hat = m / (1 - b1), v / (1 - b2)  # bias correction at step 1
        adam = m_hat / (np.sqrt(v_hat) + eps)
        decoupled = wd * p64 if decay[path] else 0.0  # AdamW: decay on the weights, not the gradient
        expected = -lr * (adam + decoupled)
        np.testing.assert_allclose(np.asarray(flat_u[path], np.float64), expected, rtol=1e-5, atol=1e-12,
                                   err_msg=names[path])
        np.testing.assert_allclose(np.asarray(flat_new[path], np.float64), p64 + expected, rtol=1e-6,
                                   atol=1e-7, err_msg=names[path])


# --------------------------------------------------------------------------- exact properties


def test_mixed_t_zero_positions_are_the_base_model(lora_golden):
    g = lora_golden
    ids = jnp.asarray(g["fwd_input_ids"])
    t = np.array(g["fwd_timesteps"])
    zero = t == 0.0
    assert zero.sum() >= 3 and (~zero).sum() >= 3  # mixed: some positions exactly 0
    x_t = jnp.asarray(g["fwd_flow_representation_embeds"])
    with jax.disable_jit():  # op by op: the scan over layers runs as a Python loop
        base = np.asarray(g.model.base(ids).logits)
        ours = np.asarray(g.model(ids, jnp.asarray(t), x_t).logits)
    assert np.array_equal(ours[zero], base[zero])  # bit for bit
    diff = np.abs(ours - base).max(axis=-1)
    assert np.all(diff[~zero] > 1e-3)  # the flow path does act at t > 0
    # Under jit the L2D and the base programs are compiled separately; XLA's fusion choices
    # differ, so there they agree to float rounding only (about 1e-6), not bit for bit.
    jitted = np.asarray(nnx.jit(lambda m, i, tt, x: m(i, tt, x).logits)(g.model, ids, jnp.asarray(t), x_t))
    assert rel_err(jitted[zero], base[zero]) <= 1e-5


def _settings(**kw) -> dict:
    return {**LORA_SETTINGS, **kw}


# Option combinations a fresh (never trained) flow path must leave the logits unchanged for:
# every space, full DiT on/off, freeze on/off, shared / full / LoRA projections, guidance,
# modulate_hidden_states, Qwen2 biases, no timestep rescaling, depth-0 encoder.
FRESH_COMBOS = {
    "mapping-dit-lora": (_settings(), {}),
    "embedding-nodit-shared-guidance": (_settings(
        flow_representation_space="embedding", flow_representation_dim=None, flow_representation_num_layers=None,
        full_dit_modulation=False, separate_flow_params=False, separate_flow_params_with_lora=False,
        guidance_modulation_num_classes=3), {}),
    "onehot-dit-freeze-full": (_settings(
        flow_representation_space="one-hot", freeze_modulation_at_flow_start=True,
        separate_flow_params_with_lora=False), {}),
    "mapping2-nodit-freeze-lora-guidance-modulate": (_settings(
        flow_representation_num_layers=2, full_dit_modulation=False, freeze_modulation_at_flow_start=True,
        guidance_modulation_num_classes=2, modulate_hidden_states=True), {}),
    "onehot-dit-nopreserve-shared": (_settings(
        flow_representation_space="one-hot", preserve_behavior_at_flow_start=False,
        separate_flow_params=False, separate_flow_params_with_lora=False, flow_representation_rescaling="div"), {}),
    "embedding-dit-freeze-reinit-modulate-depth0": (_settings(
        flow_representation_space="embedding", flow_representation_dim=32, flow_representation_num_layers=0,
        freeze_modulation_at_flow_start=True, modulate_hidden_states=True, separate_flow_params_with_lora=False,
        reinit_flow_params=True, flow_to_lm_translation_depth=0), {}),
    "qwen2-full-norescale-nonorm": (_settings(
        separate_flow_params_with_lora=False, flow_to_lm_timestep_rescaling=None,
        flow_representation_normalize=False, noise_schedule="cosmap", timestep_modulation_num_layers=1),
        {"model_type": "qwen2"}),
}


@pytest.mark.parametrize("combo", list(FRESH_COMBOS))
def test_fresh_flow_path_changes_no_logits(combo):
    settings, llm_overrides = FRESH_COMBOS[combo]
    base = tiny_llm(3, **llm_overrides)
    model = L2DModel(base, L2DSettings.from_dict(settings), rngs=nnx.Rngs(4))
    b, n = 2, 7
    d = model.settings.flow_dim(base.cfg.hidden_size)
    ids = jax.random.randint(jax.random.PRNGKey(0), (b, n), 0, base.cfg.vocab_size)
    t = jax.random.uniform(jax.random.PRNGKey(1), (b, n))
    x_t = 64.0 * jax.random.normal(jax.random.PRNGKey(2), (b, n, d))
    labels = jnp.array([0, 1]) if model.settings.use_guidance else None
    out = model(ids, t, x_t, class_labels=labels)
    # the flow adds exactly nothing: the logits are the LM head of the main stream's h_L
    assert np.array_equal(np.asarray(out.logits), np.asarray(base.head(out.hidden)))
    # and that stream is the base model's (the two-stream scan is another XLA program: on some
    # hosts its fusions round the last bit differently, e.g. 4e-9 on an AVX2 EPYC)
    np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(base(ids).hidden), rtol=1e-6, atol=1e-6)


def _names_file(path):
    """name -> (shape, trainable, alias_of) from l2d_state_names.txt."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        shape = tuple(int(x) for x in re.findall(r"\d+", parts[1]))
        alias = next((p.split("=", 1)[1] for p in parts[3:] if p.startswith("alias_of=")), None)
        out[parts[0]] = (shape, parts[2] == "trainable", alias)
    return out


def test_export_of_fresh_model_has_the_original_key_set(golden):
    settings = read_settings(golden.dir / "l2d_settings.json")[0]
    cfg = LLMConfig.from_hf(json.loads((golden.dir / "base" / "config.json").read_text()))
    model = L2DModel(LLM(cfg, rngs=nnx.Rngs(0)), settings, rngs=nnx.Rngs(1))  # never imported
    exported = export_original_state(model)
    names = _names_file(golden.dir / "l2d_state_names.txt")
    assert list(exported) == list(names)  # same keys, in the original's state_dict order
    for name, (shape, trainable, alias) in names.items():
        assert exported[name].shape == shape, name
        assert exported[name].dtype == np.float32, name
    table = {e.name: e for e in original_names(settings, cfg)}
    assert {n for n, e in table.items() if e.trainable} == {n for n, v in names.items() if v[1]}
    assert {n: e.alias_of for n, e in table.items() if e.alias_of} == {n: v[2] for n, v in names.items() if v[2]}
    reference = load_file(str(golden.dir / "l2d_state.safetensors"))
    assert {k: v.dtype for k, v in reference.items()} == {k: v.dtype for k, v in exported.items()}


def test_import_then_export_is_bit_for_bit(golden):
    reference = load_file(str(golden.dir / "l2d_state.safetensors"))
    exported = export_original_state(golden.model)
    assert set(exported) == set(reference)
    for k, v in reference.items():
        assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, hidden, named", [
    (dict(separate_flow_params=False, separate_flow_params_with_lora=True), None,
     ["separate_flow_params_with_lora", "separate_flow_params"]),
    (dict(flow_to_lm_timestep_rescaling=1.0, flow_representation_normalize=False), None,
     ["flow_to_lm_timestep_rescaling", "flow_representation_normalize"]),
    (dict(flow_representation_space="embedding", flow_representation_num_layers=None, flow_representation_dim=16),
     32, ["flow_representation_space", "flow_representation_dim"]),
    (dict(minimum_training_noise_units="stddev"), None, ["minimum_training_noise_units", "stddev"]),
    (dict(flow_representation_space="pixels"), None, ["flow_representation_space", "pixels"]),
])
def test_bad_settings_name_the_keys(overrides, hidden, named):
    with pytest.raises(SettingsError) as exc:
        s = L2DSettings.from_dict(_settings(**overrides))
        if hidden is not None:
            L2DModel(tiny_llm(0), s, rngs=nnx.Rngs(0))
    for word in named:
        assert word in str(exc.value)


def test_unknown_setting_is_named():
    with pytest.raises(SettingsError, match="flow_lora_rnak"):
        L2DSettings.from_dict(_settings(flow_lora_rnak=4))


def _lora_state(g: Golden) -> dict:
    return dict(load_file(str(g.dir / "l2d_state.safetensors")))


def test_checkpoint_with_unknown_key_is_rejected(lora_golden):
    state = _lora_state(lora_golden)
    state["model.layers.0.mlp.flow_extra_proj.A"] = np.zeros((2, 2), np.float32)
    with pytest.raises(StateMismatch, match=re.escape("model.layers.0.mlp.flow_extra_proj.A")):
        l2d_from_original(lora_golden.base, lora_golden.settings, state)


def test_checkpoint_with_wrong_shape_is_rejected(lora_golden):
    state = _lora_state(lora_golden)
    name = "model.layers.1.self_attn.flow_q_proj.B"
    state[name] = state[name][:, :-1]
    with pytest.raises(StateMismatch, match=re.escape(name)):
        l2d_from_original(lora_golden.base, lora_golden.settings, state)


def test_checkpoint_with_differing_base_tensor_is_rejected(lora_golden):
    state = _lora_state(lora_golden)
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].copy()
    state[name][3, 5] += 1e-3
    with pytest.raises(StateMismatch, match=re.escape(name)):
        l2d_from_original(lora_golden.base, lora_golden.settings, state)


def test_checkpoint_lacking_a_flow_tensor_is_rejected(lora_golden):
    state = _lora_state(lora_golden)
    del state["model.timestep_embedder.mlp.2.bias"]
    with pytest.raises(StateMismatch, match=re.escape("model.timestep_embedder.mlp.2.bias")):
        l2d_from_original(lora_golden.base, lora_golden.settings, state)


def test_bf16_state_compares_against_the_base_cast_to_bf16(lora_golden):
    """The original trains and saves in bf16: its base tensors are the float32 base rounded
    to bf16. Those are accepted; a bf16 base tensor one bf16 ulp off is not."""
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in _lora_state(lora_golden).items()}
    model = l2d_from_original(lora_golden.base, lora_golden.settings, state)
    a = np.asarray(model.flow.layers.q_proj.B[...][0])
    b = state["model.layers.0.self_attn.flow_q_proj.B"].astype(np.float32)
    assert np.array_equal(a, b)  # flow tensors: the bf16 values, exactly
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = state[name].copy()
    bits = bad.view(np.uint16)
    bits[0, 0] += 1  # the next bf16 value
    state[name] = bad
    with pytest.raises(StateMismatch, match=re.escape(name)):
        l2d_from_original(lora_golden.base, lora_golden.settings, state)


def test_abstract_model_matches_a_real_one():
    """The abstract build used by conversion has the same parameter tree as a real one."""
    s = L2DSettings.from_dict(LORA_SETTINGS)
    cfg = LLMConfig.from_hf(HF_CONFIG)
    real = nnx.state(L2DModel(LLM(cfg, rngs=nnx.Rngs(0)), s, rngs=nnx.Rngs(0)))
    abstract = nnx.state(abstract_l2d(cfg, s))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), real)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == shapes


def test_base_params_to_freeze_none_takes_the_base_from_the_state(lora_golden):
    """With base_params_to_freeze = "none" the original trained its base too: the state's base
    tensors are the trained ones and replace --base's instead of being compared."""
    settings = lora_golden.settings.replace(base_params_to_freeze="none")
    state = _lora_state(lora_golden)
    name = "model.layers.1.mlp.up_proj.weight"
    alias = "model.layers.1.mlp.flow_up_proj.wrapped_layer.weight"  # the LoRA wraps the same tensor
    state[name] = state[name] + 0.5
    with pytest.raises(StateMismatch, match=re.escape(alias)):
        l2d_from_original(lora_golden.base, settings, state)
    state[alias] = state[name]
    model = l2d_from_original(lora_golden.base, settings, state)
    exported = export_original_state(model)
    assert all(np.array_equal(exported[k], v) for k, v in state.items())
    del state[name]
    with pytest.raises(StateMismatch, match=re.escape(name)):
        l2d_from_original(lora_golden.base, settings, state)


def test_settings_accept_exactly_the_solvers_methods():
    from l2d_jax import solvers
    from l2d_jax.settings import ODE_METHODS, L2DSettings, SettingsError

    assert set(ODE_METHODS) == set(solvers.METHODS)
    with pytest.raises(SettingsError, match="rk45"):
        L2DSettings.from_dict({"flow_representation_num_layers": 1, "ode_kwargs": {"method": "rk45"}})
    nested = L2DSettings.from_dict({"flow_representation_num_layers": 1,
                                    "ode_kwargs": {"method": "bosh3", "options": {"first_step": 0.05}}})
    hash(nested)  # nested ode options stay hashable (settings live in the jit-static graphdef)
    assert nested.ode["options"] == {"first_step": 0.05}
