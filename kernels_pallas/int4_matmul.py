"""Weight-only int4 matmul (Pallas, Triton backend): ``y = x @ dequant(W)``, dequantized in-kernel.

Weights (see `quant_formats`): ``packed: [K // 2, N] uint8``, byte ``(i, n)`` = code of row ``2i``
in the low nibble, row ``2i + 1`` in the high nibble; ``scales: [K // g, N]`` (any float dtype);
optional ``zeros: [K // g, N]`` (uint8 0..15 or float). Symmetric (no zeros):
``w = (q - 8) * s``; asymmetric: ``w = (q - z) * s``; codes ``q`` in 0..15.

Why this layout: a tile ``[g // 2, block_n]`` of one group is ``g // 2`` rows of ``block_n``
contiguous bytes, read with wide coalesced loads; the group's scale (and zero) is a single
``[1, block_n]`` row shared by the whole tile, so the kernel dequantizes exactly
(``q - z`` is a small integer, exact in bf16), runs the group's dot in f32 accumulation, and
multiplies the ``[M, block_n]`` partial result by the scale row once per group instead of
scaling every weight. Packing along K splits the activation into even and odd columns; the
wrapper de-interleaves ``x`` once (``[2, M, K // 2]``, a few KB at decode sizes) so every
in-kernel load is contiguous.

Decode (M = 1..64) is bound by the bytes of weights read. The grid is
``(N // block_n, splits, M_pad // block_m)``: ``splits`` cuts K into equal runs of groups so
that enough programs stream weights to fill every SM; split partial sums (f32) are added by
one small XLA reduction. ``M == 1`` uses a multiply-reduce on CUDA cores (no tensor-core
padding to 16 rows); otherwise rows are padded to ``block_m`` (>= 16) and each group is two
``dot``s (even and odd rows). Any M is correct (large M tiles M over the grid).

Constraints: ``group_size`` divides K (ValueError otherwise), ``group_size`` in 32/64/128
for the kernel (other even sizes run the reference); ``N`` needs a power-of-two divisor >= 16
for the kernel, else the reference (dequantize-then-dot in XLA) runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas._matmul_common import (
    check_x_dtype, fit_block, is_pow2, largest_divisor_le, pad_to, reduce_split_k, round_up,
    shrink_block, split_k_output)
from pallax.kernels_pallas.quant_formats import GROUP_SIZES, check_group_size, dequantize_int4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the int4 kernel.

    block_n: output columns per program (power of two >= 16; shrunk to divide N).
    block_m: max rows of x per program when M > 1 (power of two >= 16).
    splits: K is cut into up to this many runs of groups (the largest count <= splits
      dividing K // group_size), one program each; > 1 adds a small f32 reduction.
    groups_per_step: groups loaded per loop iteration (unrolled; shrunk to divide the run).
    fold_zero: bf16/f16 dot path: dot with the biased codes and subtract rowsum(x) * offset
      per group instead of subtracting the offset from every weight.
    m1_dot: M == 1 also takes the tensor-core path (rows padded to 16) instead of the
      CUDA-core multiply-add.
    num_warps, num_stages: Triton launch / software-pipelining parameters.
    """

    block_n: int = 128
    block_m: int = 64
    splits: int = 4
    groups_per_step: int = 1
    num_warps: int = 4
    num_stages: int = 4
    fold_zero: bool = False
    m1_dot: bool = False

    def __post_init__(self):
        if not is_pow2(self.block_n) or self.block_n < 16:
            raise ValueError(f"block_n={self.block_n} must be a power of two >= 16")
        if not is_pow2(self.block_m) or self.block_m < 16:
            raise ValueError(f"block_m={self.block_m} must be a power of two >= 16")
        for name in ("splits", "groups_per_step", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @classmethod
    def default(cls, m: int, k: int, n: int, group_size: int) -> "BlockSizes":
        """Measured on an H100 (bench/results/matmul_h100.json): M == 1 wants ~450-500
        programs of 64-128 columns, small M ~220-260 programs of 256 columns, larger M 128."""
        if m == 1:
            block_n, target, warps, stages = (128, 448, 8, 4) if n >= 8192 else (64, 448, 4, 4)
        elif m <= 32:
            block_n, target, warps, stages = 256, 224, 4, 3
        else:
            block_n, target, warps, stages = 128, 224, 4, 4
        block_n = fit_block(n, block_n) or 16
        splits = pl.next_power_of_2(-(-target // max(1, n // block_n)))
        return cls(block_n=block_n, splits=min(splits, k // group_size), num_warps=warps,
                   num_stages=stages)


# Codes -> floats without integer-to-float conversions (I2F runs at 1/8 of the FMA rate and
# bounded the first version at ~1.1 TB/s): OR a nibble into the mantissa of a power of two
# whose unit in the last place is 1, giving exactly MAGIC + q; subtract MAGIC + z after.
_MAGIC = {  # dtype: (bits dtype, exponent bits, MAGIC)
    jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x4300, 128.0),
    jnp.dtype(jnp.float16): (jnp.uint16, 0x6400, 1024.0),
    jnp.dtype(jnp.float32): (jnp.uint32, 0x4B000000, 8388608.0),
}


def _unpack(b, dtype):
    """uint8 bytes [rows, n] -> (low, high) nibbles as ``dtype`` values MAGIC + q, and MAGIC."""
    bits, exponent, magic = _MAGIC[jnp.dtype(dtype)]
    w = b.astype(bits)
    lo = lax.bitcast_convert_type((w & 0xF) | exponent, dtype)
    hi = lax.bitcast_convert_type((w >> 4) | exponent, dtype)
    return lo, hi, magic


def _int4_kernel(x_ref, w_ref, s_ref, *rest, group_size, groups_per_split, groups_per_step,
                 has_zeros, row_dot, fold_zero):
    # x_ref: [2, block_m, K // 2]   even (0) / odd (1) columns of x
    # w_ref: [K // 2, block_n]      uint8, two rows of K per byte
    # s_ref: [G, block_n]           group scales
    # z_ref: [G, block_n]           group zero points (asymmetric only)
    # o_ref: [block_m, block_n]     output (or this split's f32 partial sum)
    if has_zeros:
        z_ref, o_ref = rest
    else:
        (o_ref,) = rest
    half = group_size // 2
    block_m, block_n = o_ref.shape
    split = pl.program_id(1)
    # Dot path: weights in x's dtype (q - z is a small integer, exact there); else f32.
    wdtype = x_ref.dtype if row_dot else jnp.float32

    def group(gi, acc):
        r = pl.multiple_of(gi * half, half)
        lo, hi, magic = _unpack(w_ref[pl.ds(r, half), :], wdtype)  # [half, block_n] each
        z = z_ref[pl.ds(gi, 1), :].astype(jnp.float32) if has_zeros else 8.0  # [1, block_n]
        s = s_ref[pl.ds(gi, 1), :].astype(jnp.float32)  # [1, block_n]
        offset = magic + z
        if row_dot:
            xe = x_ref[0, :, pl.ds(r, half)]  # [block_m, half]
            xo = x_ref[1, :, pl.ds(r, half)]
            if fold_zero:  # x @ (MAGIC + q) - rowsum(x) * (MAGIC + z): no per-weight subtract
                part = jnp.dot(xe, lo, preferred_element_type=jnp.float32)
                part += jnp.dot(xo, hi, preferred_element_type=jnp.float32)
                xsum = jnp.sum(xe.astype(jnp.float32) + xo.astype(jnp.float32), axis=1)
                part -= xsum[:, None] * offset
            else:
                off = jnp.broadcast_to(offset, (1, block_n)).astype(wdtype)
                part = jnp.dot(xe, lo - off, preferred_element_type=jnp.float32)
                part += jnp.dot(xo, hi - off, preferred_element_type=jnp.float32)
            return acc + part * s
        # block_m == 1: multiply-add on CUDA cores into a [half, block_n] accumulator (one
        # cross-row reduction at the end, none per group).
        xe = x_ref[0, 0, pl.ds(r, half)].astype(jnp.float32)  # [half]
        xo = x_ref[1, 0, pl.ds(r, half)].astype(jnp.float32)
        return acc + ((lo - offset) * xe[:, None] + (hi - offset) * xo[:, None]) * s

    def step(t, acc):
        g0 = split * groups_per_split + t * groups_per_step
        for j in range(groups_per_step):
            acc = group(g0 + j, acc)
        return acc

    acc_shape = (block_m, block_n) if row_dot else (half, block_n)
    acc = lax.fori_loop(0, groups_per_split // groups_per_step, step,
                        jnp.zeros(acc_shape, jnp.float32))
    if not row_dot:
        acc = jnp.sum(acc, axis=0)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "block_sizes", "interpret"))
def _int4_matmul_kernel(x, packed, scales, zeros, *, group_size, block_sizes, interpret):
    m, k = x.shape
    n = packed.shape[1]
    groups = k // group_size
    bs = block_sizes
    block_n = fit_block(n, bs.block_n)
    block_m = 1 if m == 1 and not bs.m1_dot else shrink_block(m, bs.block_m)
    m_pad = round_up(m, block_m)
    splits = largest_divisor_le(groups, bs.splits)
    per_split = groups // splits
    per_step = largest_divisor_le(per_split, bs.groups_per_step)

    # [2, M_pad, K // 2]: even / odd columns, so every kernel load of x is contiguous.
    x_eo = pad_to(jnp.moveaxis(x.reshape(m, k // 2, 2), -1, 0), (2, m_pad, k // 2))

    grid = (n // block_n, splits, m_pad // block_m)
    in_specs = [
        pl.BlockSpec((2, block_m, k // 2), lambda j, s, i: (0, i, 0)),
        pl.BlockSpec((k // 2, block_n), lambda j, s, i: (0, j)),
        pl.BlockSpec((groups, block_n), lambda j, s, i: (0, j)),
    ]
    args = [x_eo, packed, scales]
    if zeros is not None:
        in_specs.append(pl.BlockSpec((groups, block_n), lambda j, s, i: (0, j)))
        args.append(zeros)
    out_shape, out_spec = split_k_output(splits, m_pad, n, block_m, block_n, x.dtype)

    kernel = functools.partial(
        _int4_kernel, group_size=group_size, groups_per_split=per_split,
        groups_per_step=per_step, has_zeros=zeros is not None, row_dot=block_m > 1,
        fold_zero=bs.fold_zero and x.dtype != jnp.float32)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="int4_matmul",
    )(*args)
    return reduce_split_k(out, splits, m, x.dtype)


def _validate(x, packed, scales, zeros, group_size):
    if x.ndim != 2 or packed.ndim != 2:
        raise ValueError(f"x must be [M, K] and packed [K // 2, N]; got {x.shape} and {packed.shape}")
    check_x_dtype(x)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed int4 weights must be uint8 (two codes per byte), got {packed.dtype}")
    m, k = x.shape
    if packed.shape[0] * 2 != k:
        raise ValueError(f"packed rows {packed.shape[0]} != K // 2 = {k // 2} (x is {x.shape})")
    check_group_size(k, group_size)
    n = packed.shape[1]
    want = (k // group_size, n)
    if scales.shape != want:
        raise ValueError(f"scales shape {scales.shape} != (K // group_size, N) = {want}")
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"scales must be floating point, got {scales.dtype}")
    if zeros is not None and zeros.shape != want:
        raise ValueError(f"zeros shape {zeros.shape} != (K // group_size, N) = {want}")


def int4_matmul(x, packed, scales, zeros=None, *, group_size: int,
                block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``x [M, K] @ dequant(packed [K//2, N], scales [K//g, N], zeros) -> [M, N] x.dtype``.

    GPU: the Pallas kernel; CPU: the reference, or the kernel in interpret mode when
    ``interpret=True`` or `dispatch` says ``interpret``.
    """
    _validate(x, packed, scales, zeros, group_size)
    mode = "interpret" if interpret else dispatch.resolve()
    m, k = x.shape
    n = packed.shape[1]
    if mode == "reference" or group_size not in GROUP_SIZES or fit_block(n, 16) is None:
        return int4_matmul_reference(x, packed, scales, zeros, group_size=group_size)
    if block_sizes is None:
        block_sizes = BlockSizes.default(m, k, n, group_size)
    return _int4_matmul_kernel(x, packed, scales, zeros, group_size=group_size,
                               block_sizes=block_sizes, interpret=mode == "interpret")


def int4_matmul_reference(x, packed, scales, zeros=None, *, group_size: int):
    """Dequantize to f32, f32 dot, cast to ``x.dtype``."""
    w = dequantize_int4(packed, scales, zeros, group_size=group_size)  # [K, N] f32
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)
