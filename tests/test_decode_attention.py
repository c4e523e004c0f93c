"""A decode batch's RoPE + K/V write + paged attention in one kernel: the kernel (interpret)
against its reference (the rotation and write kernel's reference, then paged attention's) on
float, int8 and fp8 pools, split and unsplit, padding rows; its Triton lowering on an abstract
H100; bad input; and the paged cache's decode path against its general path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.decode.engine import PagedCache
from pallax.decode.kv_cache import PagePool
from pallax.kernels_pallas import decode_attention as da
from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas.paged_attention import BlockSizes
from pallax.model.attention import QKV


def make_case(seed, *, live, heads, kv_heads, head_dim, page_size, kv_lens, pad=1, dtype=jnp.float32,
              pool_dtype=None):
    """`live` decode sequences of kv_lens (their token's K/V go to the pool row the page table
    maps its position to) and `pad` padding rows; distinct random pages; random pools (every row
    nonzero, so a stray write shows)."""
    rng = np.random.default_rng(seed)
    t = live + pad
    max_pages = max(-(-n // page_size) for n in kv_lens)
    n_pages = t * max_pages + 2
    page_table = rng.permutation(n_pages)[: t * max_pages].reshape(t, max_pages)
    lens = np.array(list(kv_lens) + [0] * pad, np.int32)
    slots = np.full(t, -1, np.int32)
    for s in range(live):
        p = lens[s] - 1
        slots[s] = page_table[s, p // page_size] * page_size + p % page_size
    shape = (n_pages, page_size, kv_heads, head_dim)
    pool_dtype = jnp.dtype(pool_dtype or dtype)
    if pool_dtype == jnp.int8:
        pool = [jnp.asarray(rng.integers(1, 128, shape), jnp.int8) for _ in "kv"]
    else:
        pool = [jnp.asarray(rng.standard_normal(shape) + 3.0, pool_dtype) for _ in "kv"]
    scales = [None, None]
    if pool_dtype in (jnp.int8, jnp.float8_e4m3fn):
        scales = [jnp.asarray(rng.uniform(0.01, 0.02, shape[:3]), jnp.float32) for _ in "kv"]
    angles = rng.uniform(0, 2 * np.pi, (t, head_dim // 2))
    qkv = jnp.asarray(rng.standard_normal((t, heads + 2 * kv_heads, head_dim)), dtype)
    return (qkv, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32),
            jnp.asarray(slots), jnp.asarray(page_table, jnp.int32), jnp.asarray(lens),
            jnp.asarray(live, jnp.int32), *pool, *scales)


CASES = {  # name: (make_case kwargs, BlockSizes, output tolerance)
    "gqa4_splits": (dict(live=2, heads=8, kv_heads=2, head_dim=32, page_size=4, kv_lens=[13, 6]),
                    BlockSizes(block_kv=16, kv_splits=3), 1e-5),
    "llama_shape_default": (dict(live=1, heads=32, kv_heads=8, head_dim=128, page_size=16, kv_lens=[70],
                                 dtype=jnp.bfloat16), BlockSizes(), 2e-2),
    "gqa7_one_split": (dict(live=2, heads=14, kv_heads=2, head_dim=32, page_size=8, kv_lens=[33, 1]),
                       BlockSizes(block_kv=16, kv_splits=1), 1e-5),
    "int8_pool": (dict(live=2, heads=8, kv_heads=2, head_dim=32, page_size=4, kv_lens=[20, 9],
                       pool_dtype=jnp.int8), BlockSizes(block_kv=16, kv_splits=2), 1e-5),
    "fp8_pool_bf16": (dict(live=2, heads=8, kv_heads=2, head_dim=64, page_size=4, kv_lens=[20, 16],
                           dtype=jnp.bfloat16, pool_dtype=jnp.float8_e4m3fn),
                      BlockSizes(block_kv=16, kv_splits=2), 2e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name):
    kwargs, blocks, tol = CASES[name]
    case = make_case(sorted(CASES).index(name), **kwargs)
    kvh, live = kwargs["kv_heads"], kwargs["live"]
    got = da.decode_attention(*case, n_kv_heads=kvh, block_sizes=blocks, interpret=True)
    want = da.decode_attention_reference(*case, n_kv_heads=kvh, sm_scale=1 / math.sqrt(kwargs["head_dim"]))
    out, ref = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    assert got[0].shape == ref.shape and got[0].dtype == case[0].dtype
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
    assert np.all(out[live:] == 0), "padding rows must be zero"
    before = case[7:]
    for g, w, b in zip(got[1:], want[1:], before):
        if b is None:
            assert g is None and w is None
            continue
        g, w, b = (np.asarray(a.astype(jnp.float32)) for a in (g, w, b))
        np.testing.assert_array_equal(g, w)  # the rotation, the rounding and the quantization exact
        assert np.sum(np.any(g != b, axis=-1) if g.ndim == 4 else g != b) > 0  # the tokens were written


@pytest.mark.parametrize("pool_dtype", [jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
def test_kernel_lowers_to_triton(pool_dtype, lower_for_h100):
    """Lowered for CUDA against an abstract H100: Triton takes the row gathers with the partner
    columns, the substituted block rows, the quantization and the in-place pool outputs."""
    case = make_case(3, live=1, heads=14, kv_heads=2, head_dim=64, page_size=16, kv_lens=[70],
                     dtype=jnp.bfloat16, pool_dtype=pool_dtype)
    fn = jax.jit(lambda *a: da._decode_attention_kernel(
        *a, n_kv_heads=2, sm_scale=0.125, block_sizes=BlockSizes(block_kv=16, kv_splits=3), interpret=False))
    text = lower_for_h100(fn, *case)
    assert 'name = "decode_attention_bkv16_s3"' in text
    assert 'name = "paged_attention_combine_s3"' in text
    assert "output_operand_aliases" in text


def test_bad_inputs_raise():
    case = list(make_case(4, live=2, heads=4, kv_heads=2, head_dim=32, page_size=4, kv_lens=[5, 7]))
    with pytest.raises(ValueError, match="n_kv_heads"):
        da.decode_attention(*case, n_kv_heads=4)
    bad = list(case)
    bad[4] = case[4][:2]
    with pytest.raises(ValueError, match="one sequence a token"):
        da.decode_attention(*bad, n_kv_heads=2)
    bad = list(case)
    bad[5] = case[5][:2]
    with pytest.raises(ValueError, match="kv_lens.shape"):
        da.decode_attention(*bad, n_kv_heads=2)
    bad = list(case)
    bad[4] = case[4].astype(jnp.float32)
    with pytest.raises(ValueError, match="page_table must be integer"):
        da.decode_attention(*bad, n_kv_heads=2)
    bad = list(case)
    bad[7] = case[7].astype(jnp.int8)
    with pytest.raises(ValueError, match="one shape"):
        da.decode_attention(*bad, n_kv_heads=2)
    odd = make_case(5, live=1, heads=4, kv_heads=2, head_dim=24, page_size=4, kv_lens=[5])
    with dispatch.kernel_mode("pallas"):
        with pytest.raises(ValueError, match="power-of-two head_dim"):
            da.decode_attention(*odd, n_kv_heads=2)


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.int8])
def test_paged_cache_decode_path_matches_general_path(pool_dtype):
    """PagedCache.attend with `decode=True` (the fused kernel, interpret) over a pool stacked for
    2 layers, layer 1, gives the general path's output and pools (rotation + write kernel, then
    attention, also interpret); layer 0 untouched."""
    heads, kv_heads, d, ps = 4, 2, 32, 4
    qkv, cos, sin, slots, page_table, kv_lens, num_seqs, k1, v1, ks1, vs1 = make_case(
        7, live=2, heads=heads, kv_heads=kv_heads, head_dim=d, page_size=ps, kv_lens=[7, 10],
        pool_dtype=pool_dtype)
    layer0 = make_case(8, live=2, heads=heads, kv_heads=kv_heads, head_dim=d, page_size=ps, kv_lens=[7, 10],
                       pool_dtype=pool_dtype)[7:]
    pool = PagePool(*(None if a is None else jnp.stack([a, b]) for a, b in zip(layer0, (k1, v1, ks1, vs1))))
    x = QKV(qkv[None], cos[None], sin[None], kv_heads)
    positions = jnp.zeros((1, 3), jnp.int32)  # the rotation is in cos/sin

    def run(decode):
        cache = PagedCache(pool=pool, slots=slots, page_table=page_table,
                           query_start=jnp.asarray([0, 1, 2, 2], jnp.int32), kv_lens=kv_lens,
                           num_seqs=num_seqs, decode=decode)
        with dispatch.kernel_mode("interpret"):
            out, _, new = cache.attend(None, x, positions, state=pool, index=1)
        return out, new

    (want, want_pool), (got, got_pool) = run(False), run(True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    for g, w, before in zip(got_pool.buffers, want_pool.buffers, pool.buffers):
        if before is None:
            continue
        g, w, before = (np.asarray(a.astype(jnp.float32)) for a in (g, w, before))
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(g[0], before[0])


def test_engine_decode_program_matches_reference_mode(count_kernels):
    """The engine's pure-decode program (2 sequences, 3 steps a call) on a small random model:
    with the kernels (interpret: the fused kernel in every step, no separate rotation and write)
    the same greedy tokens, log-probabilities and pool as the reference path."""
    import functools

    from pallax.bench.decode import random_llm
    from pallax.bench.step_anatomy import decode_program
    from pallax.decode.engine import engine_step
    from pallax.model.config import ModelConfig

    c = ModelConfig(name="decode-test", arch="llama", vocab_size=256, dim=128, n_layers=2, n_heads=4,
                    n_kv_heads=2, ffn_dim=256, head_dim=32)
    llm = random_llm(c)
    _, args = decode_program(llm, batch=2, n_steps=3, page_size=8, context=20)

    def run(mode):
        step = jax.jit(functools.partial(engine_step, config=c, n_steps=3, full=False))
        with dispatch.kernel_mode(mode):
            pool, out, _ = step(*args)
        return pool, out

    with dispatch.kernel_mode("interpret"):
        jaxpr = jax.make_jaxpr(functools.partial(engine_step, config=c, n_steps=3, full=False))(*args)
    # stacked layers: one call in the layer scan of the first step, one in that of the later steps
    assert count_kernels(jaxpr.jaxpr, "decode_attention_bkv128_s1") == 2
    assert count_kernels(jaxpr.jaxpr, "rope_kv_write") == 0
    (want_pool, want), (got_pool, got) = run("reference"), run("interpret")
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprob), np.asarray(want.logprob), rtol=1e-2, atol=1e-2)
    for g, w in zip(jax.tree.leaves(got_pool), jax.tree.leaves(want_pool)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2e-2, atol=2e-2)
