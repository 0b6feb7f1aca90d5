"""The XLA:CPU decoder-stack custom call (l2d_jax/kernels/cpu_decoder.{py,cc}).

Cached one-position steps of the main stream (``LLM.__call__``) and flow evaluations
(``L2DModel.flow_only``) with the kernel against the same programs without it (the scanned
block), on a tiny model and on one big enough that every phase splits over the
thread pool (row-split and column-split products), for Llama and Qwen2 (biases), several
rows, and every kind of flow projection (LoRA, full copies, the base's own) and modulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tiny import LORA_SETTINGS, tiny_l2d, tiny_llm
from l2d_jax.kernels import backend, cpu_decoder, cpu_matvec, library
from l2d_jax.models.llm import init_cache

pytestmark = pytest.mark.skipif(not library.load(), reason="no C++ compiler")
KERNELS = {"1": backend.Kernels(True, True, True), "0": backend.Kernels(True, True, False)}  # decoder on / off

# wide enough that q/k/v (row split) and gate/up (column split) each take both pool threads
WIDE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2)
PROMPT, NEW, SLOTS = 5, 3, 12


def _with_biases(model, seed=0):
    """Random q/k/v biases (a fresh Qwen2 model has zero ones)."""
    rng = np.random.default_rng(seed)
    layer = model.layers  # stacked
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias[...] = jnp.asarray(0.5 * rng.standard_normal(proj.bias[...].shape), jnp.float32)
    return model


def _decode(model, ids, switch):
    """Prefill PROMPT tokens, then NEW cached one-token steps: (logits (B, NEW, V), cache)."""
    kernels = KERNELS[switch]
    b = ids.shape[0]

    @jax.jit
    def run(model, ids):
        kv_valid = jnp.zeros((b, SLOTS), bool).at[:, :PROMPT].set(True)
        pos = jnp.broadcast_to(jnp.arange(PROMPT), (b, PROMPT))
        cache = model(ids[:, :PROMPT], pos, cache=init_cache(model.cfg, b, SLOTS), kv_valid=kv_valid,
                      kernels=kernels).cache
        logits = []
        for i in range(PROMPT, PROMPT + NEW):
            kv_valid = kv_valid.at[:, i].set(True)
            out = model(ids[:, i:i + 1], jnp.full((b, 1), i), cache=cache, cache_index=i, kv_valid=kv_valid,
                        kernels=kernels)
            cache = out.cache
            logits.append(out.logits)
        return jnp.concatenate(logits, axis=1), cache

    return run(model, ids)


@pytest.mark.parametrize("arch,overrides,batch", [
    ("llama", {}, 1), ("llama", WIDE, 1), ("llama", WIDE, 3), ("qwen2", {}, 2), ("qwen2", WIDE, 1)])
def test_main_stream_steps_match_the_scanned_program(arch, overrides, batch):
    model = tiny_llm(0, model_type=arch, **overrides)
    if arch == "qwen2":
        _with_biases(model)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, model.cfg.vocab_size, (batch, PROMPT + NEW)), jnp.int32)
    got, got_cache = _decode(model, ids, "1")
    want, want_cache = _decode(model, ids, "0")
    assert np.abs(np.asarray(want)).max() > 0.1  # not vacuous
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for name in ("k", "v"):  # every layer's new slots written, nothing else touched
        np.testing.assert_allclose(got_cache[name], want_cache[name], rtol=2e-5, atol=2e-5)
    full = model(ids).logits[:, PROMPT:]  # and a cached decode equals a full forward
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)


def test_a_cached_step_is_one_call_that_writes_the_cache_in_place():
    model = tiny_llm(0)
    one = jnp.zeros((1, 1), jnp.int32)
    step = jax.jit(lambda ids, c: model(ids, one, cache=c, cache_index=3, kv_valid=jnp.ones((1, 8), bool),
                                        kernels=KERNELS["1"]), donate_argnums=1)
    hlo = step.lower(one, init_cache(model.cfg, 1, 8)).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert entry.count(f'custom_call_target="{cpu_decoder.TARGET}"') == 1
    assert entry.count("custom_call_target=") == 2  # and the LM head's matvec
    assert f'custom_call_target="{cpu_matvec.TARGET}"' in entry
    assert "output_to_operand_aliasing" in entry  # the cache comes back in the buffers it came in


def _flow_settings(**kw):
    return {**LORA_SETTINGS, **kw}


FLOW_CASES = {
    "lora": ({}, {}),
    "lora_wide": ({}, WIDE),
    "full_copies": (dict(separate_flow_params_with_lora=False), {}),
    "base_projections": (dict(separate_flow_params=False, separate_flow_params_with_lora=False), {}),
    "norm_modulation_only": (dict(full_dit_modulation=False, freeze_modulation_at_flow_start=True), {}),
    "qwen2_lora": ({}, dict(model_type="qwen2")),
}


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_flow_evaluation_matches_the_scanned_program(case):
    settings, overrides = FLOW_CASES[case]
    model = tiny_l2d(0, perturb=0.1, settings=_flow_settings(**settings), **overrides)
    if overrides.get("model_type") == "qwen2":
        _with_biases(model.base)
    cfg, b = model.cfg, 2
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, PROMPT)), jnp.int32)
    kv_valid = jnp.zeros((b, SLOTS), bool).at[:, :PROMPT].set(True).at[0, 0].set(False)
    pos = jnp.broadcast_to(jnp.arange(PROMPT), (b, PROMPT))
    pre = model.base(ids, pos, cache=init_cache(cfg, b, SLOTS), kv_valid=kv_valid)
    d = model.settings.flow_dim(cfg.hidden_size)
    x = jnp.asarray(20 * rng.standard_normal((b, 1, d)), jnp.float32)
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    h_last = pre.hidden[:, -1:]
    outs = {}
    for switch in ("1", "0"):
        fn = jax.jit(lambda m, x, t, k=KERNELS[switch]: m.flow_only(h_last, pre.cache, x, t, pos[:, -1:], PROMPT - 1,
                                                                   kv_valid, kernels=k))
        if switch == "1":
            assert f"custom_call @{cpu_decoder.TARGET}(" in fn.lower(model, x, t).as_text()
        outs[switch] = fn(model, x, t)
    want = np.asarray(outs["0"])
    assert np.abs(want - np.asarray(model.base.head(h_last))).max() > 1e-3  # the flow path matters
    np.testing.assert_allclose(outs["1"], want, rtol=3e-5, atol=3e-5)


def _norms(model):
    return jnp.ones((model.cfg.num_layers, 2, 1, model.cfg.hidden_size), jnp.float32)


def test_not_used_where_it_does_not_apply():
    """Two new positions, a bfloat16 weight, or the decoder kernel off: the scanned block."""
    model = tiny_llm(0)
    cache = init_cache(model.cfg, 1, 8)
    two = jnp.zeros((1, 2), jnp.int32)
    hlo = jax.jit(lambda c: model(two, two, cache=c, kv_valid=jnp.ones((1, 8), bool),
                                  kernels=KERNELS["1"]).logits).lower(cache).as_text()
    assert cpu_decoder.TARGET not in hlo
    weights = model.layers.weights()
    h = jnp.zeros((1, model.cfg.hidden_size))
    assert cpu_decoder.usable(h, cache, weights, _norms(model))
    bf16 = weights._replace(q=weights.q._replace(w=weights.q.w.astype(jnp.bfloat16)))
    assert not cpu_decoder.usable(h, cache, bf16, _norms(model))
    one = jnp.zeros((1, 1), jnp.int32)
    hlo = jax.jit(lambda c: model(one, one, cache=c, cache_index=2, kv_valid=jnp.ones((1, 8), bool),
                                  kernels=KERNELS["0"]).logits).lower(cache).as_text()
    assert cpu_decoder.TARGET not in hlo


def test_a_block_feature_it_lacks_refuses_the_kernel(caplog, monkeypatch):
    """qk-norm (Qwen3) is not in the kernel: the backend refuses it, with a logged reason, and
    generation runs the scanned block, equal to the xla backend."""
    from l2d_jax.generate import GenerateOptions, generate

    model = tiny_llm(0, model_type="qwen3", head_dim=8)
    assert model.cfg.qk_norm and cpu_decoder.unsupported(model.cfg) is not None
    monkeypatch.setattr(backend, "_refusals_logged", set())  # logged once per process: not yet here
    with caplog.at_level("WARNING"):
        kernels = backend.resolve("auto", model.cfg)
    assert kernels == backend.Kernels(True, True, False) and "qk_norm" in caplog.text
    assert backend.resolve("auto", tiny_llm(0).cfg) == KERNELS["1"]
    ids, mask = jnp.asarray([[3, 5, 7, 9]]), jnp.ones((1, 4), jnp.int32)
    outs = [generate(model, ids, mask, opts=GenerateOptions(max_new_tokens=5, kernels=k, return_logits=True))
            for k in ("auto", "xla")]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logits, outs[1].logits, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_named():
    model = tiny_llm(0)
    cache = init_cache(model.cfg, 1, 8)
    layers = model.layers.weights()
    h, cs, mask = jnp.zeros((1, 32)), jnp.zeros((1, 8)), jnp.ones((1, 8), bool)

    def run(h=h, layers=layers, norms=_norms(model), slot=0):
        return cpu_decoder.run(h, cs, cs, mask, slot, cache, layers, norms, num_heads=4, eps=1e-5, write_kv=True)

    with pytest.raises(ValueError, match="do not fit the cache"):
        run(layers=jax.tree.map(lambda a: a[:1], layers))
    with pytest.raises(ValueError, match="do not fit the cache"):
        run(norms=jnp.ones((2, 3, 1, 32)))
    with pytest.raises(Exception, match="slot outside the cache"):
        jax.block_until_ready(run(slot=8))
    with pytest.raises(NotImplementedError, match="xla kernel backend"):
        jax.grad(lambda a: run(h=a)[0].sum())(h)
