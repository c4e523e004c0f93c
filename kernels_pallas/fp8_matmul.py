"""FP8 (e4m3 x e4m3) matmul on Hopper tensor cores, Pallas Triton backend (W8A8).

``y = (x_q @ w_q) * x_scale * w_scale`` with ``x_q: [M, K]`` and ``w_q`` float8_e4m3fn, f32
accumulation, output ``out_dtype`` (bf16). Scales: ``x_scale`` per tensor (scalar / ``[1, 1]``)
or per row (per token, ``[M, 1]``); ``w_scale`` per tensor or per column (per output channel,
``[1, N]`` or ``[N]``). Both factor out of the K sum, so they are applied to the f32 tile once.

Weight layout (``w_layout``): ``"kn"`` (default) is ``w_q: [K, N]`` like every other weight;
``"nk"`` is ``w_q: [N, K]`` (K contiguous per output channel). Hopper's fp8 wgmma reads its B
operand K-major, so ``"nk"`` lets the tile go to the tensor cores without a transpose in
shared memory; bench/matmul.py measures both. Measured on an H100 at 8192^3 (bench/results/
matmul_h100.json): "nk" 465-514 TFLOP/s, "kn" 340 TFLOP/s; bf16 XLA 685, XLA's fp8 dot 1136.
This kernel is short of the bf16 dot; use ``"nk"`` weights. On Hopper `fp8_matmul_mgpu.py` (Mosaic
GPU) runs at 1.68-1.76x the bf16 dot on an H200, this one at 0.68-0.71x.

The grid is 1-D over output tiles, walked in groups of ``group_m`` row-tiles so that programs
running together share x and w tiles in L2; each program loops over K with Triton's software
pipelining (``num_stages``). Shapes that are not multiples of the tiles are zero-padded (zeros
add nothing to the dot). `fp8_linear` quantizes activations per token at run time and calls the
kernel.

Fast accumulation: the Pallas Triton lowering emits every dot with Triton's default
``maxNumImpreciseAcc = 0``, which on Hopper makes Triton add each fp8 wgmma's result into a
separate f32 accumulator (extra register traffic per 32-deep K chunk). With
``BlockSizes(fast_accum=True)`` the kernel's dot asks for
``lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM``; `_install_fast_accum_lowering` teaches
the Triton lowering that preset (a wrapper over JAX's own rule that only touches dots carrying
it) and sets ``maxNumImpreciseAcc`` to the tile depth, so wgmma accumulates a whole K tile in
its own accumulator before the f32 add. Other dots are lowered exactly as before.
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
from pallax.kernels_pallas._matmul_common import is_pow2, pad_to, round_up, shrink_block
from pallax.kernels_pallas.quant_formats import quantize_fp8

FP8 = jnp.float8_e4m3fn
_FAST = lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM
LAYOUTS = ("kn", "nk")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the fp8 kernel (block_m shrinks to the next power of two >= 16 of a small M)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    fast_accum: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not is_pow2(v) or v < 16:
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.block_k < 32:
            raise ValueError(f"block_k={self.block_k} must be >= 32 for fp8 tensor cores")
        for name in ("group_m", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def _install_fast_accum_lowering() -> bool:
    """Let the Pallas Triton lowering accept the fp8 FAST_ACCUM dot preset (see docstring)."""
    try:
        from jax._src.pallas.triton import lowering as tl
        from jax._src.lib.mlir import ir
    except ImportError:
        return False
    rule = tl.triton_lowering_rules.get(lax.dot_general_p)
    if rule is None or getattr(rule, "_pallax_fast_accum", False):
        return rule is not None

    def dot_general(ctx, a, b, *, precision, **kw):
        if precision != _FAST:
            return rule(ctx, a, b, precision=precision, **kw)
        out = rule(ctx, a, b, precision=None, **kw)
        op = out.owner
        if op.name == "tt.dot":  # f32 result: no cast after the dot
            depth = ctx.avals_in[0].shape[1]
            op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(
                ir.IntegerType.get_signless(32), depth)
        return out

    dot_general._pallax_fast_accum = True
    tl.triton_lowering_rules[lax.dot_general_p] = dot_general
    return True


def _fp8_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, block_k, k_steps, w_nk, precision):
    # x_ref:  [block_m, K]                      e4m3 activations
    # w_ref:  [K, block_n] ("kn") or [block_n, K] ("nk")  e4m3 weights
    # xs_ref: [block_m, 1]                      f32 per-row scales
    # ws_ref: [1, block_n]                      f32 per-column scales
    # o_ref:  [block_m, block_n]
    block_m, block_n = o_ref.shape

    def step(t, acc):
        kk = pl.multiple_of(t * block_k, block_k)
        a = x_ref[:, pl.ds(kk, block_k)]  # [block_m, block_k]
        if w_nk:
            b = w_ref[:, pl.ds(kk, block_k)]  # [block_n, block_k]
            dims = (((1,), (1,)), ((), ()))
        else:
            b = w_ref[pl.ds(kk, block_k), :]  # [block_k, block_n]
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(a, b, dims, precision=precision,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = (acc * xs_ref[...] * ws_ref[...]).astype(o_ref.dtype)


def _tile(pid, grid_m, grid_n, group_m):
    """Program id -> (row tile, column tile), walking ``group_m`` row tiles per column sweep."""
    width = group_m * grid_n
    first_m = (pid // width) * group_m
    rows = jnp.minimum(grid_m - first_m, group_m)
    return first_m + (pid % width) % rows, (pid % width) // rows


@functools.partial(jax.jit, static_argnames=("out_dtype", "w_layout", "block_sizes", "interpret"))
def _fp8_matmul_kernel(x_q, x_scale, w_q, w_scale, *, out_dtype, w_layout, block_sizes, interpret):
    m, k = x_q.shape
    n = w_q.shape[1] if w_layout == "kn" else w_q.shape[0]
    bs = block_sizes
    block_m, block_n = shrink_block(m, bs.block_m), shrink_block(n, bs.block_n)
    block_k = shrink_block(k, bs.block_k, least=32)
    mp, np_, kp = round_up(m, block_m), round_up(n, block_n), round_up(k, block_k)
    xs = jnp.broadcast_to(x_scale.astype(jnp.float32).reshape(-1, 1), (m, 1))
    ws = jnp.broadcast_to(w_scale.astype(jnp.float32).reshape(1, -1), (1, n))
    x_q, xs = pad_to(x_q, (mp, kp)), pad_to(xs, (mp, 1))
    w_q = pad_to(w_q, (kp, np_) if w_layout == "kn" else (np_, kp))
    ws = pad_to(ws, (1, np_))
    grid_m, grid_n = mp // block_m, np_ // block_n
    tile = functools.partial(_tile, grid_m=grid_m, grid_n=grid_n, group_m=bs.group_m)

    def x_map(pid):
        return tile(pid)[0], 0

    def w_map(pid):
        return (0, tile(pid)[1]) if w_layout == "kn" else (tile(pid)[1], 0)

    def ws_map(pid):
        return 0, tile(pid)[1]

    w_block = (kp, block_n) if w_layout == "kn" else (block_n, kp)
    fast = bs.fast_accum and not interpret and _install_fast_accum_lowering()
    out = pl.pallas_call(
        functools.partial(_fp8_kernel, block_k=block_k, k_steps=kp // block_k,
                          w_nk=w_layout == "nk", precision=_FAST if fast else None),
        grid=(grid_m * grid_n,),
        in_specs=[
            pl.BlockSpec((block_m, kp), x_map),
            pl.BlockSpec(w_block, w_map),
            pl.BlockSpec((block_m, 1), x_map),
            pl.BlockSpec((1, block_n), ws_map),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), tile),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="fp8_matmul",
    )(x_q, w_q, xs, ws)
    return out[:m, :n]


def _validate(x_q, x_scale, w_q, w_scale, w_layout):
    if w_layout not in LAYOUTS:
        raise ValueError(f"w_layout={w_layout!r} is not one of {LAYOUTS}")
    if x_q.ndim != 2 or w_q.ndim != 2:
        raise ValueError(f"x_q and w_q must be 2-D, got {x_q.shape} and {w_q.shape}")
    if x_q.dtype != FP8 or w_q.dtype != FP8:
        raise ValueError(f"x_q and w_q must be float8_e4m3fn, got {x_q.dtype} and {w_q.dtype}")
    m, k = x_q.shape
    wk, n = w_q.shape if w_layout == "kn" else w_q.shape[::-1]
    if wk != k:
        raise ValueError(f"x_q {x_q.shape} and w_q {w_q.shape} ({w_layout}) disagree on K")
    if jnp.size(x_scale) not in (1, m) or (jnp.size(x_scale) == m and m > 1
                                           and jnp.shape(x_scale) not in ((m,), (m, 1))):
        raise ValueError(f"x_scale shape {jnp.shape(x_scale)} must be per tensor or per row [M, 1] (M={m})")
    if jnp.size(w_scale) not in (1, n) or (jnp.size(w_scale) == n and n > 1
                                           and jnp.shape(w_scale) not in ((n,), (1, n))):
        raise ValueError(f"w_scale shape {jnp.shape(w_scale)} must be per tensor or per column [1, N] (N={n})")
    return m, k, n


def fp8_matmul(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16, w_layout: str = "kn",
               block_sizes: BlockSizes | None = None, interpret: bool = False):
    """``(x_q [M, K] @ w_q) * x_scale * w_scale -> [M, N] out_dtype`` (see module docstring)."""
    _validate(x_q, x_scale, w_q, w_scale, w_layout)
    x_scale, w_scale = jnp.asarray(x_scale, jnp.float32), jnp.asarray(w_scale, jnp.float32)
    mode = "interpret" if interpret else dispatch.resolve()
    if mode == "reference":
        return fp8_matmul_reference(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype,
                                    w_layout=w_layout)
    return _fp8_matmul_kernel(x_q, x_scale, w_q, w_scale, out_dtype=jnp.dtype(out_dtype),
                              w_layout=w_layout, block_sizes=block_sizes or BlockSizes(),
                              interpret=mode == "interpret")


def fp8_linear(x, w_q, w_scale, *, w_layout: str = "kn", block_sizes: BlockSizes | None = None,
               interpret: bool = False):
    """W8A8 linear: quantize ``x [M, K]`` per token (dynamic), then `fp8_matmul`; out ``x.dtype``."""
    x_q, x_scale = quantize_fp8(x, axis=-1)  # [M, K] e4m3, [M, 1]
    return fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=x.dtype, w_layout=w_layout,
                      block_sizes=block_sizes, interpret=interpret)


def fp8_matmul_reference(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16,
                         w_layout: str = "kn"):
    """Upcast to f32, f32 dot, apply both scales, cast."""
    w = w_q.astype(jnp.float32)
    if w_layout == "nk":
        w = w.T
    y = jnp.dot(x_q.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    y = y * jnp.asarray(x_scale, jnp.float32).reshape(-1, 1) * jnp.asarray(w_scale, jnp.float32).reshape(1, -1)
    return y.astype(out_dtype)
