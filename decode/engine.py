"""The jitted engine step over a ragged token batch and the paged KV pool.

One step runs the model on a flat batch of `T` tokens from up to `S` sequences (decode tokens of
running sequences, prefill chunks of new ones, later draft tokens to verify), writes their K/V
into the page pool (donated, so updated in place), and samples one token per sequence from the
logits at its last token. Shapes are static: `T` is one of a few token-budget buckets and `S` is
fixed, so every program is compiled at warm-up and never again; lengths and page tables are
arrays.

A pure-decode batch (one token per sequence) may run `n_steps` model steps in one call: each
step feeds the tokens the previous one sampled, on device, without a host round trip.

A decode token's input may be the token the *previous* call sampled, still on device: the host
builds step i+1 while step i runs and reads step i's tokens afterwards (`from_prev`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas.decode_attention import decode_attention
from pallax.kernels_pallas.decode_attention import supported as decode_attention_supported
from pallax.kernels_pallas.paged_attention import paged_attention
from pallax.kernels_pallas.rope_kv_write import rope_kv_write, rope_kv_write_reference
from pallax.kernels_pallas.rope_kv_write import supported as rope_kv_write_supported
from pallax.model.attention import QKV
from pallax.model.config import ModelConfig
from pallax.model.decoder import forward

from .cpu_attention import paged_attention_blocked
from .kv_cache import PagePool
from .sampling import SamplingArrays, row_keys, sample

TOP_LOGPROBS = 20  # alternatives computed per sampled token (requests take up to this many)
PENALTY_WINDOW = 256  # repetition penalty looks at this many most recent tokens
# Every program runs at least two token rows (at batch 1 the second is dead padding): on a GPU
# `linear.gemm_rows` gives a one-row GEMM a second row anyway, with a pad kernel per projection
# input (about 1.3 us each, four per layer; bench/step_anatomy.py), while a dead row costs nothing.
MIN_ROWS = 2


@struct.dataclass
class StepBatch:
    """One step's inputs; built on the host as numpy, [T] per token and [S] per sequence."""

    tokens: jax.Array  # [T] int32 (host-known input tokens)
    from_prev: jax.Array  # [T] int32: row of the previous call's sampled tokens to feed, or -1
    positions: jax.Array  # [T] int32
    slots: jax.Array  # [T] int32: page * page_size + offset where the token's K/V go; -1 padding
    page_table: jax.Array  # [S, max_pages] int32
    query_start: jax.Array  # [S + 1] int32
    kv_lens: jax.Array  # [S] int32, this step's tokens included
    num_seqs: jax.Array  # [] int32: live rows of the S
    sample_steps: jax.Array  # [S] int32: index of the token being sampled (for the row's key)
    seeds: jax.Array  # [S] uint32
    penalty: jax.Array  # [S] f32 repetition penalty (1: none)
    recent: jax.Array  # [S, PENALTY_WINDOW] int32 recent tokens for the penalty, -1 padded
    sampling: SamplingArrays  # [S] each


_BATCH_FIELDS = [f for f in StepBatch.__dataclass_fields__ if f != "sampling"]


@struct.dataclass
class StepOutput:
    tokens: jax.Array  # [n_steps, S] int32
    logprob: jax.Array  # [n_steps, S] f32: log-probability of the sampled token
    top_ids: jax.Array  # [n_steps, S, TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [n_steps, S, TOP_LOGPROBS] f32


