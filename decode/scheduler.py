"""Continuous batching on the host: admission, chunked prefill, preemption, finishing.

Each iteration builds one ragged step (decode tokens of running sequences first, then prefill
chunks under the token budget), dispatches it, and only then reads back the previous step's
sampled tokens (their copy to the host was started when that step was dispatched). So the host
prepares step i+1 while the device runs step i; a decode token of step i+1 is fed from step i's
output on device (`from_prev`). A sequence that finishes at step i has computed one extra token
in step i+1; it is dropped. When nothing waits and nothing is being prefilled, one call runs
`decode_steps` decode steps on device.

Speculative requests (`SamplingParams.speculative`, see `decode/speculative.py`) run in steps
verified by `verify_step`: each of their decode rows carries its last token and k drafts, and
yields 1..k+1 tokens. Such a step is read back before the next one is built (the next drafts
depend on what was accepted); plain requests share these steps, one token each.

Pages: a sequence holds pages for every position it has computed. When a step's pages cannot be
found, the most recently admitted sequence is preempted (its pages released, its known tokens kept
to recompute later; pages that were full stay in the prefix cache, so recompute is mostly cache
hits). Finished, cancelled and expired requests release their pages at once.

Used two ways: `start()` runs the loop on its own thread (the gRPC server); `run_until_idle()`
drives it from the caller's thread (the library's `generate`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import jax
import numpy as np

from pallax.kernels_pallas import dispatch
from pallax.model.decoder import fuse_projections, unstack_layers
from pallax.model.linear import transposed_layout
from pallax.model.quant_weights import hopper_layout

from .engine import MIN_ROWS, PENALTY_WINDOW, compile_step, empty_batch, pack, to_device
from .speculative import (DraftModelDrafter, DraftRequest, NgramDrafter, adaptive_k, compile_draft_loop,
                          compile_ngram_loop, compile_verify, empty_spec, k_buckets)
from .kv_cache import KV_DTYPES, PageAllocator, create_pool, pages_for_budget
from .prefix_cache import PrefixCache
from .requests import (Callback, QueueFull, Request, RequestError, RequestOutput, SamplingParams,
                       Timings, TokenLogprob, Usage)

log = logging.getLogger("pallax.scheduler")


@dataclass(frozen=True)
class EngineConfig:
    max_seqs: int = 16  # sequences per step (S)
    token_budget: int = 512  # tokens per step, largest bucket (T)
    page_size: int = 16
    num_pages: int | None = None  # None: memory_fraction of free device memory
    memory_fraction: float = 0.85
    kv_dtype: str | None = None  # None: the parameters' dtype; or "int8", "fp8", "bfloat16", "float32"
    max_queue: int = 1024
    decode_steps: int = 4  # on-device decode steps per call when nothing else waits
    prefix_caching: bool = True
    max_context: int | None = None  # None: the model's context length
    unstack_layers: bool | None = None  # per-layer weight and KV buffers (None: yes); see decoder.forward
    # With unstacked layers, concatenate q/k/v and gate/up into one weight each (two GEMMs per layer
    # instead of five; decoder.fuse_projections): batch-1 decode is bound by kernel launches. False
    # leaves the layout as it is (parameters another engine fused stay fused).
    fuse_projections: bool = True
    # Serve the small dense projections stored [N, K] (`linear.transposed_layout`): on a GPU XLA then
    # runs a step of up to two rows as row reductions instead of narrow GEMMs (one H200: Qwen2.5-1.5B
    # batch-1 step 1.60 -> 1.49 ms, 0.5B 0.99 -> 0.85; bench/results/transposed_h200.jsonl). Larger
    # steps, speculative verification included, stay GEMMs. None: on where the backend is a GPU.
    transposed_projections: bool | None = None
    max_draft_tokens: int = 0  # K: the most drafts a speculative row may carry; 0: no speculation
    adaptive_draft: bool = True  # k follows each request's running acceptance rate (up to its k)
    # A lone greedy speculative request runs several rounds per call on device (`speculative.ngram_loop`,
    # `draft_loop`) instead of one host round trip per round; 0: never. A request arriving meanwhile
    # waits for the call to end. Draft-model calls (`spec_rounds`) stop at the request's end but cost
    # about 7 ms each besides their rounds (1.5B target), which more rounds spread over more tokens.
    # N-gram calls (`ngram_rounds`) are chained and always run all their rounds, dead after the
    # request's end; 4 measured 2-3% faster than 2 or 8 on the real pair (bench/FINDINGS.md, speculative).
    spec_rounds: int = 8
    ngram_rounds: int = 4
    # Greedy n-gram drafts fall back on up to this many tokens of earlier requests (prompts and
    # outputs) when a request's own tokens have no match (`speculative.NgramCorpus`); 0: none.
    # Drafts do not change greedy outputs; the corpus is shared by every request the engine serves.
    ngram_corpus_tokens: int = 65536
    # `start()` runs every program once first (`warmup`), so no request waits for a compile. False:
    # ready at once, each program compiled at its first use (the first request of each shape waits
    # for it); for development servers and tests, where most shapes are never used.
    warmup: bool = True

    def loop_rounds(self, drafter: str) -> int:
        """Rounds per device loop call of `drafter` ("ngram" or "draft")."""
        return self.ngram_rounds if drafter == "ngram" else self.spec_rounds

    def seq_buckets(self) -> list[int]:
        """Batch sizes of pure-decode calls: powers of four up to max_seqs (a batch of 1 reads the
        weights once without 63 padded rows' worth of compute), none below MIN_ROWS."""
        b = [1]
        while b[-1] * 4 < self.max_seqs:
            b.append(b[-1] * 4)
        return sorted({max(MIN_ROWS, n) for n in b + [self.max_seqs]})

    def token_buckets(self) -> list[int]:
        least = max(MIN_ROWS, self.max_seqs)
        b = [least] + [t for t in (16, 64, 128, 256, 1024, 4096) if least < t < self.token_budget]
        return sorted(set(b + [max(self.token_budget, least)]))


class Seq:
    """One request's state on the host."""

    def __init__(self, req: Request, callback: Callback, tokenizer, admitted_order: int):
        self.req = req
        self.callback = callback
        self.prompt_len = len(req.prompt_ids)
        self.tokens = list(req.prompt_ids)  # prompt + generated tokens known on the host
        self.n_sampled = 0  # generated tokens dispatched (known or still in flight)
        self.num_computed = 0  # positions whose K/V are written (by dispatched steps)
        self.pages: list[int] = []
        self.registered = 0  # leading pages named in the prefix cache
        self.cached_tokens = 0
        self.gen = 0  # bumped by preemption: older in-flight results are dropped
        self.order = admitted_order
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.finished = False
        self.decoder = tokenizer.stream_decoder()
        self.text = ""  # generated text so far (stop strings cut it)
        self.emitted = 0  # characters of `text` already sent
        self.hold = max((len(s) for s in req.sampling.stop), default=1) - 1
        self.k = req.sampling.num_draft_tokens  # drafts to ask for next (adaptive)
        self.accept_rate = 1.0  # running per-draft acceptance rate (exponential average)

    @property
    def total(self) -> int:
        """Length including tokens still in flight."""
        return max(len(self.tokens), self.prompt_len + self.n_sampled)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class _Row:
    seq: Seq
    row: int
    samples: int  # sampled tokens this call yields for the sequence (0: mid-prefill chunk)
    gen: int
    drafts: list[int] | None = None  # a speculative decode row: its drafts (the count is read back)


@dataclass
class _InFlight:
    rows: list[_Row]
    out: object  # StepOutput (VerifyOutput when speculative) on device
    n_steps: int
    speculative: bool = False
    loop: bool = False  # an ngram_loop / draft_loop call: out is a LoopOutput
    draft_computed: object = None  # draft_loop: positions of the draft's K/V now computed (device scalar)
    carry: object = None  # ngram_loop: the next call's carry (on device), for `_chain_spec_loop`
    reach: int = 0  # ngram_loop: positions below this may hold K/V the call wrote (pages are there)


@dataclass
class _Counters:
    steps: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    preemptions: int = 0
    finished: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)  # drafter -> [rows verified, drafts proposed, drafts accepted]
    spec_loops: int = 0  # ngram_loop and draft_loop calls
    spec_chained: int = 0  # of those, ngram_loop calls dispatched from the previous call's carry


