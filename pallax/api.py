"""The library API: `pallax.load` a model, then tokenize, score and generate.

    import pallax
    llm = pallax.load()                      # the embedded SmolLM2-135M-Instruct
    llm.generate(["The capital of France is"], max_tokens=16)[0].text
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallax.decode.requests import Request, SamplingParams
from pallax.model.config import ModelConfig
from pallax.model.decoder import Params, forward

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "f32": jnp.float32, "bf16": jnp.bfloat16}

Prompt = str | Sequence[int]


@dataclass
class Completion:
    """One finished generation. `token_ids` include the stop token when one ended it; `text` does
    not show it."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, a stop token or string) | "length" (max_tokens or the context)
    prompt_tokens: int = 0
    logprobs: list = field(default_factory=list)  # TokenLogprob per token when asked for
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class Delta:
    """A streamed piece of one generation."""

    token_id: int
    text: str
    finish_reason: str | None = None


@dataclass
class LLM:
    config: ModelConfig
    params: Params
    tokenizer: "object"
    dtype: str
    path: Path | None = None
    _engine: object = field(default=None, repr=False)
    _logits_fn: object = field(default=None, repr=False)

    # -- scoring -------------------------------------------------------------------------------
    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits at every position: [len(ids), vocab] float32."""
        ids = self._check_ids(ids, "ids")
        n = len(ids)
        T = max(16, 1 << (n - 1).bit_length())  # bucket the length: one compile per power of two
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :n] = ids
        if self._logits_fn is None:
            self._logits_fn = jax.jit(lambda p, t, pos: forward(p, t, pos, config=self.config)[0])
        out = self._logits_fn(self.params, jnp.asarray(tokens), jnp.arange(T, dtype=jnp.int32)[None])
        return np.asarray(out[0, :n], np.float32)

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of the text's tokens after the first."""
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise ValueError("perplexity needs a text of at least two tokens")
        logp = log_softmax(self.logits(ids)[:-1])
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        return float(np.exp(nll.mean()))

    # -- generation ----------------------------------------------------------------------------
    def engine(self, config=None):
        """A paged serving loop over this model (`pallax.decode.scheduler.Scheduler`). Without a
        config: the library's own one, used by `generate` and `stream`, created on first use."""
        from pallax.decode.scheduler import Scheduler

        if config is not None:
            return Scheduler(self, config)
        if self._engine is None:
            self._engine = Scheduler(self, _default_engine_config())
        return self._engine

    def with_engine(self, config) -> "LLM":
        """This model (the same weights and tokenizer) with `generate` and `stream` run on an engine
        of `config` (an `EngineConfig`) instead of the library's own: e.g. an int8 KV cache, more
        rows or pages, another draft length or layer layout. The engine is built at once; this
        LLM and its weights are unchanged (an engine that serves another layout converts the new
        LLM's copy)."""
        from pallax.decode.scheduler import EngineConfig, Scheduler

        if not isinstance(config, EngineConfig):
            raise TypeError(f"with_engine takes an EngineConfig, got {type(config).__name__}")
        llm = replace(self, _engine=None)
        llm._engine = Scheduler(llm, config)
        return llm

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int = 0,
        speculative: str | None = None,
        draft_model: "LLM | str | None" = None,
        num_draft_tokens: int = 4,
        **sampling,
    ) -> list[Completion]:
        """Complete each prompt (text, or a list of token ids) on the paged engine, all at once
        (continuous batching). Extra keywords are `SamplingParams` fields (stop, stop_token_ids,
        repetition_penalty, ignore_eos, logprobs).

        Speculative decoding: `speculative="ngram"` drafts by prompt lookup; `speculative="draft"`
        drafts with `draft_model` (an LLM or a model name sharing this model's tokenizer). Up to
        `num_draft_tokens` drafts are verified per step; the output distribution is unchanged
        (greedy output is identical)."""
        prompt_list = [prompts] if _is_single(prompts) else list(prompts)
        if not prompt_list:
            raise ValueError("generate: no prompts given")
        params = self._sampling_params(max_tokens, temperature, top_p, top_k, min_p, seed, speculative,
                                       num_draft_tokens, sampling)
        ids = [self._prompt_ids(p) for p in prompt_list]
        engine = self.engine()
        self._use_draft_model(engine, speculative, draft_model)
        for p in ids:  # validate everything before submitting anything
            engine.validate(_request("check", p, params))
        results: list[list] = [[] for _ in ids]
        for i, p in enumerate(ids):
            engine.submit(_request(f"generate-{id(results)}-{i}", p, params), results[i].append)
        engine.run_until_idle()
        return [_completion(outs, len(p)) for outs, p in zip(results, ids)]

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int = 0,
        speculative: str | None = None,
        draft_model: "LLM | str | None" = None,
        num_draft_tokens: int = 4,
        **sampling,
    ) -> Iterator[Delta]:
        """Yield each generated token with the text it completes (whole UTF-8 characters only).
        Speculative options as in `generate`."""
        params = self._sampling_params(max_tokens, temperature, top_p, top_k, min_p, seed, speculative,
                                       num_draft_tokens, sampling)
        engine = self.engine()
        self._use_draft_model(engine, speculative, draft_model)
        outs: list = []
        rid = f"stream-{id(outs)}"
        engine.submit(_request(rid, self._prompt_ids(prompt), params), outs.append)
        try:
            while True:
                if not outs:
                    if not engine.has_work():
                        return
                    engine.iterate()
                    continue
                out = outs.pop(0)
                for j, t in enumerate(out.token_ids):
                    last = j == len(out.token_ids) - 1
                    yield Delta(token_id=t, text=out.text if last else "",
                                finish_reason=out.finish_reason if last else None)
                if out.finished:
                    return
        finally:
            if engine.cancel(rid):  # the caller stopped early: free the request's pages
                engine.run_until_idle()

    # -- internals -----------------------------------------------------------------------------
    def _sampling_params(self, max_tokens, temperature, top_p, top_k, min_p, seed, speculative, num_draft_tokens,
                         extra: dict) -> SamplingParams:
        """The options of `generate` and `stream` (`extra`: the other SamplingParams fields) as
        SamplingParams, checked by `SamplingParams.validate` (RequestError, a ValueError naming the field)."""
        for key in ("stop", "stop_token_ids"):  # a single stop string or token id may be given bare
            if key in extra:
                extra[key] = tuple([extra[key]] if isinstance(extra[key], (str, int)) else extra[key])
        try:
            params = SamplingParams(max_tokens=_int(max_tokens), temperature=_float(temperature), top_k=_int(top_k),
                                    top_p=_float(top_p), min_p=_float(min_p), seed=_int(seed),
                                    speculative=speculative, num_draft_tokens=_int(num_draft_tokens), **extra)
        except TypeError as e:
            raise ValueError(f"unknown sampling option: {e}") from None
        params.validate(self.config.vocab_size)
        return params

    def _use_draft_model(self, engine, speculative, draft_model) -> None:
        if speculative != "draft":
            if draft_model is not None:
                raise ValueError('draft_model is only used with speculative="draft"')
            return
        if draft_model is None:
            raise ValueError('speculative="draft" needs a draft_model')
        draft = load(draft_model, dtype=self.dtype) if isinstance(draft_model, (str, os.PathLike)) else draft_model
        current = engine.drafters.get("draft")
        if current is None or current.llm is not draft:
            engine.attach_draft_model(draft)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            ids = list(self.tokenizer.encode(prompt))
            if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
                ids = [self.tokenizer.bos_id] + ids
        else:
            ids = list(prompt)
        return self._check_ids(ids, "prompt")

    def _check_ids(self, ids, what: str) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"empty {what}")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_seq_len:
            raise ValueError(f"{what} has {len(ids)} tokens; the model's context is {self.config.max_seq_len}")
        return ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax computed in float64."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _is_single(prompts) -> bool:
    return isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))