@struct.dataclass
class PagedCache:
    """The decoder's attention interface over the page pool (see `pallax.model.attention`).

    `decode`: every sequence has one new token and token s belongs to sequence s (T == S); the
    step then rotates, stores and attends in one kernel on a GPU (`decode_attention`)."""

    pool: PagePool
    slots: jax.Array
    page_table: jax.Array
    query_start: jax.Array
    kv_lens: jax.Array
    num_seqs: jax.Array
    decode: bool = struct.field(pytree_node=False, default=False)

    def layers(self):
        return None

    def with_layers(self, layers):
        return self

    def state(self):
        return self.pool

    def with_state(self, pool):
        return self.replace(pool=pool)

    def attend(self, layer, qkv: QKV, positions, segment_ids=None, *, state=None, index=None):
        pool: PagePool = state
        if pool.per_layer:
            # Per-layer buffers (unstacked weights run layers as a Python loop): layer `index`
            # writes and reads its own buffers in place.
            out, layer_pool = self._attend_pages(pool.layer(index), 0, qkv)
            return out, None, pool.with_layer(index, layer_pool)
        # The whole pool [L, P, page_size, KVH, D] is carried through the layer scan; layer `index`
        # owns pages index * P .. index * P + P - 1 of the flattened [L * P, page_size, KVH, D]
        # view, so the kernel reads it where it lies (reshapes of the carried buffer are free).
        flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), pool)
        out, flat = self._attend_pages(flat, index * pool.num_pages, qkv)
        return out, None, jax.tree.map(lambda a, b: a.reshape(b.shape), flat, pool)

    def _attend_pages(self, pool: PagePool, base, qkv: QKV):
        """Rotate q and k, write this block's K/V into pages [base, base + P) of a
        [pages, page_size, KVH, D] pool and attend over them."""
        ps, KVH, D = pool.k.shape[1:]
        slots = jnp.where(self.slots < 0, -1, base * ps + self.slots)  # padding: not written
        if self.decode and dispatch.resolve() != "reference" and decode_attention_supported(qkv.heads.dtype, D):
            out, *buffers = decode_attention(qkv.heads[0], qkv.cos[0], qkv.sin[0], slots, self.page_table + base,
                                             self.kv_lens, self.num_seqs, *pool.buffers, n_kv_heads=KVH)
            return out[None], PagePool(*buffers)
        # One kernel rotates q and k and writes k and v (quantized for int8 / fp8 pools) in place;
        # XLA's ops (the reference) where the kernel does not apply.
        write = rope_kv_write if rope_kv_write_supported(qkv.heads.dtype, D) else rope_kv_write_reference
        q, *buffers = write(qkv.heads[0], qkv.cos[0], qkv.sin[0], slots, *pool.buffers, n_kv_heads=KVH)
        pool = PagePool(*buffers)
        attend = paged_attention_blocked if dispatch.resolve() == "reference" else paged_attention
        out = attend(q, pool.k, pool.v, self.page_table + base, self.query_start, self.kv_lens,
                     self.num_seqs, k_scales=pool.k_scale, v_scales=pool.v_scale)
        return out[None], pool


def apply_repetition_penalty(logits: jax.Array, recent: jax.Array, penalty: jax.Array) -> jax.Array:
    """The CTRL rule (Keskar et al. 2019, as in HF `RepetitionPenaltyLogitsProcessor`): logits of
    tokens seen recently are divided by the penalty if positive, multiplied if negative."""
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(recent < 0, logits.shape[1], recent)
    seen = jnp.zeros(logits.shape, bool).at[rows, ids].set(True, mode="drop")
    p = penalty[:, None]
    penalized = jnp.where(logits > 0, logits / p, logits * p)
    return jnp.where(seen & (p != 1.0), penalized, logits)


def no_alternatives(n: int) -> tuple[jax.Array, jax.Array]:
    """Zero top-n logprobs [n, TOP_LOGPROBS] f32 and ids (int32), as `lax.top_k` returns them, for
    programs that leave the alternatives out (no row asked for them)."""
    ids = jnp.zeros((n, TOP_LOGPROBS), jnp.int32)
    return ids.astype(jnp.float32), ids


