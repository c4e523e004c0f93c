"""Quantized weight formats: pure-jnp quantize / dequantize helpers shared by the matmul kernels.

Layouts (a linear layer computes ``y = x @ W`` with ``x: [M, K]``, ``W: [K, N]``):

- **int4, grouped** (`quantize_int4` / `dequantize_int4`): codes ``q`` in 0..15, packed two per
  byte along K: ``packed: [K // 2, N] uint8`` with byte ``(i, n) = q[2i, n] | q[2i + 1, n] << 4``
  (low nibble = even row). One scale per group of ``group_size`` consecutive rows of K and per
  column: ``scales: [K // group_size, N]``. Symmetric: ``w = (q - 8) * s`` (``s = amax / 7``, codes
  1..15 used). Asymmetric: ``w = (q - z) * s`` with ``zeros: [K // group_size, N] uint8`` in 0..15
  (``s = (max - min) / 15``, ``z = round(-min / s)``). Packing along K keeps each row of bytes
  contiguous along N, so a kernel tile ``[rows, block_n]`` is read with wide coalesced loads and
  one scale row covers every byte of a group's tile.
- **int8, per output channel** (`quantize_int8` / `dequantize_int8`): ``w_q: [K, N] int8``,
  ``w = w_q * scale[n]``, ``scale: [N] f32`` (``amax / 127``).
- **fp8 e4m3** (`quantize_fp8`): ``q = x / s`` saturated to +-448 and rounded to
  ``float8_e4m3fn``, with ``s = amax / 448`` per tensor (``axis=None``), per row (``axis=-1``:
  per token for activations ``[M, K] -> scale [M, 1]``) or per column (``axis=0``: per output
  channel for weights ``[K, N] -> scale [1, N]``).

All helpers are jittable (``group_size`` and ``axis`` static).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_TINY = 1e-12


def check_group_size(k: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size={group_size} must be a positive even number (32, 64 or 128)")
    if k % group_size:
        raise ValueError(f"group_size={group_size} must divide K={k}")


# ---------------------------------------------------------------------------------------- int4


def pack_int4(q: jax.Array) -> jax.Array:
    """Codes ``q: [K, N]`` (values 0..15, any integer dtype) -> ``[K // 2, N] uint8``."""
    if q.ndim != 2 or q.shape[0] % 2:
        raise ValueError(f"pack_int4 needs a [K, N] array with even K, got shape {q.shape}")
    q = q.astype(jnp.uint8)
    return q[0::2] | (q[1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """``[K // 2, N] uint8`` -> codes ``[K, N] uint8`` in 0..15 (inverse of `pack_int4`)."""
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed int4 weights must be uint8, got {packed.dtype}")
    lo, hi = packed & 0xF, packed >> 4
    return jnp.stack([lo, hi], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:])


def quantize_int4(w: jax.Array, group_size: int = 128, *, symmetric: bool = True,
                  scale_dtype=jnp.bfloat16):
    """Round-to-nearest group-wise int4 of ``w: [K, N]``.

    Returns ``(packed [K//2, N] uint8, scales [K//g, N] scale_dtype, zeros [K//g, N] uint8 | None)``.
    """
    k, n = w.shape
    check_group_size(k, group_size)
    wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)  # [G, g, N]
    if symmetric:
        s = jnp.max(jnp.abs(wg), axis=1) / 7.0  # [G, N]
        s = jnp.maximum(s, _TINY).astype(scale_dtype)
        q = jnp.clip(jnp.round(wg / s.astype(jnp.float32)[:, None]) + 8, 0, 15)
        zeros = None
    else:
        lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
        hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
        s = jnp.maximum((hi - lo) / 15.0, _TINY).astype(scale_dtype)
        s32 = s.astype(jnp.float32)
        # The group's min takes code 0 (z = -round(lo / s)) and its max code 15. Rounded on its
        # own, the max can land on 14, one code unused: when lo / s is a tie (-2.5: z = 2, then
        # round(12.5) + 2 = 14) or, with the scale an ulp large, just inside one (-5.4999995).
        z = jnp.clip(-jnp.round(lo / s32), 0, 15)
        q = jnp.clip(jnp.round(wg / s32[:, None]) + z[:, None], 0, 15)
        q = jnp.where((wg == hi[:, None]) & (hi[:, None] > 0), 15.0, q)  # a group of zeros stays 0
        zeros = z.astype(jnp.uint8)
    return pack_int4(q.reshape(k, n)), s, zeros


def dequantize_int4(packed: jax.Array, scales: jax.Array, zeros: jax.Array | None = None, *,
                    group_size: int, dtype=jnp.float32) -> jax.Array:
    """``w = (q - z) * s`` (``z = 8`` when ``zeros`` is None) as ``[K, N] dtype``."""
    q = unpack_int4(packed).astype(jnp.float32)  # [K, N]
    k, n = q.shape
    check_group_size(k, group_size)
    if scales.shape != (k // group_size, n):
        raise ValueError(f"scales shape {scales.shape} != (K // group_size, N) = {(k // group_size, n)}")
    z = 8.0 if zeros is None else jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    s = jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)
    return ((q - z) * s).astype(dtype)


# ---------------------------------------------------------------------------------------- int8


def quantize_int8(w: jax.Array):
    """Per-output-channel symmetric int8 of ``w: [K, N]`` -> ``(w_q [K, N] int8, scale [N] f32)``."""
    w = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=0) / 127.0, _TINY)  # [N]
    w_q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return w_q, scale


def dequantize_int8(w_q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (w_q.astype(jnp.float32) * scale.astype(jnp.float32).reshape(1, -1)).astype(dtype)


# ----------------------------------------------------------------------------------------- fp8


def quantize_fp8(x: jax.Array, axis: int | None = -1):
    """e4m3 quantization with scale ``amax / 448`` over ``axis`` (kept as size 1; None: per tensor).

    ``x: [M, K], axis=-1`` -> per token ``scale [M, 1]``; ``w: [K, N], axis=0`` -> per output
    channel ``scale [1, N]``; ``axis=None`` -> ``scale [1, 1]``. Returns ``(q, scale f32)``.
    """
    x = x.astype(jnp.float32)
    if axis is None:
        amax = jnp.max(jnp.abs(x)).reshape((1,) * x.ndim)
    else:
        amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = jnp.maximum(amax / FP8_MAX, _TINY)
    q = jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
