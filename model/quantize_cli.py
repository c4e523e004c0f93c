"""`pallax quantize MODEL --format int4-awq --group 128 --out DIR`: post-training quantization.

The saved directory loads with `pallax.load(DIR)` and runs `pallax generate --model DIR`.
"""

from __future__ import annotations

import sys
import time


def _cmd_quantize(args) -> int:
    from tqdm import tqdm

    import pallax
    from pallax.model.quantize import lee_calibration_texts, quantize, save_quantized

    calibration = None
    if args.format == "int4-awq" and args.calibration == "none":
        print("int4-awq needs calibration text ('lee' or a file)", file=sys.stderr)
        return 2
    if args.format in ("int4-awq", "fp8") and args.calibration != "none":
        if args.calibration == "lee":
            calibration = lee_calibration_texts(args.data_dir)
        else:
            with open(args.calibration, encoding="utf-8") as f:
                calibration = [line for line in f.read().split("\n\n") if line.strip()]
    t0 = time.perf_counter()
    llm = pallax.load(args.model, dtype=args.dtype, progress=sys.stderr.isatty())
    bar = tqdm(desc=f"quantize {args.format}", unit="weight", file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    q = quantize(llm, args.format, group_size=args.group, symmetric=not args.asymmetric,
                 quantize_head=args.quantize_head, calibration=calibration, progress=progress)
    bar.close()
    out = save_quantized(q, args.out)
    print(f"wrote {out} ({args.format}, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def add_quantize_parser(subparsers) -> None:
    q = subparsers.add_parser("quantize", help="post-training quantization of a model into a directory")
    q.add_argument("model", help="model name, .gguf path or HF directory")
    q.add_argument("--format", required=True, choices=["int8", "int4", "int4-awq", "fp8"])
    q.add_argument("--group", type=int, default=128, help="int4 group size along the input axis (32, 64, 128)")
    q.add_argument("--asymmetric", action="store_true", help="int4 with zero points")
    q.add_argument("--quantize-head", action="store_true", help="also quantize the output head")
    q.add_argument("--calibration", default="lee",
                   help="calibration text for int4-awq (scale search) and fp8 (error-compensated rounding): "
                        "'lee' (first half of gensim's Lee corpus), a text file (paragraphs separated by "
                        "blank lines), or 'none' (fp8 rounds to nearest)")
    q.add_argument("--data-dir", default=None, help="where the gensim wheel is kept (default ~/.cache/pallax/data)")
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    q.add_argument("--out", required=True, help="output directory")
    q.set_defaults(func=_cmd_quantize)
