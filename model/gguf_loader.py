"""Load a llama / qwen2 GGUF file into a `ModelConfig` and a parameter pytree.

Tensors are read through the `gguf` package, which dequantizes every llama.cpp block format it
knows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ*, F16, BF16, F32). llama.cpp stores the Q and K
projections of `llama` models with each head's rows interleaved for its RoPE kernel
(`convert_hf_to_gguf.py`'s `permute`); `_unpermute` undoes it so both architectures use the
rotate-half layout of the Hugging Face reference.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ARCHITECTURES, ModelConfig
from .decoder import Params, check_params

GGUF_MAGIC = b"GGUF"

# GGUF tensor name (within blk.N.) -> our layer parameter name.
_LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be loaded; the message names the file and the problem."""


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` for `path`, or GGUFError naming why not."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/IndexError/struct errors on damage
        raise GGUFError(f"{path}: unreadable or truncated GGUF ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: truncated GGUF: tensor {t.name} needs bytes up to {end}, file has {size}")
    return reader


def _field(reader, key: str, default: Any = None, *, path: Path | None = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return default
    return f.contents()


def config_from_gguf(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path=path)
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d, path=path)  # noqa: E731
    names = {t.name: t for t in reader.tensors}
    embed = names.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(g("vocab_size", int(embed.shape[1])))
    n_heads = int(g("attention.head_count"))
    dim = int(g("embedding_length"))
    head_dim = int(g("attention.key_length", dim // n_heads))
    freq_factors = None
    if "rope_freqs.weight" in names:
        freq_factors = tuple(float(x) for x in np.asarray(names["rope_freqs.weight"].data, np.float32))
    return ModelConfig(
        name=str(_field(reader, "general.name", path.stem)),
        arch=arch,
        vocab_size=vocab,
        dim=dim,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        ffn_dim=int(g("feed_forward_length")),
        head_dim=head_dim,
        max_seq_len=int(g("context_length", 4096)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_freq_factors=freq_factors,
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a Q or K projection ([out, ...] rows)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major) order: [out, in] for a weight."""
    import gguf

    arr = gguf.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(s) for s in reversed(tensor.shape))
    return np.asarray(arr, np.float32).reshape(shape)


def quantization_summary(reader) -> dict[str, int]:
    """Tensor count per GGUF storage type."""
    return dict(Counter(t.tensor_type.name for t in reader.tensors))


def load_gguf(path: str | os.PathLike, dtype=jnp.bfloat16, progress=None, reader=None) -> tuple[ModelConfig, Params]:
    """Read config and parameters. `progress(done, total)` is called after each tensor; `reader`
    is an already opened `open_gguf(path)` (opening a GGUF costs seconds)."""
    path = Path(path)
    reader = open_gguf(path) if reader is None else reader
    config = config_from_gguf(reader, path)
    np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)
    c = config
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path}: missing tensor {name!r}")
        return _dequantize(t)

    def expect(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if arr.shape != shape:
            raise GGUFError(f"{path}: tensor {name!r} has shape {arr.shape}, expected {shape}")
        return arr

    wanted = [k for k in _LAYER_TENSORS if c.qkv_bias or not k.endswith(".bias")]
    total = 2 + len(wanted) * c.n_layers + (0 if c.tie_embeddings else 1)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    embed = expect("token_embd.weight", get("token_embd.weight"), (c.vocab_size, c.dim))
    params: Params = {"embed": jnp.asarray(embed.astype(np_dtype))}
    tick()
    layers: dict[str, np.ndarray] = {}
    out_rows = {"wq": c.q_dim, "wk": c.kv_dim, "wv": c.kv_dim, "wo": c.dim, "w_gate": c.ffn_dim,
                "w_up": c.ffn_dim, "w_down": c.dim}
    in_cols = {"wq": c.dim, "wk": c.dim, "wv": c.dim, "wo": c.q_dim, "w_gate": c.dim, "w_up": c.dim,
               "w_down": c.ffn_dim}
    vec_len = {"attn_norm": c.dim, "mlp_norm": c.dim, "bq": c.q_dim, "bk": c.kv_dim, "bv": c.kv_dim}
    for i in range(c.n_layers):
        for gname in wanted:
            ours = _LAYER_TENSORS[gname]
            full = f"blk.{i}.{gname}"
            a = get(full)
            if ours in out_rows:
                a = expect(full, a, (out_rows[ours], in_cols[ours]))
            else:
                a = expect(full, a, (vec_len[ours],))
            if c.arch == "llama" and ours in ("wq", "bq"):
                a = _unpermute(a, c.n_heads)
            elif c.arch == "llama" and ours in ("wk", "bk"):
                a = _unpermute(a, c.n_kv_heads)
            if a.ndim == 2:
                a = a.T  # [in, out]
            if ours not in layers:
                layers[ours] = np.empty((c.n_layers, *a.shape), np_dtype)
            layers[ours][i] = a.astype(np_dtype)
            tick()
    params["layers"] = {k: jnp.asarray(v) for k, v in layers.items()}
    params["final_norm"] = jnp.asarray(expect("output_norm.weight", get("output_norm.weight"), (c.dim,)).astype(np_dtype))
    tick()
    if not c.tie_embeddings:
        head = expect("output.weight", get("output.weight"), (c.vocab_size, c.dim))
        params["lm_head"] = jnp.asarray(head.T.astype(np_dtype))
        tick()
    check_params(params, c, str(path))
    return config, params
