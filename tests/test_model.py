"""The decoder on real weights (SmolLM2-135M-Instruct GGUF) against the independent reference,
and on the tiny preset against its own uncached forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.api import log_softmax

from pallax.model.attention import DenseCache, attention_reference
from pallax.model.config import PRESETS, RopeScaling, preset
from pallax.model.decoder import (forward, fuse_projections, init_params, param_axes, param_shapes, unfuse_projections,
                                  unstack_layers)
from pallax.model.quantize import stacked
from pallax.model.layers import rope_inv_freq


def test_logits_match_reference(smollm_f32, reference):
    for case in reference["cases"]:
        logits = smollm_f32.logits(case["input_ids"])
        assert logits.shape == (len(case["input_ids"]), smollm_f32.config.vocab_size)
        assert logits.dtype == np.float32
        for j, pos in enumerate(case["positions"]):
            row = logits[pos]
            ids = case["top20_ids"][j]
            ours = log_softmax(row)[ids]
            theirs = np.asarray(case["top20_logits"][j]) - case["logsumexp"][j]
            np.testing.assert_allclose(ours, theirs, atol=1e-3, err_msg=f"{case['prompt']!r} position {pos}")
            assert int(row.argmax()) == ids[0]


def test_greedy_alone_matches_reference(smollm_f32, reference):
    for case in reference["cases"]:
        out = smollm_f32.generate(case["input_ids"], max_tokens=32)[0]
        assert out.token_ids == case["greedy_ids"], case["prompt"]
        assert out.finish_reason == ("stop" if len(case["greedy_ids"]) < 32 else "length")


def test_greedy_text_prompts_and_batch(smollm_f32, reference):
    """Text prompts go through the tokenizer (chat cases through the template), all in one batch."""
    prompts = []
    for case in reference["cases"]:
        if case["kind"] == "chat":
            prompts.append(smollm_f32.tokenizer.apply_chat_template(case["prompt"], add_generation_prompt=True))
        else:
            prompts.append(case["prompt"])
    outs = smollm_f32.generate(prompts, max_tokens=32)
    for case, out in zip(reference["cases"], outs):
        assert out.prompt_tokens == len(case["input_ids"])
        assert out.token_ids == case["greedy_ids"], case["prompt"]
        assert out.text == smollm_f32.tokenizer.decode(
            case["greedy_ids"][:-1] if out.finish_reason == "stop" else case["greedy_ids"])


def test_perplexity_matches_reference(smollm_f32, reference):
    ref = reference["perplexity"]
    ids = smollm_f32.tokenizer.encode(ref["text"])
    ppl = smollm_f32.perplexity(ref["text"])
    assert abs(ppl - ref["ppl"]) / ref["ppl"] < 0.005, (ppl, ref["ppl"], len(ids), ref["n_tokens"])


def test_decode_step_compiles_once(smollm_f32):
    """`generate` compiles a step program once per shape bucket, never per token or per prompt."""
    engine = smollm_f32.engine()
    calls = [(("Once upon a time",), dict(max_tokens=20)),
             (("A different prompt of another length entirely",), dict(max_tokens=24)),
             ((["Short", "Two prompts at once"],), dict(max_tokens=3, temperature=0.7, seed=5))]
    before = engine.compiled_programs()  # programs are shared with earlier users of this model
    for args, kw in calls:
        smollm_f32.generate(*args, **kw)
    n = engine.compiled_programs()
    assert n - before <= 2 * (len(engine.buckets) + len(engine.cfg.seq_buckets()))  # x2: engine_step's `full`
    for args, kw in calls:  # other prompts and seeds of the same shapes
        smollm_f32.generate(*args, **dict(kw, seed=kw.get("seed", 0) + 1))
    smollm_f32.generate("Yet another prompt", max_tokens=17)
    assert engine.compiled_programs() == n


def test_stream_equals_generate(smollm_f32, reference):
    case = reference["cases"][0]
    deltas = list(smollm_f32.stream(case["prompt"], max_tokens=32))
    assert [d.token_id for d in deltas] == case["greedy_ids"]
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    full = smollm_f32.generate(case["prompt"], max_tokens=32)[0]
    assert "".join(d.text for d in deltas) == full.text


def test_sampling_is_reproducible_and_seeded(smollm_f32):
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50)
    a = smollm_f32.generate("Once upon a time, there was", seed=7, **kw)[0]
    b = smollm_f32.generate("Once upon a time, there was", seed=7, **kw)[0]
    c = smollm_f32.generate("Once upon a time, there was", seed=8, **kw)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # A request's samples do not depend on what else is in the batch.
    batched = smollm_f32.generate(["Once upon a time, there was", "1, 2, 3,"], seed=7, **kw)
    assert batched[0].token_ids == a.token_ids
    # top_k = 1 is greedy whatever the temperature.
    g = smollm_f32.generate("Once upon a time, there was", max_tokens=12)[0]
    k1 = smollm_f32.generate("Once upon a time, there was", max_tokens=12, temperature=1.5, top_k=1, seed=3)[0]
    assert k1.token_ids == g.token_ids


def test_bf16_agrees_with_f32(smollm_bf16, reference):
    """bf16 weights and activations follow the reference's f32 greedy path: teacher-forced on it,
    the bf16 argmax is the reference token wherever the reference's choice is clear; it may differ
    only at near-ties of the f32 logits (where greedy generation may then part ways)."""
    misses = []
    for case in reference["cases"]:
        ids, y = list(case["input_ids"]), list(case["greedy_ids"])
        b16 = smollm_bf16.logits(ids + y[:-1])[len(ids) - 1:]  # [len(y), vocab]
        got = b16.argmax(axis=-1)
        for i in np.flatnonzero(got != np.asarray(y)):
            # how far bf16 prefers its token over the reference's, in its own logits
            misses.append(float(b16[i, got[i]] - b16[i, y[i]]))
    total = sum(len(c["greedy_ids"]) for c in reference["cases"])
    print(f"bf16 argmax differs at {len(misses)} of {total} positions, by {misses}")
    assert len(misses) <= 0.05 * total, misses
    assert all(m < 0.5 for m in misses), misses

# -- tiny preset: structure and cache consistency ------------------------------------------------

def test_presets_and_axes():
    for name, c in PRESETS.items():
        shapes, axes = param_shapes(c), param_axes(c)
        flat_s = jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(i, int) for i in s))
        flat_a = jax.tree.leaves(axes, is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(i, str) for i in s))
        assert len(flat_s) == len(flat_a)
        assert all(len(s) == len(a) for s, a in zip(flat_s, flat_a))
    assert preset("llama3-8b").param_count() == pytest.approx(8.03e9, rel=0.01)
    assert preset("qwen2.5-0.5b").param_count() == pytest.approx(0.494e9, rel=0.01)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset("nope")


def test_cached_decode_equals_full_forward():
    c = preset("tiny")
    params = init_params(c, jax.random.key(0), jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full, _ = forward(params, tokens, pos, config=c)
    cache = DenseCache.create(c, 2, 32, jnp.float32)
    lg, cache = forward(params, tokens[:, :7], pos[:, :7], cache, config=c)
    np.testing.assert_allclose(lg, full[:, :7], atol=1e-5)
    for t in range(7, 12):
        lg, cache = forward(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache, config=c)
        np.testing.assert_allclose(lg[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_projections_equal_separate(qkv_bias):
    c = preset("tiny").replace(qkv_bias=qkv_bias)
    params = init_params(c, jax.random.key(0), jnp.float32)
    if qkv_bias:  # init_params makes them zero
        keys = jax.random.split(jax.random.key(3), 3)
        params["layers"].update({b: 0.1 * jax.random.normal(k, params["layers"][b].shape)
                                 for b, k in zip(("bq", "bk", "bv"), keys)})
    unstacked = unstack_layers(params)
    fused = fuse_projections(unstacked)
    want_keys = {"attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down"} | ({"bqkv"} if qkv_bias else set())
    assert all(set(p) == want_keys for p in fused["layers"])
    assert fused["layers"][0]["wqkv"].shape == (c.dim, c.q_dim + 2 * c.kv_dim)
    assert fused["layers"][0]["w_gate_up"].shape == (c.dim, 2 * c.ffn_dim)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    want, _ = forward(params, tokens, pos, config=c)
    got, _ = forward(fused, tokens, pos, config=c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # idempotent; the inverse gives back every leaf; the standard layout back from the serving one
    assert fuse_projections(fused)["layers"][1]["wqkv"] is fused["layers"][1]["wqkv"]
    for back, orig in ((unfuse_projections(fused), unstacked), (stacked(fused), params)):
        assert jax.tree.structure(back) == jax.tree.structure(orig)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(orig)))
    with pytest.raises(ValueError, match="unstacked"):
        fuse_projections(params)
    assert unfuse_projections(params) is params


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_transposed_weight_computes_the_dense_product(rows):
    """A weight stored [N, K] gives x @ W for one-row, two-row (one multiply-reduce) and larger
    (one GEMM) products, leading axes kept; its dense form is W."""
    from pallax.model.linear import TransposedWeight, linear

    w = jax.random.normal(jax.random.key(0), (48, 40), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, rows, 48), jnp.float32)
    t = TransposedWeight(w.T)
    assert t.shape == (48, 40)
    np.testing.assert_allclose(linear(x, t), linear(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t.dequantize(jnp.float32), w)
    with pytest.raises(ValueError, match="features"):
        t.matmul(x[..., :47])
    # up to ROWS rows: one reduction over K for all of them (the weight read once), no GEMM
    prims = [e.primitive.name for e in jax.make_jaxpr(t.matmul)(x).jaxpr.eqns]
    if rows <= TransposedWeight.ROWS:
        assert "dot_general" not in prims and prims.count("reduce_sum") == 1
    else:
        assert prims.count("dot_general") == 1 and "reduce_sum" not in prims


def test_transposed_projections_default_to_gpus_only():
    """EngineConfig.transposed_projections: None means on where the backend is a GPU."""
    from pallax.decode.scheduler import EngineConfig, transposes

    assert EngineConfig().transposed_projections is None
    assert transposes(None) is (jax.default_backend() == "gpu")
    assert transposes(True) is True and transposes(False) is False


def test_transposed_layout_takes_small_dense_projections_only():
    """The serving option: projections of at most `max_weights` weights become [N, K], the rest
    (larger ones, norms, biases, the embedding, quantized weights) stay; the forward pass is the
    same, and `stacked` gives back the standard layout."""
    from pallax.model.linear import TransposedWeight, transposed_layout
    from pallax.model.quant_weights import Int8Weight

    c = preset("tiny").replace(qkv_bias=True, ffn_dim=192)
    params = init_params(c, jax.random.key(0), jnp.float32)
    fused = fuse_projections(unstack_layers(params))
    limit = c.dim * (c.q_dim + 2 * c.kv_dim)  # q/k/v and smaller; gate/up and down are larger
    assert c.dim * 2 * c.ffn_dim > limit and c.ffn_dim * c.dim > limit
    out = transposed_layout(fused, max_weights=limit)
    kinds = {k: type(v).__name__ for k, v in out["layers"][0].items()}
    assert kinds == {"attn_norm": "ArrayImpl", "wqkv": "TransposedWeight", "bqkv": "ArrayImpl",
                     "wo": "TransposedWeight", "mlp_norm": "ArrayImpl", "w_gate_up": "ArrayImpl",
                     "w_down": "ArrayImpl"}
    assert out["embed"] is fused["embed"]
    int8 = Int8Weight.quantize(fused["layers"][1]["wo"])
    mixed = {**fused, "layers": [fused["layers"][0], {**fused["layers"][1], "wo": int8}]}
    assert transposed_layout(mixed, max_weights=limit)["layers"][1]["wo"] is int8
    assert isinstance(out["layers"][0]["wqkv"], TransposedWeight)
    assert out["layers"][0]["wqkv"].wt.shape == (c.q_dim + 2 * c.kv_dim, c.dim)
    tokens = jax.random.randint(jax.random.key(1), (1, 2), 0, c.vocab_size)  # a two-row step
    pos = jnp.broadcast_to(jnp.arange(2), (1, 2))
    want, _ = forward(fused, tokens, pos, config=c)
    got, _ = forward(out, tokens, pos, config=c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    back = stacked(out)
    assert jax.tree.structure(back) == jax.tree.structure(stacked(fused))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stacked(fused))))
    with pytest.raises(ValueError, match="unstacked"):
        transposed_layout(params)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_small_m_steps_fuse_norms_into_gemms(qkv_bias, monkeypatch, count_kernels):
    """Steps of few token rows in the fused serving layout run each layer's norms inside the GEMMs
    that read them (two `norm_matmul` kernels a layer, here in interpret mode): a prefill of 2 x 7
    rows and cached decode steps of 2 rows give the unfused layers' logits; with
    PALLAX_NORM_MATMUL=0 (the default) no such kernel runs."""
    from pallax.kernels_pallas.dispatch import kernel_mode

    c = preset("tiny").replace(qkv_bias=qkv_bias)
    params = init_params(c, jax.random.key(0), jnp.bfloat16)
    if qkv_bias:
        params["layers"].update({b: (0.1 * jax.random.normal(jax.random.key(i), params["layers"][b].shape)
                                     ).astype(jnp.bfloat16) for i, b in enumerate(("bq", "bk", "bv"))})
    fused = fuse_projections(unstack_layers(params))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, c.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))

    def run(mode):
        with kernel_mode(mode):
            cache = DenseCache.create(c, 2, 16, jnp.bfloat16)
            out, cache = forward(fused, tokens[:, :7], pos[:, :7], cache, config=c)
            outs = [out]
            for t in range(7, 10):
                out, cache = forward(fused, tokens[:, t:t + 1], pos[:, t:t + 1], cache, config=c)
                outs.append(out)
            return np.concatenate([np.asarray(o, np.float32) for o in outs], axis=1)

    def kernels(env):
        monkeypatch.setenv("PALLAX_NORM_MATMUL", env)
        with kernel_mode("interpret"):
            jaxpr = jax.make_jaxpr(lambda p: forward(p, tokens[:, :1], pos[:, :1], config=c)[0])(fused)
        return count_kernels(jaxpr.jaxpr, "norm_matmul")

    assert kernels("1") == 2 * c.n_layers and kernels("0") == 0
    monkeypatch.setenv("PALLAX_NORM_MATMUL", "1")
    want, got = run("reference"), run("interpret")
    np.testing.assert_allclose(got, want, atol=0.03 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_attention_reference_matches_jax_nn():
    B, T, H, KVH, D = 2, 9, 8, 2, 16
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, KVH, D))
    v = jax.random.normal(ks[2], (B, T, KVH, D))
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    ours = attention_reference(q, k, v, idx, idx)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_llama3_rope_scaling():
    base = preset("llama3-8b").replace(rope_scaling=None)
    scaled = preset("llama3-8b")
    f0, f1 = rope_inv_freq(base), rope_inv_freq(scaled)
    wavelen = 2 * np.pi / f0
    s = scaled.rope_scaling
    assert isinstance(s, RopeScaling)
    short = wavelen < s.original_max_position / s.high_freq_factor
    long = wavelen > s.original_max_position / s.low_freq_factor
    np.testing.assert_allclose(f1[short], f0[short])
    np.testing.assert_allclose(f1[long], f0[long] / s.factor)
    mid = ~short & ~long
    assert mid.any() and np.all(f1[mid] < f0[mid]) and np.all(f1[mid] > f0[mid] / s.factor)
