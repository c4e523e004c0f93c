"""Norm + matmul benchmark (one GPU run holds ours and XLA's composition).

    python3 -m pallax.bench.norm_matmul --out $OUT/norm_matmul.jsonl

For the two ops of a decoder layer that `norm_matmul` fuses (norm + q/k/v + bias, norm + gate/up
+ SwiGLU) at the shapes of `--presets` and M = `--m` rows: the device time of `norm_matmul`
(default blocks, and the best of a small sweep) against the same composition compiled by XLA
(`norm_matmul_reference` under jit: its norm and SwiGLU fusions and its GEMM), from a profiler
trace: the sum of the kernels' durations per op, and their count (kernel time leaves out the
gaps between launches, which favours the composition of more kernels). Each timed call runs the
op on `COPIES` weight sets in turn, so that the weights come from HBM as they do in a step. The
whole-step effect is what `bench.step_anatomy` measures with `PALLAX_NORM_MATMUL=0` and `1`.

`--smoke` runs tiny shapes in interpret mode (a CPU check of this script).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from pallax.bench.common import append_records, emit, environment, kernel_profile, table
from pallax.kernels_pallas import dispatch
from pallax.kernels_pallas.norm_matmul import BlockSizes, norm_matmul, norm_matmul_reference
from pallax.model.config import preset

COPIES = 8


def layer_ops(name: str) -> list[tuple[str, int, int, dict]]:
    """(op, K, N, what it fuses) for each op of a layer of preset `name` that `norm_matmul` runs."""
    c = preset(name)
    return [("qkv", c.dim, c.q_dim + 2 * c.kv_dim, dict(bias=c.qkv_bias)),
            ("gate_up", c.dim, 2 * c.ffn_dim, dict(swiglu=True))]


def _inputs(m, k, n, fuses, key):
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    ws = [(0.02 * jax.random.normal(jax.random.fold_in(ks[1], i), (k, n), jnp.float32)).astype(jnp.bfloat16)
          for i in range(COPIES)]
    extra = dict(g=jnp.ones((k,), jnp.bfloat16), swiglu=bool(fuses.get("swiglu")),
                 bias=jax.random.normal(ks[2], (n,), jnp.bfloat16) if fuses.get("bias") else None)
    return x, ws, extra


def _timed(op, x, ws, extra, steps):
    """(device us per op, kernels per op) over COPIES weight sets per call."""
    f = jax.jit(lambda x, ws: [op(x, w) for w in ws])
    jax.block_until_ready(f(x, ws))
    p = kernel_profile(lambda: jax.block_until_ready(f(x, ws)), steps)
    return p["kernel_us_total"] / COPIES, p["kernel_launches"] / COPIES


def sweep(m: int, k: int, n_out: int) -> list[BlockSizes]:
    """The default blocks first, then the tilings that give 16 to 512 programs."""
    out = [BlockSizes.default(m, k, n_out)]
    for bn, bk, stages, warps in itertools.product((16, 32, 64, 128), (64, 128, 256), (3, 4), (4, 8)):
        if n_out % bn or k % bk or not 16 <= n_out // bn <= 512:
            continue
        bs = BlockSizes(block_n=bn, block_k=bk, num_stages=stages, num_warps=warps)
        if bs not in out:
            out.append(bs)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None  # no device kernels in the trace (a CPU smoke run)


def run(args) -> list[dict]:
    records = []
    key = jax.random.key(0)
    for name, m in itertools.product(args.presets, args.m):
        for op, k, n, fuses in layer_ops(name):
            x, ws, extra = _inputs(m, k, n, fuses, key)
            ref = lambda x, w, e=extra: norm_matmul_reference(x, e["g"], w, eps=1e-6, bias=e["bias"],  # noqa: E731
                                                             swiglu=e["swiglu"])
            xla_us, xla_kernels = _timed(ref, x, ws, extra, args.steps)
            want = jax.jit(ref)(x, ws[0]).astype(jnp.float32)
            results = []
            n_out = n // 2 if extra["swiglu"] else n
            for bs in sweep(m, k, n_out)[:1 + args.sweep]:
                ours = lambda x, w, e=extra, bs=bs: norm_matmul(x, e["g"], w, eps=1e-6, bias=e["bias"],  # noqa: E731
                                                                swiglu=e["swiglu"], block_sizes=bs)
                got = jax.jit(ours)(x, ws[0]).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-6))
                us, kernels = _timed(ours, x, ws, extra, args.steps)
                results.append((us, kernels, err, bs))
            default = results[0]
            best = min(results, key=lambda r: r[0])
            mb = k * n * 2 / 1e6
            records.append(emit(dict(
                bench="norm_matmul", preset=name, op=op, m=m, k=k, n=n, weight_MB=mb,
                fuses=",".join(["norm"] + [f for f, v in fuses.items() if v]), xla_us=xla_us, xla_kernels=xla_kernels,
                ours_us=default[0], ours_kernels=default[1], speedup=_ratio(xla_us, default[0]),
                best_us=best[0], best_speedup=_ratio(xla_us, best[0]), best_block_sizes=str(best[3]),
                default_block_sizes=str(default[3]), rel_err=max(r[2] for r in results),
                ours_GBps=_ratio(mb * 1e3, default[0]), **environment())))
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b", "llama3-8b"])
    ap.add_argument("--m", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--sweep", type=int, default=12, help="block tilings tried besides the default")
    ap.add_argument("--steps", type=int, default=5, help="profiled calls per measurement")
    ap.add_argument("--out")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        dispatch.set_mode("interpret")
        args.presets, args.m, args.sweep, args.steps = ["tiny"], [2], 1, 1
    records = run(args)
    if args.out:
        append_records(args.out, records)
    print(table(records, ["preset", "op", "m", "k", "n", "xla_us", "xla_kernels", "ours_us", "speedup",
                          "best_us", "best_speedup", "best_block_sizes", "rel_err"]))


if __name__ == "__main__":
    main()
