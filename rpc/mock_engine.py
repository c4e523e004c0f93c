"""A serving loop whose outputs can be computed by hand, for server tests and `pallax serve --mock`.

`MockEngine` implements `pallax.decode.requests.Engine` the way the real scheduler behaves at its
edges (own thread, bounded queue, page budget, cancellation, deadlines, stop conditions) with a
trivial "model": the i-th generated token is the prompt's `i % len(prompt)`-th token, i.e. it
echoes the prompt over and over. With `MockTokenizer` (one token per UTF-8 byte) the completion of
"abc" with max_tokens=7 is "abcabca".

- one token per running sequence per tick (`tick_s`), at most `max_running` sequences;
- a waiting queue bounded by `max_waiting` (QueueFull beyond), admitted by priority then arrival;
- pages of `page_size` tokens: a sequence holds ceil((prompt + max_tokens) / page_size) pages from
  admission until it ends (a worst-case reservation, so the mock never needs to preempt); pages
  are ids from a free list and a double free raises;
- finishes on EOS (unless ignore_eos), stop token ids (token kept in token_ids, not in text), stop
  strings (text cut before the stop string; text that could begin one is held back while
  streaming), max_tokens, deadline, cancel;
- logprobs: the chosen token gets -0.25, the k-th alternative (token + k) % vocab gets -0.25 - k.

Callbacks run while the engine's lock is held, so one request's increments are delivered in order
even when `cancel` (called from another thread) delivers the final one.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass, field

from pallax.decode.requests import (
    Callback,
    QueueFull,
    Request,
    RequestError,
    RequestOutput,
    Timings,
    TokenLogprob,
    Usage,
)


class MockTokenizer:
    """Bytes as tokens: id 0 <pad>, 1 <bos>, 2 <eos>, byte b -> b + 3."""

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET
    bos_id = BOS
    eos_id = EOS
    eos_ids = frozenset({EOS})
    add_bos = False
    chat_template = "mock"

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return bytes(i - self.OFFSET for i in ids if i >= self.OFFSET).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """`<|role|>content\\n` per message, then `<|assistant|>` when a generation prompt is asked."""
        out = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return out + ("<|assistant|>" if add_generation_prompt else "")

    def stream_decoder(self) -> "_ByteStreamDecoder":
        return _ByteStreamDecoder(self)


class _ByteStreamDecoder:
    """Releases text only at whole UTF-8 characters."""

    def __init__(self, tokenizer: MockTokenizer):
        self.tokenizer = tokenizer
        self.pending = b""

    def push(self, token_id: int) -> str:
        if token_id < MockTokenizer.OFFSET:
            return ""
        self.pending += bytes([token_id - MockTokenizer.OFFSET])
        try:
            text = self.pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(self.pending) - e.start < 4:
                return ""  # an incomplete character: wait for its next byte
            text = self.pending.decode("utf-8", errors="replace")
        self.pending = b""
        return text

    def finish(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


def echo_completion(prompt_ids: list[int], n: int) -> list[int]:
    """The mock model's tokens: the prompt repeated, cut to n."""
    return [prompt_ids[i % len(prompt_ids)] for i in range(n)]


@dataclass
class _Seq:
    request: Request
    callback: Callback
    decoder: _ByteStreamDecoder
    hold: int  # characters held back while streaming: longest stop string - 1
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # all text decoded so far (cut at a stop string)
    released: int = 0  # characters of `text` already delivered
    pages: list[int] = field(default_factory=list)
    scheduled: float | None = None
    first_token: float | None = None


