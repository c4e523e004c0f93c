"""Quantized linear weights: the pytrees `linear` dispatches on (the `QuantizedWeight` protocol).

Each type is a `flax.struct.dataclass`; every array leaf may carry leading axes (the decoder
stacks layers as `[L, ...]` and `lax.scan` slices them), and static metadata is a non-pytree
field. `out_axes` names the axis of each field that runs over the output channels (for
`linear.concat_out`). `matmul(x)` works on one unstacked weight: `x [..., K] -> [..., N]`,
leading axes of `x` flattened to the kernel's M.

    Int8Weight  w_q [K, N] int8, scale [N] f32                    weight-only, per output channel
    Int4Weight  packed [K/2, N] uint8, scales [K/g, N] bf16,      RTN or AWQ, group g along K
                zeros [K/g, N] uint8 | None, act_scale [K] | None
    Fp8Weight   w_q [N, K] float8_e4m3fn, scale [N] f32           W8A8, activations per token
    Int4HopperWeight  words [N/64, K/g, g/16, 128] int32,         symmetric int4 in the layout of
                scales [K/g, N] bf16, act_scale [K] | None        the Hopper kernel (serving only)

Which implementation runs (`kernels_pallas.dispatch`): on GPU the Pallas kernel, except fp8 (see
`FP8_IMPL`); elsewhere the pure-jnp reference (or the kernel in interpret mode when asked).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas.fp8_matmul import fp8_linear, fp8_matmul_reference
from pallax.kernels_pallas import fp8_matmul_mgpu, int4_matmul_mgpu
from pallax.kernels_pallas._matmul_common import PartialSums
from pallax.kernels_pallas.int4_matmul import int4_matmul
from pallax.kernels_pallas.int8_matmul import int8_matmul
from pallax.kernels_pallas.quant_formats import (check_group_size, dequantize_int4, quantize_fp8,
                                                 quantize_int4, quantize_int8)
from pallax.model.linear import TransposedWeight, dense_matmul, flat_rows, gemm_rows, unflat_rows

# The fp8 product on a GPU (`_fp8_gpu`): "xla", XLA's e4m3 dot (cuBLASLt on the FP8 tensor
# cores); "mgpu", our Mosaic GPU kernel on Hopper; "pallas", our Triton kernel. As GEMMs on one
# H200 at 8192^3 (bench/results/matmul_fp8_h200.json) the Mosaic GPU kernel and XLA's dot run at
# 1.68-1.76x and 1.69x the bf16 dot (the Triton kernel 0.68x), the Mosaic one 1.00-1.33x XLA's
# at Llama-3-8B's projections with 2048 or 8192 rows. With the per-token quantization of x
# before it, the product through XLA's dot was 3-6% faster at every whole-tile shape in an
# interleaved A/B of `device_time` loops on the next machine start
# (bench/results/fp8_product_ab_h200.jsonl: 973 against 1034 us at 8192^3), the Mosaic one only
# at 1000 rows (1.27x). A profiler trace says the opposite (fp8_product_profile_h200.jsonl):
# 857 against 910 us of kernels at 8192^3 (the kernel 741 us; cuBLAS 693 us plus 99 us to scale
# its f32 output), 181 against 209 us at 4096x4096x6144; the loop adds about 120 us more a call
# to the Mosaic path than to XLA's, unexplained. XLA until a prefill step settles it.
FP8_IMPL = "xla"



@struct.dataclass
class Int8Weight:
    """Weight-only int8, per-output-channel scale: `w = w_q * scale[n]`."""

    w_q: jax.Array  # [..., K, N] int8
    scale: jax.Array  # [..., N] f32
    format: ClassVar[str] = "int8"
    out_axes: ClassVar[dict[str, int]] = {"w_q": -1, "scale": -1}  # see linear.concat_out

    @classmethod
    def quantize(cls, w: jax.Array) -> "Int8Weight":
        """From a dense `[K, N]` weight."""
        w_q, scale = quantize_int8(w)
        return cls(w_q=w_q, scale=scale)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w_q.shape[-2:])

    def matmul(self, x: jax.Array) -> jax.Array:
        k, _ = self.shape
        return unflat_rows(int8_matmul(flat_rows(x, k), self.w_q, self.scale), x)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.w_q.astype(jnp.float32) * self.scale.astype(jnp.float32)[..., None, :]).astype(dtype)


@struct.dataclass
class Int4Weight:
    """Group-wise int4 (`quant_formats` layout), optionally activation-aware (AWQ).

    With AWQ the stored codes quantize `diag(s) W` and `act_scale = s`: `x W = (x / s)(diag(s) W)`,
    so `matmul` divides x by s (one elementwise op on the activations) before the int4 kernel.
    """

    packed: jax.Array  # [..., K // 2, N] uint8
    scales: jax.Array  # [..., K // g, N] bf16
    zeros: jax.Array | None = None  # [..., K // g, N] uint8 (asymmetric) or None (symmetric)
    act_scale: jax.Array | None = None  # [..., K] f32 (AWQ) or None
    group_size: int = struct.field(pytree_node=False, default=128)
    format: ClassVar[str] = "int4"
    out_axes: ClassVar[dict[str, int]] = {"packed": -1, "scales": -1, "zeros": -1}  # act_scale: shared

    @classmethod
    def quantize(cls, w: jax.Array, group_size: int = 128, *, symmetric: bool = True,
                 act_scale: jax.Array | None = None) -> "Int4Weight":
        """Round-to-nearest of a dense `[K, N]` weight (of `diag(act_scale) w` when given)."""
        check_group_size(w.shape[0], group_size)
        w32 = w.astype(jnp.float32)
        if act_scale is not None:
            act_scale = act_scale.astype(jnp.float32)
            w32 = w32 * act_scale[:, None]
        packed, scales, zeros = quantize_int4(w32, group_size, symmetric=symmetric)
        return cls(packed=packed, scales=scales, zeros=zeros, act_scale=act_scale, group_size=group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (2 * self.packed.shape[-2], self.packed.shape[-1])

    def matmul(self, x: jax.Array) -> jax.Array:
        k, _ = self.shape
        x2 = flat_rows(x, k)
        if self.act_scale is not None:
            x2 = (x2.astype(jnp.float32) / self.act_scale.astype(jnp.float32)).astype(x.dtype)
        y = int4_matmul(x2, self.packed, self.scales, self.zeros, group_size=self.group_size)
        return unflat_rows(y, x)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The effective dense weight (AWQ scale divided back out)."""
        lead = self.packed.shape[:-2]
        fn = lambda p, s, z: dequantize_int4(p, s, z, group_size=self.group_size)  # noqa: E731
        for _ in lead:
            fn = jax.vmap(fn)
        w = fn(self.packed, self.scales, self.zeros)
        if self.act_scale is not None:
            w = w / self.act_scale.astype(jnp.float32)[..., :, None]
        return w.astype(dtype)


