"""The paged engine and scheduler on SmolLM2 (float32) against the reference greedy outputs, under
every scheduling situation: alone, concurrent, arriving mid-flight, prefix-cache hits, forced
preemption, forced chunked prefill; plus stop conditions, cancellation, deadlines, int8 KV,
compilation and bad input. After every test every KV page is free."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from pallax.decode.requests import QueueFull, Request, RequestError, SamplingParams
from pallax.decode.scheduler import EngineConfig


def _run(engine, prompts, params=None, ids=None, **kw):
    """Submit all, drive to idle, return the list of outputs per request."""
    params = params or SamplingParams(max_tokens=32)
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(Request(f"{ids or 'r'}-{i}", list(p), params, **kw), outs[i].append)
    engine.run_until_idle()
    return outs


def _tokens(outs):
    return [t for o in outs for t in o.token_ids]


def _assert_all_free(engine):
    s = engine.stats()
    assert s["pages_in_use"] == 0 and s["running"] == 0 and s["waiting"] == 0, s


# Small shapes (two token buckets, one decode batch bucket: a warm-up compiles six programs) on
# stacked layers (`smollm_stacked`): the scheduling tests below that need an engine of their own
THREADED = EngineConfig(max_seqs=2, token_budget=16, num_pages=64, decode_steps=4, unstack_layers=False)


@pytest.fixture(scope="module")
def engine(smollm_f32):
    # the library's own engine (without drafts): the step programs compiled here are the ones
    # `generate` runs in other test files (JAX's persistent cache)
    from pallax import api

    e = smollm_f32.engine(dataclasses.replace(api._default_engine_config(), max_draft_tokens=0))
    yield e
    _assert_all_free(e)


def test_engine_serves_the_fused_layout(engine, smollm_f32):
    from pallax.model.quantize import PROJECTIONS, stacked

    layers = smollm_f32.params["layers"]  # the engine holds the LLM's parameters in its layout
    assert isinstance(layers, list) and all("wqkv" in p and "w_gate_up" in p and "wq" not in p for p in layers)
    assert set(PROJECTIONS) <= set(stacked(smollm_f32.params)["layers"])  # what quantize and save read


def test_concurrent(engine, reference):
    """All cases at once (each alone runs in tests/test_model.py through `generate`)."""
    cases = reference["cases"]
    outs = _run(engine, [c["input_ids"] for c in cases])
    for case, o in zip(cases, outs):
        assert _tokens(o) == case["greedy_ids"]
        assert o[-1].finished and o[-1].finish_reason == ("stop" if len(case["greedy_ids"]) < 32 else "length")
        assert o[-1].usage.completion_tokens == len(case["greedy_ids"])
        assert o[-1].usage.prompt_tokens == len(case["input_ids"])
    _assert_all_free(engine)


def test_arrivals_mid_flight(engine, reference):
    cases = reference["cases"]
    outs = [[] for _ in cases]
    engine.submit(Request("m-0", cases[0]["input_ids"], SamplingParams(max_tokens=32)), outs[0].append)
    for i, case in enumerate(cases[1:], 1):
        for _ in range(2):
            engine.iterate()
        engine.submit(Request(f"m-{i}", case["input_ids"], SamplingParams(max_tokens=32)), outs[i].append)
    engine.run_until_idle()
    for case, o in zip(cases, outs):
        assert _tokens(o) == case["greedy_ids"]
    _assert_all_free(engine)


def test_prefix_cache_hits(engine, smollm_f32, reference):
    e = engine
    tok = smollm_f32.tokenizer
    chats = [c for c in reference["cases"] if c["kind"] == "chat"]
    first = _run(e, [chats[0]["input_ids"]])[0]
    assert _tokens(first) == chats[0]["greedy_ids"]
    # The default system prompt's pages are now cached: the same chat again hits them.
    again = _run(e, [chats[0]["input_ids"]], ids="again")[0]
    assert _tokens(again) == chats[0]["greedy_ids"]
    assert again[-1].usage.cached_prompt_tokens >= 32
    # A different question behind the same system prompt shares its leading pages.
    other = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the boiling point of water at sea level? Answer briefly."}]))
    out = _run(e, [other], ids="other")[0]
    assert out[-1].usage.cached_prompt_tokens >= 16
    assert _tokens(out) == smollm_f32.generate(other, max_tokens=32)[0].token_ids
    assert e.stats()["prefix_hit_rate"] > 0
    _assert_all_free(e)


def test_preemption_with_tiny_pool(smollm_stacked, reference):
    # 14 pages of 16 tokens cannot hold all six sequences at once: later ones are preempted and
    # recomputed, and every output is still exact.
    e = smollm_stacked.engine(EngineConfig(max_seqs=6, token_budget=64, num_pages=14, decode_steps=1,
                                           prefix_caching=False, unstack_layers=False))
    cases = reference["cases"]
    outs = _run(e, [c["input_ids"] for c in cases])
    assert e.stats()["preemptions"] > 0
    for case, o in zip(cases, outs):
        assert _tokens(o) == case["greedy_ids"]
    _assert_all_free(e)


def test_chunked_prefill_small_budget(smollm_stacked, reference):
    # THREADED's pool and decode programs; prompts of up to 41 tokens in chunks of 8
    e = smollm_stacked.engine(dataclasses.replace(THREADED, token_budget=8))
    cases = reference["cases"]
    outs = _run(e, [c["input_ids"] for c in cases])
    for case, o in zip(cases, outs):
        assert _tokens(o) == case["greedy_ids"]
    _assert_all_free(e)


def test_one_sequence_engine_runs_two_rows(smollm_stacked, reference):
    """max_seqs=1: every program still runs MIN_ROWS rows (the second dead), outputs exact."""
    from pallax.decode.engine import MIN_ROWS

    cfg = dataclasses.replace(THREADED, max_seqs=1)  # THREADED's programs
    assert min(cfg.seq_buckets()) == min(cfg.token_buckets()) == MIN_ROWS == 2
    e = smollm_stacked.engine(cfg)
    cases = reference["cases"][:2]
    outs = _run(e, [c["input_ids"] for c in cases])
    for case, o in zip(cases, outs):
        assert _tokens(o) == case["greedy_ids"]
    _assert_all_free(e)


def test_stop_strings_tokens_and_max_tokens(engine, reference, smollm_f32):
    case = reference["cases"][3]  # "1, 2, 3, 4, 5," -> " 6, 7, 8, ..."
    full = smollm_f32.tokenizer.decode(case["greedy_ids"])
    o = _run(engine, [case["input_ids"]], SamplingParams(max_tokens=32, stop=(" 9,",)))[0]
    text = "".join(x.text for x in o)
    assert o[-1].finish_reason == "stop" and text == full[: full.index(" 9,")]
    o = _run(engine, [case["input_ids"]], SamplingParams(max_tokens=32, stop_token_ids=(40,)))[0]
    assert _tokens(o) == case["greedy_ids"][: case["greedy_ids"].index(40) + 1]
    assert o[-1].finish_reason == "stop"
    o = _run(engine, [case["input_ids"]], SamplingParams(max_tokens=5))[0]
    assert _tokens(o) == case["greedy_ids"][:5] and o[-1].finish_reason == "length"
    _assert_all_free(engine)


def test_logprobs(engine, reference, smollm_f32):
    case = reference["cases"][0]
    o = _run(engine, [case["input_ids"]], SamplingParams(max_tokens=3, logprobs=5))[0]
    lps = [lp for x in o for lp in x.logprobs]
    assert [lp.token_id for lp in lps] == case["greedy_ids"][:3]
    # The first generated token's logprob equals the model's own log-softmax at the prompt end.
    logits = smollm_f32.logits(case["input_ids"])[-1]
    from pallax.api import log_softmax

    ref = log_softmax(logits)
    assert lps[0].logprob == pytest.approx(ref[case["greedy_ids"][0]], abs=1e-4)
    assert [i for i, _ in lps[0].top] == list(np.argsort(-ref)[:5])
    # A plain greedy row batched with one that asks for alternatives runs in the full program
    # (the other serves batches of plain greedy rows only): its tokens are the same.
    outs = [[], []]
    engine.submit(Request("lp-a", case["input_ids"], SamplingParams(max_tokens=3, logprobs=2)), outs[0].append)
    other = reference["cases"][1]
    engine.submit(Request("lp-b", other["input_ids"], SamplingParams(max_tokens=32)), outs[1].append)
    engine.run_until_idle()
    assert _tokens(outs[0]) == case["greedy_ids"][:3]
    assert _tokens(outs[1]) == other["greedy_ids"]
    _assert_all_free(engine)


def test_sampling_reproducible_regardless_of_batch(engine, reference):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=11)
    alone = _tokens(_run(engine, [reference["cases"][2]["input_ids"]], p)[0])
    mixed = _run(engine, [c["input_ids"] for c in reference["cases"]], p, ids="mix")
    assert _tokens(mixed[2]) == alone
    other_seed = _tokens(_run(engine, [reference["cases"][2]["input_ids"]],
                              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=12), ids="s")[0])
    assert other_seed != alone
    pen = _tokens(_run(engine, [reference["cases"][3]["input_ids"]],
                       SamplingParams(max_tokens=12, repetition_penalty=1.5), ids="pen")[0])
    assert pen != reference["cases"][3]["greedy_ids"][:12]  # the counting pattern is penalized away
    _assert_all_free(engine)


def test_cancel_and_deadline_free_pages_at_once(engine, reference):
    outs = {k: [] for k in ("a", "b", "c")}
    ids = reference["cases"][2]["input_ids"]
    engine.submit(Request("a", ids, SamplingParams(max_tokens=200, ignore_eos=True)), outs["a"].append)
    engine.submit(Request("b", ids, SamplingParams(max_tokens=200, ignore_eos=True),
                          deadline=time.monotonic() + 0.5), outs["b"].append)
    engine.submit(Request("c", ids, SamplingParams(max_tokens=8)), outs["c"].append)
    for _ in range(3):
        engine.iterate()
    assert engine.stats()["pages_in_use"] > 0
    assert engine.cancel("a") and not engine.cancel("nope")
    engine.run_until_idle()
    assert outs["a"][-1].finish_reason == "cancelled"
    assert outs["b"][-1].finish_reason == "deadline"
    assert _tokens(outs["c"]) == reference["cases"][2]["greedy_ids"][:8]
    _assert_all_free(engine)


def test_int8_kv_cache(engine, smollm_stacked, reference):
    """int8 KV (per token, per head scales): chosen-token log-probabilities stay within 0.15 nats
    of the float32 cache on the reference prompts (measured max about 0.05), greedy mostly equal.
    (The int8 engine runs stacked layers, which compile faster; the float32 one is the fixture's.)"""
    e = smollm_stacked.engine(EngineConfig(max_seqs=8, token_budget=128, num_pages=128, kv_dtype="int8",
                                           unstack_layers=False))
    cases = reference["cases"]
    p = SamplingParams(max_tokens=8, logprobs=1)
    quant = _run(e, [c["input_ids"] for c in cases], p, ids="q8")
    full = _run(engine, [c["input_ids"] for c in cases], p, ids="f32")
    diffs, same = [], 0
    for qo, fo in zip(quant, full):
        q = [lp for x in qo for lp in x.logprobs]
        f = [lp for x in fo for lp in x.logprobs]
        same += [lp.token_id for lp in q] == [lp.token_id for lp in f]
        for a, b in zip(q, f):  # compare only while both followed the same tokens
            if a.token_id != b.token_id:
                break
            diffs.append(abs(a.logprob - b.logprob))
    print(f"int8 KV: max |dlogprob| {max(diffs):.4f}, greedy equal on {same}/{len(cases)}")
    assert max(diffs) < 0.15 and same >= len(cases) - 1
    _assert_all_free(e)


def test_transposed_projections_serve_the_reference_outputs(smollm_f32, reference):
    """EngineConfig(transposed_projections=True): SmolLM2's projections (all under the size limit)
    are served stored [N, K], and greedy decoding still gives the reference tokens."""
    import copy

    import jax

    from pallax.model.linear import TransposedWeight

    llm = copy.copy(smollm_f32)  # the shared model keeps its own layout
    e = llm.engine(EngineConfig(max_seqs=4, token_budget=64, num_pages=96, transposed_projections=True))
    assert all(isinstance(p[w], TransposedWeight) for p in llm.params["layers"] for w in ("wqkv", "wo", "w_down"))
    kept = jax.tree.leaves(smollm_f32.params, is_leaf=lambda w: isinstance(w, TransposedWeight))
    assert not any(isinstance(w, TransposedWeight) for w in kept)
    cases = reference["cases"]
    outs = _run(e, [c["input_ids"] for c in cases])
    for case, o in zip(cases, outs):
        assert _tokens(o) == case["greedy_ids"]
    _assert_all_free(e)


def test_no_compilation_after_warmup(smollm_stacked, reference):
    e = smollm_stacked.engine(THREADED)  # test_threaded_loop's warm-up then finds every program compiled
    before = e.compiled_programs()  # step programs are shared by engines of the same model
    e.warmup()
    n = e.compiled_programs()
    # at most every token bucket, plus the multi-step decode program for every decode batch bucket,
    # each in two variants (plain greedy rows only, and full sampling)
    assert 0 < n - before <= 2 * (len(e.buckets) + len(e.cfg.seq_buckets()))
    _run(e, [c["input_ids"] for c in reference["cases"]], SamplingParams(max_tokens=20))
    _run(e, [reference["cases"][1]["input_ids"]], SamplingParams(max_tokens=5, temperature=0.5, logprobs=3))
    assert e.compiled_programs() == n
    _assert_all_free(e)


def test_bad_input_rejected_before_allocation(engine, smollm_f32):
    def bad(field, **kw):
        prompt = kw.pop("prompt", [1, 2, 3])
        with pytest.raises(RequestError) as err:
            engine.submit(Request("bad", prompt, SamplingParams(**kw)), lambda o: None)
        assert err.value.field == field, err.value
        _assert_all_free(engine)

    bad("prompt", prompt=[])
    bad("prompt", prompt=[5] * smollm_f32.config.max_seq_len)
    bad("prompt", prompt=[smollm_f32.config.vocab_size])
    bad("max_tokens", max_tokens=0)
    bad("top_p", top_p=0.0)
    bad("top_p", top_p=1.5)
    bad("temperature", temperature=float("nan"))
    bad("temperature", temperature="0.5")
    bad("stop_token_ids", stop_token_ids=(10**7,))
    small = smollm_f32.engine(EngineConfig(max_seqs=2, token_budget=16, num_pages=4))
    with pytest.raises(RequestError, match="pool has 4"):
        small.submit(Request("big", [5] * 100, SamplingParams()), lambda o: None)
    with pytest.raises(RequestError, match="adapter"):
        engine.submit(Request("x", [1, 2], SamplingParams(), adapter="nope"), lambda o: None)
    q = smollm_f32.engine(EngineConfig(max_seqs=1, token_budget=16, num_pages=8, max_queue=2))
    q.submit(Request("q1", [1, 2], SamplingParams()), lambda o: None)
    q.submit(Request("q2", [1, 2], SamplingParams()), lambda o: None)
    with pytest.raises(QueueFull):
        q.submit(Request("q3", [1, 2], SamplingParams()), lambda o: None)
    assert q.cancel("q1") and q.cancel("q2")
    q.run_until_idle()
    _assert_all_free(q)


def test_threaded_loop(smollm_stacked, reference):
    import threading

    e = smollm_stacked.engine(THREADED)
    e.start()
    try:
        assert e.ready
        done = threading.Event()
        outs = []

        def cb(o):
            outs.append(o)
            if o.finished:
                done.set()

        case = reference["cases"][0]
        e.submit(Request("t", case["input_ids"], SamplingParams(max_tokens=32)), cb)
        assert done.wait(120)
        assert _tokens(outs) == case["greedy_ids"]
    finally:
        e.stop()
    _assert_all_free(e)


def test_start_without_warmup_is_ready_at_once(smollm_stacked, reference, monkeypatch):
    """EngineConfig(warmup=False): `start()` runs no warm-up and the engine is ready; programs are
    compiled as requests need them (test_rpc_real's server runs so from cold), outputs exact."""
    import threading

    e = smollm_stacked.engine(dataclasses.replace(THREADED, warmup=False))
    monkeypatch.setattr(e, "warmup", lambda: pytest.fail("start() ran the warm-up"))
    e.start()
    try:
        assert e.ready
        done, outs = threading.Event(), []
        case = reference["cases"][1]
        e.submit(Request("lazy", case["input_ids"], SamplingParams(max_tokens=8)),
                 lambda o: (outs.append(o), o.finished and done.set()))
        assert done.wait(120)
        assert _tokens(outs) == case["greedy_ids"][:8]
    finally:
        e.stop()
    _assert_all_free(e)


def test_with_engine_runs_generate_on_its_config(smollm_stacked, reference):
    """`LLM.with_engine(config)`: `generate` and `stream` run on an engine of that config (here
    THREADED's, stacked layers, so the weights are shared as they are); an engine that serves
    another layout converts the new LLM's weights, not the original's; a config that is not an
    EngineConfig is refused."""
    llm = smollm_stacked.with_engine(THREADED)
    assert llm.engine().cfg is THREADED and llm.engine() is llm.engine()
    assert llm.params is smollm_stacked.params
    served = smollm_stacked.with_engine(EngineConfig(max_seqs=1, token_budget=16, num_pages=4))  # runs nothing
    assert isinstance(served.params["layers"], list) and not isinstance(smollm_stacked.params["layers"], list)
    case = reference["cases"][2]
    assert llm.generate(case["input_ids"], max_tokens=10)[0].token_ids == case["greedy_ids"][:10]
    assert [d.token_id for d in llm.stream(case["input_ids"], max_tokens=4)] == case["greedy_ids"][:4]
    _assert_all_free(llm.engine())
    with pytest.raises(TypeError, match="EngineConfig"):
        smollm_stacked.with_engine({"max_seqs": 2})
