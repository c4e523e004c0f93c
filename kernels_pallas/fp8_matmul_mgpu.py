"""FP8 (e4m3 x e4m3) matmul for Hopper GPUs at prefill sizes, in Pallas Mosaic GPU (W8A8).

    y [M, N] = (x_q [M, K] @ w_q [N, K]^T) * x_scale [M] * w_scale [N]   (f32 accumulation)

The weights are `[N, K]` (`Fp8Weight`'s layout): Hopper's fp8 wgmma reads both operands K-major,
so the weight tile is the B operand as it lies, transposed by a view.

Persistent: `min(num_sms, tiles)` CTAs each walk the `[block_m, 2 block_n]` output tiles `c, c +
ctas, ...`, numbered in groups of `group_m` row tiles (`_tile`), so the CTAs running together
share x and w tiles in L2. In a CTA:
- a producer warpgroup streams x's `[block_m, tile_k]` and w's `[2 block_n, tile_k]` tiles
  through one TMA ring of `num_stages` slots, which runs on across the CTA's output tiles (the
  next tile's first steps load during this tile's last steps and epilogue);
- two consumer warpgroups each own `[block_m, block_n]` of the tile: one wgmma a K step into an
  f32 accumulator, the slot released once it is done. Then the epilogue: both scales (copied into
  shared memory by the consumer at the tile's start), bf16, a TMA store from shared memory; the
  next tile's steps start before the store has left.

`interpret=True` runs the same program through Pallas's GPU interpreter on a CPU.

Measured on one H200 (`python3 -m pallax.bench.matmul --skip check,decode`, two machine starts,
bench/results/matmul_fp8_h200_run1.json and matmul_fp8_h200.json; random data, `[N, K]` e4m3
weights, per-token and per-channel scales):
- at M = N = K = 8192: 1,177-1,181 TFLOP/s, 1.68x and 1.76x the bf16 XLA dot of the same run
  (705 and 668 TFLOP/s); XLA's own fp8 dot 1,185 and 1,131 (1.68x, 1.69x); our Triton kernel
  (`fp8_matmul.py`) 475-478 (0.68-0.71x). Tilings, one run: the default 1,169-1,181; `overlap`
  1,120-1,151; `group_m` 4 or 16 within 1%; `block_n` 64 (5 stages) 1,031-1,131.
- at Llama-3-8B's projections with 2048 or 8192 rows, 1.00-1.33x XLA's fp8 dot; with 512 rows,
  1.35x (q/k/v, 96 tiles) and 1.08x (gate/up), 0.98x (o) and 0.74x (down): 64 tiles leave half
  the SMs idle.
- its error against the f32 reference (bf16 out, K = 8192) is 0.0030 in norm, the same as XLA's
  fp8 dot's: Hopper's fp8 wgmma accumulates with fewer bits than f32, and the two products were
  bit for bit equal in the product check (bench/results/fp8_product_h200.jsonl). e4m3 inputs
  themselves put the product 2.6% from the unquantized one.
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
from pallax.kernels_pallas._matmul_common import round_up
from pallax.kernels_pallas._mgpu_common import stream_ring
from pallax.kernels_pallas.fp8_matmul import FP8, fp8_matmul_reference

_CONSUMER_REGS = 232
_PRODUCER_REGS = 40
_OUT_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """`block_m` x `block_n` outputs per consumer warpgroup (a CTA holds two side by side in N),
    `tile_k` of K per pipeline step, `num_stages` ring slots, `group_m` row tiles a group;
    `overlap`: a consumer issues step k's wgmma before it awaits step k - 1's (and then releases
    that step's slot), instead of awaiting each before the next."""

    block_m: int = 128
    block_n: int = 128
    tile_k: int = 128
    num_stages: int = 3
    group_m: int = 8
    overlap: bool = False

    def __post_init__(self):
        if self.block_m not in (64, 128):
            raise ValueError(f"block_m={self.block_m} must be 64 or 128 (wgmma M tiles)")
        if self.block_n % 64 or not 64 <= self.block_n <= 256:
            raise ValueError(f"block_n={self.block_n} must be a multiple of 64 in [64, 256]")
        if self.tile_k % 128 or self.tile_k < 128:
            raise ValueError(f"tile_k={self.tile_k} must be a positive multiple of 128 (128-byte"
                             " swizzled fp8 rows)")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")
        if self.group_m < 1:
            raise ValueError(f"group_m={self.group_m} must be >= 1")


def smem_bytes(blocks: BlockSizes, out_itemsize: int = 2) -> int:
    """Shared memory of one CTA: the ring, both consumers' output tiles and scales, barriers."""
    ring = blocks.num_stages * (blocks.block_m + 2 * blocks.block_n) * blocks.tile_k
    out = 2 * blocks.block_m * blocks.block_n * out_itemsize
    scales = 2 * (blocks.block_m + blocks.block_n) * 4
    return ring + out + scales + 8 * (2 * blocks.num_stages + 2)


def applies(k: int, n: int, blocks: BlockSizes = BlockSizes()) -> bool:
    """Whether the kernel takes weights of this shape with `blocks`: whole column tiles and K
    steps (the rows of x are padded to whole tiles)."""
    return (n % (2 * blocks.block_n) == 0 and k % blocks.tile_k == 0
            and smem_bytes(blocks) <= dispatch.MGPU_SMEM_BYTES)


def _tile(t, m_tiles: int, n_tiles: int, group_m: int):
    """Output tile number -> (row tile, column tile), `group_m` row tiles per column sweep."""
    width = group_m * n_tiles
    first = lax.div(t, jnp.int32(width)) * group_m
    rows = jnp.minimum(m_tiles - first, group_m)
    r = lax.rem(t, jnp.int32(width))
    return first + lax.rem(r, rows), lax.div(r, rows)


def _kernel(x_ref, w_ref, xs_ref, ws_ref, y_ref, *, blocks: BlockSizes, ctas: int):
    # x_ref: [M, K] e4m3; w_ref: [N, K] e4m3; xs_ref: [M] f32; ws_ref: [N] f32; y_ref: [M, N]
    M, K = x_ref.shape
    N = w_ref.shape[0]
    bm, bn, tk, stages = blocks.block_m, blocks.block_n, blocks.tile_k, blocks.num_stages
    m_tiles, n_tiles, k_steps = M // bm, N // (2 * bn), K // tk
    tile = functools.partial(_tile, m_tiles=m_tiles, n_tiles=n_tiles, group_m=blocks.group_m)
    c = lax.axis_index("cta")
    my_tiles = lax.div(m_tiles * n_tiles - c + ctas - 1, jnp.int32(ctas))  # c, c + ctas, ...

    def body(x_smem, w_smem, y_smem, xs_smem, ws_smem, ready, free, scales_ready):
        # x_smem: [stages, bm, tk]; w_smem: [stages, 2 bn, tk]; y_smem: [2, bm, bn];
        # xs_smem: [2, bm] f32; ws_smem: [2, bn] f32 (one of each per consumer)
        wg = lax.axis_index("wg")

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(_CONSUMER_REGS, action="increase")

            @pl.loop(0, my_tiles)
            def _tile_loop(j):
                mi, ni = tile(c + j * ctas)
                rows, cols = pl.ds(mi * bm, bm), pl.ds(ni * 2 * bn + wg * bn, bn)
                plgpu.copy_gmem_to_smem(xs_ref.at[rows], xs_smem.at[wg], scales_ready.at[wg])
                plgpu.copy_gmem_to_smem(ws_ref.at[cols], ws_smem.at[wg], scales_ready.at[wg])

                def slot_of(kk):
                    return lax.rem(j * k_steps + kk, jnp.int32(stages))

                def gemm(acc_ref):
                    @pl.loop(0, k_steps)
                    def _step(kk):
                        slot = slot_of(kk)
                        plgpu.barrier_wait(ready.at[slot])
                        b = w_smem.at[slot, pl.ds(wg * bn, bn)].transpose((1, 0))  # [tk, bn]
                        plgpu.wgmma(acc_ref, x_smem.at[slot], b)
                        if not blocks.overlap:
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(free.at[slot])
                            return
                        plgpu.wgmma_wait(1)  # step kk - 1's is done: its slot may refill

                        @pl.when(kk > 0)
                        def _release():
                            plgpu.barrier_arrive(free.at[slot_of(kk - 1)])

                    if blocks.overlap:
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(free.at[slot_of(k_steps - 1)])
                    return acc_ref[...]

                acc = pl.run_scoped(gemm, plgpu.ACC((bm, bn), jnp.float32))
                plgpu.barrier_wait(scales_ready.at[wg])
                xs = plgpu.load(xs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                ws = plgpu.load(ws_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
                y = (acc * lax.broadcast_in_dim(xs, acc.shape, [0])
                     * lax.broadcast_in_dim(ws, acc.shape, [1]))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store read it
                y_smem.at[wg][...] = y.astype(y_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(y_smem.at[wg], y_ref.at[rows, cols])

            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

            def load(i, slot):
                j, kk = lax.div(i, jnp.int32(k_steps)), lax.rem(i, jnp.int32(k_steps))
                mi, ni = tile(c + j * ctas)
                ks = pl.ds(kk * tk, tk)
                plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(mi * bm, bm), ks], x_smem.at[slot],
                                        ready.at[slot])
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(ni * 2 * bn, 2 * bn), ks],
                                        w_smem.at[slot], ready.at[slot])

            stream_ring(load, my_tiles * k_steps, stages, free)

    fp8_rows = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    out_swizzle = min(128, bn * jnp.dtype(y_ref.dtype).itemsize)
    out_rows = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(y_ref.dtype).itemsize)),
                plgpu.SwizzleTransform(out_swizzle))
    pl.run_scoped(
        body,
        plgpu.SMEM((stages, bm, tk), FP8, transforms=fp8_rows),
        plgpu.SMEM((stages, 2 * bn, tk), FP8, transforms=fp8_rows),
        plgpu.SMEM((2, bm, bn), y_ref.dtype, transforms=out_rows),
        plgpu.SMEM((2, bm), jnp.float32),
        plgpu.SMEM((2, bn), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),
        collective_axes="wg",
    )