@struct.dataclass
class Int4HopperWeight:
    """A symmetric `Int4Weight` in the layout of the Hopper (Mosaic GPU) kernel
    (`int4_matmul_mgpu`: unsigned codes `q + 8`, eight to a 32-bit word, each `[64, g]` tile of
    output channels x one group in the order the kernel's threads hold the wgmma operand).

    The serving form on H100/H200 (`hopper_layout`); quantizing and saving keep `Int4Weight`.
    Decode-sized M runs the kernel; larger M (prefill chunks) and shapes it does not take
    dequantize to x's dtype and run one XLA dot.
    """

    words: jax.Array  # [..., N // 64, K // g, g // 16, 128] int32
    scales: jax.Array  # [..., K // g, N] bf16 (as quantized) or f32
    act_scale: jax.Array | None = None  # [..., K] f32 (AWQ) or None
    group_size: int = struct.field(pytree_node=False, default=128)
    format: ClassVar[str] = "int4-hopper"
    warms_then: ClassVar[bool] = True  # `matmul(x, then=w)` prefetches w's first tiles into L2
    out_axes: ClassVar[dict[str, int]] = {"words": -4, "scales": -1}  # act_scale: shared
    out_units: ClassVar[dict[str, int]] = {"words": 64}  # output channels per step of the axis

    @classmethod
    def from_int4(cls, w: Int4Weight) -> "Int4HopperWeight":
        words, scales = int4_matmul_mgpu.to_hopper_layout(w.packed, w.scales, w.zeros,
                                                          group_size=w.group_size)
        return cls(words=words, scales=scales, act_scale=w.act_scale, group_size=w.group_size)

    def to_int4(self) -> Int4Weight:
        """Back to the portable packing (lossless: scales were bf16 before `from_int4`)."""
        packed = int4_matmul_mgpu.from_hopper_layout(self.words, self.group_size)
        return Int4Weight(packed=packed, scales=self.scales.astype(jnp.bfloat16),
                          act_scale=self.act_scale, group_size=self.group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.words.shape[-3] * self.group_size, self.words.shape[-4] * 64)

    def matmul(self, x: jax.Array, *, then=None) -> jax.Array:
        y = self.matmul_partials(x, then=then)
        return unflat_rows(y.sum(), x) if isinstance(y, PartialSums) else y

    def matmul_partials(self, x: jax.Array, *, then=None) -> "PartialSums | jax.Array":
        """The kernel's partial sums of x's rows [M, N], unadded (`linear.linear_partials`), where
        it runs; else the product [..., N]. Where `then` (the weight the next matmul reads) is an
        unstacked `Int4HopperWeight` the kernel takes, the kernel prefetches the first
        `int4_matmul_mgpu.PREFETCH_UNITS` units of each of its CTAs into L2 as it finishes."""
        k, n = self.shape
        x2 = flat_rows(x, k)
        if self.act_scale is not None:
            x2 = (x2.astype(jnp.float32) / self.act_scale.astype(jnp.float32)).astype(x.dtype)
        mode = dispatch.resolve()
        if mode != "reference" and int4_matmul_mgpu.applies(x2.shape[0], k, n, self.group_size):
            return int4_matmul_mgpu.int4_matmul_mgpu(x2, self.words, self.scales,
                                                     group_size=self.group_size,
                                                     interpret=mode == "interpret", partial=True,
                                                     **self._warming(then))
        return unflat_rows(dense_matmul(x2, self._scaled_codes().astype(x2.dtype)), x)

    @staticmethod
    def _warming(then) -> dict:
        """The kernel's arguments that prefetch `then` (none where it cannot)."""
        units = int4_matmul_mgpu.PREFETCH_UNITS
        if not (units and isinstance(then, Int4HopperWeight) and then.words.ndim == 4):
            return {}
        if not int4_matmul_mgpu.applies(1, *then.shape, then.group_size):
            return {}
        return dict(next_weight=(then.words, then.scales), next_group_size=then.group_size,
                    prefetch_units=units)

    def _scaled_codes(self) -> jax.Array:
        """`q * s` as f32 `[..., K, N]` (the stored weight, AWQ scale still in)."""
        q = int4_matmul_mgpu.unpack_codes(self.words, self.group_size).astype(jnp.float32) - 8
        w = jnp.swapaxes(q, -1, -2)
        return w * jnp.repeat(self.scales.astype(jnp.float32), self.group_size, axis=-2)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = self._scaled_codes()
        if self.act_scale is not None:
            w = w / self.act_scale.astype(jnp.float32)[..., :, None]
        return w.astype(dtype)


