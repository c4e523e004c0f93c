"""What flows between a front end (library, gRPC server) and the serving loop.

The serving loop (`pallax.decode.scheduler.Scheduler`) runs on its own thread. A front end submits
a `Request` with a callback; the loop calls it from its thread with `RequestOutput` increments
(new tokens, text delta, logprobs) and a final one carrying the finish reason, usage and timings.
Front ends hop the callback onto their own thread or event loop (`loop.call_soon_threadsafe`).
Nothing here knows about gRPC.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")
MAX_DRAFT_TOKENS = 16  # the largest k (num_draft_tokens) a request may ask for


class RequestError(ValueError):
    """A request that cannot be served as given; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; retry after `retry_after_s`."""

    def __init__(self, depth: int, retry_after_s: float = 1.0):
        super().__init__(f"request queue is full ({depth} waiting); retry in {retry_after_s:.1f}s")
        self.depth = depth
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # 0: none; n > 0: the chosen token's logprob and the top-n alternatives
    speculative: str | None = None  # None | "ngram" (prompt lookup) | "draft" (the engine's draft model)
    num_draft_tokens: int = 4  # k: drafts per verification (the most, when the engine adapts k)

    @property
    def plain_greedy(self) -> bool:
        """Greedy, unpenalized, no alternatives asked for: the engine serves such rows with
        programs that leave out the sampling filters and the top-n alternatives (each a sort of the
        vocabulary per row)."""
        return self.temperature == 0 and self.repetition_penalty == 1.0 and self.logprobs == 0

    def validate(self, vocab_size: int) -> None:
        """Raise RequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not (_finite(self.temperature) and self.temperature >= 0):
            raise RequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError("top_k", f"must be an integer >= 0, got {self.top_k!r}")
        if not (_finite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not (_finite(self.min_p) and 0 <= self.min_p <= 1):
            raise RequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not (_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise RequestError("repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise RequestError("seed", f"must be an integer in [0, 2**32), got {self.seed!r}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise RequestError("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")
        for s in self.stop:
            if not s:
                raise RequestError("stop", "stop strings must be non-empty")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
            raise RequestError("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        if self.speculative not in (None, "ngram", "draft"):
            raise RequestError("speculative", f"must be None, 'ngram' or 'draft', got {self.speculative!r}")
        if not isinstance(self.num_draft_tokens, int) or not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise RequestError("num_draft_tokens",
                               f"must be an integer in [1, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens!r}")
        if self.speculative and self.repetition_penalty != 1.0:
            raise RequestError("speculative", "cannot be combined with a repetition penalty")


def _finite(x) -> bool:
    """A finite real number: an int, a float or a NumPy float; not a string, None or NaN."""
    return isinstance(x, int) or (isinstance(x, numbers.Real) and math.isfinite(x))


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    priority: int = 0
    deadline: float | None = None  # time.monotonic() value after which the request is ended
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass
class Timings:
    queue_s: float = 0.0  # arrival -> first scheduled
    ttft_s: float = 0.0  # arrival -> first token
    total_s: float = 0.0  # arrival -> finish


@dataclass
class RequestOutput:
    """An increment of one request's output; the last one has `finished` set."""

    request_id: str
    token_ids: list[int]  # new tokens since the previous increment
    text: str  # new text since the previous increment (whole UTF-8 characters)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


Callback = Callable[[RequestOutput], None]


class Engine(Protocol):
    """What a front end needs from a serving loop (the scheduler, or a mock in tests)."""

    vocab_size: int
    max_context: int
    model_name: str

    def submit(self, request: Request, callback: Callback) -> None:
        """Queue a request (validated first: RequestError; queue at bound: QueueFull)."""

    def cancel(self, request_id: str) -> bool:
        """End a request now (finish reason "cancelled"), freeing its pages; False if unknown."""

    def stats(self) -> dict:
        """Gauges and counters: waiting, running, pages_total, pages_free, prefix hit rate, ..."""

    def start(self) -> None:
        """Warm up (compile every shape) and start the loop thread."""

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; finish (drain) or cancel in-flight requests; join the thread."""

    @property
    def ready(self) -> bool:
        """True once warm-up is done."""
