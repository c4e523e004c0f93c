"""Token sampling: greedy, temperature, top-k, top-p, min-p, with per-row keys.

Each row carries its own PRNG key (derived from the request's seed and the index of the token
being sampled), so a request's samples do not depend on what else shares the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplingArrays:
    """Per-row sampling parameters as device arrays, [B] each."""

    temperature: jax.Array  # f32; 0 -> greedy
    top_k: jax.Array  # i32; 0 -> off
    top_p: jax.Array  # f32; 1 -> off
    min_p: jax.Array  # f32; 0 -> off

    @classmethod
    def create(cls, batch: int, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "SamplingArrays":
        full = lambda v, dt: jnp.broadcast_to(jnp.asarray(v, dt), (batch,))  # noqa: E731
        return cls(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
                   full(min_p, jnp.float32))


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One key per row from its seed [B] and the index of the token being sampled [B]."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


def filtered_logits(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """Temperature-scaled logits [B, V] with tokens outside top-k / top-p / min-p set to -inf."""
    logits = logits.astype(jnp.float32) / jnp.maximum(p.temperature, 1e-6)[:, None]
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    # top-k: keep logits >= the k-th largest.
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    keep = logits >= kth
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches top_p.
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    cum_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    n_keep = jnp.maximum(jnp.sum(cum_before < p.top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    keep &= logits >= pth
    # min-p: keep tokens whose probability is at least min_p times the most likely one's.
    logp = jax.nn.log_softmax(logits, axis=-1)
    floor = jnp.max(logp, axis=-1, keepdims=True) + jnp.log(jnp.maximum(p.min_p, 1e-30))[:, None]
    keep &= (p.min_p[:, None] <= 0) | (logp >= floor)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits: jax.Array, p: SamplingArrays, keys: jax.Array) -> jax.Array:
    """logits [B, V] -> token ids [B] int32; rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    masked = filtered_logits(logits, p)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(p.temperature > 0, drawn, greedy)
