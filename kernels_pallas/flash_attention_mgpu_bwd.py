"""Flash attention backward for Hopper GPUs, in Pallas Mosaic GPU: dk and dv (and optionally dq).

    p = exp2(scale2 * q k^T - lse),  dv = p^T do,  ds = p (do v^T - delta),
    dk = sm_scale ds^T q,  dq = sm_scale ds k,   delta = rowsum(out * do)

The backward of `flash_attention_mgpu` (same layout, masks and base-2 log-sum-exp).
`flash_attention_mgpu_dkv` is what `flash_attention` runs on Hopper GPUs: the four GEMMs of dk and
dv per (query tile, key tile) pair, beside the Triton dq kernel of `flash_attention.py` (which
computes delta first). `flash_attention_mgpu_bwd` also produces dq in the same kernel, five GEMMs
per pair instead of seven for the two kernels together, by adding each CTA's share of dq into an
f32 accumulator in global memory with TMA reduce-add (FlashAttention-3's scheme); it measures
slower (below).

One CTA owns `2 * 64` keys of one kv head and runs three warpgroups:
- a producer (few registers) loads the CTA's K and V once, then streams 64-row tiles of q and do
  (with their lse and delta rows) of every query head of the group into a ring of `num_stages`
  slots with TMA;
- two consumers, 64 keys each, compute s^T = k q^T and dp^T = v do^T on wgmma, p^T and ds^T in
  registers, and dv += p^T do and dk += ds^T q with p^T and ds^T as register operands. With dq
  (`flash_attention_mgpu_bwd`) they also put ds^T into shared memory and, after a rendezvous (both
  halves are there), each computes half of the tile's dq columns, `ds[64, 128] @ k[128, D/2]`,
  and reduce-adds it into global memory.

Causal CTAs skip the query tiles above the diagonal; only the tiles that straddle it pay for the
mask. Rows see key 0 (S >= T), so every lse is finite. Within a step the GEMMs are issued in
order and each is waited for only where its result is needed (the exp2 overlaps dp^T's GEMM, ds^T
dv's, the hand-over of ds^T dk's).

Measured on one H100 (causal B=4, T=S=4096, H=32, KVH=8, D=128, bf16; cuDNN's backward 3.13 ms in
the same runs):
- Triton dq kernel + `flash_attention_mgpu_dkv`: 3.56-3.68 ms, 0.85-0.88x cuDNN (the dk/dv kernel
  1.69 ms, the dq kernel 1.65 ms); both Triton kernels: 3.92-4.09 ms, 0.77-0.80x.
- `flash_attention_mgpu_bwd`: 4.04-4.25 ms, 0.74-0.76x
  (bench/results/attention_prefill_h100_bwd_mgpu.json). Its kernel takes 3.7-3.9 ms and the XLA passes around it
  0.31 ms (delta 0.10, zeroing the dq accumulator 0.08, scaling and casting it 0.13). Without
  dq's share (no dq GEMM, no reduce-add) the kernel takes 1.92 ms; the dq GEMM with its store to
  shared memory adds about 1.06 ms, and the TMA reduce-add another 0.75-0.9 ms. Swizzling the f32
  dq tile changed nothing, and moving the dq GEMM and reduce-add to the loading warpgroup (which
  then has too few registers) was slower (4.17-6.4 ms). The dq GEMM waits at the end of every
  step, so the next step's first GEMMs cannot be issued before it: pipelining it across steps is
  the next thing to try.

`interpret=True` runs the kernel in Pallas's GPU interpret mode on a CPU. The interpreter has no
TMA reduce-add and no register-operand wgmma: there each CTA writes its dq share into its own
slice of a `[S // 128, B, T, H, D]` output (the query tiles a CTA skips are masked out before the
sum), and p^T / ds^T reach the tensor cores through shared memory. Everything else (schedule,
ring, barriers, masks) is the code that runs on the GPU. (With fewer than about 8 XLA host
devices the interpreter's threads can starve each other on a 2-core machine; the tests run with
`--xla_force_host_platform_device_count=8`.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas._mgpu_common import rendezvous_of, stream_ring
from pallax.kernels_pallas.flash_attention_mgpu import _DTYPES, LOG2E

_BQ = 64  # query rows per pipeline step, and keys per consumer warpgroup (one wgmma M tile)
_BKV = 2 * _BQ  # keys per CTA
_HEAD_DIMS = (128,)  # dq's columns are split between the consumers at a 64-wide swizzle tile
_CONSUMER_REGS, _PRODUCER_REGS = 232, 40


@dataclasses.dataclass(frozen=True)
class BwdBlockSizes:
    """`num_stages` ring slots of (q, do, lse, delta) tiles of 64 query rows."""

    num_stages: int = 2

    def __post_init__(self):
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")


def smem_bytes(blocks: BwdBlockSizes, head_dim: int, itemsize: int = 2,
               with_dq: bool = True) -> int:
    """The q/do ring, the CTA's K and V, two ds^T buffers and the dq tiles (`with_dq`), and the
    barriers."""
    ring = blocks.num_stages * (2 * _BQ * head_dim * itemsize + 2 * _BQ * 4)
    kv = 2 * _BKV * head_dim * itemsize
    ds = 2 * _BKV * _BQ * itemsize if with_dq else 0
    dq = 2 * _BQ * (head_dim // 2) * 4 if with_dq else 0
    return ring + kv + ds + dq + 8 * (2 + 3 * blocks.num_stages)


def applies(q, k, *, causal: bool, has_segments: bool,
            blocks: BwdBlockSizes = BwdBlockSizes(), with_dq: bool = False) -> bool:
    """Whether `flash_attention_mgpu_dkv` (`with_dq`: `flash_attention_mgpu_bwd`) handles these
    inputs (else use the Triton kernels)."""
    _, T, _, D = q.shape
    S = k.shape[1]
    return (q.dtype in _DTYPES and D in _HEAD_DIMS and not has_segments
            and T % _BQ == 0 and S % _BKV == 0 and (S >= T or not causal)
            and smem_bytes(blocks, D, with_dq=with_dq) <= dispatch.MGPU_SMEM_BYTES)


def _kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *,
            causal: bool, sm_scale: float, blocks: BwdBlockSizes, in_place: bool, with_dq: bool):
    # q_ref, do_ref: [B, T, H, D]; k_ref, v_ref, dk_ref, dv_ref: [B, S, KVH, D];
    # lse_ref, delta_ref: [B, H, T] f32; dq_ref: [B, T, H, D] f32, zero on entry, reduce-added
    # (interpret mode: [S // 128, B, T, H, D], one slice per CTA's key tile, written)
    _, T, H, D = q_ref.shape
    S, KVH = k_ref.shape[1], k_ref.shape[2]
    group = H // KVH
    stages = blocks.num_stages
    half = D // 2  # dq columns per consumer
    dtype = q_ref.dtype
    offset = S - T  # causal: query i sees keys j <= i + offset
    n_qb = T // _BQ
    scale2 = sm_scale * LOG2E

    j = lax.axis_index("kv_tiles")
    kvh = lax.axis_index("kv_heads")
    b = lax.axis_index("batch")
    c0 = j * _BKV
    if causal:
        # Query tiles [first, n_qb) see some of keys [c0, c0 + 128); from `full` on, all of them.
        first = lax.div(jnp.maximum(c0 - offset, 0), jnp.int32(_BQ))
        full = jnp.clip(lax.div(jnp.maximum(c0 + _BKV - 1 - offset, 0) + _BQ - 1, jnp.int32(_BQ)),
                        first, n_qb)
    else:
        first = full = 0  # Python ints: a jnp constant captured by run_state does not lower
    # Pipeline steps: the masked (head, query tile) pairs of every head of the group, then the
    # unmasked ones; step i's pair is `tile_of(i)` for the producer and the consumers alike.
    n_masked = group * (full - first)
    total = n_masked + group * (n_qb - full)

    def tile_of(i):
        """(query head, query tile) of step i."""
        run = jnp.where(i < n_masked, jnp.maximum(full - first, 1), jnp.maximum(n_qb - full, 1))
        at = jnp.where(i < n_masked, i, i - n_masked)
        g, t = lax.div(at, run), lax.rem(at, run)
        return kvh * group + g, jnp.where(i < n_masked, first, full) + t

    def body(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, dq_smem, a_smem,
             kv_ready, q_ready, do_ready, free, turn):
        # k_smem, v_smem: [128, D]; q_smem, do_smem: [stages, 64, D]; lse_smem, delta_smem:
        # [stages, 64] f32; ds_smem: [2, 128, 64] (ds^T by step parity); dq_smem: [2, 64, D/2]
        # f32; a_smem: [2, 64, 64] (interpret mode only: register operands staged);
        # turn: rendezvous of the two consumers.
        wg = lax.axis_index("wg")
        rendezvous = functools.partial(rendezvous_of, turn)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
            own = pl.ds(wg * _BQ, _BQ)
            k_own, v_own = k_smem.at[own], v_smem.at[own]
            zeros = lambda shape: plgpu.layout_cast(  # noqa: E731
                jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

            def mma(acc, a, b_ref):  # acc + a @ b_ref, `a` [64, 64] in registers
                if in_place:
                    def f(acc_ref):
                        plgpu.wgmma(acc_ref, a, b_ref)
                    return pl.run_state(f)(plgpu.ACC.init(acc))
                a_smem.at[wg][...] = a
                plgpu.commit_smem()
                return acc + gemm(a_smem.at[wg], b_ref, acc.shape)

            def gemm(a_ref, b_ref, shape):  # a_ref @ b_ref, both in shared memory
                def f(acc_ref):
                    plgpu.wgmma(acc_ref, a_ref, b_ref)
                    return acc_ref[...]
                return pl.run_scoped(f, plgpu.ACC(shape, jnp.float32))

            plgpu.barrier_wait(kv_ready)

            def step(i, carry, masked: bool):
                dk, dv = carry  # [64, D] f32 each
                slot = lax.rem(i, jnp.int32(stages))
                h, qb = tile_of(i)
                q_t, do_t = q_smem.at[slot], do_smem.at[slot]
                if with_dq:  # [keys, queries] of both consumers
                    ds_t = ds_smem.at[lax.rem(i, jnp.int32(2))]
                cols = pl.ds(wg * half, half)

                def probs(s_t):  # p^T [keys, queries] from the scores s^T
                    lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    p_t = jnp.exp2(s_t * scale2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                    if masked:
                        keys = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0,
                                                      layout=plgpu.Layout.WGMMA)
                        qs = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1,
                                                    layout=plgpu.Layout.WGMMA)
                        p_t = jnp.where(qs + (qb * _BQ + offset) >= keys + (c0 + wg * _BQ),
                                        p_t, 0.0)
                    return p_t

                def dscores(p_t, dp_t):  # ds^T = p^T (dp^T - delta)
                    delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    return (p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))).astype(dtype)

                def share_ds(ds16):
                    ds_t.at[own][...] = ds16
                    plgpu.commit_smem()
                    rendezvous()  # both halves of ds^T are in shared memory
                    # (the other consumer reads this parity's buffer until its next rendezvous,
                    # and writes the other parity's only after it: two buffers suffice)

                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(do_ready.at[slot])
                if in_place:
                    # The GEMMs in flight in order, each waited for only where its result is
                    # needed: the exp2 runs while dp^T's GEMM does, ds^T while dv's, and (with
                    # dq) ds^T is shared while dk's runs.
                    def gemms(refs):
                        dk_ref, dv_ref, s_ref, dp_ref, *dq_ref = refs
                        plgpu.wgmma(s_ref, k_own, q_t.transpose((1, 0)))
                        plgpu.wgmma(dp_ref, v_own, do_t.transpose((1, 0)))
                        p_t = probs(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
                        plgpu.wgmma(dv_ref, p_t.astype(dtype), do_t)
                        ds16 = dscores(p_t, plgpu.wgmma_accumulator_load(dp_ref, wait_n=1))
                        plgpu.wgmma(dk_ref, ds16, q_t)
                        if with_dq:
                            share_ds(ds16)
                            plgpu.wgmma(dq_ref[0], ds_t.transpose((1, 0)), k_smem.at[:, cols])

                    square = zeros((_BQ, _BQ))
                    dq_init = (plgpu.ACC.init(zeros((_BQ, half))),) if with_dq else ()
                    dk, dv, _, _, *dq = pl.run_state(gemms)(
                        (plgpu.ACC.init(dk), plgpu.ACC.init(dv), plgpu.ACC.init(square),
                         plgpu.ACC.init(square), *dq_init))
                    dq = dq[0] if with_dq else None
                else:
                    p_t = probs(gemm(k_own, q_t.transpose((1, 0)), (_BQ, _BQ)))
                    dv = mma(dv, p_t.astype(dtype), do_t)
                    ds16 = dscores(p_t, gemm(v_own, do_t.transpose((1, 0)), (_BQ, _BQ)))
                    dk = mma(dk, ds16, q_t)
                    if with_dq:
                        share_ds(ds16)
                        dq = gemm(ds_t.transpose((1, 0)), k_smem.at[:, cols], (_BQ, half))
                plgpu.barrier_arrive(free.at[slot])  # every read of this slot is done
                if not with_dq:
                    return dk, dv
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last reduce read dq_smem
                dq_smem.at[wg][...] = dq
                plgpu.commit_smem()
                rows = pl.ds(qb * _BQ, _BQ)
                if in_place:
                    plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[b, rows, h, cols],
                                            reduction_op="add")
                else:
                    plgpu.copy_smem_to_gmem(dq_smem.at[wg], dq_ref.at[j, b, rows, h, cols])
                return dk, dv

            carry = (zeros((_BQ, D)), zeros((_BQ, D)))
            carry = lax.fori_loop(0, n_masked, functools.partial(step, masked=True), carry)
            dk, dv = lax.fori_loop(n_masked, total, functools.partial(step, masked=False), carry)
            if with_dq:
                rendezvous()  # the other consumer's last dq GEMM has read all of K
            k_own[...] = (dk * sm_scale).astype(dtype)
            v_own[...] = dv.astype(dtype)
            plgpu.commit_smem()
            keys = (b, pl.ds(c0 + wg * _BQ, _BQ), kvh)
            plgpu.copy_smem_to_gmem(k_own, dk_ref.at[keys])
            plgpu.copy_smem_to_gmem(v_own, dv_ref.at[keys])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
            keys = (b, pl.ds(c0, _BKV), kvh)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_ready)
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_ready)

            def load(i, slot):
                h, qb = tile_of(i)
                rows = pl.ds(qb * _BQ, _BQ)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot],
                                        do_ready.at[slot])

            stream_ring(load, total, stages, free)

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    pl.run_scoped(
        body,
        plgpu.SMEM((_BKV, D), dtype, transforms=swizzled),
        plgpu.SMEM((_BKV, D), dtype, transforms=swizzled),
        plgpu.SMEM((stages, _BQ, D), dtype, transforms=swizzled),
        plgpu.SMEM((stages, _BQ, D), dtype, transforms=swizzled),
        plgpu.SMEM((stages, _BQ), jnp.float32),
        plgpu.SMEM((stages, _BQ), jnp.float32),
        plgpu.SMEM((2, _BKV, _BQ), dtype, transforms=swizzled) if with_dq else None,
        # Swizzled like the bf16 tiles (32 f32 per 128-byte row), for conflict-free stores of
        # the wgmma layout (measured: no faster than unswizzled here).
        plgpu.SMEM((2, _BQ, half), jnp.float32, transforms=(
            plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))) if with_dq else None,
        None if in_place else plgpu.SMEM((2, _BQ, _BQ), dtype, transforms=swizzled),
        plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )


def _check(q, k, v, lse, do, *, causal, blocks, with_dq, name):
    B, T, H, D = q.shape
    KVH = k.shape[2]
    if not applies(q, k, causal=causal, has_segments=False, blocks=blocks, with_dq=with_dq):
        raise ValueError(
            f"{name} needs bf16/f16, head_dim in {_HEAD_DIMS}, T % {_BQ} == 0, S % {_BKV} == 0,"
            f" S >= T if causal and at most {dispatch.MGPU_SMEM_BYTES} bytes of shared memory"
            f" ({smem_bytes(blocks, D, with_dq=with_dq)} for {blocks}); got {q.dtype},"
            f" {q.shape=}, {k.shape=}, {causal=}")
    if (k.shape != v.shape or k.dtype != q.dtype or v.dtype != q.dtype or H % KVH
            or do.shape != q.shape or lse.shape != (B, H, T)):
        raise ValueError(f"shapes do not match: {q.shape=} {q.dtype}, {k.shape=} {k.dtype},"
                         f" {v.shape=} {v.dtype}, {do.shape=}, {lse.shape=}")


def _launch(body, out_type, n_kv, KVH, B, interpret):
    return plgpu.kernel(
        body,
        out_type=out_type,
        # Key tiles fastest: the CTAs in flight share their group's q and do in L2; the first
        # key tiles of a head (the most query tiles when causal) start first.
        grid=(n_kv, KVH, B),
        grid_names=("kv_tiles", "kv_heads", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=dispatch.mgpu_interpret(interpret),
    )


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "blocks", "interpret"))
def flash_attention_mgpu_dkv(q, k, v, lse, delta, do, *, causal: bool, sm_scale: float,
                             blocks: BwdBlockSizes = BwdBlockSizes(), interpret: bool = False):
    """dk, dv (dtypes of k, v) from q [B, T, H, D], k/v [B, S, KVH, D], the forward's base-2
    lse [B, H, T], delta = rowsum(out * do) [B, H, T] f32 and the output cotangent do
    [B, T, H, D]. Raises ValueError where `applies` is false."""
    _check(q, k, v, lse, do, causal=causal, blocks=blocks, with_dq=False,
           name="flash_attention_mgpu_dkv")
    B, T, H, D = q.shape
    if delta.shape != (B, H, T):
        raise ValueError(f"delta must be [B, H, T] = {(B, H, T)}; got {delta.shape}")
    kernel_fn = functools.partial(_kernel, causal=causal, sm_scale=sm_scale, blocks=blocks,
                                  in_place=not interpret, with_dq=False)
    body = lambda q, k, v, do, lse, delta, dk, dv, *scratch: kernel_fn(  # noqa: E731
        q, k, v, do, lse, delta, None, dk, dv, *scratch)
    dk_dv = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    return _launch(body, dk_dv, k.shape[1] // _BKV, k.shape[2], B, interpret)(
        q, k, v, do.astype(q.dtype), lse, delta.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "blocks", "interpret"))
def flash_attention_mgpu_bwd(q, k, v, out, lse, do, *, causal: bool, sm_scale: float,
                             blocks: BwdBlockSizes = BwdBlockSizes(), interpret: bool = False):
    """dq, dk, dv (dtypes of q, k, v) in one kernel, dq reduce-added in f32 (slower than the
    Triton dq kernel beside `flash_attention_mgpu_dkv`: see the module docstring), from q, k, v,
    the forward's out [B, T, H, D] and base-2 lse [B, H, T], and do [B, T, H, D]."""
    _check(q, k, v, lse, do, causal=causal, blocks=blocks, with_dq=True,
           name="flash_attention_mgpu_bwd")
    if out.shape != q.shape:
        raise ValueError(f"out must be shaped like q {q.shape}; got {out.shape}")
    B, T, H, D = q.shape
    S, KVH = k.shape[1], k.shape[2]
    delta = jnp.einsum("BTHD,BTHD->BHT", out.astype(jnp.float32), do.astype(jnp.float32))
    n_kv = S // _BKV
    dk_dv = (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype))
    kernel_fn = functools.partial(_kernel, causal=causal, sm_scale=sm_scale, blocks=blocks,
                                  in_place=not interpret, with_dq=True)
    if interpret:
        # No reduce-add in the interpreter: each key tile's dq share is an output slice, and the
        # query tiles it skipped (never written) are masked out below.
        body = lambda q, k, v, do, lse, delta, dk, dv, dq, *scratch: kernel_fn(  # noqa: E731
            q, k, v, do, lse, delta, dq, dk, dv, *scratch)
        out_type = (*dk_dv, jax.ShapeDtypeStruct((n_kv,) + q.shape, jnp.float32))
        dk, dv, parts = _launch(body, out_type, n_kv, KVH, B, interpret)(
            q, k, v, do.astype(q.dtype), lse, delta)
        first = jnp.maximum(jnp.arange(n_kv) * _BKV - (S - T), 0) // _BQ * _BQ if causal else 0
        seen = jnp.arange(T)[None, :] >= jnp.reshape(first, (-1, 1))  # [n_kv, T]
        dq = jnp.where(seen[:, None, :, None, None], parts, 0.0).sum(axis=0)
    else:
        dq_acc = jax.new_ref(jnp.zeros(q.shape, jnp.float32))
        dk, dv = _launch(kernel_fn, dk_dv, n_kv, KVH, B, interpret)(
            q, k, v, do.astype(q.dtype), lse, delta, dq_acc)
        dq = dq_acc[...]
    return (dq * sm_scale).astype(q.dtype), dk, dv
