"""Generation: base-path equality, determinism and batch invariance, no recompilation."""

import numpy as np
import pytest

from l2d_jax.generate import GenerateOptions, compiled_programs, generate, left_pad
from l2d_jax.nstep import ODEOptions
from l2d_jax.sampling import Sampler

from jax_tiny import tiny_l2d

OPTS = GenerateOptions(max_new_tokens=8, ode=ODEOptions(method="midpoint", x1_estimation="sample",
                                                        temperature=0.0))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def model():
    return tiny_l2d(seed=3)


def naive_greedy(llm, prompt, n):
    """Greedy decode by a full forward over the whole sequence at every step."""
    import jax.numpy as jnp

    seq = list(prompt)
    for _ in range(n):
        logits = llm(jnp.asarray([seq])).logits[0, -1]
        seq.append(int(np.argmax(np.asarray(logits))))
    return seq[len(prompt):]


def test_ode_steps_zero_is_the_base_models_greedy_decode(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    out = generate(model, ids, mask, ode_steps=0, sampler=Sampler(0.0), opts=OPTS)
    for row, prompt in enumerate(PROMPTS):
        assert np.asarray(out.tokens[row]).tolist() == naive_greedy(model.base, prompt, 8)
    assert np.all(np.asarray(out.nfe) == 0)


def test_l2d_greedy_is_deterministic_and_batch_invariant(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    a = generate(model, ids, mask, ode_steps=4, opts=OPTS)
    b = generate(model, ids, mask, ode_steps=4, opts=OPTS)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    base = generate(model, ids, mask, ode_steps=0, opts=OPTS)
    assert not np.array_equal(a.tokens, base.tokens), "the flow path should change some tokens"
    for row, prompt in enumerate(PROMPTS):
        i1, m1 = left_pad([prompt], pad_id=0)
        alone = generate(model, i1, m1, ode_steps=4, opts=OPTS)
        np.testing.assert_array_equal(alone.tokens[0], a.tokens[row])
    np.testing.assert_allclose(a.nfe, 6.0)  # midpoint, 4 grid points: 3 intervals x 2


def test_sampling_is_batch_invariant_too(model):
    """With sampled x1 (T > 0) and sampled tokens, per-row keys make rows independent of batch mates."""
    import jax

    ids, mask = left_pad(PROMPTS, pad_id=0)
    key = jax.random.PRNGKey(7)
    kw = dict(key=key, ode_steps=3, sampler=Sampler(1.0), ode_temperature=1.0, opts=OPTS)
    both = generate(model, ids, mask, **kw)
    i1, m1 = left_pad([PROMPTS[1]], pad_id=0)
    alone = generate(model, i1, m1, **kw)
    np.testing.assert_array_equal(alone.tokens[0], both.tokens[1])


def test_no_recompilation_across_prompts_and_step_counts(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    generate(model, ids, mask, ode_steps=2, opts=OPTS)
    before = compiled_programs()
    other = [[30, 31], [40, 41, 42, 43, 44, 45], [50]]
    ids2, mask2 = left_pad(other, pad_id=0)
    assert ids2.shape == ids.shape  # same bucket
    for steps in (0, 3, 8):
        generate(model, ids2, mask2, ode_steps=steps, sampler=Sampler(0.7), ode_temperature=0.5, opts=OPTS)
    assert compiled_programs() == before


def test_eos_stops_rows(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    free = generate(model, ids, mask, ode_steps=0, opts=OPTS)
    eos = int(free.tokens[0, 2])
    out = generate(model, ids, mask, ode_steps=0, eos_id=eos, opts=OPTS)
    assert int(out.lengths[0]) == 3 and np.all(np.asarray(out.tokens[0, 3:]) == eos)


def test_num_return_sequences_differ_when_sampling(model):
    import jax

    ids, mask = left_pad(PROMPTS[:1], pad_id=0)
    out = generate(model, ids, mask, key=jax.random.PRNGKey(1), ode_steps=2, sampler=Sampler(1.5),
                   num_return_sequences=4, opts=OPTS)
    rows = {tuple(np.asarray(r).tolist()) for r in out.tokens}
    assert out.tokens.shape == (4, 8) and len(rows) > 1


def test_bad_step_counts_are_rejected(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with pytest.raises(ValueError, match="grid points"):
        generate(model, ids, mask, ode_steps=1, opts=OPTS)
    with pytest.raises(ValueError, match="base model"):
        generate(model.base, ids, mask, ode_steps=4, opts=OPTS)


def test_tabulated_modulations_equal_computed_ones(model):
    """Generation reads the per-layer modulations at the fixed-grid stage times from a table
    computed once; a time outside the table is computed. Both equal flow_modulation(t)."""
    import jax
    import jax.numpy as jnp

    from l2d_jax import solvers
    from l2d_jax.nstep import modulation_lookup

    times = solvers.stage_times("midpoint", 5, 1.0, max_points=8).ravel()
    at = modulation_lookup(model, times, model.flow_modulation(times[:, None]))
    for t in (times[3], times[6], jnp.float32(0.123)):
        got, want = at(t), model.flow_modulation(jnp.full((2, 1), t))
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert w.shape[-3:] == (2, 1, model.cfg.hidden_size)
            assert g.shape[-3:] == (1, 1, model.cfg.hidden_size)  # broadcasts against any (B, T)
            np.testing.assert_allclose(jnp.broadcast_to(g, w.shape), w, rtol=1e-6, atol=1e-6)


def test_greedy_sampler_skips_nothing_it_needs():
    """temperature 0 is the argmax; top-p < 1 keeps only the nucleus; top-p 1 draws from all."""
    import jax
    import jax.numpy as jnp

    from l2d_jax.sampling import sample_tokens

    logits = jnp.log(jnp.array([[0.05, 0.6, 0.3, 0.05]] * 256))
    keys = jax.random.split(jax.random.PRNGKey(0), 256)
    assert set(np.asarray(sample_tokens(logits, keys, 0.0)).tolist()) == {1}
    assert set(np.asarray(sample_tokens(logits, keys, 1.0, top_p=0.8)).tolist()) == {1, 2}
    assert set(np.asarray(sample_tokens(logits, keys, 1.0, top_p=1.0)).tolist()) == {0, 1, 2, 3}


def test_a_shared_prefill_gives_what_a_fresh_one_gives(model):
    """One prefill serves several generate calls (step counts, samples): each equals the call
    that prefills for itself; a prefill of the wrong size is refused with the fix."""
    import jax

    from l2d_jax.generate import prefill

    ids, mask = left_pad(PROMPTS, pad_id=0)
    pre = prefill(model, ids, mask, OPTS.max_new_tokens, num_return_sequences=2)
    key = jax.random.PRNGKey(3)
    for steps in (0, 4, 2, 4):
        shared = generate(model, ids, mask, ode_steps=steps, opts=OPTS, prefilled=pre, key=key,
                          num_return_sequences=2, sampler=Sampler(1.0))
        fresh = generate(model, ids, mask, ode_steps=steps, opts=OPTS, key=key, num_return_sequences=2,
                         sampler=Sampler(1.0))
        np.testing.assert_array_equal(shared.tokens, fresh.tokens)
    with pytest.raises(ValueError, match="prefill\\(model, ids, mask, 8, 1\\)"):
        generate(model, ids, mask, ode_steps=4, opts=OPTS, prefilled=pre)


def test_cpu_kernels_are_used_and_decode_like_xla(model, monkeypatch):
    """Batch-1 decoding on one CPU device runs the custom calls of l2d_jax/kernels: a cached
    step is one decoder-stack call plus the LM head's matmul; without the decoder kernel, the
    scanned block: one matmul per group of projections that share their input (q/k/v, o,
    gate/up, down; LoRA-free base) and one attention reading the stacked cache, each once in
    the scan's body. The tokens equal those of XLA's own ops, with and without the flow path.
    The backend is a static option: switching it recompiles, with no cache to clear."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from l2d_jax.kernels import backend, cpu_attention, cpu_decoder, cpu_matvec, library
    from l2d_jax.models.llm import init_cache

    if not library.load():
        pytest.skip("no C++ compiler")
    cfg = model.base.cfg
    one = jnp.zeros((1, 1), jnp.int32)

    def calls(kernels):
        step = jax.jit(lambda ids, c: model.base(ids, one, cache=c, cache_index=0, kv_valid=jnp.ones((1, 8), bool),
                                                 kernels=kernels).logits)
        hlo = step.lower(one, init_cache(cfg, 1, 8)).as_text()
        return [hlo.count(f"custom_call @{k.TARGET}(") for k in (cpu_decoder, cpu_matvec, cpu_attention)]

    assert backend.resolve("auto", cfg) == backend.Kernels(True, True, True)
    assert calls(backend.Kernels(True, True, True)) == [1, 1, 0]
    assert calls(backend.Kernels(True, True, False)) == [0, 4 + 1, 1]
    assert calls(backend.XLA) == [0, 0, 0]
    monkeypatch.setenv(backend.SWITCHES["decoder"], "0")  # read by resolve, outside the programs
    assert backend.resolve("auto", cfg) == backend.Kernels(True, True, False)
    monkeypatch.undo()
    i1, m1 = left_pad([PROMPTS[0]], pad_id=0)
    runs, compiles = [], []
    for name in ("cpu", "xla", "auto"):
        before = compiled_programs()
        opts = dataclasses.replace(OPTS, kernels=name)
        runs.append([np.asarray(generate(model, i1, m1, ode_steps=n, opts=opts).tokens) for n in (0, 4)])
        compiles.append(compiled_programs() - before)
    assert compiles[1] == 2 and compiles[2] == 0  # xla: its own prefill and decode; auto: cpu's programs
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)
