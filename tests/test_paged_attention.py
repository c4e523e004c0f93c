"""Ragged paged attention: reference vs float64 numpy, kernels (interpret) vs reference, and
the Triton lowering of both kernels (attention, split combine) on an abstract H100."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas import paged_attention as pa
from pallax.kernels_pallas.paged_attention import (BlockSizes, paged_attention,
                                                   paged_attention_reference)


def make_case(seed, *, q_lens, kv_lens, heads=4, kv_heads=2, head_dim=32, page_size=16,
              pad_tokens=0, pad_seqs=0, dtype=jnp.float32, kv_dtype=None, spare_pages=3):
    """Random ragged batch; sequences beyond len(q_lens) are padding (num_seqs < S)."""
    rng = np.random.default_rng(seed)
    n_live = len(q_lens)
    s = n_live + pad_seqs
    q_lens = list(q_lens) + [0] * pad_seqs
    kv_lens = list(kv_lens) + [0] * pad_seqs
    max_pages = max(1, max(-(-kv // page_size) for kv in kv_lens))
    n_pages = s * max_pages + spare_pages
    perm = rng.permutation(n_pages)
    page_table = perm[: s * max_pages].reshape(s, max_pages)       # arbitrary, distinct pages
    query_start = np.concatenate([[0], np.cumsum(q_lens)])
    t = int(query_start[-1]) + pad_tokens
    shape = (n_pages, page_size, kv_heads, head_dim)
    q = rng.standard_normal((t, heads, head_dim)).astype(np.float32)
    case = dict(q=jnp.asarray(q, dtype), page_table=jnp.asarray(page_table, jnp.int32),
                query_start=jnp.asarray(query_start, jnp.int32),
                kv_lens=jnp.asarray(kv_lens, jnp.int32),
                num_seqs=jnp.asarray(n_live, jnp.int32))
    if kv_dtype == jnp.int8:
        for name in "kv":
            case[f"{name}_pages"] = jnp.asarray(rng.integers(-127, 128, shape), jnp.int8)
            case[f"{name}_scales"] = jnp.asarray(rng.uniform(0.002, 0.02, shape[:3]), jnp.float32)
    else:
        for name in "kv":
            case[f"{name}_pages"] = jnp.asarray(rng.standard_normal(shape), kv_dtype or dtype)
    return case


def call(fn, case, **kw):
    return fn(case["q"], case["k_pages"], case["v_pages"], case["page_table"],
              case["query_start"], case["kv_lens"], case["num_seqs"],
              k_scales=case.get("k_scales"), v_scales=case.get("v_scales"), **kw)


def dense_numpy(case):
    """Float64: contiguous K/V per sequence from its page table, per-token causal softmax."""
    q = np.asarray(case["q"], np.float64)
    k = np.asarray(case["k_pages"].astype(jnp.float32), np.float64)
    v = np.asarray(case["v_pages"].astype(jnp.float32), np.float64)
    if "k_scales" in case:
        k = k * np.asarray(case["k_scales"], np.float64)[..., None]
        v = v * np.asarray(case["v_scales"], np.float64)[..., None]
    t, h, d = q.shape
    kvh = k.shape[2]
    out = np.zeros_like(q)
    qs, kv_lens = np.asarray(case["query_start"]), np.asarray(case["kv_lens"])
    for s in range(int(case["num_seqs"])):
        kv = int(kv_lens[s])
        ks = k[np.asarray(case["page_table"])[s]].reshape(-1, kvh, d)[:kv]
        vs = v[np.asarray(case["page_table"])[s]].reshape(-1, kvh, d)[:kv]
        q_len = qs[s + 1] - qs[s]
        for i in range(q_len):
            pos = kv - q_len + i
            for head in range(h):
                kh = head // (h // kvh)
                logits = ks[: pos + 1, kh] @ q[qs[s] + i, head] / math.sqrt(d)
                p = np.exp(logits - logits.max())
                out[qs[s] + i, head] = (p / p.sum()) @ vs[: pos + 1, kh]
    return out


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite output"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("heads,kv_heads,page_size,kv_dtype", [
    (4, 4, 16, None), (8, 2, 8, None), (8, 1, 32, None), (8, 2, 16, jnp.int8),
])
def test_reference_matches_dense_numpy(heads, kv_heads, page_size, kv_dtype):
    case = make_case(1, q_lens=[1, 5, 3, 1], kv_lens=[7, 40, 19, 33], heads=heads,
                     kv_heads=kv_heads, page_size=page_size, pad_tokens=3, pad_seqs=1,
                     kv_dtype=kv_dtype)
    out = call(paged_attention_reference, case)
    assert rel_err(out, dense_numpy(case)) < 1e-5
    n_real = int(case["query_start"][int(case["num_seqs"])])
    assert np.all(np.asarray(out[n_real:]) == 0)


def test_reference_matches_dot_product_attention_for_decode():
    case = make_case(2, q_lens=[1, 1, 1], kv_lens=[16, 9, 30], heads=8, kv_heads=2)
    out = call(paged_attention_reference, case)
    for s, kv in enumerate([16, 9, 30]):
        pt = case["page_table"][s]
        k = case["k_pages"][pt].reshape(-1, 2, 32)[:kv][None]
        v = case["v_pages"][pt].reshape(-1, 2, 32)[:kv][None]
        want = jax.nn.dot_product_attention(case["q"][s][None, None], k, v)[0, 0]
        assert rel_err(out[s], want) < 1e-5


KERNEL_CASES = {
    # name: (make_case kwargs, BlockSizes, dtype tolerance)
    "mixed_f32_gqa4_splits": (dict(q_lens=[1, 4, 1, 9], kv_lens=[5, 37, 64, 20], heads=8,
                                   kv_heads=2, pad_tokens=2),
                              BlockSizes(block_kv=16, kv_splits=3), 1e-5),
    "mixed_f32_gqa1_page8_blockq": (dict(q_lens=[3, 1, 6], kv_lens=[3, 22, 45], heads=2,
                                         kv_heads=2, page_size=8),
                                    BlockSizes(block_q=4, block_kv=16), 1e-5),
    "decode_bf16_gqa8_padded": (dict(q_lens=[1, 1, 1], kv_lens=[70, 1, 33], heads=8,
                                     kv_heads=1, page_size=32, pad_seqs=2, pad_tokens=2,
                                     dtype=jnp.bfloat16),
                                BlockSizes(block_kv=32, kv_splits=2), 2e-2),
    "verify_bf16_gqa4_odd_page": (dict(q_lens=[5, 5], kv_lens=[29, 13], heads=8, kv_heads=2,
                                       page_size=12, dtype=jnp.bfloat16),
                                  BlockSizes(block_kv=16), 2e-2),
    "int8_gqa4_mixed": (dict(q_lens=[1, 6, 1], kv_lens=[50, 24, 7], heads=8, kv_heads=2,
                             kv_dtype=jnp.int8, pad_tokens=1, pad_seqs=1),
                        BlockSizes(block_kv=16, kv_splits=2), 1e-5),
    "int8_bf16_decode_default_blocks": (dict(q_lens=[1, 1], kv_lens=[90, 17], heads=4,
                                             kv_heads=1, kv_dtype=jnp.int8,
                                             dtype=jnp.bfloat16),
                                        None, 2e-2),
    # Split decode (block_q 1) through the combine kernel: kv 3 and 17 leave splits empty.
    "decode_bf16_gqa4_splits_empty": (dict(q_lens=[1, 1, 1, 1], kv_lens=[100, 3, 64, 17],
                                           heads=8, kv_heads=2, pad_seqs=2, pad_tokens=2,
                                           dtype=jnp.bfloat16),
                                      BlockSizes(block_kv=16, kv_splits=4), 2e-2),
    "decode_f32_gqa7_splits5": (dict(q_lens=[1, 1, 1], kv_lens=[45, 80, 9], heads=14,
                                     kv_heads=2, pad_seqs=1, pad_tokens=1),
                                BlockSizes(block_kv=16, kv_splits=5), 1e-5),
    "decode_int8_gqa4_splits": (dict(q_lens=[1, 1], kv_lens=[70, 5], heads=8, kv_heads=2,
                                     kv_dtype=jnp.int8, pad_seqs=1, pad_tokens=1),
                                BlockSizes(block_kv=16, kv_splits=4), 1e-5),
    "verify_f32_gqa7_blockq2_splits": (dict(q_lens=[3, 1, 5], kv_lens=[30, 50, 12], heads=14,
                                            kv_heads=2, pad_tokens=2),
                                       BlockSizes(block_q=2, block_kv=16, kv_splits=3), 1e-5),
}


@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_kernel_matches_reference(name):
    kwargs, block_sizes, tol = KERNEL_CASES[name]
    case = make_case(zlib.crc32(name.encode()), **kwargs)
    out = call(paged_attention, case, block_sizes=block_sizes, interpret=True)
    ref = call(paged_attention_reference, case)
    assert out.shape == case["q"].shape and out.dtype == case["q"].dtype
    assert rel_err(out, ref) < tol
    n_real = int(case["query_start"][int(case["num_seqs"])])
    assert np.all(np.asarray(out[n_real:], np.float32) == 0), "padding rows must be zero"


def combine_numpy(o_part, lse, real_rows):
    """The flash-decoding merge in float64: weights 2^(lse_k - max_k lse_k)."""
    o_part = np.asarray(o_part, np.float64)[:, :, :, :real_rows]
    lse = np.asarray(lse, np.float64)[:, :, :, :real_rows]
    wgt = np.exp2(lse - lse.max(axis=0, keepdims=True))
    return (wgt[..., None] * o_part).sum(axis=0) / wgt.sum(axis=0)[..., None]


@pytest.mark.parametrize("splits,chunk,real_rows", [(6, 4, 3), (8, None, 4), (5, 1, 16)])
def test_combine_kernel(splits, chunk, real_rows):
    rng = np.random.default_rng(splits)
    work, kvh, rows, d = 3, 2, 16, 32
    o_part = rng.standard_normal((splits, work, kvh, rows, d)).astype(np.float32)
    lse = rng.uniform(-6, 6, (splits, work, kvh, rows)).astype(np.float32)
    # What the kernel writes for a split with no keys for a row; those are the last splits
    # (a row sees the kv positions up to its own), some rows have all, one row none.
    n_live = rng.integers(0, splits + 1, (work, kvh, rows))
    n_live[1, 0] = 0
    empty = np.arange(splits)[:, None, None, None] >= n_live[None]
    lse[empty] = pa._MASK
    o_part[empty] = 0
    out = pa._combine(jnp.asarray(o_part), jnp.asarray(lse), real_rows=real_rows,
                      out_dtype=jnp.float32, interpret=True, chunk=chunk)
    assert out.shape == (work, kvh, real_rows, d)
    want = combine_numpy(o_part, lse, real_rows)
    assert rel_err(out, want) < 1e-6
    assert np.all(np.asarray(out[1, 0]) == 0), "a row with every split empty must be zero"


def _top_level_primitives(fn, *args):
    (outer,) = jax.make_jaxpr(fn)(*args).jaxpr.eqns       # the jitted wrapper
    return outer.params["jaxpr"].jaxpr.eqns


@pytest.mark.parametrize("q_lens,block_q", [([1, 1], None), ([5, 1, 3], 4)])
def test_split_attention_is_two_kernels_and_a_reshape(q_lens, block_q):
    """The combine kernel writes [T, H, D]: nothing runs after it but a reshape (a bitcast),
    for decode tokens and for query blocks (speculative verification), also for a group that
    is not a power of two."""
    for heads in (8, 14):
        case = make_case(9, q_lens=q_lens, kv_lens=[70, 20, 33][: len(q_lens)], heads=heads,
                         kv_heads=2, dtype=jnp.bfloat16)
        blocks = BlockSizes(block_q=block_q, block_kv=16, kv_splits=4)
        eqns = _top_level_primitives(
            lambda *a: pa._paged_attention_kernel(
                *a, None, None, sm_scale=0.1, block_sizes=blocks, interpret=False),
            *(case[n] for n in ("q", "k_pages", "v_pages", "page_table", "query_start",
                                "kv_lens", "num_seqs")))
        names = [e.primitive.name for e in eqns]
        calls = [i for i, n in enumerate(names) if n == "pallas_call"]
        assert len(calls) == 2, names
        assert set(names) == {"pallas_call", "reshape"}, names
        assert eqns[calls[1]].params["name"].startswith("paged_attention_combine")


@pytest.mark.parametrize("q_lens,block_q", [([1, 1, 1], 1), ([1, 4, 1, 9], 16), ([5, 5], 2)])
def test_kernels_lower_to_triton(q_lens, block_q, lower_for_h100):
    """Lowers the attention and combine kernels for CUDA against an abstract H100 (no GPU
    needed): Triton accepts the block shapes, indexing and loops of both."""
    case = make_case(10, q_lens=q_lens, kv_lens=[70, 20, 33, 9][: len(q_lens)], heads=14,
                     kv_heads=2, dtype=jnp.bfloat16, head_dim=64)
    args = [case[n] for n in ("q", "k_pages", "v_pages", "page_table", "query_start",
                              "kv_lens", "num_seqs")]
    fn = jax.jit(lambda *a: pa._paged_attention_kernel(
        *a, None, None, sm_scale=0.125, block_sizes=BlockSizes(block_q=block_q, block_kv=16,
                                                                kv_splits=3), interpret=False))
    text = lower_for_h100(fn, *args)
    assert f'name = "paged_attention_bq{block_q}_bkv16_s3"' in text
    assert 'name = "paged_attention_combine_s3"' in text


def test_work_items_bound():
    rng = np.random.default_rng(11)
    for _ in range(200):
        block_q = int(rng.integers(1, 20))
        q_lens = rng.integers(0, 40, int(rng.integers(1, 9)))
        t = int(q_lens.sum()) + int(rng.integers(0, 5))
        need = int(sum(-(-q // block_q) for q in q_lens))
        assert need <= pa._work_items(max(t, 1), len(q_lens), block_q) <= max(t, 1)


def test_default_splits_count_work_items():
    """A one-sequence prefill chunk has T / block_q work items: no kv splits on top."""
    bs = BlockSizes()
    prefill = bs.resolve(num_tokens=512, num_seqs=1, group=4, num_kv_heads=8, max_kv=32768,
                         kv_itemsize=2)
    decode = bs.resolve(num_tokens=1, num_seqs=1, group=4, num_kv_heads=8, max_kv=32768,
                        kv_itemsize=2)
    wide = bs.resolve(num_tokens=64, num_seqs=64, group=4, num_kv_heads=8, max_kv=2048, kv_itemsize=2)
    assert prefill == (16, 64, 1)
    assert decode == (1, 128, 32)  # split kv ranges stream 128 positions per block
    assert wide == (1, 64, 1)
    lone = bs.resolve(num_tokens=2, num_seqs=1, group=7, num_kv_heads=2, max_kv=32768, kv_itemsize=2)
    assert lone[0] == 1  # a token beside a dead padding row (engine.MIN_ROWS) is not a query block


def test_kernel_float8_kv():
    case = make_case(7, q_lens=[2, 1], kv_lens=[21, 40], heads=4, kv_heads=2,
                     kv_dtype=jnp.float8_e4m3fn)
    rng = np.random.default_rng(8)
    for name in "kv":
        case[f"{name}_scales"] = jnp.asarray(rng.uniform(0.5, 2.0, case["k_pages"].shape[:3]),
                                             jnp.float32)
    out = call(paged_attention, case, block_sizes=BlockSizes(block_kv=16), interpret=True)
    assert rel_err(out, dense_numpy(case)) < 1e-5


def test_dispatch_is_honoured(monkeypatch):
    case = make_case(3, q_lens=[1, 2], kv_lens=[9, 17])
    seen = []
    real = pa._paged_attention_kernel

    def spy(*args, **kw):
        seen.append(kw["interpret"])
        return real(*args, **kw)

    monkeypatch.setattr(pa, "_paged_attention_kernel", spy)
    with dispatch.kernel_mode("reference"):
        ref = call(paged_attention, case)
    assert seen == []
    with dispatch.kernel_mode("interpret"):
        out = call(paged_attention, case, block_sizes=BlockSizes(block_kv=16))
    assert seen == [True]
    assert rel_err(out, ref) < 1e-5


def test_bad_inputs_raise():
    case = make_case(4, q_lens=[1, 2], kv_lens=[9, 17])
    bad = dict(case, v_pages=case["v_pages"][:, :8])
    with pytest.raises(ValueError, match="v_pages.shape"):
        call(paged_attention, bad)
    bad = dict(case, q=case["q"][..., :16])
    with pytest.raises(ValueError, match="head_dim"):
        call(paged_attention, bad)
    bad = dict(case, q=case["q"][:, :3])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        call(paged_attention, bad)
    bad = dict(case, query_start=case["query_start"][:2])
    with pytest.raises(ValueError, match="query_start.shape"):
        call(paged_attention, bad)
    bad = dict(case, kv_lens=case["kv_lens"][:1])
    with pytest.raises(ValueError, match="kv_lens.shape"):
        call(paged_attention, bad)
    q8 = make_case(5, q_lens=[1, 2], kv_lens=[9, 17], kv_dtype=jnp.int8)
    with pytest.raises(ValueError, match="need k_scales"):
        call(paged_attention, dict(q8, k_scales=None))
    bad_page = q8["k_scales"][:, :8]   # scales for page_size 8 on a page_size 16 pool
    with pytest.raises(ValueError, match="page_size"):
        call(paged_attention, dict(q8, k_scales=bad_page))
    with pytest.raises(ValueError, match="scales given"):
        call(paged_attention, dict(case, k_scales=q8["k_scales"], v_scales=q8["v_scales"]))
    odd = make_case(6, q_lens=[1], kv_lens=[5], head_dim=24)
    with dispatch.kernel_mode("pallas"):
        with pytest.raises(ValueError, match="power of two"):
            call(paged_attention, odd)


@pytest.mark.parametrize("kw,match", [
    (dict(block_kv=48), "block_kv"), (dict(block_kv=8), "block_kv"),
    (dict(block_q=0), "block_q"), (dict(kv_splits=0), "kv_splits"), (dict(num_warps=3), "num_warps"),
])
def test_block_sizes_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        BlockSizes(**kw)
