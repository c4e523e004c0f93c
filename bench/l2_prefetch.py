"""The int4 kernel warming L2 for the next int4 call, in the engine's batch-1 decode step.

Each int4 projection of the step is followed by another (q/k/v -> o -> gate/up -> down -> the
next layer's q/k/v ... -> the head). Given the next weight (`linear(..., then=w)`), the kernel's
producer, once it has issued its last copy, prefetches into L2 the first
`int4_matmul_mgpu.PREFETCH_UNITS` units of the next call's CTA of its own index, so that call's
first ring slots come from L2 while this call's last steps and the kernels between run.

This bench compiles the step once per variant `pfN` (N units a CTA; `pf0`: none), runs the
variants alternately (`--reps` runs of `--steps` steps), checks they give the same greedy
tokens, and profiles each (device time by kernel). Random weights of `--preset`'s shapes:

    python3 -m pallax.bench.l2_prefetch --variants pf0 pf1 pf2 --out results.jsonl
"""

from __future__ import annotations

import argparse
import functools

from pallax.bench.common import append_records
from pallax.bench.partial_sums import compiled_steps, serving_int4, time_steps


@functools.lru_cache(maxsize=None)
def _default_units() -> int:
    from pallax.kernels_pallas import int4_matmul_mgpu as i4h

    return i4h.PREFETCH_UNITS


def use_units(variant: str | None) -> None:
    """`pfN`: the kernel prefetches N units a CTA (a module attribute read at trace time); None
    restores the default."""
    from pallax.kernels_pallas import int4_matmul_mgpu as i4h

    default = _default_units()
    if variant is not None and not (variant.startswith("pf") and variant[2:].isdigit()):
        raise ValueError(f"variant {variant!r} must be pfN (N units a CTA; pf0: no prefetch)")
    i4h.PREFETCH_UNITS = default if variant is None else int(variant[2:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=["pf0", "pf1", "pf2"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="append the JSON records here")
    args = ap.parse_args(argv)
    for v in args.variants:
        use_units(v)  # a bad name fails before the model is built
    use_units(None)

    from pallax.bench.decode import random_llm
    from pallax.model.config import preset

    q = serving_int4(random_llm(preset(args.preset)))
    note = (f"the engine's batch-1 decode program (step_anatomy.decode_program), ctx {args.context}, "
            f"random weights; {args.reps} alternating runs of {args.steps} back-to-back steps; "
            "kernel times (us a step) from a profile of 20 steps")
    progs = compiled_steps(q, args.variants, args.context, use=use_units)
    records = time_steps(f"{args.preset} random int4+head", progs, args.reps, args.steps, note,
                         bench="l2_prefetch")
    for r in records:
        print(f"{r['model']:30s} {r['variant']:5s} {min(r['step_ms']):.3f} ms  int4 kernels "
              f"{r['kernels_us'].get('anonymous_mosaic_gpu_kernel', 0):.0f} us a step  "
              f"same tokens: {r['same_tokens']}")
    if args.out:
        append_records(args.out, records)


if __name__ == "__main__":
    main()
