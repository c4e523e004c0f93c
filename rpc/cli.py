"""`pallax serve` and `pallax client ...` subcommands (hooked into `pallax/cli.py`).

    pallax serve [--model M] [--draft-model D] [--host 127.0.0.1] [--port 50051] [--metrics-port 9400] [--mock]
    pallax client generate --server HOST:PORT "prompt" [--chat] [--stream] [--max-tokens N] ...
    pallax client tokenize|models|stats|health --server HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TOKEN_ENV = "PALLAX_AUTH_TOKEN"


def _token(args) -> str | None:
    if getattr(args, "auth_token_file", None):
        with open(args.auth_token_file) as f:
            return f.read().strip() or None
    return os.environ.get(TOKEN_ENV) or None


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _engine_config(args):
    """The library's engine settings (CPU-sized on a CPU), with any flags given on top."""
    import dataclasses

    from pallax import api
    from pallax.decode.scheduler import EngineConfig

    base = api._default_engine_config() if hasattr(api, "_default_engine_config") else EngineConfig()
    given = {k: v for k, v in (("max_seqs", args.max_seqs), ("num_pages", args.num_pages),
                               ("page_size", args.page_size), ("max_queue", args.max_queue),
                               ("max_draft_tokens", args.max_draft_tokens),
                               ("spec_rounds", args.spec_rounds), ("ngram_rounds", args.ngram_rounds),
                               ("ngram_corpus_tokens", args.ngram_corpus_tokens)) if v is not None}
    if args.no_warmup:
        given["warmup"] = False
    return dataclasses.replace(base, **given)


# -- serve ----------------------------------------------------------------------------------------
def _cmd_serve(args) -> int:
    import logging

    from pallax.rpc.server import run, setup_json_logging

    setup_json_logging(getattr(logging, args.log_level.upper()))
    kwargs = {}
    if args.mock:
        if args.draft_model:
            raise ValueError("--draft-model needs a model to serve, not --mock")
        from pallax.rpc.mock_engine import MockEngine

        engine = MockEngine(tick_s=args.mock_tick_ms / 1e3, max_running=args.max_running,
                            max_waiting=args.max_waiting)
    else:
        import pallax
        from pallax.cli import apply_compile_cache_flag

        apply_compile_cache_flag(args)
        llm = pallax.load(args.model, dtype=args.dtype, progress=sys.stderr.isatty())
        engine = llm.engine(_engine_config(args))  # a Scheduler of its own, started by the server
        if args.draft_model:  # before the server starts the engine, so warm-up compiles its programs
            engine.attach_draft_model(pallax.load(args.draft_model, dtype=args.dtype, progress=sys.stderr.isatty()))
        kwargs["tokenizer"] = llm.tokenizer
    run(engine, args.host, args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host, auth_token=_token(args), tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_message_bytes=args.max_message_mb << 20, default_max_tokens=args.default_max_tokens,
        reject_unknown_fields=not args.allow_unknown_fields, grace=args.grace, **kwargs)
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="serve a model over gRPC (Generate service, health, reflection, metrics)")
    s.add_argument("--model", default=None, help="model name, .gguf path or HF directory (default: the embedded SmolLM2)")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port; -1: none")
    s.add_argument("--metrics-host", default=None, help="address of the metrics server (default: --host)")
    s.add_argument("--max-seqs", type=int, default=None, help="sequences decoded per step")
    s.add_argument("--num-pages", type=int, default=None, help="KV pages in the pool (default: from free memory)")
    s.add_argument("--page-size", type=int, default=None, help="tokens per KV page")
    s.add_argument("--max-queue", type=int, default=None, help="waiting requests before RESOURCE_EXHAUSTED")
    s.add_argument("--draft-model", default=None,
                   help='a smaller model with the same tokenizer, for requests with speculative="draft"')
    s.add_argument("--max-draft-tokens", type=int, default=None,
                   help="the most drafts a speculative request may verify per step (0: no speculation)")
    s.add_argument("--spec-rounds", type=_non_negative, default=None,
                   help="draft-model speculation rounds a lone greedy request runs per device call (default 8;"
                        " more spread each call's fixed cost over more tokens, but a request arriving"
                        " meanwhile waits for the call to end; 0: one round per step)")
    s.add_argument("--ngram-rounds", type=_non_negative, default=None,
                   help="the same for n-gram speculation (default 4: its calls are chained on device, and"
                        " rounds after a request's end are wasted; 0: one round per step)")
    s.add_argument("--ngram-corpus-tokens", type=_non_negative, default=None,
                   help="n-gram drafts fall back on up to this many tokens of earlier requests when a request's"
                        " own tokens have no match (default 65536; 0: a request's own tokens only)")
    from pallax.cli import add_compile_cache_flag

    add_compile_cache_flag(s)
    s.add_argument("--no-warmup", action="store_true",
                   help="serve at once and compile each program at its first use (the first request of each"
                        " shape waits for it) instead of compiling all of them before serving")
    s.add_argument("--mock", action="store_true", help="serve the echo mock engine instead of a model (no JAX)")
    s.add_argument("--mock-tick-ms", type=float, default=2.0, help="mock engine: milliseconds per decode step")
    s.add_argument("--max-running", type=int, default=32, help="mock engine: sequences decoded at once")
    s.add_argument("--max-waiting", type=int, default=256, help="mock engine: queue bound")
    s.add_argument("--auth-token-file", default=None,
                   help=f"require `authorization: Bearer <token>` (token read from this file, else ${TOKEN_ENV})")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain (TLS needs --tls-key too)")
    s.add_argument("--tls-key", default=None, help="PEM private key")
    s.add_argument("--max-message-mb", type=int, default=16)
    s.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request leaves it unset")
    s.add_argument("--allow-unknown-fields", action="store_true",
                   help="ignore request fields this server does not know instead of refusing them")
    s.add_argument("--grace", type=float, default=30.0, help="seconds to drain in-flight requests on SIGTERM/SIGINT")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_cmd_serve)
    return s


