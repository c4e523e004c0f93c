"""Post-training quantization of a loaded model, and saving / loading the result.

    from pallax.model.quantize import quantize, save_quantized, load_quantized
    q = quantize(llm, "int4-awq", group_size=128, calibration=lee_calibration_texts())
    save_quantized(q, "out/")          # pallax.load("out/") reads it back

Formats (the seven projections of every layer; embedding and norms stay in the model dtype, the
output head only with `quantize_head`):

- ``int8``: weight-only, symmetric per output channel (`Int8Weight`).
- ``int4``: round-to-nearest, group ``group_size`` along K, symmetric or asymmetric (`Int4Weight`).
- ``int4-awq``: activation-aware scaling (Lin et al. 2023, "AWQ"): per input channel
  ``s = mean|x|^alpha`` over calibration activations, ``alpha`` grid-searched in [0, 1) to minimize
  the output error ``|| x W - (x / s) Q(diag(s) W) ||^2`` on those activations; the weight stores
  ``Q(diag(s) W)`` and ``s``, and its `matmul` divides x by s (the decoder is a pure function with
  no op to fold ``1/s`` into). The projections that read one input (wq, wk, wv; w_gate, w_up)
  share one ``s``, as in the AWQ reference implementation, so that they can still be served as one
  GEMM (`decoder.fuse_projections`); it is searched with W their concatenation along the output
  axis, the error taken over all their outputs together (the reference measures it at the output
  of the attention / MLP block instead). ``alpha = 0`` (``s = 1``) is plain RTN, so the search
  never does worse than RTN on the calibration set, per group of projections. AWQ's weight
  clipping search is not done.
- ``fp8``: e4m3 weights per output channel, activations quantized per token at run time
  (`Fp8Weight`). With ``calibration`` the weights are rounded with error compensation (Frantar
  et al. 2022, "GPTQ"): input channels are rounded one at a time, and each rounding error is
  spread over the channels not yet rounded through the inverse of ``H = X^T X`` of the
  calibration inputs, minimizing ``|| X W - X Q ||^2`` rather than ``|| W - Q ||^2``; the stored
  format is the same. Without calibration: round to nearest.

Calibration activations come from running the dense model layer by layer over ``calibration``
(texts, or token id sequences), 128 sequences of 64 tokens by default.

Saved layout (a directory): ``model.safetensors`` (every array; bf16 / fp8 stored as their bit
patterns, uint16 / uint8), ``pallax_quant.json`` (model config, tokenizer settings, and per tensor
its format, fields and dtypes), ``tokenizer.json``, and a Hugging Face style ``config.json`` so
`pallax info` can describe the directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .attention import self_attention
from .config import ModelConfig, RopeScaling
from .decoder import Params, unfuse_projections
from .layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq
from .linear import QuantizedWeight, linear
from .quant_weights import WEIGHT_TYPES, Fp8Weight, Int4Weight, Int8Weight, portable_layout
from pallax.kernels_pallas.quant_formats import FP8_MAX, dequantize_int4, quantize_int4

FORMATS = ("int8", "int4", "int4-awq", "fp8")
PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The activation each projection reads (AWQ statistics and scales are per input).
_INPUT_OF = {"wq": "attn_in", "wk": "attn_in", "wv": "attn_in", "wo": "attn_out",
             "w_gate": "mlp_in", "w_up": "mlp_in", "w_down": "mlp_act"}
_READERS = {i: tuple(n for n in PROJECTIONS if _INPUT_OF[n] == i) for i in _INPUT_OF.values()}
CALIB_SEQS, CALIB_LEN = 128, 64
AWQ_GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as in the AWQ reference implementation
AWQ_SEARCH_TOKENS = 512  # calibration tokens (random subset) on which the output error is measured
QUANT_FILE = "pallax_quant.json"
WEIGHTS_FILE = "model.safetensors"

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------- quantize


def quantize(llm, format: str, *, group_size: int = 128, symmetric: bool = True,
             quantize_head: bool = False, calibration=None, progress: Progress | None = None,
             calib_seqs: int = CALIB_SEQS, calib_len: int = CALIB_LEN):
    """A new `LLM` whose projections are quantized to `format` (see the module docstring).

    `calibration` (``int4-awq``, and ``fp8`` for error-compensated rounding): texts (tokenized with the model's tokenizer, joined and cut
    into ``calib_seqs`` sequences of ``calib_len`` tokens) or token id sequences. `progress` is
    called as ``progress(done, total)``.
    """
    from pallax.api import LLM

    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; known: {', '.join(FORMATS)}")
    config: ModelConfig = llm.config
    params: Params = stacked(llm.params)
    for name in PROJECTIONS:
        w = params["layers"][name]
        if not isinstance(w, (jax.Array, np.ndarray)):
            raise ValueError(f"layers.{name} is already quantized ({w.format}); quantize a dense model")
    head_in = config.dim
    if format.startswith("int4"):
        for name in PROJECTIONS:
            k = params["layers"][name].shape[1]
            if group_size <= 0 or k % group_size or group_size % 2:
                ok = [g for g in (32, 64, 128) if all(params["layers"][n].shape[1] % g == 0 for n in PROJECTIONS)]
                raise ValueError(f"group_size={group_size} must divide K={k} of layers.{name} "
                                 f"(group sizes that fit this model: {ok})")
        if quantize_head and head_in % group_size:
            raise ValueError(f"group_size={group_size} must divide K={head_in} of the output head")
    tokens = None
    if format == "int4-awq" and (calibration is None or len(calibration) == 0):
        raise ValueError("int4-awq needs calibration data (calibration=texts or token id sequences)")
    calibrated = format in ("int4-awq", "fp8") and calibration is not None and len(calibration) > 0
    if calibrated:
        tokens = calibration_batch(llm, calibration, calib_seqs, calib_len)

    L = config.n_layers
    total = L * len(PROJECTIONS) + (1 if quantize_head else 0)
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    def awq_scale(ws, stats):  # one s for the weights [K, N_i] that read one input
        x_mean, x_search = stats
        w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=1)
        return awq_search(x_search, x_mean, w, group_size=group_size, symmetric=symmetric)[0]

    def quantize_one(w, stats=None, act_scale=None):
        if format == "int8":
            return _q_int8(w)
        if format == "fp8":
            return _q_fp8(w) if stats is None else gptq_fp8(w, stats)
        if format == "int4-awq" and act_scale is None:
            act_scale = awq_scale([w], stats)
        return _q_int4(w, act_scale, group_size=group_size, symmetric=symmetric)

    new_layers = {k: v for k, v in params["layers"].items() if k not in PROJECTIONS}
    per_layer: dict[str, list] = {name: [] for name in PROJECTIONS}
    if calibrated:
        x = params["embed"][tokens]  # [B, T, dim]
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(config))
        pick = np.random.default_rng(0).permutation(tokens.size)[:AWQ_SEARCH_TOKENS]

        def stat(acts):  # what quantize_one needs to know of a projection's input activations
            return _act_stats(acts, pick) if format == "int4-awq" else gptq_factor(_gram(acts))
    for i in range(L):
        p = jax.tree.map(lambda a: a[i], params["layers"])
        if calibrated:
            x, taps = _layer_taps(p, x, positions, cos, sin, config=config)
            stats = {k: stat(v) for k, v in taps.items()}
        shared = {}  # int4-awq: input -> the s searched over all the projections that read it
        for name in PROJECTIONS:
            inp = _INPUT_OF[name]
            if format == "int4-awq" and inp not in shared:
                shared[inp] = awq_scale([p[n] for n in _READERS[inp]], stats[inp])
            s = shared.get(inp)
            per_layer[name].append(quantize_one(p[name], stats[inp] if calibrated else None, s))
            tick()
    for name in PROJECTIONS:
        new_layers[name] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer[name])
    new_params = {**params, "layers": new_layers}
    if quantize_head:
        head = params["embed"].T if config.tie_embeddings else params["lm_head"]  # [dim, vocab]
        stats = stat(rms_norm(x, params["final_norm"], config.norm_eps)) if calibrated else None
        new_params["lm_head"] = quantize_one(head, stats)
        config = config.replace(tie_embeddings=False)
        tick()
    return LLM(config=config, params=new_params, tokenizer=llm.tokenizer, dtype=llm.dtype, path=llm.path)


def stacked(params: Params) -> Params:
    """Parameters in the standard layout: `layers` stacked on a leading axis, projections separate,
    int4 in the portable packing, dense weights `[K, N]` (undoes `decoder.unstack_layers`,
    `decoder.fuse_projections`, `quant_weights.hopper_layout` and `linear.transposed_layout`, as an
    engine holds them)."""
    params = portable_layout(params)
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        # Unfused first: layers may be fused differently (a group stays separate where it cannot share a GEMM).
        layers = unfuse_projections(params)["layers"]
        return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}
    return params


@jax.jit
def _q_int8(w):
    return Int8Weight.quantize(w)


@jax.jit
def _q_fp8(w):
    return Fp8Weight.quantize(w)


@functools.partial(jax.jit, static_argnames=("group_size", "symmetric"))
def _q_int4(w, act_scale=None, *, group_size, symmetric):
    return Int4Weight.quantize(w, group_size, symmetric=symmetric, act_scale=act_scale)


def calibration_batch(llm, calibration, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN) -> jax.Array:
    """Texts or token id sequences -> ``[B, seq_len]`` int32 (B <= n_seqs): all tokens joined in
    order (texts each start with BOS when the model adds one) and cut into full sequences."""
    ids: list[int] = []
    for item in calibration:
        if isinstance(item, str):
            t = llm.tokenizer.encode(item)
            if llm.tokenizer.add_bos and llm.tokenizer.bos_id is not None:
                t = [llm.tokenizer.bos_id] + t
        else:
            t = [int(v) for v in item]
        ids.extend(t)
        if len(ids) >= n_seqs * seq_len:
            break
    b = min(n_seqs, len(ids) // seq_len)
    if b == 0:
        raise ValueError(f"calibration data has {len(ids)} tokens; need at least {seq_len}")
    arr = np.asarray(ids[: b * seq_len], np.int32).reshape(b, seq_len)
    if arr.min() < 0 or arr.max() >= llm.config.vocab_size:
        raise ValueError("calibration token ids are outside the model's vocabulary")
    return jnp.asarray(arr)


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_taps(p, x, positions, cos, sin, *, config: ModelConfig):
    """One decoder layer (as `decoder.forward` runs it, no cache) returning the next hidden state
    and the input of every projection: attn_in [B, T, dim], attn_out [B, T, H*hd],
    mlp_in [B, T, dim], mlp_act [B, T, ffn]."""
    c = config
    B, T, _ = x.shape
    h = rms_norm(x, p["attn_norm"], c.norm_eps)
    q = linear(h, p["wq"], p.get("bq")).reshape(B, T, c.n_heads, c.head_dim)
    k = linear(h, p["wk"], p.get("bk")).reshape(B, T, c.n_kv_heads, c.head_dim)
    v = linear(h, p["wv"], p.get("bv")).reshape(B, T, c.n_kv_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = self_attention(q, k, v, positions)
    o = o.reshape(B, T, c.q_dim)
    x = x + linear(o, p["wo"])
    h2 = rms_norm(x, p["mlp_norm"], c.norm_eps)
    a = jax.nn.silu(linear(h2, p["w_gate"])) * linear(h2, p["w_up"])
    x = x + linear(a, p["w_down"])
    return x, {"attn_in": h, "attn_out": o, "mlp_in": h2, "mlp_act": a}


def _act_stats(acts, pick):
    """(mean |x| per channel over all tokens [K] f32, the search subset of tokens [n, K] f32)."""
    a = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
    return jnp.mean(jnp.abs(a), axis=0), a[jnp.asarray(pick)]


@functools.partial(jax.jit, static_argnames=("group_size", "symmetric", "n_grid"))
def awq_search(x, x_mean, w, *, group_size: int, symmetric: bool = True, n_grid: int = AWQ_GRID):
    """AWQ scale search for one projection, or for several that read one input (their weights
    concatenated along the output axis).

    x [n, K] calibration activations, x_mean [K] mean |x| per input channel, w [K, N].
    Returns (s [K] f32, errors [n_grid]): ``s = x_mean^alpha`` normalized so that
    ``sqrt(max(s) min(s)) = 1``, for the alpha of least output error
    ``mean((x w - x Q(diag(s) w) / s)^2)``.
    """
    w = w.astype(jnp.float32)
    y = x @ w  # [n, N]
    x_mean = jnp.maximum(x_mean.astype(jnp.float32), 1e-4)

    def scale(alpha):
        s = x_mean ** alpha
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def error(alpha):
        s = scale(alpha)
        packed, scales, zeros = quantize_int4(w * s[:, None], group_size, symmetric=symmetric)
        wq = dequantize_int4(packed, scales, zeros, group_size=group_size) / s[:, None]
        return jnp.mean((x @ wq - y) ** 2)

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    errors = jax.lax.map(error, alphas)
    return scale(alphas[jnp.argmin(errors)]), errors


GPTQ_BLOCK = 128  # input channels rounded per block; the rest is updated once per block
GPTQ_DAMP = 0.1  # added to H's diagonal, as a fraction of its mean (keeps H invertible)


@jax.jit
def _gram(acts):
    """H = X^T X [K, K] f32 of calibration activations [..., K]."""
    a = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32)
    return a.T @ a


def gptq_factor(h, *, block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP) -> jax.Array:
    """The upper Cholesky factor U of ``(H + damp mean(diag H) I)^-1`` (``H^-1 = U^T U``) for
    ``h = X^T X [K, K]``, padded with identity to a multiple of ``block``; computed once per
    input and shared by the projections that read it."""
    K = h.shape[0]
    if h.shape != (K, K):
        raise ValueError(f"H must be square, got {h.shape}")
    return _gptq_factor(h, Kp=-(-K // block) * block, damp=damp)


@functools.partial(jax.jit, static_argnames=("Kp", "damp"))
def _gptq_factor(h, *, Kp: int, damp: float):
    K = h.shape[0]
    d = jnp.diagonal(h)
    dead = d <= 0  # channels never active in calibration: their weights do not matter there
    H = jnp.eye(Kp, dtype=jnp.float32).at[:K, :K].set(h + jnp.diag(jnp.where(dead, 1.0, 0.0)))
    H = H + damp * jnp.mean(jnp.where(dead, 1.0, d)) * jnp.eye(Kp, dtype=jnp.float32)
    L = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((L, True), jnp.eye(Kp, dtype=jnp.float32))
    return jnp.linalg.cholesky(Hinv).T


def gptq_fp8(w, u, *, block: int = GPTQ_BLOCK) -> Fp8Weight:
    """e4m3 per-output-channel weights for a dense ``w [K, N]`` with error compensation over the
    input channels, given ``u = gptq_factor(X^T X)`` of calibration inputs X (see the module
    docstring)."""
    K, N = w.shape
    Kp = u.shape[0]
    if Kp % block or not K <= Kp < K + block:
        raise ValueError(f"factor of size {Kp} does not fit a weight of shape {w.shape} in blocks of {block}")
    W = jnp.zeros((N, Kp), jnp.float32).at[:, :K].set(w.astype(jnp.float32).T)
    scale = jnp.maximum(jnp.max(jnp.abs(W), axis=1) / FP8_MAX, 1e-12)  # from the dense weight
    for b0 in range(0, Kp, block):
        W = _gptq_block(W, u, scale, jnp.int32(b0), block=block)
    w_q = jnp.clip(W[:, :K] / scale[:, None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return Fp8Weight(w_q=w_q, scale=scale)


@functools.partial(jax.jit, static_argnames=("block",), donate_argnums=(0,))
def _gptq_block(W, U, scale, b0, *, block: int):
    """Round input channels b0 .. b0 + block - 1 of W (left rounded in place) and push their
    errors onto the channels after them."""
    N = W.shape[0]
    W1 = jax.lax.dynamic_slice(W, (0, b0), (N, block))
    U1 = jax.lax.dynamic_slice(U, (b0, b0), (block, block))

    def one(i, carry):
        W1, E1 = carry
        w = W1[:, i]
        q = jnp.clip(w / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
        err = (w - q) / U1[i, i]
        # U1 is upper triangular: channels before i are untouched, channel i becomes q exactly
        return W1 - err[:, None] * U1[i][None, :], E1.at[:, i].set(err)

    W1, E1 = jax.lax.fori_loop(0, block, one, (W1, jnp.zeros_like(W1)))
    rows = jax.lax.dynamic_slice(U, (b0, 0), (block, U.shape[1]))  # [block, Kp]
    later = jnp.arange(U.shape[1]) >= b0 + block
    W = W - jnp.where(later[None, :], E1 @ rows, 0.0)
    return jax.lax.dynamic_update_slice(W, W1, (0, b0))


# ---------------------------------------------------------------------------------- corpus


def lee_corpus(wheel_dir: str | os.PathLike | None = None) -> list[str]:
    """The 300 paragraphs of English news prose in gensim 4.4.0's wheel
    (``gensim/test/test_data/lee_background.cor``); the wheel is fetched with
    ``pip download --no-deps`` into `wheel_dir` (default ``~/.cache/pallax/data``) when absent."""
    member = "gensim/test/test_data/lee_background.cor"
    wheel = _wheel("gensim", "4.4.0", wheel_dir)
    with zipfile.ZipFile(wheel) as z:
        text = z.read(member).decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_calibration_texts(wheel_dir=None) -> list[str]:
    """The first half of the Lee corpus (the second half is held out for evaluation)."""
    paras = lee_corpus(wheel_dir)
    return paras[: len(paras) // 2]


def _wheel(dist: str, version: str, wheel_dir=None) -> Path:
    import subprocess
    import sys

    from .registry import cache_dir

    d = Path(wheel_dir) if wheel_dir else cache_dir() / "data"
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    found = sorted(d.glob(pattern))
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d), f"{dist}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(d.glob(pattern))
        if r.returncode or not found:
            raise FileNotFoundError(f"could not fetch {dist}=={version} into {d}: {r.stderr.strip()[-500:]}")
    return found[-1]


# ------------------------------------------------------------------------------ save / load


def _bits(a: np.ndarray) -> np.ndarray:
    """Arrays safetensors' numpy side cannot read back (bf16, fp8) as their bit patterns."""
    a = np.asarray(a)
    if a.dtype.kind == "V":  # ml_dtypes: bfloat16, float8_*
        return a.view({1: np.uint8, 2: np.uint16}[a.dtype.itemsize])
    return a


