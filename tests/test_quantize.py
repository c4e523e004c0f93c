"""Quantized weights through `linear`, post-training quantization, save / load, the CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.decode.scheduler import EngineConfig
from pallax.kernels_pallas.dispatch import kernel_mode
from pallax.kernels_pallas.quant_formats import quantize_fp8
from pallax.model.config import preset
from pallax.model.decoder import forward, fuse_projections, init_params, unfuse_projections, unstack_layers
from pallax.model.linear import QuantizedWeight, concat_mismatch, concat_out, linear, split_out, weight_format
from pallax.model.quant_weights import Fp8Weight, Int4Weight, Int8Weight
from pallax.model.quantize import (PROJECTIONS, QUANT_FILE, _layer_taps, awq_search, calibration_batch, load_quantized,
                                   stacked, quantize, save_quantized)

PROSE = [
    "The city council met on Tuesday to discuss the new budget, which includes funding for roads, "
    "schools and a library that residents have requested for more than a decade.",
    "Scientists at the university announced that they had found a way to store solar energy in a "
    "liquid that can be pumped through pipes and released as heat when it is needed.",
    "After three days of heavy rain, the river rose above its banks and flooded several farms in "
    "the valley; emergency crews evacuated dozens of families by boat.",
    "The company reported that profits fell by twelve percent in the last quarter, blaming higher "
    "costs for shipping and a slowdown in sales across Europe and Asia.",
    "In the final minutes of the match, the home team scored twice to win the championship for the "
    "first time since the club was founded almost a hundred years ago.",
    "Doctors say that regular exercise, a balanced diet and enough sleep remain the most reliable "
    "ways to lower the risk of heart disease as people grow older.",
]


def _rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _make(kind, w):
    return {
        "int8": lambda: Int8Weight.quantize(w),
        "int4-sym": lambda: Int4Weight.quantize(w, 32),
        "int4-asym": lambda: Int4Weight.quantize(w, 64, symmetric=False),
        "int4-awq": lambda: Int4Weight.quantize(w, 128, act_scale=jnp.exp(_rand(9, (w.shape[0],), 0.5))),
        "fp8": lambda: Fp8Weight.quantize(w),
    }[kind]()


KINDS = ["int8", "int4-sym", "int4-asym", "int4-awq", "fp8"]


@pytest.mark.parametrize("mode", ["reference", "interpret"])
@pytest.mark.parametrize("kind", KINDS)
def test_matmul_matches_dequantize_then_dot(kind, mode):
    k, n = 256, 64
    w = _rand(1, (k, n), 0.05)
    q = _make(kind, w)
    assert isinstance(q, QuantizedWeight) and q.shape == (k, n)
    assert weight_format(q) == q.format
    x = _rand(2, (3, 5, k)).astype(jnp.bfloat16)  # leading dims flattened to M = 15
    with kernel_mode(mode):  # the mode is read at trace time: a fresh function, a fresh trace
        y = jax.jit(lambda a, b: linear(a, b))(x, q)
    assert y.shape == (3, 5, n) and y.dtype == jnp.bfloat16
    x32 = np.asarray(x, np.float64)
    if kind == "fp8":  # activations are quantized per token at run time
        xq, xs = quantize_fp8(x.reshape(-1, k), axis=-1)
        x32 = (np.asarray(xq, np.float64) * np.asarray(xs, np.float64)).reshape(3, 5, k)
    want = x32 @ np.asarray(q.dequantize(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=0.02 * np.abs(want).max(), rtol=0.02)
    # and the weight error is within the format's rounding step (half a step of the largest scale)
    err = np.abs(np.asarray(q.dequantize(jnp.float32)) - np.asarray(w)).max()
    amax = np.abs(np.asarray(w)).max()
    bound = {"int8": amax / 254, "int4-sym": amax / 14, "int4-asym": 2 * amax / 15, "fp8": amax / 16}
    if kind in bound:
        assert 0 < err <= 1.05 * bound[kind]  # (bf16 scales add a little)


def test_stacked_weights_run_under_scan():
    L, k, n = 3, 128, 32
    w = _rand(3, (L, k, n), 0.05)
    x = _rand(4, (2, k)).astype(jnp.bfloat16)
    for make in (Int8Weight.quantize, lambda a: Int4Weight.quantize(a, 64, symmetric=False), Fp8Weight.quantize):
        q = jax.vmap(make)(w)
        _, ys = jax.lax.scan(lambda c, qw: (c, linear(x, qw)), 0, q)
        for i in range(L):
            one = jax.tree.map(lambda a: a[i], q)
            np.testing.assert_array_equal(np.asarray(ys[i]), np.asarray(linear(x, one)))


def _tiny_quantized(make):
    """The tiny preset's f32 parameters, unstacked, with `make(layer, name, w)` for every projection."""
    c = preset("tiny")
    params = unstack_layers(init_params(c, jax.random.key(0), jnp.float32))
    layers = [{k: make(i, k, v) if k in PROJECTIONS else v for k, v in p.items()} for i, p in enumerate(params["layers"])]
    return c, {**params, "layers": layers}


