"""Load a Hugging Face model directory (`config.json` + `*.safetensors`) of a llama or qwen2 model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ARCHITECTURES, ModelConfig, RopeScaling
from .decoder import Params, check_params

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
}


def config_from_hf(cfg: dict, path: Path) -> ModelConfig:
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported model_type {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    scaling = None
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
        scaling = RopeScaling(factor=rs["factor"], low_freq_factor=rs["low_freq_factor"],
                              high_freq_factor=rs["high_freq_factor"],
                              original_max_position=rs["original_max_position_embeddings"])
    elif rs:
        raise ValueError(f"{path}: unsupported rope_scaling {rs!r} (only llama3 scaling is implemented)")
    try:
        n_heads = cfg["num_attention_heads"]
        return ModelConfig(
            name=cfg.get("_name_or_path") or path.name,
            arch=arch,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads", n_heads),
            ffn_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or 0,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: missing key {e.args[0]!r}") from None


def load_hf_dir(path: str | os.PathLike, dtype=jnp.bfloat16, progress=None) -> tuple[ModelConfig, Params]:
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"{path}: not a model directory (no config.json)")
    config = config_from_hf(json.loads(cfg_file.read_text()), path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    handles = {}
    for f in files:
        h = safe_open(str(f), framework="numpy")
        for k in h.keys():
            handles[k] = h
    np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)
    c = config

    def get(name: str) -> np.ndarray:
        h = handles.get(name)
        if h is None:
            raise ValueError(f"{path}: missing tensor {name!r}")
        return np.asarray(h.get_tensor(name)).astype(np.float32)

    wanted = [k for k in _LAYER_TENSORS if c.qkv_bias or not k.endswith(".bias")]
    total = c.n_layers * len(wanted) + 3
    done = 0
    params: Params = {"embed": jnp.asarray(get("model.embed_tokens.weight").astype(np_dtype))}
    layers: dict[str, np.ndarray] = {}
    for i in range(c.n_layers):
        for hname in wanted:
            a = get(f"model.layers.{i}.{hname}")
            if a.ndim == 2:
                a = a.T  # [out, in] -> [in, out]
            ours = _LAYER_TENSORS[hname]
            if ours not in layers:
                layers[ours] = np.empty((c.n_layers, *a.shape), np_dtype)
            if layers[ours].shape[1:] != a.shape:
                raise ValueError(f"{path}: tensor model.layers.{i}.{hname} has shape {a.shape[::-1]}, "
                                 f"expected {layers[ours].shape[1:][::-1]}")
            layers[ours][i] = a.astype(np_dtype)
            done += 1
            if progress:
                progress(done, total)
    params["layers"] = {k: jnp.asarray(v) for k, v in layers.items()}
    params["final_norm"] = jnp.asarray(get("model.norm.weight").astype(np_dtype))
    if not c.tie_embeddings:
        params["lm_head"] = jnp.asarray(get("lm_head.weight").T.astype(np_dtype))
    if progress:
        progress(total, total)
    check_params(params, c, str(path))
    return config, params