def save_quantized(llm, path: str | os.PathLike) -> Path:
    """Write `llm` (quantized or not) to directory `path` (see the module docstring)."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}

    def put(key, a):
        a = np.asarray(jax.device_get(a))
        arrays[key] = _bits(a)
        return {"key": key, "dtype": str(a.dtype), "shape": list(a.shape)}

    def walk(node, prefix):
        for name, v in node.items():
            key = f"{prefix}{name}"
            if isinstance(v, dict):
                walk(v, key + ".")
            elif isinstance(v, QuantizedWeight):
                fields = {}
                static = {}
                for f in dataclasses.fields(v):
                    val = getattr(v, f.name)
                    if not f.metadata.get("pytree_node", True):
                        static[f.name] = val
                    elif val is not None:
                        fields[f.name] = put(f"{key}.{f.name}", val)
                tensors[key] = {"format": v.format, "fields": fields, "static": static}
            else:
                tensors[key] = {"format": "dense", "fields": {"w": put(key, v)}}

    walk(stacked(llm.params), "")
    save_file(arrays, str(out / WEIGHTS_FILE))
    formats = sorted({t["format"] for t in tensors.values()})
    tok = llm.tokenizer
    tok.backend.save(str(out / "tokenizer.json"))
    meta = {
        "version": 1,
        "formats": formats,
        "dtype": llm.dtype,
        "source": str(llm.path) if llm.path else None,
        "config": dataclasses.asdict(llm.config),
        "tokenizer": {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                      "add_bos": tok.add_bos, "chat_template": tok.chat_template,
                      "eos_ids": sorted(tok.eos_ids), "vocab_size": tok.vocab_size},
        "tensors": tensors,
    }
    (out / QUANT_FILE).write_text(json.dumps(meta, indent=1))
    (out / "config.json").write_text(json.dumps(_hf_config(llm.config), indent=1))
    return out


def _hf_config(c: ModelConfig) -> dict:
    cfg = {"model_type": c.arch, "_name_or_path": c.name, "vocab_size": c.vocab_size,
           "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.ffn_dim, "head_dim": c.head_dim,
           "max_position_embeddings": c.max_seq_len, "rope_theta": c.rope_theta,
           "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
           "attention_bias": c.qkv_bias, "quantization_config": {"quant_method": "pallax"}}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position}
    return cfg


def is_quantized_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / QUANT_FILE).is_file()


def load_quantized(path: str | os.PathLike):
    """The `LLM` saved by `save_quantized` (arrays bit-exact)."""
    import tokenizers
    from safetensors import safe_open

    from pallax.api import LLM
    from .tokenizer import Tokenizer

    root = Path(path)
    if not is_quantized_dir(root):
        raise ValueError(f"{root}: not a saved pallax model (no {QUANT_FILE})")
    meta = json.loads((root / QUANT_FILE).read_text())
    if meta.get("version") != 1:
        raise ValueError(f"{root / QUANT_FILE}: unsupported version {meta.get('version')!r}")
    cfg = dict(meta["config"])
    if cfg.get("rope_scaling") is not None:
        cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
    if cfg.get("rope_freq_factors") is not None:
        cfg["rope_freq_factors"] = tuple(cfg["rope_freq_factors"])
    config = ModelConfig(**cfg)

    with safe_open(str(root / WEIGHTS_FILE), framework="numpy") as f:
        def get(spec):
            a = f.get_tensor(spec["key"])
            want = jnp.dtype(spec["dtype"])
            a = a.view(want) if a.dtype != want else a
            if list(a.shape) != spec["shape"]:
                raise ValueError(f"{root}: tensor {spec['key']} has shape {a.shape}, expected {spec['shape']}")
            return jnp.asarray(a)

        params: Params = {}
        for key, t in meta["tensors"].items():
            if t["format"] == "dense":
                value = get(t["fields"]["w"])
            elif t["format"] in WEIGHT_TYPES:
                value = WEIGHT_TYPES[t["format"]](**{n: get(s) for n, s in t["fields"].items()}, **t["static"])
            else:
                raise ValueError(f"{root}: tensor {key} has unknown format {t['format']!r}")
            node = params
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value

    tm = meta["tokenizer"]
    backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer = Tokenizer(backend, bos_id=tm["bos_id"], eos_id=tm["eos_id"], pad_id=tm["pad_id"],
                          add_bos=tm["add_bos"], chat_template=tm["chat_template"], eos_ids=tm["eos_ids"],
                          vocab_size=tm["vocab_size"], source=str(root))
    return LLM(config=config, params=params, tokenizer=tokenizer, dtype=meta["dtype"], path=root)
