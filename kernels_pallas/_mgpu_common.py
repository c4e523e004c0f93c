"""Pieces the Mosaic GPU kernels share (attention forward and backward, int4 matmul)."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def rendezvous_of(turn) -> None:
    """Two warpgroups meet: each arrives on the two-party barrier `turn`, then waits for the other."""
    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def stream_ring(load: Callable, steps, stages: int, *free) -> None:
    """The producer's side of a TMA ring of `stages` slots: `load(i, slot)` issues step i's copies
    into `slot` for every step in `[0, steps)` (`steps` a Python int or a traced count), the first
    `stages` straight away, each later one once every barrier in `free` has released its slot.
    Then it waits for the last releases too, so no barrier is left with an unobserved phase."""
    def released(i):
        slot = lax.rem(i, jnp.int32(stages))
        for barrier in free:
            plgpu.barrier_wait(barrier.at[slot])
        return slot

    for i in range(stages):
        @pl.when(i < steps)
        def _():
            load(jnp.int32(i), i)

    @pl.loop(stages, steps)
    def _refill(i):
        load(i, released(i))

    last = max(steps - stages, 0) if isinstance(steps, int) else jnp.maximum(steps - stages, 0)

    @pl.loop(last, steps)
    def _drain(i):
        released(i)
