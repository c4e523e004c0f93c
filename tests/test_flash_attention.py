"""Flash attention: the Pallas kernel (interpret mode) against the f32 reference, and the reference
against jax.nn.dot_product_attention and a float64 numpy computation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.kernels_pallas import dispatch, flash_attention_mgpu, flash_attention_mgpu_bwd
from pallax.kernels_pallas.flash_attention import (
    BlockSizes, _Static, _use_mgpu, flash_attention, flash_attention_reference)

SMALL = BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16,
                   block_q_dkv=16, block_k_dkv=16)
_seed = iter(range(10_000))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(B, T, S, H, KVH, D, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(next(_seed)), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, KVH, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, KVH, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, do


def _segments(B, L, n):
    ids = jax.random.randint(jax.random.key(next(_seed)), (B, L), 0, n)
    return jnp.sort(ids, axis=1).astype(jnp.int32)


def _numpy_attention(q, k, v, causal, sm_scale, q_seg=None, kv_seg=None):
    """float64 numpy: repeat K/V per head, mask, softmax; rows with no key give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    S, KVH = k.shape[1], k.shape[2]
    k = np.repeat(k, H // KVH, axis=2)
    v = np.repeat(v, H // KVH, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * sm_scale
    mask = np.ones((B, 1, T, S), bool)
    if causal:
        mask &= (np.arange(T)[:, None] + S - T >= np.arange(S)[None, :])[None, None]
    if q_seg is not None:
        mask &= (np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :])[:, None]
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    l = p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p / np.where(l == 0, 1, l), v)


class TestReference:
    """The reference itself, against independent formulations."""

    @pytest.mark.parametrize("group", [1, 4])
    @pytest.mark.parametrize("causal", [True, False])
    def test_matches_jax_nn(self, group, causal):
        q, k, v, _ = _inputs(2, 24, 24, 4 * group if group > 1 else 2, 4 if group > 1 else 2, 32)
        ref = flash_attention_reference(q, k, v, causal=causal)
        nn = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
        assert _rel(ref, nn) < 1e-5

    def test_matches_float64_with_masks(self):
        q, k, v, _ = _inputs(2, 19, 29, 8, 2, 16)
        q_seg, kv_seg = _segments(2, 19, 3), _segments(2, 29, 3)
        ref = flash_attention_reference(q, k, v, causal=True, sm_scale=0.3,
                                        segment_ids=(q_seg, kv_seg))
        want = _numpy_attention(q, k, v, True, 0.3, q_seg, kv_seg)
        assert _rel(ref, want) < 1e-5
        assert np.all(np.isfinite(np.asarray(ref)))

    def test_causal_is_end_aligned(self):
        # T < S: the T queries are the last T positions; the last query sees every key.
        q, k, v, _ = _inputs(1, 4, 12, 2, 2, 16)
        ref = flash_attention_reference(q, k, v, causal=True)
        full = flash_attention_reference(q, k, v, causal=False)
        np.testing.assert_allclose(ref[:, -1], full[:, -1], rtol=1e-5, atol=1e-6)
        assert _rel(ref[:, 0], full[:, 0]) > 1e-3
        # jax.nn with the same explicit mask agrees.
        mask = (jnp.arange(4)[:, None] + 8 >= jnp.arange(12)[None, :])[None, None]
        nn = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        assert _rel(ref, nn) < 1e-5


