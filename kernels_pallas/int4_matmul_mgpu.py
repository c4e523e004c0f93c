"""Weight-only int4 matmul for Hopper GPUs at decode sizes, in Pallas Mosaic GPU.

    y [M, K] @ W -> [M, N] (bf16),  W[k, n] = q[n, k] * s[k // g, n],  q signed int4 in [-8, 7]

It is swapped-operand: the kernel computes `y^T = W^T x^T`, so the weights are wgmma's A operand
(64 output channels x one group per wgmma) and the few activation rows (M, read as a multiple of
8: TMA fills the rows past M with zeros up to 8 rows; more rows are padded to a multiple of 8
first) its N dimension.

The weight layout (`to_hopper_layout`, built once from the portable `[K // 2, N]` packing) is
`words: [N // 64, K // g, g // 16, 128] int32`: the unsigned codes `q + 8`, eight to a word, each
`[64, g]` tile of (channels, group) as 8 g contiguous words in the order the consumer threads
hold the wgmma operand (`_word_map`, read off Mosaic GPU's WGMMA layout; `pack_codes` applies it
as a transpose of index bits). A thread fetches its words with 128-bit shared-memory loads
(consecutive threads, consecutive 16 bytes) and turns each word into four bf16 pairs with one
`lop3` and one `sub.bf16x2` a pair (`_unpack_to_operand`): no shuffles and no permutes, which the
generic int4 upcast into the operand layout needs (two shuffles, two permutes and three ops a
pair per word; that upcast, on `[N, K]` int4 weights, was this kernel's previous form).
`scales: [K // g, N]` bf16 (as quantized) or f32, converted to f32 as each group's are folded in.

Schedule (`Schedule`, stream-K): the work is (row block of `64 * consumers` channels, K step)
units; each of `min(132, units)` CTAs streams an equal run of them through one TMA ring:
- a producer warpgroup streams the `[rows, tile_k]` weight words, the `[M_pad, tile_k]`
  activation tile and the `[tile_k // g, rows]` scales into `num_stages` slots;
- consumer warpgroups, 64 channels each, convert each group's codes into the wgmma operand in
  registers, run `[64, g] @ [g, M_pad]` on the tensor cores into a fresh f32 accumulator per
  group, and fold it into the running sum with the group's scale (`acc += partial * s`; exact:
  the codes are small integers in bf16). A step's groups are all issued before any is awaited,
  so converting one overlaps the tensor cores' work on another;
- where a row block ends (or the CTA's run does) the consumers store the partial sum, transposed
  to `[M_pad, rows]` in shared memory, and its M real rows as the block's piece
  `c - first_cta(block)` of `[blocks, pieces, M, rows]`: the CTAs touching a block are
  consecutive, so where its partial sums lie is arithmetic, not a table a reader must load
  before the sums. One small XLA fusion then adds each block's pieces in a fixed order
  (deterministic, unlike adding in place with TMA reductions). At M = 1 the sum is already y's
  layout, so it fuses into y's consumers with no transpose kernel of its own. With
  `partial=True` the pieces are returned unadded (`PartialSums`), for a consumer kernel that
  adds them itself (the residual add + RMSNorm after the o and down projections:
  `residual_norm.py`).

`interpret=True` runs the kernel in Pallas's GPU interpret mode on a CPU: the same words and ring,
the operand unpacked by `_word_map` in jnp and staged through shared memory (the interpreter runs
no inline Mosaic GPU and its wgmma reads both operands from shared memory), x padded in XLA.

Warming L2 for the next call (`next_weight`, `Prefetch`): a decode step's int4 calls follow each
other, so a call may be given the next call's weight; once its producer has issued its last copy
it prefetches into L2 (TMA bulk prefetches of the same tiles) the first `PREFETCH_UNITS` units of
the next call's CTA of its own index, and that call's first slots come from L2. On an H200
(`python3 -m pallax.bench.l2_prefetch`, bench/results/l2_prefetch_h200.jsonl) one unit took the
Llama-3-8B int4 step from 2.112 to 2.077 ms (int4 kernels 1.475 -> 1.437 ms a step) and
Qwen2.5-1.5B's from 1.008 to 0.988; 3, 4, 16 and 64 units were slower than one (the prefetches
compete with the call's own last copies), and so were prefetches issued by a consumer at the
kernel's end or in its last steps.

Measured (one H200 unless said; the whole record, with every variant tried and dropped, is in
bench/FINDINGS.md, "The Hopper int4 kernel's record"): at Llama-3-8B's 4096x14336 and 14336x4096,
M = 1, 4, 16, 12.4-14.0 us, 2.13-2.46x the bf16 XLA dot of the same run, where XLA's own
reduction over the same words and scales takes 11.0 and 12.9 us (bench/results/
matmul_h200_int4_floor.json; on an H100 2.48-2.79x). In steady state the 132 SMs stream 4.3
TB/s; each call loses 2.5-4 us to fixed costs (pipeline fill, tail, launch), 40-50% of the
smaller projections' calls. In the Llama-3-8B batch-1 decode step (int4 weights and head) the
129 calls take 1.43 ms of 1.99.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm, vector
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas._mgpu_common import stream_ring
from pallax.kernels_pallas._matmul_common import PartialSums, StreamK, round_up
from pallax.kernels_pallas.quant_formats import check_group_size, dequantize_int4

_ROWS = 64  # output channels per consumer warpgroup (one wgmma M tile)
_VEC = 4  # int32 words per 128-bit shared-memory load of the packed codes
_MAX_M = 64
_PRODUCER_REGS = 40
# Units of the next int4 call a CTA prefetches into L2 when asked (`Prefetch`; 0: none).
PREFETCH_UNITS = 1


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
    slots, `consumers` warpgroups of 64 output channels each, and `ctas`: how many CTAs share
    the work (None: one per SM, one wave; see `Schedule`)."""

    tile_k: int = 256
    num_stages: int = 4
    consumers: int = 2
    ctas: int | None = None

    @property
    def rows(self) -> int:
        return _ROWS * self.consumers

    def __post_init__(self):
        if self.tile_k % 128 or self.tile_k < 128:
            raise ValueError(f"tile_k={self.tile_k} must be a positive multiple of 128")
        if self.num_stages < 2:
            raise ValueError(f"num_stages={self.num_stages} must be >= 2")
        if self.ctas is not None and self.ctas < 1:
            raise ValueError(f"ctas={self.ctas} must be >= 1")
        if self.consumers not in (1, 2, 3, 4):
            raise ValueError(f"consumers={self.consumers} must be 1, 2, 3 or 4")


