"""The optimizer: LR schedules against the spec's closed forms, the weight-decay mask, and
one AdamW update computed by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2d_jax.train import optim

PEAK, LOW, W, S = 1e-4, 1e-6, 100, 1000


def lr_of_update(schedule, k: int) -> float:
    """LR used by optimizer update k (1-based): optax evaluates the schedule at count k - 1."""
    return float(schedule(k - 1))


# ---- closed forms written from L2D_SPEC section 9 and the original's schedulers


def warmup_decay_by_hand(k: int) -> float:
    if k == 1:
        return LOW  # the scheduler's value before its first step
    s = k - 2
    if s < W:
        return LOW + (PEAK - LOW) * math.log(s + 1) / math.log(W)
    return LOW + (PEAK - LOW) * max(0.0, (S - s) / max(1, S - W))


def warmup_linear_by_hand(k: int) -> float:
    s = k - 1  # torch LambdaLR applied step 0 in its constructor
    if s < W:
        return PEAK * s / max(1, W)
    return PEAK * max(0.0, (S - s) / max(1, S - W))


def warmup_cosine_by_hand(k: int, rc: float = 0.1) -> float:
    if k == 1:
        return 0.0
    s = k - 2
    r0 = LOW / PEAK
    if s < W:
        return PEAK * (r0 + (1 - r0) * math.log(s + 1) / math.log(W))
    return PEAK * max(0.0, rc + (1 - rc) * (1 + math.cos(math.pi * (s - W + 1) / (S - W))) / 2)


UPDATES = (1, 2, 3, 100, 101, 102, 500, S)


@pytest.mark.parametrize("kind,by_hand", [("warmup_decay", warmup_decay_by_hand),
                                          ("warmup_linear", warmup_linear_by_hand),
                                          ("warmup_cosine", warmup_cosine_by_hand)])
def test_schedules_match_the_closed_forms(kind, by_hand):
    sched = optim.make_schedule(kind, peak_lr=PEAK, min_lr=LOW, n_warmup_steps=W, total_steps=S)
    for k in UPDATES:
        assert lr_of_update(sched, k) == pytest.approx(by_hand(k), rel=1e-5, abs=1e-12), (kind, k)


def test_warmup_decay_landmarks():
    sched = optim.make_schedule("warmup_decay", peak_lr=PEAK, min_lr=LOW, n_warmup_steps=W, total_steps=S)
    assert lr_of_update(sched, 1) == pytest.approx(LOW)
    assert lr_of_update(sched, 2) == pytest.approx(LOW)  # s = 0: ln(1) = 0
    assert lr_of_update(sched, 3) == pytest.approx(LOW + (PEAK - LOW) * math.log(2) / math.log(100))
    assert lr_of_update(sched, W + 2) == pytest.approx(PEAK)  # s = W: (S - W) / (S - W) = 1
    assert lr_of_update(sched, S + 2) == pytest.approx(LOW)  # s = S: ends at min_lr


def test_warmup_decay_w_is_at_least_two():
    sched = optim.make_schedule("warmup_decay", peak_lr=PEAK, min_lr=LOW, n_warmup_steps=0, total_steps=10)
    # W = max(2, 0) = 2: update 3 (s = 1) is ln(2) / ln(2) of the way
    assert lr_of_update(sched, 3) == pytest.approx(PEAK)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="scheduler_type"):
        optim.make_schedule("constant", peak_lr=1, min_lr=1, n_warmup_steps=1, total_steps=1)


# ---- the weight-decay mask


def test_decay_mask_excludes_biases_and_matches_the_original_names():
    from jax_tiny import tiny_l2d
    from flax import nnx
    from l2d_jax.convert.names import stacked_path
    from l2d_jax.convert.original_names import original_names
    from l2d_jax.models.l2d import FLOW

    model = tiny_l2d(perturb=0.0)
    params = nnx.to_pure_dict(nnx.state(model, FLOW))
    mask = optim.decay_mask(params, model.settings, model.cfg)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat and all((not v) == k.endswith("['bias']") for k, v in flat.items()), flat
    # every trainable original name is known, and the original's rule agrees
    names = {stacked_path(tuple(e.path))[0]: e.name for e in original_names(model.settings, model.cfg)
             if e.trainable}  # per stacked parameter
    leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert len(names) == len(leaves)
    for path, decays in leaves:
        key = tuple(getattr(p, "key", p) for p in path)
        assert decays == (not any(s in names[key] for s in ("bias", "ln", "LayerNorm")))
    # without settings: by our own leaf names
    assert jax.tree.leaves(optim.decay_mask(params)) == jax.tree.leaves(mask)


# ---- one AdamW update by hand


def test_one_adamw_step_by_hand():
    cfg = dict(peak_lr=1e-2, min_lr=1e-3, n_warmup_steps=2, scheduler_type="warmup_decay",
               weight_decay=0.01, adam_betas=(0.9, 0.95), adam_eps=1e-8, grad_clip=1.0)
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "bias": jnp.array([0.5, -0.5])}
    grads = {"w": jnp.array([3.0, 0.0, -4.0]), "bias": jnp.array([0.1, 0.2])}
    tx, sched = optim.make_optimizer(cfg, total_steps=10, mask=optim.decay_mask)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)

    # by hand: clip to global norm 1 (torch style), Adam moments after one step, bias
    # correction, decoupled decay on w only, lr of update 1 = min_lr
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    scale = min(1.0, 1.0 / (norm + 1e-6))
    lr = 1e-3
    for k in params:
        gk = g[k] * scale
        m = 0.1 * gk / (1 - 0.9)
        v = 0.05 * gk ** 2 / (1 - 0.95)
        upd = m / (np.sqrt(v) + 1e-8)
        if k == "w":
            upd = upd + 0.01 * np.asarray(params[k], np.float64)
        want = np.asarray(params[k], np.float64) - lr * upd
        np.testing.assert_allclose(np.asarray(new[k]), want, rtol=1e-6, atol=1e-9)


def test_clipping_leaves_small_gradients_alone():
    tx = optim.clip_by_global_norm_torch(1.0)
    g = {"a": jnp.array([0.3, 0.4])}  # norm 0.5
    out, _ = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(out["a"], g["a"])
    big = {"a": jnp.array([30.0, 40.0])}
    out, _ = tx.update(big, tx.init(big))
    np.testing.assert_allclose(np.linalg.norm(out["a"]), 50 / (50 + 1e-6), rtol=1e-6)
