"""The attention interface: every KV store the decoder can run with.

The decoder computes q, k, v for a block of tokens and hands them to the cache object it was
given; the cache stores the new k/v and attends. The cache's per-layer arrays ride through the
layer `lax.scan` (leading `layers` axis); anything shared by all layers (lengths, page tables) is
closed over. Three kinds plug in here:

A cache may also keep state that is *carried* through the scan rather than sliced per layer
(`state()`), and is told the layer's index: the paged pool is carried whole, so each layer's
attention reads its pages in place instead of XLA copying a layer's slice of the pool.

- `NoCache`: the tokens attend only to each other (training, scoring a whole prompt); causal by
  index within each packed segment; runs the flash-attention kernel on GPU.
- `DenseCache`: a contiguous cache `[layers, B, S, KVH, D]` indexed by position (the simple
  cached decode loop).
- the paged cache of the decode engine (`pallax.decode`), with the ragged paged-attention kernel.

The decoder hands a cache the block's projections before RoPE (`QKV`: the q | k | v heads as one
GEMM writes them, and the rotation's cos/sin), so a cache can rotate and store in one kernel (the
paged cache on a GPU: `kernels_pallas.rope_kv_write`, or in a decode step rotation, store and
attention in one, `kernels_pallas.decode_attention`); the others rotate with `QKV.rotated`.

Shapes: q [B, T, H, D], k/v [B, T, KVH, D], positions [B, T] int32.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct

from pallax.kernels_pallas import dispatch

from .layers import apply_rope


@struct.dataclass
class QKV:
    """A block's attention inputs before RoPE: heads [B, T, H + 2 KVH, D] (q | k | v, as the fused
    projection writes them), cos, sin [B, T, D / 2] float32 (`layers.rope_cos_sin`)."""

    heads: jax.Array
    cos: jax.Array
    sin: jax.Array
    n_kv_heads: int = struct.field(pytree_node=False)

    def rotated(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, H, D] and k [B, T, KVH, D] rotated, v [B, T, KVH, D]."""
        n_heads = self.heads.shape[2] - 2 * self.n_kv_heads
        q, k, v = jnp.split(self.heads, [n_heads, n_heads + self.n_kv_heads], axis=2)
        return apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin), v


class AttentionCache(Protocol):
    def layers(self) -> Any:
        """The per-layer state, each leaf with a leading `layers` axis (scanned)."""

    def with_layers(self, layers: Any) -> "AttentionCache":
        """A cache holding the updated per-layer state."""

    def state(self) -> Any:
        """State carried through the layer scan whole (not sliced), or None."""

    def with_state(self, state: Any) -> "AttentionCache":
        """A cache holding the updated carried state."""

    def attend(self, layer: Any, qkv: QKV, positions, segment_ids=None, *, state=None, index=None):
        """Rotate q and k, store k/v of layer `index` and attend; returns out [B, T, H, D], the
        layer's new scanned state and the new carried state."""


def attention_reference(q, k, v, q_pos, kv_pos, kv_valid=None, q_seg=None, kv_seg=None):
    """Grouped-query attention with a position-causal mask, in float32.

    q [B, T, H, D]; k/v [B, S, KVH, D]; q_pos [B, T]; kv_pos [B, S]; kv_valid [B, S] bool;
    q_seg [B, T] / kv_seg [B, S] segment ids. A query attends to keys with kv_pos <= q_pos (and the
    same segment). Rows with no visible key give zeros.
    """
    B, T, H, D = q.shape
    KVH = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, KVH, H // KVH, D)
    s = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(D))
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if kv_valid is not None:
        mask &= kv_valid[:, None, :]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", p, v.astype(jnp.float32))
    return out.reshape(B, T, H, D).astype(q.dtype)


def self_attention(q, k, v, positions, segment_ids=None):
    """Tokens attending to each other, causal by index (positions increase within a segment)."""
    if dispatch.resolve() != "reference":
        try:
            from pallax.kernels_pallas.flash_attention import flash_attention
        except ImportError:
            flash_attention = None
        if flash_attention is not None:
            return flash_attention(q, k, v, causal=True, segment_ids=segment_ids,
                                   interpret=dispatch.resolve() == "interpret")
    idx = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), positions.shape)
    return attention_reference(q, k, v, idx, idx, q_seg=segment_ids, kv_seg=segment_ids)


@struct.dataclass
class NoCache:
    """No stored KV: the block of tokens is the whole context."""

    def layers(self):
        return None

    def with_layers(self, layers):
        return self

    def state(self):
        return None

    def with_state(self, state):
        return self

    def attend(self, layer, qkv: QKV, positions, segment_ids=None, *, state=None, index=None):
        return self_attention(*qkv.rotated(), positions, segment_ids), None, state


@struct.dataclass
class DenseCache:
    """A contiguous KV cache; token t of row b is stored at slot positions[b, t].

    k, v: [layers, B, S, KVH, D]. Positions >= S are dropped (padding tokens use S). A query at
    position p sees slots 0..p, so each row must be written densely from position 0.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, config, batch: int, max_len: int, dtype) -> "DenseCache":
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layers(self):
        return (self.k, self.v)

    def with_layers(self, layers):
        return DenseCache(*layers)

    def state(self):
        return None

    def with_state(self, state):
        return self

    def attend(self, layer, qkv: QKV, positions, segment_ids=None, *, state=None, index=None):
        q, k, v = qkv.rotated()
        k_cache, v_cache = layer  # [B, S, KVH, D]
        rows = jnp.arange(q.shape[0])[:, None]
        k_cache = k_cache.at[rows, positions].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, positions].set(v.astype(v_cache.dtype), mode="drop")
        B, S = k_cache.shape[:2]
        kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        out = attention_reference(q, k_cache, v_cache, positions, kv_pos)
        return out, (k_cache, v_cache), state
