"""The `pallax` command line.

    pallax generate "prompt" [--chat] [--max-tokens N] [--temperature T] [--model M]
                    [--speculative ngram|draft] [--draft-model D] [--num-draft-tokens K]
                    [--compile-cache DIR|none]
    pallax info [MODEL]
    pallax serve [--model M] [--host H] [--port P] [--metrics-port P] [--compile-cache DIR|none]
    pallax client generate --server HOST:PORT "prompt"
"""

from __future__ import annotations

import argparse
import json
import sys


def add_compile_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="keep compiled programs here for later runs (default: $PALLAX_CACHE/compiled,"
                        " ~/.cache/pallax/compiled; 'none': compile afresh every run)")


def apply_compile_cache_flag(args) -> None:
    """`--compile-cache`: before anything compiles."""
    if (args.compile_cache or "").lower() != "none":
        import pallax

        pallax.use_compile_cache(args.compile_cache)


def _cmd_generate(args) -> int:
    import pallax

    apply_compile_cache_flag(args)
    llm = pallax.load(args.model, dtype=args.dtype, progress=sys.stderr.isatty())
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    finish = None
    for delta in llm.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, speculative=args.speculative,
                            draft_model=args.draft_model, num_draft_tokens=args.num_draft_tokens):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        finish = delta.finish_reason
    sys.stdout.write("\n")
    print(f"[finish: {finish}]", file=sys.stderr)
    return 0


def _cmd_info(args) -> int:
    from pallax.model.registry import DEFAULT_MODEL, resolve_model

    path = resolve_model(args.model or DEFAULT_MODEL)
    if path.is_dir():
        from pallax.model.hf_loader import config_from_hf

        config = config_from_hf(json.loads((path / "config.json").read_text()), path)
        formats = {"safetensors": len(list(path.glob("*.safetensors")))}
        nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    else:
        from pallax.model.gguf_loader import config_from_gguf, open_gguf, quantization_summary

        reader = open_gguf(path)
        config = config_from_gguf(reader, path)
        formats = quantization_summary(reader)
        nbytes = path.stat().st_size
    info = {
        "path": str(path),
        "name": config.name,
        "architecture": config.arch,
        "parameters": config.param_count(),
        "bytes": nbytes,
        "quantization": formats,
        "layers": config.n_layers,
        "dim": config.dim,
        "heads": config.n_heads,
        "kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "ffn_dim": config.ffn_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "tied_embeddings": config.tie_embeddings,
        "qkv_bias": config.qkv_bias,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pallax", description="A JAX stack for large language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="model name, .gguf path or HF directory (default: the embedded SmolLM2)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                   help="speculative decoding: prompt lookup, or a draft model (--draft-model)")
    g.add_argument("--draft-model", default=None, help="with --speculative draft: a smaller model, same tokenizer")
    g.add_argument("--num-draft-tokens", type=int, default=4, help="drafts per verification")
    add_compile_cache_flag(g)
    g.set_defaults(func=_cmd_generate)

    i = sub.add_parser("info", help="describe a model file: architecture, parameters, bytes, quantization")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_info)

    from pallax.rpc.cli import add_client_parser, add_serve_parser

    add_serve_parser(sub)
    add_client_parser(sub)
    from pallax.model.quantize_cli import add_quantize_parser
    add_quantize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pallax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
