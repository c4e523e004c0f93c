"""RoPE + K/V write: the kernel (interpret) against its reference and against the model's own
rotation (`apply_rope`) followed by a scatter, int8 / fp8 pools against the quantization rule, its
Triton lowering on an abstract H100, bad input, and the paged cache's attention with the kernel
against the reference path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.decode.engine import PagedCache
from pallax.decode.kv_cache import PagePool
from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas import rope_kv_write as rk
from pallax.kernels_pallas.rope_kv_write import BlockSizes, rope_kv_write, rope_kv_write_reference
from pallax.model.attention import QKV
from pallax.model.layers import apply_rope


def make_case(seed, *, tokens, heads, kv_heads, head_dim, pages=6, page_size=4, dtype=jnp.bfloat16,
              pool_dtype=None, padding=(1,)):
    """Random projections, rotation angles, distinct random slots (tokens in `padding`: -1) and
    random pools (every row nonzero, so a stray write shows; int8 / fp8 pools with random
    scales)."""
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.standard_normal((tokens, heads + 2 * kv_heads, head_dim)), dtype)
    angles = rng.uniform(0, 2 * np.pi, (tokens, head_dim // 2))
    slots = rng.permutation(pages * page_size)[:tokens]
    slots[[p for p in padding if p < tokens]] = -1
    shape = (pages, page_size, kv_heads, head_dim)
    pool_dtype = jnp.dtype(pool_dtype or dtype)
    if pool_dtype == jnp.int8:
        pool = [jnp.asarray(rng.integers(1, 128, shape), jnp.int8) for _ in "kv"]
    else:
        pool = [jnp.asarray(rng.standard_normal(shape) + 3.0, pool_dtype) for _ in "kv"]
    scales = [None, None]
    if pool_dtype in (jnp.int8, jnp.float8_e4m3fn):
        scales = [jnp.asarray(rng.uniform(0.01, 0.02, shape[:3]), jnp.float32) for _ in "kv"]
    return (qkv, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32),
            jnp.asarray(slots, jnp.int32), *pool, *scales)


def composed(qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales, *, n_kv_heads):
    """What the step did before the kernel: the model's apply_rope on q and k, a scatter of k and
    v into the pool (float pools)."""
    h = qkv.shape[1] - 2 * n_kv_heads
    q, k, v = jnp.split(qkv[None], [h, h + n_kv_heads], axis=2)
    q, k = apply_rope(q, cos[None], sin[None])[0], apply_rope(k, cos[None], sin[None])[0]
    rows = k_pages.shape[0] * k_pages.shape[1]
    at = jnp.where(slots < 0, rows, slots)
    k_pages, v_pages = (p.reshape(rows, n_kv_heads, -1).at[at].set(x.astype(p.dtype), mode="drop").reshape(p.shape)
                        for p, x in ((k_pages, k), (v_pages, v[0])))
    return q, k_pages, v_pages, k_scales, v_scales


@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,dtype,pool_dtype", [
    (2, 32, 8, 128, jnp.bfloat16, None),        # Llama-3-8B decode at batch 1 (a padding row)
    (5, 14, 2, 64, jnp.bfloat16, None),         # Qwen2.5-0.5B heads: not powers of two
    (3, 9, 3, 64, jnp.float32, None),           # SmolLM2-135M heads, f32
    (4, 6, 2, 32, jnp.bfloat16, jnp.float32),   # bf16 projections into an f32 pool
])
def test_kernel_matches_reference_and_composition(tokens, heads, kv_heads, head_dim, dtype, pool_dtype):
    case = make_case(tokens + heads, tokens=tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     dtype=dtype, pool_dtype=pool_dtype)
    got = rope_kv_write(*case, n_kv_heads=kv_heads, interpret=True)
    ref = rope_kv_write_reference(*case, n_kv_heads=kv_heads)
    old = composed(*case, n_kv_heads=kv_heads)
    assert got[0].shape == (tokens, heads, head_dim) and got[0].dtype == dtype
    # bf16 results are rounded from the same f32 rotation: equal. In f32 the compilers may
    # contract x1 * c - x2 * s into a fused multiply-add or not: within an ulp or two.
    tol = 0 if dtype == jnp.bfloat16 else 1e-6
    assert got[3] is None and got[4] is None
    for g, r, o in zip(got[:3], ref, old):
        assert g.shape == r.shape and g.dtype == r.dtype
        for want in (r, o):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32),
                                       rtol=tol, atol=tol)
    # Only the live tokens' rows changed, and they hold the token's (rotated) k and its v.
    qkv, _, _, slots, k_pages, v_pages, _, _ = case
    for new, old_pool in ((got[1], k_pages), (got[2], v_pages)):
        changed = np.any(np.asarray(new != old_pool).reshape(-1, kv_heads * head_dim), axis=1)
        assert set(np.flatnonzero(changed)) <= {int(s) for s in slots if s >= 0}
    v_rows = np.asarray(got[2].reshape(-1, kv_heads, head_dim), np.float32)
    for t, s in enumerate(np.asarray(slots)):
        if s >= 0:
            np.testing.assert_array_equal(v_rows[s], np.asarray(qkv[t, heads + kv_heads:], np.float32))


@pytest.mark.parametrize("pool_dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (14, 2, 64)])
def test_quantized_pools(pool_dtype, heads, kv_heads, head_dim):
    """int8 / fp8 pools: values and scales as the reference quantizes them (an int8 value may
    differ by one step where x / scale lands on a rounding boundary), each live token's k within
    half a step of its rotation (int8) or e4m3's relative precision (fp8), untouched rows kept."""
    case = make_case(heads + head_dim, tokens=5, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     pool_dtype=pool_dtype)
    got = rope_kv_write(*case, n_kv_heads=kv_heads, interpret=True)
    ref = rope_kv_write_reference(*case, n_kv_heads=kv_heads)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32))
    for g, r in zip(got[1:3], ref[1:3]):
        assert g.dtype == pool_dtype
        diff = np.abs(np.asarray(g, np.float32) - np.asarray(r, np.float32))
        assert diff.max() <= (1 if pool_dtype == jnp.int8 else 0) and (diff > 0).mean() < 1e-3
    for g, r in zip(got[3:], ref[3:]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6)
    qkv, cos, sin, slots, k_pages, v_pages, k_scales, v_scales = case
    live = np.asarray(slots) >= 0
    at = np.asarray(slots)[live]
    k_back = np.asarray(got[1].astype(jnp.float32) * got[3][..., None]).reshape(-1, kv_heads, head_dim)[at]
    k_want = np.asarray(apply_rope(qkv[None, :, heads:heads + kv_heads], cos[None], sin[None])[0],
                        np.float32)[live]
    amax = np.abs(k_want).max(-1, keepdims=True)
    step = amax / (127.0 if pool_dtype == jnp.int8 else 448.0)
    bound = 0.5 * step + 1e-6 if pool_dtype == jnp.int8 else np.abs(k_want) / 16 + step * 2.0 ** -6
    assert np.all(np.abs(k_back - k_want) <= bound)
    np.testing.assert_allclose(np.asarray(got[3]).reshape(-1, kv_heads)[at], step[..., 0], rtol=1e-6)
    untouched = np.ones(k_scales.size // kv_heads, bool)
    untouched[at] = False
    for new, old in ((got[3], k_scales), (got[4], v_scales), (got[1], k_pages), (got[2], v_pages)):
        n, o = (np.asarray(x.astype(jnp.float32)).reshape(untouched.size, -1) for x in (new, old))
        np.testing.assert_array_equal(n[untouched], o[untouched])


def test_round_half_even():
    x = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -126.5, 3.2, -3.7, 0.0, 127.0])
    np.testing.assert_array_equal(np.asarray(rk._round_half_even(x)), np.asarray(jnp.round(x)))


