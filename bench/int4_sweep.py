"""Tilings of the Hopper int4 kernel on one decoder layer's shapes, against a plain read.

    python3 -m pallax.bench.int4_sweep --preset llama3-8b --m 2 --out $OUT/int4_sweep.jsonl

For each projection of the preset's layer (q/k/v and gate/up fused, as the engine serves them)
and each tiling that applies, the device time of `int4_matmul_mgpu` (its partial-sum fixup
included), against two baselines in the same run: the bf16 XLA dot on the same shape, and an
XLA reduction over the packed words (a plain read of the same bytes, though XLA's reduction
does not reach full bandwidth: on an H200 the kernel beat it on gate/up). Each timed call reads
enough weight copies that they cannot sit in L2. `--only-direct` times the default tiling
against `direct_tilings` alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from pallax.bench.common import append_records, device_time, emit, environment, table
from pallax.bench.matmul import _summed
from pallax.kernels_pallas import int4_matmul_mgpu as i4h
from pallax.kernels_pallas.quant_formats import quantize_int4
from pallax.model.config import preset

GROUP = 128
L2_CLEAR_BYTES = 160 << 20  # each timed call reads at least this much weight data

TILINGS = [
    i4h.BlockSizes(),
    i4h.BlockSizes(num_stages=6),
    i4h.BlockSizes(num_stages=8),
    i4h.BlockSizes(consumers=4),
    i4h.BlockSizes(num_stages=6, consumers=4),
    i4h.BlockSizes(consumers=1),
    i4h.BlockSizes(consumers=1, num_stages=8),
    i4h.BlockSizes(tile_k=512, num_stages=3),
    i4h.BlockSizes(tile_k=512, num_stages=4),
    i4h.BlockSizes(tile_k=512, num_stages=4, consumers=4),
    i4h.BlockSizes(ctas=264, num_stages=4),
    i4h.BlockSizes(ctas=264, num_stages=3, consumers=1),
    i4h.BlockSizes(ctas=396, num_stages=3, consumers=1),
    i4h.BlockSizes(tile_k=128, num_stages=8),
]


def direct_tilings(n: int) -> list:
    """Tilings that give each CTA one whole row block over the full K (no partial sums to add):
    N / rows CTAs. Measured slower than stream-K on every Llama-3-8B projection."""
    out = []
    for consumers in (1, 2):
        for tile_k, stages in ((256, 4), (256, 8), (512, 4), (512, 6)):
            bs = i4h.BlockSizes(tile_k=tile_k, num_stages=stages, consumers=consumers)
            out.append(dataclasses.replace(bs, ctas=n // bs.rows))
    return out


def layer_shapes(cfg) -> dict[str, tuple[int, int]]:
    """`[K, N]` of each projection of one layer, as the engine serves them (fused q/k/v, gate/up)."""
    d, f = cfg.dim, cfg.ffn_dim
    return {"qkv": (d, cfg.q_dim + 2 * cfg.kv_dim), "o": (cfg.q_dim, d), "gate_up": (d, 2 * f), "down": (f, d)}


def projections(cfg, ops=None):
    """`(op, K, N, copies)` for each projection of `cfg`'s layer (`layer_shapes`; only `ops` if
    given), with how many weight copies a timed call reads so that they cannot sit in L2."""
    for op, (k, n) in layer_shapes(cfg).items():
        if not ops or op in ops:
            yield op, k, n, max(2, -(-L2_CLEAR_BYTES // (k * n // 2)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--m", type=int, nargs="+", default=[2])
    ap.add_argument("--ops", nargs="+", default=None, help="which projections (default: all)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--out", default="int4_sweep.jsonl")
    ap.add_argument("--only-direct", action="store_true",
                    help="the default tiling against the ones with a row block a CTA (direct_tilings)")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    env = environment()
    cfg = preset(args.preset)
    records = []
    key = jax.random.key(0)
    for op, k, n, copies in projections(cfg, args.ops):
        packed_bytes = k * n // 2
        ws_bf16, ws_h, ws_words = [], [], []
        for _ in range(copies):
            key, sub = jax.random.split(key)
            w = (jax.random.normal(sub, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
            p, s, _ = quantize_int4(w, GROUP)
            words, scales = i4h.to_hopper_layout(p, s, group_size=GROUP)
            ws_h += [words, scales]
            ws_words.append(words)
            ws_bf16.append(w)
        for m in args.m:
            key, sub = jax.random.split(key)
            x = jax.random.normal(sub, (m, k), jnp.bfloat16)
            base = {**env, "preset": args.preset, "op": op, "k": k, "n": n, "m": m, "copies": copies}
            t_read = device_time(_summed(lambda x, w: jnp.sum(w, axis=(0, 1, 2)).astype(jnp.float32)[:1]
                                         + x[0, 0].astype(jnp.float32), copies), x, *ws_words) / copies
            records.append(emit({**base, "kind": "read-words", "us": t_read * 1e6,
                                 "GBps": packed_bytes / t_read / 1e9}))
            t_bf16 = device_time(_summed(lambda x, w: jnp.dot(x, w), copies), x, *ws_bf16) / copies
            records.append(emit({**base, "kind": "bf16-xla", "us": t_bf16 * 1e6,
                                 "GBps": k * n * 2 / t_bf16 / 1e9}))
            for bs in [i4h.BlockSizes()] + direct_tilings(n) if args.only_direct else TILINGS:
                if time.time() > deadline:
                    break
                if not i4h.applies(m, k, n, GROUP, bs):
                    continue
                fn = lambda x, w, s, bs=bs: i4h.int4_matmul_mgpu(x, w, s, group_size=GROUP, blocks=bs)  # noqa: E731
                try:
                    t = device_time(_summed(fn, copies), x, *ws_h) / copies
                except Exception as e:  # a tiling that fails to compile must not end the sweep
                    records.append(emit({**base, "kind": "int4-hopper", "blocks": repr(bs),
                                         "error": f"{type(e).__name__}: {str(e)[:200]}"}))
                    continue
                records.append(emit({**base, "kind": "int4-hopper", "blocks": repr(bs), "us": t * 1e6,
                                     "GBps": packed_bytes / t / 1e9, "vs_read": t_read / t,
                                     "vs_bf16": t_bf16 / t}))
    append_records(args.out, records)
    print(table([r for r in records if "us" in r], ["op", "m", "kind", "blocks", "us", "GBps"]))


if __name__ == "__main__":
    main()
