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

The serving layout (what the engine runs: `unstack_layers`, then `fuse_projections`) has `layers`
as a list of per-layer trees without the `L` axis, in which the projections that read the same
input are concatenated along the output axis, one GEMM each instead of two or three:

      wqkv       [dim, H*hd + 2*KVH*hd]   wq | wk | wv
      bqkv       [H*hd + 2*KVH*hd]        bq | bk | bv                 (qkv_bias only)
      w_gate_up  [dim, 2*ffn]             w_gate | w_up

A group whose quantized weights cannot share one GEMM (`linear.concat_mismatch`: e.g. AWQ
act_scales that differ) stays separate in that layer. Training, scoring and quantizing use the
stacked, unfused layout (`quantize.stacked` restores it).

Each block's output is added to the residual stream by the kernel that norms the sum for the
next block (`layers.residual_rms_norm`): the layer hands its MLP output to the next layer
unadded, and where a product is the int4 kernel's partial sums (`linear.linear_partials`), that
kernel adds them too, so neither the sum nor the add is a kernel of its own.

Unrolled, each matmul is told the weight the step reads next (`linear(..., then=w)`: q/k/v ->
o -> gate/up -> down -> the next layer's q/k/v, the last layer's down -> the head); the Hopper
int4 kernel prefetches the first tiles of that weight into L2 as it finishes.

With that layout in dense bf16 weights and `PALLAX_NORM_MATMUL=1`, a step of at most 64 token
rows (decode, verification) runs on a GPU with each RMSNorm inside the GEMM that reads it and
the SwiGLU product inside the gate/up GEMM (`kernels_pallas.norm_matmul`, `_fuses_norms`): three
fewer kernels a layer, but not yet a faster step (`_fuses_norms` says why).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas.norm_matmul import norm_matmul
from pallax.kernels_pallas.norm_matmul import supported as norm_matmul_supported

