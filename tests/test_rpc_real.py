"""The Generate service over the real serving loop on SmolLM2-135M (CPU).

Unary and streaming outputs must equal the library's greedy outputs (`llm.generate`) for the
reference cases; chat messages must render like the model's template (and tokenize like the
independent reference); a smaller soak with random cancels and deadlines must leave every KV page
free. Skipped while `pallax.decode.scheduler` cannot be imported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from pathlib import Path

import grpc
import pytest

scheduler = pytest.importorskip("pallax.decode.scheduler",
                                reason="pallax.decode.scheduler (the serving loop) is not in this checkout yet")

from pallax.rpc import pallax_pb2 as pb  # noqa: E402
from pallax.rpc.client import AsyncClient, Client  # noqa: E402
from pallax.rpc.server import BackgroundServer  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm2_135m_instruct_q4_1.json"
CASES = json.loads(REFERENCE.read_text())["cases"] if REFERENCE.exists() else []
N_TOKENS = 16  # greedy tokens compared per case (the reference holds up to 32)


@pytest.fixture(scope="module")
def llm():
    import pallax

    return pallax.load(dtype="float32")


@pytest.fixture(scope="module")
def server(llm):
    # the library's CPU-sized pool (a few full contexts), its own instance beside llm.generate's;
    # the same shapes, so its programs are those `generate` runs. Without the warm-up: compiled
    # at first use, only the shapes these tests send (JAX's persistent cache holds most already)
    from pallax import api

    config = dataclasses.replace(api._default_engine_config(), max_queue=64, warmup=False)
    engine = scheduler.Scheduler(llm, config)
    bg = BackgroundServer(engine, tokenizer=llm.tokenizer, metrics_port=0)
    try:
        bg.wait_ready(timeout=900)
        yield bg
    finally:
        bg.stop(grace=10)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=300) as c:
        yield c


def _prompt(case) -> dict:
    return dict(messages=case["prompt"]) if case["kind"] == "chat" else dict(prompt=case["prompt"])


def _expected(llm, case):
    ids = llm.tokenizer.encode(case["text"]) if case["kind"] == "chat" else case["prompt"]
    return llm.generate(ids, max_tokens=N_TOKENS, temperature=0.0)[0]


@pytest.mark.skipif(not CASES, reason=f"{REFERENCE} is missing")
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c['kind']}{i}" for i, c in enumerate(CASES)])
def test_prompts_tokenize_like_the_reference(client, llm, i):
    case = CASES[i]
    t = client.tokenize(**({"messages": case["prompt"]} if case["kind"] == "chat" else {"text": case["prompt"]}))
    assert list(t.token_ids) == case["input_ids"]
    if case["kind"] == "chat":
        assert t.rendered == case["text"] == llm.tokenizer.apply_chat_template(case["prompt"], add_generation_prompt=True)


@pytest.mark.skipif(not CASES, reason=f"{REFERENCE} is missing")
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c['kind']}{i}" for i, c in enumerate(CASES)])
def test_unary_and_stream_equal_library_greedy(client, llm, i):
    case = CASES[i]
    want = _expected(llm, case)
    r = client.generate(**_prompt(case), max_tokens=N_TOKENS, temperature=0.0)
    assert list(r.token_ids) == want.token_ids
    assert r.text == want.text
    assert r.finish_reason == {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}[want.finish_reason]
    assert r.usage.prompt_tokens == len(case["input_ids"]) and r.usage.completion_tokens == len(want.token_ids)
    parts = list(client.stream(**_prompt(case), max_tokens=N_TOKENS, temperature=0.0))
    assert [t for p in parts for t in p.token_ids] == want.token_ids
    assert "".join(p.text for p in parts) == want.text
    assert parts[-1].finish_reason == r.finish_reason
    # the library's own greedy tokens agree with the independent reference where both exist
    n = min(len(want.token_ids), len(case["greedy_ids"]))
    assert want.token_ids[:n] == case["greedy_ids"][:n]


def test_invalid_requests_on_the_real_engine(client, llm):
    for kwargs, field in ((dict(token_ids=[llm.config.vocab_size]), "token_ids[0]"),
                          (dict(prompt="hi", temperature=float("nan")), "sampling.temperature"),
                          (dict(prompt="hi", max_tokens=0), "sampling.max_tokens"),
                          (dict(prompt="hi", adapter="no-such-adapter"), "adapter")):
        with pytest.raises(grpc.RpcError) as e:
            client.generate(**kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
    assert client.generate("The capital of France is", max_tokens=2).usage.completion_tokens == 2


def test_speculative_requests_give_library_greedy(client, llm):
    """`sampling.speculative` reaches the serving loop: n-gram drafting (unary and streaming) yields
    the plain greedy tokens and the drafts show in the stats; a drafter the server lacks is refused."""
    prompt = "def add(a, b):\n    return a + b\n\n\ndef add3(a, b, c):\n"
    want = llm.generate(prompt, max_tokens=24, temperature=0.0)[0]
    before = client.stats().values.get("spec_ngram_draft_tokens", 0.0)
    r = client.generate(prompt, max_tokens=24, speculative="ngram", num_draft_tokens=4)
    assert list(r.token_ids) == want.token_ids and r.text == want.text
    parts = list(client.stream(prompt, max_tokens=24, speculative="ngram", num_draft_tokens=3))
    assert [t for p in parts for t in p.token_ids] == want.token_ids
    assert client.stats().values["spec_ngram_draft_tokens"] > before
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, max_tokens=4, speculative="draft")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("sampling.speculative") and "draft" in e.value.details()


def test_soak_frees_every_page(server, client, llm):
    """200 requests at concurrency 32, about a third cancelled or given short deadlines at random
    moments: the rest complete with the library's exact output, none lost or duplicated, the server
    stays healthy and every KV page is free afterwards."""
    prompts = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time,", "def add(a, b):",
               "The sky is", "Water boils at"]
    lengths = [4, 8, 12]
    want = {(p, n): c for n in lengths for p, c in zip(prompts, llm.generate(prompts, max_tokens=n))}
    rng = random.Random(1)
    plans = [dict(p=rng.choice(prompts), n=rng.choice(lengths), fate=rng.choices(["ok", "cancel", "deadline"], [4, 1, 1])[0],
                  at=rng.uniform(0.01, 0.3), stream=rng.random() < 0.5, rid=f"real-{i}") for i in range(200)]
    results = {}

    async def one(c, plan, sem):
        async with sem:
            timeout = plan["at"] if plan["fate"] == "deadline" else 300
            try:
                if plan["stream"]:
                    call = c.stream(plan["p"], max_tokens=plan["n"], request_id=plan["rid"], timeout=timeout)
                    if plan["fate"] == "cancel":
                        asyncio.get_running_loop().call_later(plan["at"], call.cancel)
                    parts = [r async for r in call]
                    out = ("ok", [t for r in parts for t in r.token_ids], "".join(r.text for r in parts))
                else:
                    task = asyncio.ensure_future(c.generate(plan["p"], max_tokens=plan["n"], request_id=plan["rid"],
                                                            timeout=timeout))
                    if plan["fate"] == "cancel":
                        asyncio.get_running_loop().call_later(plan["at"], task.cancel)
                    r = await task
                    out = ("ok", list(r.token_ids), r.text)
            except asyncio.CancelledError:
                out = ("cancelled", None, None)
            except grpc.aio.AioRpcError as e:
                out = (e.code().name, None, None)
            assert plan["rid"] not in results
            results[plan["rid"]] = out

    async def main():
        async with AsyncClient(server.address) as c:
            sem = asyncio.Semaphore(32)  # concurrency 32 against a queue bound of 64
            await asyncio.gather(*(one(c, p, sem) for p in plans))

    asyncio.run(main())
    assert len(results) == len(plans)
    for plan in plans:
        status, ids, text = results[plan["rid"]]
        if plan["fate"] == "ok":
            assert status == "ok", (plan, status)
        if status == "ok":
            w = want[(plan["p"], plan["n"])]
            assert (ids, text) == (w.token_ids, w.text), plan
        else:
            assert status in {"cancelled", "CANCELLED", "DEADLINE_EXCEEDED"}, (plan, status)
    import time

    end = time.monotonic() + 10
    while True:
        s = client.stats()
        if (s.pages_free == s.pages_total and s.running == 0 and s.waiting == 0) or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert s.pages_total > 0 and s.pages_free == s.pages_total and s.running == 0 and s.waiting == 0
    assert client.health() == "SERVING"
