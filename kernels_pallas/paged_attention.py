"""Ragged paged attention: decode, speculative verification and chunked prefill in one kernel.

The query batch is a flat list of tokens grouped by sequence, `q[T, H, D]`; sequence `s` owns
tokens `query_start[s]:query_start[s + 1]` and has `kv_lens[s]` keys and values (its new tokens
included, already written to the cache). Its K/V live in a page pool `[P, page_size, KVH, D]`
(the engine's layout, kept as is) and `page_table[s]` lists its pages in order. Query token `i`
of a sequence with `q_len` new tokens sits at position `kv_lens[s] - q_len + i` and attends the
kv positions `<=` it (causal within the sequence). Rows past `query_start[num_seqs]` are padding
and come out as zeros.

How the work is cut. One program handles a *work item* (a block of `block_q` consecutive query
tokens of one sequence), one kv head, and one of `kv_splits` slices of the kv range:

- grid `(work_items, KVH, kv_splits)`; the program finds its sequence itself: it loads
  `query_start` as a vector, counts query blocks per sequence (`cumsum`) and picks the sequence
  whose block range holds its work-item index, so the wrapper does no index preprocessing (a
  decode step launches the attention kernel and nothing else when `kv_splits == 1`);
- the `G = H // KVH` query heads of the kv head are processed together (GQA without repeating
  K/V): the program's rows are `block_q * G` (token, head) pairs, padded to at least 16 rows for
  the tensor cores; `block_q = 1` for pure decode batches (`T == S`), larger otherwise;
- K/V are gathered *token by token*: for a block of `block_kv` kv positions the program looks up
  each position's page in the page table and loads the rows `((page * page_size + slot) * KVH +
  h)` of the pool seen as a 2-D `[P * page_size * KVH, D]` array. Each row is `D` contiguous
  elements (256 bytes for bf16, D = 128), so loads stay wide and coalesced, and the page size is
  free (8, 16, 32, or any other) and independent of `block_kv`. This is why the engine's
  `[P, page_size, KVH, D]` layout needs no change: a `[KVH, P, page_size, D]` pool would make one
  head's page contiguous (4 KiB instead of 16 x 256 B) for no gain in transaction width;
- flash-decoding: the kv range of a work item (up to its last query token) is cut into
  `kv_splits` equal runs of `block_kv` blocks, sized from the actual length at run time; each
  program writes its normalized partial output and log-sum-exp, and a second small kernel
  (`_combine_kernel`, one program per (token, head) row) merges them and writes q.dtype rows
  `[T, KVH, G, D]`, which is `[T, H, D]`: for a decode batch the work items are the tokens, and
  for query blocks each program finds its token's work item as the attention kernel does, so
  the step is the two kernels and a free reshape. With `kv_splits == 1` the attention kernel
  writes the final output directly (query blocks then gather their rows into token order).

int8 / float8_e4m3fn K/V carry per-token-per-head f32 scales `[P, page_size, KVH]`; the value is
`x.astype(f32) * scale`. Scores are scaled after the `q @ k` product and `p` before `p @ v`, so
the dots run on the query dtype (int8 and e4m3 values are exact in bf16).

Requirements of the compiled kernel: `D` a power of two >= 16, the pool smaller than 2**31 rows;
pool contents finite (masked positions are multiplied by zero probabilities).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallax.kernels_pallas import dispatch

_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows give no NaN
_LOG2E = math.log2(math.e)
_QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _work_items(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Static bound on the query blocks of a batch: sum_s ceil(q_len_s / block_q) <=
    (T + S * (block_q - 1)) // block_q, and never more than one per token."""
    return min(num_tokens, (num_tokens + num_seqs * (block_q - 1)) // block_q)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters.

    block_q:   query tokens per program; None: 1 when every sequence may be a single decode token
               (T == S), else max(1, 64 // G) (so a program holds about 64 (token, head) rows).
    block_kv:  kv positions per inner step (power of two >= 16; need not be a multiple of the
               page size); None: 128 for 1-byte (int8 / fp8) K/V, 64 otherwise (tuned on H100).
    kv_splits: slices of each sequence's kv range run by separate programs (flash-decoding);
               None: enough programs to fill the GPU for the static batch shape.
    num_warps, num_stages: Triton launch parameters.
    """

    block_q: int | None = None
    block_kv: int | None = None
    kv_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q is not None and self.block_q < 1:
            raise ValueError(f"{self.block_q=} must be >= 1")
        if self.block_kv is not None and (self.block_kv < 16 or
                                          self.block_kv & (self.block_kv - 1)):
            raise ValueError(f"{self.block_kv=} must be a power of two >= 16")
        if self.kv_splits is not None and self.kv_splits < 1:
            raise ValueError(f"{self.kv_splits=} must be >= 1")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"{self.num_warps=} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be >= 1")

    def resolve(self, *, num_tokens: int, num_seqs: int, group: int, num_kv_heads: int,
                max_kv: int, kv_itemsize: int) -> tuple[int, int, int]:
        """(block_q, block_kv, kv_splits) for a static batch shape."""
        block_q = self.block_q
        if block_q is None:
            # One token per work item for decode batches, and for a lone token beside a dead
            # padding row (the engine's two-row minimum): a query block would only add rows.
            block_q = 1 if num_tokens <= max(num_seqs, 2) else max(1, 64 // group)
        # Counted in work items, not sequences: a prefill chunk of one sequence already has
        # T / block_q of them.
        items = _work_items(num_tokens, num_seqs, block_q) * num_kv_heads
        # 16-bit K/V: 128 positions per block when the kv range is split (few programs, each
        # streaming a long run), 64 otherwise; measured on an H100 (bench/results/
        # attention_decode_h100_configs.json: B=1 ctx 32k and B=16 ctx 4k faster at 128, B=64
        # ctx 2k at 64). 8-bit K/V: 128 everywhere.
        block_kv = self.block_kv or (128 if kv_itemsize == 1 or items < 256 else 64)
        splits = self.kv_splits
        if splits is None:
            # About 2 programs per SM of an H100 (132 SMs) for long sequences; tuned on the
            # decode benchmark (bench/attention_decode.py): B=1 best at 32 splits, B=16 at 2,
            # B=64 at 1 (H=32, KVH=8).
            splits = _pow2(max(1, -(-256 // items)))
        splits = max(1, min(splits, -(-max_kv // block_kv)))
        return block_q, block_kv, splits


def _query_blocks(query_start_ref, num_seqs_ref, *, num_seqs: int, block_q: int):
    """The batch's layout in query blocks, as vectors over the sequence slots (padded to a power
    of two): slot index i, token range [lo, hi), whether the slot is a live sequence, its query
    length (0 if not) and its number of query blocks (work items). `_kernel` and the combine's
    `_token_row` both number work items from these: each sequence's blocks, in sequence order."""
    i = jnp.arange(_pow2(num_seqs), dtype=jnp.int32)
    lo = query_start_ref[jnp.minimum(i, num_seqs)]
    hi = query_start_ref[jnp.minimum(i + 1, num_seqs)]
    live_seq = i < jnp.minimum(num_seqs_ref[0], num_seqs)
    q_lens = jnp.where(live_seq, hi - lo, 0)
    return i, lo, hi, live_seq, q_lens, (q_lens + (block_q - 1)) // block_q


def _kernel(
    query_start_ref,  # [S + 1] int32
    kv_lens_ref,      # [S] int32
    num_seqs_ref,     # [1] int32
    page_table_ref,   # [S * max_pages] int32 (flat)
    q_ref,            # [T * H, D]
    k_ref,            # [P * page_size * KVH, D]
    v_ref,            # [P * page_size * KVH, D]
    *rest,            # k_scales [P * page_size * KVH], v_scales (quantized only); outputs
    num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, num_pages: int,
    page_size: int, max_pages: int, block_q: int, block_kv: int, rows: int, kv_splits: int,
    scale: float, quantized: bool, compute_dtype,
):
    if quantized:
        k_scales_ref, v_scales_ref, *outs = rest
    else:
        k_scales_ref = v_scales_ref = None
        outs = rest
    o_ref = outs[0]                               # [rows, D]
    lse_ref = outs[1] if len(outs) > 1 else None  # [rows]
    group = num_heads // num_kv_heads
    w, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    # --- which sequence and query block this work item is (no host preprocessing) ---------
    i, lo, _, live_seq, q_lens, n_blk = _query_blocks(query_start_ref, num_seqs_ref, num_seqs=num_seqs,
                                                      block_q=block_q)
    ends = jnp.cumsum(n_blk)                       # work items end (exclusive) per sequence
    seq = jnp.sum((ends <= w).astype(jnp.int32))   # first sequence whose range holds w
    this = i == seq
    w_start = jnp.sum(jnp.where(this, ends - n_blk, 0))
    q_begin = jnp.sum(jnp.where(this, lo, 0))
    q_len = jnp.sum(jnp.where(this, q_lens, 0))
    # Every slot's length is loaded beside query_start and this sequence's picked from them, so
    # the length is not a second round trip to memory after the sequence is known.
    kv_len = jnp.sum(jnp.where(this, kv_lens_ref[jnp.minimum(i, num_seqs - 1)], 0))
    first = (w - w_start) * block_q                # first query token of the block, in-sequence
    n_q = jnp.clip(q_len - first, 0, block_q)      # 0 for padding work items
    pos0 = kv_len - q_len + first                  # position of the block's first token
    kv_end = jnp.where(n_q > 0, pos0 + n_q, 0)

    n_blocks = (kv_end + (block_kv - 1)) // block_kv
    per_split = (n_blocks + (kv_splits - 1)) // kv_splits
    blk_lo = split * per_split
    blk_hi = jnp.minimum(blk_lo + per_split, n_blocks)

    # --- query rows: (token, head) pairs of this kv head --------------------------------
    r = jnp.arange(rows, dtype=jnp.int32)
    tok = r // group
    q_tok = jnp.clip(q_begin + first + tok, 0, num_tokens - 1)
    q_rows = q_tok * num_heads + h * group + r % group
    q = q_ref[q_rows, :].astype(compute_dtype)     # [rows, D]
    q_pos = pos0 + tok                             # [rows]

    o, l, m = _attend_blocks(q, q_pos, blk_lo, blk_hi, page_table_ref, k_ref, v_ref, k_scales_ref,
                             v_scales_ref, seq=seq, h=h, num_kv_heads=num_kv_heads, num_pages=num_pages,
                             page_size=page_size, max_pages=max_pages, block_kv=block_kv, scale=scale,
                             compute_dtype=compute_dtype)
    _store(o, l, m, o_ref, lse_ref)


def _block_pages(page_table_ref, seq, j, *, page_size: int, max_pages: int, block_kv: int, mask=None):
    """The page of each of kv block j's rows ([block_kv] int32, as the table holds it)."""
    kv_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
    at = page_table_ref.at[seq * max_pages + jnp.minimum(kv_pos // page_size, max_pages - 1)]
    if mask is None:
        return plgpu.load(at)
    return plgpu.load(at, mask=jnp.broadcast_to(mask, kv_pos.shape), other=0)


def _attend_blocks(q, q_pos, blk_lo, blk_hi, page_table_ref, k_ref, v_ref, k_scales_ref, v_scales_ref,
                   *, seq, h, num_kv_heads: int, num_pages: int, page_size: int, max_pages: int,
                   block_kv: int, scale: float, compute_dtype, init=None, known=None):
    """Online softmax of q [rows, D] (at positions q_pos [rows]) over kv blocks [blk_lo, blk_hi)
    of sequence `seq`, kv head `h`: (o [rows, D] unnormalized, l [rows], m [rows]), base 2,
    starting from `init` (o, l, m) if given, else from no keys. `known = (j0, pages)`: block j0's
    pages (`_block_pages`), loaded by the caller; that block's pages are not loaded again."""
    quantized = k_scales_ref is not None
    pages_of = functools.partial(_block_pages, page_table_ref, seq, page_size=page_size,
                                 max_pages=max_pages, block_kv=block_kv)

    def body(j, carry):
        o, m, l = carry
        kv_pos = j * block_kv + jnp.arange(block_kv, dtype=jnp.int32)          # [block_kv]
        if known is None:
            page = pages_of(j)
        else:
            j0, pages = known
            page = jnp.where(j == j0, pages, pages_of(j, mask=j != j0))
        page = jnp.clip(page, 0, num_pages - 1)
        kv_rows = (page * page_size + kv_pos % page_size) * num_kv_heads + h
        k = k_ref[kv_rows, :].astype(compute_dtype)                            # [block_kv, D]
        v = v_ref[kv_rows, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale        # [rows, block_kv]
        if quantized:
            s = s * k_scales_ref[kv_rows][None, :]
        s = jnp.where(kv_pos[None, :] <= q_pos[:, None], s, _MASK)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        if quantized:
            p = p * v_scales_ref[kv_rows][None, :]
        pv = lax.dot_general(p.astype(compute_dtype), v.astype(compute_dtype),
                             (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return o * alpha[:, None] + pv, m_new, l

    rows, d = q.shape
    if init is None:
        init = (jnp.zeros((rows, d), jnp.float32), jnp.zeros((rows,), jnp.float32),
                jnp.full((rows,), _MASK, jnp.float32))
    o, l, m = init
    o, m, l = lax.fori_loop(blk_lo, blk_hi, body, (o, m, l))
    return o, l, m


def _store(o, l, m, o_ref, lse_ref):
    """The normalized output (and, for a kv split, its base-2 log-sum-exp) of `_attend_blocks`."""
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (o / l_safe[:, None]).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = m + jnp.log2(l_safe)        # base 2; _MASK where the slice was empty


# Partials of one (token, head) row held in registers per combine step: [chunk, D] f32.
_COMBINE_ELEMS = 4096


def _combine_kernel(
    o_part_ref,  # [K * N, D] f32: the K splits' normalized outputs, N rows each
    lse_ref,     # [K * N] f32: their base-2 log-sum-exp; _MASK where a split was empty
    *rest,       # query_start [S + 1], num_seqs [1] (by token only); o_ref [D]
    splits: int, chunk: int, n_rows: int, row_of,
):
    """out = sum_k 2^(lse_k - m) o_k / sum_k 2^(lse_k - m) for one output row, online over
    chunks of splits. `row_of(*refs)` gives the partials' row n (of N) and whether the output
    row has one (else it is 0).

    Only the splits with keys for this row are read. They are a prefix: split k covers a run of
    kv blocks starting at k * per_split, and a row sees the keys up to its own position, so
    the empty splits (lse == _MASK) are the last ones. The split count is static (from the page
    table's width), so in a long-context engine a short sequence leaves most of them empty.
    A row with no keys (padding) is 0.
    """
    *index_refs, o_ref = rest
    n, valid = row_of(*index_refs)
    n = jnp.clip(n, 0, n_rows - 1)
    n_chunks = -(-splits // chunk)

    def rows(c):
        k = c * chunk + jnp.arange(chunk, dtype=jnp.int32)
        return k, jnp.minimum(k, splits - 1) * n_rows + n  # chunk is a power of two; splits may not be

    def count(c, live):
        k, at = rows(c)
        return live + jnp.sum(((k < splits) & (lse_ref[at] > _MASK)).astype(jnp.int32))

    n_live = jnp.where(valid, lax.fori_loop(0, n_chunks, count, jnp.int32(0)), 0)

    def body(c, carry):
        acc, m, l = carry
        k, at = rows(c)
        live = k < n_live
        lse = jnp.where(live, lse_ref[at], _MASK)      # [chunk]
        o = o_part_ref[at, :]                          # [chunk, D]
        m_new = jnp.maximum(m, jnp.max(lse))
        alpha = jnp.exp2(m - m_new)
        wgt = jnp.where(live, jnp.exp2(lse - m_new), 0.0)
        return acc * alpha + jnp.sum(wgt[:, None] * o, axis=0), m_new, l * alpha + jnp.sum(wgt)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    m = jnp.full((), _MASK, jnp.float32)
    l = jnp.zeros((), jnp.float32)
    acc, m, l = lax.fori_loop(0, (n_live + chunk - 1) // chunk, body, (acc, m, l))
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)  # every split empty: 0


def _token_row(query_start_ref, num_seqs_ref, *, num_seqs: int, block_q: int, group: int, kvh: int,
               rows: int):
    """For the combine program of output row (token t, kv head h, head g of its group): the
    partials' row of t's work item (`_kernel`'s numbering: each sequence's tokens in blocks of
    block_q, the work items in sequence order), and whether t belongs to a live sequence."""
    t, h, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    i, lo, hi, live_seq, _, n_blk = _query_blocks(query_start_ref, num_seqs_ref, num_seqs=num_seqs,
                                                  block_q=block_q)
    seq = jnp.sum((live_seq & (hi <= t)).astype(jnp.int32))  # the live sequence holding t, if any
    this = i == seq
    local = t - jnp.sum(jnp.where(this, lo, 0))
    w = jnp.sum(jnp.where(this, jnp.cumsum(n_blk) - n_blk, 0)) + local // block_q
    valid = (jnp.sum((this & live_seq).astype(jnp.int32)) > 0) & (local >= 0)
    return (w * kvh + h) * rows + (local % block_q) * group + g, valid


def _grid_row(*, kvh: int, rows: int):
    """For the combine program of partials row (work item w, kv head h, row r): that row."""
    w, h, r = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    return (w * kvh + h) * rows + r, True


def _combine(o_part, lse, *, real_rows, out_dtype, interpret, chunk=None, tokens=None):
    """Merge the kv splits: o_part [K, W, KVH, rows, D] f32, lse [K, W, KVH, rows] f32 ->
    [W, KVH, real_rows, D] out_dtype. Only the first `real_rows` rows are read (the rest pad
    `rows` to a power of two for the tensor cores). One program per (work, kv head, row), so a
    B=1 decode step still spreads over H programs; each reads K rows of D contiguous floats.

    tokens = (query_start, num_seqs, num_tokens, block_q, group), for work items of block_q
    tokens: the output is [T, KVH, G, D] in token order instead (real_rows unused), one program
    per (token, kv head, head of the group), rows of tokens outside the live sequences 0; no
    gather after it."""
    splits, work, kvh, rows, d = o_part.shape
    if chunk is None:
        chunk = min(_pow2(splits), max(1, _COMBINE_ELEMS // d))
    compiler_params = None
    if not interpret:
        # Not the attention kernel's BlockSizes: a program holds at most _COMBINE_ELEMS floats.
        compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    inputs = [o_part.reshape(splits * work * kvh * rows, d), lse.reshape(-1)]
    if tokens is None:
        grid, row_of = (work, kvh, real_rows), functools.partial(_grid_row, kvh=kvh, rows=rows)
    else:
        query_start, num_seqs, num_tokens, block_q, group = tokens
        grid = (num_tokens, kvh, group)
        row_of = functools.partial(_token_row, num_seqs=query_start.shape[0] - 1, block_q=block_q, group=group,
                                   kvh=kvh, rows=rows)
        inputs += [query_start.astype(jnp.int32), num_seqs.reshape(1).astype(jnp.int32)]
    return pl.pallas_call(
        functools.partial(_combine_kernel, splits=splits, chunk=chunk, n_rows=work * kvh * rows, row_of=row_of),
        grid=grid,
        in_specs=[pl.BlockSpec(x.shape, lambda a, b, c, n=x.ndim: (0,) * n) for x in inputs],
        out_specs=pl.BlockSpec((None, None, None, d), lambda a, b, c: (a, b, c, 0)),
        out_shape=jax.ShapeDtypeStruct((*grid, d), out_dtype),
        interpret=interpret, compiler_params=compiler_params,
        name=f"paged_attention_combine_s{splits}",
    )(*inputs)


def _outputs(splits: int, work: int, kvh: int, rows: int, d: int, dtype):
    """(out_shape, out_specs) of the attention programs on a `(work, kvh, splits)` grid: the
    output [work, kvh, rows, d] in `dtype` when the kv range is not split, else each split's
    normalized output [splits, work, kvh, rows, d] and log-sum-exp [splits, work, kvh, rows],
    f32, for `_combine`."""
    if splits == 1:
        return ([jax.ShapeDtypeStruct((work, kvh, rows, d), dtype)],
                [pl.BlockSpec((None, None, rows, d), lambda w, h, k: (w, h, 0, 0))])
    return ([jax.ShapeDtypeStruct((splits, work, kvh, rows, d), jnp.float32),
             jax.ShapeDtypeStruct((splits, work, kvh, rows), jnp.float32)],
            [pl.BlockSpec((None, None, None, rows, d), lambda w, h, k: (k, w, h, 0, 0)),
             pl.BlockSpec((None, None, None, rows), lambda w, h, k: (k, w, h, 0))])


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def _paged_attention_kernel(q, k_pages, v_pages, page_table, query_start, kv_lens, num_seqs,
                            k_scales, v_scales, *, sm_scale, block_sizes, interpret):
    t, num_heads, d = q.shape
    num_pages, page_size, kvh, _ = k_pages.shape
    s, max_pages = page_table.shape
    group = num_heads // kvh
    block_q, block_kv, splits = block_sizes.resolve(
        num_tokens=t, num_seqs=s, group=group, num_kv_heads=kvh, max_kv=max_pages * page_size,
        kv_itemsize=jnp.dtype(k_pages.dtype).itemsize)
    rows = max(16, _pow2(block_q * group))
    work = _work_items(t, s, block_q)
    quantized = k_scales is not None

    n_rows = num_pages * page_size * kvh
    inputs = [query_start.astype(jnp.int32), kv_lens.astype(jnp.int32),
              num_seqs.reshape(1).astype(jnp.int32), page_table.reshape(-1).astype(jnp.int32),
              q.reshape(t * num_heads, d), k_pages.reshape(n_rows, d), v_pages.reshape(n_rows, d)]
    if quantized:
        inputs += [k_scales.reshape(n_rows).astype(jnp.float32),
                   v_scales.reshape(n_rows).astype(jnp.float32)]
    in_specs = [pl.BlockSpec(x.shape, lambda w, h, k, n=x.ndim: (0,) * n) for x in inputs]

    out_shape, out_specs = _outputs(splits, work, kvh, rows, d, q.dtype)
    kernel = functools.partial(
        _kernel, num_tokens=t, num_seqs=s, num_heads=num_heads, num_kv_heads=kvh,
        num_pages=num_pages, page_size=page_size, max_pages=max_pages, block_q=block_q,
        block_kv=block_kv, rows=rows, kv_splits=splits,
        scale=sm_scale * _LOG2E, quantized=quantized,
        compute_dtype=q.dtype if jnp.issubdtype(q.dtype, jnp.floating) else jnp.float32)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                               num_stages=block_sizes.num_stages)
    outs = pl.pallas_call(
        kernel, grid=(work, kvh, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, compiler_params=compiler_params,
        name=f"paged_attention_bq{block_q}_bkv{block_kv}_s{splits}",
    )(*inputs)

    if splits == 1:
        out = outs[0][:, :, : block_q * group]                 # [W, KVH, bq * G, D]
    elif block_q == 1:
        out = _combine(*outs, real_rows=group, out_dtype=q.dtype,
                       interpret=interpret)                    # [W, KVH, G, D]
    else:                                                      # [T, KVH, G, D]
        out = _combine(*outs, real_rows=block_q * group, out_dtype=q.dtype, interpret=interpret,
                       tokens=(query_start, num_seqs, t, block_q, group))
        return out.reshape(t, num_heads, d)
    if block_q == 1:
        # Work item w is token w (padding tokens come out as zeros): [T, KVH, G, D] is
        # [T, H, D] already.
        return out.reshape(t, num_heads, d)
    out = out.reshape(work, kvh, block_q, group, d)
    # Map each token to (work item, row) of its sequence's query block.
    tok = jnp.arange(t, dtype=jnp.int32)
    live = jnp.arange(s) < num_seqs
    starts, ends = query_start[:-1], query_start[1:]
    q_lens = jnp.where(live, ends - starts, 0)
    n_blk = (q_lens + block_q - 1) // block_q
    w_start = jnp.cumsum(n_blk) - n_blk
    seq = jnp.sum((ends[None, :] <= tok[:, None]) & live[None, :], axis=1)
    seq_c = jnp.minimum(seq, s - 1)
    local = tok - starts[seq_c]
    w_of_t = jnp.clip(w_start[seq_c] + local // block_q, 0, work - 1)
    gathered = out[w_of_t, :, jnp.clip(local % block_q, 0, block_q - 1)]   # [T, KVH, G, D]
    valid = (seq < num_seqs) & (tok < query_start[jnp.minimum(num_seqs, s)])
    gathered = jnp.where(valid[:, None, None, None], gathered, 0)
    return gathered.reshape(t, num_heads, d)


def _check(q, k_pages, v_pages, page_table, query_start, kv_lens, k_scales, v_scales):
    if q.ndim != 3:
        raise ValueError(f"q must be [T, H, D], got {q.shape=}")
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [P, page_size, KVH, D], got {k_pages.shape=}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"{v_pages.shape=} must equal {k_pages.shape=}")
    t, h, d = q.shape
    p, page_size, kvh, dk = k_pages.shape
    if page_size < 1 or p < 1:
        raise ValueError(f"page pool {k_pages.shape=} needs >= 1 page of page_size >= 1")
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) != head_dim of k_pages ({dk})")
    if h % kvh:
        raise ValueError(f"num_heads={h} must be a multiple of num_kv_heads={kvh}")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be [S, max_pages], got {page_table.shape=}")
    s = page_table.shape[0]
    if query_start.shape != (s + 1,):
        raise ValueError(f"{query_start.shape=} must be (S + 1,) = ({s + 1},)")
    if kv_lens.shape != (s,):
        raise ValueError(f"{kv_lens.shape=} must be (S,) = ({s},)")
    for name, x in (("page_table", page_table), ("query_start", query_start),
                    ("kv_lens", kv_lens)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {x.dtype}")
    quantized = jnp.dtype(k_pages.dtype) in _QUANT_DTYPES
    if quantized != (jnp.dtype(v_pages.dtype) in _QUANT_DTYPES):
        raise ValueError(f"k_pages ({k_pages.dtype}) and v_pages ({v_pages.dtype}) must both be "
                         "quantized or both not")
    if quantized:
        if k_scales is None or v_scales is None:
            raise ValueError(f"{k_pages.dtype} K/V need k_scales and v_scales [P, page_size, KVH]")
        for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
            if x.shape != (p, page_size, kvh):
                raise ValueError(f"{name}.shape={x.shape} must be (P, page_size, KVH) = "
                                 f"{(p, page_size, kvh)}")
    elif k_scales is not None or v_scales is not None:
        raise ValueError(f"scales given for unquantized {k_pages.dtype} K/V")


def paged_attention(q, k_pages, v_pages, page_table, query_start, kv_lens, num_seqs=None, *,
                    sm_scale=None, k_scales=None, v_scales=None, block_sizes=None,
                    interpret=False):
    """Causal attention of ragged query tokens over a paged KV cache.

    q: [T, H, D]; k_pages, v_pages: [P, page_size, KVH, D] (bf16/f16/f32, or int8 /
    float8_e4m3fn with k_scales, v_scales [P, page_size, KVH] f32); page_table: [S, max_pages]
    int32; query_start: [S + 1] int32; kv_lens: [S] int32 (new tokens included); num_seqs: int32
    scalar array or None (all S live). Returns [T, H, D] in q.dtype; padding rows are zeros.
    Honours `dispatch.resolve()`; `interpret=True` forces the kernel through the interpreter.
    """
    _check(q, k_pages, v_pages, page_table, query_start, kv_lens, k_scales, v_scales)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if num_seqs is None:
        num_seqs = page_table.shape[0]
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return paged_attention_reference(q, k_pages, v_pages, page_table, query_start, kv_lens,
                                         num_seqs, sm_scale=sm_scale, k_scales=k_scales,
                                         v_scales=v_scales)
    block_sizes = block_sizes or BlockSizes()
    d = q.shape[-1]
    if mode == "pallas":
        if d < 16 or d & (d - 1):
            raise ValueError(f"head_dim={d} must be a power of two >= 16 for the GPU kernel")
        p, page_size, kvh, _ = k_pages.shape
        if p * page_size * kvh >= 2**31:
            raise ValueError(f"page pool {k_pages.shape} has >= 2**31 (page, slot, head) rows")
    return _paged_attention_kernel(q, k_pages, v_pages, page_table, query_start, kv_lens,
                                   num_seqs, k_scales, v_scales, sm_scale=float(sm_scale),
                                   block_sizes=block_sizes, interpret=mode == "interpret")


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_attention_reference(q, k_pages, v_pages, page_table, query_start, kv_lens,
                              num_seqs=None, *, sm_scale=None, k_scales=None, v_scales=None):
    """Pure jnp: gather each token's sequence pages, dequantize, causal softmax in f32."""
    t, num_heads, d = q.shape
    _, page_size, kvh, _ = k_pages.shape
    s, max_pages = page_table.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    if num_seqs is None:
        num_seqs = s
    k = k_pages.astype(jnp.float32)
    v = v_pages.astype(jnp.float32)
    if k_scales is not None:
        k = k * k_scales[..., None]
        v = v * v_scales[..., None]
    kv_len_max = max_pages * page_size
    k_seq = k[page_table].reshape(s, kv_len_max, kvh, d)       # [S, L, KVH, D]
    v_seq = v[page_table].reshape(s, kv_len_max, kvh, d)

    tok = jnp.arange(t)
    live_seq = jnp.arange(s) < num_seqs
    seq = jnp.sum((query_start[None, 1:] <= tok[:, None]) & live_seq[None, :], axis=1)  # [T]
    live = seq < num_seqs
    seq_c = jnp.minimum(seq, s - 1)
    q_len = query_start[seq_c + 1] - query_start[seq_c]
    pos = kv_lens[seq_c] - q_len + (tok - query_start[seq_c])   # [T]

    qg = q.astype(jnp.float32).reshape(t, kvh, num_heads // kvh, d)
    logits = jnp.einsum("tkgd,tlkd->tkgl", qg, k_seq[seq_c]) * sm_scale
    mask = jnp.arange(kv_len_max)[None, :] <= pos[:, None]      # [T, L]
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("tkgl,tlkd->tkgd", probs, v_seq[seq_c]).reshape(t, num_heads, d)
    out = jnp.where(live[:, None, None], out, 0.0)
    return out.astype(q.dtype)
