"""The decoder as pure functions over an explicit parameter pytree.

embed -> N x (RMSNorm, GQA attention with RoPE, SwiGLU MLP) -> RMSNorm -> logits.

Parameters (layers stacked on a leading axis and run with `lax.scan`); each leaf's logical axes
are in `param_axes`. Projections are stored `[in, out]` with heads fused into the output axis
(`heads` = n_heads * head_dim, `kv_heads` = n_kv_heads * head_dim), so every projection is a plain
2-D `linear` that any weight format can take; sharding `heads` over a mesh axis keeps whole heads
together as long as the mesh axis divides the head count.

    embed      [vocab, dim]               ("vocab", "embed")
    layers/
      attn_norm  [L, dim]                 ("layers", "embed")
      wq         [L, dim, H*hd]           ("layers", "embed", "heads")
      wk, wv     [L, dim, KVH*hd]         ("layers", "embed", "kv_heads")
      bq         [L, H*hd]                ("layers", "heads")          (qkv_bias only)
      bk, bv     [L, KVH*hd]              ("layers", "kv_heads")       (qkv_bias only)
      wo         [L, H*hd, dim]           ("layers", "heads", "embed")
      mlp_norm   [L, dim]                 ("layers", "embed")
      w_gate     [L, dim, ffn]            ("layers", "embed", "mlp")
      w_up       [L, dim, ffn]            ("layers", "embed", "mlp")
      w_down     [L, ffn, dim]            ("layers", "mlp", "embed")
    final_norm [dim]                      ("embed",)
    lm_head    [dim, vocab]               ("embed", "vocab")           (absent when tied)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .attention import AttentionCache, NoCache
from .config import ModelConfig
from .layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq, swiglu
from .linear import linear

Params = dict[str, Any]


def param_axes(config: ModelConfig) -> Params:
    """Logical axis names of every parameter, in the same tree structure as the parameters."""
    layers = {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "heads"),
        "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"),
        "wo": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if config.qkv_bias:
        layers.update(bq=("layers", "heads"), bk=("layers", "kv_heads"), bv=("layers", "kv_heads"))
    axes = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("embed",)}
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig) -> Params:
    c, L = config, config.n_layers
    layers = {
        "attn_norm": (L, c.dim),
        "wq": (L, c.dim, c.q_dim),
        "wk": (L, c.dim, c.kv_dim),
        "wv": (L, c.dim, c.kv_dim),
        "wo": (L, c.q_dim, c.dim),
        "mlp_norm": (L, c.dim),
        "w_gate": (L, c.dim, c.ffn_dim),
        "w_up": (L, c.dim, c.ffn_dim),
        "w_down": (L, c.ffn_dim, c.dim),
    }
    if c.qkv_bias:
        layers.update(bq=(L, c.q_dim), bk=(L, c.kv_dim), bv=(L, c.kv_dim))
    shapes = {"embed": (c.vocab_size, c.dim), "layers": layers, "final_norm": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.dim, c.vocab_size)
    return shapes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
    """Random parameters of the right shapes (normal(0, 0.02) weights, unit norms, zero biases)."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        elif path.rstrip("']").endswith(("bq", "bk", "bv")):
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def check_params(params: Params, config: ModelConfig, source: str = "parameters") -> None:
    """Raise ValueError naming the first missing or mis-shaped parameter."""
    want = param_shapes(config)
    for path, shape in jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda s: isinstance(s, tuple))[0]:
        node = params
        for p in path:
            key = p.key
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"{source}: missing parameter {jax.tree_util.keystr(path)}")
            node = node[key]
        got = tuple(node.shape)
        if got != shape:
            raise ValueError(f"{source}: parameter {jax.tree_util.keystr(path)} has shape {got}, expected {shape}")


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: AttentionCache | None = None,
    *,
    config: ModelConfig,
    segment_ids: jax.Array | None = None,
    logit_indices: jax.Array | None = None,
) -> tuple[jax.Array, AttentionCache]:
    """tokens, positions [B, T] int32 -> logits [B, T, vocab] float32 and the updated cache.

    `logit_indices` [B, N] picks the token indices whose logits are computed ([B, N, vocab]).
    """
    c = config
    cache = NoCache() if cache is None else cache
    B, T = tokens.shape
    x = params["embed"][tokens]  # [B, T, dim]
    cos, sin = rope_cos_sin(positions, rope_inv_freq(c))

    def layer(carry, scanned):
        x, state = carry
        p, kv, index = scanned
        h = rms_norm(x, p["attn_norm"], c.norm_eps)
        q = linear(h, p["wq"], p.get("bq")).reshape(B, T, c.n_heads, c.head_dim)
        k = linear(h, p["wk"], p.get("bk")).reshape(B, T, c.n_kv_heads, c.head_dim)
        v = linear(h, p["wv"], p.get("bv")).reshape(B, T, c.n_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o, kv, state = cache.attend(kv, q, k, v, positions, segment_ids, state=state, index=index)
        x = x + linear(o.reshape(B, T, c.q_dim), p["wo"])
        h = rms_norm(x, p["mlp_norm"], c.norm_eps)
        x = x + swiglu(h, p["w_gate"], p["w_up"], p["w_down"])
        return (x, state), kv

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        # Unstacked: one buffer per layer, run as a Python loop. Under `lax.scan`, XLA slices each
        # layer's weights out of the stacked arrays with a copy before the matmuls read them
        # (about 3x the weight bytes per step); separate buffers are read where they lie.
        state, cache_layers, new = cache.state(), cache.layers(), []
        for i, p in enumerate(layers):
            kv = None if cache_layers is None else jax.tree.map(lambda a: a[i], cache_layers)
            (x, state), kv = layer((x, state), (p, kv, i))
            new.append(kv)
        new_layers = None if cache_layers is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
    else:
        scanned = (layers, cache.layers(), jnp.arange(c.n_layers, dtype=jnp.int32))
        (x, state), new_layers = lax.scan(layer, (x, cache.state()), scanned)
    cache = cache.with_layers(new_layers).with_state(state)
    if logit_indices is not None:
        x = jnp.take_along_axis(x, logit_indices[..., None], axis=1)
    x = rms_norm(x, params["final_norm"], c.norm_eps)
    return logits_from_hidden(params, x, c), cache


def unstack_layers(params: Params) -> Params:
    """The same parameters with `layers` as a list of per-layer trees (separate buffers), which
    `forward` runs unrolled: the fast layout for serving on a GPU. The stacked arrays stay alive
    while the copies are made (the caller still holds them), so the peak is twice the layers'
    bytes; they are freed when the caller drops the stacked tree."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[j], layers) for j in range(n)]}


def logits_from_hidden(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Final-normed hidden [..., dim] -> logits [..., vocab] in float32."""
    if config.tie_embeddings:
        return jnp.einsum("...d,vd->...v", x, params["embed"].astype(x.dtype), preferred_element_type=jnp.float32)
    return linear(x, params["lm_head"]).astype(jnp.float32)