def smem_bytes(blocks: BlockSizes, m_pad: int, group_size: int) -> int:
    per_stage = (blocks.rows * blocks.tile_k // 2 + m_pad * blocks.tile_k * 2
                 + blocks.tile_k // group_size * blocks.rows * 4)
    return blocks.num_stages * per_stage + blocks.rows * m_pad * 4 + 24 * blocks.num_stages


def blocks_for(k: int) -> BlockSizes:
    """The default tiling for a K: 256-wide steps, or 128-wide ones with twice the stages (the
    same bytes in flight) where 256 does not divide K (Qwen2.5-0.5B's 896)."""
    return BlockSizes() if k % 256 == 0 else BlockSizes(tile_k=128, num_stages=8)


def applies(m: int, k: int, n: int, group_size: int, blocks: BlockSizes | None = None) -> bool:
    """Whether the kernel handles this shape (decode sizes; else use the Triton kernel), with
    `blocks` or `blocks_for(k)`."""
    blocks = blocks or blocks_for(k)
    m_pad = round_up(max(m, 1), 8)
    return (1 <= m <= _MAX_M and group_size in (64, 128) and blocks.tile_k % group_size == 0
            and n % blocks.rows == 0 and k % blocks.tile_k == 0
            and smem_bytes(blocks, m_pad, group_size) <= dispatch.MGPU_SMEM_BYTES)


@dataclasses.dataclass(frozen=True)
class Schedule(StreamK):
    """Stream-K (`StreamK`) over `blocks.rows`-channel row blocks and `tile_k`-wide K steps: every
    CTA streams an equal run of units through one ring, so every SM reads the same number of
    weight bytes whatever the shape (split-K by whole runs would leave SMs idle: 4096x14336 has
    112 row blocks of 128 channels on 132 SMs). A CTA stores the partial sum of each row block it
    touches as that block's piece `c - first_cta(block)`; a block's pieces are then added in a
    fixed order (deterministic, unlike reductions in place)."""

    @classmethod
    def make(cls, k: int, n: int, blocks: BlockSizes, num_sms: int) -> "Schedule":
        steps = k // blocks.tile_k
        units = n // blocks.rows * steps
        return cls(steps, units, min(blocks.ctas or num_sms, units))


@functools.lru_cache
def _word_map(g: int) -> np.ndarray:
    """Where each code of a `[64, g]` group tile lives among its `8 g` words (`[g // 16, 128]`
    int32): `src[r, k] = word * 8 + nibble`.

    Consumer thread t loads words `512 j + 4 t + i` (`i < 4`: 128-bit loads, consecutive threads
    on consecutive 16 bytes); its word `w = 4 j + i` yields, by `(word >> 4 p) & 0x000F000F`, the
    bf16 pair of its `4 w + p`-th register of the wgmma operand (`WGMMA_LAYOUT`): the pair's
    first value in nibble p, its second in nibble p + 4. Derived from the layout's own
    definition (which (row, column) a thread's register holds), not restated here."""
    layout = fa.WGMMA_LAYOUT
    shape = (_ROWS, g)
    strides = layout.tiling.tile_strides((g, 1))
    rank, tiled = layout.tiled_tiling_rank, layout.tiled_tiling_shape

    def split(idx, dims):  # a warp or lane index -> its tiled coordinates
        coords, step = [0] * rank, 1
        for d in reversed(dims):
            size = d.times if isinstance(d, fa.Replicated) else tiled[d]
            if not isinstance(d, fa.Replicated):
                coords[d] = idx // step % size
            step *= size
        return coords

    src = np.full(shape, -1, np.int64)
    for t in range(128):
        base = sum(c * s for c, s in zip(split(t // 32, layout.warp_dims) , strides[-rank:]))
        base += sum(c * s for c, s in zip(split(t % 32, layout.lane_dims), strides[-rank:]))
        for o, reg in enumerate(np.ndindex(layout.registers_shape(shape))):
            lin = base + sum(c * s for c, s in zip(reg, strides))
            word = (o // 4 // _VEC) * 128 * _VEC + t * _VEC + o // 4 % _VEC
            for v in range(layout.vector_length):
                r, k = np.unravel_index(lin + v * strides[layout.vector_dim], shape)
                src[r, k] = word * 8 + o % 4 + 4 * v
    assert sorted(src.reshape(-1)) == list(range(_ROWS * g))
    return src


@functools.lru_cache
def _bit_permutation(g: int) -> tuple[int, ...]:
    """`_word_map` as a permutation of index bits (the layout is tiled by powers of two):
    a tile's nibbles, in word order, are `codes.reshape((2,) * n).transpose(perm).reshape(-1)`."""
    src = _word_map(g).reshape(-1)
    n = src.size.bit_length() - 1
    perm = [0] * n
    for b in range(n):
        c = int(src[1 << b]).bit_length() - 1
        if src[1 << b] != 1 << c:
            raise AssertionError("the wgmma operand layout is not a bit permutation")
        perm[n - 1 - c] = n - 1 - b
    nibbles = np.arange(src.size).reshape((2,) * n).transpose(perm).reshape(-1)
    assert (nibbles[src] == np.arange(src.size)).all()
    return tuple(perm)


def pack_codes(u: jax.Array, group_size: int) -> jax.Array:
    """Unsigned codes `u [..., N, K]` (0..15) -> the kernel's words `[..., N / 64, K / g, g / 16,
    128]` int32 (each `[64, g]` group tile as `_word_map` places it)."""
    *lead, n, k = u.shape
    g, nl = group_size, len(u.shape) - 2
    perm = _bit_permutation(g)
    t = jnp.swapaxes(u.astype(jnp.uint32).reshape(*lead, n // _ROWS, _ROWS, k // g, g), -3, -2)
    t = t.reshape(*lead, n // _ROWS, k // g, *(2,) * len(perm))
    t = t.transpose(*range(nl + 2), *(nl + 2 + p for p in perm))
    t = t.reshape(*lead, n // _ROWS, k // g, g // 16, 128, 8)
    words = functools.reduce(jnp.bitwise_or, [t[..., i] << (4 * i) for i in range(8)])
    return lax.bitcast_convert_type(words, jnp.int32)


def unpack_codes(words: jax.Array, group_size: int) -> jax.Array:
    """The inverse of `pack_codes`: words -> unsigned codes `[..., N, K]` uint8."""
    *lead, nt, kg, _, _ = words.shape
    g, nl = group_size, len(words.shape) - 4
    perm = _bit_permutation(g)
    w = lax.bitcast_convert_type(words, jnp.uint32)
    t = jnp.stack([(w >> (4 * i)) & 0xF for i in range(8)], axis=-1).astype(jnp.uint8)
    t = t.reshape(*lead, nt, kg, *(2,) * len(perm))
    t = t.transpose(*range(nl + 2), *(nl + 2 + p for p in np.argsort(perm)))
    t = jnp.swapaxes(t.reshape(*lead, nt, kg, _ROWS, g), -3, -2)
    return t.reshape(*lead, nt * _ROWS, kg * g)


def to_hopper_layout(packed, scales, zeros=None, *, group_size: int):
    """Portable int4 (`packed [K // 2, N] uint8`, `scales [K // g, N]`, symmetric) -> this
    kernel's (`words [N // 64, K // g, g // 16, 128] int32`, `scales [K // g, N]`: bf16 scales
    as they are, any other dtype as f32)."""
    if zeros is not None:
        raise ValueError("the Hopper int4 kernel takes symmetric weights (zeros=None)")
    check_group_size(packed.shape[-2] * 2, group_size)
    if group_size not in (64, 128) or packed.shape[-1] % _ROWS:
        raise ValueError(f"the Hopper int4 layout needs g in (64, 128) and N % {_ROWS} == 0;"
                         f" got g={group_size}, N={packed.shape[-1]}")
    u = jnp.stack([packed & 0xF, packed >> 4], axis=-2)  # [..., K // 2, 2, N]: row 2i low nibble
    u = u.reshape(*packed.shape[:-2], -1, packed.shape[-1])
    return pack_codes(jnp.swapaxes(u, -1, -2), group_size), _kernel_scales(scales)


_SCALE_DTYPES = (jnp.bfloat16, jnp.float32)  # what the kernel reads: the quantizer's bf16 (half the bytes), or f32


def _kernel_scales(scales):
    """Scales as the kernel reads them: as they are where `_SCALE_DTYPES` holds their dtype, else f32."""
    return scales if scales.dtype in _SCALE_DTYPES else scales.astype(jnp.float32)


def from_hopper_layout(words, group_size: int):
    """The kernel's words -> the portable `packed [..., K // 2, N] uint8`."""
    u = jnp.swapaxes(unpack_codes(words, group_size), -1, -2)  # [..., K, N]
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def _unpack_to_operand(words, g: int):
    """Mosaic GPU (inside `inline_mgpu`): a consumer's words (`WG_STRIDED`, 4 a thread) -> the
    `[64, g]` bf16 wgmma operand in registers. Per 32-bit word (8 codes): three shifts, then for
    each of its four bf16 pairs one `lop3` (`0x4300 | u` is the bf16 `128 + u`) and one
    `sub.bf16x2` of 136 (`u - 8 = q`, exact)."""
    i32 = ir.IntegerType.get_signless(32)
    pair = ir.VectorType.get((2,), ir.BF16Type.get())
    out = []
    for reg in words.registers.flat:  # vector<4 x i32>
        for i in range(_VEC):
            w = mgpu_utils.bitcast(mgpu_utils.vector_slice(reg, slice(i, i + 1)), i32)
            for p in range(4):
                wp = w if p == 0 else arith.shrui(w, arith.constant(i32, 4 * p))
                bits = llvm.inline_asm(
                    i32, [wp],
                    "{ .reg .b32 t, c; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xEA;"
                    " mov.b32 c, 0x43084308; sub.bf16x2 $0, t, c; }",
                    "=r,r")
                out.append(mgpu_utils.bitcast(bits, pair))
    regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((_ROWS, g)), dtype=object)
    regs.flat[:] = out
    return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _store_transposed(acc, ref):
    """Mosaic GPU (inside `inline_mgpu`): a consumer's `[64, M_pad]` f32 sum (WGMMA layout) into
    the `[M_pad, 64]` shared-memory tile `ref`, transposed, one 32-bit store a value."""
    layout = acc.layout
    index = ir.IndexType.get()
    for reg, (r, col) in zip(acc.registers.flat, layout.thread_idxs(acc.shape)):
        for v in range(layout.vector_length):
            cv = arith.addi(col, arith.constant(index, v)) if v else col
            vector.store(mgpu_utils.vector_slice(reg, slice(v, v + 1)), ref, [cv, r])


@dataclasses.dataclass(frozen=True)
class Prefetch:
    """The next int4 call a kernel warms L2 for: its weight's `k`, `n` and `group_size` (which fix
    its `Schedule` on the same `num_sms`) and `units`, how many of each of its CTAs' first units
    (their words and scales) this call's CTA of the same index prefetches into L2 once it has
    issued its own last copy."""

    k: int
    n: int
    group_size: int
    units: int

    def __post_init__(self):
        if self.units < 1:
            raise ValueError(f"Prefetch.units={self.units} must be >= 1")


def _unit_tiles(u, w_ref, s_ref, sched: Schedule, blocks: BlockSizes, g: int):
    """Unit u's GMEM tiles: its words `[consumers, tile_k // g, g // 16, 128]`, its scales
    `[tile_k // g, rows]`, and its first K index."""
    block = lax.div(u, sched.steps)
    k0 = lax.rem(u, sched.steps) * blocks.tile_k
    gps, nc = blocks.tile_k // g, blocks.consumers
    return (w_ref.at[pl.ds(block * nc, nc), pl.ds(k0 // g, gps)],
            s_ref.at[pl.ds(k0 // g, gps), pl.ds(block * blocks.rows, blocks.rows)], k0)


def _prefetch_next(c, w_ref, s_ref, pf: Prefetch, num_sms: int):
    """CTA c's part of `pf`: the first `pf.units` units of the next call's CTA c, as that call's
    producer will copy them (the same tiles, so the same L2 lines)."""
    blocks = blocks_for(pf.k)
    sched = Schedule.make(pf.k, pf.n, blocks, num_sms)
    v0, v1 = sched.run(c, lax.div)

    @pl.loop(0, pf.units)
    def _unit(j):
        @pl.when((c < sched.ctas) & (v0 + j < v1))
        def _():
            words, scales, _ = _unit_tiles(v0 + j, w_ref, s_ref, sched, blocks, pf.group_size)
            plgpu.async_prefetch(words)
            plgpu.async_prefetch(scales)


def _kernel(x_ref, w_ref, s_ref, *refs, m: int, group_size: int, blocks: BlockSizes,
            sched: Schedule, in_place: bool, prefetch: Prefetch | None, num_sms: int):
    # x_ref: [M or M_pad, K] bf16; w_ref: [N // 64, K // g, g // 16, 128] int32 (`pack_codes`);
    # s_ref: [K // g, N] bf16 or f32; refs: (interpret mode only: the [64, g] `_word_map`), then
    # out_ref: [row blocks, pieces, m, rows] f32 (GMEM: each block's partial sums, `Schedule`,
    # row-major in M like y, the m real rows only)
    *word_map, out_ref = refs
    if prefetch is not None:  # the next call's words and scales
        pw_ref, ps_ref, *word_map = word_map
    m_pad = round_up(m, 8)
    tile_k, stages, g = blocks.tile_k, blocks.num_stages, group_size
    gps = tile_k // g
    nc = blocks.consumers
    c = lax.axis_index("cta")
    u0, u1 = sched.run(c, lax.div)  # this CTA's units
    n_units = u1 - u0
    words_layout = plgpu.Layout.WG_STRIDED((g // 16, 128), vec_size=_VEC)
    to_operand = plgpu.inline_mgpu(
        arg_types=(words_layout,),
        return_type=plgpu.ShapeDtypeStruct((_ROWS, g), jnp.bfloat16, layout=plgpu.Layout.WGMMA),
    )(lambda ctx, words: _unpack_to_operand(words, g))
    store_transposed = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
    )(lambda ctx, acc, ref: _store_transposed(acc, ref))

    def body(w_smem, x_smem, s_smem, out_smem, a_smem, ready, free):
        # w_smem: [stages, consumers, gps, g // 16, 128] int32; x_smem: [stages, M_pad, tile_k]
        # bf16; s_smem: [stages, gps, rows] (s_ref's dtype); out_smem: [consumers, M_pad, 64] f32;
        # a_smem: [consumers, gps, 64, g] bf16 (interpret mode only)
        wg = lax.axis_index("wg")

        @pl.when(wg < nc)
        def _consumer():
            plgpu.set_max_registers(_consumer_regs(nc), action="increase")
            rows = pl.ds(wg * _ROWS, _ROWS)
            zeros = plgpu.layout_cast(jnp.zeros((_ROWS, m_pad), jnp.float32), plgpu.Layout.WGMMA)

            def step(i, acc):
                u = u0 + i
                slot = lax.rem(i, jnp.int32(stages))
                with jax.named_scope("wait"):  # a region of the timeline (`profile_dir`) only
                    plgpu.barrier_wait(ready.at[slot])

                def group_dots(*parts):
                    # Every group's wgmma is issued before any is awaited: the next group's
                    # int4 -> bf16 conversion overlaps the tensor cores' work on this one.
                    for gi, part in enumerate(parts):
                        words = w_smem.at[slot, wg, gi]
                        if in_place:
                            a = to_operand(plgpu.load(words, (), layout=words_layout))
                        else:  # the interpreter runs no inline Mosaic GPU: the same map in jnp
                            src = word_map[0][...]
                            flat = words[...].reshape(-1)
                            codes = (flat[src // 8] >> (4 * (src % 8))) & 0xF
                            a_smem.at[wg, gi][...] = (codes - 8).astype(jnp.bfloat16)
                            plgpu.commit_smem()
                            a = a_smem.at[wg, gi]
                        plgpu.wgmma(part, a, x_smem.at[slot, :, pl.ds(gi * g, g)].transpose((1, 0)))
                    return [part[...] for part in parts]

                with jax.named_scope("math"):
                    parts = pl.run_scoped(
                        group_dots, *[plgpu.ACC((_ROWS, m_pad), jnp.float32) for _ in range(gps)])
                    scales = [plgpu.load(s_smem.at[slot, gi, rows], layout=plgpu.Layout.WGMMA.reduce(1)
                                         ).astype(jnp.float32) for gi in range(gps)]
                    plgpu.barrier_arrive(free.at[slot])  # every read of this slot is done
                    for part, s in zip(parts, scales):
                        acc = acc + part * lax.broadcast_in_dim(s, part.shape, [0])

                # The row block's last K step, or this CTA's last unit: store the partial sum as
                # the block's piece and start the next block from zero.
                block = lax.div(u, sched.steps)
                flush = (lax.rem(u + 1, sched.steps) == 0) | (i == n_units - 1)

                @pl.when(flush)
                @jax.named_scope("flush")
                def _flush():
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last store read it
                    if in_place:
                        store_transposed(acc, out_smem.at[wg])
                    else:  # the interpreter runs no inline Mosaic GPU
                        out_smem.at[wg][...] = acc.T
                    plgpu.commit_smem()
                    piece = c - sched.first_cta(block, lax.div)
                    plgpu.copy_smem_to_gmem(out_smem.at[wg, pl.ds(0, m)],  # the m real rows
                                            out_ref.at[block, piece, :, rows])

                return lax.select(lax.broadcast_in_dim(flush, acc.shape, ()), zeros, acc)

            lax.fori_loop(0, n_units, step, zeros)
            with jax.named_scope("drain"):
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == nc)
        def _producer():
            plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")

            # The ring runs on across row blocks: only the tiles' offsets change.
            def load(i, slot):
                words, scales, k0 = _unit_tiles(u0 + i, w_ref, s_ref, sched, blocks, g)
                with jax.named_scope("issue"):
                    plgpu.copy_gmem_to_smem(words, w_smem.at[slot], ready.at[slot])
                    plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(0, m_pad), pl.ds(k0, tile_k)],
                                            x_smem.at[slot], ready.at[slot])
                    plgpu.copy_gmem_to_smem(scales, s_smem.at[slot], ready.at[slot])

                if prefetch is not None:
                    @pl.when(i == n_units - 1)
                    def _warm_next():
                        _prefetch_next(c, pw_ref, ps_ref, prefetch, num_sms)

            with jax.named_scope("ring"):
                stream_ring(load, n_units, stages, free)

    pl.run_scoped(
        body,
        plgpu.SMEM((stages, nc, gps, g // 16, 128), jnp.int32),
        plgpu.SMEM((stages, m_pad, tile_k), jnp.bfloat16,
                   transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((stages, gps, blocks.rows), s_ref.dtype),
        plgpu.SMEM((nc, m_pad, _ROWS), jnp.float32),
        None if in_place else plgpu.SMEM(
            (nc, gps, _ROWS, g), jnp.bfloat16,
            transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))),
        plgpu.Barrier(num_arrivals=3, num_barriers=stages),
        plgpu.Barrier(num_arrivals=nc, num_barriers=stages),
        collective_axes="wg",
    )


@functools.partial(jax.jit, static_argnames=("group_size", "blocks", "num_sms", "interpret",
                                             "profile_dir", "partial", "next_group_size",
                                             "prefetch_units"))
def int4_matmul_mgpu(x, words, scales, *, group_size: int, blocks: BlockSizes | None = None,
                     num_sms: int = 132, interpret: bool = False, profile_dir: str | None = None,
                     partial: bool = False, next_weight=None, next_group_size: int = 128,
                     prefetch_units: int = 0):
    """x [M, K] bf16/f16 @ the int4 weight (`to_hopper_layout`) -> [M, N] in x's dtype, on
    `blocks.ctas` or `num_sms` CTAs (`blocks`: `blocks_for(K)` by default). `partial=True`
    returns the CTAs' partial sums unadded, as `PartialSums` (whose `sum()` is the product).

    `profile_dir` (GPU only): each call also writes its timeline there, a Perfetto trace of every
    warpgroup's regions (the consumers' `wait`, `math`, `flush`, `drain`, the producer's `ring`
    and `issue`; Mosaic GPU's on-device profiler, SM clock cycles from each CTA's start).

    `next_weight` (`(words, scales)` of the int4 call that follows, group `next_group_size`) with
    `prefetch_units` > 0: once a CTA has issued its last copy it prefetches into L2 the first
    `prefetch_units` units of the next call's CTA of its index (`Prefetch`), so that call's ring
    starts from L2 while this call and the kernels between drain."""
    M, K = x.shape
    blocks = blocks or blocks_for(K)
    N = words.shape[0] * _ROWS
    g = group_size
    if words.shape != (N // _ROWS, K // g, g // 16, 128) or words.dtype != jnp.int32:
        raise ValueError(f"words must be [N // 64, K // g, g // 16, 128] int32 for x {x.shape}"
                         f" and g={g}; got {words.shape} {words.dtype}")
    if scales.shape != (K // g, N):
        raise ValueError(f"scales must be [K // g, N] = {(K // g, N)}; got {scales.shape}")
    if not applies(M, K, N, g, blocks):
        raise ValueError(
            f"int4_matmul_mgpu needs 1 <= M <= {_MAX_M}, g in (64, 128) dividing tile_k,"
            f" N % {blocks.rows} == 0, K % tile_k == 0 and the ring in shared memory; got"
            f" {x.shape=}, {N=}, {group_size=}, {blocks}")
    prefetch = None
    if next_weight is not None and prefetch_units > 0:
        nw, ns = next_weight
        nk, nn = ns.shape[0] * next_group_size, nw.shape[0] * _ROWS
        if (nw.shape != (nn // _ROWS, nk // next_group_size, next_group_size // 16, 128)
                or nw.dtype != jnp.int32 or ns.dtype not in _SCALE_DTYPES
                or not applies(1, nk, nn, next_group_size)):
            raise ValueError(f"next_weight must be words [N // 64, K // g, g // 16, 128] int32 and"
                             f" scales [K // g, N] bf16 or f32 of a shape the kernel takes, g="
                             f"{next_group_size}; got {nw.shape} {nw.dtype}, {ns.shape} {ns.dtype}")
        prefetch = Prefetch(nk, nn, next_group_size, prefetch_units)
    if profile_dir and interpret:
        raise ValueError(f"profile_dir={profile_dir!r} needs the GPU: the interpreter runs no on-device"
                         " profiler")
    m_pad = round_up(M, 8)
    sched = Schedule.make(K, N, blocks, num_sms)
    # On the GPU the producer's TMA reads M_pad rows of x, the rows past M as zeros (TMA fills
    # out-of-bounds reads), so x of up to 8 rows needs no padded copy; more rows than that must
    # be a whole number of TMA's 8-row tiles, and the interpreter always gets the padded copy.
    xb = x.astype(jnp.bfloat16)
    xp = jnp.pad(xb, ((0, m_pad - M), (0, 0))) if interpret or (M > 8 and M % 8) else xb
    params = None
    if profile_dir:  # room for every region a warpgroup records: 3 a step at most, and 2 more
        space = 3 * -(-sched.units // sched.ctas) + 2
        params = plgpu.CompilerParams(profile_space=space, profile_dir=profile_dir)
    kernel = plgpu.kernel(
        functools.partial(_kernel, m=M, group_size=g, blocks=blocks, sched=sched,
                          in_place=not interpret, prefetch=prefetch, num_sms=num_sms),
        compiler_params=params,
        out_type=jax.ShapeDtypeStruct((sched.tiles, sched.width, M, blocks.rows), jnp.float32),
        grid=(sched.ctas,),
        grid_names=("cta",),
        num_threads=blocks.consumers + 1,
        thread_name="wg",
        interpret=dispatch.mgpu_interpret(interpret),
    )
    word_map = (jnp.asarray(_word_map(g), jnp.int32),) if interpret else ()
    warm = () if prefetch is None else next_weight
    part = kernel(xp, words, _kernel_scales(scales), *warm, *word_map)
    # each row block: its pieces' partial sums in a fixed order (the pieces past a block's own
    # count are never written, and never read)
    y = PartialSums(part, M, x.dtype, sched)
    return y if partial else y.sum()


def int4_matmul_mgpu_reference(x, packed, scales, *, group_size: int):
    """x @ dequant(W) in f32 from the portable packing (symmetric), in x's dtype."""
    w = dequantize_int4(packed, scales, None, group_size=group_size)
    return (x.astype(jnp.float32) @ w).astype(x.dtype)
