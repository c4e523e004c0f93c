"""RoPE and the paged K/V write of a block of tokens, in one kernel.

Before the paged-attention kernel reads a step's keys, q and k are rotated and k and v are stored
in the page pool. As XLA ops that is three kernels a layer: q's rotation, k's rotation fused
into its scatter into the pool, and v's scatter; leaving all three out took a Qwen2.5-1.5B decode
step from 1.51 to 1.37 ms on an H200 (bench/FINDINGS.md). This kernel does the three in one launch:

    q_rot, k_pages, v_pages, k_scales, v_scales = rope_kv_write(
        qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, n_kv_heads=KVH)

- qkv [T, H + 2 KVH, D]: the tokens' projections as the fused q/k/v GEMM writes them (heads
  q | k | v), not yet rotated, so the GEMM's output is read where it lies (XLA would copy each of
  three slices into a buffer of its own);
- cos, sin [T, D / 2] float32: rotate-half RoPE (`pallax.model.layers.apply_rope`);
- slots [T] int32: the pool row `page * page_size + offset` of each token's k/v; a negative slot
  (padding) is not written;
- k_pages, v_pages [P, page_size, KVH, D]: a float pool, or int8 / float8_e4m3fn with
  k_scales, v_scales [P, page_size, KVH] float32, one scale per token and head (`quantize_kv`:
  symmetric, amax / 127 or amax / 448); all written in place (the pallas call aliases them to
  its outputs), so the pool a decode step carries is never copied.

Returns q rotated [T, H, D] in qkv's dtype, the pools and the scales (None for a float pool). The
rotation runs in float32 and each result is rounded to qkv's dtype, as `apply_rope` returns it,
before the pool's cast or quantization.

One program per token: it reads the token's H + 2 KVH rows of D elements as two halves (the
rotation's x1 and x2), writes q's rotated rows, and, for a live slot, k's rotated rows and v's
rows to `slot * KVH ...` of the pool seen as `[P * page_size * KVH, D]`, where one token's KVH
heads are contiguous (and their scales at `slot * KVH ...` of `[P * page_size * KVH]`). Head
counts need not be powers of two: the row vectors are padded to one by repeating the last head,
whose rows are then written twice with the same values. Two live tokens never share a slot (the
engine gives each its own), so the programs write disjoint rows.

On one H200 (batch-1 decode at context 1024, bench/results/rope_kv_write_h200.jsonl and
rope_kv_write_quantized_h200.jsonl) a call takes 1.8-2.3 us, and the step of Qwen2.5-1.5B goes
from 1.48 to 1.40 ms (bf16 KV) and from 1.73 to 1.44 ms (int8 KV), that of Llama-3-8B from 4.26
to 4.21 ms (bf16), from 2.24 to 2.15-2.16 ms (int4 weights) and from 4.52 to 4.23 ms (int8 KV).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas._launch import Launch

_QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


@dataclasses.dataclass(frozen=True)
class BlockSizes(Launch):
    """Launch parameters (one program per token; the tiles are the token's heads)."""

    num_warps: int = 4


def _qmax(dtype) -> float:
    return 127.0 if jnp.dtype(dtype) == jnp.int8 else 448.0


def _round_half_even(x):
    """jnp.round for Triton, which has no rounding op but floor: x [..] f32 of integer range."""
    r = jnp.floor(x)
    f = x - r
    odd = r - 2.0 * jnp.floor(0.5 * r) != 0.0
    return r + ((f > 0.5) | ((f == 0.5) & odd)).astype(x.dtype)


def quantize_rows(parts, dtype):
    """Inside a kernel: rows given as column parts [R, C_i] (the halves of a row, or the whole
    row) -> (the parts' values in `dtype`, scales [R]), as `quantize_kv` computes them."""
    x = [h.astype(jnp.float32) for h in parts]
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(h), axis=1) for h in x])
    scale = jnp.maximum(amax, 1e-8) / _qmax(dtype)
    q = [h / scale[:, None] for h in x]
    if jnp.dtype(dtype) == jnp.int8:
        q = [jnp.clip(_round_half_even(h), -127.0, 127.0) for h in q]
    return [h.astype(dtype) for h in q], scale


