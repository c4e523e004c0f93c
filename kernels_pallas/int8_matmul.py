"""Weight-only int8 matmul: ``y = (x @ w_q) * scale``, per-output-channel scales.

Weights (see `quant_formats.quantize_int8`): ``w_q: [K, N] int8``, ``w_scale: [N]`` (or
``[1, N]``) float; ``w = w_q * w_scale[n]``. Because the scale is per output column it factors
out of the K sum: the kernel converts int8 -> ``x.dtype`` (exact), accumulates the dot in f32,
and scales the ``[block_m, block_n]`` result once.

Two implementations (``impl``):

- ``"xla"``: ``dot(x, w_q.astype(x.dtype)) * scale`` inside one jit; XLA fuses the convert
  into its GEMM's operand load, so only int8 bytes cross HBM.
- ``"pallas"``: the Triton kernel below, split over N and K like the int4 kernel (f32 partial
  sums added by a small XLA reduction when ``splits > 1``); ``M == 1`` uses a multiply-reduce.

`DEFAULT_IMPL` is the faster at M = 1..16 on an H100 (bench/results/matmul_h100.json, us per
matmul, [K, N] = 4096x14336 / 14336x4096): M=1: pallas 29.4 / 34.8, xla 49.7 / 33.5; M=4: pallas
28.0 / 25.4, xla 26.9 / 24.5; M=16: pallas 27.8 / 25.4, xla 28.7 / 26.3 (bf16 XLA dot: 40-42).
The two are within 5% except at M=1 on the wide shape, where XLA's GEMV is 1.7x slower, so the
Pallas kernel is the default.
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

IMPLS = ("xla", "pallas")
DEFAULT_IMPL = "pallas"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the int8 kernel.

    block_n: output columns per program (power of two >= 16, shrunk to divide N).
    block_k: rows of K per loop step (power of two >= 16, shrunk to divide K).
    block_m: max rows of x per program when M > 1 (power of two >= 16).
    splits: K steps are cut into up to this many runs (largest count dividing the steps).
    """

    block_n: int = 128
    block_k: int = 128
    block_m: int = 64
    splits: int = 4
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if not is_pow2(v) or v < 16:
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        for name in ("splits", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @classmethod
    def default(cls, m: int, k: int, n: int) -> "BlockSizes":
        """Measured on an H100: M == 1 best with 8 K splits; M > 1 with ~100-130 programs."""
        if m == 1:
            return cls(splits=8)
        return cls(splits=1 if n // 128 >= 100 else 4)


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k, steps_per_split, row_dot):
    # x_ref: [block_m, K]        activations
    # w_ref: [K, block_n]        int8 weights
    # s_ref: [1, block_n]        per-output-channel scales
    # o_ref: [block_m, block_n]  output (or this split's f32 partial sum)
    block_m, block_n = o_ref.shape
    split = pl.program_id(1)

    def step(t, acc):
        kk = pl.multiple_of((split * steps_per_split + t) * block_k, block_k)
        w = w_ref[pl.ds(kk, block_k), :]  # [block_k, block_n] int8
        if row_dot:
            xb = x_ref[:, pl.ds(kk, block_k)]  # [block_m, block_k]
            return acc + jnp.dot(xb, w.astype(xb.dtype), preferred_element_type=jnp.float32)
        xb = x_ref[0, pl.ds(kk, block_k)].astype(jnp.float32)  # [block_k]
        return acc + jnp.sum(w.astype(jnp.float32) * xb[:, None], axis=0)[None, :]

    acc = lax.fori_loop(0, steps_per_split, step, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = (acc * s_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def _int8_matmul_kernel(x, w_q, w_scale, *, block_sizes, interpret):
    m, k = x.shape
    n = w_q.shape[1]
    bs = block_sizes
    block_n, block_k = fit_block(n, bs.block_n), fit_block(k, bs.block_k)
    block_m = 1 if m == 1 else shrink_block(m, bs.block_m)
    m_pad = round_up(m, block_m)
    steps = k // block_k
    splits = largest_divisor_le(steps, bs.splits)
    x = pad_to(x, (m_pad, k))
    scale = w_scale.reshape(1, n)
    out_shape, out_spec = split_k_output(splits, m_pad, n, block_m, block_n, x.dtype)
    kernel = functools.partial(_int8_kernel, block_k=block_k, steps_per_split=steps // splits,
                               row_dot=block_m > 1)
    out = pl.pallas_call(
        kernel,
        grid=(n // block_n, splits, m_pad // block_m),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda j, s, i: (i, 0)),
            pl.BlockSpec((k, block_n), lambda j, s, i: (0, j)),
            pl.BlockSpec((1, block_n), lambda j, s, i: (0, j)),
        ],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="int8_matmul",
    )(x, w_q, scale)
    return reduce_split_k(out, splits, m, x.dtype)


@jax.jit
def _int8_matmul_xla(x, w_q, w_scale):
    y = jnp.dot(x, w_q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w_scale.reshape(1, -1).astype(jnp.float32)).astype(x.dtype)


def int8_matmul(x, w_q, w_scale, *, impl: str | None = None,
                block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``x [M, K] @ (w_q [K, N] int8 * w_scale [N]) -> [M, N] x.dtype``.

    GPU: ``impl`` (default `DEFAULT_IMPL`); CPU: the reference, or the Pallas kernel in
    interpret mode when ``interpret=True`` or `dispatch` says ``interpret``.
    """
    if x.ndim != 2 or w_q.ndim != 2 or x.shape[1] != w_q.shape[0]:
        raise ValueError(f"x must be [M, K] and w_q [K, N]; got {x.shape} and {w_q.shape}")
    check_x_dtype(x)
    if w_q.dtype != jnp.int8:
        raise ValueError(f"w_q must be int8, got {w_q.dtype}")
    n = w_q.shape[1]
    if w_scale.size != n or w_scale.shape not in ((n,), (1, n)):
        raise ValueError(f"w_scale shape {w_scale.shape} must be (N,) or (1, N) with N={n}")
    impl = impl or DEFAULT_IMPL
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return int8_matmul_reference(x, w_q, w_scale)
    if mode == "interpret" or impl == "pallas":
        if fit_block(n, 16) is None or fit_block(x.shape[1], 16) is None:
            return _int8_matmul_xla(x, w_q, w_scale)
        if block_sizes is None:
            block_sizes = BlockSizes.default(x.shape[0], x.shape[1], n)
        return _int8_matmul_kernel(x, w_q, w_scale, block_sizes=block_sizes,
                                   interpret=mode == "interpret")
    return _int8_matmul_xla(x, w_q, w_scale)


def int8_matmul_reference(x, w_q, w_scale):
    """Dequantize to f32, f32 dot, cast to ``x.dtype``."""
    w = w_q.astype(jnp.float32) * w_scale.reshape(1, -1).astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST).astype(x.dtype)
