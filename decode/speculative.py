"""Speculative decoding: drafters propose k tokens, the target verifies them in one ragged step.

A speculative sequence contributes k + 1 query tokens to the target's step: its last known token
and its k drafts d_1..d_k. The target's logits at those k + 1 positions give p_0..p_k, where p_j
is the next-token distribution after d_j. `accept_drafts` then keeps the longest acceptable
prefix d_1..d_a and appends one more token, so every verification yields 1..k+1 tokens:

- greedy rows accept d_{j+1} while it equals argmax p_j, then append argmax p_a (exactly the
  tokens plain greedy decoding produces);
- sampled rows use the rejection rule of Leviathan et al. 2023 ("Fast Inference from Transformers
  via Speculative Decoding", Alg. 1) / Chen et al. 2023: accept d_{j+1} with probability
  min(1, p_j(d) / q_j(d)); at the first rejection sample from norm(max(0, p_j - q_j)); if all k
  are accepted sample the bonus token from p_k. The emitted tokens are distributed exactly as
  the target's. For the n-gram drafter q_j is a point mass on d_{j+1}.

Rejected tokens' K/V stay in the pool but the sequence's computed length is not advanced past
the accepted ones, so the next step overwrites them.

Two drafters share one interface (`propose`, `release`):

- `NgramDrafter`: prompt lookup on the host, the continuation of the most recent earlier
  occurrence of the longest suffix n-gram of the request's own tokens (no model);
- `DraftModelDrafter`: a smaller model with the target's tokenizer and its own paged KV pool. It
  catches up on the tokens it has not seen and then runs k decode steps on device in one jitted
  call of its own (`draft_step`); the drafts come back to the host (one small copy) and the draft
  distributions q stay on device and go straight into the target's verification step.

The scheduler (`decode/scheduler.py`) verifies with `verify_step` and reads every speculative
step back before it builds the next one: the next drafts depend on what was accepted. That host
round trip (building the step, dispatching it, reading it back) costs more than the step itself
at batch 1, so a lone plain-greedy speculative request runs several rounds in one call, read
back once: `ngram_loop` (the lookup on device, `ngram_lookup`, by the host drafter's rule) or
`draft_loop` (k draft-model decode steps, then the target's verification, in the same program).
`ngram_loop` also returns what its next call starts from (history, last token, position, tokens
left), so that call is dispatched before this one is read back and the device does not wait for
the host between calls.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallax.model.config import ModelConfig
from pallax.model.decoder import forward

from .engine import (TOP_LOGPROBS, Packed, PagedCache, apply_repetition_penalty, empty_batch, no_alternatives, step_batch,
                     to_device)
from .kv_cache import PageAllocator, PagePool, create_pool
from .sampling import SamplingArrays, filtered_logits, row_keys, sample


# -- acceptance --------------------------------------------------------------------------------
def accept_drafts(logits, drafts, num_drafts, q, point_mass, sampling: SamplingArrays, seeds, sample_steps,
                  *, residual: bool = True, sampled: bool = True):
    """Verify drafts against the target's logits.

    logits [S, K+1, V]: target logits after the last known token and after each draft;
    drafts [S, K] int32; num_drafts [S] int32 (0..K; 0 is a plain decode row);
    q [S, K, V] draft probabilities, or None when every row's drafts are point masses;
    point_mass [S] bool: rows whose q is a point mass on their drafts (n-gram lookup).
    Token j of a row is sampled with the key of token index sample_steps + j, so a row with no
    drafts samples exactly as the plain engine step does.
    `sampled=False` promises that every row is greedy: the sampling filters (a sort of V logits
    per position) are left out of the program. The host knows and picks the program; a
    `lax.cond` on the device would cost a device-to-host sync per step.
    `residual=False` resamples from p instead of norm(max(0, p - q)) on rejection: the naive,
    biased rule, kept so the distribution test can show that it detects it.

    Returns tokens [S, K+1] (the first `counts` are the emitted ones) and counts [S] in 1..K+1.
    """
    S, K1, V = logits.shape
    K = K1 - 1
    greedy = sampling.temperature <= 0
    j = jnp.arange(K1)[None]
    padded = jnp.concatenate([drafts, jnp.zeros((S, 1), drafts.dtype)], axis=1)

    def emit(ok, last_at):  # ok [S, K] per draft; last_at(a) [S]: the token after the accepted ones
        ok &= jnp.arange(K)[None] < num_drafts[:, None]
        a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [S] accepted drafts
        tokens = jnp.where(j < a[:, None], padded, jnp.where(j == a[:, None], last_at(a)[:, None], 0))
        return tokens.astype(jnp.int32), a + 1

    def all_greedy():
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S, K1]
        return emit(best[:, :K] == drafts, lambda a: best[jnp.arange(S), a])

    def any_sampled():
        per_pos = lambda x: jnp.repeat(x, K1)  # noqa: E731  [S] -> [S * K1]
        flat_sampling = SamplingArrays(*(per_pos(x) for x in (sampling.temperature, sampling.top_k,
                                                               sampling.top_p, sampling.min_p)))
        steps = sample_steps[:, None] + jnp.arange(K1, dtype=sample_steps.dtype)  # [S, K1]
        keys = row_keys(per_pos(seeds), steps.reshape(-1))  # [S * K1]
        flat = logits.reshape(S * K1, V)
        from_p = sample(flat, flat_sampling, keys).reshape(S, K1)  # greedy rows: argmax p_j
        p = jax.nn.softmax(filtered_logits(flat, flat_sampling), axis=-1).reshape(S, K1, V)[:, :K]
        one_hot = jax.nn.one_hot(drafts, V, dtype=p.dtype)  # [S, K, V]
        qq = one_hot if q is None else jnp.where(point_mass[:, None, None], one_hot, q)
        p_d = jnp.take_along_axis(p, drafts[..., None], axis=-1)[..., 0]  # [S, K]
        q_d = jnp.take_along_axis(qq, drafts[..., None], axis=-1)[..., 0]
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1)))(keys).reshape(S, K1)[:, :K]
        ok = jnp.where(greedy[:, None], from_p[:, :K] == drafts, u * q_d < p_d)  # u < p/q, no division
        left = jnp.maximum(p - qq, 0.0) if residual else p
        left = jnp.where(jnp.sum(left, axis=-1, keepdims=True) > 0, left, p)  # p == q: never rejected
        rkeys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys).reshape(S, K1)[:, :K].reshape(-1)
        redrawn = jax.vmap(jax.random.categorical)(rkeys, jnp.log(left).reshape(S * K, V)).reshape(S, K)
        redrawn = jnp.concatenate([redrawn.astype(jnp.int32), from_p[:, K:]], axis=1)  # [S, K1]

        def last_at(a):
            rejected = (a < num_drafts) & ~greedy
            return jnp.where(rejected, redrawn[jnp.arange(S), a], from_p[jnp.arange(S), a])

        return emit(ok, last_at)

    return any_sampled() if sampled else all_greedy()


# -- the target's verification step ------------------------------------------------------------
@struct.dataclass
class SpecInputs:
    """The speculative part of a step, [S] per sequence (host-built)."""

    logit_rows: jax.Array  # [S, K+1] int32: token indices of the last known token and each draft
    drafts: jax.Array  # [S, K] int32
    num_drafts: jax.Array  # [S] int32
    point_mass: jax.Array  # [S] bool: drafts from lookup (q is a point mass)


@struct.dataclass
class VerifyOutput:
    tokens: jax.Array  # [K+1, S] int32; the first counts[s] of column s are emitted
    logprob: jax.Array  # [K+1, S] f32
    top_ids: jax.Array  # [K+1, S, TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [K+1, S, TOP_LOGPROBS] f32
    counts: jax.Array  # [S] int32


def verify_step(params, pool: PagePool, packed: Packed, q, prev_tokens, *, config: ModelConfig, full: bool):
    """One ragged target step whose rows may carry drafts: packed holds the step's buffers and
    `empty_spec`'s; q [S, K, V] or None (see accept_drafts). Rows without drafts (decode, or the
    end of a prefill) sample one token as `engine_step` does; `full=False` as there (every row
    plain greedy: no sampling filters, no alternatives)."""
    fields = packed.unpack()
    spec = SpecInputs(**{f: fields.pop(f) for f in SpecInputs.__dataclass_fields__})
    batch = step_batch(fields)
    tokens = jnp.where(batch.from_prev >= 0, prev_tokens[jnp.maximum(batch.from_prev, 0)], batch.tokens)
    S, K1 = spec.logit_rows.shape
    cache = PagedCache(pool, batch.slots, batch.page_table, batch.query_start, batch.kv_lens, batch.num_seqs)
    logits, cache = forward(params, tokens[None], batch.positions[None], cache, config=config,
                            logit_indices=spec.logit_rows.reshape(1, S * K1))
    # Speculative rows have no repetition penalty (the scheduler refuses the pair), so the window
    # of position 0 is right for every row that uses only position 0.
    logits = apply_repetition_penalty(logits[0], jnp.repeat(batch.recent, K1, axis=0), jnp.repeat(batch.penalty, K1))
    out, counts = accept_drafts(logits.reshape(S, K1, -1), spec.drafts, spec.num_drafts, q, spec.point_mass,
                                batch.sampling, batch.seeds, batch.sample_steps, sampled=full)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [S * K1, V]
    chosen = jnp.take_along_axis(logp, out.reshape(-1, 1), axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS) if full else no_alternatives(S * K1)
    t = lambda x: jnp.swapaxes(x.reshape(S, K1, *x.shape[1:]), 0, 1)  # noqa: E731  [S*K1, ...] -> [K1, S, ...]
    result = VerifyOutput(out.T, t(chosen), t(top_ids.astype(jnp.int32)), t(top_lp), counts)
    return cache.pool, result, prev_tokens


@functools.lru_cache(maxsize=None)
def compile_verify(config: ModelConfig, full: bool):
    return jax.jit(functools.partial(verify_step, config=config, full=full), donate_argnums=(1,))


def empty_spec(S: int, K: int) -> dict[str, np.ndarray]:
    return {"logit_rows": np.zeros((S, K + 1), np.int32), "drafts": np.zeros((S, K), np.int32),
            "num_drafts": np.zeros(S, np.int32), "point_mass": np.ones(S, bool)}


# -- n-gram speculation rounds on device --------------------------------------------------------
def _latest_suffix_match(seq: jax.Array, hist: jax.Array, n_hist: jax.Array, max_n: int, longest: jax.Array,
                         usable: jax.Array, min_n: int = 1):
    """The latest end e in seq (where a continuation starts) of the longest suffix n-gram of hist's
    first n_hist tokens (min_n <= n <= min(max_n, longest)), among the ends where usable [len(seq)]
    holds. Returns e and n (0: no match).

    One pass over seq, which XLA fuses into one reduction: each end scores the run of tokens before
    it that match the suffix, then its position (the longest match, then the latest, wins). A loop
    over n with a scan each cost a reduction apiece, several per round on a 65536-token corpus.
    Token ids are >= 0, so the -1s before seq (and between a corpus's requests) never match."""
    L = seq.shape[0]
    padded = jnp.concatenate([jnp.full(max_n, -1, seq.dtype), seq])
    run, length = jnp.ones(L, bool), jnp.zeros(L, jnp.int32)
    for t in range(1, max_n + 1):  # seq[e - t] against the suffix's t-th token from the end
        before = jax.lax.slice(padded, (max_n - t,), (max_n - t + L,))
        run &= (before == hist[jnp.maximum(n_hist - t, 0)]) & (t <= longest)
        length += run
    # int32 scores: length * (L + 1) + e, with L well under 2**31 / (max_n + 1) (NgramCorpus checks)
    best = jnp.max(jnp.where(usable & (length >= min_n), length * (L + 1) + jnp.arange(L), -1))
    return jnp.where(best >= 0, best % (L + 1), 0), jnp.where(best >= 0, best // (L + 1), 0)


def ngram_lookup(hist: jax.Array, n_hist: jax.Array, k: int, max_n: int = 4, min_n: int = 1):
    """`NgramDrafter.lookup_own` on device: hist [W] int32 whose first n_hist entries are the
    tokens. Returns the continuation [k] of the most recent earlier occurrence of the longest
    suffix n-gram (max_n down to min_n tokens), how many of its k entries are real (0: no match)
    and the n-gram's length."""
    # an occurrence that something follows, before the suffix itself
    start, length = _latest_suffix_match(hist, hist, n_hist, max_n, n_hist - 1, jnp.arange(hist.shape[0]) < n_hist,
                                         min_n)
    drafts = jax.lax.dynamic_slice(jnp.concatenate([hist, jnp.zeros(k, hist.dtype)]), (start,), (k,))
    return drafts, jnp.where(length > 0, jnp.minimum(k, n_hist - start), 0).astype(jnp.int32), length


def corpus_lookup(corpus: jax.Array, hist: jax.Array, n_hist: jax.Array, k: int, max_n: int = 4):
    """`NgramCorpus.lookup` on device: corpus [C] int32 (`NgramCorpus.device`: -1 past the tokens
    and between requests), the request's tokens the first n_hist entries of hist [W]. Returns the
    continuation [k] of the latest occurrence in the corpus of the longest suffix n-gram (max_n
    down to 1 tokens) that a token follows, up to the end of its request, how many of its k
    entries are real (0: no match) and the n-gram's length."""
    # something follows the occurrence, within its request
    start, length = _latest_suffix_match(corpus, hist, n_hist, max_n, n_hist, corpus >= 0)
    cont = jax.lax.dynamic_slice(jnp.concatenate([corpus, jnp.full(k, -1, corpus.dtype)]), (start,), (k,))
    real = jnp.cumprod(cont >= 0)  # up to the end of that request
    return jnp.where(real > 0, cont, 0), jnp.where(length > 0, jnp.sum(real), 0).astype(jnp.int32), length


CORPUS_MARGIN = 2  # the corpus's match wins over the request's own when this much longer (or the only one)


def _corpus_wins(own_n, corpus_n):
    """Whether the corpus's suffix match of corpus_n tokens replaces the request's own of own_n
    (0: none): on HumanEval completions a longer match in other requests predicts better than a
    short one in the request's own tokens."""
    return (corpus_n > 0) & ((own_n == 0) | (corpus_n >= own_n + CORPUS_MARGIN))


def ngram_propose(hist: jax.Array, n_hist: jax.Array, corpus: jax.Array, k: int):
    """`NgramDrafter.lookup` on device: drafts [k] and how many are real, from the request's own
    tokens or the corpus (`_corpus_wins`)."""
    drafts, nd, own_n = ngram_lookup(hist, n_hist, k)
    shared, ns, corpus_n = corpus_lookup(corpus, hist, n_hist, k)
    wins = _corpus_wins(own_n, corpus_n)
    return jnp.where(wins, shared, drafts), jnp.where(wins, ns, nd)


@struct.dataclass
class LoopOutput:
    tokens: jax.Array  # [R, K+1] int32: round r emitted tokens[r, :counts[r]]
    counts: jax.Array  # [R] int32; 0 for rounds not run
    drafted: jax.Array  # [R] int32: drafts verified in each round


def _greedy_rounds(params, pool: PagePool, f: dict, state, propose, advance, *, config: ModelConfig, K: int,
                   rounds: int):
    """The round loop of `ngram_loop` and `draft_loop`: `propose(state, last, pos)` gives drafts
    [K], how many are real, and the drafter's new state; the target verifies them in one step of
    K + 1 query tokens; the longest prefix matching its argmax plus its correction is emitted;
    `advance(state, drafts, emitted [K+1], accepted, count)` updates the drafter. The loop has
    a fixed trip count, `rounds`; the rounds after one that emits a stop token or reaches the
    budget are dead: each round is a `cond` on whether it is live, which on a GPU is evaluated on
    the device (`LOOP_COMPILER_OPTIONS`), so a dead round runs no kernel and the host never waits
    for a predicate. Returns the pool, the state, a LoopOutput, the position of the new last
    token, the new last token, how many tokens the rounds emitted, and whether one of them was a
    stop token."""
    page_table, stop_ids = f["page_table"], f["stop_ids"]
    ps, K1 = pool.page_size, K + 1
    j = jnp.arange(K1)
    out0 = LoopOutput(jnp.zeros((rounds, K1), jnp.int32), jnp.zeros(rounds, jnp.int32), jnp.zeros(rounds, jnp.int32))

    def round_(carry):
        r, pool, state, last, pos, emitted, stopped, out = carry  # a live round (`gated`)
        drafts, nd, state = propose(state, last, pos)
        nd = jnp.clip(jnp.minimum(nd, f["k"]), 0, f["budget"] - emitted - 1)
        tokens = jnp.concatenate([last[None], drafts])  # the last token, then the drafts
        positions = pos + j
        page = page_table[jnp.minimum(positions // ps, page_table.shape[0] - 1)]
        slots = jnp.where(j <= nd, page * ps + positions % ps, -1)
        cache = PagedCache(pool, slots, page_table[None], jnp.stack([0, nd + 1]).astype(jnp.int32),
                           (pos + nd + 1)[None], jnp.int32(1))
        logits, cache = forward(params, tokens[None], positions[None], cache, config=config, logit_indices=j[None])
        best = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)  # [K1]
        ok = (best[:K] == drafts) & (jnp.arange(K) < nd)
        a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))  # accepted drafts
        padded = jnp.concatenate([drafts, jnp.zeros(1, jnp.int32)])
        emit = jnp.where(j < a, padded, jnp.where(j == a, best[a], 0))
        is_stop = (emit[:, None] == stop_ids[None, :]).any(axis=1) & (j <= a)
        first_stop = jnp.min(jnp.where(is_stop, j, K1))
        c = jnp.minimum(a + 1, first_stop + 1)
        state = advance(state, drafts, emit, a, c)
        out = LoopOutput(out.tokens.at[r].set(emit), out.counts.at[r].set(c), out.drafted.at[r].set(nd))
        return r + 1, cache.pool, state, emit[c - 1], pos + c, emitted + c, first_stop < K1, out

    carry = (jnp.int32(0), pool, state, f["last"], f["pos"], jnp.int32(0), jnp.bool_(False), out0)

    def gated(_, c):
        return jax.lax.cond(~c[6] & (c[5] < f["budget"]), round_, lambda c: (c[0] + 1, *c[1:]), c)

    carry = jax.lax.fori_loop(0, rounds, gated, carry)
    _, pool, state, last, pos, emitted, stopped, out = carry
    return pool, state, out, pos, last, emitted, stopped


def ngram_loop(params, pool: PagePool, packed: Packed, carry: dict, corpus: jax.Array, *, config: ModelConfig, K: int,
               rounds: int):
    """Up to `rounds` rounds of greedy n-gram speculation for one sequence without the host
    (`_greedy_rounds`), the drafts looked up in the token history on device, or, when it has no
    match or a much shorter one (`_corpus_wins`), in the corpus of earlier requests' tokens
    (`corpus_lookup`; [1] when there is none).

    packed holds: page_table [max_pages] (pages for every position the rounds may write), k
    (drafts per round, <= K), stop_ids [NS] (-1 padded). carry holds what one call hands the next:
    hist [W] (the last tokens, W - (rounds + 1) * (K + 1) at most, so the new ones fit), n_hist,
    last (hist[n_hist - 1]), pos (the position of the last token, whose K/V is not yet computed)
    and left (tokens the request may still emit; a call emits at most rounds * (K + 1) of them).
    Returns the pool, the LoopOutput and the next call's carry (left 0 after a stop token), so a
    next call can be dispatched before this one is read back (`Scheduler._chain_spec_loop`).

    The call always runs `rounds` rounds; those after a stop token or the budget, all of them
    when the carry has nothing left, are dead: no K/V written, nothing emitted, and on a GPU no
    device work (`_greedy_rounds`; a call with nothing left takes about 1.9 ms, the host's
    launches). On a GPU, XLA reads a while loop's predicate, or a `cond`'s, back to the host
    before it queues what follows, and the call's dispatch waits for it: with a stopping while
    loop, or one `cond` around the call, the next call could only be queued after this one ended,
    and the device idled while the host queued it. With a known trip count and each round's
    `cond` evaluated on the device, nothing waits: the host queues call after call."""
    f = dict(packed.unpack(), last=carry["last"], pos=carry["pos"],
             budget=jnp.minimum(carry["left"], rounds * (K + 1)))

    def propose(state, last, pos):
        hist, n_hist = state
        drafts, nd = ngram_propose(hist, n_hist, corpus, K)
        return drafts, nd, state

    def advance(state, drafts, emit, a, c):
        hist, n_hist = state
        return jax.lax.dynamic_update_slice(hist, emit, (n_hist,)), n_hist + c  # entries past c: never read

    pool, (hist, n_hist), out, pos, last, emitted, stopped = _greedy_rounds(
        params, pool, f, (carry["hist"], carry["n_hist"]), propose, advance, config=config, K=K, rounds=rounds)
    # The history keeps its length: the oldest tokens give way to the new ones (the lookup window).
    W, keep = carry["hist"].shape[0], carry["hist"].shape[0] - (rounds + 1) * (K + 1)
    drop = jnp.maximum(n_hist - keep, 0)
    hist = jax.lax.dynamic_slice(jnp.concatenate([hist, jnp.zeros(W, hist.dtype)]), (drop,), (W,))
    left = jnp.where(stopped, 0, carry["left"] - emitted)
    return pool, out, dict(hist=hist, n_hist=n_hist - drop, last=last, pos=pos, left=left)


def draft_loop(params, pool: PagePool, draft_params, draft_pool: PagePool, packed: Packed, *, config: ModelConfig,
               draft_config: ModelConfig, k: int, rounds: int):
    """Up to `rounds` rounds of greedy draft-model speculation for one sequence without the host
    (`_greedy_rounds`): each round the draft model runs k decode steps in its own pool, then the
    target verifies. The draft's K/V must be computed for every position before `pos` when it
    starts. When a round accepts all k drafts, the last draft was never fed to the draft model:
    the next round's first draft step feeds it along with the new last token (two query tokens).

    packed holds what `ngram_loop`'s does but the history, plus draft_pages [max_pages], and fill
    and unfed: the draft's K/V is computed up to pos - 1, unfed (the token at pos - 1) goes in with
    the first round (a previous call's last round accepted every draft). Returns
    the pools, the LoopOutput and how many positions of the draft's K/V are now computed."""
    f = packed.unpack()
    dpt = f["draft_pages"]
    ps = draft_pool.page_size

    def slot(p, live=True):
        return jnp.where(live, dpt[jnp.minimum(p // ps, dpt.shape[0] - 1)] * ps + p % ps, -1)

    def step(dpool, tokens, positions, live, n, kv_len):  # n query tokens of the draft model
        cache = PagedCache(dpool, slot(positions, live), dpt[None], jnp.stack([0, n]).astype(jnp.int32),
                           kv_len[None], jnp.int32(1))
        logits, cache = forward(draft_params, tokens[None], positions[None], cache, config=draft_config,
                                logit_indices=(n - 1)[None, None])
        return cache.pool, jnp.argmax(logits[0, 0]).astype(jnp.int32)

    def propose(state, last, pos):
        dpool, unfed, fill = state  # fill: `unfed` (the previous round's last draft) goes in at pos - 1
        tokens = jnp.where(fill, jnp.stack([unfed, last]), jnp.stack([last, 0]))
        positions = jnp.where(fill, jnp.stack([pos - 1, pos]), jnp.stack([pos, pos]))
        dpool, d = step(dpool, tokens, positions, jnp.stack([True, fill]), 1 + fill.astype(jnp.int32), pos + 1)

        def more(carry, i):  # feed d_i at pos + i, get d_{i+1} (a dead second row: engine.MIN_ROWS)
            dpool, d = carry
            p = jnp.stack([pos + i, pos + i])
            dpool, nxt = step(dpool, jnp.stack([d, 0]), p, jnp.array([True, False]), jnp.int32(1), pos + i + 1)
            return (dpool, nxt), nxt

        (dpool, _), rest = jax.lax.scan(more, (dpool, d), jnp.arange(1, k, dtype=jnp.int32))
        drafts = jnp.concatenate([d[None], rest])
        return drafts, jnp.int32(k), (dpool, unfed, fill)

    def advance(state, drafts, emit, a, c):
        dpool, _, _ = state
        return dpool, drafts[k - 1], a == k

    state = (draft_pool, f["unfed"], f["fill"] != 0)
    pool, (draft_pool, _, fill), out, pos, *_ = _greedy_rounds(params, pool, f, state, propose, advance,
                                                               config=config, K=k, rounds=rounds)
    return pool, draft_pool, out, pos - fill.astype(jnp.int32)


# XLA's default command buffer types plus CONDITIONAL: a `cond` becomes a conditional node of the
# CUDA graph, its predicate read on the device, not by the host. Measured on an H200 (random
# Qwen2.5-1.5B, n-gram k = 8, 4 rounds a call; bench/results/speculative_round_cond_h200.jsonl,
# kind round_cond): the host no longer waits at a call's dispatch (1.3-1.4 ms instead of 7 ms, the
# previous call's end), and a round went from 1.10 to 1.08 plain steps. With WHILE as well, the
# whole call one graph, a round cost 1.8 plain steps (kind loop_variants), so the round loop stays
# the host's, with a known trip count.
LOOP_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer":
                         "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONDITIONAL"}


def _loop_compiler_options() -> dict | None:
    return LOOP_COMPILER_OPTIONS if jax.default_backend() == "gpu" else None


@functools.lru_cache(maxsize=None)
def compile_draft_loop(config: ModelConfig, draft_config: ModelConfig, k: int, rounds: int):
    """`draft_loop` compiled; on a GPU with `LOOP_COMPILER_OPTIONS` (each round's `cond` on the
    device)."""
    fn = functools.partial(draft_loop, config=config, draft_config=draft_config, k=k, rounds=rounds)
    return jax.jit(fn, donate_argnums=(1, 3), compiler_options=_loop_compiler_options())


@functools.lru_cache(maxsize=None)
def compile_ngram_loop(config: ModelConfig, K: int, rounds: int):
    """`ngram_loop` compiled; on a GPU with `LOOP_COMPILER_OPTIONS` (each round's `cond` on the
    device)."""
    return jax.jit(functools.partial(ngram_loop, config=config, K=K, rounds=rounds), donate_argnums=(1, 3),
                   compiler_options=_loop_compiler_options())


# -- drafters ----------------------------------------------------------------------------------
@dataclass
class DraftRequest:
    """One row to draft for: the target's batch row, the request's tokens and sampling, and k."""

    row: int
    key: str  # the request id
    tokens: list[int]  # every known token (prompt + generated); the last one is not yet computed
    k: int
    sampling: object  # SamplingParams
    n_sampled: int  # index of the token the first draft stands for (for the draft's keys)


class NgramCorpus:
    """The tokens of earlier requests (prompt and output, the most recent `capacity` of them, -1
    after each request), which n-gram lookup falls back on when a request's own tokens have no
    match: code and prose repeat across requests (idioms, names, boilerplate) as well as within
    one. `lookup` finds the latest occurrence of the longest suffix n-gram that a token follows,
    through an index of each n-gram's latest end; `corpus_lookup` finds the same one on device
    by scanning `device()`. When full, the oldest tokens make room."""

    def __init__(self, capacity: int, max_n: int = 4):
        if not 2 <= capacity < 2**31 // (max_n + 2):  # corpus_lookup's int32 scores
            raise ValueError(f"an n-gram corpus holds 2 to {2**31 // (max_n + 2) - 1} tokens, got {capacity}")
        self.capacity, self.max_n = capacity, max_n
        self.clear()

    def clear(self) -> None:
        self.tokens = np.full(self.capacity, -1, np.int32)
        self.size = 0  # tokens held, the latest at the end
        self.base = 0  # how many tokens were dropped before tokens[0]
        self.ends: dict[tuple, int] = {}  # n-gram -> the end (counting dropped tokens) of its latest occurrence
        self._device = None

    def add(self, tokens) -> None:
        """Append one request's tokens (the latest capacity - 1 of them) and its end mark, dropping
        the oldest tokens that no longer fit."""
        toks = np.append(np.asarray(tokens, np.int32)[-(self.capacity - 1):], np.int32(-1))
        over = self.size + len(toks) - self.capacity
        if over > 0:
            self._forget(over)
        self.tokens[self.size:self.size + len(toks)] = toks
        self._index(toks, self.base + self.size)
        self.size += len(toks)
        self._device = None

    def _forget(self, drop: int) -> None:
        """Drop the oldest `drop` tokens, and the index entries of occurrences that start in them
        (an entry is the latest occurrence: none other is held)."""
        held = self.tokens[:min(self.size, drop + self.max_n)].tolist()
        for e in range(1, len(held) + 1):
            for n in range(1, min(self.max_n, e) + 1):
                gram = tuple(held[e - n:e])
                if e - n < drop and self.ends.get(gram) == self.base + e:
                    del self.ends[gram]
        self.tokens[:self.size - drop] = self.tokens[drop:self.size].copy()
        self.tokens[self.size - drop:] = -1
        self.size, self.base = self.size - drop, self.base + drop

    def _index(self, toks: np.ndarray, at: int) -> None:
        seq = toks.tolist()
        for e in range(1, len(seq)):  # n-grams ending before e, which seq[e] follows
            if seq[e] < 0:
                continue
            for n in range(1, min(self.max_n, e) + 1):
                gram = tuple(seq[e - n:e])
                if gram[0] < 0:
                    break
                self.ends[gram] = at + e

    def lookup(self, tokens: list[int], k: int) -> tuple[list[int], int]:
        """The continuation (up to k tokens) and the length of the suffix n-gram it follows (0:
        none)."""
        for n in range(min(self.max_n, len(tokens)), 0, -1):
            end = self.ends.get(tuple(tokens[len(tokens) - n:]))
            if end is not None:
                cont = self.tokens[end - self.base:end - self.base + k].tolist()
                return (cont[:cont.index(-1)] if -1 in cont else cont), n
        return [], 0

    def device(self) -> jax.Array:
        """The corpus on device (put again after a change)."""
        if self._device is None:
            self._device = jax.device_put(self.tokens)
        return self._device


def gram_starts(seq: np.ndarray, gram) -> np.ndarray:
    """The starts s, ascending, of the occurrences `seq[s:s + len(gram)] == gram` that a token of
    seq follows (len(gram) < len(seq))."""
    windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], len(gram))
    return np.flatnonzero((windows == gram).all(axis=1))


class NgramDrafter:
    """Prompt lookup (Saxena 2023, "Prompt Lookup Decoding"): find the most recent earlier
    occurrence of the longest suffix n-gram (max_n down to min_n tokens) of the request's tokens
    and propose the tokens that followed it; with no such occurrence, or a much shorter one than
    the corpus has (`_corpus_wins`), the latest one in the corpus of earlier requests' tokens
    (`NgramCorpus`; corpus_tokens 0: none), for greedy requests only."""

    name = "ngram"

    def __init__(self, max_n: int = 4, min_n: int = 1, window: int = 4096, corpus_tokens: int = 0):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n=}, {max_n=}")
        self.max_n, self.min_n, self.window = max_n, min_n, window
        self.corpus = NgramCorpus(corpus_tokens, max_n) if corpus_tokens else None
        self._no_corpus = None

    def lookup(self, tokens: list[int], k: int, shared: bool = True) -> list[int]:
        """Drafts for a request's tokens (shared: the corpus may propose them)."""
        arr = np.asarray(tokens[-self.window:], np.int32)
        own, n_own = self.lookup_own(arr, k)
        if shared and self.corpus is not None:
            theirs, n_theirs = self.corpus.lookup(arr[-self.max_n:].tolist(), k)
            if _corpus_wins(n_own, n_theirs):
                return theirs
        return own

    def lookup_own(self, arr: np.ndarray, k: int) -> tuple[list[int], int]:
        """In the request's own tokens: the continuation and the n-gram's length (0: none)."""
        L = len(arr)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            hits = gram_starts(arr, arr[L - n:])
            if len(hits):
                start = hits[-1] + n
                return arr[start:start + k].tolist(), n
        return [], 0

    def remember(self, tokens: list[int]) -> None:
        """A finished request's tokens join the corpus."""
        if self.corpus is not None and tokens:
            self.corpus.add(tokens)

    def corpus_on_device(self) -> jax.Array:
        """`ngram_loop`'s corpus argument ([1] of -1 without a corpus)."""
        if self.corpus is not None:
            return self.corpus.device()
        if self._no_corpus is None:
            self._no_corpus = jax.device_put(np.full(1, -1, np.int32))
        return self._no_corpus

    def propose(self, requests: list[DraftRequest], S: int, K: int):
        # Greedy outputs do not depend on the drafts; a seeded sampled request's do (which draws
        # the acceptance rule makes), so it keeps to its own tokens: reproducible whatever other
        # requests left in the corpus.
        return [self.lookup(r.tokens, r.k, shared=r.sampling.temperature == 0) for r in requests], None

    def release(self, key: str) -> None:
        pass

    def warmup(self, S: int, K: int) -> None:
        pass


