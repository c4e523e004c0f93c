"""The residual add and the RMSNorm after it, in one kernel (Pallas, Triton backend).

    x, h = residual_rms_norm(x, y, weight, eps=eps)
        x <- x + y                         the residual stream [M, D], in x's dtype
        h <- rms_norm(x + y, weight, eps)  the next block's input [M, D]

A decoder layer ends each of its two blocks this way: the attention block's output projection
is added to the stream and normed for the MLP, the MLP's down projection is added and normed for
the next layer's attention. XLA makes that two kernels: the add (fused with the product's own
fixup, such as the int4 kernel's sum of partial sums) and the norm (a reduction over a row whose
input has a second reader, the stream, so it cannot join the add). In a batch-1 decode step each
costs 1.5-1.8 us of a Llama-3-8B int4 layer's time (bench/FINDINGS.md), and there are two of each a layer.

y, the block's output, is the int4 kernel's `PartialSums` (its CTAs' partial sums, unadded),
which this kernel adds itself, in the pieces' order, where XLA would have run them through a
fusion of its own. A dense y stays with XLA, which fuses the add into the product's epilogue
(on an H200 sending it to the kernel's first form made the bf16 Llama-3-8B step slower, 4.26 ms
against 4.22: bench/results/residual_norm_h200.jsonl); `residual_rms_norm` runs the reference
for it.

One program per row. It reads the row as a `[B, R]` tile of its B row blocks (R contiguous
columns each), reads each block's pieces (`PartialSums`: where they lie follows from the int4
kernel's split, so no table is loaded before them), rounds their sum to y's dtype as the product
would be, adds it to x and rounds again (as `x + y` in x's dtype does), then norms the row in
float32 as `model.layers.rms_norm` does.

Measured on one H200 (`python3 -m pallax.bench.partial_sums`, bench/results/partial_sums_h200.jsonl,
two runs; the engine's batch-1 Llama-3-8B int4 step at context 1024, random weights):
- on the GPU the kernel gives bit for bit what XLA's add and norm give, on the int4 kernel's own
  partial sums of the o and down products at M = 1 to 16, and the steps the same tokens;
- a call takes 3.4 us at 32 warps, as long as XLA's add and norm together (3.4 us a pair),
  and 4.6 us at 16. The step takes 2.114-2.118 ms against 2.133-2.140 with XLA's
  (434 kernels to 371), 1% faster: what is saved is launches, not time in kernels. The
  Qwen2.5-1.5B int4 step (D = 1536: 12 row blocks, padded to 16) takes 1.007 ms against
  1.054-1.072 (382 kernels to 329), at 2.4 us a call;
- one program reads all of the row's partial sums, about 82 KB at M = 1 (some 160 pieces of
  128 f32 values), on one SM; XLA's add spreads the same reads over many. A first form that
  gathered them as one vector of D columns took 3.45-3.7 us at 8 to 32 warps, 8.5 at 4
  (bench/results/residual_norm_h200.jsonl);
- those 3.4 us were mostly a wait: the partial sums' places came from a slot table, loaded
  before any of them could be. With the places computed from the split (`PartialSums`) a call
  takes 2.5 us (bench/results/partial_sums_pieces_h200.jsonl).
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
from pallax.kernels_pallas._launch import Launch
from pallax.kernels_pallas._matmul_common import PartialSums, StreamK

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class BlockSizes(Launch):
    """Launch parameters (one program per row; the tile is the whole row)."""

    num_warps: int = 32


def _kernel(
    x_ref,      # [M * D]               the residual stream, flat
    parts_ref,  # [B * P * M_pad * R]   y's partial sums, flat
    w_ref,      # [D]                   the norm's weight
    xo_ref,     # [M * D]               x + y
    h_ref,      # [M * D]               rms_norm(x + y)
    *, n_blocks: int, width: int, m_pad: int, rows: int, split: StreamK, y_dtype, eps: float,
):
    m = pl.program_id(0)
    d = n_blocks * rows
    # The row as a [B, R] tile of its row blocks (each R contiguous values: vector loads), B
    # padded to a power of two (Triton's tiles) with the last block again, whose values are then
    # loaded and stored twice, the same both times, and summed once.
    blocks = jnp.arange(pl.next_power_of_2(n_blocks), dtype=jnp.int32)[:, None]  # [B, 1]
    live, b = blocks < n_blocks, jnp.minimum(blocks, n_blocks - 1)
    col = b * rows + jnp.arange(rows, dtype=jnp.int32)[None, :]  # [B, R]
    r = col - b * rows
    # Every load is issued before any sum: x, the weight, each piece's rows (where a block's
    # pieces lie is arithmetic: no table is loaded first).
    pieces = split.pieces(b, lax.div)  # [B, 1]
    x = x_ref[m * d + col].astype(jnp.float32)
    w = w_ref[col].astype(jnp.float32)
    parts = []
    for p in range(width):
        src = ((b * width + p) * m_pad + m) * rows + r
        parts.append(plgpu.load(parts_ref.at[src], mask=jnp.broadcast_to(p < pieces, src.shape), other=0.0))
    y = parts[0]
    for part in parts[1:]:
        y = y + part
    dtype = xo_ref.dtype
    x = (x + y.astype(y_dtype).astype(dtype).astype(jnp.float32)).astype(dtype)
    xo_ref[m * d + col] = x
    x32 = x.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(jnp.sum(jnp.where(live, x32 * x32, 0.0), axis=1)) / d + eps)
    h_ref[m * d + col] = (x32 * inv * w).astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret"))
def _residual_norm_kernel(x, y: PartialSums, weight, *, eps, block_sizes, interpret):
    m, d = x.shape
    n_blocks, width, m_pad, rows = y.parts.shape
    inputs = [x.reshape(-1), y.parts.reshape(-1), weight]
    out_shape = [jax.ShapeDtypeStruct((m * d,), x.dtype)] * 2
    whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0,))  # noqa: E731
    x, h = pl.pallas_call(
        functools.partial(_kernel, n_blocks=n_blocks, width=width, m_pad=m_pad, rows=rows,
                          split=y.split, y_dtype=y.dtype, eps=eps),
        grid=(m,), in_specs=[whole(a) for a in inputs], out_specs=[whole(a) for a in out_shape],
        out_shape=out_shape, interpret=interpret,
        compiler_params=block_sizes.compiler_params(interpret), name="residual_norm",
    )(*inputs)
    return x.reshape(m, d), h.reshape(m, d)


def supported(y) -> bool:
    """Whether the compiled kernel takes this y: `PartialSums` in bf16 / f16 / f32 whose row
    blocks are a power of two wide (Triton's tiles); a dense y goes to the reference."""
    return (isinstance(y, PartialSums) and jnp.dtype(y.dtype) in DTYPES
            and not y.parts.shape[3] & (y.parts.shape[3] - 1))


def _check(x, y, weight):
    if x.ndim != 2:
        raise ValueError(f"x must be [M, D], got {x.shape}")
    if y.shape != x.shape:
        raise ValueError(f"y has shape {y.shape}, x {x.shape}; they must match")
    if weight.shape != x.shape[1:]:
        raise ValueError(f"the norm weight has shape {weight.shape}, expected {x.shape[1:]}")
    if isinstance(y, PartialSums) and (y.parts.ndim != 4 or y.parts.shape[2] < y.m
                                       or y.parts.shape[:2] != (y.split.tiles, y.split.width)):
        raise ValueError(f"partial sums must be [B, P, M_pad >= {y.m}, R] with (B, P) ="
                         f" {(y.split.tiles, y.split.width)} (its StreamK split); got {y.parts.shape}")


def residual_rms_norm(x, y, weight, *, eps: float, block_sizes: BlockSizes | None = None,
                      interpret: bool = False):
    """(x + y, rms_norm(x + y, weight, eps)) for x [M, D], y `PartialSums` [M, D] (or an array,
    which the reference takes), weight [D] (module docstring); both in x's dtype. Honours
    `dispatch.resolve()`; `interpret=True` forces the kernel through the interpreter."""
    _check(x, y, weight)
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference" or not supported(y) or x.dtype not in DTYPES:
        return residual_rms_norm_reference(x, y, weight, eps=eps)
    return _residual_norm_kernel(x, y, weight, eps=float(eps), block_sizes=block_sizes or BlockSizes(),
                                 interpret=mode == "interpret")


def residual_rms_norm_reference(x, y, weight, *, eps: float):
    """Pure jnp: the product's sum in y's dtype, added in x's, normed in float32."""
    if isinstance(y, PartialSums):
        y = y.sum()
    x = x + y.astype(x.dtype)
    x32 = x.astype(jnp.float32)
    h = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x, (h * weight.astype(jnp.float32)).astype(x.dtype)
