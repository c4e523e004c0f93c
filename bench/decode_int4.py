"""Llama-3-8B-shaped decode at batch 1 through the paged engine: bf16 weights against int4 g128
(random weights, context 1024), one run.

    python -m pallax.bench.decode_int4 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pallax.bench.common import emit, environment
from pallax.bench.decode import make_engine, ours_batch, random_llm
from pallax.model.config import preset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--quantize-head", action="store_true",
                    help="int4 output head too (default: the head stays bf16)")
    args = ap.parse_args(argv)
    from pallax.model.quantize import quantize

    env = environment()
    config = preset(args.preset)
    llm = random_llm(config.replace(max_seq_len=max(config.max_seq_len, 4096)))  # `tiny`: a CPU smoke run
    q = quantize(llm, "int4", group_size=args.group, quantize_head=args.quantize_head)
    records = []
    int4 = f"int4-g{args.group}" + ("+head" if args.quantize_head else "")
    for name, model in ((int4, q), ("bf16", llm)):
        # A pool for one sequence (not a fraction of free memory, which the first engine's
        # buffers may still hold when the second starts).
        engine, warm = make_engine(model, max_seqs=1, decode_steps=8, num_pages=1024)
        records.append(emit({**env, "case": "decode-batch1", "weights": name, "warmup_s": warm, **ours_batch(engine, 1)}))
        del engine
    records.append(emit({**env, "case": "int4-speedup", "ratio": records[0]["tok_s"] / records[1]["tok_s"]}))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
