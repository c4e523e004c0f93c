"""Flash attention (forward and backward) for GPUs, in Pallas (Triton backend).

    out = softmax(sm_scale * q k^T + mask) v

Layout is that of `jax.nn.dot_product_attention`: q `[B, T, H, D]`, k and v `[B, S, KVH, D]`, out
`[B, T, H, D]`. Grouped-query attention: query head `h` reads kv head `h // (H // KVH)`; K/V are never
repeated in memory (the forward and dq kernels index the kv head from the query head; the dk/dv
kernel owns one kv block of one kv head and walks every query head of its group).

Masks, all optional and combined:
- causal, aligned at the *ends* of the two sequences: query `i` sees key `j` iff `j <= i + S - T`.
  For T == S this is the usual lower triangle (and what `jax.nn.dot_product_attention(is_causal=True)`
  does). For T < S it is the chunked-prefill / decode convention (the T queries are the last T
  positions of the S keys); note that `jax.nn.dot_product_attention` aligns the *starts* instead
  (`tril(ones(T, S))`), so the two differ when T != S.
- segment ids (packed sequences): query and key attend only if their ids are equal. Either one
  `[B, T]` int32 array (T == S) or a pair `(q_segment_ids [B, T], kv_segment_ids [B, S])`.
A query row that sees no key at all returns zeros (and gets zero gradients).

Algorithm (FlashAttention-2): each program holds one query block of one head, streams the key
blocks it can see, and keeps the running max `m` and sum `l` of the softmax in base 2 (scores are
pre-multiplied by `sm_scale * log2(e)` so the exponentials are `exp2`). Causal programs stop at the
diagonal, and only the blocks that straddle a mask boundary pay for the mask (the loop is split
into an unmasked and a masked part). The forward saves the log-sum-exp (base 2, `[B, H, T]`); the
backward recomputes probabilities from it: one kernel for dq (per query block) and one for dk/dv
(per key block, accumulating over the whole query-head group, so no atomics and no reduction over
repeated heads). Sequence lengths that are not multiples of the block sizes are padded (and the
padding masked); head dims that are not a power of two (or < 16) are zero-padded.

On Hopper GPUs the forward is `flash_attention_mgpu` (Mosaic GPU: TMA, wgmma, ping-pong
warpgroups) wherever it applies (`BlockSizes.fwd_impl`); this Triton forward covers the rest.
The backward's dk/dv kernel is likewise `flash_attention_mgpu_bwd.flash_attention_mgpu_dkv` on
Hopper GPUs wherever it applies (`BlockSizes.bwd_impl`). The dq kernel here runs first either way
and also computes `delta = rowsum(out * dout)` for the dk/dv kernel.

Measured on one H100 (bench/results/attention_prefill_h100*.json; B=4, T=S=4096, H=32, KVH=8,
D=128, bf16, causal): forward 488-505 TFLOP/s = 1.02-1.04x cuDNN (Mosaic GPU; the Triton forward
here 396-408 TFLOP/s = 0.83x); backward 374-386 TFLOP/s = 0.85-0.88x cuDNN with the Hopper dk/dv
kernel (1.69 ms) beside the Triton dq kernel (1.65 ms), against 343-351 TFLOP/s = 0.78-0.80x with
both Triton kernels (7 matmuls per tile pair against the 5 counted: dq is a separate kernel, no
atomics).

`flash_attention` honours `dispatch.resolve()`: the compiled kernel on GPU, the pure-jnp
`flash_attention_reference` elsewhere, the kernel through the Pallas interpreter when asked
(`interpret=True` or mode "interpret").
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallax.kernels_pallas import dispatch, flash_attention_mgpu, flash_attention_mgpu_bwd

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite start of the running max
_WARPS = (1, 2, 4, 8, 16)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters.

    Forward: a program holds `block_q` queries and streams keys `block_k` at a time.
    dq kernel: `block_q_dq` queries, keys `block_k_dq` at a time.
    dk/dv kernel: `block_k_dkv` keys, queries `block_q_dkv` at a time.
    All block sizes are powers of two >= 16; they are clamped to the (padded) sequence lengths.
    """

    block_q: int = 128
    block_k: int = 128  # best of the H100 sweep in bench/results/attention_prefill_h100.json
    num_warps: int = 8
    num_stages: int = 3
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    # The dk/dv kernel's launch parameters where they differ from the dq kernel's (None: the same).
    num_warps_dkv: int | None = None
    num_stages_dkv: int | None = None
    # Forward implementation. "mgpu": the Hopper kernel of `flash_attention_mgpu` (wgmma, TMA,
    # warp-specialized ping-pong; tiles `mgpu`), used where it applies (bf16/f16, head_dim 64 or
    # 128, no segment ids, T % 128 == 0, S % mgpu.block_kv == 0, S >= T if causal), in interpret
    # mode too; "triton": the Pallas Triton forward above; "auto": "mgpu" on a Hopper GPU where it
    # applies, else "triton".
    fwd_impl: str = "auto"
    mgpu: flash_attention_mgpu.BlockSizes = flash_attention_mgpu.BlockSizes()
    # Backward implementation, chosen the same way: "mgpu" computes dk/dv with the Hopper kernel
    # `flash_attention_mgpu_bwd.flash_attention_mgpu_dkv` (tiles `mgpu_bwd`) beside the Triton dq
    # kernel, where it applies (bf16/f16, head_dim 128, no segment ids, T % 64 == 0,
    # S % 128 == 0, S >= T if causal); "triton" both Triton kernels. Either consumes either
    # forward's residuals (both save the same base-2 log-sum-exp).
    bwd_impl: str = "auto"
    mgpu_bwd: flash_attention_mgpu_bwd.BwdBlockSizes = flash_attention_mgpu_bwd.BwdBlockSizes()

    def __post_init__(self):
        for name in ("fwd_impl", "bwd_impl"):
            if getattr(self, name) not in ("auto", "triton", "mgpu"):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} must be 'auto', 'triton' or 'mgpu'")
        for name in ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
            b = getattr(self, name)
            if not isinstance(b, int) or not _is_pow2(b) or b < 16:
                raise ValueError(f"{name}={b!r} must be a power of two >= 16")
        for name in ("num_warps", "num_warps_bwd", "num_warps_dkv"):
            w = getattr(self, name)
            if w is None and name == "num_warps_dkv":
                continue
            if w not in _WARPS:
                raise ValueError(f"{name}={w!r} must be one of {_WARPS}")
        for name in ("num_stages", "num_stages_bwd", "num_stages_dkv"):
            s = getattr(self, name)
            if s is None and name == "num_stages_dkv":
                continue
            if not isinstance(s, int) or s < 1:
                raise ValueError(f"{name}={s!r} must be a positive int")

    def clamped(self, t: int, s: int) -> "BlockSizes":
        """Blocks no larger than the sequences (rounded up to a power of two, at least 16)."""
        tq, tk = max(16, _next_pow2(t)), max(16, _next_pow2(s))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, tq), block_k=min(self.block_k, tk),
            block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, tk),
            block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, tk),
        )


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels close over (hashable: a jit static argument)."""

    causal: bool
    sm_scale: float
    blocks: BlockSizes
    interpret: bool
    t: int  # query length before padding
    s: int  # key length before padding
    d: int  # head dim before padding
    mgpu_fwd: bool = False  # forward through flash_attention_mgpu (no padding: shapes qualify)
    mgpu_bwd: bool = False  # dk/dv through flash_attention_mgpu_dkv (likewise)

    @property
    def t_pad(self) -> int:
        b = self.blocks
        return _round_up(self.t, max(b.block_q, b.block_q_dq, b.block_q_dkv))

    @property
    def s_pad(self) -> int:
        b = self.blocks
        return _round_up(self.s, max(b.block_k, b.block_k_dq, b.block_k_dkv))

    @property
    def d_pad(self) -> int:
        return max(16, _next_pow2(self.d))

    @property
    def offset(self) -> int:
        return self.s - self.t  # causal: query i sees keys j <= i + offset


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _cdiv(x, m: int):
    return lax.div(x + (m - 1), m)


# ----------------------------------------------------------------------------------------------
# Kernels


def _mask(q_pos, k_pos, q_seg, kv_seg, *, causal, offset, kv_len, check_kv):
    """Boolean [bq, bk] (or broadcastable) mask of allowed (query, key) pairs."""
    mask = None
    if causal:
        mask = q_pos[:, None] + offset >= k_pos[None, :]
    if check_kv:
        kv_ok = k_pos[None, :] < kv_len
        mask = kv_ok if mask is None else mask & kv_ok
    if q_seg is not None:
        same = q_seg[:, None] == kv_seg[None, :]
        mask = same if mask is None else mask & same
    return mask


def _kv_range(r0, st: _Static, block_q: int, block_k: int, has_seg: bool):
    """Key blocks [0, n_full) need no mask, [n_full, n_end) do, for queries [r0, r0 + block_q)."""
    n_kv = st.s_pad // block_k
    if st.causal:
        n_end = jnp.minimum(_cdiv(jnp.maximum(r0 + block_q + st.offset, 0), block_k), n_kv)
        n_full = jnp.minimum(lax.div(jnp.maximum(r0 + st.offset + 1, 0), block_k), n_end)
    else:
        n_end, n_full = n_kv, st.s // block_k
    if has_seg:
        n_full = 0
    return n_full, n_end


def _fwd_kernel(
    q_ref,  # [block_q, Dp]
    k_ref,  # [Sp, Dp]
    v_ref,  # [Sp, Dp]
    q_seg_ref,  # [block_q] int32, or None
    kv_seg_ref,  # [Sp] int32, or None
    o_ref,  # [block_q, Dp]
    lse_ref,  # [block_q] f32, base-2 log-sum-exp
    *,
    st: _Static,
    num_q_blocks: int,
):
    block_q, block_k = st.blocks.block_q, st.blocks.block_k
    # Heaviest (last) causal query blocks first: better tail balance.
    r0 = (num_q_blocks - 1 - pl.program_id(1)) * block_q
    has_seg = q_seg_ref is not None
    allow_tf32 = q_ref.dtype != jnp.float32
    scale2 = st.sm_scale * LOG2E

    q = q_ref[...]
    q_pos = r0 + jnp.arange(block_q)
    q_seg = q_seg_ref[...] if has_seg else None
    check_kv = (not st.causal) and st.s != st.s_pad

    def body(j, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        qk = plgpu.dot(q, k, trans_b=True, allow_tf32=allow_tf32)  # [bq, bk], unscaled
        if masked:
            kv_seg = kv_seg_ref[pl.ds(start, block_k)] if has_seg else None
            mask = _mask(q_pos, start + jnp.arange(block_k), q_seg, kv_seg, causal=st.causal,
                         offset=st.offset, kv_len=st.s, check_kv=check_kv)
            if mask is not None:
                # -inf, not a finite mask value: with m starting finite, exp2 gives exactly 0,
                # so a fully masked block adds nothing without a second select on p.
                qk = jnp.where(mask, qk, -jnp.inf)
        # m is kept in the scaled (base-2) domain so p is one FMA and one exp2 per score.
        m_new = jnp.maximum(m, jnp.max(qk, axis=1) * scale2)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(qk * scale2 - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, block_k), :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=allow_tf32)
        return acc, m_new, l

    n_full, n_end = _kv_range(r0, st, block_q, block_k, has_seg)
    carry = (
        jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _dq_kernel(
    q_ref,  # [block_q_dq, Dp]
    k_ref,  # [Sp, Dp]
    v_ref,  # [Sp, Dp]
    do_ref,  # [block_q_dq, Dp]
    o_ref,  # [block_q_dq, Dp], the forward's output
    lse_ref,  # [block_q_dq] f32
    q_seg_ref,  # [block_q_dq] int32, or None
    kv_seg_ref,  # [Sp] int32, or None
    dq_ref,  # [block_q_dq, Dp]
    delta_ref,  # [block_q_dq] f32 out: rowsum(out * dout), for the dk/dv kernel
    *,
    st: _Static,
    num_q_blocks: int,
):
    block_q, block_k = st.blocks.block_q_dq, st.blocks.block_k_dq
    r0 = (num_q_blocks - 1 - pl.program_id(1)) * block_q
    has_seg = q_seg_ref is not None
    allow_tf32 = q_ref.dtype != jnp.float32
    scale2 = st.sm_scale * LOG2E

    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[...]
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    delta_ref[...] = delta
    q_pos = r0 + jnp.arange(block_q)
    q_seg = q_seg_ref[...] if has_seg else None
    check_kv = (not st.causal) and st.s != st.s_pad

    def body(j, dq, masked):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        qk = plgpu.dot(q, k, trans_b=True, allow_tf32=allow_tf32)
        if masked:
            kv_seg = kv_seg_ref[pl.ds(start, block_k)] if has_seg else None
            mask = _mask(q_pos, start + jnp.arange(block_k), q_seg, kv_seg, causal=st.causal,
                         offset=st.offset, kv_len=st.s, check_kv=check_kv)
            if mask is not None:
                qk = jnp.where(mask, qk, -jnp.inf)
        p = jnp.exp2(qk * scale2 - lse[:, None])  # rows that saw no key have lse = +inf: p = 0
        dp = plgpu.dot(do, v, trans_b=True, allow_tf32=allow_tf32)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, allow_tf32=allow_tf32)

    n_full, n_end = _kv_range(r0, st, block_q, block_k, has_seg)
    dq = jnp.zeros((block_q, q_ref.shape[-1]), jnp.float32)
    dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * st.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,  # [Tp, G, Dp]: every query head of this kv head's group
    k_ref,  # [block_k_dkv, Dp]
    v_ref,  # [block_k_dkv, Dp]
    do_ref,  # [Tp, G, Dp]
    lse_ref,  # [G, Tp] f32
    delta_ref,  # [G, Tp] f32
    q_seg_ref,  # [Tp] int32, or None
    kv_seg_ref,  # [block_k_dkv] int32, or None
    dk_ref,  # [block_k_dkv, Dp]
    dv_ref,  # [block_k_dkv, Dp]
    *,
    st: _Static,
    group: int,
):
    block_q, block_k = st.blocks.block_q_dkv, st.blocks.block_k_dkv
    c0 = pl.program_id(1) * block_k
    has_seg = q_seg_ref is not None
    allow_tf32 = q_ref.dtype != jnp.float32
    scale2 = st.sm_scale * LOG2E
    num_q_blocks = st.t_pad // block_q

    k, v = k_ref[...], v_ref[...]
    k_pos = c0 + jnp.arange(block_k)
    kv_seg = kv_seg_ref[...] if has_seg else None
    # Padded keys (j >= S) only produce dk/dv rows that are sliced away, so no key mask here.

    def body(i, carry, g, masked):
        dk, dv = carry
        r = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(r, block_q), g, :]
        do = do_ref[pl.ds(r, block_q), g, :]
        lse = lse_ref[g, pl.ds(r, block_q)]
        delta = delta_ref[g, pl.ds(r, block_q)]
        qk = plgpu.dot(q, k, trans_b=True, allow_tf32=allow_tf32)  # [bq, bk]
        if masked:
            q_seg = q_seg_ref[pl.ds(r, block_q)] if has_seg else None
            mask = _mask(r + jnp.arange(block_q), k_pos, q_seg, kv_seg, causal=st.causal,
                         offset=st.offset, kv_len=st.s, check_kv=False)
            if mask is not None:
                qk = jnp.where(mask, qk, -jnp.inf)
        p = jnp.exp2(qk * scale2 - lse[:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, allow_tf32=allow_tf32)
        dp = plgpu.dot(do, v, trans_b=True, allow_tf32=allow_tf32)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, allow_tf32=allow_tf32)
        return dk, dv

    if st.causal:
        # Queries i >= c0 - offset see some key of this block; i >= c0 + bk - 1 - offset see all.
        first = jnp.minimum(lax.div(jnp.maximum(c0 - st.offset, 0), block_q), num_q_blocks)
        first_full = jnp.minimum(
            _cdiv(jnp.maximum(c0 + block_k - 1 - st.offset, 0), block_q), num_q_blocks)
    else:
        first, first_full = 0, 0
    if has_seg:
        first_full = num_q_blocks

    def head(g, carry):
        carry = lax.fori_loop(first, first_full, functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(first_full, num_q_blocks,
                             functools.partial(body, g=g, masked=False), carry)

    zeros = jnp.zeros((block_k, k_ref.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * st.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (padded shapes: q [B, Tp, H, Dp], k/v [B, Sp, KVH, Dp])


def _pad(x, axis: int, size: int):
    if x is None or x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_all(st: _Static, q, k, v, q_seg, kv_seg):
    q = _pad(_pad(q, 1, st.t_pad), 3, st.d_pad)
    k = _pad(_pad(k, 1, st.s_pad), 3, st.d_pad)
    v = _pad(_pad(v, 1, st.s_pad), 3, st.d_pad)
    return q, k, v, _pad(q_seg, 1, st.t_pad), _pad(kv_seg, 1, st.s_pad)


def _params(warps: int, stages: int):
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


@functools.partial(jax.jit, static_argnames=("st",))
def _forward(q, k, v, q_seg, kv_seg, st: _Static):
    """Padded out [B, Tp, H, Dp] and lse [B, H, Tp] (base 2)."""
    if st.mgpu_fwd:
        return flash_attention_mgpu.flash_attention_mgpu(
            q, k, v, causal=st.causal, sm_scale=st.sm_scale, blocks=st.blocks.mgpu,
            interpret=st.interpret)
    B, T, H, D = q.shape
    KVH = k.shape[2]
    group = H // KVH
    q, k, v, q_seg, kv_seg = _pad_all(st, q, k, v, q_seg, kv_seg)
    Tp, Sp, Dp = st.t_pad, st.s_pad, st.d_pad
    bq = st.blocks.block_q
    nq = Tp // bq
    rev = lambda i: nq - 1 - i  # noqa: E731  (matches the kernel's reversed block order)
    has_seg = q_seg is not None
    # Grid (heads, query blocks, batch): heads of one group run side by side on the same K/V tiles.
    in_specs = [
        pl.BlockSpec((None, bq, None, Dp), lambda h, i, b: (b, rev(i), h, 0)),
        pl.BlockSpec((None, Sp, None, Dp), lambda h, i, b: (b, 0, h // group, 0)),
        pl.BlockSpec((None, Sp, None, Dp), lambda h, i, b: (b, 0, h // group, 0)),
        pl.BlockSpec((None, bq), lambda h, i, b: (b, rev(i))) if has_seg else None,
        pl.BlockSpec((None, Sp), lambda h, i, b: (b, 0)) if has_seg else None,
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, Dp), lambda h, i, b: (b, rev(i), h, 0)),
        pl.BlockSpec((None, None, bq), lambda h, i, b: (b, h, rev(i))),
    ]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, num_q_blocks=nq),
        grid=(H, nq, B),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Dp), q.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=_params(st.blocks.num_warps, st.blocks.num_stages),
        interpret=st.interpret,
        name="flash_attention_fwd",
    )(q, k, v, q_seg, kv_seg)
    return out, lse


@functools.partial(jax.jit, static_argnames=("st",))
def _backward(q, k, v, q_seg, kv_seg, out, lse, do, st: _Static):
    """dq, dk, dv (unpadded) from padded out [B, Tp, H, Dp] and lse [B, H, Tp]."""
    B, T, H, D = q.shape
    S, KVH = k.shape[1], k.shape[2]
    group = H // KVH
    q, k, v, q_seg, kv_seg = _pad_all(st, q, k, v, q_seg, kv_seg)
    do = _pad(_pad(do, 1, st.t_pad), 3, st.d_pad)  # zero rows: padded queries add nothing
    Tp, Sp, Dp = st.t_pad, st.s_pad, st.d_pad
    has_seg = q_seg is not None
    b = st.blocks
    params = _params(b.num_warps_bwd, b.num_stages_bwd)
    params_dkv = _params(b.num_warps_dkv or b.num_warps_bwd, b.num_stages_dkv or b.num_stages_bwd)

    bq = b.block_q_dq
    nq = Tp // bq
    rev = lambda i: nq - 1 - i  # noqa: E731
    dq, delta = pl.pallas_call(
        functools.partial(_dq_kernel, st=st, num_q_blocks=nq),
        grid=(H, nq, B),
        in_specs=[
            pl.BlockSpec((None, bq, None, Dp), lambda h, i, b: (b, rev(i), h, 0)),
            pl.BlockSpec((None, Sp, None, Dp), lambda h, i, b: (b, 0, h // group, 0)),
            pl.BlockSpec((None, Sp, None, Dp), lambda h, i, b: (b, 0, h // group, 0)),
            pl.BlockSpec((None, bq, None, Dp), lambda h, i, b: (b, rev(i), h, 0)),
            pl.BlockSpec((None, bq, None, Dp), lambda h, i, b: (b, rev(i), h, 0)),
            pl.BlockSpec((None, None, bq), lambda h, i, b: (b, h, rev(i))),
            pl.BlockSpec((None, bq), lambda h, i, b: (b, rev(i))) if has_seg else None,
            pl.BlockSpec((None, Sp), lambda h, i, b: (b, 0)) if has_seg else None,
        ],
        out_specs=[pl.BlockSpec((None, bq, None, Dp), lambda h, i, b: (b, rev(i), h, 0)),
                   pl.BlockSpec((None, None, bq), lambda h, i, b: (b, h, rev(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=params,
        interpret=st.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, out, lse, q_seg, kv_seg)

    if st.mgpu_bwd:  # no padding anywhere (the shapes qualify)
        dk, dv = flash_attention_mgpu_bwd.flash_attention_mgpu_dkv(
            q, k, v, lse, delta, do, causal=st.causal, sm_scale=st.sm_scale,
            blocks=b.mgpu_bwd, interpret=st.interpret)
        return dq, dk, dv

    bk = b.block_k_dkv
    nk = Sp // bk
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, group=group),
        grid=(KVH, nk, B),
        in_specs=[
            pl.BlockSpec((None, Tp, group, Dp), lambda h, j, b: (b, 0, h, 0)),
            pl.BlockSpec((None, bk, None, Dp), lambda h, j, b: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, Dp), lambda h, j, b: (b, j, h, 0)),
            pl.BlockSpec((None, Tp, group, Dp), lambda h, j, b: (b, 0, h, 0)),
            pl.BlockSpec((None, group, Tp), lambda h, j, b: (b, h, 0)),
            pl.BlockSpec((None, group, Tp), lambda h, j, b: (b, h, 0)),
            pl.BlockSpec((None, Tp), lambda h, j, b: (b, 0)) if has_seg else None,
            pl.BlockSpec((None, bk), lambda h, j, b: (b, j)) if has_seg else None,
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, Dp), lambda h, j, b: (b, j, h, 0)),
            pl.BlockSpec((None, bk, None, Dp), lambda h, j, b: (b, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params_dkv,
        interpret=st.interpret,
        name="flash_attention_dkv",
    )(q, k, v, do, lse, delta, q_seg, kv_seg)
    return dq[:, :T, :, :D], dk[:, :S, :, :D], dv[:, :S, :, :D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, st: _Static):
    out, _ = _forward(q, k, v, q_seg, kv_seg, st)
    return out[:, : st.t, :, : st.d]


def _flash_fwd(q, k, v, q_seg, kv_seg, st: _Static):
    out, lse = _forward(q, k, v, q_seg, kv_seg, st)
    return out[:, : st.t, :, : st.d], (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(st: _Static, res, do):
    q, k, v, q_seg, kv_seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_seg, kv_seg, out, lse, do, st)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point


def _check(q, k, v, segment_ids):
    """Validated (B, T, H, D, S, KVH, q_seg, kv_seg); ValueError naming the problem otherwise."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, T, H, D] / [B, S, KVH, D]; got {q.shape=}, {k.shape=}, {v.shape=}")
    B, T, H, D = q.shape
    _, S, KVH, _ = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape=} vs {v.shape=}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v batch and head_dim must match q: {q.shape=}, {k.shape=}")
    if KVH == 0 or H % KVH:
        raise ValueError(f"num_heads={H} must be a multiple of num_kv_heads={KVH}")
    if T == 0 or S == 0:
        raise ValueError(f"empty sequence: {T=}, {S=}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"dtype {q.dtype} is not one of bfloat16, float16, float32")
    q_seg = kv_seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be one [B, T] array or a pair (q_seg, kv_seg)")
            q_seg, kv_seg = segment_ids
        else:
            if T != S:
                raise ValueError(
                    f"a single segment_ids array needs T == S (got {T=}, {S=}); pass (q_seg, kv_seg)")
            q_seg = kv_seg = segment_ids
        if q_seg.shape != (B, T):
            raise ValueError(f"q segment ids shape {q_seg.shape} != (B, T) = {(B, T)}")
        if kv_seg.shape != (B, S):
            raise ValueError(f"kv segment ids shape {kv_seg.shape} != (B, S) = {(B, S)}")
        q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    return B, T, H, D, S, KVH, q_seg, kv_seg


_F32_BLOCKS = BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=2)