def _forward_both(c, a, b):
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, c.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    return forward(a, tokens, pos, config=c)[0], forward(b, tokens, pos, config=c)[0]


def _same_leaves(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _awq(w, key, group_size=32):
    return Int4Weight.quantize(w, group_size, act_scale=jnp.exp(_rand(key, (w.shape[0],), 0.5)))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_quantized_projections_equal_separate(kind):
    make = {"int8": Int8Weight.quantize, "fp8": Fp8Weight.quantize,
            "int4-sym": lambda w: Int4Weight.quantize(w, 32),
            "int4-asym": lambda w: Int4Weight.quantize(w, 32, symmetric=False),
            "int4-awq": lambda w: _awq(w, 9)}[kind]  # one act_scale per input width: q/k/v and gate/up share theirs
    c, params = _tiny_quantized(lambda i, name, w: make(w))
    fused = fuse_projections(params)
    for p in fused["layers"]:
        assert "wqkv" in p and "w_gate_up" in p and not {"wq", "wk", "wv", "w_gate", "w_up"} & set(p)
        assert type(p["wqkv"]) is type(params["layers"][0]["wq"]) and p["wqkv"].shape == (c.dim, c.q_dim + 2 * c.kv_dim)
    want, got = _forward_both(c, params, fused)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _same_leaves(unfuse_projections(fused), params)


def test_weights_that_cannot_share_a_gemm_stay_separate():
    # AWQ scales that differ (as a search per projection gives them): q/k/v in every layer, gate/up
    # in layer 0 only
    keys = {"wq": 1, "wk": 2, "wv": 2, "w_gate": 3, "w_up": 4, "wo": 5, "w_down": 6}
    c, params = _tiny_quantized(lambda i, name, w: _awq(w, 3 if i == 1 and name == "w_up" else keys[name]))
    fused = fuse_projections(params)
    l0, l1 = fused["layers"]
    assert {"wq", "wk", "wv", "w_gate", "w_up"} <= set(l0) and not {"wqkv", "w_gate_up"} & set(l0)
    assert "w_gate_up" in l1 and "wq" in l1  # layers fuse independently
    want, got = _forward_both(c, params, fused)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _same_leaves(stacked(fused), stacked(params))  # one layout for every layer again, to stack
    # formats that differ
    c, params = _tiny_quantized(lambda i, name, w: Int8Weight.quantize(w) if name == "w_gate" else Int4Weight.quantize(w, 32))
    fused = fuse_projections(params)
    assert all("w_gate" in p and "w_up" in p and "wqkv" in p for p in fused["layers"])
    want, got = _forward_both(c, params, fused)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_concat_out_and_split_out():
    w = [_rand(i, (64, n), 0.05) for i, n in enumerate((32, 16, 16))]
    x = _rand(7, (3, 64))
    for q in ([Int8Weight.quantize(a) for a in w], [Int4Weight.quantize(a, 32, symmetric=False) for a in w],
              [Fp8Weight.quantize(a) for a in w], [_awq(a, 5) for a in w], w):
        cat = concat_out(q)
        assert cat.shape == (64, 64)
        want = jnp.concatenate([linear(x, a) for a in q], axis=-1)
        np.testing.assert_allclose(linear(x, cat), want, rtol=1e-5, atol=1e-6)  # the GEMM's blocking may differ
        _same_leaves(split_out(cat, [32, 16, 16]), q)
    mismatched = [
        ([Int8Weight.quantize(w[0]), Fp8Weight.quantize(w[1])], "formats differ"),
        ([w[0], w[1].astype(jnp.bfloat16)], "formats differ"),
        ([w[0], _rand(8, (32, 16))], "inputs differ"),
        ([Int4Weight.quantize(w[0], 32), Int4Weight.quantize(w[1], 64)], "group_size differs"),
        ([Int4Weight.quantize(w[0], 32), Int4Weight.quantize(w[1], 32, symmetric=False)], "zeros is present in one"),
        ([Int4Weight.quantize(w[0], 32), _awq(w[1], 5)], "act_scale is present in one"),
        ([_awq(w[0], 5), _awq(w[1], 6)], "act_scale differs"),
    ]
    for ws, why in mismatched:
        assert why in concat_mismatch(ws)
        with pytest.raises(ValueError, match=why):
            concat_out(ws)
    with pytest.raises(ValueError, match="do not add up"):
        split_out(w[0], [16, 8])


def test_awq_beats_rtn_on_held_out_activations(smollm_bf16):
    llm = smollm_bf16
    c = llm.config
    tokens = calibration_batch(llm, PROSE, 10, 16)  # [10, 16]: 6 rows calibrate, 4 held out
    assert tokens.shape == (10, 16)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), tokens.shape)
    from pallax.model.layers import rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(pos, rope_inv_freq(c))
    x = llm.params["embed"][tokens]
    for i in range(3):
        p = jax.tree.map(lambda a: a[i], stacked(llm.params)["layers"])  # an engine may have unstacked them
        x, taps = _layer_taps(p, x, pos, cos, sin, config=c)
    w = p["w_gate"]  # layer 2, [576, 1536]
    acts = np.asarray(taps["mlp_in"], np.float32)
    calib, held = acts[:6].reshape(-1, c.dim), acts[6:].reshape(-1, c.dim)
    s, errors = awq_search(jnp.asarray(calib), jnp.abs(jnp.asarray(calib)).mean(0), w, group_size=64)
    assert errors.shape == (20,) and float(errors.min()) <= float(errors[0])  # alpha = 0 is RTN

    def held_out_error(q, dense=w):
        y = linear(jnp.asarray(held), q).astype(jnp.float32)
        return float(jnp.mean((y - jnp.asarray(held) @ dense.astype(jnp.float32)) ** 2))

    rtn = held_out_error(Int4Weight.quantize(w, 64))
    awq = held_out_error(Int4Weight.quantize(w, 64, act_scale=s))
    assert awq < 0.9 * rtn, (awq, rtn)
    # one scale for gate and up together (as `quantize` searches it), over both outputs
    ws = [w, p["w_up"]]
    s, errors = awq_search(jnp.asarray(calib), jnp.abs(jnp.asarray(calib)).mean(0), jnp.concatenate(ws, axis=1),
                           group_size=64)
    assert float(errors.min()) <= float(errors[0])
    rtn = sum(held_out_error(Int4Weight.quantize(a, 64), a) for a in ws)
    awq = sum(held_out_error(Int4Weight.quantize(a, 64, act_scale=s), a) for a in ws)
    assert awq < 0.9 * rtn, (awq, rtn)


