"""Ragged paged attention for hosts without the Pallas kernel (the CPU).

The kernel's `paged_attention_reference` gathers every page of the page table for every query
token: right as an oracle, but its cost follows the table's static width (the whole context),
not the sequences' lengths. This version walks the KV range in blocks of pages with an online
softmax, inside a `while_loop` whose trip count is the longest KV length in the batch, so a step
costs what its sequences hold. Same contract as `paged_attention`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PAGES_PER_BLOCK = 8


def paged_attention_blocked(q, k_pages, v_pages, page_table, query_start, kv_lens, num_seqs,
                            k_scales=None, v_scales=None, pages_per_block: int = PAGES_PER_BLOCK):
    """q [T, H, D]; pages [P, page_size, KVH, D]; page_table [S, max_pages]; -> [T, H, D]."""
    T, H, D = q.shape
    P, ps, KVH, _ = k_pages.shape
    S, max_pages = page_table.shape
    G = H // KVH
    nb = pages_per_block
    pad = (-max_pages) % nb
    table = jnp.pad(page_table, ((0, 0), (0, pad)))
    # Which sequence each token belongs to, and its position; padding tokens get seq -1.
    t = jnp.arange(T)
    seq = jnp.sum(t[:, None] >= query_start[None, 1:], axis=1)  # [T]
    live = (seq < num_seqs) & (t < query_start[num_seqs])
    seq = jnp.minimum(seq, S - 1)
    q_len = query_start[seq + 1] - query_start[seq]
    pos = kv_lens[seq] - q_len + (t - query_start[seq])  # [T]
    qg = q.astype(jnp.float32).reshape(T, KVH, G, D) / math.sqrt(D)
    blk = nb * ps
    n_blocks = (jnp.max(jnp.where(jnp.arange(S) < num_seqs, kv_lens, 0)) + blk - 1) // blk

    def load(pages, scales, ids):  # ids [S, nb] -> [S, blk, KVH, D] f32
        x = pages[ids].astype(jnp.float32)
        if scales is not None:
            x = x * scales[ids][..., None]
        return x.reshape(S, blk, KVH, D)

    def body(carry):
        b, m, l, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(table, b * nb, nb, axis=1)  # [S, nb]
        k = load(k_pages, k_scales, ids)[seq]  # [T, blk, KVH, D]
        v = load(v_pages, v_scales, ids)[seq]
        s = jnp.einsum("TKGD,TBKD->TKGB", qg, k)
        kv_pos = b * blk + jnp.arange(blk)
        mask = (kv_pos[None, :] <= pos[:, None]) & (kv_pos[None, :] < kv_lens[seq][:, None])
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("TKGB,TBKD->TKGD", p, v)
        return b + 1, m_new, l, acc

    init = (jnp.int32(0), jnp.full((T, KVH, G), -jnp.inf), jnp.zeros((T, KVH, G)), jnp.zeros((T, KVH, G, D)))
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    out = jnp.where(live[:, None, None, None], out, 0.0)
    return out.reshape(T, H, D).astype(q.dtype)
