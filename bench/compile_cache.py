"""Engine warm-up with JAX's persistent compilation cache: run it twice on one cache directory.

    python3 -m pallax.bench.compile_cache --cache /tmp/compiled --out $OUT/compile_cache.jsonl  # compiles
    python3 -m pallax.bench.compile_cache --cache /tmp/compiled --out $OUT/compile_cache.jsonl  # loads

Each run is a fresh process: it points `pallax.use_compile_cache` at `--cache`, builds an engine
over random weights of `--preset` for each `--weights` format, times `Scheduler.warmup` (every
step program compiled or loaded) and decodes one greedy request. A program loaded from the cache
must give the tokens the compiled one gave, so compare the two runs' `tokens`.
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="the compile cache directory")
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--weights", nargs="+", default=["int4", "bf16"], choices=["int4", "bf16"])
    ap.add_argument("--group", type=int, default=128, help="int4 group size")
    ap.add_argument("--out", default=None, help="append the JSON records here")
    args = ap.parse_args(argv)

    import pallax

    cache = pallax.use_compile_cache(args.cache)  # before anything compiles
    from pallax.bench.common import append_records, emit, environment
    from pallax.bench.decode import make_engine, random_llm
    from pallax.decode.requests import Request, SamplingParams
    from pallax.model.config import preset
    from pallax.model.quantize import quantize

    entries = len(list(cache.glob("*-cache")))
    llm = random_llm(preset(args.preset))
    records = []
    for w in args.weights:
        model = quantize(llm, "int4", group_size=args.group) if w == "int4" else llm
        engine, warm = make_engine(model, max_seqs=4, decode_steps=4, num_pages=256)
        tokens = []
        engine.submit(Request("r", list(range(5, 60)), SamplingParams(max_tokens=24, temperature=0.0)),
                      lambda o: tokens.extend(o.token_ids))
        engine.run_until_idle()
        records.append(emit({**environment(), "bench": "compile_cache", "preset": args.preset, "weights": w,
                             "programs_in_cache_before": entries, "warmup_s": warm, "tokens": tokens}))
        entries = len(list(cache.glob("*-cache")))
        del engine
    if args.out:
        append_records(args.out, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