@pytest.fixture(scope="module")
def smollm_int8(smollm_bf16):
    return quantize(smollm_bf16, "int8")


@pytest.fixture(scope="module")
def smollm_awq(smollm_bf16):
    return quantize(smollm_bf16, "int4-awq", group_size=64, calibration=PROSE, calib_seqs=8, calib_len=16)


def test_awq_projections_that_read_one_input_share_a_scale_and_fuse(smollm_awq):
    layers = smollm_awq.params["layers"]
    for names in (("wq", "wk", "wv"), ("w_gate", "w_up")):
        want = np.asarray(layers[names[0]].act_scale)  # [L, dim]
        for name in names[1:]:
            np.testing.assert_array_equal(np.asarray(layers[name].act_scale), want)
    assert not np.all(np.asarray(layers["wq"].act_scale) == 1.0)  # not plain RTN everywhere
    c = smollm_awq.config
    # in f32: one GEMM sums in another order than three, and bf16 activations would amplify that
    # rounding over 30 layers
    f32 = lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a  # noqa: E731
    params = jax.tree.map(f32, unstack_layers(smollm_awq.params))
    fused = fuse_projections(params)
    for p in fused["layers"]:
        assert "wqkv" in p and "w_gate_up" in p and not {"wq", "wk", "wv", "w_gate", "w_up"} & set(p)
    tokens = calibration_batch(smollm_awq, PROSE[3:], 2, 12)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape)
    want = forward(params, tokens, pos, config=c)[0]
    got = forward(fused, tokens, pos, config=c)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-4)  # logits up to ~30


