"""Small layers of the decoder: RMSNorm (alone or after the residual add), rotary embeddings (with
Llama-3 scaling), SwiGLU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallax.kernels_pallas import residual_norm
from pallax.kernels_pallas._matmul_common import PartialSums

from .config import ModelConfig
from .linear import linear


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., D] normalized in float32, scaled by weight [D], returned in x.dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float64 on the host, as the reference computes them)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if config.rope_freq_factors is not None:
        factors = np.asarray(config.rope_freq_factors, np.float64)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope_freq_factors has shape {factors.shape}, expected {inv_freq.shape}")
        return inv_freq / factors
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1 scaling (transformers `_compute_llama3_parameters`): long wavelengths are slowed by
    # `factor`, short ones kept, and the band between is interpolated smoothly.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, D/2] in float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout). x [B, T, N, D]; cos/sin [B, T, D/2]."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def swiglu(x: jax.Array, w_gate, w_up) -> jax.Array:
    """The MLP's hidden activation silu(x gate) * (x up) [..., ffn]; x [..., D]."""
    return jax.nn.silu(linear(x, w_gate)) * linear(x, w_up)


def swiglu_fused(x: jax.Array, w_gate_up, *, then=None) -> jax.Array:
    """`swiglu` with gate and up concatenated along the output axis (one GEMM); x [..., D].
    `then`: the weight read next (`linear`)."""
    gate, up = jnp.split(linear(x, w_gate_up, then=then), 2, axis=-1)  # [..., ffn] each
    return jax.nn.silu(gate) * up


def residual_rms_norm(x: jax.Array, y, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(x + y, rms_norm(x + y, weight, eps)): the residual stream and the next block's input,
    for x [..., D] and y a block's output: an array like x, `PartialSums` of x's rows
    (`linear_partials`), or None (nothing to add: x and its norm).

    One kernel on a GPU (`kernels_pallas.residual_norm`) where y is `PartialSums`, whose sum it
    adds itself; a dense y goes to XLA, which fuses the add into the producer's epilogue."""
    if not isinstance(y, PartialSums):
        x = added(x, y)
        return x, rms_norm(x, weight, eps)
    x2, h = residual_norm.residual_rms_norm(x.reshape(y.shape), y, weight, eps=eps)
    return x2.reshape(x.shape), h.reshape(x.shape)


def added(x: jax.Array, y) -> jax.Array:
    """x + y for y as `residual_rms_norm` takes it."""
    if y is None:
        return x
    if isinstance(y, PartialSums):
        return x + y.sum().reshape(x.shape).astype(x.dtype)
    return x + y.astype(x.dtype)
