"""Where the int4 kernel's partial sums are added, in the engine's batch-1 decode step.

The Hopper int4 kernel leaves each row block's partial sums as its pieces (`PartialSums`). Either XLA
adds them in a fusion of its own (or fused into the add of the residual stream), or the kernel
that reads the product next adds them itself: the residual add + RMSNorm kernel
(`kernels_pallas/residual_norm.py`, after the o and down projections). This bench compiles the
step once per variant, runs the variants alternately (`--reps` runs of `--steps` back-to-back
steps each), checks they give the same greedy tokens, and profiles each (device time by kernel):

- `xla`: XLA adds the partial sums and the residual, then norms (two kernels);
- `norm`: the residual norm kernel (the default; `norm-w8`, `norm-w16`: other num_warps).

Before the steps it checks on the GPU that the kernel gives on the int4 kernel's own partial sums
(Llama-3-8B's o and down shapes) what it gives on their sum. `--bf16` also times the bf16
model's step (the int4 target's baseline). Random weights of `--preset`'s shapes:

    python3 -m pallax.bench.partial_sums --bf16 --out results.jsonl
    python3 -m pallax.bench.partial_sums --plot results.jsonl kernels.png   # a bar a variant
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import append_records, emit, environment, kernel_parts, kernel_profile, stacked_bars

VARIANTS = ("xla", "norm", "norm-w8", "norm-w16")


def check_kernel(records: list) -> None:
    """The kernel on the int4 kernel's partial sums against its reference on their sum."""
    from pallax.kernels_pallas import int4_matmul_mgpu as i4h
    from pallax.kernels_pallas import quant_formats as qf
    from pallax.kernels_pallas import residual_norm as rn

    key = jax.random.split(jax.random.key(0), 4)
    norm = jax.jit(lambda x, y, g: rn.residual_rms_norm(x, y, g, eps=1e-5))
    for k, n in ((4096, 4096), (14336, 4096)):  # o, down
        w = 0.02 * jax.random.normal(key[0], (k, n), jnp.float32)
        packed, scales, _ = qf.quantize_int4(w, 128, symmetric=True)
        words, s = i4h.to_hopper_layout(packed, scales, group_size=128)
        for m in (1, 2, 4, 16):
            a = jax.random.normal(key[1], (m, k), jnp.float32).astype(jnp.bfloat16)
            run = functools.partial(i4h.int4_matmul_mgpu, a, words, s, group_size=128)
            parts, y = run(partial=True), run()
            x = jax.random.normal(key[2], (m, n), jnp.float32).astype(jnp.bfloat16)
            g = (1 + 0.1 * jax.random.normal(key[3], (n,), jnp.float32)).astype(jnp.bfloat16)
            got, want = norm(x, parts, g), rn.residual_rms_norm_reference(x, y, g, eps=1e-5)
            records.append(emit(dict(bench="partial_sums_check", kernel="residual_norm", k=k, n=n, m=m,
                                     sum_equal=bool(jnp.array_equal(parts.sum(), y)),
                                     equal=[bool(jnp.array_equal(a, b)) for a, b in zip(got, want)],
                                     **environment())))


@functools.lru_cache(maxsize=None)
def _originals():
    from pallax.kernels_pallas import residual_norm as rn

    return rn.supported, rn.BlockSizes


def use_variant(variant: str) -> None:
    """Switch the residual norm kernel off (`xla`) or its num_warps (module attributes read at
    trace time); `norm` restores the defaults."""
    from pallax.kernels_pallas import residual_norm as rn

    rn.supported, rn.BlockSizes = _originals()
    if variant == "xla":
        rn.supported = lambda y: False
    elif "-w" in variant:
        rn.BlockSizes = functools.partial(rn.BlockSizes, num_warps=int(variant.split("-w")[1]))


def compiled_steps(llm, variants, context: int, use=None) -> dict:
    """variant -> (the compiled decode program, its arguments, kernels launched), each traced
    after `use(variant)` (default `use_variant`) and the defaults restored with `use(None)`."""
    use = use or (lambda v: use_variant(v or "norm"))
    from pallax.bench.step_anatomy import decode_program, kernel_census
    from pallax.decode.engine import compile_step

    out = {}
    for v in variants:
        use(v)
        compile_step.cache_clear()
        jax.clear_caches()
        step, args = decode_program(llm, context=context)
        compiled = step.lower(*args).compile()
        out[v] = (compiled, list(args), sum(kernel_census(compiled.as_text()).values()))
    use(None)
    return out