_LOOP_STOP_IDS = 16  # stop token ids an ngram_loop / draft_loop call checks on device


def transposes(setting: bool | None) -> bool:
    """`EngineConfig.transposed_projections` resolved: None is on where the backend is a GPU."""
    return jax.default_backend() == "gpu" if setting is None else setting


def serving_layout(params, *, fuse: bool = True, transpose: bool = False):
    """Parameters as an engine serves them: per-layer buffers, the projections that read one
    input fused when `fuse`, symmetric int4 in the Hopper kernel's layout on Hopper GPUs, and with
    `transpose` the small dense projections stored [N, K] (`linear.transposed_layout`)."""
    params = unstack_layers(params)
    if fuse:
        params = fuse_projections(params)
    if dispatch.resolve() == "pallas" and dispatch.on_hopper():
        params = hopper_layout(params)
    if transpose:
        params = transposed_layout(params)
    return params


class Scheduler:
    """The serving loop over one model. Implements `pallax.decode.requests.Engine`."""

    def __init__(self, llm, config: EngineConfig | None = None):
        self.llm = llm
        self.cfg = cfg = config or EngineConfig()
        mc = llm.config
        self.model_name = mc.name
        self.vocab_size = mc.vocab_size
        self.eos_ids = frozenset(llm.tokenizer.eos_ids)
        # Per-layer buffers everywhere by default: with stacked layers the pool is carried through
        # the layer scan, and inside the multi-step decode scan XLA copies it every layer (seconds
        # per call on a CPU); on a GPU stacked weights are also copied per layer.
        self._unstack = unstack = cfg.unstack_layers if cfg.unstack_layers is not None else True
        if unstack:
            llm.params = self._serving_layout(llm.params)  # the LLM's other paths run this layout too
        kv_dtype = cfg.kv_dtype or str(llm.params["embed"].dtype)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r} is not one of {sorted(KV_DTYPES)}")
        self.kv_dtype = kv_dtype
        num_pages = cfg.num_pages or pages_for_budget(mc, cfg.page_size, kv_dtype, cfg.memory_fraction)
        self.max_context = min(cfg.max_context or mc.max_seq_len, mc.max_seq_len)
        self.max_pages = -(-self.max_context // cfg.page_size)
        self.pool = create_pool(mc, num_pages, cfg.page_size, kv_dtype, per_layer=unstack)
        self.allocator = PageAllocator(num_pages)
        self.prefix = PrefixCache(self.allocator, cfg.page_size, cfg.prefix_caching)
        self.buckets = cfg.token_buckets()
        # by (steps per call, full): full=False serves batches of plain-greedy rows (engine_step)
        self._steps = {(n, full): compile_step(mc, n, full)
                       for n in sorted({1, max(1, cfg.decode_steps)}) for full in (False, True)}
        self._prev_tokens = jax.numpy.zeros(max(cfg.seq_buckets()), jax.numpy.int32)
        self._verify = {full: compile_verify(mc, full) for full in (False, True)} if cfg.max_draft_tokens > 0 else None
        for name in ("ngram_corpus_tokens", "spec_rounds", "ngram_rounds"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
        self.drafters = {"ngram": NgramDrafter(corpus_tokens=cfg.ngram_corpus_tokens)}
        self._ngram_loop, self._draft_loops = None, {}
        if cfg.max_draft_tokens > 0 and cfg.ngram_rounds > 0:
            self._ngram_loop = compile_ngram_loop(mc, cfg.max_draft_tokens, cfg.ngram_rounds)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._by_id: dict[str, Seq] = {}
        self._inflight: _InFlight | None = None
        self._order = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._cancel: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._ready = False
        self.counters = _Counters()

    def _serving_layout(self, params):
        return serving_layout(params, fuse=self.cfg.fuse_projections,
                              transpose=transposes(self.cfg.transposed_projections))

    # -- Engine protocol -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    def submit(self, request: Request, callback: Callback) -> None:
        self.validate(request)
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the engine is shutting down")
            if request.request_id in self._by_id:
                raise RequestError("request_id", f"{request.request_id!r} is already in flight")
            if len(self.waiting) >= self.cfg.max_queue:
                raise QueueFull(len(self.waiting), retry_after_s=0.5 + 0.01 * len(self.waiting))
            seq = Seq(request, callback, self.llm.tokenizer, next(self._order))
            self._by_id[request.request_id] = seq
            self.waiting.append(seq)
            self._wake.notify()

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            if request_id not in self._by_id:
                return False
            self._cancel.add(request_id)
            self._wake.notify()
            return True

    def validate(self, request: Request) -> None:
        """Reject a request that cannot be served, before anything is allocated."""
        ids = request.prompt_ids
        if not ids:
            raise RequestError("prompt", "empty prompt")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError("prompt", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_context:
            raise RequestError("prompt", f"prompt has {len(ids)} tokens; the context is {self.max_context}")
        need = len(ids) // self.cfg.page_size + 1
        if need > self.allocator.num_pages:
            raise RequestError("prompt", f"prompt needs {need} KV pages; the pool has {self.allocator.num_pages}")
        if request.adapter:
            raise RequestError("adapter", f"unknown adapter {request.adapter!r} (none loaded)")
        request.sampling.validate(self.vocab_size)
        spec = request.sampling.speculative
        if spec and self._verify is None:
            raise RequestError("speculative", "this engine was configured without speculation (max_draft_tokens=0)")
        if spec and spec not in self.drafters:
            raise RequestError("speculative", f"no {spec!r} drafter on this engine (attach a draft model)")

    def attach_draft_model(self, draft_llm, num_pages: int | None = None) -> None:
        """Give speculative="draft" requests a draft model: same tokenizer (vocabulary), its own
        page pool (by default as many pages as the target's)."""
        if self._verify is None:
            raise ValueError("attach_draft_model needs an engine with max_draft_tokens > 0")
        if draft_llm.config.vocab_size != self.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_llm.config.vocab_size}) is not the "
                             f"target's ({self.vocab_size})")
        with self._lock:
            if self.running or self.waiting:
                raise RuntimeError("attach_draft_model while requests run")
            if self._unstack:  # the target's layout, for the same reasons (stacked slices are copied)
                draft_llm.params = self._serving_layout(draft_llm.params)
            self.drafters["draft"] = DraftModelDrafter(
                draft_llm, num_pages=num_pages or self.allocator.num_pages, page_size=self.cfg.page_size,
                max_pages=self.max_pages, buckets=self.buckets)
            if self.cfg.spec_rounds > 0:  # by k bucket
                self._draft_loops = {k: compile_draft_loop(self.llm.config, draft_llm.config, k, self.cfg.spec_rounds)
                                     for k in k_buckets(self.cfg.max_draft_tokens)}

    def stats(self) -> dict:
        c = self.counters
        with self._lock:
            return {
                "waiting": len(self.waiting),
                "running": len(self.running),
                "pages_total": self.allocator.num_pages,
                "pages_free": self.allocator.num_free,
                "pages_in_use": self.allocator.num_in_use,
                "kv_utilization": self.allocator.num_in_use / self.allocator.num_pages,
                "prefix_cached_pages": self.prefix.num_cached,
                "prefix_hit_rate": self.prefix.hit_rate,
                "steps": self.counters.steps,
                "tokens_in": self.counters.tokens_in,
                "tokens_out": self.counters.tokens_out,
                "preemptions": self.counters.preemptions,
                "finished": dict(self.counters.finished),
                "spec_device_loops": c.spec_loops,
                "spec_chained_loops": c.spec_chained,
                "ngram_corpus_tokens": getattr(self.drafters["ngram"].corpus, "size", 0),
                **_spec_stats("spec", [sum(v) for v in zip([0, 0, 0, 0], *c.spec.values())]),
                **{k: v for name, counts in c.spec.items() for k, v in _spec_stats(f"spec_{name}", counts).items()},
            }

    def start(self) -> None:
        """Compile every step shape (unless `cfg.warmup` is False), then run the loop on a daemon
        thread."""
        if self.cfg.warmup:
            self.warmup()
        else:
            self._ready = True
        self._thread = threading.Thread(target=self._loop, name="pallax-scheduler", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._accepting = False
            if not drain:
                self._cancel.update(self._by_id)
            self._wake.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and self.has_work():
            if deadline is not None and time.monotonic() > deadline:
                with self._lock:
                    self._cancel.update(self._by_id)
                break
            time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- driving -------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run every (token bucket, steps) program once on an empty batch: no compile later."""
        S = self.cfg.max_seqs
        shapes = [(T, S, 1, full) for T in self.buckets for full in (False, True)]
        shapes += [(b, b, n, full) for n, full in self._steps if n > 1 for b in self.cfg.seq_buckets()]
        for T, S_b, n, full in shapes:
            host = empty_batch(T, S_b, self.max_pages)
            step = self._steps[n, full]
            self.pool, out, _ = step(self.llm.params, self.pool, to_device(host, 0), self._prev_tokens)
            jax.block_until_ready(out.tokens)
        if self._verify is not None:
            K = self.cfg.max_draft_tokens
            for T in self.buckets:
                for q in (None, "draft") if "draft" in self.drafters else (None,):
                    if q is not None:
                        q = jax.numpy.zeros((S, K, self.vocab_size), jax.numpy.float32)
                    for verify in self._verify.values():
                        packed = to_device(dict(empty_batch(T, S, self.max_pages), **empty_spec(S, K)), 0)
                        self.pool, out, _ = verify(self.llm.params, self.pool, packed, q, self._prev_tokens)
                        jax.block_until_ready(out.tokens)
            for drafter in self.drafters.values():
                drafter.warmup(S, K)
            if self._ngram_loop is not None:  # nothing left to emit: it runs no round
                self.pool, out, _ = self._ngram_loop(self.llm.params, self.pool, self._loop_inputs([], 0, ()),
                                                     self._ngram_carry([0], 0, 0), self._corpus())
                jax.block_until_ready(out.tokens)
            d = self.drafters.get("draft")
            for loop in self._draft_loops.values():
                self.pool, d.pool, out, _ = loop(self.llm.params, self.pool, d.llm.params, d.pool,
                                                 self._loop_inputs([], 0, (), last=0, pos=0, budget=0,
                                                                   draft_pages=[], fill=False, unfed=0))
                jax.block_until_ready(out.tokens)
        self._ready = True

    def compiled_programs(self) -> int:
        fns = list(self._steps.values()) + list((self._verify or {}).values())
        fns += ([self._ngram_loop] if self._ngram_loop is not None else []) + list(self._draft_loops.values())
        return sum(f._cache_size() for f in fns)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight or self._cancel)

    def run_until_idle(self) -> None:
        while self.has_work():
            self.iterate()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.has_work():
                    self._wake.wait(timeout=0.1)
                if self._stopping:
                    return
            try:
                self.iterate()
            except Exception as e:  # never leave requests hanging: fail them and go on
                log.exception("scheduler step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def iterate(self) -> None:
        """One scheduling round: end cancelled/expired, admit, dispatch a step, read the last."""
        self._end_cancelled_and_expired()
        with self._lock:
            self._admit()
        if self._inflight is not None and self._inflight.speculative:
            # The next drafts depend on what this step accepted: read it before building the next,
            # unless a lone n-gram request's next device loop call can start from its carry.
            previous = self._inflight
            self._inflight = self._chain_spec_loop(previous) if previous.loop else None
            self._process(previous)
            if self._inflight is not None:
                return
            with self._lock:
                self._admit()
        launched = self._launch()
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._process(previous)
        elif launched is None:
            return
        if launched is not None and not self.running and not self.waiting:
            # Everything finished while this step was in flight: read it now.
            self._inflight = None
            self._process(launched)

    # -- admission and batching ------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.cfg.max_seqs:
            seq = self.waiting[0]
            if seq.req.request_id in self._cancel:
                break
            if not seq.pages:
                hit = self.prefix.match(seq.tokens)
                seq.pages = hit
                seq.num_computed = len(hit) * self.cfg.page_size
                seq.registered = len(hit)
                if seq.first_scheduled is None:
                    seq.cached_tokens = seq.num_computed
            need = -(-(seq.num_computed + 1) // self.cfg.page_size) - len(seq.pages)
            if need > self.allocator.num_free:
                # Not even its first chunk fits now; keep the prefix pages and wait for pages.
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.first_scheduled = seq.first_scheduled or time.monotonic()

    def _ensure_pages(self, seq: Seq, upto: int) -> bool:
        """Pages for positions < upto; preempts later-admitted sequences when short."""
        need = -(-upto // self.cfg.page_size) - len(seq.pages)
        while need > self.allocator.num_free:
            victims = [s for s in self.running if s is not seq and s.order > seq.order]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda s: s.order))
        if need > 0:
            seq.pages += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Seq) -> None:
        self.counters.preemptions += 1
        self.running.remove(seq)
        self.allocator.release(seq.pages, cached=self.prefix.__contains__)
        seq.pages, seq.num_computed, seq.registered = [], 0, 0
        seq.n_sampled = seq.generated  # tokens still in flight will be sampled again, identically
        seq.gen += 1
        self._release_drafts(seq)
        self.waiting.appendleft(seq)

    def _launch(self) -> _InFlight | None:
        with self._lock:
            return self._launch_locked()

    def _launch_locked(self) -> _InFlight | None:
        if not self.running:
            return None
        cfg, S = self.cfg, self.cfg.max_seqs
        prev_rows = {id(r.seq): r.row for r in self._inflight.rows} if self._inflight else {}
        speculative = self._verify is not None and any(s.req.sampling.speculative for s in self.running)
        decode_only = not self.waiting and all(s.total - s.num_computed == 1 for s in self.running)
        n_steps = cfg.decode_steps if decode_only and cfg.decode_steps > 1 and not speculative else 1
        if n_steps > 1 and any(s.total + n_steps > self.max_context for s in self.running):
            n_steps = 1
        loops = self._ngram_loop is not None or self._draft_loops
        if speculative and decode_only and len(self.running) == 1 and loops:
            launched = self._launch_spec_loop(self.running[0])
            if launched is not None:
                return launched
        budget = self.buckets[-1]
        plan: list[tuple[Seq, int, int]] = []  # (seq, tokens to compute, drafts to ask for)
        # Decode rows first (one token each, plus drafts), oldest first; then prefill chunks.
        for seq in sorted(self.running, key=lambda s: (s.total - s.num_computed > 1, s.order)):
            if seq not in self.running or budget <= 0:
                continue
            todo = min(seq.total - seq.num_computed, budget)
            k = self._draft_len(seq, budget - todo) if speculative and seq.total - seq.num_computed == 1 else 0
            if not self._ensure_pages(seq, seq.num_computed + todo + k + n_steps - 1):
                if len(self.running) == 1:
                    # Alone and still out of pages: the pool cannot hold this sequence any longer.
                    self._finish(seq, "length")
                elif seq in self.running:
                    self._preempt(seq)
                continue
            plan.append((seq, todo, k))
            budget -= todo + k
        plan = [(s, n, k) for s, n, k in plan if s in self.running]  # drop sequences preempted meanwhile
        if not plan:
            return None
        drafts, q = self._propose(plan) if speculative else ({}, None)
        T = sum(n + len(drafts.get(r, ())) for r, (_, n, _) in enumerate(plan))
        if n_steps > 1:
            S = T_bucket = next(b for b in cfg.seq_buckets() if b >= len(plan))
        else:
            T_bucket = next(b for b in self.buckets if b >= T)
        host = empty_batch(T_bucket, S, self.max_pages)
        spec = empty_spec(S, cfg.max_draft_tokens) if speculative else None
        rows: list[_Row] = []
        t = 0
        for r, (seq, n, _) in enumerate(plan):
            start = seq.num_computed
            draft = drafts.get(r)
            n_in = n + len(draft or ())
            for i in range(n_in):
                pos = start + i
                if i >= n:
                    host["tokens"][t + i] = draft[i - n]
                elif pos < len(seq.tokens):
                    host["tokens"][t + i] = seq.tokens[pos]
                else:  # the token the previous step sampled, still on device
                    host["from_prev"][t + i] = prev_rows[id(seq)]
                host["positions"][t + i] = pos
                host["slots"][t + i] = seq.pages[pos // cfg.page_size] * cfg.page_size + pos % cfg.page_size
            host["query_start"][r + 1] = t + n_in
            host["kv_lens"][r] = start + n_in
            host["page_table"][r, : len(seq.pages)] = seq.pages
            sp = seq.req.sampling
            host["sample_steps"][r] = seq.n_sampled
            host["seeds"][r] = sp.seed
            host["temperature"][r], host["top_k"][r] = sp.temperature, sp.top_k
            host["top_p"][r], host["min_p"][r] = sp.top_p, sp.min_p
            if sp.repetition_penalty != 1.0:
                host["penalty"][r] = sp.repetition_penalty
                recent = seq.tokens[:start + n][-PENALTY_WINDOW:]
                host["recent"][r, PENALTY_WINDOW - len(recent):] = recent
            if spec is not None:
                # logits after the last known token and after each draft
                spec["logit_rows"][r] = np.minimum(t + n - 1 + np.arange(cfg.max_draft_tokens + 1), t + n_in - 1)
            if draft is not None:
                spec["drafts"][r, :len(draft)] = draft
                spec["num_drafts"][r] = len(draft)
                spec["point_mass"][r] = sp.speculative != "draft"
                rows.append(_Row(seq, r, -1, seq.gen, draft))  # the count is read back
                seq.num_computed = start + n_in  # rolled back to the accepted drafts then
            else:
                samples = n_steps if start + n == seq.total else 0
                rows.append(_Row(seq, r, samples, seq.gen))
                seq.num_computed = start + n + (n_steps - 1)
                seq.n_sampled += samples
            t += n_in
        host["query_start"][len(plan) + 1:] = t
        full = not all(seq.req.sampling.plain_greedy for seq, _, _ in plan)
        if speculative:
            batch = to_device(dict(host, **spec), len(plan))
            verify = self._verify[full]
            self.pool, out, self._prev_tokens = verify(self.llm.params, self.pool, batch, q, self._prev_tokens)
        else:
            batch = to_device(host, len(plan))
            self.pool, out, self._prev_tokens = self._steps[n_steps, full](self.llm.params, self.pool, batch,
                                                                           self._prev_tokens)
        for x in jax.tree.leaves(out):
            x.copy_to_host_async()
        self.counters.steps += 1
        self.counters.tokens_in += T
        return _InFlight(rows, out, n_steps, speculative)

    def _loop_inputs(self, pages, k, stop_ids, **more):
        """A device loop call's host inputs: the page table, k, the stop ids and `more` (the draft
        loop's last, pos, budget, draft_pages, fill, unfed), in one transfer."""
        def padded(values, n, fill=0):
            a = np.full(n, fill, np.int32)
            values = list(values)[:n]
            a[:len(values)] = values
            return a

        host = {"page_table": padded(pages, self.max_pages), "k": np.int32(k),
                # more stop ids than fit only cost rounds past a stop: the host still stops
                "stop_ids": padded(stop_ids, _LOOP_STOP_IDS, -1)}
        if "draft_pages" in more:
            more["draft_pages"] = padded(more["draft_pages"], self.max_pages)
        return pack(dict(host, **{name: np.int32(v) if np.ndim(v) == 0 else v for name, v in more.items()}))

    def _ngram_carry(self, tokens, pos, left) -> dict:
        """The first `ngram_loop` call's carry: the history the lookup searches (with room for the
        new tokens), the last token and its position, and the tokens the request may still emit."""
        window = self.drafters["ngram"].window
        recent = list(tokens[-window:])
        hist = np.zeros(window + self._loop_tokens("ngram") + self.cfg.max_draft_tokens + 1, np.int32)
        hist[:len(recent)] = recent
        return jax.device_put(dict(hist=hist, n_hist=np.int32(len(recent)), last=np.int32(tokens[-1]),
                                   pos=np.int32(pos), left=np.int32(left)))

    def _corpus(self):
        """`ngram_loop`'s corpus of earlier requests' tokens, on device."""
        return self.drafters["ngram"].corpus_on_device()

    def _loop_tokens(self, drafter: str) -> int:
        """The most tokens one device loop call of `drafter` emits: its rounds of K + 1 each."""
        return self.cfg.loop_rounds(drafter) * (self.cfg.max_draft_tokens + 1)

    def _loop_k_and_stops(self, seq: Seq) -> tuple[int, tuple[int, ...]]:
        """A device loop call's drafts per round and the stop token ids it checks."""
        sp = seq.req.sampling
        stops = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(sorted(self.eos_ids)))
        return min(self._wanted_k(seq), self.cfg.max_draft_tokens), stops

    def _wanted_k(self, seq: Seq) -> int:
        """The request's k, or the adaptive one."""
        return seq.k if self.cfg.adaptive_draft else seq.req.sampling.num_draft_tokens

    def _launch_spec_loop(self, seq: Seq) -> _InFlight | None:
        """Several speculation rounds in one call for a lone plain-greedy sequence (None: not such
        a sequence, the draft model has not caught up, or no pages: the usual step runs)."""
        sp = seq.req.sampling
        if sp.speculative not in ("ngram", "draft") or not sp.plain_greedy:
            return None
        left = min(sp.max_tokens - seq.generated, self.max_context - seq.total)  # tokens it may still emit
        budget = min(left, self._loop_tokens(sp.speculative))
        start = seq.num_computed  # the last token's position: its K/V is computed by the first round
        if budget < 2 or len(seq.tokens) != seq.total:
            return None
        k, stops = self._loop_k_and_stops(seq)
        drafter = draft_computed = None
        if sp.speculative == "draft":
            drafter = self.drafters.get("draft")
            if drafter is None or not self._draft_loops:
                return None
            st = drafter.sync(seq.req.request_id, seq.tokens)
            kb = next(b for b in self._draft_loops if b >= k)
            # caught up on every position before the last token, or all but one (fed with the first
            # round); further behind, the usual step's drafting catches up
            fill = st.computed == start - 1
            if not (st.computed == start or fill) or not drafter.reserve(st, start + budget + kb):
                return None
        elif self._ngram_loop is None:
            return None
        if not self._ensure_pages(seq, start + budget):
            return None
        carry = None
        if drafter is not None:
            packed = self._loop_inputs(seq.pages, k, stops, last=seq.tokens[-1], pos=start, budget=budget,
                                       draft_pages=st.pages, fill=fill, unfed=seq.tokens[start - 1] if fill else 0)
            self.pool, drafter.pool, out, draft_computed = self._draft_loops[kb](
                self.llm.params, self.pool, drafter.llm.params, drafter.pool, packed)
        else:
            self.pool, out, carry = self._ngram_loop(self.llm.params, self.pool, self._loop_inputs(seq.pages, k, stops),
                                                     self._ngram_carry(seq.tokens, start, left), self._corpus())
        return self._loop_in_flight(seq, out, draft_computed=draft_computed, carry=carry, reach=start + budget)

    def _loop_in_flight(self, seq: Seq, out, **kw) -> _InFlight:
        for x in jax.tree.leaves(out):
            x.copy_to_host_async()
        self.counters.steps += 1
        self.counters.spec_loops += 1
        return _InFlight([_Row(seq, 0, -1, seq.gen, [])], out, 1, speculative=True, loop=True, **kw)

    def _chain_spec_loop(self, prev: _InFlight) -> _InFlight | None:
        """The next `ngram_loop` call of a lone request, dispatched from `prev`'s carry before
        `prev` is read back, so the device does not wait for the host between calls (a call's
        dispatch and read-back cost about as much as a plain step). None when the request is no
        longer alone (or done, or out of pages): `prev` is read back and the usual step follows.

        The host's stops that the device cannot see (stop strings, cancellation) may end the
        request while this call is in flight: its output is then ignored, and the K/V it writes
        lands in pages released meanwhile, which only a later call (after it, in stream order)
        can hand to another request."""
        seq = prev.rows[0].seq
        if (prev.carry is None or seq.finished or seq.gen != prev.rows[0].gen or self.waiting or self._cancel
                or self.running != [seq]):
            return None
        reach = min(prev.reach + self._loop_tokens("ngram"), self.max_context)
        if not self._ensure_pages(seq, reach):
            return None
        k, stops = self._loop_k_and_stops(seq)
        self.pool, out, carry = self._ngram_loop(self.llm.params, self.pool, self._loop_inputs(seq.pages, k, stops),
                                                 prev.carry, self._corpus())
        self.counters.spec_chained += 1
        return self._loop_in_flight(seq, out, carry=carry, reach=reach)

    def _draft_len(self, seq: Seq, room: int) -> int:
        """Drafts to ask for: the request's k (or the adaptive one), within the step's token room,
        the engine's K, what is left of max_tokens and the context."""
        sp = seq.req.sampling
        if not sp.speculative:  # a plain row sharing a speculative step
            return 0
        return max(0, min(self._wanted_k(seq), room, self.cfg.max_draft_tokens, sp.max_tokens - seq.generated - 1,
                          self.max_context - seq.total - 1))

    def _propose(self, plan) -> tuple[dict[int, list[int]], object]:
        """Drafts by plan row for the speculative decode rows (k > 0), and the draft model's
        probabilities [S, K, V] (None when no row used it)."""
        drafts, q = {}, None
        for name, drafter in self.drafters.items():
            reqs = [DraftRequest(r, seq.req.request_id, seq.tokens, k, seq.req.sampling, seq.n_sampled)
                    for r, (seq, _, k) in enumerate(plan) if k > 0 and seq.req.sampling.speculative == name]
            if reqs:
                got, probs = drafter.propose(reqs, self.cfg.max_seqs, self.cfg.max_draft_tokens)
                drafts.update((req.row, d) for req, d in zip(reqs, got))
                q = probs if probs is not None else q
        for r, (seq, _, k) in enumerate(plan):  # speculative rows with nothing drafted verify nothing
            if seq.req.sampling.speculative and seq.total - seq.num_computed == 1:
                drafts.setdefault(r, [])
        return drafts, q

    # -- results -------------------------------------------------------------------------------
    def _process(self, step: _InFlight) -> None:
        if step.loop:
            return self._process_loop(step)
        tokens = np.asarray(step.out.tokens)
        want_lp = any(r.seq.req.sampling.logprobs for r in step.rows)
        if want_lp:
            lp, top_ids, top_lp = (np.asarray(x) for x in (step.out.logprob, step.out.top_ids, step.out.top_logprobs))
        counts = np.asarray(step.out.counts) if step.speculative else None
        for r in step.rows:
            seq = r.seq
            if seq.finished or seq.gen != r.gen or r.samples == 0:
                continue
            samples = r.samples if r.drafts is None else int(counts[r.row])
            if r.drafts is not None:
                self._accepted(seq, len(r.drafts), samples - 1)
            new, lps = [], []
            for j in range(samples):
                tok = int(tokens[j, r.row])
                seq.tokens.append(tok)
                new.append(tok)
                if seq.req.sampling.logprobs:
                    n = seq.req.sampling.logprobs
                    lps.append(TokenLogprob(tok, float(lp[j, r.row]),
                                            [(int(i), float(v)) for i, v in zip(top_ids[j, r.row, :n], top_lp[j, r.row, :n])]))
                reason = self._finish_reason(seq, tok)
                if reason is not None:
                    break
            if r.drafts is not None:
                seq.n_sampled = seq.generated
            self._took(seq, new, lps, reason)

    def _took(self, seq: Seq, new: list[int], lps: list[TokenLogprob], reason: str | None) -> None:
        """Book the tokens a step gave a sequence (already appended) and deliver them."""
        self.counters.tokens_out += len(new)
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        self._register_full_pages(seq)
        self._emit(seq, new, lps, reason)

    def _process_loop(self, step: _InFlight) -> None:
        seq = step.rows[0].seq
        if seq.finished or seq.gen != step.rows[0].gen:
            return
        tokens, counts, drafted = (np.asarray(x) for x in (step.out.tokens, step.out.counts, step.out.drafted))
        new, reason = [], None
        for r in range(len(counts)):
            if counts[r] == 0 or reason is not None:
                break
            self._count_drafts(seq, int(drafted[r]), int(counts[r]) - 1)
            for tok in tokens[r, :counts[r]].tolist():
                seq.tokens.append(tok)
                new.append(tok)
                reason = self._finish_reason(seq, tok)
                if reason is not None:
                    break
        seq.num_computed = len(seq.tokens) - 1  # every emitted token's K/V but the last one's
        seq.n_sampled = seq.generated
        if step.draft_computed is not None:
            st = self.drafters["draft"].state.get(seq.req.request_id)
            if st is not None:
                st.computed, st.fed, st.base = int(step.draft_computed), [], len(seq.tokens)
        self._took(seq, new, [], reason)

    def _accepted(self, seq: Seq, drafted: int, accepted: int) -> None:
        """Book a verification: the K/V of rejected drafts is dropped by rolling the computed
        length back to the accepted ones; counters and the adaptive k follow."""
        seq.num_computed -= drafted - accepted
        self._count_drafts(seq, drafted, accepted)

    def _count_drafts(self, seq: Seq, drafted: int, accepted: int) -> None:
        # [verifications, drafts, accepted drafts, empty rounds (nothing drafted: the target's
        # token only, e.g. no earlier occurrence of the last token for the n-gram lookup)]
        counts = self.counters.spec.setdefault(seq.req.sampling.speculative, [0, 0, 0, 0])
        if drafted == 0:
            counts[3] += 1
            return
        for i, n in enumerate((1, drafted, accepted)):
            counts[i] += n
        seq.accept_rate = 0.7 * seq.accept_rate + 0.3 * accepted / drafted
        seq.k = adaptive_k(seq.accept_rate, seq.req.sampling.num_draft_tokens)

    def _finish_reason(self, seq: Seq, tok: int) -> str | None:
        sp = seq.req.sampling
        if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in self.eos_ids):
            seq.text += seq.decoder.finish()
            return "stop"
        seq.text += seq.decoder.push(tok)
        for s in sp.stop:
            i = seq.text.find(s, max(0, seq.emitted - len(s)))
            if i >= 0:
                seq.text = seq.text[:i]  # the stop string and what follows it are not returned
                return "stop"
        if seq.generated >= sp.max_tokens or len(seq.tokens) >= self.max_context:
            seq.text += seq.decoder.finish()
            return "length"
        return None

    def _release_drafts(self, seq: Seq) -> None:
        drafter = self.drafters.get(seq.req.sampling.speculative or "")
        if drafter is not None:
            drafter.release(seq.req.request_id)

    def _register_full_pages(self, seq: Seq) -> None:
        full = min(len(seq.tokens), seq.num_computed) // self.cfg.page_size
        if full > seq.registered:
            self.prefix.register(seq.tokens, seq.pages, seq.registered, min(full, len(seq.pages)))
            seq.registered = full

    def _emit(self, seq: Seq, new: list[int], lps: list[TokenLogprob], reason: str | None) -> None:
        # Text that may still turn out to start a stop string is held back until it cannot.
        upto = len(seq.text) if reason is not None else max(seq.emitted, len(seq.text) - seq.hold)
        out = RequestOutput(seq.req.request_id, new, seq.text[seq.emitted:upto], lps)
        seq.emitted = upto
        if reason is not None:
            self._finish(seq, reason, out)
        else:
            self._deliver(seq, out)

    def _finish(self, seq: Seq, reason: str, out: RequestOutput | None = None, error: str | None = None) -> None:
        seq.finished = True
        with self._lock:
            self._by_id.pop(seq.req.request_id, None)
            self._cancel.discard(seq.req.request_id)
            if seq in self.running:
                self.running.remove(seq)
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.allocator.release(seq.pages, cached=self.prefix.__contains__)
            seq.pages = []
            self._release_drafts(seq)
            self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
        self.drafters["ngram"].remember(seq.tokens)
        now = time.monotonic()
        arrival = seq.req.arrival
        out = out or RequestOutput(seq.req.request_id, [], "")
        if reason in ("cancelled", "deadline", "error") and seq.emitted < len(seq.text):
            out.text, seq.emitted = out.text + seq.text[seq.emitted:], len(seq.text)
        out.finished, out.finish_reason, out.error = True, reason, error
        out.usage = Usage(seq.prompt_len, seq.generated, seq.cached_tokens)
        out.timings = Timings(
            queue_s=(seq.first_scheduled or now) - arrival,
            ttft_s=(seq.first_token - arrival) if seq.first_token else 0.0,
            total_s=now - arrival,
        )
        self._deliver(seq, out)

    def _deliver(self, seq: Seq, out: RequestOutput) -> None:
        try:
            seq.callback(out)
        except Exception:  # a front end's bug must not stop the loop
            log.exception("callback for %s failed", seq.req.request_id)

    def _end_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            live = list(self._by_id.values())
            cancel = set(self._cancel)
        for seq in live:
            if seq.finished:
                continue
            if seq.req.request_id in cancel:
                self._finish(seq, "cancelled")
            elif seq.req.deadline is not None and now >= seq.req.deadline:
                self._finish(seq, "deadline")

    def _fail_all(self, message: str) -> None:
        self._inflight = None
        with self._lock:
            live = list(self._by_id.values())
        for seq in live:
            if not seq.finished:
                self._finish(seq, "error", error=message)


def _spec_stats(prefix: str, counts) -> dict:
    """Acceptance rate: drafts accepted per draft proposed; mean accepted length: tokens a
    verification yields (accepted drafts + the target's own token); empty rounds: speculative
    rounds with nothing drafted, which yield the target's token only and are not verifications."""
    verified, drafted, accepted, empty = counts
    return {f"{prefix}_verifications": verified, f"{prefix}_draft_tokens": drafted,
            f"{prefix}_accepted_tokens": accepted, f"{prefix}_empty_rounds": empty,
            f"{prefix}_acceptance_rate": accepted / drafted if drafted else 0.0,
            f"{prefix}_mean_accepted_length": (accepted + verified) / verified if verified else 0.0}


def request_from_params(request_id: str, prompt_ids: list[int], sampling: SamplingParams, **kw) -> Request:
    return Request(request_id=request_id, prompt_ids=list(prompt_ids), sampling=sampling, **kw)
