"""What the quantized matmul wrappers (int4, int8, fp8) share: activation dtype check, block
fitting, zero padding up to whole tiles, split-K outputs, `StreamK` (the int4 kernel's
partition) and `PartialSums` (a product left unreduced for a consumer kernel that adds its
partial sums itself).

Split-K (int4, int8): the grid is ``(j: N tiles, s: K splits, i: M tiles)``; with one split each
program writes its ``[block_m, block_n]`` tile of the output, with several each writes an f32
partial sum ``[splits, M_pad, N]`` that one small XLA reduction adds.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

X_DTYPES = (jnp.bfloat16, jnp.float32, jnp.float16)


def check_x_dtype(x) -> None:
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x dtype must be bfloat16, float16 or float32, got {x.dtype}")


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fit_block(n: int, block: int) -> int | None:
    """The largest power of two <= ``block`` (and >= 16) dividing ``n``; None if there is none."""
    while block >= 16:
        if n % block == 0:
            return block
        block //= 2
    return None


def largest_divisor_le(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def shrink_block(size: int, block: int, least: int = 16) -> int:
    """``block``, cut to the smallest power of two >= ``size`` (never below ``least``)."""
    return min(block, max(least, pl.next_power_of_2(size)))


def round_up(n: int, block: int) -> int:
    return pl.cdiv(n, block) * block


def pad_to(a, shape):
    """Zero-pad ``a`` at the end of each axis up to ``shape``."""
    if a.shape == tuple(shape):
        return a
    return jnp.pad(a, [(0, want - have) for have, want in zip(a.shape, shape)])


def split_k_output(splits: int, m_pad: int, n: int, block_m: int, block_n: int, dtype):
    """``(out_shape, out_spec)`` of a split-K grid (see module docstring)."""
    if splits == 1:
        return (jax.ShapeDtypeStruct((m_pad, n), dtype),
                pl.BlockSpec((block_m, block_n), lambda j, s, i: (i, j)))
    return (jax.ShapeDtypeStruct((splits, m_pad, n), jnp.float32),
            pl.BlockSpec((None, block_m, block_n), lambda j, s, i: (s, i, j)))


def reduce_split_k(out, splits: int, m: int, dtype):
    """Add the split partial sums (if any) and drop the padded rows: ``[m, N] dtype``."""
    if splits > 1:
        out = out.sum(axis=0).astype(dtype)
    return out[:m]


@dataclasses.dataclass(frozen=True)
class StreamK:
    """A stream-K partition: the work is `units` (row block, K step) pairs, row block major,
    `steps` a row block; CTA c of `ctas` streams units `[c * units // ctas, (c + 1) * units // ctas)`
    and leaves one partial sum for each row block it touches. The CTAs touching a row block are
    consecutive, so its partial sums are pieces `0 .. pieces(b) - 1`, in CTA order: piece p is
    CTA `first_cta(b) + p`'s.

    The methods take ints or integer arrays; `div` is the division to use (floor division by
    default; a kernel passes its own, e.g. `lax.div`, for non-negative operands the same)."""

    steps: int
    units: int
    ctas: int

    @property
    def tiles(self) -> int:
        """Row blocks."""
        return self.units // self.steps

    def run(self, c, div=operator.floordiv):
        """CTA c's units `[u0, u1)`."""
        return div(c * self.units, self.ctas), div((c + 1) * self.units, self.ctas)

    def cta_of(self, u, div=operator.floordiv):
        """The CTA streaming unit u: the last c with `c * units // ctas <= u`."""
        return div((u + 1) * self.ctas - 1, self.units)

    def first_cta(self, b, div=operator.floordiv):
        return self.cta_of(b * self.steps, div)

    def pieces(self, b, div=operator.floordiv):
        """How many CTAs touch row block b (its partial sums)."""
        return self.cta_of((b + 1) * self.steps - 1, div) - self.first_cta(b, div) + 1

    @functools.cached_property
    def width(self) -> int:
        """The most pieces a row block has."""
        return int(self.pieces(np.arange(self.tiles)).max())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PartialSums:
    """A product y [M, N] left as the partial sums of its row blocks (the stream-K int4 kernel's
    output), for a consumer that adds them itself (`residual_norm`) instead of one more kernel:

        y[m, b * R + r] = sum_{p < split.pieces(b)} parts[b, p, m, r], rounded to `dtype`

    in the order of p. A row block's pieces past its own count are never written or read (no
    table to look up: where a block's pieces lie follows from `split`). `sum()` is that formula
    in XLA."""

    parts: jax.Array  # [B, P, M_pad, R] f32: R output channels of M_pad rows a piece; B * R = N
    m: int = dataclasses.field(metadata=dict(static=True))  # rows of y (<= M_pad)
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))
    split: StreamK = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.m, self.parts.shape[0] * self.parts.shape[3]

    def used(self) -> np.ndarray:
        """`[B, P]` bool: which pieces hold a partial sum."""
        b = np.arange(self.parts.shape[0])[:, None]
        return np.arange(self.parts.shape[1])[None, :] < self.split.pieces(b)

    def sum(self) -> jax.Array:
        """y [M, N] in `dtype`."""
        part = self.parts[:, :, :self.m]
        y = jnp.where(self.used()[:, :, None, None], part, 0.0).sum(axis=1)  # [B, M, R]
        # at M = 1 already y's layout: no transpose
        return jnp.swapaxes(y, 0, 1).reshape(self.shape).astype(self.dtype)
