"""A simple cached decode loop: batched prefill into a contiguous cache, then one jitted step per
token. Shapes are bucketed (batch, prompt length and cache length rounded up to powers of two), so
each bucket compiles once and the per-token step never recompiles.

This is the library's generation path until the paged engine takes over behind the same API.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallax.model.attention import DenseCache
from pallax.model.config import ModelConfig
from pallax.model.decoder import forward

from .sampling import SamplingArrays, row_keys, sample


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclass
class StepOutput:
    """Tokens sampled for every row at one step; `done[i]` once row i has finished."""

    tokens: np.ndarray  # [B] int32
    done: np.ndarray  # [B] bool


class SimpleDecoder:
    """Generates for a batch of token-id prompts with per-row sampling parameters."""

    def __init__(self, config: ModelConfig, params, cache_dtype):
        self.config = config
        self.params = params
        self.cache_dtype = cache_dtype
        self.prefill = jax.jit(functools.partial(_prefill, config=config))
        self.step = jax.jit(functools.partial(_step, config=config), donate_argnums=(1,))

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: Sequence[int],
        sampling: SamplingArrays,
        seeds: Sequence[int],
        eos_ids: set[int],
    ) -> Iterator[StepOutput]:
        """Yields the tokens of each step until every row has finished (EOS or its max_tokens)."""
        n = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        B = bucket(n, 1)
        P = bucket(int(lens.max()))
        S = bucket(int((lens + np.asarray(max_tokens)).max()), 64)
        tokens = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        positions = np.where(np.arange(P)[None, :] < np.pad(lens, (0, B - n))[:, None], np.arange(P)[None, :], S)
        lens_b = np.pad(lens, (0, B - n), constant_values=1)
        pad = lambda a, v: jnp.concatenate([a, jnp.full((B - n,), v, a.dtype)])  # noqa: E731
        sampling = jax.tree.map(lambda a: pad(a, a[0] * 0), sampling)
        seeds_b = jnp.asarray(np.pad(np.asarray(seeds, np.uint32), (0, B - n)))
        cache = DenseCache.create(self.config, B, S, self.cache_dtype)
        tok, cache = self.prefill(self.params, jnp.asarray(tokens), jnp.asarray(positions, jnp.int32),
                                  jnp.asarray(lens_b - 1)[:, None], cache, sampling, seeds_b)
        remaining = np.array(list(max_tokens) + [0] * (B - n))
        done = np.zeros(B, bool)
        done[n:] = True
        pos = lens_b.copy()
        count = 0
        eos = np.array(sorted(eos_ids), np.int32)
        while True:
            host_tok = np.asarray(tok)
            count += 1
            finished = ~done & (np.isin(host_tok, eos) | (count >= remaining))
            yield StepOutput(tokens=host_tok[:n].copy(), done=(done | finished)[:n].copy())
            done |= finished
            if done.all():
                return
            # Finished rows keep stepping (static batch) but write nowhere: position S is dropped.
            step_pos = np.where(done, S, pos).astype(np.int32)
            tok, cache = self.step(self.params, cache, tok, jnp.asarray(step_pos), sampling, seeds_b,
                                   jnp.int32(count))
            pos += 1


def _prefill(params, tokens, positions, last_index, cache, sampling, seeds, *, config):
    logits, cache = forward(params, tokens, positions, cache, config=config, logit_indices=last_index)
    steps = jnp.zeros(tokens.shape[0], jnp.int32)
    return sample(logits[:, 0], sampling, row_keys(seeds, steps)), cache


def _step(params, cache, tok, positions, sampling, seeds, count, *, config):
    logits, cache = forward(params, tok[:, None], positions[:, None], cache, config=config)
    steps = jnp.full(tok.shape, count, jnp.int32)
    return sample(logits[:, 0], sampling, row_keys(seeds, steps)), cache
