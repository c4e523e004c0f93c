"""A decode batch's RoPE, K/V write and paged attention in one kernel (Pallas, Triton backend).

In a decode step every sequence has one new token. Its layer then runs the rotation of q and k
and the store of k and v into the page pool (`rope_kv_write.py`), and the attention over the
pool (`paged_attention.py`): two kernels, the second waiting on the first only for the one
token's own K/V row. Here the attention programs take the projections as the fused q/k/v GEMM
wrote them and rotate their query heads themselves; the one program whose kv range holds the
token's position attends to its rotated key and its value from registers, and stores them in
the pool:

    out, k_pages, v_pages, k_scales, v_scales = decode_attention(
        qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k_pages, v_pages, k_scales, v_scales,
        n_kv_heads=KVH)

- qkv [T, H + 2 KVH, D] (q | k | v heads, before RoPE), cos, sin [T, D / 2] float32, slots [T]
  int32: as `rope_kv_write` takes them;
- page_table [T, max_pages], kv_lens [T], num_seqs: row t is sequence t (T == S), its one token
  at position kv_lens[t] - 1, whose pool row the page table maps to slots[t] (the engine's
  invariant); rows t >= num_seqs are padding: zeros out, nothing written;
- the pool (float, or int8 / float8_e4m3fn with per-token-per-head scales) is written in place.

Returns the attention output [T, H, D] in qkv's dtype and the pool's buffers: the same values as
`rope_kv_write` followed by `paged_attention` (`decode_attention_reference` is that
composition), the rotation bit for bit (rotate-half as one full-width multiply-add of each row
with its partner column, the sign in the sine), the new row quantized as `quantize_kv` does and
attended dequantized, as if read back.

The grid and the split combine are `paged_attention`'s for a decode batch (`block_q = 1`):
`(T, KVH, kv_splits)` programs, each the G query heads of one kv head over one slice of the
sequence's kv blocks (`_attend_blocks`, the pool's rows before the token's position), the
program holding the token's block starting from its own key and value (`_one_key`), and
`_combine` after them when the range is split. The engine's pure-decode steps run it
(`PagedCache.decode`); batches with prefill chunks or drafts keep the two kernels, since their
tokens read each other's K/V.

On one H200 (Llama-3-8B heads, batch 1 at context 1024; `python3 -m pallax.bench.decode_attention`,
bench/results/decode_attention_h200.jsonl, and kernel-only timings of throwaway variants in
decode_attention_kernel_h200.jsonl) the outputs and pools are bit for bit the two kernels'
(bf16, int8 and fp8 pools). A call takes 6.9 us where the two took 5.8 + 1.5 us (the combine,
1.8 us, after either). In the engine's int4 step (with the new key merged after the blocks,
0.1 us slower alone than this form) it took 238 us a step, 7.4 us a layer, against the two
kernels' 190 + 63 us: the step 2.081-2.084 ms against 2.093-2.094, 33 kernels fewer; the bf16
step 4.132-4.135 against 4.135-4.142. What the fusion saves is a launch; the new key costs
nearly as much:
- the rotation, the loads of q's partner columns and the store: 0.2 us over the attention
  alone (6.0 us without the new key);
- the new row selected into each [block_kv, D] K and V tile inside the loop: 7.9 us;
- merged after the blocks (elementwise, as here, but after the loop): 7.0 us;
- as a 16-key block through the tensor cores (one live key, the state in the loop's layouts):
  in the step 8.0 us a call, no better than the two kernels (2.102 ms against 2.091);
- the kernel adding the int4 q/k/v product's partial sums itself (each program gathering its
  heads' slots, as the residual-norm kernel does for o and down), which drops XLA's 1.7 us sum
  fusion: 13.2 us a call, the step 2.222 ms. Tried again once the pieces' places were
  arithmetic (no table to load first; bench/results/decode_attention_qkv_pieces_h200.jsonl, the
  same tokens, the GPU check bit for bit): 8.56 us a call against 7.06 plus the sum's 1.42, the
  step 1.996 ms against 1.989 (306 kernels against 338). Each program gathers every piece of
  its q rows (16, the group repeated) and their partner columns as scalar f32 loads, which
  costs what the sum fusion does. Not kept.

A program's blocks start where the sequence's length puts them, so their page numbers used to
be loaded only after the length: three loads in a row (length, pages, K/V) before any math.
With one block a split, the common case at a modest context, split s takes block s, so each
program loads that block's pages beside the length and the loop uses them where the guess
holds. On one H200 (bench/results/attention_loads_ab.jsonl, the Llama-3-8B int4 step, this form
against the previous one in one process, the same tokens): 7.09 us a call against 7.24, the step
1.997-2.004 ms against 2.005-2.009. Loading the combine's log-sum-exps and outputs together
(one round trip where the split count fits one chunk) gave nothing (1.83 us a call against
1.75) and was not kept.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas import paged_attention as pa
from pallax.kernels_pallas import rope_kv_write as rk
from pallax.kernels_pallas.paged_attention import BlockSizes, paged_attention_reference


def _kernel(
    kv_lens_ref,     # [T] int32
    num_seqs_ref,    # [1] int32
    slots_ref,       # [T] int32: pool row (page * page_size + offset) of each token's K/V
    page_table_ref,  # [T * max_pages] int32 (flat)
    qkv_ref,         # [T * (H + 2 KVH) * D] (flat)
    cos_ref,         # [T * D / 2] f32 (flat)
    sin_ref,         # [T * D / 2] f32 (flat)
    k_ref,           # [P * page_size * KVH, D]
    v_ref,           # [P * page_size * KVH, D]
    *rest,           # k_scales, v_scales [P * page_size * KVH] f32 (quantized only); outputs: the
                     # pool's buffers (aliased to the inputs), o [rows, D], lse [rows] (split)
    num_heads: int, num_kv_heads: int, num_pages: int, page_size: int, max_pages: int,
    block_kv: int, rows: int, kv_splits: int, scale: float, quantized: bool, compute_dtype,
):
    k_scales_ref, v_scales_ref = rest[:2] if quantized else (None, None)
    outs = rest[2:] if quantized else rest
    n_pool = 4 if quantized else 2
    pool_out, o_ref = outs[:n_pool], outs[n_pool]
    lse_ref = outs[n_pool + 1] if len(outs) > n_pool + 1 else None
    t, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group = num_heads // num_kv_heads
    per_token = num_heads + 2 * num_kv_heads
    d = k_ref.shape[-1]
    half = d // 2

    # Where this program's blocks start depends on the sequence's length, which is loaded first.
    # With one block a split (what a decode step at a modest context has), split s takes block
    # s: its pages are loaded now, beside the length, and the loop does not wait on them.
    guess = (split, pa._block_pages(page_table_ref, t, split, page_size=page_size, max_pages=max_pages,
                                    block_kv=block_kv))
    live = t < num_seqs_ref[0]
    kv_len = jnp.where(live, kv_lens_ref[t], 0)
    pos = kv_len - 1                                   # the token's position (-1: padding)
    n_blocks = (kv_len + (block_kv - 1)) // block_kv
    per_split = (n_blocks + (kv_splits - 1)) // kv_splits
    blk_lo = split * per_split
    blk_hi = jnp.minimum(blk_lo + per_split, n_blocks)

    # Rotate-half over whole rows: column c pairs with (c + D/2) % D, and the sine's sign is - in
    # the first half, so x1 * cos - x2 * sin and x2 * cos + x1 * sin, rounded as apply_rope does.
    col = jnp.arange(d, dtype=jnp.int32)
    partner = (col + half) % d
    cos = cos_ref[t * half + col % half][None, :]     # [1, D]
    sin = (sin_ref[t * half + col % half] * jnp.where(col < half, -1.0, 1.0))[None, :]

    def row_at(heads, cols):  # heads [R] of token t -> [R, D] f32
        return qkv_ref[(t * per_token + heads)[:, None] * d + cols[None, :]].astype(jnp.float32)

    def rotated(heads):
        return (row_at(heads, col) * cos + row_at(heads, partner) * sin).astype(qkv_ref.dtype)

    r = jnp.arange(rows, dtype=jnp.int32)
    q = rotated(h * group + r % group).astype(compute_dtype)         # [rows, D]; rows >= G repeat
    one = jnp.zeros((1,), jnp.int32)
    k_new = rotated(num_heads + h + one)                             # [1, D]
    v_new = row_at(num_heads + num_kv_heads + h + one, col).astype(qkv_ref.dtype)
    if quantized:
        (k_new,), k_scale = rk.quantize_rows([k_new], pool_out[0].dtype)   # [1, D], [1]
        (v_new,), v_scale = rk.quantize_rows([v_new], pool_out[1].dtype)
    else:
        k_new, v_new = k_new.astype(pool_out[0].dtype), v_new.astype(pool_out[1].dtype)
        k_scale = v_scale = None

    # The program whose slice holds the token's block starts its online softmax from the token's
    # own key and value, then takes the pool's rows before the token's position (its own row is
    # not written yet).
    new_blk = pos // block_kv
    holds_new = (blk_lo <= new_blk) & (new_blk < blk_hi)  # padding rows hold no block
    o, l, m = pa._attend_blocks(
        q, pos - 1 + jnp.zeros((rows,), jnp.int32), blk_lo, blk_hi, page_table_ref, k_ref, v_ref,
        k_scales_ref, v_scales_ref, seq=t, h=h, num_kv_heads=num_kv_heads, num_pages=num_pages,
        page_size=page_size, max_pages=max_pages, block_kv=block_kv, scale=scale,
        compute_dtype=compute_dtype, init=_one_key(q, k_new, v_new, k_scale, v_scale, holds_new, scale=scale),
        known=guess)
    pa._store(o, l, m, o_ref, lse_ref)

    # That program also stores the token's K/V; no other program reads that row.
    slot = slots_ref[t]

    @pl.when((slot >= 0) & holds_new)
    def _():
        dst = slot * num_kv_heads + h
        pool_out[0][pl.ds(dst, 1), :] = k_new
        pool_out[1][pl.ds(dst, 1), :] = v_new
        if quantized:
            pool_out[2][pl.ds(dst, 1)] = k_scale
            pool_out[3][pl.ds(dst, 1)] = v_scale


def _one_key(q, k, v, k_scale, v_scale, take, *, scale: float):
    """The online softmax's state (o, l, m) of q [rows, D] over one key and value k, v [1, D] (in
    the pool's dtype; their scales [1], None for a float pool) where `take`, else over none: the
    score as an elementwise product and sum, the value as it is (module docstring: the other
    forms tried)."""
    s = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1) * scale   # [rows]
    if k_scale is not None:
        s = s * k_scale
    v = v.astype(jnp.float32) if v_scale is None else v.astype(jnp.float32) * v_scale[:, None]
    zeros = jnp.zeros_like(q, jnp.float32)                                          # [rows, D]
    return (jnp.where(take, v + zeros, zeros), jnp.where(take, jnp.ones_like(s), jnp.zeros_like(s)),
            jnp.where(take, s, pa._MASK))


@functools.partial(jax.jit, static_argnames=("n_kv_heads", "sm_scale", "block_sizes", "interpret"))
def _decode_attention_kernel(qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k_pages, v_pages,
                             k_scales, v_scales, *, n_kv_heads, sm_scale, block_sizes, interpret):
    t, per_token, d = qkv.shape
    num_heads = per_token - 2 * n_kv_heads
    group = num_heads // n_kv_heads
    num_pages, page_size = k_pages.shape[:2]
    max_pages = page_table.shape[1]
    _, block_kv, splits = block_sizes.resolve(
        num_tokens=t, num_seqs=t, group=group, num_kv_heads=n_kv_heads, max_kv=max_pages * page_size,
        kv_itemsize=jnp.dtype(k_pages.dtype).itemsize)
    rows = max(16, pa._pow2(group))
    quantized = k_scales is not None

    n_rows = num_pages * page_size * n_kv_heads
    pool = [k_pages.reshape(n_rows, d), v_pages.reshape(n_rows, d)]
    if quantized:
        pool += [k_scales.reshape(n_rows).astype(jnp.float32), v_scales.reshape(n_rows).astype(jnp.float32)]
    inputs = [kv_lens.astype(jnp.int32), num_seqs.reshape(1).astype(jnp.int32), slots.astype(jnp.int32),
              page_table.reshape(-1).astype(jnp.int32), qkv.reshape(-1),
              cos.reshape(-1).astype(jnp.float32), sin.reshape(-1).astype(jnp.float32), *pool]
    whole = lambda x: pl.BlockSpec(x.shape, lambda w, h, k, n=x.ndim: (0,) * n)  # noqa: E731
    attn_shape, attn_specs = pa._outputs(splits, t, n_kv_heads, rows, d, qkv.dtype)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in pool] + attn_shape
    out_specs = [whole(x) for x in pool] + attn_specs
    kernel = functools.partial(
        _kernel, num_heads=num_heads, num_kv_heads=n_kv_heads, num_pages=num_pages,
        page_size=page_size, max_pages=max_pages, block_kv=block_kv, rows=rows, kv_splits=splits,
        scale=sm_scale * pa._LOG2E, quantized=quantized, compute_dtype=qkv.dtype)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                               num_stages=block_sizes.num_stages)
    first_pool = len(inputs) - len(pool)
    outs = pl.pallas_call(
        kernel, grid=(t, n_kv_heads, splits), in_specs=[whole(x) for x in inputs], out_specs=out_specs,
        out_shape=out_shape, input_output_aliases={first_pool + i: i for i in range(len(pool))},
        interpret=interpret, compiler_params=compiler_params,
        name=f"decode_attention_bkv{block_kv}_s{splits}",
    )(*inputs)
    pool, attn = outs[:len(pool)], outs[len(pool):]
    if splits == 1:
        out = attn[0][:, :, :group]                                         # [T, KVH, G, D]
    else:
        out = pa._combine(*attn, real_rows=group, out_dtype=qkv.dtype, interpret=interpret)
    k_pages, v_pages = pool[0].reshape(k_pages.shape), pool[1].reshape(v_pages.shape)
    if quantized:
        k_scales, v_scales = pool[2].reshape(k_scales.shape), pool[3].reshape(v_scales.shape)
    return out.reshape(t, num_heads, d), k_pages, v_pages, k_scales, v_scales


def supported(qkv_dtype, head_dim: int) -> bool:
    """Whether the compiled kernel takes these: float projections and a power-of-two head_dim
    >= 32 (as `rope_kv_write`)."""
    return rk.supported(qkv_dtype, head_dim)


def _check(qkv, cos, sin, slots, page_table, kv_lens, k_pages, v_pages, k_scales, v_scales, n_kv_heads):
    rk._check(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, n_kv_heads)
    t = qkv.shape[0]
    if page_table.ndim != 2 or page_table.shape[0] != t:
        raise ValueError(f"page_table must be [T, max_pages] with T = {t} (one sequence a token), "
                         f"got {page_table.shape}")
    if kv_lens.shape != (t,):
        raise ValueError(f"kv_lens.shape={kv_lens.shape} must be (T,) = ({t},)")
    for name, x in (("page_table", page_table), ("kv_lens", kv_lens)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be integer, got {x.dtype}")


def decode_attention(qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k_pages, v_pages,
                     k_scales=None, v_scales=None, *, n_kv_heads: int, sm_scale=None,
                     block_sizes: BlockSizes | None = None, interpret: bool = False):
    """Rotate, store and attend for a decode batch (module docstring): returns the attention
    output [T, H, D] and k_pages, v_pages, k_scales, v_scales. num_seqs: int32 scalar or None
    (every row live). Honours `dispatch.resolve()`; `interpret=True` forces the kernel through
    the interpreter."""
    _check(qkv, cos, sin, slots, page_table, kv_lens, k_pages, v_pages, k_scales, v_scales, n_kv_heads)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(qkv.shape[-1])
    num_seqs = jnp.asarray(qkv.shape[0] if num_seqs is None else num_seqs, jnp.int32)
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return decode_attention_reference(qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k_pages,
                                          v_pages, k_scales, v_scales, n_kv_heads=n_kv_heads,
                                          sm_scale=sm_scale)
    if mode == "pallas":
        if not supported(qkv.dtype, qkv.shape[-1]):
            raise ValueError(f"the GPU kernel takes float qkv and a power-of-two head_dim >= 32, got "
                             f"{qkv.dtype}, head_dim={qkv.shape[-1]}")
        if k_pages.shape[0] * k_pages.shape[1] * n_kv_heads >= 2**31:
            raise ValueError(f"page pool {k_pages.shape} has >= 2**31 (page, slot, head) rows")
    return _decode_attention_kernel(qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k_pages,
                                    v_pages, k_scales, v_scales, n_kv_heads=n_kv_heads,
                                    sm_scale=float(sm_scale), block_sizes=block_sizes or BlockSizes(),
                                    interpret=mode == "interpret")


@functools.partial(jax.jit, static_argnames=("n_kv_heads", "sm_scale"))
def decode_attention_reference(qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k_pages, v_pages,
                               k_scales=None, v_scales=None, *, n_kv_heads, sm_scale=None):
    """Pure jnp: `rope_kv_write_reference`, then `paged_attention_reference` with one query token
    a sequence."""
    q, k_pages, v_pages, k_scales, v_scales = rk.rope_kv_write_reference(
        qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, n_kv_heads=n_kv_heads)
    t = qkv.shape[0]
    query_start = jnp.minimum(jnp.arange(t + 1, dtype=jnp.int32), num_seqs)
    out = paged_attention_reference(q, k_pages, v_pages, page_table, query_start, kv_lens, num_seqs,
                                    sm_scale=sm_scale, k_scales=k_scales, v_scales=v_scales)
    return out, k_pages, v_pages, k_scales, v_scales