def test_quantized_model_layout(smollm_bf16, smollm_int8):
    p = smollm_int8.params
    assert isinstance(p["layers"]["w_down"], Int8Weight)
    assert p["layers"]["w_down"].w_q.shape == (30, 1536, 576)
    assert p["embed"] is smollm_bf16.params["embed"] and p["embed"].dtype == jnp.bfloat16
    assert p["layers"]["attn_norm"].dtype == jnp.bfloat16
    assert smollm_int8.config.tie_embeddings


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


# Engines on stacked layers (a scan, which compiles several times faster on a CPU than the serving
# layout; the save/load test's `generate` runs that one)
STACKED_ENGINE = EngineConfig(max_seqs=4, token_budget=32, num_pages=32, decode_steps=1, max_draft_tokens=0,
                              unstack_layers=False)


def test_int8_greedy_matches_bf16(smollm_bf16, smollm_int8):
    base = smollm_bf16.with_engine(STACKED_ENGINE).generate(PROMPTS, max_tokens=6)
    quant = smollm_int8.with_engine(STACKED_ENGINE).generate(PROMPTS, max_tokens=6)
    for b, q in zip(base, quant):
        assert q.token_ids[:4] == b.token_ids[:4], (b.text, q.text)


def test_save_load_round_trip_and_pallax_load(smollm_bf16, tmp_path):
    q = quantize(smollm_bf16, "int4", group_size=64, symmetric=False, quantize_head=True)
    assert not q.config.tie_embeddings and isinstance(q.params["lm_head"], Int4Weight)
    out = save_quantized(q, tmp_path / "q")
    assert (out / QUANT_FILE).is_file()
    r = pallax.load(str(out))
    assert r.config == q.config
    same = jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(jnp.array_equal(a, b)), q.params, r.params)
    assert jax.tree.structure(q.params) == jax.tree.structure(r.params) and all(jax.tree.leaves(same))
    assert r.params["layers"]["wq"].group_size == 64
    assert r.tokenizer.encode(PROSE[0]) == q.tokenizer.encode(PROSE[0])
    assert r.tokenizer.eos_ids == q.tokenizer.eos_ids and r.tokenizer.bos_id == q.tokenizer.bos_id
    # the loaded model generates on the paged engine: its greedy first token is the in-memory
    # model's argmax after the prompt
    ids = r._prompt_ids(PROMPTS[0])
    out = r.generate(ids, max_tokens=3)[0]
    assert len(out.token_ids) == 3 and out.token_ids[0] == int(np.argmax(q.logits(ids)[-1]))


def _agreement(a, b, ids) -> float:
    """Fraction of positions where two models predict the same next token."""
    return float(np.mean(np.argmax(a.logits(ids), -1) == np.argmax(b.logits(ids), -1)))


def test_fp8_and_awq_models_track_bf16(smollm_bf16, smollm_awq):
    ids = smollm_bf16._prompt_ids(PROSE[3] + " " + PROSE[4])
    assert _agreement(quantize(smollm_bf16, "fp8"), smollm_bf16, ids) >= 0.85
    assert smollm_awq.params["layers"]["wq"].act_scale.shape == (30, 576)
    assert _agreement(smollm_awq, smollm_bf16, ids) >= 0.6


