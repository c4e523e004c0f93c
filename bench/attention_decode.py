"""Paged decode attention: KV bytes read per second against the HBM copy ceiling.

Cases (H=32, KVH=8, D=128, page_size 16, one query token per sequence, every sequence at the
full context, pages of each sequence a random permutation of the pool):
(B=1, ctx=32768), (B=16, ctx=4096), (B=64, ctx=2048). For each: the Pallas kernel on a bf16 pool,
the same on an int8 pool with per-token-per-head f32 scales, and a baseline in the same run: plain
XLA attention (einsum, softmax, einsum) over a contiguous bf16 cache of the same size. Each
record: KV bytes read (K and V once, scales included), device time, GB/s, and the fraction of
`hbm_copy_bandwidth()` measured in the same run; on a GPU also the time in the call's own kernels
from a profiler trace (`kernel_us`, `frac_copy_kernels`), without the timing loop's per-iteration
work. (For the XLA baseline the two differ the other way: inside the loop XLA hoists its
relayout of the loop-invariant K/V out of the loop, a single call cannot.)

    python3 -m pallax.bench.attention_decode [--sweep] [--out FILE]

`--sweep` also times a grid of block sizes per case (tuning). Before timing, the kernel is
checked against `paged_attention_reference` on the device (decode cases and a ragged mixed one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import device_time, emit, environment, hbm_copy_bandwidth, kernel_profile, table
from pallax.kernels_pallas.paged_attention import (BlockSizes, paged_attention,
                                                   paged_attention_reference)

H, KVH, D, PAGE = 32, 8, 128, 16
SHAPES = ((1, 32768), (16, 4096), (64, 2048))
COLUMNS = ["name", "batch", "ctx", "kv_dtype", "config", "kv_bytes", "time_us", "gbps",
           "frac_copy", "kernel_us", "frac_copy_kernels"]


def decode_inputs(batch, ctx, kv_dtype=jnp.bfloat16, seed=0):
    """q [B, H, D], a pool of exactly B * ctx / PAGE pages, permuted page tables."""
    key = jax.random.key(seed)
    kq, kk, kv, ks, kp = jax.random.split(key, 5)
    max_pages = ctx // PAGE
    pages = batch * max_pages
    shape = (pages, PAGE, KVH, D)
    q = jax.random.normal(kq, (batch, H, D), jnp.bfloat16)
    if kv_dtype == jnp.int8:
        k = jax.random.randint(kk, shape, -127, 128, jnp.int32).astype(jnp.int8)
        v = jax.random.randint(kv, shape, -127, 128, jnp.int32).astype(jnp.int8)
        sk, sv = jax.random.uniform(ks, (2, pages, PAGE, KVH), jnp.float32, 0.002, 0.02)
        scales = dict(k_scales=sk, v_scales=sv)
    else:
        k = jax.random.normal(kk, shape, kv_dtype)
        v = jax.random.normal(kv, shape, kv_dtype)
        scales = {}
    page_table = jax.random.permutation(kp, pages).reshape(batch, max_pages).astype(jnp.int32)
    query_start = jnp.arange(batch + 1, dtype=jnp.int32)
    kv_lens = jnp.full((batch,), ctx, jnp.int32)
    return (q, k, v, page_table, query_start, kv_lens), scales


def kv_bytes(batch, ctx, kv_dtype):
    per_token = KVH * D * jnp.dtype(kv_dtype).itemsize + (KVH * 4 if kv_dtype == jnp.int8 else 0)
    return 2 * batch * ctx * per_token


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_correctness(configs=(None,)) -> list[dict]:
    """Kernel vs reference on the device; raises if any relative error exceeds 1e-2."""
    records = []
    for batch, ctx in SHAPES:
        for kv_dtype in (jnp.bfloat16, jnp.int8):
            args, scales = decode_inputs(batch, ctx // 4, kv_dtype, seed=batch)
            ref = paged_attention_reference(*args, **scales)
            for bs in configs:
                out = paged_attention(*args, **scales, block_sizes=bs)
                records.append(dict(check="decode", batch=batch, ctx=ctx // 4,
                                    kv_dtype=jnp.dtype(kv_dtype).name, config=str(bs),
                                    rel_err=rel_err(out, ref)))
    # A ragged step: decode, verification (k+1 = 5) and a prefill chunk, padded batch, GQA 4.
    rng = np.random.default_rng(0)
    q_lens, kv_lens = [1, 5, 1, 37, 5, 0], [300, 64, 1, 37, 999, 0]
    s, max_pages = len(q_lens), 64
    pages = s * max_pages
    qs = np.concatenate([[0], np.cumsum(q_lens)])
    t = int(qs[-1]) + 3
    page_table = jnp.asarray(rng.permutation(pages).reshape(s, max_pages), jnp.int32)
    q = jnp.asarray(rng.standard_normal((t, H, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((pages, PAGE, KVH, D)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((pages, PAGE, KVH, D)), jnp.bfloat16)
    args = (q, k, v, page_table, jnp.asarray(qs, jnp.int32), jnp.asarray(kv_lens, jnp.int32),
            jnp.int32(s - 1))
    ref = paged_attention_reference(*args)
    for bs in (None, BlockSizes(block_q=1), BlockSizes(block_q=4, kv_splits=4),
               BlockSizes(block_kv=128, kv_splits=2)):
        out = paged_attention(*args, block_sizes=bs)
        pad_ok = bool(jnp.all(out[int(qs[-1]):] == 0))
        records.append(dict(check="ragged", config=str(bs), rel_err=rel_err(out, ref),
                            padding_zero=pad_ok))
    bad = [r for r in records if not r["rel_err"] < 1e-2 or r.get("padding_zero") is False]
    for r in records:
        emit(r)
    if bad:
        raise AssertionError(f"kernel differs from reference: {bad}")
    return records


def _dense_decode(q, k, v, lens):
    """Plain XLA: q [B, H, D], contiguous k/v [B, L, KVH, D], lens [B]."""
    b, _, d = q.shape
    qg = q.reshape(b, KVH, H // KVH, d)
    s = jnp.einsum("bkgd,blkd->bkgl", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    mask = jnp.arange(k.shape[1])[None, :] < lens[:, None]
    p = jax.nn.softmax(jnp.where(mask[:, None, None, :], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgl,blkd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(b, H, d).astype(q.dtype)


def _record(name, batch, ctx, kv_dtype, config, nbytes, seconds, copy_bw, env, busy=None):
    gbps = nbytes / seconds / 1e9
    rec = dict(env, name=name, batch=batch, ctx=ctx, kv_dtype=jnp.dtype(kv_dtype).name,
               config=config, kv_bytes=nbytes, time_us=seconds * 1e6, gbps=gbps,
               frac_copy=gbps * 1e9 / copy_bw, copy_gbps=copy_bw / 1e9)
    if busy is not None:
        rec.update(kernel_us=busy * 1e6, frac_copy_kernels=nbytes / busy / copy_bw)
    return rec


def _paged(scales, bs):
    return jax.jit(lambda *a: paged_attention(*a, **scales, block_sizes=bs))


def _time_kernel(args, scales, bs):
    return device_time(_paged(scales, bs), *args)


def _kernel_time(fn, *args, calls: int = 100) -> float | None:
    """Seconds per call that the device spends in the call's kernels (profiler trace: the union
    of their intervals), without the timing loop's own per-iteration work, which `device_time`
    counts (a few microseconds: next to a 50 us call, several percent). None off a GPU."""
    if jax.default_backend() != "gpu":
        return None
    jax.block_until_ready(fn(*args))
    return kernel_profile(lambda: jax.block_until_ready(fn(*args)), calls)["busy_us"] * 1e-6


def cases(block_sizes: BlockSizes | None = None, copy_bw: float | None = None) -> list[dict]:
    """One record per (shape, implementation): the HBM copy, paged bf16, paged int8, XLA dense."""
    env = environment()
    copy_bw = copy_bw or hbm_copy_bandwidth()
    records = [dict(env, name="hbm_copy", gbps=copy_bw / 1e9, frac_copy=1.0)]
    config = str(block_sizes or BlockSizes())
    for batch, ctx in SHAPES:
        for kv_dtype in (jnp.bfloat16, jnp.int8):
            args, scales = decode_inputs(batch, ctx, kv_dtype)
            fn = _paged(scales, block_sizes)
            t, busy = device_time(fn, *args), _kernel_time(fn, *args)
            records.append(_record("paged_pallas", batch, ctx, kv_dtype, config,
                                   kv_bytes(batch, ctx, kv_dtype), t, copy_bw, env, busy))
            del args, scales
        kq, kk, kv = jax.random.split(jax.random.key(1), 3)
        q = jax.random.normal(kq, (batch, H, D), jnp.bfloat16)
        k = jax.random.normal(kk, (batch, ctx, KVH, D), jnp.bfloat16)
        v = jax.random.normal(kv, (batch, ctx, KVH, D), jnp.bfloat16)
        lens = jnp.full((batch,), ctx, jnp.int32)
        dense = jax.jit(_dense_decode)
        t, busy = device_time(dense, q, k, v, lens), _kernel_time(dense, q, k, v, lens)
        records.append(_record("dense_xla", batch, ctx, jnp.bfloat16, "einsum-softmax-einsum",
                               kv_bytes(batch, ctx, jnp.bfloat16), t, copy_bw, env, busy))
        del k, v
    return records


def sweep(copy_bw: float) -> list[dict]:
    """Time a grid of block sizes (B=1 bf16 over kv splits; int8 at every batch)."""
    env = environment()
    grid = [(1, 32768, jnp.bfloat16, splits, bkv, warps, stages)
            for splits in (24, 32, 48, 64)
            for bkv, warps, stages in ((64, 4, 2), (128, 4, 2), (128, 8, 2), (128, 4, 3))]
    grid += [(b, c, jnp.int8, None, bkv, 4, stages) for b, c in SHAPES
             for bkv, stages in ((64, 2), (128, 2), (128, 3))]
    out, inputs = [], {}
    for batch, ctx, kv_dtype, splits, block_kv, warps, stages in grid:
        if (batch, kv_dtype) not in inputs:
            inputs.clear()
            inputs[batch, kv_dtype] = decode_inputs(batch, ctx, kv_dtype)
        args, scales = inputs[batch, kv_dtype]
        bs = BlockSizes(block_kv=block_kv, kv_splits=splits, num_warps=warps, num_stages=stages)
        try:
            t = _time_kernel(args, scales, bs)
        except Exception as e:  # a config Triton cannot compile: note and go on
            print(f"# {bs}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        out.append(_record("sweep", batch, ctx, kv_dtype, str(bs),
                           kv_bytes(batch, ctx, kv_dtype), t, copy_bw, env))
    inputs.clear()
    print(table(out, COLUMNS), flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    checks = check_correctness()
    copy_bw = hbm_copy_bandwidth()
    swept = sweep(copy_bw) if ns.sweep else []
    records = cases(copy_bw=copy_bw)
    for r in records:
        emit(r)
    print(table(records, COLUMNS))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(dict(environment=environment(), checks=checks, cases=records,
                           sweep=swept), f, indent=1, default=str)


if __name__ == "__main__":
    main()
