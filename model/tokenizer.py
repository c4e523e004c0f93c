"""Tokenizer: byte-level BPE built from GGUF metadata or a Hugging Face `tokenizer.json`.

    tok = Tokenizer.from_gguf("model.gguf")          # or Tokenizer.from_hf_dir("hf_dir/")
    ids = tok.encode("text")                          # no BOS added; "<|im_start|>" in text -> its id
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    stream = tok.stream_decoder()                     # streaming: stream.push(id) -> complete text only

A GGUF carries no `tokenizer.json`: the vocabulary, merges, token types and special ids are metadata
under llama.cpp's key names (`tokenizer.ggml.*`). What it does not carry is the pre-tokenizer, the
regex that cuts text into words before BPE merges run; `tokenizer.ggml.pre` only *names* it. The
table `_PRE_SPLITS` maps each name to the split regexes llama.cpp applies for it (`llama-vocab.cpp`),
which are the ones of the model's original `tokenizer.json`. They run in order, each cutting the
pieces of the previous one (tokenizers `Split(..., "isolated")`), followed by the byte-level mapping.

Note on `smollm` (SmolLM/StarCoder family): the original tokenizer splits every digit first
(`Digits(individual_digits=True)` then the GPT-2 regex); llama.cpp does the same. transformers'
GGUF loader (5.x) does not know the name and uses the GPT-2 regex alone, which differs only where a
run of two or more whitespace characters precedes a digit ("a  1": we give ["a", "  ", "1"] like
the original tokenizer, it gives ["a", " ", " ", "1"]). The reference ids agree with both.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is built from GGUF; SentencePiece vocabularies
(`"llama"`) raise a ValueError (load those from a Hugging Face directory instead).
"""

from __future__ import annotations

import json
import os
import pathlib
from datetime import datetime
from typing import Any, Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

# --- pre-tokenizer split rules, per `tokenizer.ggml.pre` (llama.cpp `llama-vocab.cpp`) --------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _family(regexes: tuple[str, ...], ignore_merges: bool, *names: str) -> dict:
    return {name: (regexes, ignore_merges) for name in names}


# name -> (split regexes applied in order, BPE ignore_merges: a whole word found in the vocab is one token)
_PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    **_family((_GPT2,), False, "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "mellum",
              "trillion", "granite-docling", "roberta-bpe", "jina-v1-en", "jina-es", "jina-de"),
    **_family((r"\p{N}", _GPT2), False, "smollm", "starcoder", "refact", "command-r", "codeshell",
              "exaone", "minerva-7b"),
    **_family((_QWEN2,), False, "qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "kormo", "hunyuan"),
    **_family((_LLAMA3,), True, "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
              "midm-2.0", "lfm2"),
    **_family((_LLAMA3,), False, "dbrx", "smaug-bpe"),
    **_family((_GPT4O,), False, "gpt-4o", "llama4", "minimax-m2"),
    **_family((_TEKKEN,), True, "tekken"),
    **_family((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), False, "falcon"),
    **_family((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, "default"),
}

# GGUF token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4

# Texts of control tokens that end a generation (llama.cpp's end-of-generation list). See `eos_ids`.
_END_OF_GENERATION = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>", "<EOT>", "<end_of_utterance>", "<|return|>", "<|call|>",
)


# --- chat templates, rendered as Hugging Face transformers does -------------------------------------

_JINJA_ENV = None


def _jinja_env():
    """A sandboxed jinja2 environment configured like transformers' `_compile_jinja_template`."""
    global _JINJA_ENV
    if _JINJA_ENV is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        _JINJA_ENV = env
    return _JINJA_ENV