def time_steps(model: str, progs: dict, reps: int, steps: int, note: str,
               bench: str = "partial_sums") -> list:
    tokens, times = {}, {v: [] for v in progs}
    for v, (step, args, _) in progs.items():
        args[1], out, args[3] = step(*args)
        tokens[v] = np.asarray(out.tokens).tolist()
    for _ in range(reps):
        for v, (step, args, _) in progs.items():
            for _ in range(10):
                args[1], out, args[3] = step(*args)
            jax.block_until_ready(out.tokens)
            t0 = time.perf_counter()
            for _ in range(steps):
                args[1], out, args[3] = step(*args)
            jax.block_until_ready(out.tokens)
            times[v].append((time.perf_counter() - t0) / steps * 1e3)
    records, first = [], next(iter(progs))
    for v, (step, args, kernels) in progs.items():
        def run(step=step, args=args):
            args[1], out, args[3] = step(*args)
            jax.block_until_ready(out.tokens)

        prof = kernel_profile(run, 20, top=60)
        records.append(emit(dict(
            bench=bench, model=model, variant=v, step_ms=times[v], kernels=kernels,
            tokens=tokens[v], same_tokens=tokens[v] == tokens[first], busy_us=prof["busy_us"],
            kernels_us=prof["kernels_us"], note=note, **environment())))
    return records


def serving_int4(llm):
    """`llm` quantized to int4 g128 (the head too) in the engine's GPU serving layout."""
    from pallax.decode.scheduler import serving_layout, transposes
    from pallax.model.quantize import quantize

    q = quantize(llm, "int4", group_size=128, quantize_head=True)
    q.params = serving_layout(q.params, transpose=transposes(None))
    return q


# The int4 step's kernels besides the GEMMs, by profile name prefix (XLA's fusions as they are
# named in these programs: the SwiGLU product over gate/up's partial sums, the q/k/v sum).
_PARTS = (("residual_norm", "residual add + norm (2)"), ("loop_multiply_fusion", "SwiGLU over gate/up sums"),
          ("loop_transpose_fusion", "q/k/v sum"), ("decode_attention", "rotate + store + attention"),
          ("paged_attention_combine", "split combine"))


# Readable names of the throwaway variants in bench/results/partial_sums_pieces_h200.jsonl.
_VARIANT_LABELS = {
    ("slots_probe", "base"): "slot table (before)",
    ("slots_probe", "noidx"): "probe: no table anywhere (wrong numbers)",
    ("slots_probe", "noidx_sum"): "probe: no table in XLA's sums",
    ("slots_probe", "noidx_norm"): "probe: no table in the norm kernel",
    ("pieces_ab", "table"): "table rebuilt over the pieces",
    ("pieces_ab", "arith"): "pieces placed by arithmetic (kept)",
}


def plot(records: str, png: str) -> None:
    """The int4 steps' records in `records` (this bench's, or others' shaped like them): a bar
    a variant and run of the kernels around the GEMMs, per layer, stacked by kernel; the step time
    in the label."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pallax.model.config import preset

    bars = []
    for r in map(json.loads, open(records)):
        if "step_ms" in r and r["model"].endswith("int4+head"):
            layers = preset(r["model"].split()[0]).n_layers
            name = _VARIANT_LABELS.get((r["bench"], r["variant"]), f"{r['bench']}: {r['variant']}")
            bars.append((f"{name} ({min(r['step_ms']):.3f} ms, {r['kernels']} kernels)",
                         kernel_parts(r["kernels_us"], _PARTS, 1 / layers)))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(bars) + 1.5))
    stacked_bars(ax, bars, _PARTS, f"the int4 step's kernels besides the GEMMs, a layer ({records.split('/')[-1]})",
                 "us a layer")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=["xla", "norm"], choices=VARIANTS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--bf16", action="store_true", help="also time the bf16 model's step")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--out", help="append the JSON records here")
    ap.add_argument("--plot", nargs=2, metavar=("JSONL", "PNG"), help="only plot committed records into PNG")
    args = ap.parse_args(argv)
    if args.plot:
        plot(*args.plot)
        return

    from pallax.bench.decode import random_llm
    from pallax.decode.scheduler import serving_layout, transposes
    from pallax.model.config import preset

    records: list = []
    if not args.skip_check:
        check_kernel(records)
    llm = random_llm(preset(args.preset))
    q = serving_int4(llm)
    note = (f"the engine's batch-1 decode program (step_anatomy.decode_program), ctx {args.context}, "
            f"random weights; {args.reps} alternating runs of {args.steps} back-to-back steps; "
            "kernel times from a profile of 20 steps")
    records += time_steps(f"{args.preset} random int4+head", compiled_steps(q, args.variants, args.context),
                          args.reps, args.steps, note)
    del q
    if args.bf16:
        llm.params = serving_layout(llm.params, transpose=transposes(None))
        records += time_steps(f"{args.preset} random bf16", compiled_steps(llm, ["norm"], args.context),
                              min(args.reps, 2), args.steps, note)
    for r in records:
        if r["bench"] == "partial_sums":
            us = r["kernels_us"]
            print(f"{r['model']:30s} {r['variant']:9s} {min(r['step_ms']):.3f} ms  {r['kernels']} kernels  "
                  f"residual_norm {us.get('residual_norm', 0):.0f} us a step")
    if args.out:
        append_records(args.out, records)


if __name__ == "__main__":
    main()