class TestKernelForward:
    @pytest.mark.parametrize(
        "B,T,S,H,KVH,D,causal",
        [
            (2, 48, 48, 4, 4, 32, True),  # MHA, block multiples
            (1, 37, 37, 8, 2, 64, True),  # GQA 4, T not a block multiple
            (1, 40, 53, 8, 1, 32, True),  # GQA 8, T < S (end-aligned causal)
            (2, 45, 29, 4, 1, 24, False),  # GQA 4, T > S, odd head dim, non-causal
            (1, 50, 34, 2, 2, 16, True),  # T > S causal: the first queries see nothing
        ],
    )
    def test_matches_reference_f32(self, B, T, S, H, KVH, D, causal):
        q, k, v, _ = _inputs(B, T, S, H, KVH, D)
        out = flash_attention(q, k, v, causal=causal, block_sizes=SMALL, interpret=True)
        assert out.shape == q.shape and out.dtype == jnp.float32
        ref = flash_attention_reference(q, k, v, causal=causal)
        assert _rel(out, ref) < 1e-5
        assert np.all(np.isfinite(np.asarray(out)))

    def test_matches_jax_nn_gqa(self):
        q, k, v, _ = _inputs(2, 32, 32, 8, 1, 32)
        out = flash_attention(q, k, v, causal=True, block_sizes=SMALL, interpret=True)
        nn = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        assert _rel(out, nn) < 1e-5

    def test_segment_ids_single_and_pair(self):
        q, k, v, _ = _inputs(2, 40, 40, 4, 2, 32)
        seg = _segments(2, 40, 3)
        out = flash_attention(q, k, v, causal=True, segment_ids=seg, block_sizes=SMALL,
                              interpret=True)
        want = _numpy_attention(q, k, v, True, 1 / math.sqrt(32), seg, seg)
        assert _rel(out, want) < 1e-5
        # Pair form, T != S, non-causal; some query rows may see no key at all -> zeros.
        q, k, v, _ = _inputs(1, 24, 40, 4, 2, 32)
        q_seg = jnp.concatenate([_segments(1, 20, 2), jnp.full((1, 4), 7, jnp.int32)], axis=1)
        kv_seg = _segments(1, 40, 2)
        out = flash_attention(q, k, v, causal=False, segment_ids=(q_seg, kv_seg),
                              block_sizes=SMALL, interpret=True)
        want = _numpy_attention(q, k, v, False, 1 / math.sqrt(32), q_seg, kv_seg)
        assert _rel(out, want) < 1e-5
        np.testing.assert_array_equal(np.asarray(out[:, 20:]), 0.0)

    def test_segments_isolate_packed_sequences(self):
        # Changing keys of segment 1 must not change outputs of segment 0.
        q, k, v, _ = _inputs(1, 32, 32, 2, 1, 16)
        seg = jnp.asarray([[0] * 12 + [1] * 20], jnp.int32)
        out = flash_attention(q, k, v, segment_ids=seg, block_sizes=SMALL, interpret=True)
        v2 = v.at[:, 12:].add(5.0)
        out2 = flash_attention(q, k, v2, segment_ids=seg, block_sizes=SMALL, interpret=True)
        np.testing.assert_allclose(out[:, :12], out2[:, :12], rtol=1e-6, atol=1e-6)
        assert _rel(out2[:, 12:], out[:, 12:]) > 1e-2

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_half_precision(self, dtype):
        q, k, v, _ = _inputs(1, 40, 40, 8, 2, 64, dtype)
        out = flash_attention(q, k, v, causal=True, interpret=True)  # default blocks, clamped
        assert out.dtype == dtype
        ref = flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                        v.astype(jnp.float32), causal=True)
        assert _rel(out, ref) < 1e-2

    def test_sm_scale(self):
        q, k, v, _ = _inputs(1, 16, 16, 2, 2, 16)
        out = flash_attention(q, k, v, sm_scale=0.05, block_sizes=SMALL, interpret=True)
        want = _numpy_attention(q, k, v, True, 0.05)
        assert _rel(out, want) < 1e-5


class TestKernelBackward:
    @pytest.mark.parametrize(
        "B,T,S,H,KVH,D,causal,seg",
        [
            (1, 40, 40, 4, 4, 32, True, None),  # MHA, T not a block multiple
            (1, 33, 47, 8, 2, 32, True, None),  # GQA 4, T < S
            (2, 35, 35, 8, 1, 16, False, "single"),  # GQA 8, segments, non-causal
            (1, 30, 45, 4, 2, 24, True, "pair"),  # pair segments, odd head dim
        ],
    )
    def test_grads_match_reference(self, B, T, S, H, KVH, D, causal, seg):
        q, k, v, do = _inputs(B, T, S, H, KVH, D)
        segs = None
        if seg == "single":
            segs = _segments(B, T, 3)
        elif seg == "pair":
            segs = (_segments(B, T, 2), _segments(B, S, 2))

        def kern(q, k, v):
            return flash_attention(q, k, v, causal=causal, segment_ids=segs, block_sizes=SMALL,
                                   interpret=True)

        def ref(q, k, v):
            return flash_attention_reference(q, k, v, causal=causal, segment_ids=segs)

        out, vjp = jax.vjp(kern, q, k, v)
        ref_out, ref_vjp = jax.vjp(ref, q, k, v)
        assert _rel(out, ref_out) < 1e-5
        for name, g, rg in zip("qkv", vjp(do), ref_vjp(do)):
            assert g.shape == rg.shape, name
            assert np.all(np.isfinite(np.asarray(g))), name
            assert _rel(g, rg) < 1e-4, f"d{name}: {_rel(g, rg)}"

    def test_grad_bf16(self):
        q, k, v, do = _inputs(1, 32, 32, 4, 1, 32, jnp.bfloat16)
        loss = lambda f: lambda q, k, v: jnp.sum(  # noqa: E731
            f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
        g = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, interpret=True)),
                     argnums=(0, 1, 2))(q, k, v)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        rg = jax.grad(loss(lambda q, k, v: flash_attention_reference(f32(q), f32(k), f32(v))),
                      argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, rg):
            assert a.dtype == jnp.bfloat16
            assert _rel(a, b) < 2e-2


