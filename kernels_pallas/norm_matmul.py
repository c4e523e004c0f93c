"""RMSNorm fused into a small-M matmul, with a bias or SwiGLU epilogue (Pallas, Triton backend).

    y = rms_norm(x, g) @ W (+ bias)                       x [M, K], W [K, N], M <= 64
    y = silu(h[:, :N/2]) * h[:, N/2:], h = rms_norm(x, g) @ W     (swiglu: W is gate | up)

Why: a batch-1 decode step (and a draft model's) is bound by kernel launches, not bytes; a
Qwen2.5-0.5B layer there is about 14 kernels of 1-8 us (bench/step_anatomy.py). Two RMSNorms and
the SwiGLU product are three of them, each reading what a GEMM beside it could have computed:
this kernel is the attention block's norm + q/k/v (+ bias) and the MLP's norm + gate/up + SwiGLU
(`decoder.forward`), one launch each.

How the work is cut. The grid is `N_out // block_n` programs; a program reads a `[K, block_n]`
strip of W (with swiglu, the gate strip and the matching up strip) in `block_k` rows per
software-pipelined step, with a `[block_m, block_n]` f32 accumulator; x is a handful of rows,
read by every program (from L2). The norm needs each row's mean square over all of K, which the
same loop sums: the product runs on `x * g` and the accumulator is scaled by
`rsqrt(mean(x^2) + eps)` at the end, so no program reads x twice. Rows are padded to `block_m`
>= 16 for the tensor cores inside the kernel (masked loads and stores: no padded copy of x).

Rounding: the product's input is `x * g` rounded to x's dtype (the unfused composition rounds
`x * rsqrt(...) * g`), the product is rounded to x's dtype before the bias or the SwiGLU, as
`linear` does; `norm_matmul_reference` is the unfused composition.
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
from pallax.kernels_pallas._matmul_common import is_pow2

MAX_M = 64
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the kernel.

    block_n: output columns per program (a power of two >= 16 dividing the output width).
    block_k: rows of W per pipelined step (a power of two >= 16 dividing K).
    num_warps, num_stages: Triton launch / software-pipelining parameters.
    """

    block_n: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if not is_pow2(v) or v < 16:
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        for name in ("num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @classmethod
    def default(cls, m: int, k: int, n_out: int) -> "BlockSizes":
        """The widest block of columns that still gives about 64 programs or more (measured on an
        H200: narrow strips, many programs, beat wide ones at these sizes)."""
        block_n = next((b for b in (128, 64, 32) if n_out % b == 0 and n_out // b >= 64), None)
        return cls(block_n=block_n or _pow2_divisor(n_out, 16), block_k=_pow2_divisor(k, 128))


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n."""
    b = cap
    while n % b:
        b //= 2
    return b


def _kernel(x_ref, g_ref, w_ref, *refs, m, k, block_k, eps, swiglu, bias):
    # x_ref: [block_m, K]        activation rows; rows >= m are masked
    # g_ref: [1, K]              RMSNorm weight
    # w_ref: [K, block_n]        the program's column strip of W (swiglu: of its gate half)
    # u_ref: [K, block_n]        the matching strip of the up half (swiglu)
    # b_ref: [1, block_n]        bias (bias)
    # o_ref: [block_m, block_n]  output
    refs = list(refs)
    u_ref = refs.pop(0) if swiglu else None
    b_ref = refs.pop(0) if bias else None
    (o_ref,) = refs
    block_m, block_n = o_ref.shape
    dtype = w_ref.dtype
    rows = lax.broadcasted_iota(jnp.int32, (block_m, 1), 0) < m

    def step(t, carry):
        acc, up, ss = carry
        k0 = pl.multiple_of(t * block_k, block_k)
        x = plgpu.load(x_ref.at[:, pl.ds(k0, block_k)], mask=rows, other=0.0).astype(jnp.float32)
        h = (x * g_ref[:, pl.ds(k0, block_k)].astype(jnp.float32)).astype(dtype)
        acc += jnp.dot(h, w_ref[pl.ds(k0, block_k), :], preferred_element_type=jnp.float32)
        if swiglu:
            up += jnp.dot(h, u_ref[pl.ds(k0, block_k), :], preferred_element_type=jnp.float32)
        return acc, up, ss + jnp.sum(x * x, axis=1, keepdims=True)

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    acc, up, ss = lax.fori_loop(0, k // block_k, step, (zeros, zeros if swiglu else None,
                                                          jnp.zeros((block_m, 1), jnp.float32)))
    inv = lax.rsqrt(ss / k + eps)  # [block_m, 1]
    y = (acc * inv).astype(dtype).astype(jnp.float32)
    if bias:
        y = (y + b_ref[...].astype(jnp.float32)).astype(dtype).astype(jnp.float32)
    if swiglu:
        u = (up * inv).astype(dtype).astype(jnp.float32)
        silu = (y * jax.nn.sigmoid(y)).astype(dtype).astype(jnp.float32)
        y = silu * u
    plgpu.store(o_ref, y.astype(o_ref.dtype), mask=rows)


@functools.partial(jax.jit, static_argnames=("eps", "swiglu", "block_sizes", "interpret"))
def _norm_matmul_kernel(x, g, w, bias, *, eps, swiglu, block_sizes, interpret):
    m, k = x.shape
    n_out = w.shape[1] // 2 if swiglu else w.shape[1]
    bs = block_sizes
    block_m = max(16, pl.next_power_of_2(m))
    up = n_out // bs.block_n  # the up half's first block of columns (swiglu)
    in_specs = [pl.BlockSpec((block_m, k), lambda j: (0, 0)),
                pl.BlockSpec((1, k), lambda j: (0, 0)),
                pl.BlockSpec((k, bs.block_n), lambda j: (0, j))]
    args = [x, g.reshape(1, k), w]
    if swiglu:
        in_specs.append(pl.BlockSpec((k, bs.block_n), lambda j: (0, j + up)))
        args.append(w)
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, bs.block_n), lambda j: (0, j)))
        args.append(bias.reshape(1, -1))
    kernel = functools.partial(_kernel, m=m, k=k, block_k=bs.block_k, eps=eps, swiglu=swiglu,
                               bias=bias is not None)
    return pl.pallas_call(
        kernel,
        grid=(n_out // bs.block_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, bs.block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m, n_out), w.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="norm_matmul",
    )(*args)


def _check(x, g, w, bias, swiglu):
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x must be [M, K] and w [K, N]; got {x.shape} and {w.shape}")
    k, n = w.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns; w {w.shape} needs {k}")
    if g.shape != (k,):
        raise ValueError(f"the norm weight has shape {g.shape}, expected {(k,)}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} and w {w.dtype}; they must match")
    if swiglu and (n % 2 or bias is not None):
        raise ValueError(f"swiglu needs w = gate | up (an even width, got {n}) and no bias")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {bias.shape}, expected {(n,)}")


def supported(m: int, k: int, n_out: int, dtype) -> bool:
    """Whether the kernel takes these sizes (else `norm_matmul` runs the reference)."""
    return 1 <= m <= MAX_M and jnp.dtype(dtype) in DTYPES and k % 16 == 0 and n_out % 16 == 0


def norm_matmul(x, g, w, *, eps: float, bias=None, swiglu: bool = False,
                block_sizes: BlockSizes | None = None, interpret: bool = False):
    """`rms_norm(x, g, eps) @ w` (+ bias), or its SwiGLU (module docstring): x [M, K], g [K],
    w [K, N], bias [N] -> [M, N] (swiglu: [M, N / 2]) in w's dtype.

    GPU: the Pallas kernel when `supported` (M <= 64, bf16 / f16, K and the output width multiples
    of 16); else, and on a CPU, the reference (or the kernel in interpret mode when asked)."""
    _check(x, g, w, bias, swiglu)
    mode = "interpret" if interpret else dispatch.resolve()
    m, (k, n) = x.shape[0], w.shape
    n_out = n // 2 if swiglu else n
    if mode == "reference" or not supported(m, k, n_out, x.dtype):
        return norm_matmul_reference(x, g, w, eps=eps, bias=bias, swiglu=swiglu)
    bs = block_sizes or BlockSizes.default(m, k, n_out)
    if n_out % bs.block_n or k % bs.block_k:
        raise ValueError(f"{bs} does not tile K={k}, {n_out} outputs: block_n and block_k must divide them")
    return _norm_matmul_kernel(x, g, w, bias, eps=float(eps), swiglu=swiglu, block_sizes=bs,
                               interpret=mode == "interpret")


def norm_matmul_reference(x, g, w, *, eps: float, bias=None, swiglu: bool = False):
    """The unfused composition: RMSNorm in f32, `@ w` with f32 accumulation, bias or SwiGLU."""
    x32 = x.astype(jnp.float32)
    h = (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * g.astype(jnp.float32))
    y = jnp.einsum("mk,kn->mn", h.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(w.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if swiglu:
        gate, up = jnp.split(y, 2, axis=-1)
        y = jax.nn.silu(gate) * up
    return y
