"""Launch parameters of a Pallas Triton kernel whose tiles its inputs fix (one program per token
or row: `rope_kv_write`, `residual_norm`), validated once for both."""

from __future__ import annotations

import dataclasses

from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Launch:
    """`num_warps` (a power of two) and `num_stages` (>= 1) of the Triton launch."""

    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"{self.num_warps=} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"{self.num_stages=} must be >= 1")

    def compiler_params(self, interpret: bool):
        """The pallas_call's compiler_params (None for the interpreter)."""
        return None if interpret else plgpu.CompilerParams(num_warps=self.num_warps,
                                                           num_stages=self.num_stages)
