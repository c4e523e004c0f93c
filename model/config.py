"""Model configuration: one frozen dataclass and a table of named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHITECTURES = ("llama", "qwen2")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (Llama 3.1 `rope_scaling` with `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    arch: str  # "llama" | "qwen2"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    max_seq_len: int = 8192
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Per-frequency divisors read from a checkpoint (GGUF `rope_freqs.weight`); overrides rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = field(default=None, repr=False)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r}; supported: {ARCHITECTURES}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"{self.dim=} is not divisible by {self.n_heads=}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads=} is not a multiple of {self.n_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"{self.head_dim=} must be even for RoPE")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    def param_count(self) -> int:
        d, L = self.dim, self.n_layers
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        if self.qkv_bias:
            attn += self.q_dim + 2 * self.kv_dim
        per_layer = attn + 3 * d * self.ffn_dim + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + L * per_layer + d + head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig(name="tiny", arch="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4,
                    n_kv_heads=2, ffn_dim=128, max_seq_len=512, rope_theta=10000.0, tie_embeddings=True),
        ModelConfig(name="smollm2-135m", arch="llama", vocab_size=49152, dim=576, n_layers=30,
                    n_heads=9, n_kv_heads=3, ffn_dim=1536, max_seq_len=8192, rope_theta=100000.0,
                    norm_eps=1e-5, tie_embeddings=True),
        ModelConfig(name="qwen2.5-0.5b", arch="qwen2", vocab_size=151936, dim=896, n_layers=24,
                    n_heads=14, n_kv_heads=2, ffn_dim=4864, max_seq_len=32768, rope_theta=1000000.0,
                    norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
        ModelConfig(name="qwen2.5-1.5b", arch="qwen2", vocab_size=151936, dim=1536, n_layers=28,
                    n_heads=12, n_kv_heads=2, ffn_dim=8960, max_seq_len=32768, rope_theta=1000000.0,
                    norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
        ModelConfig(name="llama3-8b", arch="llama", vocab_size=128256, dim=4096, n_layers=32,
                    n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=131072, rope_theta=500000.0,
                    rope_scaling=_LLAMA31_SCALING, norm_eps=1e-5),
        ModelConfig(name="llama3-70b", arch="llama", vocab_size=128256, dim=8192, n_layers=80,
                    n_heads=64, n_kv_heads=8, ffn_dim=28672, max_seq_len=131072, rope_theta=500000.0,
                    rope_scaling=_LLAMA31_SCALING, norm_eps=1e-5),
    ]
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
