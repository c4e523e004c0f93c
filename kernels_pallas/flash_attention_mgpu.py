"""Flash attention forward for Hopper GPUs, in Pallas Mosaic GPU (wgmma, TMA, warp specialization).

    out = softmax(sm_scale * q k^T + causal mask) v,   lse = log2-sum-exp2 of the scaled scores

The fast path of `flash_attention.py`'s forward (same layout, masks and base-2 log-sum-exp, so its
Triton backward consumes this forward's residuals unchanged). It applies to bf16/f16 inputs with
head_dim 64 or 128, no segment ids, T a multiple of `2 * block_q`, S of `block_kv`, and S >= T when
causal (every query sees at least key 0); `flash_attention` falls back to the Triton kernel
otherwise.

One CTA owns `2 * block_q` query rows of one head and runs three warpgroups:
- a producer (few registers) streams K and V tiles of the head's kv head into a ring of
  `num_stages` shared-memory slots with TMA; each slot has a "ready" barrier (TMA arrival) and a
  "free" barrier that both consumers arrive on once they have read it;
- two consumers, `block_q` rows each, run the FlashAttention-2 loop on wgmma: S = Q K^T into an
  accumulator, online softmax in registers (scores are scaled by `sm_scale * log2(e)` inside the
  exp2's FMA), O += P V. The two consumers take turns on the tensor cores through a two-party
  rendezvous barrier (FlashAttention-3's "ping-pong"): while one runs its softmax, the other's
  GEMMs run, so the exp2 throughput and the matmuls overlap.

Causal CTAs are launched heaviest first (the last query tiles see the most keys), which shortens
the tail of the grid. Only the kv tiles that straddle the diagonal pay for the mask; a consumer that
needs fewer tiles than its CTA's producer loads still releases the remaining slots (and keeps the
rendezvous count even) in an epilogue loop.

Measured on one H100 (bench/results/attention_prefill_h100*.json): causal B=4, T=S=4096, H=32,
KVH=8, D=128, bf16: 488-505 TFLOP/s, 1.02-1.04x cuDNN in the same runs (block_kv 128, 2 stages;
block_kv 64 0.91-0.95x); other causal shapes 1.01-1.04x; non-causal 0.96x.

`interpret=True` runs the kernel in Pallas's GPU interpret mode on a CPU. There the O accumulation
is done as `acc + (P V)` with P staged through shared memory, instead of a register-operand wgmma
into the accumulator in place (the interpreter supports neither); everything else (indexing,
barriers, masks, the pipeline and the epilogue) is the code that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas._mgpu_common import rendezvous_of, stream_ring

LOG2E = math.log2(math.e)
_DTYPES = (jnp.bfloat16, jnp.float16)
# Registers per thread: the consumers take what the producer gives up (2 x 128 x 232 + 128 x 40
# fits the 64K register file).
_CONSUMER_REGS, _PRODUCER_REGS = 232, 40
_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Each consumer warpgroup holds `block_q` query rows (a CTA holds two); K/V arrive
    `block_kv` keys at a time into a ring of `num_stages` slots."""

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q} must be 64 (one wgmma M tile per warpgroup)")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv={self.block_kv} must be a multiple of 64 in [64, 256]")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")


def smem_bytes(blocks: BlockSizes, head_dim: int, itemsize: int = 2) -> int:
    """Shared memory of one CTA: Q/O tiles, the K/V ring, the lse rows and the barriers."""
    tiles = (2 * blocks.block_q + 2 * blocks.num_stages * blocks.block_kv) * head_dim * itemsize
    return tiles + 2 * blocks.block_q * 4 + 8 * (3 + 4 * blocks.num_stages)


def applies(q, k, *, causal: bool, has_segments: bool, blocks: BlockSizes = BlockSizes()) -> bool:
    """Whether `flash_attention_mgpu` handles these inputs (else use the Triton kernel)."""
    _, T, _, D = q.shape
    S = k.shape[1]
    return (q.dtype in _DTYPES and D in _HEAD_DIMS and not has_segments
            and T % (2 * blocks.block_q) == 0 and S % blocks.block_kv == 0
            and (S >= T or not causal) and smem_bytes(blocks, D) <= dispatch.MGPU_SMEM_BYTES)