# -- client ---------------------------------------------------------------------------------------
def _client(args):
    from pallax.rpc.client import Client

    root = open(args.ca, "rb").read() if args.ca else None
    return Client(args.server, token=_token(args), tls=args.tls, root_certificates=root, timeout=args.timeout)


def _messages(args) -> list[dict] | None:
    if not args.chat:
        return None
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": args.prompt}]


def _cmd_generate(args) -> int:
    from google.protobuf.json_format import MessageToDict

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, stop=args.stop or None, logprobs=args.logprobs or None,
                    speculative=args.speculative, num_draft_tokens=args.num_draft_tokens)
    prompt = dict(messages=_messages(args)) if args.chat else dict(prompt=args.prompt)
    with _client(args) as c:
        if args.stream and not args.json:
            last = None
            for r in c.stream(**prompt, **sampling):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
            sys.stdout.write("\n")
            if last is not None:
                print(f"[finish: {_reason(last)}; {last.usage.completion_tokens} tokens; "
                      f"ttft {1e3 * last.timings.ttft_s:.1f} ms; total {1e3 * last.timings.total_s:.1f} ms]",
                      file=sys.stderr)
        elif args.json:
            parts = c.stream(**prompt, **sampling) if args.stream else [c.generate(**prompt, **sampling)]
            for r in parts:
                print(json.dumps(MessageToDict(r, preserving_proto_field_name=True)))
        else:
            r = c.generate(**prompt, **sampling)
            print(r.text)
            print(f"[finish: {_reason(r)}; {r.usage.completion_tokens} tokens]", file=sys.stderr)
    return 0


def _reason(r) -> str:
    from pallax.rpc import pallax_pb2 as pb

    return pb.FinishReason.Name(r.finish_reason).removeprefix("FINISH_REASON_").lower()


def _cmd_simple(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        if args.client_command == "health":
            print(c.health(args.service))
            return 0
        r = {"tokenize": lambda: c.tokenize(args.text), "models": c.list_models, "stats": c.stats}[args.client_command]()
        print(json.dumps(MessageToDict(r, preserving_proto_field_name=True), indent=2))
    return 0


def _guarded(fn):
    def call(args) -> int:
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as e:
            print(f"pallax client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return call


def add_client_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser("client", help="call a running pallax gRPC server")
    sub = c.add_subparsers(dest="client_command", required=True)

    def common(p):
        p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
        p.add_argument("--timeout", type=float, default=None, help="gRPC deadline in seconds")
        p.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca)")
        p.add_argument("--ca", default=None, help="PEM root certificate to trust (implies --tls)")
        p.add_argument("--auth-token-file", default=None, help=f"bearer token file (else ${TOKEN_ENV})")
        return p

    g = common(sub.add_parser("generate", help="generate from a prompt"))
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    g.add_argument("--system", default=None, help="with --chat: a system message first")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=0)
    g.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                   help="speculative decoding: prompt lookup, or the server's draft model")
    g.add_argument("--num-draft-tokens", type=int, default=None, help="drafts per verification (default 4)")
    g.add_argument("--json", action="store_true", help="print responses as JSON lines")
    g.set_defaults(func=_guarded(_cmd_generate))

    t = common(sub.add_parser("tokenize", help="token ids of a text"))
    t.add_argument("text")
    t.set_defaults(func=_guarded(_cmd_simple))
    for name, help_ in (("models", "the served model"), ("stats", "serving-loop gauges (queue, KV pages)")):
        common(sub.add_parser(name, help=help_)).set_defaults(func=_guarded(_cmd_simple))
    h = common(sub.add_parser("health", help="gRPC health status"))
    h.add_argument("--service", default="")
    h.set_defaults(func=_guarded(_cmd_simple))
    return c


def main(argv: list[str] | None = None) -> int:
    """`python -m pallax.rpc.cli serve|client ...` until the hooks are in `pallax/cli.py`."""
    parser = argparse.ArgumentParser(prog="pallax")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_client_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