def _default_engine_config():
    """Engine settings for library use. On a CPU: a pool of a few full contexts, and one decode
    step a call: a step's compute there (about 0.15 s for SmolLM2-135M) dwarfs the host's round
    trip that several steps a call save, and the multi-step programs would only add compiles."""
    from pallax.decode.scheduler import EngineConfig

    if jax.default_backend() == "cpu":
        return EngineConfig(max_seqs=8, token_budget=128, num_pages=512, decode_steps=1, max_draft_tokens=8)
    return EngineConfig(max_draft_tokens=8)


def _int(x):
    """An integer (int, bool, NumPy integer) as an int; anything else unchanged, for validation to
    reject: int() would truncate max_tokens=2.5 to 2."""
    return int(x) if isinstance(x, numbers.Integral) else x


def _float(x):
    """A real number as a float; anything else (a string, None) unchanged, for validation to reject."""
    return float(x) if isinstance(x, numbers.Real) else x


def _request(rid: str, ids: list[int], params: SamplingParams) -> Request:
    return Request(request_id=rid, prompt_ids=ids, sampling=params)


def _completion(outs: list, prompt_tokens: int) -> Completion:
    final = outs[-1]
    if final.finish_reason == "error":
        raise RuntimeError(f"generation failed: {final.error}")
    return Completion(token_ids=[t for o in outs for t in o.token_ids], text="".join(o.text for o in outs),
                      finish_reason=final.finish_reason, prompt_tokens=prompt_tokens,
                      logprobs=[lp for o in outs for lp in o.logprobs],
                      cached_tokens=final.usage.cached_prompt_tokens)


