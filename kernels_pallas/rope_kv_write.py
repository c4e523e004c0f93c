"""RoPE and the paged K/V write of a block of tokens, in one kernel.

Before the paged-attention kernel reads a step's keys, q and k are rotated and k and v are stored
in the page pool. As XLA ops that is three kernels a layer: q's rotation, k's rotation fused
into its scatter into the pool, and v's scatter; leaving all three out took a Qwen2.5-1.5B decode
step from 1.51 to 1.37 ms on an H200 (README). This kernel does the three in one launch:

    q_rot, k_pages, v_pages = rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, n_kv_heads=KVH)

- qkv [T, H + 2 KVH, D]: the tokens' projections as the fused q/k/v GEMM writes them (heads
  q | k | v), not yet rotated, so the GEMM's output is read where it lies (XLA would copy each of
  three slices into a buffer of its own);
- cos, sin [T, D / 2] float32: rotate-half RoPE (`pallax.model.layers.apply_rope`);
- slots [T] int32: the pool row `page * page_size + offset` of each token's k/v; a negative slot
  (padding) is not written;
- k_pages, v_pages [P, page_size, KVH, D] (any float dtype): written in place (the pallas call
  aliases them to its outputs), so the pool a decode step carries is never copied.

Returns q rotated [T, H, D] in qkv's dtype and the two pools. The rotation runs in float32 and
each result is rounded once, as `apply_rope` followed by the pool's cast does.

One program per token: it reads the token's H + 2 KVH rows of D elements as two halves (the
rotation's x1 and x2), writes q's rotated rows, and, for a live slot, k's rotated rows and v's
rows to `slot * KVH ...` of the pool seen as `[P * page_size * KVH, D]`, where one token's KVH
heads are contiguous. Head counts need not be powers of two: the row vectors are padded to one
by repeating the last head, whose rows are then written twice with the same values. Two live tokens never share a slot (the engine gives each
its own), so the programs write disjoint rows.

int8 / fp8 pools (with per-token scales) are not taken: their writes stay XLA's.

On one H200 (batch-1 decode at context 1024, bench/results/rope_kv_write_h200.jsonl) a call
takes 1.8-1.9 us, and the step of Qwen2.5-1.5B goes from 1.48 to 1.40 ms, that of Llama-3-8B
from 4.26 to 4.21 ms (bf16) and from 2.24 to 2.15-2.16 ms (int4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallax.kernels_pallas import dispatch

_QUANT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Launch parameters (one program per token; the tiles are the token's heads)."""

    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"{self.num_warps=} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be >= 1")


def _kernel(
    slots_ref,     # [T] int32
    qkv_ref,       # [T * (H + 2 KVH), D]
    cos_ref,       # [T, D / 2] f32
    sin_ref,       # [T, D / 2] f32
    k_in_ref,      # [P * page_size * KVH, D]: the buffer of k_ref (aliased), unused
    v_in_ref,      # [P * page_size * KVH, D]: the buffer of v_ref (aliased), unused
    q_ref,         # [T * H, D]
    k_ref,         # [P * page_size * KVH, D]
    v_ref,         # [P * page_size * KVH, D]
    *, n_heads: int, n_kv_heads: int,
):
    del k_in_ref, v_in_ref
    t = pl.program_id(0)
    half = q_ref.shape[-1] // 2
    per_token = n_heads + 2 * n_kv_heads
    c = cos_ref[t, :][None, :]  # [1, D / 2]
    s = sin_ref[t, :][None, :]

    def heads(n):  # [pow2(n)] head indices: Triton's vectors are powers of two, so the padding
        # repeats the last head, and its rows are written twice with the same values
        return jnp.minimum(jnp.arange(_pow2(n), dtype=jnp.int32), n - 1)

    def rotated(first, n):  # heads first .. first + n - 1 of token t: x1 * c - x2 * s, x2 * c + x1 * s
        rows = t * per_token + first + heads(n)
        x1 = qkv_ref[rows, pl.ds(0, half)].astype(jnp.float32)
        x2 = qkv_ref[rows, pl.ds(half, half)].astype(jnp.float32)
        # Rounded to qkv's dtype, as apply_rope returns it, before any cast to the pool's.
        return (x1 * c - x2 * s).astype(qkv_ref.dtype), (x2 * c + x1 * s).astype(qkv_ref.dtype)

    def store(ref, rows, lo, hi):  # the two halves of rows [R] of ref
        ref[rows, pl.ds(0, half)] = lo.astype(ref.dtype)
        ref[rows, pl.ds(half, half)] = hi.astype(ref.dtype)

    # Every load is issued before the first store and before the branch on the slot (with k and
    # v loaded inside the branch a call took 2.1-2.4 us on an H200, against 1.8-1.9).
    slot = slots_ref[t]
    q = rotated(0, n_heads)
    k = rotated(n_heads, n_kv_heads)
    h = heads(n_kv_heads)
    v = qkv_ref[t * per_token + n_heads + n_kv_heads + h, :]
    store(q_ref, t * n_heads + heads(n_heads), *q)

    @pl.when(slot >= 0)
    def _():
        dst = slot * n_kv_heads + h
        store(k_ref, dst, *k)
        v_ref[dst, :] = v.astype(v_ref.dtype)