def _sample_rows(logits, batch: StepBatch, sample_steps, full: bool):
    if not full:  # every row plain greedy (SamplingParams.plain_greedy): no sort of the vocabulary
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        top_lp, top_ids = no_alternatives(logits.shape[0])
        return tokens, chosen, top_ids, top_lp
    logits = apply_repetition_penalty(logits, batch.recent, batch.penalty)
    tokens = sample(logits, batch.sampling, row_keys(batch.seeds, sample_steps))
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp


def engine_step(params, pool: PagePool, packed: Packed, prev_tokens, *, config: ModelConfig, n_steps: int,
                full: bool = True, decode: bool = False):
    """Run the batch (`to_device` of `empty_batch`-shaped buffers; for pure decode, n_steps - 1
    further steps too); returns the pool, the StepOutput and the last sampled tokens padded to
    prev_tokens' fixed length (the next call's `prev_tokens`, whatever its batch size).

    `decode=True` promises a pure decode batch (one token a sequence, token s of sequence s), as
    `n_steps > 1` does: its attention is then one kernel a layer (`PagedCache.decode`).

    `full=False` promises that every row is plain greedy: the program takes the argmax and leaves
    out the repetition penalty, the sampling filters and the top-n alternatives (at 64 rows of a
    128k vocabulary their sorts cost more than the attention; bench/step_anatomy.py). The host
    knows which rows it batched and picks the program; a `lax.cond` on the device would cost a
    device-to-host sync every step."""
    batch = step_batch(packed.unpack())
    tokens = jnp.where(batch.from_prev >= 0, prev_tokens[jnp.maximum(batch.from_prev, 0)], batch.tokens)
    S = batch.kv_lens.shape[0]
    last = jnp.maximum(batch.query_start[1:] - 1, 0)  # [S] index of each sequence's last token
    decode = decode or n_steps > 1

    def one(pool, tokens, positions, slots, kv_lens, recent, sample_steps):
        cache = PagedCache(pool, slots, batch.page_table, batch.query_start, kv_lens, batch.num_seqs, decode)
        logits, cache = forward(params, tokens[None], positions[None], cache, config=config,
                                logit_indices=last[None])
        b = batch.replace(recent=recent)
        return cache.pool, _sample_rows(logits[0], b, sample_steps, full)

    def padded(last):
        return jnp.zeros_like(prev_tokens).at[: last.shape[0]].set(last)

    pool, first = one(pool, tokens, batch.positions, batch.slots, batch.kv_lens, batch.recent, batch.sample_steps)
    if n_steps == 1:
        return pool, StepOutput(*(x[None] for x in first)), padded(first[0])

    # Pure decode: T == S, token s belongs to sequence s. Keep going on device.
    ps = pool.page_size
    live = jnp.arange(S) < batch.num_seqs

    def body(carry, _):
        pool, tok, pos, kv_lens, recent, steps = carry
        pos, kv_lens, steps = pos + 1, kv_lens + 1, steps + 1
        page = jnp.take_along_axis(batch.page_table, (pos // ps)[:, None], axis=1)[:, 0]
        slots = jnp.where(live, page * ps + pos % ps, -1)
        recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
        pool, out = one(pool, tok, pos, slots, kv_lens, recent, steps)
        return (pool, out[0], pos, kv_lens, recent, steps), out

    recent = jnp.concatenate([batch.recent[:, 1:], tokens[:, None]], axis=1)
    carry = (pool, first[0], batch.positions, batch.kv_lens, recent, batch.sample_steps)
    (pool, *_), rest = jax.lax.scan(body, carry, None, length=n_steps - 1)
    outs = [jnp.concatenate([f[None], r], axis=0) for f, r in zip(first, rest)]
    return pool, StepOutput(*outs), padded(outs[0][-1])


@functools.lru_cache(maxsize=None)
def compile_step(config: ModelConfig, n_steps: int, full: bool = True, decode: bool = False):
    """The jitted step for a given number of on-device decode steps (and `full`, `decode`, see
    engine_step); the pool is donated."""
    return jax.jit(functools.partial(engine_step, config=config, n_steps=n_steps, full=full, decode=decode),
                   donate_argnums=(1,))


def empty_batch(T: int, S: int, max_pages: int) -> dict[str, np.ndarray]:
    """Host buffers for a step, padding everywhere."""
    return {
        "tokens": np.zeros(T, np.int32),
        "from_prev": np.full(T, -1, np.int32),
        "positions": np.zeros(T, np.int32),
        "slots": np.full(T, -1, np.int32),
        "page_table": np.zeros((S, max_pages), np.int32),
        "query_start": np.zeros(S + 1, np.int32),
        "kv_lens": np.zeros(S, np.int32),
        "sample_steps": np.zeros(S, np.int32),
        "seeds": np.zeros(S, np.uint32),
        "penalty": np.ones(S, np.float32),
        "recent": np.full((S, PENALTY_WINDOW), -1, np.int32),
        "temperature": np.zeros(S, np.float32),
        "top_k": np.zeros(S, np.int32),
        "top_p": np.ones(S, np.float32),
        "min_p": np.zeros(S, np.float32),
    }


@struct.dataclass
class Packed:
    """Host buffers as two device arrays: every integer and bool buffer flattened into one int32
    vector, every float32 buffer into one f32 vector. A step's inputs are a dozen or more small
    arrays; one transfer each costs more host time than the model step at batch 1, while the
    slices that unpack them inside the jitted program cost nothing."""

    ints: jax.Array  # [n] int32
    floats: jax.Array  # [m] f32
    layout: tuple = struct.field(pytree_node=False)  # (name, shape, dtype, offset) per buffer

    def unpack(self) -> dict[str, jax.Array]:
        out = {}
        for name, shape, dtype, offset in self.layout:
            end = offset + int(np.prod(shape))
            if dtype == np.float32:
                x = self.floats[offset:end]
            elif dtype == np.bool_:
                x = self.ints[offset:end] != 0
            else:
                x = jax.lax.bitcast_convert_type(self.ints[offset:end], dtype)
            out[name] = x.reshape(shape)
        return out


_INT_KINDS = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.bool_))