# --- the tokenizer ------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and chat template a model needs.

    Build with `from_gguf` or `from_hf_dir`. `encode` never adds BOS/EOS (check `add_bos` and prepend
    `bos_id` yourself when the model wants it); special tokens written in the text are recognized.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, add_bos: bool = False, chat_template: str | None = None,
                 eos_ids: Iterable[int] | None = None, vocab_size: int | None = None,
                 source: str = "<memory>"):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.source = source
        self.vocab_size = int(vocab_size if vocab_size is not None else backend.get_vocab_size(True))
        ids = set(eos_ids or ())
        if eos_id is not None:
            ids.add(eos_id)
        self.eos_ids: frozenset[int] = frozenset(ids)

    # -- construction --

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build from a GGUF file path or an open `gguf.GGUFReader`.

        Raises ValueError naming the file and the key when the file is not a GGUF, lacks a tokenizer
        key, uses a non-BPE vocabulary, or names a pre-tokenizer we do not know.
        """
        import gguf

        if isinstance(path_or_reader, gguf.GGUFReader):
            reader = path_or_reader
            source = str(getattr(reader.data, "filename", None) or "<GGUFReader>")
        else:
            source = os.fspath(path_or_reader)
            if not os.path.isfile(source):
                raise ValueError(f"{source}: no such file")
            try:
                reader = gguf.GGUFReader(source)
            except Exception as e:  # the gguf package raises ValueError/struct errors on bad files
                raise ValueError(f"{source}: not a readable GGUF file ({type(e).__name__}: {e})") from e

        def get(key, default=...):
            field = reader.fields.get(key)
            if field is None:
                if default is ...:
                    raise ValueError(f"{source}: GGUF has no tokenizer key {key!r}")
                return default
            return field.contents()

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{source}: tokenizer.ggml.model={model!r} is not supported from GGUF (only 'gpt2' "
                "byte-level BPE); load this model's tokenizer from a Hugging Face directory instead")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        merges: list[str] = get("tokenizer.ggml.merges")
        token_types = get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in _PRE_SPLITS:
            raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; "
                             f"known: {', '.join(sorted(_PRE_SPLITS))}")
        regexes, ignore_merges = _PRE_SPLITS[pre]

        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicate entries")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                                           fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>, <|endoftext|>) are matched whole in the text and are special
        # (skippable in decode); user-defined ones (<tool_call>) are matched whole but are ordinary.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, token_types) if ty == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED])

        def opt_id(key):
            v = get(key, None)
            return None if v is None or not (0 <= int(v) < len(tokens)) else int(v)

        eos_id = opt_id("tokenizer.ggml.eos_token_id")
        eog = {vocab[t] for t in _END_OF_GENERATION if t in vocab and token_types[vocab[t]] == _CONTROL}
        eot = opt_id("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eog.add(eot)
        add_bos = get("tokenizer.ggml.add_bos_token", None)
        if add_bos is None:  # llama.cpp's default for BPE vocabularies depends on the pre-tokenizer
            add_bos = ignore_merges
        return cls(backend, bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=eos_id,
                   pad_id=opt_id("tokenizer.ggml.padding_token_id"), add_bos=bool(add_bos),
                   chat_template=get("tokenizer.chat_template", None), eos_ids=eog,
                   vocab_size=len(tokens), source=source)

    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        """Build from a Hugging Face directory: `tokenizer.json` (+ `tokenizer_config.json`)."""
        root = pathlib.Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{root}: no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(tj))
        backend.no_padding()
        backend.no_truncation()
        cfg: dict[str, Any] = {}
        if (root / "tokenizer_config.json").is_file():
            cfg = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = cfg.get("chat_template")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default", next(iter(named.values()), None))

        def token_id(name):
            tok = cfg.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return None if tok is None else backend.token_to_id(tok)

        eos_id = token_id("eos_token")
        vocab = backend.get_vocab(with_added_tokens=True)
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        eog = {vocab[t] for t in _END_OF_GENERATION if t in vocab and t in specials}
        gen_cfg = root / "generation_config.json"
        if gen_cfg.is_file():
            gen_eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
            eog.update(gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos])
        tok = cls(backend, bos_id=token_id("bos_token"), eos_id=eos_id, pad_id=token_id("pad_token"),
                  add_bos=bool(cfg.get("add_bos_token", False)), chat_template=template, eos_ids=eog,
                  source=str(root))
        tok._template_tokens = {k: (v.get("content") if isinstance(v, dict) else v)
                                for k, v in cfg.items()
                                if k.endswith("_token") and isinstance(v, (str, dict))}
        return tok

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """`from_gguf` for a file, `from_hf_dir` for a directory."""
        p = pathlib.Path(path)
        return cls.from_hf_dir(p) if p.is_dir() else cls.from_gguf(p)

    # -- ids and text --

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; adds no BOS/EOS, recognizes special tokens written in the text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        added = self.backend.get_added_tokens_decoder().get(int(token_id))
        return bool(added is not None and added.special)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat --

    def special_tokens_map(self) -> dict[str, str]:
        """The `bos_token`, `eos_token`, ... strings a chat template may reference."""
        out = {}
        for name, tid in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if tid is not None:
                out[name] = self.id_to_token(tid)
        out.update(getattr(self, "_template_tokens", {}))
        return out

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None, chat_template: str | None = None,
                            **kwargs) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's jinja2 template,
        the way transformers' `apply_chat_template(..., tokenize=False)` does. Extra keyword
        arguments become template variables (e.g. `documents=`, `enable_thinking=`)."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError(f"{self.source}: the model has no chat template (tokenizer.chat_template)")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        compiled = _compile(template)
        variables = {**self.special_tokens_map(), **kwargs}
        return compiled.render(messages=[dict(m) for m in messages],
                               tools=None if tools is None else list(tools),
                               add_generation_prompt=add_generation_prompt, **variables)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, "
                f"add_bos={self.add_bos}, source={self.source!r})")


_COMPILED: dict[str, Any] = {}


def _compile(template: str):
    if template not in _COMPILED:
        _COMPILED[template] = _jinja_env().from_string(template)
    return _COMPILED[template]


class StreamDecoder:
    """Incremental detokenizer for streaming: `push(id)` returns the text that became complete.

    A byte-level token can hold part of a multi-byte UTF-8 character (emoji, CJK); decoding it alone
    gives U+FFFD. We keep a short window of ids: text is released only once decoding the window no
    longer ends in an incomplete character, and only the part beyond what was already released. A
    window (rather than one id at a time) also keeps decoders that add or strip spaces at word
    boundaries consistent. `finish()` returns whatever is left (incomplete bytes as U+FFFD), so
    `"".join(pushes) + finish() == tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully released
        self._read = 0    # ids[_prefix:_read] decode to text already released

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full_text = self._decode(self.ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text):]
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def finish(self) -> str:
        """Text not yet released (an incomplete trailing character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text):]
