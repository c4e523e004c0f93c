"""Pick a Pallas kernel or its pure-jnp reference.

Kernels run compiled on a GPU; elsewhere the reference runs (fast on a CPU), unless interpret mode
is asked for, which runs the Pallas kernel body through the interpreter so its logic is exercised
without a GPU. The choice comes from `PALLAX_KERNELS` or `set_mode`:

- ``auto`` (default): ``pallas`` on GPU, ``reference`` elsewhere;
- ``pallas``: the compiled kernel;
- ``interpret``: the kernel through the Pallas interpreter;
- ``reference``: the pure-jnp reference.
"""

from __future__ import annotations

import contextlib
import os

import jax

MODES = ("auto", "pallas", "interpret", "reference")
_mode = os.environ.get("PALLAX_KERNELS", "auto")
if _mode not in MODES:
    raise ValueError(f"PALLAX_KERNELS={_mode!r} is not one of {MODES}")


def set_mode(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {MODES}")
    _mode = mode


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Temporarily use another kernel mode (tests)."""
    old = _mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(old)


def resolve() -> str:
    """The effective mode: ``pallas``, ``interpret`` or ``reference``."""
    if _mode != "auto":
        return _mode
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (H100/H200: compute capability 9.0), where the
    Mosaic GPU kernels (wgmma, TMA) run."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


# Shared memory a Mosaic GPU kernel may plan for per CTA on Hopper: the 232448 bytes there, less
# what Mosaic GPU adds to the buffers it is given (alignment, reduction scratch: a flash-attention
# forward counted at 230 KB needed 232568 bytes in all).
MGPU_SMEM_BYTES = 232448 - 4096


def mgpu_interpret(interpret: bool):
    """The `interpret=` value of `plgpu.kernel`: Pallas's GPU interpreter when asked, else None."""
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()