from .attention import QKV, AttentionCache, NoCache
from .config import ModelConfig
from .layers import added, residual_rms_norm, rms_norm, rope_cos_sin, rope_inv_freq, swiglu, swiglu_fused
from .linear import concat_mismatch, concat_out, linear, linear_partials, split_out

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
        # pending: the last block's output (the MLP's down projection), not yet added to x; the
        # add happens in the kernel that norms the sum (`residual_rms_norm`)
        x, pending, state = carry
        p, kv, index, then = scanned  # then: the weight read after this layer's (`linear`)
        fused = _fuses_norms(p, x)
        heads = (B, T, c.n_heads + 2 * c.n_kv_heads, c.head_dim)  # q | k | v heads, before RoPE
        if fused:  # norm + q/k/v + bias in one kernel
            x = added(x, pending)
            qkv = norm_matmul(x.reshape(B * T, c.dim), p["attn_norm"], p["wqkv"], eps=c.norm_eps,
                              bias=p.get("bqkv")).reshape(heads)
        else:
            x, h = residual_rms_norm(x, pending, p["attn_norm"], c.norm_eps)
            if "wqkv" in p:
                qkv = linear(h, p["wqkv"], p.get("bqkv"), then=p["wo"]).reshape(heads)
            else:
                # Joined along the heads axis, which QKV.rotated splits again: XLA drops the pair
                # unless the cache reads the joined heads.
                qkv = jnp.concatenate([linear(h, p[w], p.get(b)).reshape(B, T, -1, c.head_dim)
                                       for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv"))], axis=2)
        qkv = QKV(qkv, cos, sin, c.n_kv_heads)
        o, kv, state = cache.attend(kv, qkv, positions, segment_ids, state=state, index=index)
        o = linear_partials(o.reshape(B, T, c.q_dim), p["wo"], then=p.get("w_gate_up", p.get("w_gate")))
        if fused:  # norm + gate/up + SwiGLU in one kernel
            x = added(x, o)
            h = norm_matmul(x.reshape(B * T, c.dim), p["mlp_norm"], p["w_gate_up"], eps=c.norm_eps,
                            swiglu=True).reshape(B, T, c.ffn_dim)
        else:
            x, h = residual_rms_norm(x, o, p["mlp_norm"], c.norm_eps)
            h = (swiglu_fused(h, p["w_gate_up"], then=p["w_down"]) if "w_gate_up" in p
                 else swiglu(h, p["w_gate"], p["w_up"]))
        return (x, linear_partials(h, p["w_down"], then=then), state), kv

    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        # Unstacked: one buffer per layer, run as a Python loop. Under `lax.scan`, XLA slices each
        # layer's weights out of the stacked arrays with a copy before the matmuls read them
        # (about 3x the weight bytes per step); separate buffers are read where they lie.
        state, cache_layers, new, pending = cache.state(), cache.layers(), [], None
        # each layer's last matmul is followed by the next layer's first (or the head)
        thens = [q.get("wqkv", q.get("wq")) for q in layers[1:]] + [params.get("lm_head")]
        for i, (p, then) in enumerate(zip(layers, thens)):
            kv = None if cache_layers is None else jax.tree.map(lambda a: a[i], cache_layers)
            (x, pending, state), kv = layer((x, pending, state), (p, kv, i, then))
            new.append(kv)
        new_layers = None if cache_layers is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
    else:
        def scanned_layer(carry, scanned):  # a scan's carry keeps one structure: nothing pending
            x, state = carry
            (x, pending, state), kv = layer((x, None, state), (*scanned, None))
            return (added(x, pending), state), kv

        scanned = (layers, cache.layers(), jnp.arange(c.n_layers, dtype=jnp.int32))
        (x, state), new_layers = lax.scan(scanned_layer, (x, cache.state()), scanned)
        pending = None
    cache = cache.with_layers(new_layers).with_state(state)
    if logit_indices is not None:
        x = jnp.take_along_axis(added(x, pending), logit_indices[..., None], axis=1)
        x = rms_norm(x, params["final_norm"], c.norm_eps)
    else:
        _, x = residual_rms_norm(x, pending, params["final_norm"], c.norm_eps)
    return logits_from_hidden(params, x, c), cache


def _fuses_norms(p: Params, x: jax.Array) -> bool:
    """Whether a layer runs its norms inside the GEMMs that read them (`norm_matmul`: norm + q/k/v
    + bias, norm + gate/up + SwiGLU): asked for with `PALLAX_NORM_MATMUL=1` (read at trace time),
    a kernel mode other than the reference, the fused serving layout in dense weights of x's
    dtype (bf16 / f16), and at most `norm_matmul.MAX_M` token rows (decode and verification
    steps). Off by default: on an H200 the kernel's GEMMs take twice XLA's, which outweighs the
    three launches a layer it saves (bench/results/norm_matmul_h200.jsonl)."""
    if os.environ.get("PALLAX_NORM_MATMUL", "0") != "1" or dispatch.resolve() == "reference":
        return False
    wqkv, w_gate_up = p.get("wqkv"), p.get("w_gate_up")
    if not all(isinstance(w, jax.Array) and w.dtype == x.dtype for w in (wqkv, w_gate_up)):
        return False
    m, dim = x.shape[0] * x.shape[1], x.shape[-1]
    return (norm_matmul_supported(m, dim, wqkv.shape[1], x.dtype)
            and norm_matmul_supported(m, dim, w_gate_up.shape[1] // 2, x.dtype))  # SwiGLU halves it


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


# Fused weight -> the projections it concatenates along the output axis (they read one input).
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_projections(params: Params) -> Params:
    """Unstacked parameters (`unstack_layers`) in the fused serving layout (module docstring):
    per layer `wqkv` (and `bqkv`) and `w_gate_up` replace the projections they concatenate, unless
    those cannot share one GEMM (`linear.concat_mismatch`), which then stay separate. Fused
    layers pass through unchanged. Stacked parameters raise ValueError: they keep the layout
    `param_axes` describes, for training, scoring and quantizing. The unfused weights stay alive
    while the caller holds them, so the peak adds the fused groups' bytes once."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        raise ValueError("fuse_projections takes unstacked parameters (decoder.unstack_layers); "
                         "stacked layers keep the unfused layout")
    return {**params, "layers": [_fuse_layer(p) for p in layers]}


def _fuse_layer(p: Params) -> Params:
    p = dict(p)
    for fused, names in FUSED.items():
        if fused in p or concat_mismatch([p[n] for n in names]) is not None:
            continue
        p[fused] = concat_out([p.pop(n) for n in names])
        if fused == "wqkv" and "bq" in p:
            p["bqkv"] = jnp.concatenate([p.pop(n) for n in ("bq", "bk", "bv")], axis=-1)
    return p


def unfuse_projections(params: Params) -> Params:
    """The inverse of `fuse_projections` (split sizes from the shapes: `wo` is `[q_dim, dim]`, gate
    and up are halves); stacked or unfused parameters pass through unchanged."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    return {**params, "layers": [_unfuse_layer(p) for p in layers]}


def _unfuse_layer(p: Params) -> Params:
    p = dict(p)
    if "wqkv" in p:
        q_dim = p["wo"].shape[-2]
        kv_dim = (p["wqkv"].shape[-1] - q_dim) // 2
        p["wq"], p["wk"], p["wv"] = split_out(p.pop("wqkv"), [q_dim, kv_dim, kv_dim])
        if "bqkv" in p:
            p["bq"], p["bk"], p["bv"] = jnp.split(p.pop("bqkv"), [q_dim, q_dim + kv_dim], axis=-1)
    if "w_gate_up" in p:
        ffn = p["w_gate_up"].shape[-1] // 2
        p["w_gate"], p["w_up"] = split_out(p.pop("w_gate_up"), [ffn, ffn])
    return p


def logits_from_hidden(params: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Final-normed hidden [..., dim] -> logits [..., vocab] in float32."""
    if config.tie_embeddings:
        return jnp.einsum("...d,vd->...v", x, params["embed"].astype(x.dtype), preferred_element_type=jnp.float32)
    return linear(x, params["lm_head"]).astype(jnp.float32)