@functools.partial(jax.jit, static_argnames=("n_kv_heads", "block_sizes", "interpret"))
def _rope_kv_write_kernel(qkv, cos, sin, slots, k_pages, v_pages, *, n_kv_heads, block_sizes,
                          interpret):
    t, per_token, d = qkv.shape
    n_heads = per_token - 2 * n_kv_heads
    rows = k_pages.shape[0] * k_pages.shape[1] * n_kv_heads
    inputs = [slots.astype(jnp.int32), qkv.reshape(t * per_token, d), cos.astype(jnp.float32),
              sin.astype(jnp.float32), k_pages.reshape(rows, d), v_pages.reshape(rows, d)]
    out_shape = [jax.ShapeDtypeStruct((t * n_heads, d), qkv.dtype),
                 jax.ShapeDtypeStruct((rows, d), k_pages.dtype),
                 jax.ShapeDtypeStruct((rows, d), v_pages.dtype)]
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, n=len(x.shape): (0,) * n)  # noqa: E731
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                               num_stages=block_sizes.num_stages)
    q, k, v = pl.pallas_call(
        functools.partial(_kernel, n_heads=n_heads, n_kv_heads=n_kv_heads),
        grid=(t,), in_specs=[whole(x) for x in inputs], out_specs=[whole(x) for x in out_shape],
        out_shape=out_shape, input_output_aliases={4: 1, 5: 2},
        interpret=interpret, compiler_params=compiler_params, name="rope_kv_write",
    )(*inputs)
    return q.reshape(t, n_heads, d), k.reshape(k_pages.shape), v.reshape(v_pages.shape)


def supported(qkv_dtype, pool_dtype, head_dim: int) -> bool:
    """Whether the compiled kernel takes these: a float pool (int8 / fp8 pools also write scales,
    which stay XLA's) and a power-of-two head_dim >= 32 (Triton's tiles are powers of two)."""
    return (jnp.issubdtype(qkv_dtype, jnp.floating) and jnp.issubdtype(pool_dtype, jnp.floating)
            and jnp.dtype(pool_dtype) not in _QUANT_DTYPES
            and head_dim >= 32 and not head_dim & (head_dim - 1))


def _check(qkv, cos, sin, slots, k_pages, v_pages, n_kv_heads):
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [T, H + 2 KVH, D], got {qkv.shape=}")
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages and v_pages must be one shape [P, page_size, KVH, D], got "
                         f"{k_pages.shape=} {v_pages.shape=}")
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
    if jnp.dtype(k_pages.dtype) in _QUANT_DTYPES or jnp.dtype(v_pages.dtype) in _QUANT_DTYPES:
        raise ValueError(f"{k_pages.dtype} pools carry scales: rope_kv_write takes float pools")


def rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, *, n_kv_heads: int, block_sizes=None,
                  interpret: bool = False):
    """Rotate q and k of a token block and store k, v in the page pool (module docstring):
    returns q rotated [T, H, D], k_pages, v_pages. Honours `dispatch.resolve()`;
    `interpret=True` forces the kernel through the interpreter."""
    _check(qkv, cos, sin, slots, k_pages, v_pages, n_kv_heads)
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return rope_kv_write_reference(qkv, cos, sin, slots, k_pages, v_pages, n_kv_heads=n_kv_heads)
    if mode == "pallas" and not supported(qkv.dtype, k_pages.dtype, qkv.shape[-1]):
        raise ValueError(f"the GPU kernel takes float qkv and pools and a power-of-two head_dim "
                         f">= 32, got {qkv.dtype}, {k_pages.dtype}, head_dim={qkv.shape[-1]}")
    return _rope_kv_write_kernel(qkv, cos, sin, slots, k_pages, v_pages, n_kv_heads=n_kv_heads,
                                 block_sizes=block_sizes or BlockSizes(),
                                 interpret=mode == "interpret")


@functools.partial(jax.jit, static_argnames=("n_kv_heads",))
def rope_kv_write_reference(qkv, cos, sin, slots, k_pages, v_pages, *, n_kv_heads):
    """Pure jnp: split the heads, rotate q and k in float32, scatter k and v by slot."""
    t, per_token, d = qkv.shape
    n_heads = per_token - 2 * n_kv_heads
    x = qkv.astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)  # [T, H + 2 KVH, D]
    q, k = rot[:, :n_heads], rot[:, n_heads: n_heads + n_kv_heads]
    v = qkv[:, n_heads + n_kv_heads:]
    rows = k_pages.shape[0] * k_pages.shape[1]
    at = jnp.where(slots < 0, rows, slots)  # out of range: dropped

    def write(pages, x):
        flat = pages.reshape(rows, n_kv_heads, d).at[at].set(x.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return q.astype(qkv.dtype), write(k_pages, k.astype(qkv.dtype)), write(v_pages, v)
