"""The residual add + RMSNorm kernel (interpret mode) against the model's own composition, on
partial sums laid out as the int4 Hopper kernel's schedule leaves them and on that kernel's own;
its Triton lowering; the decoder's use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.kernels_pallas import int4_matmul_mgpu as i4h
from pallax.kernels_pallas import quant_formats as qf
from pallax.kernels_pallas._matmul_common import PartialSums
from pallax.kernels_pallas.dispatch import kernel_mode
from pallax.kernels_pallas.residual_norm import residual_rms_norm, residual_rms_norm_reference
from pallax.model.layers import rms_norm

EPS = 1e-5


def _rand(seed, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _composed(x, y, w):
    """What the decoder computed before: the add in x's dtype, then `rms_norm`."""
    x = x + y.astype(x.dtype)
    return x, rms_norm(x, w, EPS)


def _assert_close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
        else:  # the row's sum of squares in another order may move h by one rounding step
            g32, w32 = np.asarray(g, np.float32), np.asarray(w, np.float32)
            step = np.abs(w32) * (2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10)
            assert np.all(np.abs(g32 - w32) <= step + 1e-6)


def _partial_sums(seed, m, n, k, blocks, ctas, dtype):
    """Random partial sums laid out as the int4 kernel's stream-K schedule leaves them."""
    sched = i4h.Schedule.make(k, n, blocks, ctas)
    parts = _rand(seed, (sched.tiles, sched.width, 8, blocks.rows))
    return PartialSums(parts, m, jnp.dtype(dtype), sched)


@pytest.mark.parametrize("m,n,k,consumers,ctas,dtype,y_dtype", [
    (1, 512, 1024, 2, 11, jnp.bfloat16, jnp.bfloat16),  # a decode row, blocks over 2-4 CTAs
    (3, 384, 2048, 2, 7, jnp.bfloat16, jnp.bfloat16),   # 3 row blocks: padded to 4 by the last again
    (2, 320, 512, 1, 9, jnp.float32, jnp.float32),      # 64-wide blocks, 5 of them
    (8, 256, 1024, 1, 5, jnp.float16, jnp.float16),     # every padded row used
    (2, 256, 512, 2, 3, jnp.bfloat16, jnp.float32),     # an f32 product rounded to x's dtype after
])
def test_partial_sums_match_the_composition(m, n, k, consumers, ctas, dtype, y_dtype):
    blocks = i4h.BlockSizes(tile_k=128, consumers=consumers)
    y = _partial_sums(1, m, n, k, blocks, ctas, y_dtype)
    x = _rand(2, (m, n), dtype)
    w = _rand(3, (n,), jnp.float32, 0.1) + 1.0
    got = residual_rms_norm(x, y, w, eps=EPS, interpret=True)
    want = _composed(x, y.sum(), w)
    _assert_close(got, want, dtype)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))  # the add: one rounding
    _assert_close(residual_rms_norm_reference(x, y, w, eps=EPS), want, dtype)
    # a piece past its block's count is never read
    unused = ~y.used()
    assert y.used().sum(axis=1).max() > 1  # some blocks of 2+ pieces
    poisoned = PartialSums(jnp.where(unused[:, :, None, None], jnp.nan, y.parts), m, y.dtype, y.split)
    again = residual_rms_norm(x, poisoned, w, eps=EPS, interpret=True)
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(got[1]))
    np.testing.assert_array_equal(np.asarray(poisoned.sum()), np.asarray(y.sum()))


def test_dense_y_runs_the_reference():
    """A dense y is XLA's to add (module docstring): the same results, and no kernel."""
    x, y = _rand(1, (2, 96), jnp.bfloat16), _rand(2, (2, 96), jnp.bfloat16)
    w = _rand(3, (96,), jnp.float32, 0.1) + 1.0
    with kernel_mode("interpret"):
        jaxpr = jax.make_jaxpr(lambda x, y: residual_rms_norm(x, y, w, eps=EPS))(x, y)
        got = residual_rms_norm(x, y, w, eps=EPS)
    assert "pallas_call" not in str(jaxpr)
    _assert_close(got, _composed(x, y, w), jnp.bfloat16)