def _kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, causal: bool, sm_scale: float,
            blocks: BlockSizes, in_place: bool):
    # q_ref, o_ref: [B, T, H, D]; k_ref, v_ref: [B, S, KVH, D]; lse_ref: [B, H, T] f32 (GMEM)
    _, T, H, D = q_ref.shape
    S, KVH = k_ref.shape[1], k_ref.shape[2]
    bq, bkv, stages = blocks.block_q, blocks.block_kv, blocks.num_stages
    dtype = q_ref.dtype
    offset = S - T  # causal: query i sees keys j <= i + offset
    n_kv = S // bkv
    n_tiles = T // (2 * bq)
    scale2 = sm_scale * LOG2E

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    kvh = lax.div(h, jnp.int32(H // KVH))
    tile = (n_tiles - 1 - lax.axis_index("q_tiles")) if causal else lax.axis_index("q_tiles")
    tile_base = tile * (2 * bq)

    def visible_steps(row_end):  # kv tiles that rows [.., row_end) see
        if not causal:
            return n_kv  # a Python int: a jnp constant captured by run_state does not lower
        return jnp.minimum(lax.div(row_end + offset + bkv - 1, jnp.int32(bkv)), n_kv)

    cta_steps = visible_steps(tile_base + 2 * bq)

    def body(q_smem, k_smem, v_smem, lse_smem, p_smem, q_ready, k_ready, v_ready, k_free, v_free, turn):
        # q_smem: [2, bq, D] (reused for the output); k_smem, v_smem: [stages, bkv, D];
        # lse_smem: [2, bq] f32; p_smem: [2, bq, bkv] (interpret mode only: the interpreter's
        # wgmma reads both operands from shared memory); turn: rendezvous of the two consumers.
        wg = lax.axis_index("wg")
        rendezvous = functools.partial(rendezvous_of, turn)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(_CONSUMER_REGS, action="increase")
            qo = q_smem.at[wg]
            q_base = tile_base + wg * bq
            steps = visible_steps(q_base + bq)
            # kv tiles [0, full) lie entirely at or below the diagonal for all bq rows.
            full = jnp.minimum(lax.div(q_base + offset + 1, jnp.int32(bkv)), steps) if causal else steps

            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, bq), h], qo, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(rendezvous)  # consumer 1 starts half a step behind consumer 0

            def step(j, carry, masked: bool):
                acc, m, l = carry  # [bq, D] f32, [bq] f32 (scaled domain), [bq] f32
                slot = lax.rem(j, jnp.int32(stages))

                def qk_gemm(s_ref):
                    plgpu.wgmma(s_ref, qo, k_smem.at[slot].transpose((1, 0)))
                    rendezvous()  # our QK^T is queued; the other consumer's softmax may finish
                    return s_ref[...]

                s = pl.run_scoped(qk_gemm, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(rows + (q_base + offset) >= cols + j * bkv, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * scale2)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                # Keep the softmax ahead of the hand-over below (measured: the order matters).
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)  # softmax done: the other consumer may issue its GEMMs
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # ... and has issued them: the tensor cores are ours

                def wait_next_k():
                    @pl.when(j + 1 < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, jnp.int32(stages))])

                if in_place:
                    def pv_gemm(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()

                    acc = pl.run_state(pv_gemm)(plgpu.ACC.init(acc))
                else:
                    p_smem.at[wg][...] = p16
                    plgpu.commit_smem()

                    def pv_gemm(o_ref):
                        plgpu.wgmma(o_ref, p_smem.at[wg], v_smem.at[slot])
                        wait_next_k()
                        return o_ref[...]

                    acc = acc + pl.run_scoped(pv_gemm, plgpu.ACC((bq, D), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (
                plgpu.layout_cast(jnp.zeros((bq, D), jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            )
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)

            @pl.loop(steps, cta_steps)
            def _release(j):  # tiles the producer loaded for the other consumer only
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])  # (observe every phase: no stale parity)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                rendezvous()
                rendezvous()

            pl.when(wg == 0)(rendezvous)  # pairs with consumer 1's opening rendezvous

            # Every row saw key 0 (S >= T when causal), so l > 0.
            qo[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(dtype)
            lse_smem.at[wg][...] = m + jnp.log(l) * (1 / math.log(2))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, o_ref.at[b, pl.ds(q_base, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q_base, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

            def load(j, slot):
                rows = (b, pl.ds(j * bkv, bkv), kvh)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            stream_ring(load, cta_steps, stages, k_free, v_free)

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    pl.run_scoped(
        body,
        plgpu.SMEM((2, bq, D), dtype, transforms=swizzled),
        plgpu.SMEM((stages, bkv, D), dtype, transforms=swizzled),
        plgpu.SMEM((stages, bkv, D), dtype, transforms=swizzled),
        plgpu.SMEM((2, bq), jnp.float32),
        None if in_place else plgpu.SMEM((2, bq, bkv), dtype, transforms=swizzled),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "blocks", "interpret"))
def flash_attention_mgpu(q, k, v, *, causal: bool, sm_scale: float,
                         blocks: BlockSizes = BlockSizes(), interpret: bool = False):
    """out [B, T, H, D] (dtype of q) and lse [B, H, T] (f32, base 2) for q [B, T, H, D],
    k/v [B, S, KVH, D]. Raises ValueError where `applies` is false."""
    B, T, H, D = q.shape
    KVH = k.shape[2]
    if not applies(q, k, causal=causal, has_segments=False, blocks=blocks):
        raise ValueError(
            f"flash_attention_mgpu needs bf16/f16, head_dim in {_HEAD_DIMS}, T % {2 * blocks.block_q}"
            f" == 0, S % {blocks.block_kv} == 0, S >= T if causal and at most"
            f" {dispatch.MGPU_SMEM_BYTES} bytes of shared memory ({smem_bytes(blocks, D)} for"
            f" {blocks}); got {q.dtype},"
            f" {q.shape=}, {k.shape=}, {causal=}")
    if k.shape != v.shape or k.dtype != q.dtype or v.dtype != q.dtype or H % KVH:
        raise ValueError(f"k/v must match each other and q: {q.shape=} {q.dtype}, {k.shape=}"
                         f" {k.dtype}, {v.shape=} {v.dtype}")
    kernel = plgpu.kernel(
        functools.partial(_kernel, causal=causal, sm_scale=sm_scale, blocks=blocks,
                          in_place=not interpret),
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
        grid=(H, T // (2 * blocks.block_q), B),  # heads fastest: a group's heads share K/V in L2
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=dispatch.mgpu_interpret(interpret),
    )
    return kernel(q, k, v)