def _gptq_fp8_reference(w, x, damp):
    """GPTQ as the paper states it, one input channel at a time over the whole row (numpy, f64
    algebra): w [K, N], calibration inputs x [n, K]; returns the dequantized weight [K, N]."""
    W = np.asarray(w, np.float64).T.copy()  # [N, K]
    H = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    H += damp * np.mean(np.diag(H)) * np.eye(len(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    scale = np.maximum(np.abs(W).max(axis=1) / 448.0, 1e-12)
    for i in range(W.shape[1]):
        q = np.asarray(jnp.asarray(np.clip(W[:, i] / scale, -448, 448), jnp.float32)
                       .astype(jnp.float8_e4m3fn).astype(jnp.float32), np.float64) * scale
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= np.outer(err, U[i, i:])
        W[:, i] = q
    return W.T


def test_gptq_fp8_matches_reference_and_beats_rounding():
    from pallax.model.quantize import _gram, gptq_factor, gptq_fp8

    rng = np.random.default_rng(0)
    K, N, n = 40, 24, 256  # K not a multiple of the block (16): the last block is padded
    mix = rng.normal(size=(K, K)) * 0.3 + np.eye(K)  # correlated input channels, as real activations are
    x = (rng.normal(size=(n, K)) * rng.uniform(0.1, 3, size=K)) @ mix
    w = rng.normal(size=(K, N)).astype(np.float32)
    h = _gram(jnp.asarray(x, jnp.float32))
    got = gptq_fp8(jnp.asarray(w), gptq_factor(h, block=16, damp=0.1), block=16)
    assert got.w_q.dtype == jnp.float8_e4m3fn and got.w_q.shape == (N, K)
    ref = _gptq_fp8_reference(w, x, 0.1)
    deq = np.asarray(got.dequantize(jnp.float32))
    # the same grid points (rare ties at a rounding midpoint may land one step apart)
    assert np.mean(np.isclose(deq, ref, rtol=1e-5, atol=1e-6)) > 0.98
    rtn = np.asarray(Fp8Weight.quantize(jnp.asarray(w)).dequantize(jnp.float32))
    err = lambda q: np.linalg.norm(x @ (q - w))  # noqa: E731  output error on the calibration inputs
    assert err(deq) < 0.8 * err(rtn), (err(deq), err(rtn))
    # with uncorrelated, equally scaled inputs there is nothing to compensate: round to nearest
    ident = gptq_fp8(jnp.asarray(w), gptq_factor(jnp.eye(K, dtype=jnp.float32) * 5.0, block=16), block=16)
    np.testing.assert_array_equal(np.asarray(ident.w_q, np.float32), np.asarray(Fp8Weight.quantize(jnp.asarray(w)).w_q, np.float32))


def test_cli_quantize(tmp_path):
    from pallax.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", "smollm2-135m-instruct", "--format", "fp8", "--calibration", "none",
                 "--out", str(out)]) == 0
    r = load_quantized(out)
    assert isinstance(r.params["layers"]["wo"], Fp8Weight) and r.params["layers"]["wo"].w_q.dtype == jnp.float8_e4m3fn
    assert main(["info", str(out), "--json"]) == 0


def test_errors(smollm_bf16, smollm_int8, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize(smollm_bf16, "int3")
    with pytest.raises(ValueError, match="group_size=128 must divide K=576"):
        quantize(smollm_bf16, "int4", group_size=128)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(smollm_bf16, "int4-awq", group_size=64)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(smollm_int8, "int4", group_size=64)
    with pytest.raises(ValueError, match="must divide K"):
        Int4Weight.quantize(jnp.ones((96, 16)), 64)
    with pytest.raises(ValueError, match="not a saved pallax model"):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="features"):
        Int8Weight.quantize(jnp.ones((64, 16))).matmul(jnp.ones((2, 32), jnp.bfloat16))
