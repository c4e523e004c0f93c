"""Weight loading (GGUF and Hugging Face directories) and the errors bad input gets."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallax
from pallax.model.config import preset
from pallax.model.decoder import forward, init_params
from pallax.model.gguf_loader import GGUFError, load_gguf
from pallax.model.hf_loader import load_hf_dir


def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave each head's rows for its RoPE layout."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny(arch: str):
    c = preset("tiny").replace(arch=arch, qkv_bias=arch == "qwen2", tie_embeddings=arch == "qwen2")
    params = init_params(c, jax.random.key(3), jnp.float32)
    if c.qkv_bias:
        params["layers"] = dict(params["layers"])
        for name in ("bq", "bk", "bv"):
            params["layers"][name] = 0.1 * jax.random.normal(jax.random.key(4), params["layers"][name].shape)
    return c, jax.tree.map(np.asarray, params)


_GGUF_NAMES = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
               "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
               "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
               "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
_HF_NAMES = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
             "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
             "mlp_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
             "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight", "bq": "self_attn.q_proj.bias",
             "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}


def write_gguf(path, c, params, *, skip=(), arch=None, qtype=None):
    w = gguf.GGUFWriter(str(path), arch or c.arch)
    a = arch or c.arch
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_uint32(f"{a}.vocab_size", c.vocab_size)

    def add(name, arr):
        if name in skip:
            return
        arr = np.ascontiguousarray(arr, np.float32)
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", params["embed"])
    for i in range(c.n_layers):
        for ours, theirs in _GGUF_NAMES.items():
            if ours not in params["layers"]:
                continue
            arr = params["layers"][ours][i]
            arr = arr.T if arr.ndim == 2 else arr  # [out, in] rows as GGUF stores them
            if c.arch == "llama" and ours in ("wq", "bq"):
                arr = _llamacpp_permute(arr, c.n_heads)
            if c.arch == "llama" and ours in ("wk", "bk"):
                arr = _llamacpp_permute(arr, c.n_kv_heads)
            add(f"blk.{i}.{theirs}", arr)
    add("output_norm.weight", params["final_norm"])
    if "lm_head" in params:
        add("output.weight", params["lm_head"].T)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf_dir(path, c, params):
    from safetensors.numpy import save_file

    path.mkdir()
    cfg = {"model_type": c.arch, "vocab_size": c.vocab_size, "hidden_size": c.dim,
           "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.ffn_dim,
           "max_position_embeddings": c.max_seq_len, "rope_theta": c.rope_theta, "rms_norm_eps": c.norm_eps,
           "tie_word_embeddings": c.tie_embeddings}
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    for i in range(c.n_layers):
        for ours, theirs in _HF_NAMES.items():
            if ours in params["layers"]:
                arr = params["layers"][ours][i]
                tensors[f"model.layers.{i}.{theirs}"] = arr.T if arr.ndim == 2 else arr
    if "lm_head" in params:
        tensors["lm_head.weight"] = params["lm_head"].T
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path / "model.safetensors"))


def _logits(c, params):
    tokens = jnp.arange(10, dtype=jnp.int32)[None] * 7 % c.vocab_size
    return np.asarray(forward(params, tokens, jnp.arange(10)[None], config=c)[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_and_hf_round_trip(tmp_path, arch):
    """A checkpoint written the way llama.cpp's converter writes it (Q/K rows permuted for llama)
    and the same weights as a Hugging Face directory load to the same parameters."""
    c, params = _tiny(arch)
    write_gguf(tmp_path / "m.gguf", c, params)
    write_hf_dir(tmp_path / "hf", c, params)
    gc, gp = load_gguf(tmp_path / "m.gguf", jnp.float32)
    hc, hp = load_hf_dir(tmp_path / "hf", jnp.float32)
    for loaded in (gp, hp):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6), loaded, params)
    assert (gc.arch, gc.qkv_bias, gc.tie_embeddings) == (arch, arch == "qwen2", arch == "qwen2")
    assert (hc.n_kv_heads, hc.head_dim) == (c.n_kv_heads, c.head_dim)
    np.testing.assert_allclose(_logits(gc, gp), _logits(c, params), atol=1e-5)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16,
                                   gguf.GGMLQuantizationType.BF16])
def test_gguf_quantized_types_dequantize(tmp_path, qtype):
    c, params = _tiny("llama")
    write_gguf(tmp_path / "q.gguf", c, params, qtype=qtype)
    _, loaded = load_gguf(tmp_path / "q.gguf", jnp.float32)
    wq, ref = np.asarray(loaded["layers"]["wq"]), params["layers"]["wq"]
    rel = np.linalg.norm(wq - ref) / np.linalg.norm(ref)
    assert 0 <= rel < 1e-2, rel


def test_gguf_errors(tmp_path):
    c, params = _tiny("llama")
    with pytest.raises(GGUFError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(tmp_path / "text.gguf")
    write_gguf(tmp_path / "full.gguf", c, params)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(tmp_path / "cut.gguf")
    write_gguf(tmp_path / "gpt2.gguf", c, params, arch="gpt2")
    with pytest.raises(GGUFError, match="unsupported architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")
    write_gguf(tmp_path / "missing.gguf", c, params, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf(tmp_path / "missing.gguf")
    bad = dict(params, layers=dict(params["layers"], w_up=params["layers"]["w_up"][:, :, :-1]))
    write_gguf(tmp_path / "shape.gguf", c, bad)
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight' has shape"):
        load_gguf(tmp_path / "shape.gguf")


def test_api_errors(smollm_f32, tmp_path):
    with pytest.raises(ValueError, match="empty prompt"):
        smollm_f32.generate("")
    too_long = [5] * smollm_f32.config.max_seq_len
    with pytest.raises(ValueError, match="context is 8192"):
        smollm_f32.generate(too_long)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm_f32.generate([1, 2, 10**6])
    with pytest.raises(ValueError, match="max_tokens"):
        smollm_f32.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens: .* got 2.5"):  # not truncated to 2
        smollm_f32.generate("hi", max_tokens=2.5)
    with pytest.raises(ValueError, match="seed"):
        next(smollm_f32.stream("hi", seed=1.5))
    with pytest.raises(ValueError, match="top_p"):
        smollm_f32.generate("hi", top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        smollm_f32.generate("hi", temperature=float("nan"))
    with pytest.raises(ValueError, match="dtype"):
        pallax.load(dtype="int3")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        pallax.load("no-such-model")
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        pallax.load(str(tmp_path / "absent.gguf"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pallax.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    for args in (["info", str(tmp_path / "absent.gguf")], ["info", str(tmp_path / "junk.gguf")],
                 ["info", "no-such-model"], ["generate", "", "--max-tokens", "4"],
                 ["generate", "hi", "--compile-cache", str(tmp_path / "junk.gguf" / "compiled")]):
        r = _cli(*args)
        assert r.returncode != 0, args
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pallax: error:"), (args, r.stderr)
        assert "compile-cache" not in args or "junk.gguf/compiled" in err[0], r.stderr


def test_cli_info_and_generate(tmp_path):
    r = _cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30
    assert info["quantization"]["Q4_1"] > 0
    assert 130e6 < info["parameters"] < 140e6
    cache = tmp_path / "compiled"
    args = ("generate", "The capital of France is", "--max-tokens", "3", "--dtype", "float32", "--compile-cache",
            str(cache))
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")
    # the programs it compiled are in the cache, under keys a later process computes alike: the
    # second run adds no program and prints the same
    programs = sorted(p.name for p in cache.glob("*-cache"))
    assert programs
    again = _cli(*args)
    assert again.returncode == 0 and again.stdout == r.stdout, again.stderr
    assert sorted(p.name for p in cache.glob("*-cache")) == programs