def _kernel(
    slots_ref,     # [T] int32
    qkv_ref,       # [T * (H + 2 KVH), D]
    cos_ref,       # [T, D / 2] f32
    sin_ref,       # [T, D / 2] f32
    *refs,         # the pool's buffers (k, v [P * page_size * KVH, D]; int8 / fp8: k_scales,
                   # v_scales [P * page_size * KVH] f32) as inputs, aliased to the same buffers
                   # as outputs (the inputs unused); q_ref [T * H, D] the first output
    n_heads: int, n_kv_heads: int,
):
    n_pool = (len(refs) - 1) // 2
    q_ref, k_ref, v_ref, *scale_refs = refs[n_pool:]
    t = pl.program_id(0)
    half = q_ref.shape[-1] // 2
    per_token = n_heads + 2 * n_kv_heads
    c = cos_ref[t, :][None, :]  # [1, D / 2]
    s = sin_ref[t, :][None, :]

    def heads(n):  # head indices, padded to a power of two (Triton's vectors) with the last head
        # again, whose rows are then written twice with the same values
        return jnp.minimum(jnp.arange(pl.next_power_of_2(n), dtype=jnp.int32), n - 1)

    def halves(rows):  # rows [R] of qkv as two [R, D / 2] f32 halves
        return (qkv_ref[rows, pl.ds(0, half)].astype(jnp.float32),
                qkv_ref[rows, pl.ds(half, half)].astype(jnp.float32))

    def rotated(first, n):  # heads first .. first + n - 1 of token t: x1 * c - x2 * s, x2 * c + x1 * s
        x1, x2 = halves(t * per_token + first + heads(n))
        return (x1 * c - x2 * s).astype(qkv_ref.dtype), (x2 * c + x1 * s).astype(qkv_ref.dtype)

    def store(ref, rows, lo, hi):  # the two halves of rows [R] of ref
        ref[rows, pl.ds(0, half)] = lo.astype(ref.dtype)
        ref[rows, pl.ds(half, half)] = hi.astype(ref.dtype)

    # Every load is issued before the first store and before the branch on the slot (with k and
    # v loaded inside the branch a call took 2.1-2.4 us on an H200, against 1.8-1.9).
    slot = slots_ref[t]
    q = rotated(0, n_heads)
    h = heads(n_kv_heads)
    k = rotated(n_heads, n_kv_heads)
    v = [x.astype(qkv_ref.dtype) for x in halves(t * per_token + n_heads + n_kv_heads + h)]
    store(q_ref, t * n_heads + heads(n_heads), *q)

    @pl.when(slot >= 0)
    def _():
        dst = slot * n_kv_heads + h
        for ref, x, scale_ref in zip((k_ref, v_ref), (k, v), scale_refs or (None, None)):
            if scale_ref is not None:
                x, scale = quantize_rows(x, ref.dtype)
                scale_ref[dst] = scale
            store(ref, dst, *x)


@functools.partial(jax.jit, static_argnames=("n_kv_heads", "block_sizes", "interpret"))
def _rope_kv_write_kernel(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, *,
                          n_kv_heads, block_sizes, interpret):
    t, per_token, d = qkv.shape
    n_heads = per_token - 2 * n_kv_heads
    rows = k_pages.shape[0] * k_pages.shape[1] * n_kv_heads
    pool = [k_pages.reshape(rows, d), v_pages.reshape(rows, d)]
    if k_scales is not None:
        pool += [k_scales.reshape(rows), v_scales.reshape(rows)]
    inputs = [slots.astype(jnp.int32), qkv.reshape(t * per_token, d), cos.astype(jnp.float32),
              sin.astype(jnp.float32), *pool]
    out_shape = [jax.ShapeDtypeStruct((t * n_heads, d), qkv.dtype),
                 *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in pool)]
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, n=len(x.shape): (0,) * n)  # noqa: E731
    q, *pool = pl.pallas_call(
        functools.partial(_kernel, n_heads=n_heads, n_kv_heads=n_kv_heads),
        grid=(t,), in_specs=[whole(x) for x in inputs], out_specs=[whole(x) for x in out_shape],
        out_shape=out_shape, input_output_aliases={4 + i: 1 + i for i in range(len(pool))},
        interpret=interpret, compiler_params=block_sizes.compiler_params(interpret),
        name="rope_kv_write",
    )(*inputs)
    k_pages, v_pages = pool[0].reshape(k_pages.shape), pool[1].reshape(v_pages.shape)
    if k_scales is not None:
        k_scales, v_scales = pool[2].reshape(k_scales.shape), pool[3].reshape(v_scales.shape)
    return q.reshape(t, n_heads, d), k_pages, v_pages, k_scales, v_scales


def supported(qkv_dtype, head_dim: int) -> bool:
    """Whether the compiled kernel takes these: float projections and a power-of-two head_dim
    >= 32 (Triton's tiles are powers of two)."""
    return jnp.issubdtype(qkv_dtype, jnp.floating) and head_dim >= 32 and not head_dim & (head_dim - 1)


