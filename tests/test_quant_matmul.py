"""Quantized matmuls: formats round-trip, kernels (interpret mode) vs references, references vs
float64 numpy on the dequantized weights, and input validation."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas import fp8_matmul as f8
from pallax.kernels_pallas import fp8_matmul_mgpu as f8h
from pallax.kernels_pallas import int4_matmul as i4
from pallax.kernels_pallas import int8_matmul as i8
from pallax.kernels_pallas import quant_formats as qf

_seed = iter(range(10_000))


def _key():
    return jax.random.key(next(_seed) + 1000 * np.random.randint(1 << 20))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# ------------------------------------------------------------------------------------ formats


def test_pack_unpack_int4_round_trip():
    q = jax.random.randint(_key(), (64, 24), 0, 16).astype(jnp.uint8)
    packed = qf.pack_int4(q)
    assert packed.shape == (32, 24) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(qf.unpack_int4(packed), q)
    # documented byte layout: low nibble = even row
    np.testing.assert_array_equal(packed[3] & 0xF, q[6])
    np.testing.assert_array_equal(packed[3] >> 4, q[7])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", qf.GROUP_SIZES)
def test_int4_quantize_round_trip(symmetric, group_size):
    w = jax.random.normal(_key(), (256, 48), jnp.float32) + (0.0 if symmetric else 0.7)
    packed, s, z = qf.quantize_int4(w, group_size, symmetric=symmetric, scale_dtype=jnp.float32)
    assert (z is None) == symmetric
    wd = qf.dequantize_int4(packed, s, z, group_size=group_size)
    # round to nearest: every weight within half a step of its group
    step = np.repeat(np.asarray(s), group_size, axis=0)
    assert np.all(np.abs(np.asarray(wd) - np.asarray(w)) <= 0.5 * step + 1e-6)
    # re-quantizing the dequantized weights gives the same codes
    np.testing.assert_array_equal(
        qf.quantize_int4(wd, group_size, symmetric=symmetric, scale_dtype=jnp.float32)[0], packed)


def test_int4_asymmetric_group_spans_all_codes():
    # lo = -2.5, hi = 12.5: scale 1, -lo / s = 2.5 exactly; the group still spans all 16 codes
    w = jnp.tile(jnp.linspace(-2.5, 12.5, 32, dtype=jnp.float32)[:, None], (1, 4))
    packed, s, z = qf.quantize_int4(w, 32, symmetric=False, scale_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(s), 1.0)
    np.testing.assert_array_equal(np.asarray(z), 2)
    q = np.asarray(qf.unpack_int4(packed))
    assert q.min() == 0 and q.max() == 15
    wd = qf.dequantize_int4(packed, s, z, group_size=32)
    assert np.all(np.abs(np.asarray(wd) - np.asarray(w)) <= 0.5 + 1e-6)
    np.testing.assert_array_equal(
        qf.quantize_int4(wd, 32, symmetric=False, scale_dtype=jnp.float32)[0], packed)
    # a group of zeros (no range) dequantizes to zeros exactly
    zero = qf.quantize_int4(jnp.zeros((32, 2), jnp.float32), 32, symmetric=False)
    np.testing.assert_array_equal(qf.dequantize_int4(*zero, group_size=32), 0.0)


def test_int8_and_fp8_round_trip():
    w = jax.random.normal(_key(), (128, 40), jnp.float32)
    w_q, scale = qf.quantize_int8(w)
    assert w_q.dtype == jnp.int8 and scale.shape == (40,)
    err = np.abs(np.asarray(qf.dequantize_int8(w_q, scale)) - np.asarray(w))
    assert np.all(err <= 0.5 * np.asarray(scale)[None, :] + 1e-7)
    for axis, shape in ((-1, (128, 1)), (0, (1, 40)), (None, (1, 1))):
        q, s = qf.quantize_fp8(w, axis=axis)
        assert q.dtype == jnp.float8_e4m3fn and s.shape == shape
        assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == pytest.approx(448.0)
        assert _rel(qf.dequantize_fp8(q, s), w) < 0.04  # e4m3: 3 mantissa bits


# --------------------------------------------------------------------------------------- int4


@pytest.mark.parametrize(
    "m,k,n,group_size,symmetric,block_sizes",
    [
        (1, 256, 128, 32, True, i4.BlockSizes(block_n=64, splits=2)),
        (1, 384, 96, 128, False, i4.BlockSizes(block_n=32, splits=3, groups_per_step=2)),
        (1, 256, 64, 64, True, i4.BlockSizes(block_n=64, m1_dot=True, fold_zero=True)),
        (5, 384, 96, 64, False, i4.BlockSizes(block_n=32, splits=2, groups_per_step=2)),
        (16, 256, 64, 32, False, i4.BlockSizes(block_n=32, splits=1, fold_zero=True)),
        (37, 640, 48, 128, True, i4.BlockSizes(block_n=16, block_m=16, splits=4)),
    ],
)
def test_int4_kernel_matches_reference(m, k, n, group_size, symmetric, block_sizes):
    w = jax.random.normal(_key(), (k, n), jnp.float32)
    x = jax.random.normal(_key(), (m, k), jnp.float32).astype(jnp.bfloat16)
    packed, s, z = qf.quantize_int4(w, group_size, symmetric=symmetric)
    y = i4.int4_matmul(x, packed, s, z, group_size=group_size, block_sizes=block_sizes,
                       interpret=True)
    r = i4.int4_matmul_reference(x, packed, s, z, group_size=group_size)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    assert _rel(y, r) < 1e-2
    # the reference against float64 numpy on the dequantized weights
    wd = _f64(qf.dequantize_int4(packed, s, z, group_size=group_size))
    assert _rel(r, _f64(x) @ wd) < 5e-3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_int4_kernel_other_activation_dtypes(dtype):
    k, n, g = 256, 64, 64
    w = jax.random.normal(_key(), (k, n), jnp.float32)
    packed, s, z = qf.quantize_int4(w, g, symmetric=False)
    wd = _f64(qf.dequantize_int4(packed, s, z, group_size=g))
    for m in (1, 3):
        x = jax.random.normal(_key(), (m, k), jnp.float32).astype(dtype)
        y = i4.int4_matmul(x, packed, s, z, group_size=g, interpret=True,
                           block_sizes=i4.BlockSizes(block_n=32, splits=2))
        assert y.dtype == dtype
        assert _rel(y, _f64(x) @ wd) < (1e-6 if dtype == jnp.float32 else 2e-3)


def test_int4_dispatch_modes():
    k, n, g = 128, 32, 32
    packed, s, _ = qf.quantize_int4(jax.random.normal(_key(), (k, n)), g)
    x = jax.random.normal(_key(), (2, k)).astype(jnp.bfloat16)
    r = i4.int4_matmul_reference(x, packed, s, group_size=g)
    with dispatch.kernel_mode("interpret"):
        y_interp = i4.int4_matmul(x, packed, s, group_size=g)
    with dispatch.kernel_mode("reference"):
        y_ref = i4.int4_matmul(x, packed, s, group_size=g)
    np.testing.assert_array_equal(np.asarray(y_ref, np.float32), np.asarray(r, np.float32))
    assert _rel(y_interp, r) < 1e-2


def test_int4_errors():
    packed, s, z = qf.quantize_int4(jax.random.normal(_key(), (256, 32)), 64, symmetric=False)
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="group_size=96 must divide K=256"):
        i4.int4_matmul(x, packed, s, group_size=96)
    with pytest.raises(ValueError, match="group_size=96 must divide K=160"):
        qf.quantize_int4(jnp.ones((160, 8)), 96)
    with pytest.raises(ValueError, match="scales shape"):
        i4.int4_matmul(x, packed, s, group_size=32)
    with pytest.raises(ValueError, match="zeros shape"):
        i4.int4_matmul(x, packed, s, z[:2], group_size=64)
    with pytest.raises(ValueError, match="packed rows"):
        i4.int4_matmul(jnp.ones((2, 128), jnp.bfloat16), packed, s, group_size=64)
    with pytest.raises(ValueError, match="must be uint8"):
        i4.int4_matmul(x, packed.astype(jnp.int8), s, group_size=64)
    with pytest.raises(ValueError, match="x dtype"):
        i4.int4_matmul(x.astype(jnp.int32), packed, s, group_size=64)
    with pytest.raises(ValueError, match="block_n=48"):
        i4.BlockSizes(block_n=48)


# --------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize(
    "m,k,n,block_sizes",
    [
        (1, 256, 128, i8.BlockSizes(block_n=64, block_k=64, splits=2)),
        (7, 384, 96, i8.BlockSizes(block_n=32, block_k=128, splits=3)),
        (20, 96, 48, i8.BlockSizes(block_n=16, block_k=32, block_m=16, splits=1)),
    ],
)
def test_int8_kernel_matches_reference(m, k, n, block_sizes):
    w = jax.random.normal(_key(), (k, n), jnp.float32)
    x = jax.random.normal(_key(), (m, k), jnp.float32).astype(jnp.bfloat16)
    w_q, scale = qf.quantize_int8(w)
    y = i8.int8_matmul(x, w_q, scale, block_sizes=block_sizes, interpret=True)
    r = i8.int8_matmul_reference(x, w_q, scale)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, r) < 1e-2
    assert _rel(r, _f64(x) @ _f64(qf.dequantize_int8(w_q, scale))) < 5e-3
    # the XLA path (what `impl="xla"` runs on a GPU) computes the same function
    assert _rel(i8._int8_matmul_xla(x, w_q, scale), r) < 1e-2


def test_int8_errors():
    w_q, scale = qf.quantize_int8(jnp.ones((64, 32)))
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="must be int8"):
        i8.int8_matmul(x, w_q.astype(jnp.uint8), scale)
    with pytest.raises(ValueError, match="w_scale shape"):
        i8.int8_matmul(x, w_q, scale[:16])
    with pytest.raises(ValueError, match="x must be"):
        i8.int8_matmul(jnp.ones((2, 48), jnp.bfloat16), w_q, scale)
    with pytest.raises(ValueError, match="impl="):
        i8.int8_matmul(x, w_q, scale, impl="cuda")


# ---------------------------------------------------------------------------------------- fp8


@pytest.mark.parametrize(
    "m,k,n,layout,per_tensor",
    [(1, 64, 48, "kn", False), (33, 96, 80, "nk", False), (16, 256, 64, "kn", True),
     (5, 128, 32, "nk", True)],
)
def test_fp8_kernel_matches_reference(m, k, n, layout, per_tensor):
    x = jax.random.normal(_key(), (m, k), jnp.float32)
    w = jax.random.normal(_key(), (k, n), jnp.float32)
    x_q, x_s = qf.quantize_fp8(x, axis=None if per_tensor else -1)
    w_q, w_s = qf.quantize_fp8(w, axis=None if per_tensor else 0)
    w_l = w_q if layout == "kn" else w_q.T
    bs = f8.BlockSizes(block_m=16, block_n=32, block_k=32, group_m=2)
    y = f8.fp8_matmul(x_q, x_s, w_l, w_s, w_layout=layout, block_sizes=bs, interpret=True)
    r = f8.fp8_matmul_reference(x_q, x_s, w_l, w_s, w_layout=layout)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, r) < 1e-2
    r64 = (_f64(x_q) * _f64(x_s)) @ (_f64(w_q) * _f64(w_s))
    assert _rel(r, r64) < 5e-3
    # W8A8 end to end: close to the unquantized product (e4m3 has 3 mantissa bits)
    y_lin = f8.fp8_linear(x.astype(jnp.bfloat16), w_l, w_s, w_layout=layout, block_sizes=bs,
                          interpret=True)
    assert y_lin.dtype == jnp.bfloat16
    assert _rel(y_lin, _f64(x) @ _f64(w)) < 0.08


def test_fp8_errors():
    q = jnp.ones((16, 32), jnp.float8_e4m3fn)
    s = jnp.ones((16, 1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        f8.fp8_matmul(q.astype(jnp.bfloat16), s, q.T, jnp.ones((1, 16)))
    with pytest.raises(ValueError, match="disagree on K"):
        f8.fp8_matmul(q, s, q, jnp.ones((1, 32)))
    with pytest.raises(ValueError, match="x_scale shape"):
        f8.fp8_matmul(q, jnp.ones((3, 1)), q.T, jnp.ones((1, 16)))
    with pytest.raises(ValueError, match="w_scale shape"):
        f8.fp8_matmul(q, s, q.T, jnp.ones((1, 7)))
    with pytest.raises(ValueError, match="w_layout"):
        f8.fp8_matmul(q, s, q.T, jnp.ones((1, 16)), w_layout="t")
    with pytest.raises(ValueError, match="block_k=16"):
        f8.BlockSizes(block_k=16)


# ---------------------------------------------------------------------------- fp8, Hopper kernel


@pytest.mark.parametrize("m,k,n,blocks,num_sms,per_tensor,out_dtype", [
    # one CTA walks all 6 tiles: its ring runs on across them
    (384, 384, 512, f8h.BlockSizes(num_stages=2, group_m=2), 1, False, jnp.bfloat16),
    # rows padded to whole tiles, a partial last group, steps overlapped, f16 out
    (300, 256, 768, f8h.BlockSizes(num_stages=3, group_m=2, overlap=True), 4, False, jnp.float16),
    # more SMs than tiles, one K step, per-tensor scales
    (64, 128, 256, f8h.BlockSizes(block_m=64, block_n=64), 132, True, jnp.bfloat16),
])
def test_fp8_hopper_kernel_matches_float64(m, k, n, blocks, num_sms, per_tensor, out_dtype):
    x = jax.random.normal(_key(), (m, k), jnp.float32)
    w = jax.random.normal(_key(), (n, k), jnp.float32)  # [N, K], as Fp8Weight stores it
    x_q, x_s = qf.quantize_fp8(x, axis=None if per_tensor else -1)
    w_q, w_s = qf.quantize_fp8(w, axis=None if per_tensor else -1)
    y = f8h.fp8_matmul_mgpu(x_q, x_s, w_q, w_s, out_dtype=out_dtype, blocks=blocks,
                            num_sms=num_sms, interpret=True)
    assert y.shape == (m, n) and y.dtype == out_dtype
    r64 = (_f64(x_q) * _f64(x_s)) @ (_f64(w_q) * _f64(w_s)).T
    assert _rel(y, r64) < 4e-3  # the output's rounding
    r = f8h.fp8_matmul_mgpu_reference(x_q, x_s, w_q, w_s, out_dtype=out_dtype)
    assert _rel(r, r64) < 4e-3 and _rel(y, r) < 2e-3


def test_fp8_hopper_kernel_lowers_to_fp8_wgmma(lower_for_h100):
    """The H100 lowering holds e4m3 x e4m3 wgmma (what the interpreter cannot show)."""
    args = (jnp.zeros((256, 256), f8.FP8), jnp.ones((256,)), jnp.zeros((512, 256), f8.FP8),
            jnp.ones((512,)))
    text = lower_for_h100(jax.jit(lambda *a: f8h.fp8_matmul_mgpu(*a)), *args)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in text


def test_fp8_weight_on_a_gpu_runs_the_product_fp8_impl_names(monkeypatch):
    """`Fp8Weight` on a GPU: XLA's fp8 dot by default, the Hopper kernel with FP8_IMPL = "mgpu"
    where it applies (its rows padded to whole tiles), XLA's dot where it does not."""
    from pallax.model import quant_weights as qw

    calls = []
    kernel = f8h.fp8_matmul_mgpu
    monkeypatch.setattr(dispatch, "on_hopper", lambda: True)
    monkeypatch.setattr(f8h, "fp8_matmul_mgpu",
                        lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    x = jax.random.normal(_key(), (130, 128), jnp.bfloat16)
    wt = qw.Fp8Weight.quantize(jax.random.normal(_key(), (128, 256), jnp.float32))
    xla = qw._fp8_xla(x, wt.w_q, wt.scale)
    assert (qw._fp8_gpu(x, wt.w_q, wt.scale, interpret=True) == xla).all() and not calls
    monkeypatch.setattr(qw, "FP8_IMPL", "mgpu")
    y = qw._fp8_gpu(x, wt.w_q, wt.scale, interpret=True)
    assert calls == [(130, 128)] and y.shape == (130, 256) and y.dtype == jnp.bfloat16
    assert _rel(y, xla) < 2e-3
    narrow = qw.Fp8Weight.quantize(jax.random.normal(_key(), (128, 192), jnp.float32))  # N % 256
    assert (qw._fp8_gpu(x, narrow.w_q, narrow.scale, interpret=True)
            == qw._fp8_xla(x, narrow.w_q, narrow.scale)).all() and len(calls) == 1


def test_fp8_hopper_errors():
    x, w = jnp.ones((128, 128), f8.FP8), jnp.ones((256, 128), f8.FP8)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        f8h.fp8_matmul_mgpu(x.astype(jnp.bfloat16), 1.0, w, 1.0)
    with pytest.raises(ValueError, match="disagree on K"):
        f8h.fp8_matmul_mgpu(x, 1.0, jnp.ones((256, 256), f8.FP8), 1.0)
    with pytest.raises(ValueError, match="N % 256 == 0"):
        f8h.fp8_matmul_mgpu(x, 1.0, jnp.ones((192, 128), f8.FP8), 1.0)
    with pytest.raises(ValueError, match="x_scale shape"):
        f8h.fp8_matmul_mgpu(x, jnp.ones((3, 1)), w, 1.0)
    with pytest.raises(ValueError, match="w_scale shape"):
        f8h.fp8_matmul_mgpu(x, 1.0, w, jnp.ones((7,)))
    with pytest.raises(ValueError, match="out_dtype=float32"):
        f8h.fp8_matmul_mgpu(x, 1.0, w, 1.0, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="shared memory"):
        f8h.fp8_matmul_mgpu(x, 1.0, w, 1.0, blocks=f8h.BlockSizes(num_stages=8))
    for bad, match in [({"block_m": 96}, "block_m=96"), ({"block_n": 96}, "block_n=96"),
                       ({"tile_k": 64}, "tile_k=64"), ({"num_stages": 1}, "num_stages=1"),
                       ({"group_m": 0}, "group_m=0")]:
        with pytest.raises(ValueError, match=match):
            f8h.BlockSizes(**bad)


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (64,), (3, 64)])
def test_single_row_dot_as_two_rows(monkeypatch, shape):
    """On a GPU `linear` feeds a single row to the dot as two (model.linear.gemm_rows: XLA would
    rewrite the vector-matrix product into a slow multiply-reduce); the result, and its shape, are
    the plain product's. The GPU branch is taken here by pretending to be on one."""
    from pallax.model import linear as lin

    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    w = jax.random.normal(jax.random.key(1), (64, 48), jnp.float32)
    want = np.asarray(x) @ np.asarray(w)
    seen = []
    real_pad = jnp.pad
    monkeypatch.setattr(lin.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(lin.jnp, "pad", lambda a, *args, **kw: seen.append(a.shape) or real_pad(a, *args, **kw))
    got = lin.linear(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert seen == ([(1, 64)] if x.size == 64 else [])  # padded exactly when there is one row


# ------------------------------------------------------------- int4, Hopper layout (Mosaic GPU)

from pallax.kernels_pallas import int4_matmul_mgpu as i4h  # noqa: E402
from pallax.model import linear as lin  # noqa: E402
from pallax.model.quant_weights import (Int4HopperWeight, Int4Weight, hopper_layout,  # noqa: E402
                                        portable_layout)


def _int4_case(m, k, n, group_size, symmetric=True):
    w = jax.random.normal(_key(), (k, n), jnp.float32)
    x = jax.random.normal(_key(), (m, k), jnp.float32).astype(jnp.bfloat16)
    packed, scales, zeros = qf.quantize_int4(w, group_size, symmetric=symmetric)
    return x, packed, scales, zeros


@pytest.mark.parametrize("m,k,n,group_size,blocks", [
    (1, 1024, 128, 128, i4h.BlockSizes(tile_k=256, num_stages=2)),  # M = 1; the ring wraps twice
    (5, 1280, 256, 64, i4h.BlockSizes(tile_k=256, num_stages=4)),  # odd M; steps not a stage multiple
    (16, 1024, 256, 128, i4h.BlockSizes(tile_k=256, num_stages=2, ctas=3)),  # blocks shared by CTAs
    (9, 512, 256, 64, i4h.BlockSizes(tile_k=128, num_stages=3, consumers=4)),  # 4 consumers
    (33, 256, 128, 128, i4h.BlockSizes(tile_k=128, num_stages=2, consumers=1)),  # 1 consumer
    (3, 512, 256, 128, i4h.BlockSizes(tile_k=256, num_stages=2, consumers=1, ctas=4)),  # a block a CTA
    (2, 384, 256, 128, None),  # K % 256 != 0: blocks_for(K) takes 128-wide steps, 8 stages
])
def test_int4_hopper_kernel_matches_float64(m, k, n, group_size, blocks):
    """The Mosaic GPU kernel through the GPU interpreter (barriers, TMA ring, per-group wgmma and
    scale) against float64 on the dequantized weight."""
    x, packed, scales, _ = _int4_case(m, k, n, group_size)
    words, s = i4h.to_hopper_layout(packed, scales, group_size=group_size)
    assert words.shape == (n // 64, k // group_size, group_size // 16, 128)
    y = i4h.int4_matmul_mgpu(x, words, s, group_size=group_size, blocks=blocks, num_sms=4,
                             interpret=True)
    want = _f64(x) @ _f64(qf.dequantize_int4(packed, scales, None, group_size=group_size))
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert _rel(y, want) < 4e-3
    # one scale flipped lands on its own (group, column): the output follows the reference with the
    # same flip (a misplaced or ignored scale leaves column 3 off by twice that group's share)
    y2 = i4h.int4_matmul_mgpu(x, words, s.at[1, 3].mul(-1.0), group_size=group_size, blocks=blocks,
                              num_sms=4, interpret=True)
    want2 = _f64(x) @ _f64(qf.dequantize_int4(packed, scales.at[1, 3].mul(-1.0), None, group_size=group_size))
    assert _rel(y2[:, 3], want2[:, 3]) < 4e-3 and _rel(y2, want2) < 4e-3
    if blocks is None:  # the kernel also reads f32 scales (bf16 ones widen exactly: the same product)
        assert s.dtype == jnp.bfloat16
        y32 = i4h.int4_matmul_mgpu(x, words, s.astype(jnp.float32), group_size=group_size, num_sms=4,
                                   interpret=True)
        np.testing.assert_array_equal(np.asarray(y32, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize("units", [1, 3])
def test_int4_hopper_prefetch_leaves_the_product(units):
    """Warming L2 for a next call of another shape and group (more units than a CTA of that call
    has, more CTAs than it runs) changes nothing in the product (the interpreter runs the
    producer's unit and tile arithmetic; the prefetch itself is a no-op there)."""
    x, packed, scales, _ = _int4_case(3, 1024, 256, 128)
    words, s = i4h.to_hopper_layout(packed, scales, group_size=128)
    _, p2, s2, _ = _int4_case(1, 256, 128, 64)
    nxt = i4h.to_hopper_layout(p2, s2, group_size=64)
    run = lambda **kw: i4h.int4_matmul_mgpu(x, words, s, group_size=128, num_sms=4,  # noqa: E731
                                            interpret=True, **kw)
    np.testing.assert_array_equal(np.asarray(run(next_weight=nxt, next_group_size=64,
                                                 prefetch_units=units), np.float32),
                                  np.asarray(run(), np.float32))


def test_int4_hopper_prefetch_lowers_to_l2_prefetches(lower_for_h100):
    """With a next weight the H100 lowering holds TMA L2 prefetches of its word and scale tiles
    (4-D and 2-D), and without one none."""
    x = jnp.zeros((2, 512), jnp.bfloat16)
    w = (jnp.zeros((4, 4, 8, 128), jnp.int32), jnp.zeros((4, 256), jnp.float32))
    nxt = (jnp.zeros((8, 2, 8, 128), jnp.int32), jnp.zeros((2, 512), jnp.float32))
    call = lambda units: jax.jit(lambda x, a, b, c, d: i4h.int4_matmul_mgpu(  # noqa: E731
        x, a, b, group_size=128, next_weight=(c, d), prefetch_units=units))
    warm, cold = (lower_for_h100(call(u), x, *w, *nxt) for u in (1, 0))
    for tile in ("4d", "2d"):
        assert f"cp.async.bulk.prefetch.tensor.{tile}.L2" in warm
    assert "cp.async.bulk.prefetch.tensor" not in cold


def test_decoder_warms_each_int4_call_for_the_next(monkeypatch, hopper_int4_model):
    """Unrolled, every int4 call of the step hands its kernel the weight of the call after it (q/k/v
    -> o -> gate/up -> down -> the next layer's q/k/v ... -> the head); the head, last, none."""
    c, params, fwd = hopper_int4_model
    calls, kernel = [], i4h.int4_matmul_mgpu

    def recording(x, words, scales, **kw):
        calls.append((words, kw.get("next_weight")))
        return kernel(x, words, scales, **kw)

    def trace():  # afresh: a cached trace would make no calls (and keep the old setting)
        jax.clear_caches()
        with dispatch.kernel_mode("interpret"):
            jax.make_jaxpr(fwd)(params)

    monkeypatch.setattr(i4h, "int4_matmul_mgpu", recording)
    trace()
    assert len(calls) == 4 * c.n_layers + 1
    for (_, nxt), (words, _) in zip(calls, calls[1:]):
        assert nxt is not None and nxt[0] is words
    assert calls[-1][1] is None
    monkeypatch.setattr(i4h, "PREFETCH_UNITS", 0)  # off: no call gets a next weight
    calls.clear()
    trace()
    assert len(calls) == 4 * c.n_layers + 1 and all(nxt is None for _, nxt in calls)


@pytest.mark.parametrize("group_size", [64, 128])
def test_int4_hopper_words_follow_the_wgmma_operand_layout(group_size):
    """Each code sits where the consumer thread that holds it in the wgmma operand loads it: the
    packing (bit transposes) agrees with the map read off Mosaic GPU's WGMMA layout, and the
    register order the kernel emits (thread t, register o = 4 w + p: word w's nibbles p, p + 4)
    covers every (row, column) of the layout once."""
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    g = group_size
    u = jax.random.randint(_key(), (128, 2 * g), 0, 16).astype(jnp.uint8)  # [N, K]
    words = i4h.pack_codes(u, g)
    assert words.shape == (2, 2, g // 16, 128) and words.dtype == jnp.int32
    np.testing.assert_array_equal(i4h.unpack_codes(words, g), u)
    src = i4h._word_map(g)  # [64, g]: word * 8 + nibble
    w = np.asarray(words).view(np.uint32).reshape(2, 2, -1)
    for nt in range(2):
        for kg in range(2):
            nib = (w[nt, kg][src // 8] >> (4 * (src % 8)).astype(np.uint32)) & 0xF
            want = np.asarray(u)[64 * nt:64 * (nt + 1), g * kg:g * (kg + 1)]
            np.testing.assert_array_equal(nib, want)
    # the layout: WGMMA_LAYOUT gives each of 128 threads g / 2 bf16 pairs of the [64, g] tile
    assert np.prod(fa.WGMMA_LAYOUT.registers_shape((64, g))) * 2 * 128 == 64 * g
    # thread 0, register 0 (word 0, nibbles 0 and 4) is the pair at row 0, columns 0 and 1
    assert src[0, 0] == 0 and src[0, 1] == 4
    # thread 1 (lane 1) loads words 4..7: its first pair is row 0, columns 2 and 3
    assert src[0, 2] == 4 * 8 and src[0, 3] == 4 * 8 + 4
    # lane 4 holds row 1; warp 1 holds rows 16..31
    assert src[1, 0] // 8 == 4 * 4 and src[16, 0] // 8 == 32 * 4


def test_int4_hopper_weight_round_trip_and_dispatch():
    x, packed, scales, _ = _int4_case(3, 512, 256, 128)
    w = Int4Weight(packed=packed, scales=scales.astype(jnp.bfloat16), group_size=128)
    h = Int4HopperWeight.from_int4(w)
    assert h.shape == w.shape == (512, 256)
    back = h.to_int4()
    np.testing.assert_array_equal(back.packed, w.packed)
    np.testing.assert_array_equal(back.scales, w.scales)
    np.testing.assert_allclose(h.dequantize(), w.dequantize(), rtol=0, atol=0)
    want = _f64(x) @ _f64(w.dequantize())
    with dispatch.kernel_mode("interpret"):
        y_kernel = lin.linear(x, h)  # M = 3: the kernel
    with dispatch.kernel_mode("reference"):
        y_ref = lin.linear(x, h)
        y_big = lin.linear(jnp.tile(x, (30, 1)), h)  # M = 90 > 64: dequantize, then one dot
    for y in (y_kernel, y_ref, y_big[:3]):
        assert _rel(y, want) < 4e-3


def test_hopper_layout_converts_what_the_kernel_takes():
    def int4(k, n, symmetric=True, g=128):
        w = jax.random.normal(_key(), (k, n), jnp.float32)
        return Int4Weight.quantize(w, g, symmetric=symmetric)

    params = {"a": int4(512, 256), "asym": int4(512, 256, symmetric=False),
              "narrow": int4(512, 96, g=32), "dense": jnp.ones((4, 4)),
              "k384": int4(384, 128)}  # K % 256 != 0 (as Qwen2.5-0.5B's 896): 128-wide steps
    out = hopper_layout(params)
    assert isinstance(out["a"], Int4HopperWeight) and isinstance(out["k384"], Int4HopperWeight)
    assert i4h.blocks_for(384).tile_k == 128 and i4h.blocks_for(512).tile_k == 256
    assert isinstance(out["asym"], Int4Weight) and isinstance(out["narrow"], Int4Weight)
    assert out["dense"] is params["dense"]
    back = portable_layout(out)
    np.testing.assert_array_equal(back["a"].packed, params["a"].packed)
    # fused projections concatenate and split along the output channels
    both = lin.concat_out([out["a"], hopper_layout({"b": int4(512, 128)})["b"]])
    assert both.shape == (512, 384) and both.words.shape == (6, 4, 8, 128)
    parts = lin.split_out(both, [256, 128])
    np.testing.assert_array_equal(parts[0].words, out["a"].words)
    np.testing.assert_array_equal(parts[0].scales, out["a"].scales)
    with pytest.raises(ValueError, match="multiples of 64"):
        lin.split_out(both, [200, 184])


def test_int4_hopper_errors():
    x, packed, scales, zeros = _int4_case(2, 512, 128, 128, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        i4h.to_hopper_layout(packed, scales, zeros, group_size=128)
    with pytest.raises(ValueError, match="g in"):
        i4h.to_hopper_layout(packed, scales, group_size=32)
    words, s = i4h.to_hopper_layout(packed, scales, group_size=128)
    with pytest.raises(ValueError, match="M <= 64"):
        i4h.int4_matmul_mgpu(jnp.zeros((65, 512), jnp.bfloat16), words, s, group_size=128)
    with pytest.raises(ValueError, match="scales"):
        i4h.int4_matmul_mgpu(x, words, s[:2], group_size=128)
    with pytest.raises(ValueError, match="words must be"):
        i4h.int4_matmul_mgpu(x, words, s, group_size=64)
    with pytest.raises(ValueError, match="profile_dir"):
        i4h.int4_matmul_mgpu(x, words, s, group_size=128, interpret=True, profile_dir="/tmp")
    assert s.dtype == jnp.bfloat16  # the quantizer's scales, as they are
    with pytest.raises(ValueError, match="next_weight"):  # scales neither bf16 nor f32: converted, another buffer
        i4h.int4_matmul_mgpu(x, words, s, group_size=128, interpret=True,
                             next_weight=(words, s.astype(jnp.float16)), prefetch_units=1)
    with pytest.raises(ValueError, match="next_weight"):  # words of another group size
        i4h.int4_matmul_mgpu(x, words, s, group_size=128, interpret=True, next_weight=(words, s),
                             next_group_size=64, prefetch_units=1)
    with pytest.raises(ValueError, match="units"):
        i4h.Prefetch(512, 128, 128, units=0)
    with pytest.raises(ValueError, match="consumers"):
        i4h.BlockSizes(consumers=5)
    with pytest.raises(ValueError, match="tile_k"):
        i4h.BlockSizes(tile_k=192)


@pytest.mark.parametrize("k,n,blocks,num_sms", [
    (4096, 14336, i4h.BlockSizes(), 132),  # 112 row blocks x 16 steps over 132 CTAs
    (1280, 256, i4h.BlockSizes(tile_k=256), 4),
    (512, 1024, i4h.BlockSizes(tile_k=256, consumers=4), 132),  # fewer units than SMs
    (4096, 4096, i4h.BlockSizes(ctas=96), 132),  # split-K by whole runs
])
def test_int4_hopper_schedule_covers_every_unit_once(k, n, blocks, num_sms):
    """Stream-K: every (row block, K step) unit is streamed by exactly one CTA, the runs differ by
    at most one unit, and every row block's pieces are exactly the CTAs that touched it, in
    order."""
    sched = i4h.Schedule.make(k, n, blocks, num_sms)
    tiles, steps = n // blocks.rows, k // blocks.tile_k
    assert sched.units == tiles * steps and sched.ctas == min(blocks.ctas or num_sms, sched.units)
    runs = [range(c * sched.units // sched.ctas, (c + 1) * sched.units // sched.ctas)
            for c in range(sched.ctas)]
    assert sorted(u for r in runs for u in r) == list(range(sched.units))
    assert max(map(len, runs)) - min(map(len, runs)) <= 1
    assert sched.tiles == tiles
    for block in range(tiles):
        touching = [c for c, r in enumerate(runs) if any(u // steps == block for u in r)]
        first, count = sched.first_cta(block), sched.pieces(block)
        assert list(range(first, first + count)) == touching  # piece p: CTA first + p
        assert sched.run(first) == (runs[first].start, runs[first].stop)
    assert sched.width == max(sched.pieces(b) for b in range(tiles))
    # the same arithmetic on arrays, as the kernels trace it (truncating division)
    b = np.arange(tiles)
    want = [sched.pieces(int(i)) for i in b]
    np.testing.assert_array_equal(sched.pieces(b), want)
    np.testing.assert_array_equal(sched.pieces(jnp.asarray(b, jnp.int32), jax.lax.div), want)