def load(model: str | os.PathLike | None = None, dtype: str = "bfloat16", progress: bool = False) -> LLM:
    """Load a model: a known name (default: the embedded SmolLM2-135M-Instruct), a .gguf file, a
    Hugging Face directory (config.json + *.safetensors + tokenizer.json) or a directory saved by
    `pallax quantize` (its weights keep their saved formats; `dtype` does not apply)."""
    from pallax.model.registry import DEFAULT_MODEL, resolve_model
    from pallax.model.tokenizer import Tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(DTYPES))}, got {dtype!r}")
    jdtype = DTYPES[dtype]
    from pallax.model.quantize import is_quantized_dir, load_quantized

    if model is not None and is_quantized_dir(model):  # a directory written by `pallax quantize`
        return load_quantized(model)
    path = resolve_model(DEFAULT_MODEL if model is None else str(model))
    bar = _progress_bar(f"loading {path.name}") if progress else None
    tick = (lambda done, total: bar(done, total)) if bar else None
    if path.is_dir():
        from pallax.model.hf_loader import load_hf_dir

        config, params = load_hf_dir(path, jdtype, progress=tick)
        tokenizer = Tokenizer.from_hf_dir(path)
    else:
        from pallax.model.gguf_loader import load_gguf, open_gguf

        reader = open_gguf(path)
        config, params = load_gguf(path, jdtype, progress=tick, reader=reader)
        tokenizer = Tokenizer.from_gguf(reader)
    return LLM(config=config, params=params, tokenizer=tokenizer, dtype=jnp.dtype(jdtype).name, path=path)


COMPILE_CACHE_BYTES = 4 << 30  # the persistent cache's bound; the least recently used programs go first


def use_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Keep compiled programs in JAX's persistent compilation cache at `path` (default: the one
    JAX is already given, else `$PALLAX_CACHE/compiled`, i.e. `~/.cache/pallax/compiled`), at most
    `COMPILE_CACHE_BYTES` of them: a later process that compiles the same program (same model
    shapes, engine settings, flags, devices and jax version) loads it instead, so a restarted
    server's warm-up takes a fraction of the first one. For the whole process; call it before the
    first compile. Returns the directory; a path that cannot be a writable directory is a
    ValueError naming it."""
    from pallax.model.registry import cache_dir

    d = Path(path or jax.config.jax_compilation_cache_dir or cache_dir() / "compiled").expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile cache {str(d)!r}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"compile cache {str(d)!r} is not a writable directory")
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    return d


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = None

    def update(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="tensor", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


_default: LLM | None = None


def generate(prompts, model: str | None = None, **kwargs) -> list[Completion]:
    """`load(model).generate(prompts, **kwargs)`, keeping the default model loaded between calls."""
    global _default
    if model is not None:
        return load(model).generate(prompts, **kwargs)
    if _default is None:
        _default = load()
    return _default.generate(prompts, **kwargs)
