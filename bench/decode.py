"""Decode benchmark on a GPU: Llama-3-8B shape, random bf16 weights.

In one run: the HBM copy ceiling; two baselines (the obvious JAX program: layers under
`lax.scan`, a contiguous cache, 128 steps in one `fori_loop`; Hugging Face transformers
`generate` on torch, in a subprocess so the two frameworks do not share GPU memory); our paged
engine at batch 1, 16, 64 with context 1024; and an offline run of 1,000 requests whose prompt
and output lengths come from ShareGPT conversations (EOS ignored: each request generates its
conversation's reply length), reporting output tokens/s, TTFT and TPOT percentiles.

    python -m pallax.bench.decode --out results.json [--requests 1000] [--skip-hf]
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallax.bench.common import emit, environment, hbm_copy_bandwidth, table
from pallax.model.config import preset

CONTEXT = 1024
NEW_TOKENS = 128
DATA = Path(__file__).with_name("data") / "sharegpt_lengths.json"


class _NullStream:
    def push(self, token_id):
        return ""

    def finish(self):
        return ""


class NullTokenizer:
    """Random weights produce meaningless ids: the engine's text side is switched off."""

    eos_ids = frozenset()

    def stream_decoder(self, skip_special_tokens=False):
        return _NullStream()


def random_llm(config, seed=0):
    from pallax.api import LLM
    from pallax.model.decoder import init_params

    params = jax.jit(functools.partial(init_params, config, dtype=jnp.bfloat16))(jax.random.key(seed))
    jax.block_until_ready(params)
    return LLM(config=config, params=params, tokenizer=NullTokenizer(), dtype="bfloat16")


# -- baseline 1: the obvious JAX program -----------------------------------------------------------
def xla_baseline(llm, batch: int) -> dict:
    from pallax.model.attention import DenseCache
    from pallax.model.decoder import forward

    c = llm.config
    S = CONTEXT + NEW_TOKENS

    @jax.jit
    def prefill(params, tokens):
        cache = DenseCache.create(c, batch, S, jnp.bfloat16)
        pos = jnp.broadcast_to(jnp.arange(CONTEXT), (batch, CONTEXT))
        logits, cache = forward(params, tokens, pos, cache, config=c, logit_indices=jnp.full((batch, 1), CONTEXT - 1))
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

    @functools.partial(jax.jit, donate_argnums=(1,))
    def decode(params, cache, tok):
        def body(i, carry):
            tok, cache = carry
            pos = jnp.full((batch, 1), CONTEXT + i, jnp.int32)
            logits, cache = forward(params, tok[:, None], pos, cache, config=c)
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache

        return jax.lax.fori_loop(0, NEW_TOKENS, body, (tok, cache))

    tokens = jax.random.randint(jax.random.key(1), (batch, CONTEXT), 0, c.vocab_size)
    tok, cache = prefill(llm.params, tokens)
    tok, cache = decode(llm.params, cache, tok)  # compile + warm
    jax.block_until_ready(tok)
    tok, cache = prefill(llm.params, tokens)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    tok, cache = decode(llm.params, cache, tok)
    jax.block_until_ready(tok)
    dt = time.perf_counter() - t0
    del cache
    return {"impl": "xla-contiguous", "batch": batch, "ms_per_step": 1e3 * dt / NEW_TOKENS,
            "tok_s": batch * NEW_TOKENS / dt}