def pack(host: dict[str, np.ndarray]) -> Packed:
    """Put a dict of int32 / uint32 / bool / float32 host buffers on the device in one transfer
    per kind (`Packed.unpack` restores them, in the jitted program)."""
    ints, floats, layout, n_int, n_float = [], [], [], 0, 0
    for name, x in host.items():
        x = np.asarray(x)
        if x.dtype == np.float32:
            layout.append((name, x.shape, x.dtype, n_float))
            floats.append(x.reshape(-1))
            n_float += x.size
        elif x.dtype in _INT_KINDS:
            layout.append((name, x.shape, x.dtype, n_int))
            ints.append(x.reshape(-1).astype(np.int32) if x.dtype == np.bool_ else x.reshape(-1).view(np.int32))
            n_int += x.size
        else:
            raise TypeError(f"cannot pack {name!r} of dtype {x.dtype} (int32, uint32, bool or float32)")
    dev = jax.device_put((np.concatenate(ints) if ints else np.zeros(0, np.int32),
                          np.concatenate(floats) if floats else np.zeros(0, np.float32)))
    return Packed(*dev, tuple(layout))


def to_device(host: dict[str, np.ndarray], num_seqs: int) -> Packed:
    """A step's host buffers (plus any extra ones a step takes, e.g. speculative inputs) on the
    device in two transfers; the step rebuilds them with `step_batch`."""
    return pack(dict(host, num_seqs=np.int32(num_seqs)))


def step_batch(fields: dict[str, jax.Array]) -> StepBatch:
    """The StepBatch among unpacked fields (consumed from the dict; what remains is the caller's)."""
    sampling = SamplingArrays(*(fields.pop(k) for k in ("temperature", "top_k", "top_p", "min_p")))
    return StepBatch(sampling=sampling, **{f: fields.pop(f) for f in _BATCH_FIELDS})