def _lse_reference(q, k, causal):
    """[B, H, T] base-2 log-sum-exp of the scaled scores, in float64."""
    q, k = (np.asarray(x, np.float64) for x in (q, k))
    B, T, H, D = q.shape
    S, KVH = k.shape[1], k.shape[2]
    s = np.einsum("bthd,bshd->bhts", q, np.repeat(k, H // KVH, axis=2)) / math.sqrt(D)
    if causal:
        s = np.where(np.arange(T)[:, None] + S - T >= np.arange(S)[None, :], s, -np.inf)
    m = s.max(-1)
    return (m + np.log(np.exp(s - m[..., None]).sum(-1))) / math.log(2)


class TestHopperForward:
    """The Mosaic GPU forward (flash_attention_mgpu) through Pallas's GPU interpreter: the same
    barriers, TMA ring, ping-pong and causal epilogue as on the GPU."""

    @pytest.mark.parametrize(
        "B,T,S,H,KVH,D,causal,block_kv",
        [
            (1, 256, 256, 4, 2, 64, True, 64),  # two CTAs per head, consumers with unequal tiles
            (2, 128, 384, 4, 1, 128, True, 128),  # S > T: end-aligned diagonal, GQA 4
            (1, 256, 256, 2, 2, 64, False, 128),  # non-causal
            (1, 128, 512, 8, 1, 64, True, 64),  # GQA 8, ring of 2 slots reused 8 times
        ],
    )
    def test_matches_reference(self, B, T, S, H, KVH, D, causal, block_kv):
        q, k, v, _ = _inputs(B, T, S, H, KVH, D, jnp.bfloat16)
        out, lse = flash_attention_mgpu.flash_attention_mgpu(
            q, k, v, causal=causal, sm_scale=1 / math.sqrt(D),
            blocks=flash_attention_mgpu.BlockSizes(block_kv=block_kv), interpret=True)
        assert out.dtype == jnp.bfloat16 and lse.shape == (B, H, T)
        want = _numpy_attention(q, k, v, causal, 1 / math.sqrt(D))
        assert _rel(out, want) < 1e-2
        np.testing.assert_allclose(lse, _lse_reference(q, k, causal), rtol=1e-4, atol=1e-3)

    def test_grads_through_triton_backward(self):
        """Its residuals (out, base-2 lse) drive the Triton backward unchanged."""
        q, k, v, do = _inputs(1, 128, 128, 4, 2, 64, jnp.float16)
        bs = BlockSizes(fwd_impl="mgpu", mgpu=flash_attention_mgpu.BlockSizes(block_kv=64))
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        loss = lambda f: lambda q, k, v: jnp.sum(f32(f(q, k, v)) * f32(do))  # noqa: E731
        g = jax.grad(loss(lambda q, k, v: flash_attention(q, k, v, block_sizes=bs, interpret=True)),
                     argnums=(0, 1, 2))(q, k, v)
        rg = jax.grad(loss(lambda q, k, v: flash_attention_reference(f32(q), f32(k), f32(v))),
                      argnums=(0, 1, 2))(q, k, v)
        for name, a, b in zip("qkv", g, rg):
            assert _rel(a, b) < 1e-2, f"d{name}: {_rel(a, b)}"

    @pytest.mark.parametrize("T,S,D,seg,impl,want", [
        (128, 128, 64, False, "mgpu", True),
        (128, 128, 64, False, "auto", False),  # "auto" interprets the Triton kernel
        (128, 128, 64, True, "mgpu", False),  # segment ids
        (100, 100, 64, False, "mgpu", False),  # T not a multiple of 128
        (256, 128, 64, False, "mgpu", False),  # causal with T > S
        (128, 128, 96, False, "mgpu", False),  # head_dim
        (128, 128, 64, False, "triton", False),
    ])
    def test_applies_only_where_it_can(self, T, S, D, seg, impl, want):
        q = jnp.zeros((1, T, 4, D), jnp.bfloat16)
        k = jnp.zeros((1, S, 2, D), jnp.bfloat16)
        blocks = BlockSizes(fwd_impl=impl).clamped(T, S)
        st = _Static(causal=True, sm_scale=0.1, blocks=blocks, interpret=True, t=T, s=S, d=D)
        assert _use_mgpu(q, k, seg, st, "interpret") is want
        assert not _use_mgpu(q, k, seg, st, "pallas")  # not on a Hopper GPU here

    def test_validation(self):
        with pytest.raises(ValueError, match="block_kv"):
            flash_attention_mgpu.BlockSizes(block_kv=96)
        with pytest.raises(ValueError, match="num_stages"):
            flash_attention_mgpu.BlockSizes(num_stages=1)
        q = jnp.zeros((1, 100, 2, 64), jnp.bfloat16)
        with pytest.raises(ValueError, match="T % 128"):
            flash_attention_mgpu.flash_attention_mgpu(q, q, q, causal=True, sm_scale=0.1)


class TestHopperBackward:
    """The Mosaic GPU backward kernels (flash_attention_mgpu_dkv, and flash_attention_mgpu_bwd
    with dq) through Pallas's GPU interpreter: the same key-tile schedule, q/do ring, ds^T
    hand-over between the consumers and causal masks as on the GPU (the dq shares are summed
    outside the kernel there: no reduce-add)."""

    @staticmethod
    def _grads_reference(q, k, v, do, causal):
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        ref = lambda q, k, v: flash_attention_reference(q, k, v, causal=causal)  # noqa: E731
        return jax.vjp(ref, f32(q), f32(k), f32(v))[1](f32(do))

    @pytest.mark.parametrize(
        "B,T,S,H,KVH,causal",
        [
            (1, 192, 256, 8, 1, True),  # GQA 8, S > T, masked tiles then full ones, ring reused
            (2, 128, 384, 4, 1, True),  # three key tiles per head, the first seen by every query
            (1, 256, 256, 2, 2, False),  # non-causal, GQA 1
        ],
    )
    @pytest.mark.parametrize("with_dq", [False, True])
    def test_matches_reference(self, B, T, S, H, KVH, causal, with_dq):
        q, k, v, do = _inputs(B, T, S, H, KVH, 128, jnp.bfloat16)
        out = flash_attention_reference(q, k, v, causal=causal)
        lse = jnp.asarray(_lse_reference(q, k, causal), jnp.float32)
        sm_scale = 1 / math.sqrt(128)
        want = self._grads_reference(q, k, v, do, causal)
        if with_dq:
            grads = flash_attention_mgpu_bwd.flash_attention_mgpu_bwd(
                q, k, v, out, lse, do, causal=causal, sm_scale=sm_scale, interpret=True)
        else:
            delta = jnp.einsum("BTHD,BTHD->BHT", out.astype(jnp.float32), do.astype(jnp.float32))
            grads = flash_attention_mgpu_bwd.flash_attention_mgpu_dkv(
                q, k, v, lse, delta, do, causal=causal, sm_scale=sm_scale, interpret=True)
            want = want[1:]
        for name, g, r in zip("qkv"[3 - len(grads):], grads, want):
            assert g.dtype == jnp.bfloat16
            assert _rel(g, r) < 1e-2, f"d{name}: {_rel(g, r)}"

    def test_grads_through_flash_attention(self):
        """Hopper forward and dk/dv kernels (beside the Triton dq kernel), chosen by BlockSizes."""
        q, k, v, do = _inputs(1, 128, 128, 4, 2, 128, jnp.bfloat16)
        bs = BlockSizes(fwd_impl="mgpu", bwd_impl="mgpu")
        fn = lambda q, k, v: flash_attention(q, k, v, block_sizes=bs, interpret=True)  # noqa: E731
        grads = jax.vjp(fn, q, k, v)[1](do)
        for name, g, r in zip("qkv", grads, self._grads_reference(q, k, v, do, True)):
            assert _rel(g, r) < 1e-2, f"d{name}: {_rel(g, r)}"

    @pytest.mark.parametrize("T,S,D,seg,impl,want", [
        (128, 128, 128, False, "mgpu", True),
        (100, 128, 128, False, "mgpu", False),  # T not a multiple of 64 (padded)
        (64, 128, 128, False, "mgpu", True),  # (the forward is then Triton: the same lse)
        (128, 128, 64, False, "mgpu", False),  # head_dim 64
        (128, 128, 128, True, "mgpu", False),  # segment ids
        (128, 128, 128, False, "auto", False),  # "auto" interprets the Triton kernels
    ])
    def test_applies_only_where_asked_and_it_can(self, T, S, D, seg, impl, want):
        q = jnp.zeros((1, T, 4, D), jnp.bfloat16)
        k = jnp.zeros((1, S, 2, D), jnp.bfloat16)
        blocks = BlockSizes(bwd_impl=impl).clamped(T, S)
        st = _Static(causal=True, sm_scale=0.1, blocks=blocks, interpret=True, t=T, s=S, d=D)
        assert _use_mgpu(q, k, seg, st, "interpret", "bwd") is want
        assert not _use_mgpu(q, k, seg, st, "pallas", "bwd")  # not on a Hopper GPU here
        if impl == "auto" and not seg and D == 128 and T % 64 == 0:
            with pytest.MonkeyPatch.context() as mp:  # on one, "auto" takes it
                mp.setattr(dispatch, "on_hopper", lambda: True)
                assert _use_mgpu(q, k, seg, st, "pallas", "bwd")

    def test_validation(self):
        with pytest.raises(ValueError, match="num_stages"):
            flash_attention_mgpu_bwd.BwdBlockSizes(num_stages=1)
        with pytest.raises(ValueError, match="bwd_impl"):
            BlockSizes(bwd_impl="cuda")
        q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
        lse = jnp.zeros((1, 2, 128), jnp.float32)
        with pytest.raises(ValueError, match="head_dim"):
            flash_attention_mgpu_bwd.flash_attention_mgpu_bwd(q, q, q, q, lse, q, causal=True,
                                                              sm_scale=0.1)
        q = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
        with pytest.raises(ValueError, match="lse.shape"):
            flash_attention_mgpu_bwd.flash_attention_mgpu_bwd(q, q, q, q, lse[:, :1], q,
                                                              causal=True, sm_scale=0.1)
        with pytest.raises(ValueError, match="delta"):
            flash_attention_mgpu_bwd.flash_attention_mgpu_dkv(q, q, q, lse, lse[:, :1], q,
                                                              causal=True, sm_scale=0.1)


class TestValidation:
    @pytest.mark.parametrize("kwargs,word", [
        (dict(block_q=48), "block_q"),
        (dict(block_k=8), "block_k"),
        (dict(block_k_dkv=0), "block_k_dkv"),
        (dict(num_warps=3), "num_warps"),
        (dict(num_stages_bwd=0), "num_stages_bwd"),
        (dict(fwd_impl="cuda"), "fwd_impl"),
    ])
    def test_block_sizes(self, kwargs, word):
        with pytest.raises(ValueError, match=word):
            BlockSizes(**kwargs)

    def test_clamped(self):
        b = BlockSizes(block_k=128).clamped(20, 40)
        assert b.block_q == 32 and b.block_k == 64 and b.block_q_dkv == 32
        assert BlockSizes(block_q=64).clamped(4, 4).block_q == 16

    def test_bad_shapes(self):
        q = jnp.zeros((1, 8, 4, 16))
        kv = jnp.zeros((1, 8, 2, 16))
        with pytest.raises(ValueError, match="4-D"):
            flash_attention(q[0], kv, kv)
        with pytest.raises(ValueError, match="num_kv_heads"):
            flash_attention(q, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)))
        with pytest.raises(ValueError, match="head_dim"):
            flash_attention(q, jnp.zeros((1, 8, 2, 32)), jnp.zeros((1, 8, 2, 32)))
        with pytest.raises(ValueError, match="k and v"):
            flash_attention(q, kv, jnp.zeros((1, 9, 2, 16)))
        with pytest.raises(ValueError, match="dtypes"):
            flash_attention(q, kv.astype(jnp.bfloat16), kv)
        with pytest.raises(ValueError, match="segment ids shape"):
            flash_attention(q, kv, kv, segment_ids=jnp.zeros((1, 7), jnp.int32))
        with pytest.raises(ValueError, match="sm_scale"):
            flash_attention(q, kv, kv, sm_scale=0.0)
        with pytest.raises(ValueError, match="T == S"):
            flash_attention(q, jnp.zeros((1, 9, 2, 16)), jnp.zeros((1, 9, 2, 16)),
                            segment_ids=jnp.zeros((1, 8), jnp.int32))


class TestDispatch:
    def test_reference_mode_and_interpret_mode_agree(self):
        q, k, v, do = _inputs(1, 24, 24, 4, 2, 16)
        with dispatch.kernel_mode("reference"):
            ref = flash_attention(q, k, v)
            g_ref = jax.grad(lambda q: jnp.sum(flash_attention(q, k, v) * do))(q)
        with dispatch.kernel_mode("interpret"):
            out = flash_attention(q, k, v, block_sizes=SMALL)
            g = jax.grad(lambda q: jnp.sum(flash_attention(q, k, v, block_sizes=SMALL) * do))(q)
        assert _rel(out, ref) < 1e-5
        assert _rel(g, g_ref) < 1e-4
