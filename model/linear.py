"""`linear`: one matmul entry point that dispatches on the weight's format.

A weight is either a plain array `[in, out]` (bf16 / f32: the dense format) or a small pytree
whose type names its format (int8 per-channel, int4 grouped, fp8, NF4 ...). Every quantized
format implements the `QuantizedWeight` protocol: `matmul(x)` (the Pallas kernel on GPU, the
reference elsewhere) and `dequantize(dtype)`. Model code calls `linear` and never asks which.
The formats are in `quant_weights.py` (`Int8Weight`, `Int4Weight`, `Fp8Weight`); `quantize.py`
makes them from a dense model.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


@runtime_checkable
class QuantizedWeight(Protocol):
    format: str

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in x.dtype."""

    def dequantize(self, dtype) -> jax.Array:
        """The dense `[in, out]` weight."""

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) of the logical weight."""


def linear(x: jax.Array, w, bias: jax.Array | None = None) -> jax.Array:
    """y = x @ w (+ bias); x [..., in], w [in, out] or a quantized weight -> [..., out]."""
    if isinstance(w, (jax.Array, np.ndarray)):
        y = _dense(x, w.astype(x.dtype))
    elif isinstance(w, QuantizedWeight):
        y = w.matmul(x)
    else:
        raise TypeError(f"linear: unsupported weight type {type(w).__name__}")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def _dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [in, out] with f32 accumulation."""
    dot = lambda a: jnp.einsum("ki,io->ko", a, w, preferred_element_type=jnp.float32)  # noqa: E731
    y = gemm_rows(dot, x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)


def gemm_rows(dot, x: jax.Array) -> jax.Array:
    """`dot(x)` for x [M, K]; on a GPU a single row goes in as two (the second zero, its result
    dropped). XLA's GPU compiler rewrites a vector-matrix product whose matrix has under ten
    million elements into a broadcast multiply and an f32 reduction instead of a GEMM, which reads
    the weight at a fraction of the bandwidth (4096x1024 bf16: 19.5 us against 5.9 us on an H100;
    bench/step_anatomy.py), and batch-1 decode is nothing but such products."""
    if x.shape[0] == 1 and jax.default_backend() == "gpu":
        return dot(jnp.pad(x, ((0, 1), (0, 0))))[:1]
    return dot(x)


def weight_format(w) -> str:
    """'bfloat16' / 'float32' for dense weights, else the quantized format's name."""
    if isinstance(w, (jax.Array, np.ndarray)):
        return str(w.dtype)
    return w.format