def _use_mgpu(q, k, has_seg: bool, st: _Static, mode: str, direction: str = "fwd") -> bool:
    """Whether the forward (or backward) runs the Hopper kernel."""
    if direction == "fwd":
        impl, applies = st.blocks.fwd_impl, flash_attention_mgpu.applies(
            q, k, causal=st.causal, has_segments=has_seg, blocks=st.blocks.mgpu)
    else:
        impl, applies = st.blocks.bwd_impl, flash_attention_mgpu_bwd.applies(
            q, k, causal=st.causal, has_segments=has_seg, blocks=st.blocks.mgpu_bwd)
    if impl == "triton" or (st.t, st.s, st.d) != (st.t_pad, st.s_pad, st.d_pad) or not applies:
        return False
    if mode == "interpret":
        return impl == "mgpu"  # "auto" interprets the Triton kernel
    return dispatch.on_hopper()


def flash_attention(q, k, v, *, causal: bool = True, sm_scale: float | None = None,
                    segment_ids=None, block_sizes: BlockSizes | None = None,
                    interpret: bool = False):
    """Attention over q [B, T, H, D], k/v [B, S, KVH, D] -> [B, T, H, D] (dtype of q).

    `sm_scale` defaults to 1/sqrt(D). `segment_ids`: None, [B, T] (T == S), or (q_seg, kv_seg).
    Differentiable in q, k, v (Pallas backward kernels). See the module docstring for the masks.
    """
    B, T, H, D, S, KVH, q_seg, kv_seg = _check(q, k, v, segment_ids)
    sm_scale = float(1.0 / math.sqrt(D) if sm_scale is None else sm_scale)
    if not sm_scale > 0:
        raise ValueError(f"{sm_scale=} must be > 0")
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return flash_attention_reference(
            q, k, v, causal=causal, sm_scale=sm_scale,
            segment_ids=None if q_seg is None else (q_seg, kv_seg))
    if block_sizes is None:
        # f32 tiles are twice the bytes: 128x128 blocks with 3 stages overflow shared memory.
        block_sizes = _F32_BLOCKS if q.dtype == jnp.float32 and D > 64 else BlockSizes()
    blocks = block_sizes.clamped(T, S)
    st = _Static(causal=bool(causal), sm_scale=sm_scale, blocks=blocks,
                 interpret=(mode == "interpret"), t=T, s=S, d=D)
    has_seg = q_seg is not None
    st = dataclasses.replace(st, mgpu_fwd=_use_mgpu(q, k, has_seg, st, mode),
                             mgpu_bwd=_use_mgpu(q, k, has_seg, st, mode, "bwd"))
    return _flash(q, k, v, q_seg, kv_seg, st)


# ----------------------------------------------------------------------------------------------
# Reference


def flash_attention_reference(q, k, v, *, causal: bool = True, sm_scale: float | None = None,
                              segment_ids=None):
    """Pure-jnp attention in f32 with the same masks (rows that see no key give zeros)."""
    B, T, H, D = q.shape
    S, KVH = k.shape[1], k.shape[2]
    G = H // KVH
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qf = q.astype(jnp.float32).reshape(B, T, KVH, G, D)
    s = jnp.einsum("BTKGD,BSKD->BKGTS", qf, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * sm_scale
    mask = jnp.ones((1, 1, 1, T, S), bool)
    if causal:
        mask &= (jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :])[None, None, None]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, (tuple, list)) else (
            segment_ids, segment_ids)
        mask &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None, None]
    s = jnp.where(mask, s, -jnp.inf)
    s_max = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - jnp.where(jnp.isfinite(s_max), s_max, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    w = p / jnp.where(l == 0.0, 1.0, l)
    o = jnp.einsum("BKGTS,BSKD->BTKGD", w, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, H, D).astype(q.dtype)
