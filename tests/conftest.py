"""Shared fixtures: the embedded SmolLM2 model (loaded once per session), its reference outputs,
lowering a jitted function for CUDA without a GPU, counting a jaxpr's Pallas kernels, and a small
model served in the Hopper int4 layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Eight fake CPU devices (the sharding tests' mesh; `make test` sets it too). The Mosaic GPU
# interpreter also needs them on a 2-core machine: with one host device its warpgroup threads can
# starve each other and hang. LLVM optimization level 1 compiles faster (the Makefile says why).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "smollm2_135m_instruct_q4_1.json"


def _reference_path() -> Path:
    env = os.environ.get("PALLAX_REFERENCE")
    return Path(env) if env else REFERENCE


@pytest.fixture(scope="session")
def reference() -> dict:
    path = _reference_path()
    if not path.exists():
        pytest.fail(f"reference outputs not found at {path} (set PALLAX_REFERENCE)")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def smollm_f32():
    import pallax

    return pallax.load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def smollm_stacked():
    """SmolLM2 (float32) with its layers stacked, as loaded, for engines that keep them so
    (`EngineConfig(unstack_layers=False)`; an engine that unstacks would convert them): their
    programs run the layers as a scan, which traces and compiles several times faster on a CPU
    than the per-layer loop of the serving layout (`smollm_f32`'s engines, `generate`). For tests
    of what does not depend on the layout (scheduling, drafting, device loops)."""
    import pallax

    return pallax.load("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def smollm_bf16():
    import pallax

    return pallax.load("smollm2-135m-instruct", dtype="bfloat16")


@pytest.fixture
def lower_for_h100():
    """lower(fn, *args) -> the StableHLO text of jitted `fn` lowered for CUDA against an abstract
    H100 (no GPU needed: Pallas Triton kernels are lowered to Triton IR on the way)."""
    import jax

    if not hasattr(jax.sharding, "AbstractDevice"):
        pytest.skip("this jax has no AbstractDevice to lower for a GPU without one")

    def lower(fn, *args) -> str:
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                             platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    return lower


def _count_kernels(jaxpr, name: str) -> int:
    import jax

    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            n += str(eqn.params.get("name", "")) == name
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    n += _count_kernels(sub.jaxpr, name)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count_kernels(sub, name)
    return n


@pytest.fixture
def count_kernels():
    """count(jaxpr, name) -> the Pallas calls named `name` that running `jaxpr` makes (inner
    jaxprs counted per call)."""
    return _count_kernels


@pytest.fixture
def hopper_int4_model():
    """(config, params, fwd): a two-layer model with every projection and the head in the Hopper
    int4 layout (fused q/k/v and gate/up, layers unstacked, as served on a GPU); `fwd(params)`
    runs three tokens and returns the logits (jitted)."""
    import jax
    import jax.numpy as jnp

    from pallax.model.config import ModelConfig
    from pallax.model.decoder import forward, fuse_projections, init_params, unstack_layers
    from pallax.model.quant_weights import Int4Weight, hopper_layout

    c = ModelConfig(name="int4-test", arch="llama", vocab_size=256, dim=256, n_layers=2, n_heads=2,
                    n_kv_heads=1, ffn_dim=512, head_dim=128)
    params = fuse_projections(unstack_layers(init_params(c, jax.random.key(0), jnp.bfloat16)))
    quantize = lambda w: Int4Weight.quantize(w.astype(jnp.float32), 128)  # noqa: E731
    params["layers"] = [{k: quantize(v) if k.startswith("w") else v for k, v in p.items()}
                        for p in params["layers"]]
    params["lm_head"] = quantize(params["lm_head"])
    params = hopper_layout(params)
    tokens = jax.random.randint(jax.random.key(1), (1, 3), 0, c.vocab_size)
    pos = jnp.arange(3)[None]
    # jitted: run op by op it once hung for good on the CPU, the main thread dispatching the
    # next eager op while an interpreted kernel's callback waited on an eager op of its own
    return c, params, jax.jit(lambda p: forward(p, tokens, pos, config=c)[0])
