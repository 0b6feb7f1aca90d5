"""Token samplers: temperature (0 = greedy), top-k, top-p, one PRNG key per row.

``Sampler`` is a frozen dataclass and a pytree: ``temperature`` and ``top_p`` are run-time
values (changing them does not recompile), ``top_k`` is static (it fixes a shape). The
defaults are the original L2D decoder's behaviour: plain temperature sampling, no top-k
(0), no top-p (1.0); temperature 0 picks the argmax (the original divides by 1e-8).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
    temperature: float | jax.Array = 1.0
    top_p: float | jax.Array = 1.0
    top_k: int = dataclasses.field(default=0, metadata=dict(static=True))

    def next_tokens(self, logits: jax.Array, keys: jax.Array) -> jax.Array:
        """logits (B, V) float32, keys (B, 2) one raw PRNG key per row -> tokens (B,) int32."""
        return sample_tokens(logits, keys, self.temperature, self.top_k, self.top_p)


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the k largest logits per row (B, V); k = 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keeps the smallest set of tokens whose probability reaches p (>= 1: all)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep | (jnp.asarray(p) >= 1.0), logits, -jnp.inf)


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature, top_k: int = 0, top_p=1.0) -> jax.Array:
    """Samples one token per row. logits (B, V), keys (B, 2); temperature <= 0 is greedy."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def draw(_):
        scaled = filter_top_k(logits / temperature, top_k)
        # the nucleus filter sorts the vocabulary: only when it can change anything
        scaled = jax.lax.cond(top_p < 1.0, lambda x: filter_top_p(x, top_p), lambda x: x, scaled)
        return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, scaled).astype(jnp.int32)

    # temperature and top_p are run-time scalars: cond skips the path that is not taken
    return jax.lax.cond(temperature > 0, draw,
                        lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32), None)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Each row its own sampler, every setting a run-time (B,) array (continuous batching):
    row r draws what ``sample_tokens(logits[r:r+1], keys[r:r+1], temperature[r], top_k[r],
    top_p[r])`` draws. logits (B, V), keys (B, 2) -> tokens (B,) int32."""
    logits = logits.astype(jnp.float32)
    t = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
    v = logits.shape[-1]
    scaled = logits / jnp.where(t > 0, t, 1.0)[:, None]
    cut_k = (top_k > 0) & (top_k < v) & (t > 0)

    def keep_top_k(x):  # the k-th largest value per row, as filter_top_k's lax.top_k finds it
        kth = jnp.take_along_axis(-jnp.sort(-x, axis=-1), jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
        return jnp.where(cut_k[:, None] & (x < kth), -jnp.inf, x)

    # each filter sorts the vocabulary: only when some row asks for it
    scaled = jax.lax.cond(cut_k.any(), keep_top_k, lambda x: x, scaled)
    scaled = jax.lax.cond(((top_p < 1.0) & (t > 0)).any(), lambda x: filter_top_p(x, top_p[:, None]),
                          lambda x: x, scaled)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    drawn = jax.lax.cond((t > 0).any(), lambda: jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32),
                         lambda: greedy)
    return jnp.where(t > 0, drawn, greedy)