# -- baseline 2: Hugging Face transformers on torch ------------------------------------------------
HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
batch, ctx, new = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rope_theta=500000.0, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (batch, ctx), device="cuda")
kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize(); dt = time.perf_counter() - t0
print(json.dumps({"impl": "hf-transformers", "batch": batch, "tok_s": batch * new / dt, "ms_per_step": 1e3 * dt / new}))
"""


def hf_baseline(batch: int, new: int = 64) -> dict:
    r = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(batch), str(CONTEXT), str(new)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"impl": "hf-transformers", "batch": batch, "error": r.stderr.strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- ours ------------------------------------------------------------------------------------------
def make_engine(llm, max_seqs: int, decode_steps: int, num_pages: int | None = None):
    from pallax.decode.scheduler import EngineConfig

    pages = num_pages or (None if jax.default_backend() == "gpu" else 2048)  # a CPU reports no free memory
    engine = llm.engine(EngineConfig(max_seqs=max_seqs, token_budget=2048, decode_steps=decode_steps,
                                     num_pages=pages, memory_fraction=0.8, max_queue=4096,
                                     prefix_caching=False))
    t0 = time.perf_counter()
    engine.warmup()
    return engine, time.perf_counter() - t0


def run_requests(engine, lengths, seed=0):
    """Submit every (prompt_len, output_len) at once; returns per-request timing records."""
    from pallax.decode.requests import Request, SamplingParams

    rng = np.random.default_rng(seed)
    recs = []
    t_start = time.monotonic()
    for i, (p, o) in enumerate(lengths):
        rec = {"prompt": p, "output": o, "arrival": t_start, "first": None, "done": None, "n": 0}

        def cb(out, rec=rec):
            now = time.monotonic()
            rec["n"] += len(out.token_ids)
            if rec["first"] is None and out.token_ids:
                rec["first"] = now
            if out.finished:
                rec["done"] = now
                rec["reason"] = out.finish_reason

        ids = rng.integers(0, engine.vocab_size, p).tolist()
        engine.submit(Request(f"r{i}", ids, SamplingParams(max_tokens=o, ignore_eos=True), arrival=t_start), cb)
        recs.append(rec)
    engine.run_until_idle()
    return recs, time.monotonic() - t_start


def ours_batch(engine, batch: int) -> dict:
    recs, _ = run_requests(engine, [(CONTEXT, NEW_TOKENS)] * batch)
    first = max(r["first"] for r in recs)
    done = max(r["done"] for r in recs)
    # Decode rate once every sequence has its first token (prefill excluded, as in the baselines).
    toks = sum(r["n"] - 1 for r in recs)
    return {"impl": "pallax-paged", "batch": batch, "tok_s": toks / (done - first),
            "ms_per_step": 1e3 * (done - first) / (NEW_TOKENS - 1)}


def offline(engine, n: int) -> dict:
    pairs = json.loads(DATA.read_text())["pairs"][:n]
    recs, wall = run_requests(engine, pairs, seed=1)
    out_tokens = sum(r["n"] for r in recs)
    ttft = np.array([r["first"] - r["arrival"] for r in recs])
    tpot = np.array([(r["done"] - r["first"]) / max(r["n"] - 1, 1) for r in recs if r["n"] > 1])
    pct = lambda a: {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}  # noqa: E731
    return {"impl": "pallax-paged", "case": "offline-sharegpt", "requests": len(recs),
            "output_tokens": out_tokens, "wall_s": wall, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + sum(r["prompt"] for r in recs)) / wall,
            "ttft_s": pct(ttft), "tpot_ms": {k: 1e3 * v for k, v in pct(tpot).items()},
            "finished": sorted({r.get("reason") for r in recs})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-xla", action="store_true", help="no plain-XLA baseline")
    ap.add_argument("--max-seqs", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--preset", default="llama3-8b")
    args = ap.parse_args(argv)
    records = []

    def add(record):  # keep the file current: a run cut short still leaves its numbers
        records.append(emit(record))
        if args.out:
            Path(args.out).write_text(json.dumps(records, indent=1))
    batches = [int(b) for b in args.batches.split(",")]
    hf = [] if args.skip_hf else [hf_baseline(b) for b in batches[:2]]  # before JAX takes the GPU
    env = environment()
    for r in hf:
        add({**env, "case": "decode", "context": CONTEXT, **r})
    bw = hbm_copy_bandwidth(4.0 if jax.default_backend() == "gpu" else 0.1)
    add({**env, "case": "hbm-copy", "GB_s": bw / 1e9})
    config = preset(args.preset)
    config = config.replace(max_seq_len=max(config.max_seq_len, 4096))  # `tiny` (a CPU smoke run)
    llm = random_llm(config)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm.params))
    for b in [] if args.skip_xla else batches:
        r = xla_baseline(llm, b)
        add({**env, "case": "decode", "context": CONTEXT, **r})
    engine, warm_s = make_engine(llm, args.max_seqs, args.decode_steps)
    add({**env, "case": "warmup", "seconds": warm_s, "programs": engine.compiled_programs(),
                         "pages": engine.allocator.num_pages})
    for b in batches:
        r = ours_batch(engine, b)
        if b == 1:
            r["weight_GB_s"] = weight_bytes / (r["ms_per_step"] / 1e3) / 1e9
            r["fraction_of_copy_bw"] = r["weight_GB_s"] * 1e9 / bw
        add({**env, "case": "decode", "context": CONTEXT, **r})
    if args.requests:
        add({**env, **offline(engine, args.requests)})
    add({**env, "case": "compiles-after-warmup", "programs": engine.compiled_programs()})
    rows = [r for r in records if r.get("case") == "decode"]
    print(table(rows, ["impl", "batch", "tok_s", "ms_per_step"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