def _check(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, n_kv_heads):
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [T, H + 2 KVH, D], got {qkv.shape=}")
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages and v_pages must be one shape [P, page_size, KVH, D] and dtype, "
                         f"got {k_pages.shape} {k_pages.dtype} and {v_pages.shape} {v_pages.dtype}")
    t, per_token, d = qkv.shape
    if k_pages.shape[2:] != (n_kv_heads, d):
        raise ValueError(f"the pool's heads {k_pages.shape[2:]} must be (n_kv_heads, head_dim) = "
                         f"{(n_kv_heads, d)}")
    n_heads = per_token - 2 * n_kv_heads
    if n_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"qkv has {per_token} heads: H + 2 * {n_kv_heads=} needs H >= 1 a "
                         "multiple of n_kv_heads")
    if d % 2:
        raise ValueError(f"head_dim={d} must be even for rotate-half RoPE")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (t, d // 2):
            raise ValueError(f"{name}.shape={x.shape} must be (T, D / 2) = {(t, d // 2)}")
    if slots.shape != (t,) or not jnp.issubdtype(slots.dtype, jnp.integer):
        raise ValueError(f"slots must be integer [T] = ({t},), got {slots.shape} {slots.dtype}")
    quantized = jnp.dtype(k_pages.dtype) in _QUANT_DTYPES
    if quantized:
        for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
            if x is None or x.shape != k_pages.shape[:3]:
                raise ValueError(f"{k_pages.dtype} pools need {name} [P, page_size, KVH] = "
                                 f"{k_pages.shape[:3]}, got {None if x is None else x.shape}")
    elif k_scales is not None or v_scales is not None:
        raise ValueError(f"scales given for a {k_pages.dtype} pool")
    elif not jnp.issubdtype(k_pages.dtype, jnp.floating):
        raise ValueError(f"pools are float, int8 or float8_e4m3fn, got {k_pages.dtype}")


def rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, k_scales=None, v_scales=None, *,
                  n_kv_heads: int, block_sizes=None, interpret: bool = False):
    """Rotate q and k of a token block and store k, v in the page pool (module docstring):
    returns q rotated [T, H, D], k_pages, v_pages, k_scales, v_scales. Honours
    `dispatch.resolve()`; `interpret=True` forces the kernel through the interpreter."""
    _check(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, n_kv_heads)
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return rope_kv_write_reference(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales,
                                       n_kv_heads=n_kv_heads)
    if mode == "pallas" and not supported(qkv.dtype, qkv.shape[-1]):
        raise ValueError(f"the GPU kernel takes float qkv and a power-of-two head_dim >= 32, got "
                         f"{qkv.dtype}, head_dim={qkv.shape[-1]}")
    return _rope_kv_write_kernel(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales,
                                 n_kv_heads=n_kv_heads, block_sizes=block_sizes or BlockSizes(),
                                 interpret=mode == "interpret")


def quantize_kv(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Per token, per head symmetric quantization: x [T, KVH, D] -> values, scales [T, KVH]."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.maximum(amax, 1e-8) / _qmax(dtype)
    q = x32 / scale[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        q = jnp.clip(jnp.round(q), -127, 127)
    return q.astype(dtype), scale


@functools.partial(jax.jit, static_argnames=("n_kv_heads",))
def rope_kv_write_reference(qkv, cos, sin, slots, k_pages, v_pages, k_scales=None, v_scales=None, *,
                            n_kv_heads):
    """Pure jnp: split the heads, rotate q and k in float32, quantize k and v for an int8 / fp8
    pool, scatter them by slot."""
    t, per_token, d = qkv.shape
    n_heads = per_token - 2 * n_kv_heads
    x = qkv.astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(qkv.dtype)
    q, k = rot[:, :n_heads], rot[:, n_heads: n_heads + n_kv_heads]
    v = qkv[:, n_heads + n_kv_heads:]
    rows = k_pages.shape[0] * k_pages.shape[1]
    at = jnp.where(slots < 0, rows, slots)  # out of range: dropped

    def write(pages, scales, x):  # x [T, KVH, D]
        if scales is not None:
            x, sc = quantize_kv(x, pages.dtype)
            scales = scales.reshape(rows, n_kv_heads).at[at].set(sc, mode="drop").reshape(scales.shape)
        flat = pages.reshape(rows, n_kv_heads, d).at[at].set(x.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape), scales

    (k_pages, k_scales), (v_pages, v_scales) = write(k_pages, k_scales, k), write(v_pages, v_scales, v)
    return q, k_pages, v_pages, k_scales, v_scales