@dataclass
class _DraftState:
    pages: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose draft K/V are valid
    base: int = 0  # len(tokens) when the last drafts were fed
    fed: list[int] = field(default_factory=list)  # drafts fed to the draft model at base, base+1, ...


def draft_step(params, pool: PagePool, packed: Packed, *, config: ModelConfig, k: int, S_out: int, K_out: int,
               sampled: bool):
    """The draft model catches up on a ragged batch of its unseen tokens, then drafts k tokens per
    row by k - 1 decode steps on device. Besides the step's buffers, packed holds limits [S]:
    positions the row may write (its pages; a chunk-only row gets its chunk end), and rows [S]: the
    target batch row of each draft row (S_out: none). Returns the pool, drafts [S, k] and their
    probabilities by target row [S_out, K_out, V] (zero when not `sampled`: every row greedy,
    whose q is never read)."""
    fields = packed.unpack()
    limits, rows = fields.pop("limits"), fields.pop("rows")
    batch = step_batch(fields)
    S = batch.kv_lens.shape[0]
    last = jnp.maximum(batch.query_start[1:] - 1, 0)
    keys_for = lambda steps: jax.vmap(lambda key: jax.random.fold_in(key, 3))(row_keys(batch.seeds, steps))  # noqa: E731

    def draw(logits, steps):
        if not sampled:  # the top-p sort is left out
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros_like(logits)
        probs = jax.nn.softmax(filtered_logits(logits, batch.sampling), axis=-1)
        return sample(logits, batch.sampling, keys_for(steps)), probs

    cache = PagedCache(pool, batch.slots, batch.page_table, batch.query_start, batch.kv_lens, batch.num_seqs)
    logits, cache = forward(params, batch.tokens[None], batch.positions[None], cache, config=config,
                            logit_indices=last[None])
    first, q0 = draw(logits[0], batch.sample_steps)
    pos0 = batch.positions[last]
    live = jnp.arange(S) < batch.num_seqs
    qs = jnp.minimum(jnp.arange(S + 1, dtype=jnp.int32), batch.num_seqs)
    ps = pool.page_size

    def body(carry, i):
        pool, tok = carry
        pos = pos0 + i
        page = jnp.take_along_axis(batch.page_table, (pos // ps)[:, None], axis=1)[:, 0]
        slots = jnp.where(live & (pos < limits), page * ps + pos % ps, -1)
        # one token a sequence: the decode kernel rotates, stores and attends
        cache = PagedCache(pool, slots, batch.page_table, qs, batch.kv_lens + i, batch.num_seqs, decode=True)
        logits, cache = forward(params, tok[None], pos[None], cache, config=config)
        tok, q = draw(logits[0], batch.sample_steps + i)
        return (cache.pool, tok), (tok, q)

    (pool, _), (toks, probs) = jax.lax.scan(body, (cache.pool, first), jnp.arange(1, k, dtype=jnp.int32))
    toks = jnp.concatenate([first[None], toks], axis=0).T  # [S, k]
    probs = jnp.swapaxes(jnp.concatenate([q0[None], probs], axis=0), 0, 1)  # [S, k, V]
    out = jnp.zeros((S_out, K_out, probs.shape[-1]), probs.dtype).at[rows, :k].set(probs, mode="drop")
    return pool, toks, out


class DraftModelDrafter:
    """A draft LLM (same tokenizer as the target) with its own page pool and allocator."""

    name = "draft"

    def __init__(self, llm, *, num_pages: int, page_size: int, max_pages: int, buckets: list[int]):
        self.llm = llm
        kv_dtype = str(llm.params["embed"].dtype)
        if isinstance(llm.params["layers"], (list, tuple)):  # unstacked weights run per-layer pages
            self.pool = create_pool(llm.config, num_pages, page_size, kv_dtype, per_layer=True)
        else:
            self.pool = create_pool(llm.config, num_pages, page_size, kv_dtype)
        self.allocator = PageAllocator(num_pages)
        self.page_size, self.max_pages, self.buckets = page_size, max_pages, buckets
        self.state: dict[str, _DraftState] = {}
        self._fns: dict = {}

    def _fn(self, k: int, S_out: int, K_out: int, sampled: bool):
        key = (k, S_out, K_out, sampled)
        if key not in self._fns:
            fn = functools.partial(draft_step, config=self.llm.config, k=k, S_out=S_out, K_out=K_out, sampled=sampled)
            self._fns[key] = jax.jit(fn, donate_argnums=(1,))
        return self._fns[key]

    def release(self, key: str) -> None:
        st = self.state.pop(key, None)
        if st is not None:
            self.allocator.release(st.pages)

    def warmup(self, S: int, K: int) -> None:
        for T in self.buckets:
            for k in k_buckets(K):
                for sampled in (False, True):
                    toks, _ = self._run(empty_batch(T, S, self.max_pages), 0, np.zeros(S, np.int32),
                                        np.full(S, S, np.int32), k, S, K, sampled)
                    jax.block_until_ready(toks)

    def _run(self, host, num_seqs, limits, rows, k, S_out, K_out, sampled):
        packed = to_device(dict(host, limits=limits, rows=rows), num_seqs)
        self.pool, toks, probs = self._fn(k, S_out, K_out, sampled)(self.llm.params, self.pool, packed)
        return toks, probs

    def sync(self, key: str, tokens: list[int]) -> _DraftState:
        """The request's draft state with `computed` no further than its valid K/V: the drafts fed
        last time count as far as they were accepted."""
        st = self.state.setdefault(key, _DraftState())
        if st.fed:
            got = tokens[st.base:st.base + len(st.fed)]
            match = next((i for i, (a, b) in enumerate(zip(st.fed, got)) if a != b), min(len(st.fed), len(got)))
            st.computed = min(st.computed, st.base + match)
            st.fed = []
        st.computed = min(st.computed, len(tokens) - 1)
        return st

    def reserve(self, st: _DraftState, upto: int) -> bool:
        """Pages for positions < upto; False when the pool has too few free."""
        need = -(-upto // self.page_size) - len(st.pages)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            st.pages += self.allocator.allocate(need)
        return True

    def propose(self, requests: list[DraftRequest], S: int, K: int):
        """Drafts for each request (possibly fewer than asked, or none when out of pages) and
        their probabilities [S, k, V] by target row (None when nothing was drafted)."""
        ps = self.page_size
        todo = []
        for r in requests:
            st = self.sync(r.key, r.tokens)
            if self.reserve(st, len(r.tokens) + r.k - 1):
                todo.append((r, st))
        drafts: dict[int, list[int]] = {}
        if not todo:
            return [[] for _ in requests], None
        k = next(b for b in k_buckets(K) if b >= max(r.k for r, _ in todo))
        probs = None
        sampled = any(r.sampling.temperature > 0 for r, _ in todo)
        budget = self.buckets[-1]
        while todo:
            share = budget // len(todo)  # long catch-ups (a prompt) go in chunks
            T = sum(min(len(r.tokens) - st.computed, share) for r, st in todo)
            host = empty_batch(next(b for b in self.buckets if b >= T), S, self.max_pages)
            limits, rows = np.zeros(S, np.int32), np.full(S, S, np.int32)  # row S: dropped
            t, final = 0, []
            for i, (r, st) in enumerate(todo):
                n = min(len(r.tokens) - st.computed, share)
                end = st.computed + n
                for pos in range(st.computed, end):
                    host["tokens"][t] = r.tokens[pos]
                    host["positions"][t] = pos
                    host["slots"][t] = st.pages[pos // ps] * ps + pos % ps
                    t += 1
                host["query_start"][i + 1] = t
                host["kv_lens"][i] = end
                host["page_table"][i, :len(st.pages)] = st.pages
                done = end == len(r.tokens)
                limits[i] = len(st.pages) * ps if done else end
                rows[i] = r.row if done else S
                _fill_sampling(host, i, r)
                st.computed = end
                final.append(done)
            host["query_start"][len(todo) + 1:] = t
            toks, probs_now = self._run(host, len(todo), limits, rows, k, S, K, sampled)
            toks = np.asarray(toks)
            for i, ((r, st), done) in enumerate(zip(todo, final)):
                if done:
                    drafts[r.row] = toks[i, :r.k].tolist()
                    # fed at base, base + 1, ...: the drafts before the last one asked for (the
                    # k bucket may have fed more, past the pages this row holds: not kept)
                    st.base, st.fed = len(r.tokens), drafts[r.row][:r.k - 1]
                    st.computed = st.base + len(st.fed)
            probs = probs_now if probs is None else probs + probs_now  # rows are disjoint
            todo = [x for x, done in zip(todo, final) if not done]
        return [drafts.get(r.row, []) for r in requests], probs


def k_buckets(K: int) -> list[int]:
    b = [1]
    while b[-1] < K:
        b.append(min(b[-1] * 2, K))
    return b


def _fill_sampling(host, i, r: DraftRequest) -> None:
    sp = r.sampling
    host["sample_steps"][i] = r.n_sampled
    host["seeds"][i] = sp.seed
    host["temperature"][i], host["top_k"][i] = sp.temperature, sp.top_k
    host["top_p"][i], host["min_p"][i] = sp.top_p, sp.min_p


def adaptive_k(rate: float, k_max: int, miss: float = 0.2) -> int:
    """Drafts worth proposing at a per-token acceptance rate: the smallest k with rate**k < miss
    (the chance that all k survive), within 1..k_max."""
    if rate <= 0:
        return 1
    if rate >= 1:
        return k_max
    return max(1, min(k_max, math.ceil(math.log(miss) / math.log(rate))))
