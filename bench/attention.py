"""Attention benchmarks on one GPU: flash-attention prefill (forward, backward) and paged decode.

    python3 -m pallax.bench.attention --out $OUT/attention.json [--only prefill|decode] [--sweep small|full]

Prefill case: B=4, T=S=4096, H=32, KVH=8, D=128, bf16, causal. Our Pallas kernel (several
`BlockSizes`, the best reported) against `jax.nn.dot_product_attention(implementation="cudnn")` and
`implementation="xla"`, all in the same run. FLOPs: causal forward = 4*B*H*T*S*D / 2 (two matmuls of
2*T*S*D, half the score matrix masked); backward = 2.5x forward (five matmuls against two). Device time
per call comes from `bench.common.device_time` (loops inside one jit). The backward time is
time(forward + backward through jax.vjp) - time(forward); dk and dv are tied into the timed output
(device_time keeps only the first output alive, and XLA would otherwise drop the dk/dv kernels).
A float16 forward comparison of ours and JAX's Hopper (Mosaic GPU) kernel follows.

Before timing, each implementation is checked against `flash_attention_reference` (f32) on the first
batch row: relative L2 error of the output and of dq/dk/dv.

Decode cases come from `bench/attention_decode.py` (`cases() -> list[dict]`) when it imports.
Every record is printed as one JSON line; all are written as a list to `--out`; a table ends the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import device_time, emit, environment, table
from pallax.kernels_pallas.flash_attention import (
    BlockSizes, flash_attention, flash_attention_reference)
from pallax.kernels_pallas.flash_attention_mgpu import BlockSizes as MgpuBlocks
from pallax.kernels_pallas.flash_attention_mgpu import applies as mgpu_applies
from pallax.kernels_pallas.flash_attention_mgpu_bwd import BwdBlockSizes as MgpuBwdBlocks
from pallax.kernels_pallas.flash_attention_mgpu_bwd import applies as mgpu_bwd_applies

FLOP_NOTE = "causal fwd = 4*B*H*T*S*D/2; bwd = 2.5 x fwd; bwd time = t(fwd+bwd) - t(fwd)"

# Triton forward: (block_q, block_k, num_warps, num_stages)
FWD_SWEEP = {
    "small": [(128, 128, 8, 3), (128, 64, 8, 3)],
    "full": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
             (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3)],
    "bwd": [(128, 128, 8, 3)],
}
# Hopper (Mosaic GPU) forward: (block_kv, num_stages)
MGPU_SWEEP = {
    "small": [(128, 2), (64, 2), (64, 4)],
    "full": [(128, 2), (64, 2), (64, 3), (64, 4), (256, 2)],
    "bwd": [(128, 2)],
}
# Hopper (Mosaic GPU) dk/dv kernel beside the Triton dq kernel: num_stages
MGPU_BWD_SWEEP = {"small": [2], "full": [2, 3], "bwd": [2, 3, 2]}
# (block_q_dq, block_k_dq, block_q_dkv, block_k_dkv, warps_dq, stages_dq, warps_dkv, stages_dkv)
BWD_SWEEP = {
    "small": [(64, 64, 64, 64, 4, 2, 4, 2), (64, 64, 64, 128, 4, 2, 8, 2),
              (128, 64, 64, 64, 8, 2, 4, 2), (64, 64, 64, 64, 4, 3, 4, 2),
              (64, 64, 64, 64, 4, 2, 4, 3)],
    "full": [(64, 64, 64, 64, 4, 2, 4, 2), (64, 64, 64, 128, 4, 2, 8, 2),
             (64, 64, 64, 128, 4, 2, 8, 3), (64, 64, 128, 64, 4, 2, 8, 2),
             (128, 64, 64, 64, 8, 2, 4, 2), (128, 64, 64, 64, 8, 3, 4, 2),
             (64, 128, 64, 64, 4, 2, 4, 2), (64, 64, 64, 64, 4, 3, 4, 2),
             (64, 64, 64, 64, 4, 2, 4, 3), (32, 64, 64, 64, 4, 2, 4, 2),
             (64, 64, 32, 64, 4, 2, 4, 2)],
}
# Backward tuning: the leading configs of "full", the first repeated last (drift).
BWD_SWEEP["bwd"] = [(64, 64, 64, 64, 4, 2, 4, 2), (128, 64, 64, 64, 8, 3, 4, 2),
                    (128, 64, 64, 64, 4, 3, 4, 2), (128, 32, 64, 64, 8, 3, 4, 2),
                    (128, 64, 64, 64, 8, 3, 4, 2), (64, 64, 64, 64, 4, 2, 4, 2)]


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ours(bs: BlockSizes):
    """Our causal flash attention with these block sizes, as a function of (q, k, v)."""
    return lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=bs)


def _check(fn, q, k, v, do, ref, grads=True):
    """Relative errors (out, dq, dk, dv; nan where not asked) of fn against the f32 reference on
    batch row 0."""
    args = (q[:1], k[:1], v[:1])
    ref_out, ref_grads = ref
    if not grads:
        err = _rel(fn(*args), ref_out)
        return [err] + [float("nan")] * 3, not np.isfinite(err)
    out, vjp = jax.vjp(fn, *args)
    grads = vjp(do[:1])
    errs = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
    bad = any(not np.isfinite(e) for e in errs)
    return errs, bad


def prefill_cases(sweep: str = "small", shape=(4, 4096, 32, 8, 128)) -> list[dict]:
    B, T, H, KVH, D = shape
    S = T
    dtype = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, H, D), dtype)
    k = jax.random.normal(keys[1], (B, S, KVH, D), dtype)
    v = jax.random.normal(keys[2], (B, S, KVH, D), dtype)
    do = jax.random.normal(keys[3], (B, T, H, D), dtype)
    fwd_flops = 4 * B * H * T * S * D / 2
    bwd_flops = 2.5 * fwd_flops
    base = dict(case="prefill", B=B, T=T, S=S, H=H, KVH=KVH, D=D, dtype="bfloat16", causal=True,
                flop_count=FLOP_NOTE, **environment())

    ref_fn = lambda q, k, v: flash_attention_reference(q, k, v, causal=True)  # noqa: E731
    ref_out, ref_vjp = jax.vjp(ref_fn, q[:1], k[:1], v[:1])
    ref = (ref_out, ref_vjp(do[:1]))
    del ref_vjp

    def measure(name, config, fn, fwd=True, bwd=True, fwd_ms=None):
        recs = []
        try:
            errs, bad = _check(fn, q, k, v, do, ref, grads=bwd)
            err = dict(err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3], nonfinite=bad)
            t_fwd = device_time(fn, q, k, v) if fwd or fwd_ms is None else fwd_ms / 1e3
            if fwd:
                recs.append(emit(dict(base, impl=name, config=config, direction="fwd",
                                      ms=t_fwd * 1e3, tflops=fwd_flops / t_fwd / 1e12, **err)))
            if bwd:
                def both(q, k, v, do):
                    # device_time keeps only the first output alive: tie dk and dv to dq so XLA
                    # cannot drop the kernels that produce them.
                    dq, dk, dv = jax.vjp(fn, q, k, v)[1](do)
                    return dq.at[0, 0, 0, 0].add(dk[0, 0, 0, 0] + dv[0, 0, 0, 0])

                t_both = device_time(both, q, k, v, do)
                t_bwd = max(t_both - t_fwd, 1e-9)
                recs.append(emit(dict(base, impl=name, config=config, direction="bwd",
                                      ms=t_bwd * 1e3, fwd_bwd_ms=t_both * 1e3,
                                      tflops=bwd_flops / t_bwd / 1e12, **err)))
        except Exception as e:  # one failing variant must not lose the others
            traceback.print_exc()
            recs.append(emit(dict(base, impl=name, config=config, direction="error",
                                  error=f"{type(e).__name__}: {e}"[:500])))
        return recs

    records = []
    for impl in ("cudnn",) if sweep == "bwd" else ("cudnn", "xla"):
        fn = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, implementation=impl)
        records += measure(f"jax.nn.{impl}", "", fn)

    # Forward sweep (forward only): the Triton kernel, then the Hopper kernel.
    best_fwd = None

    def consider(bs, recs):
        nonlocal best_fwd
        records.extend(recs)
        for r in recs:
            if r["direction"] == "fwd" and not r["nonfinite"] and r["err_out"] < 2e-2:
                if best_fwd is None or r["ms"] < best_fwd[1]["ms"]:
                    best_fwd = (bs, r)

    for bq, bk, w, st in FWD_SWEEP[sweep]:
        bs = BlockSizes(block_q=bq, block_k=bk, num_warps=w, num_stages=st, fwd_impl="triton")
        consider(bs, measure("pallas_triton", f"fwd bq={bq} bk={bk} w={w} s={st}", _ours(bs),
                             bwd=False))
    for bkv, st in MGPU_SWEEP[sweep]:
        bs = BlockSizes(fwd_impl="mgpu", mgpu=MgpuBlocks(block_kv=bkv, num_stages=st))
        if not mgpu_applies(q, k, causal=True, has_segments=False, blocks=bs.mgpu):
            continue  # flash_attention would run the Triton forward: not this kernel's number
        consider(bs, measure("pallas_mgpu", f"fwd bkv={bkv} stages={st}", _ours(bs), bwd=False))
    fwd_bs = best_fwd[0] if best_fwd else BlockSizes()

    # Backward on top of the best forward: bwd = t(fwd + bwd) - t(best fwd). The Hopper dk/dv
    # kernel (beside the Triton dq kernel), then the Triton kernels' sweep.
    fwd_ms = best_fwd[1]["ms"] if best_fwd else None
    for st in MGPU_BWD_SWEEP[sweep]:
        bs = dataclasses.replace(fwd_bs, bwd_impl="mgpu", mgpu_bwd=MgpuBwdBlocks(num_stages=st))
        if mgpu_bwd_applies(q, k, causal=True, has_segments=False, blocks=bs.mgpu_bwd):
            records += measure("pallas_mgpu", f"bwd dkv stages={st}", _ours(bs), fwd=False,
                               fwd_ms=fwd_ms)
    for bq, bk, bq2, bk2, w, st, w2, st2 in BWD_SWEEP[sweep]:
        bs = dataclasses.replace(
            fwd_bs, block_q_dq=bq, block_k_dq=bk, block_q_dkv=bq2, block_k_dkv=bk2,
            num_warps_bwd=w, num_stages_bwd=st, num_warps_dkv=w2, num_stages_dkv=st2,
            bwd_impl="triton")
        records += measure(
            "pallas_triton", f"bwd dq=({bq},{bk}) w={w} s={st} dkv=({bq2},{bk2}) w={w2} s={st2}",
            _ours(bs), fwd=False, fwd_ms=fwd_ms)

    # float16: ours (both forwards) and JAX's own Hopper op (its tiles are staged in f16 only).
    if sweep != "bwd":
        q, k, v, do = (x.astype(jnp.float16) for x in (q, k, v, do))
        base["dtype"] = "float16"
        for name, bs in [("pallas_mgpu", dataclasses.replace(fwd_bs, fwd_impl="mgpu")),
                         ("pallas_triton", dataclasses.replace(fwd_bs, fwd_impl="triton"))]:
            records += measure(name, "float16", _ours(bs), bwd=False)
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu
            config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                                 causal=True)
            scale = 1 / np.sqrt(q.shape[-1])
            fn = lambda q, k, v: attention_mgpu.attention(  # noqa: E731
                (q * scale).astype(q.dtype), k, v, config)
            records += measure("jax.pallas.attention_mgpu", "float16", fn, bwd=False)
        except ImportError as e:
            print(f"jax attention_mgpu skipped: {e}", file=sys.stderr)

    # Ratios against cuDNN (bf16), per direction.
    cudnn = {r["direction"]: r["tflops"] for r in records
             if r["impl"] == "jax.nn.cudnn" and "tflops" in r}
    for r in records:
        if r.get("direction") in cudnn and r["dtype"] == "bfloat16":
            r["vs_cudnn"] = r["tflops"] / cudnn[r["direction"]]
    for direction in ("fwd", "bwd"):
        ours = [r for r in records if r["impl"].startswith("pallas") and r.get("direction") == direction
                and r["dtype"] == "bfloat16"
                and not r.get("nonfinite") and r.get("err_out", 1) < 2e-2]
        if ours:
            best = max(ours, key=lambda r: r["tflops"])
            records.append(emit(dict(best, impl=best["impl"] + " (best)")))
    return records


# (B, T, S, H, KVH, D, causal, segments, dtype): the compiled kernel's other paths, checked on GPU.
CHECKS = [
    (2, 300, 300, 8, 2, 64, True, None, jnp.bfloat16),
    (2, 200, 333, 4, 1, 128, False, "pair", jnp.float32),
    (1, 128, 512, 4, 4, 128, True, None, jnp.float16),
    (2, 257, 257, 8, 1, 96, True, "single", jnp.bfloat16),
    # On Hopper: both Mosaic GPU kernels (GQA 8, S > T); non-causal; the Triton forward's lse
    # (T = 64) into the Mosaic GPU dk/dv kernel.
    (2, 256, 384, 8, 1, 128, True, None, jnp.bfloat16),
    (1, 256, 256, 4, 4, 128, False, None, jnp.bfloat16),
    (1, 64, 128, 2, 1, 128, True, None, jnp.bfloat16),
]


def check_cases() -> list[dict]:
    """Compiled kernel vs the f32 reference on small odd shapes: output and gradients."""
    records = []
    for i, (B, T, S, H, KVH, D, causal, seg, dtype) in enumerate(CHECKS):
        ks = jax.random.split(jax.random.key(100 + i), 6)
        q = jax.random.normal(ks[0], (B, T, H, D), dtype)
        k = jax.random.normal(ks[1], (B, S, KVH, D), dtype)
        v = jax.random.normal(ks[2], (B, S, KVH, D), dtype)
        do = jax.random.normal(ks[3], (B, T, H, D), dtype)
        segs = None
        if seg == "single":
            segs = jnp.sort(jax.random.randint(ks[4], (B, T), 0, 4), axis=1)
        elif seg == "pair":
            segs = (jnp.sort(jax.random.randint(ks[4], (B, T), 0, 3), axis=1),
                    jnp.sort(jax.random.randint(ks[5], (B, S), 0, 3), axis=1))
        rec = dict(case="check", B=B, T=T, S=S, H=H, KVH=KVH, D=D, causal=causal,
                   segments=str(seg), dtype=jnp.dtype(dtype).name)
        try:
            f = lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=segs)  # noqa: E731
            r = lambda q, k, v: flash_attention_reference(  # noqa: E731
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                causal=causal, segment_ids=segs)
            out, vjp = jax.vjp(f, q, k, v)
            ref, rvjp = jax.vjp(r, q, k, v)
            g, rg = vjp(do), rvjp(do.astype(jnp.float32))
            rec.update(err_out=_rel(out, ref), err_dq=_rel(g[0], rg[0]), err_dk=_rel(g[1], rg[1]),
                       err_dv=_rel(g[2], rg[2]))
        except Exception as e:
            traceback.print_exc()
            rec.update(error=f"{type(e).__name__}: {e}"[:500])
        records.append(emit(rec))
    return records


def decode_cases() -> list[dict]:
    try:
        from pallax.bench import attention_decode
    except ImportError as e:
        print(f"decode cases skipped: {e}", file=sys.stderr)
        return []
    return [dict(r, case=r.get("case", "decode")) for r in attention_decode.cases()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write all records here (a JSON list)")
    ap.add_argument("--only", choices=("prefill", "decode"), default=None)
    ap.add_argument("--check", action="store_true", help="also check odd shapes against the reference")
    ap.add_argument("--sweep", choices=("small", "full", "bwd"), default="small",
                    help="block-size sweep: small, full, or bwd (backward tuning, cuDNN only)")
    ap.add_argument("--shape", default="4,4096,32,8,128", help="B,T,H,KVH,D of the prefill case")
    args = ap.parse_args(argv)
    records = check_cases() if args.check else []
    if args.only in (None, "prefill"):
        records += prefill_cases(args.sweep, tuple(int(x) for x in args.shape.split(",")))
    if args.only in (None, "decode"):
        records += decode_cases()
    env = environment()
    records = [dict(env, **r) for r in records]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
    prefill = [r for r in records if r.get("case") == "prefill"]
    if prefill:
        print(table(prefill, ["impl", "config", "direction", "ms", "tflops", "vs_cudnn",
                              "err_out", "err_dq", "err_dk", "err_dv"]))
    checks = [r for r in records if r.get("case") == "check"]
    if checks:
        print(table(checks, ["B", "T", "S", "H", "KVH", "D", "causal", "segments", "dtype",
                             "err_out", "err_dq", "err_dk", "err_dv", "error"]))
    other = [r for r in records if r.get("case") not in ("prefill", "check")]
    if other:
        cols = sorted({c for r in other for c in r} - set(env), key=str)
        print(table(other, cols))


if __name__ == "__main__":
    main()