def hopper_layout(params):
    """`params` with every symmetric `Int4Weight` the Hopper kernel can take (N % 128, K % 128,
    g 64 or 128) as an `Int4HopperWeight`; everything else unchanged."""
    def convert(w):
        if not isinstance(w, Int4Weight) or w.zeros is not None or w.packed.ndim != 2:
            return w
        k, n = w.shape
        if not int4_matmul_mgpu.applies(1, k, n, w.group_size):
            return w
        return Int4HopperWeight.from_int4(w)

    return jax.tree.map(convert, params, is_leaf=lambda w: isinstance(w, Int4Weight))


def portable_layout(params):
    """The inverse of `hopper_layout` and `linear.transposed_layout`: serving-only layouts back to
    the portable ones (int4 packing, dense `[K, N]`)."""
    def convert(w):
        if isinstance(w, Int4HopperWeight):
            return w.to_int4()
        if isinstance(w, TransposedWeight):
            return w.dequantize(w.wt.dtype)
        return w

    return jax.tree.map(convert, params, is_leaf=lambda w: isinstance(w, (Int4HopperWeight, TransposedWeight)))


@struct.dataclass
class Fp8Weight:
    """W8A8 e4m3: weights per output channel (offline), activations per token (at run time).

    Stored `[N, K]` (K contiguous per output channel): the layout both cuBLASLt's fp8 GEMM and
    our kernel's fp8 wgmma read without a transpose.
    """

    w_q: jax.Array  # [..., N, K] float8_e4m3fn
    scale: jax.Array  # [..., N] f32
    format: ClassVar[str] = "fp8"
    out_axes: ClassVar[dict[str, int]] = {"w_q": -2, "scale": -1}

    @classmethod
    def quantize(cls, w: jax.Array) -> "Fp8Weight":
        """From a dense `[K, N]` weight."""
        w_q, scale = quantize_fp8(w.T, axis=-1)  # [N, K], [N, 1]
        return cls(w_q=w_q, scale=scale[:, 0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w_q.shape[-2:][::-1])

    def matmul(self, x: jax.Array) -> jax.Array:
        k, _ = self.shape
        x2 = flat_rows(x, k)
        mode = dispatch.resolve()
        if mode == "reference":
            x_q, x_s = quantize_fp8(x2, axis=-1)  # [M, K] e4m3, [M, 1] f32
            y = fp8_matmul_reference(x_q, x_s, self.w_q, self.scale, out_dtype=x.dtype, w_layout="nk")
        elif mode == "interpret":
            y = fp8_linear(x2, self.w_q, self.scale, w_layout="nk", interpret=True)
        else:
            y = _fp8_gpu(x2, self.w_q, self.scale)
        return unflat_rows(y, x)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        w = self.w_q.astype(jnp.float32) * self.scale.astype(jnp.float32)[..., :, None]  # [..., N, K]
        return jnp.swapaxes(w, -1, -2).astype(dtype)


def _fp8_gpu(x, w_q, w_scale, *, interpret: bool = False):
    """x [M, K] -> per-token e4m3 @ w_q [N, K] on a GPU, by `FP8_IMPL`: "mgpu" runs the Mosaic GPU
    kernel where it applies (Hopper, bf16/f16 x, whole column tiles), "pallas" the Triton
    kernel, and "xla" (or "mgpu" where it does not apply) XLA's fp8 dot."""
    k, n = w_q.shape[1], w_q.shape[0]
    if (FP8_IMPL == "mgpu" and dispatch.on_hopper() and fp8_matmul_mgpu.applies(k, n)
            and x.dtype in (jnp.bfloat16, jnp.float16)):
        x_q, x_s = quantize_fp8(x, axis=-1)
        return fp8_matmul_mgpu.fp8_matmul_mgpu(x_q, x_s, w_q, w_scale, out_dtype=x.dtype,
                                               interpret=interpret)
    if FP8_IMPL == "pallas":
        return fp8_linear(x, w_q, w_scale, w_layout="nk", interpret=interpret)
    return _fp8_xla(x, w_q, w_scale)


def _fp8_xla(x, w_q, w_scale):
    """x [M, K] -> per-token e4m3, XLA fp8 dot against w_q [N, K] (f32 accumulation), both scales."""
    x_q, x_s = quantize_fp8(x, axis=-1)
    dot = lambda a: lax.dot_general(a, w_q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # noqa: E731
    y = gemm_rows(dot, x_q)
    return (y * x_s * w_scale.astype(jnp.float32)[None, :]).astype(x.dtype)


WEIGHT_TYPES = {cls.format: cls for cls in (Int8Weight, Int4Weight, Fp8Weight)}
