"""A decode step's rotation, K/V write and attention in one kernel, in the engine's batch-1 step.

The engine's pure-decode calls run each layer's attention as `kernels_pallas.decode_attention`
(RoPE of q and k, the store of k and v in the page pool and paged attention in one kernel, the
split combine after it); general batches keep two kernels (`rope_kv_write`, then
`paged_attention`). This bench first checks the two against each other on the GPU at the
preset's head shape (outputs and pools), then compiles the step once per variant, runs the
variants alternately (`--reps` runs of `--steps` back-to-back steps each), checks they give the
same greedy tokens, and profiles each (device time by kernel):

- `fused`: one kernel (the default for pure decode);
- `split`: rotation + write, then attention.

`--formats int4 bf16`: the int4 g128 model (the head too; the target) and the bf16 one (its
baseline). Random weights of `--preset`'s shapes:

    python3 -m pallax.bench.decode_attention --out results.jsonl
    python3 -m pallax.bench.decode_attention --plot bench/results/decode_attention_kernel_h200.jsonl \
        bench/results/decode_attention_h200.jsonl bench/results/decode_attention_h200.png
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import append_records, emit, environment, kernel_parts, stacked_bars
from pallax.bench.partial_sums import compiled_steps, serving_int4, time_steps

VARIANTS = ("fused", "split")


@functools.lru_cache(maxsize=None)
def _default_supported():
    from pallax.decode import engine

    return engine.decode_attention_supported


def use_variant(variant: str | None) -> None:
    """`split` turns the fused kernel off in the engine (a module attribute read at trace time);
    `fused` or None restores it."""
    from pallax.decode import engine

    default = _default_supported()  # read before the first switch replaces it
    if variant not in (None, *VARIANTS):
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    engine.decode_attention_supported = (lambda *a: False) if variant == "split" else default


def check_kernel(config, context: int, records: list, kv_dtype=jnp.bfloat16) -> None:
    """The fused kernel against rope_kv_write + paged_attention at the preset's heads, on the
    GPU: batch 1 beside a padding row, the engine's page size, `context` keys, a `kv_dtype` pool
    (int8 / fp8 with random scales)."""
    from pallax.kernels_pallas.decode_attention import decode_attention
    from pallax.kernels_pallas.paged_attention import paged_attention
    from pallax.kernels_pallas.rope_kv_write import rope_kv_write

    c, page_size = config, 16
    rng = np.random.default_rng(0)
    pages = -(-(context + 1) // page_size)
    kvh, d = c.n_kv_heads, c.head_dim
    shape = (2 * pages + 1, page_size, kvh, d)
    if jnp.dtype(kv_dtype) == jnp.int8:
        pool = [jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) for _ in "kv"]
    else:
        pool = [jnp.asarray(rng.standard_normal(shape), kv_dtype) for _ in "kv"]
    if jnp.dtype(kv_dtype).itemsize == 1:
        pool += [jnp.asarray(rng.uniform(0.01, 0.02, shape[:3]), jnp.float32) for _ in "kv"]
    else:
        pool += [None, None]
    qkv = jnp.asarray(rng.standard_normal((2, c.n_heads + 2 * kvh, d)), jnp.bfloat16)
    angles = rng.uniform(0, 2 * np.pi, (2, d // 2))
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    page_table = jnp.asarray(np.arange(2 * pages).reshape(2, pages), jnp.int32)
    kv_lens = jnp.asarray([context + 1, 0], jnp.int32)
    slots = jnp.asarray([context, -1], jnp.int32)  # sequence 0's pages are 0, 1, ... in order
    num_seqs = jnp.asarray(1, jnp.int32)

    @jax.jit
    def split(qkv, cos, sin, slots, *pool):
        q, *pool = rope_kv_write(qkv, cos, sin, slots, *pool, n_kv_heads=kvh)
        query_start = jnp.asarray([0, 1, 1], jnp.int32)
        k, v, ks, vs = pool
        return paged_attention(q, k, v, page_table, query_start, kv_lens, num_seqs, k_scales=ks,
                               v_scales=vs), *pool

    fused = jax.jit(lambda qkv, cos, sin, slots, *pool: decode_attention(
        qkv, cos, sin, slots, page_table, kv_lens, num_seqs, *pool, n_kv_heads=kvh))
    want, got = split(qkv, cos, sin, slots, *pool), fused(qkv, cos, sin, slots, *pool)
    err = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0].astype(jnp.float32))))
    records.append(emit(dict(
        bench="decode_attention_check", heads=c.n_heads, kv_heads=kvh, head_dim=d, context=context,
        kv_dtype=jnp.dtype(kv_dtype).name, max_abs_diff=err,
        pools_equal=[bool(jnp.array_equal(a, b)) for a, b in zip(got[1:], want[1:]) if a is not None],
        **environment())))


# the kernels of a layer's attention, in the step's profile: (name prefix, label)
_PARTS = (("paged_attention_bq", "attention"), ("decode_attention", "rotate + store + attention"),
          ("rope_kv_write", "rotate + store"), ("paged_attention_combine", "split combine"),
          ("loop_convert_fusion", "q/k/v partial sums (XLA)"), ("loop_transpose_fusion", "q/k/v partial sums (XLA)"))


def plot(kernel_records: str, step_records: str, png: str) -> None:
    """Two panels: per-call device time of the kernel variants alone (`kernel_records`, kernel-only
    profiles) and per-layer time of the attention's kernels in the int4 step (`step_records`,
    this bench's records), each bar stacked by kernel."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernel = [json.loads(line) for line in open(kernel_records)]
    seen, bars = set(), []
    for r in kernel:
        if r["what"] not in seen and not r["variant"].endswith("2"):
            seen.add(r["what"])
            bars.append((r["what"].split(";")[0] + (" (select form)" if "selected" in r["what"] else ""),
                         kernel_parts(r["per_call_us"], _PARTS)))
    step = [json.loads(line) for line in open(step_records)]
    sbars = []
    for r in step:
        if r["bench"] == "decode_attention" and r["model"].endswith("int4+head"):
            label = "two kernels" if r["variant"] == "split" else r.get("kernel_form", r["variant"]).split(";")[0]
            if r["variant"] == "fused" and "gathers" in r.get("kernel_form", ""):
                label += ", + partial sums"
            sbars.append((f"{label} (run {r['run']}, {min(r['step_ms']):.3f} ms)",
                          kernel_parts(r["kernels_us"], _PARTS, 1 / 32)))
    fig, axes = plt.subplots(2, 1, figsize=(12, 9))
    stacked_bars(axes[0], bars, _PARTS, "one call alone (Llama-3-8B heads, batch 1, ctx 1024; H200)", "us a call")
    stacked_bars(axes[1], sbars, _PARTS, "in the Llama-3-8B int4 step, a layer (32 layers)", "us a layer")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--formats", nargs="+", default=["int4", "bf16"], choices=["int4", "bf16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="append the JSON records here")
    ap.add_argument("--plot", nargs=3, metavar=("KERNEL_JSONL", "STEP_JSONL", "PNG"),
                    help="only plot committed records (kernel-only variants, this bench's steps) into PNG")
    args = ap.parse_args(argv)
    if args.plot:
        plot(*args.plot)
        return

    from pallax.bench.decode import random_llm
    from pallax.decode.scheduler import serving_layout, transposes
    from pallax.model.config import preset

    config = preset(args.preset)
    records: list = []
    for kv_dtype in (jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn):
        check_kernel(config, args.context, records, kv_dtype)
    llm = random_llm(config)
    note = (f"the engine's batch-1 decode program (step_anatomy.decode_program), ctx {args.context}, "
            f"random weights; {args.reps} alternating runs of {args.steps} back-to-back steps; "
            "kernel times (us a step) from a profile of 20 steps")
    for fmt in args.formats:
        if fmt == "int4":
            model = serving_int4(llm)
        else:
            model = llm
            model.params = serving_layout(llm.params, transpose=transposes(None))
        progs = compiled_steps(model, args.variants, args.context, use=use_variant)
        records += time_steps(f"{args.preset} random {'int4+head' if fmt == 'int4' else 'bf16'}", progs,
                              args.reps, args.steps, note, bench="decode_attention")
        del model, progs
    for r in records:
        if r["bench"] == "decode_attention":
            print(f"{r['model']:30s} {r['variant']:6s} {min(r['step_ms']):.3f} ms  {r['kernels']} kernels  "
                  f"same tokens: {r['same_tokens']}")
    if args.out:
        append_records(args.out, records)


if __name__ == "__main__":
    main()
