"""Benchmark plumbing that can be checked without a GPU."""

import jax
import jax.numpy as jnp

from pallax.bench.step_anatomy import computations, kernel_census


def test_kernel_census_counts_device_work_and_enters_loops():
    def f(x, w):
        def body(i, x):
            return jnp.tanh(x @ w) + i
        y = jax.lax.fori_loop(0, 3, body, x)
        return jnp.sort(y, axis=-1), jax.lax.top_k(y, 2)[0]

    x = jnp.ones((4, 8))
    hlo = jax.jit(f).lower(x, jnp.eye(8)).compile().as_text()
    entry, comps = computations(hlo)
    assert entry in comps and len(comps) > 2
    census = kernel_census(hlo)
    assert census["dot"] + sum(n for k, n in census.items() if k.startswith("fusion")) >= 1  # the body's matmul
    assert census["sort"] >= 1 and not {"parameter", "constant", "tuple", "while"} & set(census)
    # the loop body is entered once, not per trip: three trips of one matmul count one dot
    assert census["dot"] <= 1