def _scales(scale, size: int, what: str):
    """A per-tensor or per-row/column scale -> `[size]` f32."""
    scale = jnp.asarray(scale, jnp.float32)
    if scale.size not in (1, size) or (scale.size == size and size > 1
                                       and scale.shape not in ((size,), (size, 1), (1, size))):
        raise ValueError(f"{what} shape {scale.shape} must be per tensor or have {size} entries")
    return jnp.broadcast_to(scale.reshape(-1), (size,))


@functools.partial(jax.jit, static_argnames=("out_dtype", "blocks", "num_sms", "interpret"))
def fp8_matmul_mgpu(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16,
                    blocks: BlockSizes = BlockSizes(), num_sms: int = 132,
                    interpret: bool = False):
    """`(x_q [M, K] @ w_q [N, K]^T) * x_scale * w_scale -> [M, N] out_dtype` on
    `min(num_sms, tiles)` CTAs. Scales: per tensor, or `x_scale` per row (`[M]`, `[M, 1]`) and
    `w_scale` per output channel (`[N]`, `[N, 1]`, `[1, N]`). Any M (x's rows are padded to
    whole tiles); raises ValueError where `applies` is false."""
    if x_q.ndim != 2 or w_q.ndim != 2 or x_q.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"x_q [M, K] and w_q [N, K] must be 2-D float8_e4m3fn; got {x_q.shape}"
                         f" {x_q.dtype} and {w_q.shape} {w_q.dtype}")
    (M, K), N = x_q.shape, w_q.shape[0]
    if w_q.shape[1] != K:
        raise ValueError(f"x_q {x_q.shape} and w_q {w_q.shape} ([N, K]) disagree on K")
    if jnp.dtype(out_dtype) not in _OUT_DTYPES:
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype)} must be bfloat16 or float16")
    if not applies(K, N, blocks):
        raise ValueError(f"fp8_matmul_mgpu needs N % {2 * blocks.block_n} == 0, K % {blocks.tile_k}"
                         f" == 0 and at most {dispatch.MGPU_SMEM_BYTES} bytes of shared memory"
                         f" ({smem_bytes(blocks)} for {blocks}); got {N=}, {K=}")
    xs, ws = _scales(x_scale, M, "x_scale"), _scales(w_scale, N, "w_scale")
    m_pad = round_up(M, blocks.block_m)  # zero rows, sliced off the output
    x_q, xs = jnp.pad(x_q, ((0, m_pad - M), (0, 0))), jnp.pad(xs, (0, m_pad - M))
    ctas = min(num_sms, m_pad // blocks.block_m * (N // (2 * blocks.block_n)))
    kernel = plgpu.kernel(
        functools.partial(_kernel, blocks=blocks, ctas=ctas),
        out_type=jax.ShapeDtypeStruct((m_pad, N), out_dtype),
        grid=(ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        interpret=dispatch.mgpu_interpret(interpret),
    )
    return kernel(x_q, w_q, xs, ws)[:M]


def fp8_matmul_mgpu_reference(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16):
    """Upcast to f32, f32 dot against `w_q [N, K]`, both scales, cast (the Triton kernel's
    reference on `[N, K]` weights)."""
    return fp8_matmul_reference(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, w_layout="nk")
