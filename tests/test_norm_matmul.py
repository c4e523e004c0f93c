"""RMSNorm fused into a small-M matmul (bias or SwiGLU epilogue) against its reference, and the
reference against the decoder's own layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.kernels_pallas.norm_matmul import BlockSizes, norm_matmul, norm_matmul_reference
from pallax.model.layers import rms_norm
from pallax.model.linear import linear


def _rand(seed, shape, scale=1.0, dtype=jnp.bfloat16):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def _case(m, k, n, seed=0):
    return _rand(seed, (m, k)), 1 + _rand(seed + 1, (k,), 0.2), _rand(seed + 2, (k, n), 0.05), _rand(seed + 3, (n,), 0.5)


def _close(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    # about one bf16 rounding apart (x * g is rounded before the product, not x * g / rms)
    np.testing.assert_allclose(got, want, rtol=1.5e-2, atol=1.5e-2 * np.abs(want).max())


@pytest.mark.parametrize("m", [1, 2, 9, 16, 33])
@pytest.mark.parametrize("epilogue", ["none", "bias", "swiglu"])
def test_kernel_matches_reference(m, epilogue):
    k, n = 256, 128
    x, g, w, b = _case(m, k, n, seed=m)
    kw = dict(eps=1e-5, bias=b if epilogue == "bias" else None, swiglu=epilogue == "swiglu")
    want = norm_matmul_reference(x, g, w, **kw)
    for bs in (None, BlockSizes(block_n=16, block_k=32), BlockSizes(block_n=64, block_k=256)):
        got = norm_matmul(x, g, w, block_sizes=bs, interpret=True, **kw)
        assert got.dtype == w.dtype and got.shape == (m, n // 2 if kw["swiglu"] else n)
        _close(got, want)


def test_default_blocks_tile_decode_shapes():
    """The Qwen2.5 shapes, whose widths are not powers of two, tile with the default blocks."""
    for k, n_out in ((896, 1152), (896, 4864), (1536, 2048), (1536, 8960), (4096, 6144), (96, 48)):
        bs = BlockSizes.default(2, k, n_out)
        assert n_out % bs.block_n == 0 and k % bs.block_k == 0, (k, n_out, bs)
    x, g, w, b = _case(2, 96, 96)
    _close(norm_matmul(x, g, w, eps=1e-6, bias=b, interpret=True), norm_matmul_reference(x, g, w, eps=1e-6, bias=b))


def test_reference_is_the_decoders_composition():
    """The oracle is the decoder's own layers: RMSNorm then `linear` with its bias, and the
    SwiGLU of a fused gate | up product."""
    x, g, w, b = _case(3, 64, 32)
    want = linear(rms_norm(x, g, 1e-5), w, b)
    np.testing.assert_array_equal(np.asarray(norm_matmul_reference(x, g, w, eps=1e-5, bias=b)), np.asarray(want))
    gate, up = jnp.split(linear(rms_norm(x, g, 1e-5), w), 2, axis=-1)
    np.testing.assert_array_equal(np.asarray(norm_matmul_reference(x, g, w, eps=1e-5, swiglu=True)),
                                  np.asarray(jax.nn.silu(gate) * up))


def test_bad_input_is_named():
    x, g, w, b = _case(2, 64, 32)
    with pytest.raises(ValueError, match="columns"):
        norm_matmul(x[:, :48], g, w, eps=1e-6)
    with pytest.raises(ValueError, match="norm weight"):
        norm_matmul(x, g[:32], w, eps=1e-6)
    with pytest.raises(ValueError, match="swiglu"):
        norm_matmul(x, g, w, eps=1e-6, swiglu=True, bias=b)
    with pytest.raises(ValueError, match="bias has shape"):
        norm_matmul(x, g, w, eps=1e-6, bias=b[:31])
    with pytest.raises(ValueError, match="must match"):
        norm_matmul(x.astype(jnp.float32), g, w, eps=1e-6)
    with pytest.raises(ValueError, match="does not tile"):
        norm_matmul(x, g, w, eps=1e-6, block_sizes=BlockSizes(block_n=64), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_k=24)
