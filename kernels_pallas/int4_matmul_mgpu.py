"""Weight-only int4 matmul for Hopper GPUs at decode sizes, in Pallas Mosaic GPU.

    y [M, K] @ W -> [M, N] (bf16),  W[k, n] = q[n, k] * s[k // g, n],  q signed int4 in [-8, 7]

The layout is the transpose of `quant_formats` (`w_t: [N, K] int4`, K contiguous per output
channel; `scales: [K // g, N] f32`), built once by `to_hopper_layout` from the portable
`[K // 2, N]` packing. It is swapped-operand: the kernel computes `y^T = W^T x^T`, so the weights
are wgmma's A operand and the few activation rows (M, padded to a multiple of 8) its N dimension.

One CTA owns `64 * consumers` output channels (128 by default) and one of `splits` runs of K:
- a producer warpgroup streams `[rows, tile_k]` int4 weight tiles, the matching
  `[M_pad, tile_k]` activation tile and the `[tile_k // g, rows]` scales into a ring of
  `num_stages` slots with TMA;
- consumer warpgroups, 64 channels each, load each group's `[64, g]` int4 tile from shared memory
  straight into the wgmma operand registers (Mosaic GPU's int4 -> bf16 upcast: a few integer ops
  per 8 values, no conversion instructions), run `[64, g] @ [g, M_pad]` on the tensor cores into a
  fresh f32 accumulator per group, and fold it into the running sum with the group's scale
  (`acc += partial * s`; exact: the codes are small integers in bf16). A step's groups are all
  issued before any is awaited, so converting one overlaps the tensor cores' work on another.
The per-split f32 partials `[splits, N, M_pad]` are summed (and transposed) by one small XLA fusion.

`interpret=True` runs the kernel in Pallas's GPU interpret mode on a CPU, with the dequantized
weight tile staged through shared memory (the interpreter's wgmma reads both operands from there).

Measured on one H100 (bench/results/matmul_h100_int4_hopper*.json*; g128, 4096x14336 and
14336x4096, M = 1, 4, 16): 16.5-19 us, 2.35-2.37x the bf16 XLA dot and 0.53-0.60 of the HBM copy
bandwidth on the packed bytes (the Triton kernel: 0.38-0.45). Two or four consumer warpgroups,
tile_k 256 or 512 and 3-6 stages all land within 10%: the limit is not the conversion's latency
nor the bytes in flight per SM (both varied).

Where the time goes (one H100, M = 1, profiler kernel time per call): this kernel 16.5 us at
4096x14336 and 15.8 us at 14336x4096; an XLA reduction over the same 29.4 MB of packed weights
11.4-11.6 us (0.84-0.85 of copy bandwidth); the TMA ring alone (consumers only wait for each slot
and release it) 12.1-12.7 us. Neither the grid's waves nor the weights' order in memory is the
limit: a persistent stream-K schedule (132 CTAs, each streaming an equal run of (row block, K step)
units and adding its partial sums with TMA reductions) and weights stored with each [128, 512] tile
as 32 KB of contiguous bytes both measured within 4% of this kernel. What is left is the ~4 us the
consumers add on top of the ring.

That time is not the per-step wgmma wait. Two pipelines that never wait on the step just issued
measured slower (profiler kernel time, the four shapes with M = 1 and 16; this kernel 15.6-17.5 us):
- the scale folded into the A operand (`a = upcast(q) * s` in bf16), every group and step
  accumulating into one f32 accumulator, and each slot released one step late, after
  `wgmma_wait(groups of this step)`: 17.0-19.1 us, 1.4-1.9 us slower at tile_k 512, and no better
  at tile_k 256 with 6 stages or when releasing after the next step's first group. Without the
  scale multiply (wrong numbers, timing only) still 16.6-18.6 us: the multiply costs 0.3-0.9 us
  (one bf16x2 op per two weights on top of the conversion's three), the new schedule the rest;
- per-group partial accumulators kept as now, each group's partial folded in (with its scale) once
  the next step's wgmma on it is issued (`wgmma_wait(groups - 1)`), slots released a step late:
  16.4-16.8 us at M = 1, 29-31 us at M = 16 (tile_k 512; its registers overflow), 16.4-18.2 us at
  tile_k 256.
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
from pallax.kernels_pallas.quant_formats import dequantize_int4

_ROWS = 64  # output channels per consumer warpgroup (one wgmma M tile)
_MAX_M = 64
_PRODUCER_REGS = 40


def _consumer_regs(consumers: int) -> int:
    """Registers per consumer thread: what the producer gives back of the CTA's launch allocation
    (which is per thread a multiple of 8 of the 64K file's share). Asking for more than the
    pool holds would stall `setmaxnreg` forever."""
    threads = 128 * (consumers + 1)
    launch = min(65536 // threads // 8 * 8, 256)
    return min(232, (threads * launch - 128 * _PRODUCER_REGS) // (128 * consumers) // 8 * 8)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """`tile_k` weights of K per pipeline step (a multiple of the group size), `num_stages` ring
    slots, and `splits` runs of K (None: chosen from the shape)."""

    tile_k: int = 512
    num_stages: int = 3
    splits: int | None = None
    consumers: int = 2  # consumer warpgroups per CTA, 64 output channels each

    @property
    def rows(self) -> int:
        return _ROWS * self.consumers

    def __post_init__(self):
        if self.tile_k % 128 or self.tile_k < 128:
            raise ValueError(f"tile_k={self.tile_k} must be a positive multiple of 128")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits={self.splits} must be >= 1")
        if self.consumers not in (1, 2, 3, 4):
            raise ValueError(f"consumers={self.consumers} must be 1, 2, 3 or 4")


def smem_bytes(blocks: BlockSizes, m_pad: int, group_size: int) -> int:
    per_stage = (blocks.rows * blocks.tile_k // 2 + m_pad * blocks.tile_k * 2
                 + blocks.tile_k // group_size * blocks.rows * 4)
    return blocks.num_stages * per_stage + blocks.rows * m_pad * 4 + 24 * blocks.num_stages


def applies(m: int, k: int, n: int, group_size: int, blocks: BlockSizes = BlockSizes()) -> bool:
    """Whether the kernel handles this shape (decode sizes; else use the Triton kernel)."""
    m_pad = round_up(max(m, 1), 8)
    return (1 <= m <= _MAX_M and group_size in (64, 128) and blocks.tile_k % group_size == 0
            and n % blocks.rows == 0 and k % blocks.tile_k == 0
            and smem_bytes(blocks, m_pad, group_size) <= dispatch.MGPU_SMEM_BYTES)


def default_splits(k: int, n: int, tile_k: int, num_sms: int = 132, rows: int = 2 * _ROWS) -> int:
    """Runs of K per 128 channels: the most that keep every CTA in one wave (one CTA per SM:
    the consumers' registers fill the register file), dividing the K steps evenly."""
    steps, tiles = k // tile_k, n // rows
    return max(s for s in range(1, steps + 1) if steps % s == 0 and (tiles * s <= num_sms or s == 1))


def to_hopper_layout(packed, scales, zeros=None):
    """Portable int4 (`packed [K // 2, N] uint8`, `scales [K // g, N]`, symmetric) -> this
    kernel's (`w_t [N, K] int4` holding q - 8, `scales [K // g, N] f32`)."""
    if zeros is not None:
        raise ValueError("the Hopper int4 kernel takes symmetric weights (zeros=None)")
    lo = (packed & 0xF).astype(jnp.int8) - 8
    hi = (packed >> 4).astype(jnp.int8) - 8
    q = jnp.stack([lo, hi], axis=1).reshape(-1, packed.shape[-1])  # [K, N]: row 2i low nibble
    return q.T.astype(jnp.int4), scales.astype(jnp.float32)


def _kernel(x_ref, w_ref, s_ref, out_ref, *, group_size: int, blocks: BlockSizes,
            steps: int, in_place: bool):
    # x_ref: [M_pad, K] bf16; w_ref: [N, K] int4; s_ref: [K // g, N] f32;
    # out_ref: [splits, N, M_pad] f32 (GMEM)
    m_pad = x_ref.shape[0]
    tile_k, stages, g = blocks.tile_k, blocks.num_stages, group_size
    gps = tile_k // g
    nc = blocks.consumers
    n0 = lax.axis_index("n") * blocks.rows
    split = lax.axis_index("split")
    k_step0 = split * steps

    def body(w_smem, x_smem, s_smem, out_smem, a_smem, ready, free):
        # w_smem: [stages, 128, tile_k] int4; x_smem: [stages, M_pad, tile_k] bf16;
        # s_smem: [stages, gps, 128] f32; out_smem: [2, 64, M_pad] f32;
        # a_smem: [2, gps, 64, g] bf16 (interpret mode only)
        wg = lax.axis_index("wg")

        @pl.when(wg < nc)
        def _consumer():
            plgpu.set_max_registers(_consumer_regs(nc), action="increase")
            rows = pl.ds(wg * _ROWS, _ROWS)

            def step(i, acc):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(ready.at[slot])

                def group_dots(*parts):
                    # Every group's wgmma is issued before any is awaited: the next group's
                    # int4 -> bf16 conversion overlaps the tensor cores' work on this one.
                    for gi, part in enumerate(parts):
                        cols = pl.ds(gi * g, g)
                        a = plgpu.load(w_smem.at[slot, rows, cols],
                                       layout=plgpu.Layout.WGMMA_UPCAST_4X)
                        a = plgpu.layout_cast(a, plgpu.Layout.WGMMA).astype(jnp.bfloat16)
                        if not in_place:
                            a_smem.at[wg, gi][...] = a
                            plgpu.commit_smem()
                            a = a_smem.at[wg, gi]
                        plgpu.wgmma(part, a, x_smem.at[slot, :, cols].transpose((1, 0)))
                    return [part[...] for part in parts]

                parts = pl.run_scoped(
                    group_dots, *[plgpu.ACC((_ROWS, m_pad), jnp.float32) for _ in range(gps)])
                scales = [plgpu.load(s_smem.at[slot, gi, rows], layout=plgpu.Layout.WGMMA.reduce(1))
                          for gi in range(gps)]
                plgpu.barrier_arrive(free.at[slot])  # every read of this slot is done
                for part, s in zip(parts, scales):
                    acc = acc + part * lax.broadcast_in_dim(s, part.shape, [0])
                return acc

            acc = plgpu.layout_cast(jnp.zeros((_ROWS, m_pad), jnp.float32), plgpu.Layout.WGMMA)
            acc = lax.fori_loop(0, steps, step, acc)
            out_smem.at[wg][...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[split, pl.ds(n0 + wg * _ROWS, _ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nc)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
            def load(i, slot):
                k0 = (k_step0 + i) * tile_k
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(n0, blocks.rows), pl.ds(k0, tile_k)],
                                        w_smem.at[slot], ready.at[slot])
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(k0, tile_k)], x_smem.at[slot],
                                        ready.at[slot])
                plgpu.copy_gmem_to_smem(s_ref.at[pl.ds(k0 // g, gps), pl.ds(n0, blocks.rows)],
                                        s_smem.at[slot], ready.at[slot])

            for i in range(min(stages, steps)):
                load(jnp.int32(i), i)

            @pl.loop(stages, steps)
            def _refill(i):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(free.at[slot])
                load(i, slot)

            @pl.loop(max(steps - stages, 0), steps)
            def _drain(i):  # observe the last releases (no stale barrier phases)
                plgpu.barrier_wait(free.at[lax.rem(i, jnp.int32(stages))])

    w_swizzle = g // 2  # bytes of one group's int4 row: a group is one swizzle tile wide
    pl.run_scoped(
        body,
        plgpu.SMEM((stages, blocks.rows, tile_k), jnp.int4,
                   transforms=(plgpu.TilingTransform((8, g)), plgpu.SwizzleTransform(w_swizzle))),
        plgpu.SMEM((stages, m_pad, tile_k), jnp.bfloat16,
                   transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((stages, gps, blocks.rows), jnp.float32),
        plgpu.SMEM((nc, _ROWS, m_pad), jnp.float32),
        None if in_place else plgpu.SMEM(
            (nc, gps, _ROWS, g), jnp.bfloat16,
            transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),
        plgpu.Barrier(num_arrivals=nc, num_barriers=stages),
        collective_axes="wg",
    )


@functools.partial(jax.jit, static_argnames=("group_size", "blocks", "num_sms", "interpret"))
def int4_matmul_mgpu(x, w_t, scales, *, group_size: int, blocks: BlockSizes = BlockSizes(),
                     num_sms: int = 132, interpret: bool = False):
    """x [M, K] bf16/f16 @ the int4 weight (`to_hopper_layout`) -> [M, N] in x's dtype."""
    M, K = x.shape
    N = w_t.shape[0]
    if w_t.shape != (N, K) or w_t.dtype != jnp.int4:
        raise ValueError(f"w_t must be [N, K] int4 for x {x.shape}; got {w_t.shape} {w_t.dtype}")
    if scales.shape != (K // group_size, N):
        raise ValueError(f"scales must be [K // g, N] = {(K // group_size, N)}; got {scales.shape}")
    if not applies(M, K, N, group_size, blocks):
        raise ValueError(
            f"int4_matmul_mgpu needs 1 <= M <= {_MAX_M}, g in (64, 128) dividing tile_k,"
            f" N % 128 == 0, K % tile_k == 0 and the ring in shared memory; got {x.shape=},"
            f" {N=}, {group_size=}, {blocks}")
    m_pad = round_up(M, 8)
    splits = blocks.splits or default_splits(K, N, blocks.tile_k, num_sms, blocks.rows)
    steps = K // blocks.tile_k
    if steps % splits:
        raise ValueError(f"splits={splits} must divide the {steps} steps of K")
    xp = jnp.pad(x.astype(jnp.bfloat16), ((0, m_pad - M), (0, 0)))
    kernel = plgpu.kernel(
        functools.partial(_kernel, group_size=group_size, blocks=blocks, steps=steps // splits,
                          in_place=not interpret),
        out_type=jax.ShapeDtypeStruct((splits, N, m_pad), jnp.float32),
        grid=(N // blocks.rows, splits),
        grid_names=("n", "split"),
        num_threads=blocks.consumers + 1,
        thread_name="wg",
        interpret=dispatch.mgpu_interpret(interpret),
    )
    part = kernel(xp, w_t, scales.astype(jnp.float32))
    return part.sum(axis=0)[:, :M].T.astype(x.dtype)


def int4_matmul_mgpu_reference(x, packed, scales, *, group_size: int):
    """x @ dequant(W) in f32 from the portable packing (symmetric), in x's dtype."""
    w = dequantize_int4(packed, scales, None, group_size=group_size)
    return (x.astype(jnp.float32) @ w).astype(x.dtype)