def test_dispatch_is_honoured(monkeypatch):
    case = make_case(3, tokens=3, heads=4, kv_heads=2, head_dim=32)
    seen = []
    real = rk._rope_kv_write_kernel

    def spy(*args, **kw):
        seen.append(kw["interpret"])
        return real(*args, **kw)

    monkeypatch.setattr(rk, "_rope_kv_write_kernel", spy)
    with dispatch.kernel_mode("reference"):
        ref = rope_kv_write(*case, n_kv_heads=2)
    assert seen == []
    with dispatch.kernel_mode("interpret"):
        got = rope_kv_write(*case, n_kv_heads=2)
    assert seen == [True]
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


@pytest.mark.parametrize("pool_dtype", [jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
def test_kernel_lowers_to_triton(pool_dtype, lower_for_h100):
    """Lowered for CUDA against an abstract H100 (no GPU needed): Triton takes the gathers of
    head rows, the half-row slices, the quantization (row maxima, the rounding, int8 and e4m3
    casts, the scales' stores) and the in-place pool outputs (aliased to the inputs)."""
    case = make_case(0, tokens=3, heads=14, kv_heads=2, head_dim=64, pool_dtype=pool_dtype)
    fn = jax.jit(lambda *a: rk._rope_kv_write_kernel(*a, n_kv_heads=2, block_sizes=BlockSizes(),
                                                      interpret=False))
    text = lower_for_h100(fn, *case)
    assert 'name = "rope_kv_write"' in text
    assert "output_operand_aliases" in text


def test_bad_inputs_raise():
    case = list(make_case(1, tokens=3, heads=4, kv_heads=2, head_dim=32))
    qkv, cos, sin, slots, k_pages, v_pages, _, _ = case
    with pytest.raises(ValueError, match="n_kv_heads"):
        rope_kv_write(*case, n_kv_heads=4)
    with pytest.raises(ValueError, match="one shape"):
        rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages[:, :2], n_kv_heads=2)
    with pytest.raises(ValueError, match="cos.shape"):
        rope_kv_write(qkv, cos[:2], sin, slots, k_pages, v_pages, n_kv_heads=2)
    with pytest.raises(ValueError, match="slots"):
        rope_kv_write(qkv, cos, sin, slots.astype(jnp.float32), k_pages, v_pages, n_kv_heads=2)
    with pytest.raises(ValueError, match="H >= 1"):
        rope_kv_write(qkv[:, :4], cos, sin, slots, k_pages, v_pages, n_kv_heads=2)
    int8 = [k_pages.astype(jnp.int8), v_pages.astype(jnp.int8)]
    with pytest.raises(ValueError, match="need k_scales"):
        rope_kv_write(qkv, cos, sin, slots, *int8, n_kv_heads=2)
    scales = jnp.ones(k_pages.shape[:3], jnp.float32)
    with pytest.raises(ValueError, match="need v_scales"):
        rope_kv_write(qkv, cos, sin, slots, *int8, scales, scales[:, :2], n_kv_heads=2)
    with pytest.raises(ValueError, match="scales given"):
        rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, scales, scales, n_kv_heads=2)
    with pytest.raises(ValueError, match="pools are float"):
        rope_kv_write(qkv, cos, sin, slots, k_pages.astype(jnp.int32), v_pages.astype(jnp.int32),
                      n_kv_heads=2)
    odd = make_case(2, tokens=2, heads=4, kv_heads=2, head_dim=24)
    with dispatch.kernel_mode("pallas"):
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            rope_kv_write(*odd, n_kv_heads=2)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.int8])
def test_paged_cache_attend_kernel_matches_reference_path(pool_dtype):
    """PagedCache.attend over a pool stacked for 2 layers, layer 1 (the kernel writes at its page
    offset): the kernels (interpret) give the reference path's output and pools."""
    heads, kv_heads, d, pages, ps = 4, 2, 32, 6, 4
    qkv, cos, sin, slots, k1, v1, ks1, vs1 = make_case(7, tokens=3, heads=heads, kv_heads=kv_heads,
                                                       head_dim=d, pages=pages, page_size=ps,
                                                       dtype=jnp.float32, pool_dtype=pool_dtype,
                                                       padding=(2,))
    layer0 = make_case(8, tokens=3, heads=heads, kv_heads=kv_heads, head_dim=d, pages=pages,
                       page_size=ps, dtype=jnp.float32, pool_dtype=pool_dtype)[4:]
    pool = PagePool(*(None if a is None else jnp.stack([a, b])
                      for a, b in zip(layer0, (k1, v1, ks1, vs1))))
    # Two sequences of one decode token each (token 2 is padding); sequence s reads pages [s, s + 2]
    # of its layer and its token sits at kv position kv_lens[s] - 1 of them.
    page_table = jnp.asarray([[0, 2, 4], [1, 3, 5]], jnp.int32)
    kv_lens = jnp.asarray([7, 10], jnp.int32)
    last = [(int(page_table[s, (n - 1) // ps]) * ps + (n - 1) % ps) for s, n in enumerate(kv_lens)]
    cache = PagedCache(pool=pool, slots=jnp.asarray(last + [-1], jnp.int32), page_table=page_table,
                       query_start=jnp.asarray([0, 1, 2], jnp.int32), kv_lens=kv_lens,
                       num_seqs=jnp.asarray(2, jnp.int32))
    x = QKV(qkv[None], cos[None], sin[None], kv_heads)
    positions = jnp.zeros((1, 3), jnp.int32)  # the rotation is in cos/sin; attend reads no positions

    def run(mode):
        with dispatch.kernel_mode(mode):
            out, _, new = cache.attend(None, x, positions, state=pool, index=1)
        return out, new

    (want, want_pool), (got, got_pool) = run("reference"), run("interpret")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    for g, w, before in zip(got_pool.buffers, want_pool.buffers, pool.buffers):
        if before is None:
            assert g is None and w is None
            continue
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)  # f32: an ulp
        before = np.asarray(before.astype(jnp.float32))
        np.testing.assert_array_equal(g[0], before[0])  # layer 0 untouched
        assert not np.array_equal(g[1], before[1])