@pytest.mark.parametrize("m,k,n,blocks", [
    (1, 1024, 256, i4h.BlockSizes(tile_k=256, num_stages=2, consumers=1)),  # blocks split over CTAs
    (3, 512, 384, i4h.BlockSizes(tile_k=128, num_stages=2, consumers=1, ctas=5)),  # uneven slots
])
def test_int4_partial_sums_are_added_in_the_kernel(m, k, n, blocks):
    """The int4 Hopper kernel's partial sums (interpret mode), unadded: their `sum()` is the
    kernel's product, and the residual kernel adding them itself gives the composition with it."""
    w = _rand(4, (k, n), scale=0.05)
    packed, scales, _ = qf.quantize_int4(w, 128, symmetric=True)
    words, s = i4h.to_hopper_layout(packed, scales, group_size=128)
    a = _rand(5, (m, k), jnp.bfloat16)
    run = lambda partial: i4h.int4_matmul_mgpu(a, words, s, group_size=128, blocks=blocks,  # noqa: E731
                                               num_sms=7, interpret=True, partial=partial)
    y, parts = run(False), run(True)
    assert parts.shape == (m, n) and parts.parts.shape[2] == m  # the M real rows, not M_pad
    assert parts.used().sum() > parts.parts.shape[0]  # some blocks have 2+ pieces
    np.testing.assert_array_equal(np.asarray(parts.sum()), np.asarray(y))
    x = _rand(6, (m, n), jnp.bfloat16)
    g = _rand(7, (n,), jnp.float32, 0.1) + 1.0
    got = residual_rms_norm(x, parts, g, eps=EPS, interpret=True)
    _assert_close(got, _composed(x, y, g), jnp.bfloat16)
    _assert_close(residual_rms_norm_reference(x, parts, g, eps=EPS), _composed(x, y, g), jnp.bfloat16)


def test_lowers_to_triton(lower_for_h100):
    """The kernel lowers through Triton for an H100 (the interpreter skips that): Llama-3-8B's
    width, and Qwen2.5-1.5B's (12 row blocks, padded to 16)."""
    for d, k in ((4096, 14336), (1536, 8960)):
        sched = i4h.Schedule.make(k, d, i4h.blocks_for(k), 132)
        x = jax.ShapeDtypeStruct((2, d), jnp.bfloat16)
        g = jax.ShapeDtypeStruct((d,), jnp.bfloat16)
        parts = jax.ShapeDtypeStruct((sched.tiles, sched.width, 2, 128), jnp.float32)  # as written
        with kernel_mode("pallas"):
            text = lower_for_h100(jax.jit(lambda x, p, g: residual_rms_norm(
                x, PartialSums(p, 2, jnp.dtype(jnp.bfloat16), sched), g, eps=EPS)), x, parts, g)
        assert "residual_norm" in text


def test_bad_input():
    x = jnp.zeros((2, 256), jnp.bfloat16)
    y = _partial_sums(1, 2, 256, 512, i4h.BlockSizes(tile_k=128), 3, jnp.bfloat16)
    with pytest.raises(ValueError, match="must match"):
        residual_rms_norm(x[:, :128], y, jnp.ones(128), eps=EPS)
    with pytest.raises(ValueError, match="norm weight"):
        residual_rms_norm(x, y, jnp.ones(128), eps=EPS)
    with pytest.raises(ValueError, match=r"\[M, D\]"):
        residual_rms_norm(x[0], x[0], jnp.ones(256), eps=EPS)
    with pytest.raises(ValueError, match="M_pad >= 3"):
        residual_rms_norm(jnp.zeros((3, 256), jnp.bfloat16), PartialSums(y.parts[:, :, :2], 3, y.dtype, y.split),
                          jnp.ones(256), eps=EPS)
    with pytest.raises(ValueError, match="StreamK split"):
        residual_rms_norm(x, PartialSums(y.parts[:, :1], 2, y.dtype, y.split), jnp.ones(256), eps=EPS)


def test_decoder_adds_int4_partial_sums_in_the_norm_kernels(count_kernels, hopper_int4_model):
    """A model served in the Hopper int4 layout, through the interpreter: every residual add
    after an int4 product (o and down: two a layer, the last one before the final norm) runs in
    this kernel, and the logits match the reference path's."""
    c, params, fwd = hopper_int4_model

    with kernel_mode("interpret"):
        jaxpr = jax.make_jaxpr(fwd)(params)
        got = np.asarray(fwd(params), np.float32)
    assert count_kernels(jaxpr.jaxpr, "residual_norm") == 2 * c.n_layers
    with kernel_mode("reference"):
        want = np.asarray(fwd(params), np.float32)
    np.testing.assert_allclose(got, want, atol=0.03 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).all()

