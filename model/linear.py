"""`linear`: one matmul entry point that dispatches on the weight's format.

A weight is either a plain array `[in, out]` (bf16 / f32: the dense format) or a small pytree
whose type names its format (int8 per-channel, int4 grouped, fp8, NF4 ...). Every quantized
format implements the `QuantizedWeight` protocol: `matmul(x)` (the Pallas kernel on GPU, the
reference elsewhere) and `dequantize(dtype)`. Model code calls `linear` and never asks which.
The formats are in `quant_weights.py` (`Int8Weight`, `Int4Weight`, `Fp8Weight`); `quantize.py`
makes them from a dense model.

`TransposedWeight` holds a dense weight stored `[N, K]`, which serves narrow projections to
batch-1 decode faster on a GPU (`transposed_layout`, the engine's default there).

`concat_out` / `split_out` join weights that read the same input into one `[in, sum(out)]` weight
(one GEMM instead of several) and split it back; a format takes part by naming, in `out_axes`,
the axis of each field that runs over the output channels.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax


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


def linear(x: jax.Array, w, bias: jax.Array | None = None, *, then=None) -> jax.Array:
    """y = x @ w (+ bias); x [..., in], w [in, out] or a quantized weight -> [..., out].

    `then`: the weight the next matmul reads, for a format whose kernel warms it (`warms_then`:
    it prefetches the first tiles of that weight into L2 as it finishes, `Int4HopperWeight`);
    ignored by the others."""
    if isinstance(w, (jax.Array, np.ndarray)):
        y = dense_matmul(x, w.astype(x.dtype))
    elif isinstance(w, QuantizedWeight):
        y = w.matmul(x, then=then) if then is not None and getattr(w, "warms_then", False) else w.matmul(x)
    else:
        raise TypeError(f"linear: unsupported weight type {type(w).__name__}")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def linear_partials(x: jax.Array, w, *, then=None):
    """`linear(x, w, then=then)` for a consumer that adds partial sums itself
    (`layers.residual_rms_norm`): `PartialSums` of x's rows where the weight's format leaves its
    product unreduced (its `matmul_partials`, on the GPU kernel's path), else the product
    [..., out]."""
    matmul_partials = getattr(w, "matmul_partials", None)
    return linear(x, w, then=then) if matmul_partials is None else matmul_partials(x, then=then)


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
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


def flat_rows(x: jax.Array, k: int) -> jax.Array:
    """x [..., K] -> [M, K] for a weight of K inputs (ValueError naming both when x has others)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    return x.reshape(-1, k)


def unflat_rows(y: jax.Array, x: jax.Array) -> jax.Array:
    """y [M, N] back to x's leading axes: [..., N]."""
    return y.reshape(*x.shape[:-1], y.shape[-1])


@struct.dataclass
class TransposedWeight:
    """A dense weight stored `wt [N, K]` (each output channel's K weights contiguous), for serving
    narrow projections to one- and two-row products (`transposed_layout`).

    XLA's GPU compiler turns a one-row product with a matrix under ten million elements into a
    reduction over K (see `gemm_rows`). Over a `[K, N]` weight that is a column reduction at a
    fraction of the bandwidth; over `[N, K]` it is a row reduction: on an H200 the Qwen2.5 q/k/v
    and o weights stream at 2.2-2.9 TB/s that way, against 0.37-0.42 TB/s for the two-row GEMM
    on `[K, N]` (bench/dense_gemv.py). So `matmul` runs a product of up to `ROWS` rows (a batch-1
    step is two, the second dead padding: `engine.MIN_ROWS`) as one multiply and f32 sum over K
    of `x[:, None, :] * wt`, which XLA makes one row reduction reading the weight once for both
    rows. Each row its own one-row product would read it twice: in the Qwen2.5-1.5B step the
    dead row's q/k/v product cost as much as the live one's. Larger products (batches, prefill,
    verification) run as one GEMM over the transposed operand; the reduction over 9 rows made an
    n-gram verification round cost 1.35 plain steps against 1.11 as a GEMM
    (bench/results/transposed_h200.jsonl)."""

    wt: jax.Array  # [..., N, K]
    format: ClassVar[str] = "dense-nk"
    out_axes: ClassVar[dict[str, int]] = {"wt": -2}  # see concat_out
    ROWS: ClassVar[int] = 2

    @property
    def shape(self) -> tuple[int, int]:
        return self.wt.shape[-1], self.wt.shape[-2]

    def matmul(self, x: jax.Array) -> jax.Array:
        x2, wt = flat_rows(x, self.wt.shape[-1]), self.wt.astype(x.dtype)
        if x2.shape[0] <= self.ROWS:
            y = jnp.sum(x2[:, None, :].astype(jnp.float32) * wt[None].astype(jnp.float32), axis=-1)
        else:
            y = lax.dot_general(x2, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return unflat_rows(y, x).astype(x.dtype)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return jnp.swapaxes(self.wt, -1, -2).astype(dtype)


# The projections `transposed_layout` may store [N, K]: at most this many weights (K * N). On an
# H200 (bench/results/dense_gemv_h200.jsonl) the one-row product over [N, K] beat the served
# two-row GEMM up to Qwen2.5-0.5B's down projection (4864 x 896, 4.4M) and lost from 1.5B's
# (8960 x 1536, 13.8M) and the 8B shapes' (16.8M and more) on. In the batch-1 step likewise
# (bench/results/transposed_h200.jsonl): with the limit at 16M (1.5B down, 0.5B gate/up too) the
# 1.5B step took 1.57 ms and the 0.5B 1.01, at 30M (1.5B gate/up too) 1.89 and 1.01, against
# 1.49 and 0.83 at 5M.
TRANSPOSED_MAX_WEIGHTS = 5_000_000


def transposed_layout(params, max_weights: int = TRANSPOSED_MAX_WEIGHTS):
    """Unstacked parameters (`decoder.unstack_layers`) with every dense layer projection of at most
    `max_weights` weights as a `TransposedWeight`; everything else (embedding, norms, biases,
    quantized weights, larger projections) unchanged. Stacked layers raise ValueError."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        raise ValueError("transposed_layout takes unstacked parameters (decoder.unstack_layers)")

    def convert(name, w):
        if (name.startswith("w") and isinstance(w, jax.Array) and w.ndim == 2
                and w.shape[0] * w.shape[1] <= max_weights):
            return TransposedWeight(w.T)
        return w

    return {**params, "layers": [{name: convert(name, w) for name, w in p.items()} for p in layers]}


def weight_format(w) -> str:
    """'bfloat16' / 'float32' for dense weights, else the quantized format's name."""
    if isinstance(w, (jax.Array, np.ndarray)):
        return str(w.dtype)
    return w.format


def concat_mismatch(ws: list) -> str | None:
    """Why the weights `[K, N_i]` cannot become one `[K, sum N_i]` weight, or None when they can.

    They must be one format with the same K, dtypes and static fields (group size ...), the same
    optional fields present (zero points ...), and identical fields that are not per output
    channel: an AWQ `act_scale` divides x before the GEMM, so one fused GEMM needs one."""
    a = ws[0]
    for b in ws[1:]:
        if weight_format(a) != weight_format(b):
            return f"formats differ ({weight_format(a)}, {weight_format(b)})"
        if a.shape[-2] != b.shape[-2]:
            return f"inputs differ (K = {a.shape[-2]}, {b.shape[-2]})"
        if isinstance(a, (jax.Array, np.ndarray)):
            continue
        if getattr(a, "out_axes", None) is None:
            return f"{a.format} weights name no out_axes"
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if not f.metadata.get("pytree_node", True):
                if x != y:
                    return f"{f.name} differs ({x}, {y})"
            elif (x is None) != (y is None):
                return f"{f.name} is present in one weight only"
            elif x is None:
                continue
            elif x.dtype != y.dtype:
                return f"{f.name} dtypes differ ({x.dtype}, {y.dtype})"
            elif f.name not in a.out_axes and not bool(jnp.array_equal(x, y)):
                return f"{f.name} differs (it applies to every output, so it must be identical)"
    return None


def concat_out(ws: list):
    """Weights `[K, N_i]` of one format -> one `[K, sum N_i]` weight whose `linear` is the
    concatenation of theirs. Raises ValueError with `concat_mismatch`'s reason."""
    why = concat_mismatch(ws)
    if why is not None:
        raise ValueError(f"cannot concatenate weights along the output axis: {why}")
    a = ws[0]
    if isinstance(a, (jax.Array, np.ndarray)):
        return jnp.concatenate(ws, axis=-1)
    return a.replace(**{name: jnp.concatenate([getattr(w, name) for w in ws], axis=axis)
                        for name, axis in a.out_axes.items() if getattr(a, name) is not None})


def split_out(w, sizes: list[int]) -> list:
    """The inverse of `concat_out`: `[K, sum sizes]` -> weights `[K, sizes[i]]` (fields that are not
    per output channel, like an AWQ `act_scale`, are shared)."""
    n = w.shape[-1]
    if sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} do not add up to the weight's {n} outputs")
    cuts = np.cumsum(sizes)[:-1].tolist()
    if isinstance(w, (jax.Array, np.ndarray)):
        return jnp.split(w, cuts, axis=-1)
    units = getattr(w, "out_units", {})  # output channels per index of a field's axis
    if any(c % u for u in units.values() for c in cuts):
        raise ValueError(f"split sizes {sizes} must be multiples of {max(units.values())}"
                         f" for a {w.format} weight")
    parts = {name: jnp.split(getattr(w, name), [c // units.get(name, 1) for c in cuts], axis=axis)
             for name, axis in w.out_axes.items() if getattr(w, name) is not None}
    return [w.replace(**{name: p[i] for name, p in parts.items()}) for i in range(len(sizes))]
