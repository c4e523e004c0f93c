"""XLA's bf16 projections at decode sizes, by weight layout and row count.

    python3 -m pallax.bench.dense_gemv --presets qwen2.5-0.5b qwen2.5-1.5b llama3-8b --out $OUT/dense_gemv.jsonl

For each projection of a served layer (q/k/v and gate/up fused: `int4_sweep.layer_shapes`), M
token rows of x and each way of writing the product (`VARIANTS`), the device time of one product,
each timed call reading enough weight copies that they cannot sit in L2:

- `dot`: x [M, K] @ W [K, N], the served layout (`linear.dense_matmul` at M = 2, which the engine
  runs at batch 1: `engine.MIN_ROWS`);
- `dot_nk`: the same product from the weight stored transposed, [N, K] (each output channel's
  weights contiguous), contracting K of both;
- `mul_reduce`: the product spelled as a broadcast multiply and an f32 sum over K;
- `split_k4`: K cut into four slices whose partial products are added;
- `served_nk`: what the engine runs for a weight it stores [N, K] (`linear.TransposedWeight`: up to
  two rows one multiply and f32 sum over K, more rows `dot_nk`);
- `rows_nk`: each row its own one-row product against [N, K] (`--m 5 9`, the rows of an n-gram
  verification at k = 4 and 8: whether XLA reads the weight once for all of them).

On an H200 (bench/results/dense_gemv_h200.jsonl) XLA streams the q/k/v and o weights of the
Qwen2.5 models (K <= 1536, N <= 2048) at 0.28-0.59 TB/s in every spelling but one: a single row
against the [N, K] layout, which it compiles to a row reduction at 2.2-2.9 TB/s (Qwen2.5-1.5B
q/k/v: 2.2 us against 15.0 for the served `dot` at M = 2). Two rows against [N, K] are a GEMM
again (14.6 us). Where the served `dot` is fast already (K or N of 4096 and more) the single row
on [N, K] is slower than it (Qwen2.5-1.5B down, 8960x1536: 12.9 against 8.3 us).

These are products timed back to back, each independent of the last. In a decode step each
small product waits on the kernel before it and costs 3-6 us whatever its rows: there the
1.5B q/k/v took 6.2 us a layer as the two-row reduction with the norm fused in, and 4.5 us as
a 9-row GEMM plus 2.8 for the norm (bench/results/verification_rows_h200.jsonl). Check a
layout in a step (`bench.step_anatomy --profile`) before trusting a gap measured here.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from pallax.bench.common import append_records, device_time, emit, environment, table
from pallax.bench.int4_sweep import L2_CLEAR_BYTES, layer_shapes
from pallax.bench.matmul import _summed
from pallax.model.config import preset
from pallax.model.linear import TransposedWeight


def _dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dot_nk(x, wt):
    return jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _mul_reduce(x, w):
    return jnp.sum(x[:, :, None].astype(jnp.float32) * w[None].astype(jnp.float32), axis=1)


def _served_nk(x, wt):
    return TransposedWeight(wt).matmul(x).astype(jnp.float32)


def _rows_nk(x, wt):
    return jnp.concatenate([_dot_nk(x[i:i + 1], wt) for i in range(x.shape[0])])


def _split_k4(x, w):
    (M, K), N = x.shape, w.shape[1]
    parts = jnp.einsum("smk,skn->smn", x.reshape(M, 4, K // 4).transpose(1, 0, 2), w.reshape(4, K // 4, N),
                       preferred_element_type=jnp.float32)
    return parts.sum(0)


# name -> (product of x [M, K] and one weight copy, whether the copy is stored [N, K])
VARIANTS = {"dot": (_dot, False), "dot_nk": (_dot_nk, True), "mul_reduce": (_mul_reduce, False),
            "split_k4": (_split_k4, False), "served_nk": (_served_nk, True), "rows_nk": (_rows_nk, True)}


def summed(product, copies: int):
    """x, *ws -> the sum of `product(x, w)` over the weight copies, in bf16."""
    total = _summed(product, copies)
    return lambda x, *ws: total(x, *ws).astype(jnp.bfloat16)


def run(args) -> list[dict]:
    env = environment()
    records = []
    key = jax.random.key(0)
    for name in args.presets:
        for op, (k, n) in layer_shapes(preset(name)).items():
            if args.ops and op not in args.ops:
                continue
            copies = max(2, -(-args.min_bytes // (k * n * 2)))
            ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16) for i in range(copies)]
            wts = [w.T.copy() for w in ws]
            for m in args.m:
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                want = summed(_dot, copies)(x, *ws)
                for variant in args.variants:
                    product, transposed = VARIANTS[variant]
                    fn = summed(product, copies)
                    weights = wts if transposed else ws
                    err = float(jnp.max(jnp.abs(fn(x, *weights).astype(jnp.float32) - want.astype(jnp.float32)))
                                / jnp.max(jnp.abs(want.astype(jnp.float32))))
                    t = device_time(fn, x, *weights) / copies
                    records.append(emit({**env, "bench": "dense_gemv", "preset": name, "op": op, "k": k, "n": n,
                                         "m": m, "variant": variant, "copies": copies, "us": t * 1e6,
                                         "GBps": k * n * 2 / t / 1e9, "rel_err_vs_dot": err}))
            del ws, wts
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b", "llama3-8b"])
    ap.add_argument("--ops", nargs="+", default=None, help="which projections (default: all)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--min-bytes", type=int, default=L2_CLEAR_BYTES,
                    help="weight bytes each timed call reads at least (copies of the weight)")
    ap.add_argument("--out", help="append the JSON records here")
    args = ap.parse_args(argv)
    records = run(args)
    if args.out:
        append_records(args.out, records)
    print(table(records, ["preset", "op", "m", "variant", "us", "GBps"]))


if __name__ == "__main__":
    main()