class MockEngine:
    def __init__(self, *, tick_s: float = 0.002, max_running: int = 16, max_waiting: int = 64,
                 pages_total: int = 1024, page_size: int = 4, max_context: int = 512,
                 adapters: tuple[str, ...] = ("mock-lora",), warmup_s: float = 0.0,
                 model_name: str = "mock-echo", retry_after_s: float = 0.05):
        if max_running <= 0 or max_waiting < 0 or pages_total <= 0 or page_size <= 0:
            raise ValueError(f"bad mock limits: {max_running=} {max_waiting=} {pages_total=} {page_size=}")
        self.tokenizer = MockTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.max_context = max_context
        self.model_name = model_name
        self.adapters = tuple(adapters)
        self.quantization = "none"
        self.tick_s, self.max_running, self.max_waiting = tick_s, max_running, max_waiting
        self.pages_total, self.page_size = pages_total, page_size
        self.warmup_s, self.retry_after_s = warmup_s, retry_after_s
        self._lock = threading.RLock()
        self._waiting: list[tuple[int, int, _Seq]] = []  # heap of (-priority, arrival order, seq)
        self._running: dict[str, _Seq] = {}
        self._known: dict[str, _Seq] = {}  # waiting or running, by request id
        self._free_pages = list(range(pages_total))
        self._order = itertools.count()
        self._ready = threading.Event()
        self._stopping = False
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "deadline": 0, "error": 0}
        self.tokens_in = self.tokens_out = self.submitted = 0

    # -- Engine protocol -----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.warmup_s:
            time.sleep(self.warmup_s)  # stands in for compiling every shape
        self._thread = threading.Thread(target=self._loop, name="mock-engine", daemon=True)
        self._thread.start()
        self._ready.set()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
        end = None if timeout is None else time.monotonic() + timeout
        while drain and self._known and self._thread is not None and (end is None or time.monotonic() < end):
            time.sleep(self.tick_s)
        with self._lock:
            for rid in list(self._known):
                self.cancel(rid)
        self._halt.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request, callback: Callback) -> None:
        self._validate(request)
        stops = request.sampling.stop
        seq = _Seq(request, callback, self.tokenizer.stream_decoder(), hold=max(map(len, stops), default=1) - 1)
        with self._lock:
            if self._stopping:
                raise RuntimeError("engine is stopping")
            if request.request_id in self._known:
                raise RequestError("request_id", f"{request.request_id!r} is already in flight")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting), self.retry_after_s)
            heapq.heappush(self._waiting, (-request.priority, next(self._order), seq))
            self._known[request.request_id] = seq
            self.submitted += 1

    def cancel(self, request_id: str) -> bool:
        with self._lock:
            seq = self._known.get(request_id)
            if seq is None:
                return False
            self._finish(seq, "cancelled", time.monotonic())
            return True

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": len(self._running),
                "pages_total": self.pages_total,
                "pages_free": len(self._free_pages),
                "page_size": self.page_size,
                "prefix_hit_rate": 0.0,
                "tokens_in": self.tokens_in,
                "tokens_out": self.tokens_out,
                "submitted": self.submitted,
                **{f"finished_{k}": v for k, v in self.finished.items()},
            }

    # -- internals -----------------------------------------------------------------------------
    def _validate(self, r: Request) -> None:
        r.sampling.validate(self.vocab_size)
        if not r.prompt_ids:
            raise RequestError("prompt", "is empty")
        for i, t in enumerate(r.prompt_ids):
            if not 0 <= t < self.vocab_size:
                raise RequestError("prompt", f"token id {t} at index {i} is outside the vocabulary [0, {self.vocab_size})")
        if len(r.prompt_ids) + r.sampling.max_tokens > self.max_context:
            raise RequestError("max_tokens", f"prompt ({len(r.prompt_ids)}) + max_tokens ({r.sampling.max_tokens}) "
                                             f"exceeds the context ({self.max_context})")
        if r.adapter and r.adapter not in self.adapters:
            raise RequestError("adapter", f"unknown adapter {r.adapter!r}")

    def _pages_needed(self, seq: _Seq) -> int:
        return math.ceil((len(seq.request.prompt_ids) + seq.request.sampling.max_tokens) / self.page_size)

    def _loop(self) -> None:
        while not self._halt.wait(self.tick_s):
            with self._lock:
                now = time.monotonic()
                for seq in list(self._known.values()):
                    if seq.request.deadline is not None and now >= seq.request.deadline:
                        self._finish(seq, "deadline", now)
                while self._waiting and len(self._running) < self.max_running:
                    seq = self._waiting[0][2]
                    need = self._pages_needed(seq)
                    if need > len(self._free_pages):
                        break
                    heapq.heappop(self._waiting)
                    seq.pages = [self._free_pages.pop() for _ in range(need)]
                    seq.scheduled = now
                    self._running[seq.request.request_id] = seq
                for seq in list(self._running.values()):
                    self._step(seq, now)

    def _step(self, seq: _Seq, now: float) -> None:
        r, sp = seq.request, seq.request.sampling
        token = echo_completion(r.prompt_ids, len(seq.out_ids) + 1)[-1]
        seq.out_ids.append(token)
        seq.first_token = seq.first_token or now
        reason = None
        if (token in self.tokenizer.eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
            reason = "stop"
        else:
            seq.text += seq.decoder.push(token)
            hits = [i for i in (seq.text.find(s) for s in sp.stop) if i >= 0]
            if hits:
                seq.text, reason = seq.text[:min(hits)], "stop"
        if reason is None and len(seq.out_ids) >= sp.max_tokens:
            seq.text += seq.decoder.finish()
            reason = "length"
        logprobs = []
        if sp.logprobs:
            top = [((token + k) % self.vocab_size, -0.25 - k) for k in range(sp.logprobs)]
            logprobs = [TokenLogprob(token, -0.25, top)]
        if reason is not None:
            self._finish(seq, reason, now, [token], logprobs)
            return
        upto = max(seq.released, len(seq.text) - seq.hold)
        delta, seq.released = seq.text[seq.released:upto], upto
        seq.callback(RequestOutput(r.request_id, [token], delta, logprobs))

    def _finish(self, seq: _Seq, reason: str, now: float, tokens=(), logprobs=()) -> None:
        r = seq.request
        self._known.pop(r.request_id, None)
        if self._running.pop(r.request_id, None) is None:
            self._waiting = [w for w in self._waiting if w[2] is not seq]
            heapq.heapify(self._waiting)
        for p in seq.pages:
            if p in self._free_pages:
                raise AssertionError(f"page {p} freed twice")
            self._free_pages.append(p)
        seq.pages = []
        self.finished[reason] += 1
        self.tokens_in += len(r.prompt_ids)
        self.tokens_out += len(seq.out_ids)
        delta = seq.text[seq.released:] if reason in ("stop", "length") else ""
        seq.released = len(seq.text)
        timings = Timings(queue_s=(seq.scheduled or now) - r.arrival,
                          ttft_s=(seq.first_token - r.arrival) if seq.first_token else 0.0,
                          total_s=now - r.arrival)
        usage = Usage(prompt_tokens=len(r.prompt_ids), completion_tokens=len(seq.out_ids))
        seq.callback(RequestOutput(r.request_id, list(tokens), delta, list(logprobs), finished=True,
                                   finish_reason=reason, usage=usage, timings=timings))
