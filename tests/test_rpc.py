"""The gRPC Generate service against the mock engine (outputs computable by hand: the prompt echoed).

A real server runs on a loopback port; tests check outputs, status codes of malformed and hostile
requests (and that the next good request still works), auth, health, metrics, deadlines and
cancellation freeing pages, the queue bound, graceful shutdown, and a soak with random cancels.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import string
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest

from pallax.rpc import pallax_pb2 as pb
from pallax.rpc.client import AsyncClient, Client, build_request
from pallax.rpc.mock_engine import MockEngine, MockTokenizer, echo_completion
from pallax.rpc.server import BackgroundServer, wire_problem

TOK = MockTokenizer()


def echo_text(prompt: str, n: int) -> str:
    return TOK.decode(echo_completion(TOK.encode(prompt), n))


def wait_pages_free(client: Client, timeout: float = 2.0) -> pb.GetStatsResponse:
    end = time.monotonic() + timeout
    while True:
        s = client.stats()
        if (s.pages_free == s.pages_total and s.running == 0 and s.waiting == 0) or time.monotonic() > end:
            return s
        time.sleep(0.005)


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        r = fn()
        if not isinstance(r, pb.GenerateResponse):
            list(r)
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def server():
    bg = BackgroundServer(MockEngine(max_context=512), metrics_port=0, max_message_bytes=1 << 20)
    bg.wait_ready()
    yield bg
    bg.stop(grace=2)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=10) as c:
        yield c


# -- outputs ---------------------------------------------------------------------------------------
def test_unary_echo(client):
    r = client.generate("abc", max_tokens=7, request_id="r-1")
    assert r.text == "abcabca" == echo_text("abc", 7)
    assert list(r.token_ids) == [100, 101, 102] * 2 + [100]
    assert r.finish_reason == pb.FINISH_REASON_LENGTH and r.request_id == "r-1"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 7)
    assert 0 <= r.timings.queue_s <= r.timings.ttft_s <= r.timings.total_s


def test_stream_matches_unary_and_holds_back_stop_prefixes(client):
    prompt = "héllo wörld 🙂 "
    parts = list(client.stream(prompt, max_tokens=40))
    unary = client.generate(prompt, max_tokens=40)
    assert "".join(p.text for p in parts) == unary.text == echo_text(prompt, 40)
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
    assert all(p.finish_reason == 0 for p in parts[:-1]) and parts[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # multi-byte characters are never split mid-stream; max_tokens may cut the last one (as decode does)
    assert "\ufffd" not in "".join(p.text for p in parts[:-1]) and parts[-1].text == "\ufffd"
    # "lo" must not leak out piecewise: text is cut before the stop string, in stream and unary alike
    parts = list(client.stream("héllo", max_tokens=9, stop=["lo"]))
    assert "".join(p.text for p in parts) == "hél" == client.generate("héllo", max_tokens=9, stop=["lo"]).text
    assert parts[-1].finish_reason == pb.FINISH_REASON_STOP and parts[-1].usage.completion_tokens == 6  # é is two byte tokens


def test_stop_token_ids_eos_and_logprobs(client):
    r = client.generate("abcd", max_tokens=20, stop_token_ids=[TOK.encode("c")[0]])
    assert r.text == "ab" and list(r.token_ids) == TOK.encode("abc") and r.finish_reason == pb.FINISH_REASON_STOP
    ids = TOK.encode("xy") + [TOK.EOS]
    assert client.generate(token_ids=ids, max_tokens=10).text == "xy"
    r = client.generate(token_ids=ids, max_tokens=7, ignore_eos=True)
    assert r.text == "xyxyx" and r.finish_reason == pb.FINISH_REASON_LENGTH and len(r.token_ids) == 7
    r = client.generate("a", max_tokens=2, logprobs=3)
    assert [(lp.token_id, lp.logprob) for lp in r.logprobs] == [(100, -0.25)] * 2
    assert [(t.token_id, t.logprob) for t in r.logprobs[0].top] == [(100, -0.25), (101, -1.25), (102, -2.25)]


def test_chat_messages_and_tokenize(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = TOK.apply_chat_template(msgs, add_generation_prompt=True)
    t = client.tokenize(messages=msgs)
    assert t.rendered == rendered and list(t.token_ids) == TOK.encode(rendered)
    assert list(client.tokenize("hé").token_ids) == TOK.encode("hé")
    n = len(rendered) + 5
    assert client.generate(messages=msgs, max_tokens=n).text == echo_text(rendered, n)


def test_default_max_tokens_fills_the_context():
    bg = BackgroundServer(MockEngine(max_context=64, tick_s=0.0005), default_max_tokens=1000)
    try:
        bg.wait_ready()
        with Client(bg.address, timeout=10) as c:
            r = c.generate("abcd")
            assert len(r.token_ids) == 60 and r.finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        bg.stop(grace=1)


def test_list_models_and_reflection(server, client):
    (m,) = client.list_models().models
    assert (m.name, list(m.adapters), m.context_length, m.vocab_size) == ("mock-echo", ["mock-lora"], 512, 259)
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {"pallax.v1.Generator", "grpc.health.v1.Health"} <= set(db.get_services())
    svc = db.FindFileContainingSymbol("pallax.v1.Generator")
    assert svc.package == "pallax.v1"


# -- malformed and hostile requests ----------------------------------------------------------------
def _raw(client: Client, method: str = "Generate"):
    return client.channel.unary_unary(f"/pallax.v1.Generator/{method}", request_serializer=None,
                                      response_deserializer=pb.GenerateResponse.FromString)


def _field(number: int, wire: int, payload: bytes = b"") -> bytes:
    """One field on the wire: a varint key, then a varint value (wire 0) or a length and bytes (wire 2)."""
    def varint(v: int) -> bytes:
        out = b""
        while True:
            out += bytes([(v & 0x7F) | (0x80 if v > 0x7F else 0)])
            v >>= 7
            if not v:
                return out
    return varint(number << 3 | wire) + (payload if wire == 0 else varint(len(payload)) + payload)


def _with_bytes(req: pb.GenerateRequest, old: bytes, new: bytes) -> bytes:
    data = req.SerializeToString()
    assert data.count(old) == 1
    return data.replace(old, new)


_INVALID = [
    # (name, request kwargs, field named in the message)
    ("empty prompt", dict(), "prompt"),
    ("empty text", dict(prompt=""), "prompt"),
    ("two prompts", dict(prompt="a", token_ids=[100]), "prompt"),
    ("oversize prompt", dict(prompt="x" * 600), "text"),
    ("prompt fills context", dict(token_ids=[100] * 512), "token_ids"),
    ("max_tokens 0", dict(prompt="a", max_tokens=0), "sampling.max_tokens"),
    ("max_tokens negative", dict(prompt="a", max_tokens=-3), "sampling.max_tokens"),
    ("max_tokens huge", dict(prompt="a", max_tokens=2**31 - 1), "sampling.max_tokens"),
    ("max_tokens past context", dict(prompt="abc", max_tokens=510), "sampling.max_tokens"),
    ("NaN temperature", dict(prompt="a", temperature=float("nan")), "sampling.temperature"),
    ("negative temperature", dict(prompt="a", temperature=-1.0), "sampling.temperature"),
    ("inf top_p", dict(prompt="a", top_p=float("inf")), "sampling.top_p"),
    ("zero top_p", dict(prompt="a", top_p=0.0), "sampling.top_p"),
    ("negative top_k", dict(prompt="a", top_k=-1), "sampling.top_k"),
    ("min_p > 1", dict(prompt="a", min_p=1.5), "sampling.min_p"),
    ("zero repetition_penalty", dict(prompt="a", repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("seed >= 2**32", dict(prompt="a", seed=2**40), "sampling.seed"),
    ("logprobs 50", dict(prompt="a", logprobs=50), "sampling.logprobs"),
    ("empty stop string", dict(prompt="a", stop=[""]), "sampling.stop"),
    ("stop token outside vocab", dict(prompt="a", stop_token_ids=[259]), "sampling.stop_token_ids"),
    ("unknown adapter", dict(prompt="a", adapter="nope"), "adapter"),
    ("unknown drafter", dict(prompt="a", speculative="tree"), "sampling.speculative"),
    ("17 drafts", dict(prompt="a", speculative="ngram", num_draft_tokens=17), "sampling.num_draft_tokens"),
    ("drafts with a penalty", dict(prompt="a", speculative="ngram", repetition_penalty=1.3), "sampling.speculative"),
    ("token id == vocab", dict(token_ids=[100, 259]), "token_ids[1]"),
    ("negative token id", dict(token_ids=[-1]), "token_ids[0]"),
    ("empty role", dict(messages=[{"role": "", "content": "x"}]), "messages[0].role"),
    ("long request id", dict(prompt="a", request_id="r" * 300), "request_id"),
]


@pytest.mark.parametrize("name,kwargs,field", _INVALID, ids=[c[0] for c in _INVALID])
@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_invalid_argument_names_the_field(client, name, kwargs, field, streaming):
    call = client.stream if streaming else client.generate
    code, details = code_of(lambda: call(**kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details
    assert client.generate("ok", max_tokens=3).text == "oko"


_HOSTILE_BYTES = [
    ("invalid UTF-8 in stop", lambda: _with_bytes(build_request("a", max_tokens=2, stop=["STOP"]), b"STOP", b"ST\xff\xfe"),
     "sampling.stop[0]"),
    ("invalid UTF-8 in second stop", lambda: _with_bytes(build_request("a", max_tokens=2, stop=["ok", "STOP"]),
                                                         b"STOP", b"\xc3\x28PP"), "sampling.stop[1]"),
    ("invalid UTF-8 in text", lambda: _with_bytes(build_request("PROMPT", max_tokens=2), b"PROMPT", b"PR\xedOMP"), "text"),
    ("invalid UTF-8 in chat", lambda: _with_bytes(build_request(messages=[{"role": "user", "content": "HELLO"}]),
                                                  b"HELLO", b"HE\x80LO"), "messages[0].content"),
    ("unknown field", lambda: build_request("a", max_tokens=2).SerializeToString() + _field(99, 0, b"\x01"),
     "field number 99"),
    ("unknown sampling field", lambda: build_request("a").SerializeToString() + _field(6, 2, _field(40, 0, b"\x07")),
     "sampling.field number 40"),
    ("reserved field 5", lambda: build_request("a", max_tokens=2).SerializeToString() + _field(5, 2, b"abc"),
     "field number 5"),
    ("garbage", lambda: b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "request"),
]


@pytest.mark.parametrize("name,data,field", _HOSTILE_BYTES, ids=[c[0] for c in _HOSTILE_BYTES])
def test_hostile_bytes_get_invalid_argument(client, name, data, field):
    code, details = code_of(lambda: _raw(client)(data(), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details
    assert client.generate("ok", max_tokens=3).text == "oko"


def test_wire_problem_accepts_valid_requests():
    req = build_request(messages=[{"role": "user", "content": "é🙂"}], max_tokens=3, stop=["a", "ü"],
                        stop_token_ids=[1, 2], temperature=0.5, request_id="x")
    assert wire_problem(req.SerializeToString(), pb.GenerateRequest.DESCRIPTOR) is None
    extra = req.SerializeToString() + _field(99, 0, b"\x01")
    assert wire_problem(extra, pb.GenerateRequest.DESCRIPTOR, reject_unknown=False) is None


def test_message_size_limit(client):
    code, _ = code_of(lambda: client.generate("x" * (2 << 20), max_tokens=1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate("ok", max_tokens=3).text == "oko"


def test_speculative_fields_reach_the_engine_and_the_cli():
    """The wire fields become the engine request's SamplingParams (num_draft_tokens 0: the
    default 4), and `pallax serve` refuses a draft model for the mock engine with a clear error."""
    from pallax.cli import main
    from pallax.rpc.metrics import ServerMetrics
    from pallax.rpc.server import Servicer

    eng = MockEngine()
    servicer = Servicer(eng, MockTokenizer(), ServerMetrics(eng))
    req = servicer.to_request(build_request("abc", max_tokens=2, speculative="ngram", num_draft_tokens=6), "r", None)
    assert req.sampling.speculative == "ngram" and req.sampling.num_draft_tokens == 6
    req = servicer.to_request(build_request("abc", max_tokens=2), "r", None)
    assert req.sampling.speculative is None and req.sampling.num_draft_tokens == 4
    assert main(["serve", "--mock", "--draft-model", "smollm2-135m-instruct"]) == 2


def test_serve_engine_flags_reach_the_engine_config():
    import argparse

    from pallax.rpc.cli import _engine_config, add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    cfg = _engine_config(parser.parse_args(["serve", "--spec-rounds", "32", "--ngram-rounds", "2",
                                            "--max-draft-tokens", "6",
                                            "--ngram-corpus-tokens", "0", "--no-warmup"]))
    assert (cfg.spec_rounds, cfg.ngram_rounds, cfg.max_draft_tokens, cfg.ngram_corpus_tokens) == (32, 2, 6, 0)
    assert cfg.warmup is False
    default = _engine_config(parser.parse_args(["serve"]))
    # the engine's defaults
    assert (default.spec_rounds, default.ngram_rounds, default.ngram_corpus_tokens) == (8, 4, 65536)
    assert default.warmup is True
    with pytest.raises(SystemExit):  # argparse: "--spec-rounds: must be >= 0, got -1"
        parser.parse_args(["serve", "--spec-rounds", "-1"])


def test_unknown_fields_can_be_allowed():
    bg = BackgroundServer(MockEngine(), reject_unknown_fields=False)
    try:
        bg.wait_ready()
        with Client(bg.address, timeout=5) as c:
            data = build_request("ab", max_tokens=3).SerializeToString() + _field(99, 0, b"\x01")
            assert _raw(c)(data).text == "aba"
    finally:
        bg.stop(grace=1)


def test_queue_bound_gives_resource_exhausted_with_retry_hint():
    bg = BackgroundServer(MockEngine(max_running=1, max_waiting=2, tick_s=0.005, retry_after_s=0.25))
    try:
        bg.wait_ready()
        with Client(bg.address, timeout=10) as c:
            futures = [c.stub.Generate.future(build_request("ab", max_tokens=20)) for _ in range(10)]
            ok, exhausted = 0, 0
            for f in futures:
                try:
                    assert f.result().text == echo_text("ab", 20)
                    ok += 1
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                    assert dict(e.trailing_metadata())["retry-after-ms"] == "250"
                    exhausted += 1
            # At least the waiting room is admitted; a third request gets the running slot only
            # if the engine's loop has moved the first out of the queue before it arrives.
            assert ok >= 2 and exhausted >= 1 and ok + exhausted == 10
            assert c.generate("ok", max_tokens=3).text == "oko"
            assert wait_pages_free(c).pages_free == 1024
    finally:
        bg.stop(grace=1)


# -- deadlines and cancellation --------------------------------------------------------------------
def test_deadline_ends_request_and_frees_pages(client):
    before = client.stats().values["finished_cancelled"] + client.stats().values["finished_deadline"]
    code, _ = code_of(lambda: client.generate("abc", max_tokens=400, timeout=0.1))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    s = wait_pages_free(client, timeout=0.5)
    assert s.pages_free == s.pages_total and s.running == 0
    after = s.values["finished_cancelled"] + s.values["finished_deadline"]
    assert after == before + 1


def test_client_cancel_frees_pages(client):
    before = client.stats().values["finished_cancelled"]
    call = client.stream("abc", max_tokens=400)
    first = [next(call), next(call)]
    assert client.stats().running >= 1 and client.stats().pages_free < client.stats().pages_total
    call.cancel()
    s = wait_pages_free(client, timeout=0.5)
    assert s.pages_free == s.pages_total and s.values["finished_cancelled"] == before + 1
    assert "".join(p.text for p in first) == "ab"[: len("".join(p.text for p in first))]
    fut = client.stub.Generate.future(build_request("abc", max_tokens=400))
    time.sleep(0.05)
    fut.cancel()
    s = wait_pages_free(client, timeout=0.5)
    assert s.pages_free == s.pages_total and s.values["finished_cancelled"] == before + 2


# -- auth, TLS, health, metrics --------------------------------------------------------------------
def test_bearer_auth():
    bg = BackgroundServer(MockEngine(), auth_token="s3cret")
    try:
        bg.wait_ready()
        for token in (None, "wrong", "s3cret "):
            with Client(bg.address, token=token, timeout=5) as c:
                assert code_of(lambda: c.generate("ab", max_tokens=2))[0] == grpc.StatusCode.UNAUTHENTICATED
                assert code_of(lambda: c.stream("ab", max_tokens=2))[0] == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    c.stats()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # probes stay open
        with Client(bg.address, token="s3cret", timeout=5) as c:
            assert c.generate("ab", max_tokens=3).text == "aba"
            assert "".join(r.text for r in c.stream("ab", max_tokens=3)) == "aba"
    finally:
        bg.stop(grace=1)


def test_auth_off_accepts_any_or_no_token(server):
    for token in (None, "anything"):
        with Client(server.address, token=token, timeout=5) as c:
            assert c.generate("ab", max_tokens=3).text == "aba"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    bg = BackgroundServer(MockEngine(), tls_cert=str(cert), tls_key=str(key))
    try:
        bg.wait_ready()
        with Client(bg.address, root_certificates=cert.read_bytes(), timeout=5) as c:
            assert c.generate("ab", max_tokens=3).text == "aba"
        with Client(bg.address, timeout=2) as c:  # plaintext against a TLS port
            assert code_of(lambda: c.generate("ab", max_tokens=3))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        bg.stop(grace=1)


def test_health_not_serving_until_engine_ready():
    bg = BackgroundServer(MockEngine(warmup_s=0.6))
    try:
        with Client(bg.address, timeout=5) as c:
            assert c.health() == "NOT_SERVING" and c.health("pallax.v1.Generator") == "NOT_SERVING"
            code, details = code_of(lambda: c.generate("ab", max_tokens=2))
            assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details
            c.wait_serving(timeout=10)
            assert c.health("pallax.v1.Generator") == "SERVING"
            assert c.generate("ab", max_tokens=3).text == "aba"
    finally:
        bg.stop(grace=1)


def _scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics(server, client):
    before = _scrape(server)
    client.generate("abc", max_tokens=5)
    client.generate("abc", max_tokens=50, stop=["ca"])
    code_of(lambda: client.generate("abc", max_tokens=0))
    m = _scrape(server)
    key = 'pallax_requests_total{finish_reason="%s"}'
    assert m[key % "length"] == before.get(key % "length", 0) + 1
    assert m[key % "stop"] == before.get(key % "stop", 0) + 1
    assert m['pallax_rpc_rejected_total{code="INVALID_ARGUMENT"}'] >= 1
    assert m["pallax_time_to_first_token_seconds_count"] == before["pallax_time_to_first_token_seconds_count"] + 2
    assert m["pallax_time_per_output_token_seconds_count"] >= before.get("pallax_time_per_output_token_seconds_count", 0) + 4 + 2
    # "abcabc...": stop "ca" completes at the 4th token (text "ab")
    assert m["pallax_generation_tokens_total"] == before["pallax_generation_tokens_total"] + 5 + 4
    assert m["pallax_prompt_tokens_total"] == before["pallax_prompt_tokens_total"] + 6
    assert m["pallax_kv_pages_total"] == 1024 and m["pallax_kv_pages_free"] == 1024
    assert m["pallax_kv_page_utilization"] == 0.0 and m["pallax_queue_depth"] == 0.0
    assert "pallax_prefix_cache_hit_rate" in m and "pallax_running_sequences" in m


def test_speculative_metrics_by_drafter():
    from prometheus_client import CollectorRegistry, generate_latest

    from pallax.rpc.metrics import ServerMetrics

    class Engine:  # what Scheduler.stats() reports after n-gram and draft-model verifications
        def stats(self):
            return {"spec_verifications": 5, "spec_acceptance_rate": 0.5,
                    "spec_ngram_verifications": 3, "spec_ngram_draft_tokens": 12, "spec_ngram_accepted_tokens": 3,
                    "spec_ngram_acceptance_rate": 0.25, "spec_ngram_mean_accepted_length": 2.0,
                    "spec_ngram_empty_rounds": 4,
                    "spec_draft_verifications": 2, "spec_draft_acceptance_rate": 0.75}

    text = generate_latest(ServerMetrics(Engine(), CollectorRegistry()).registry).decode()
    assert 'pallax_spec_acceptance_rate{drafter="ngram"} 0.25' in text
    assert 'pallax_spec_acceptance_rate{drafter="draft"} 0.75' in text
    assert 'pallax_spec_draft_tokens_total{drafter="ngram"} 12.0' in text
    assert 'pallax_spec_mean_accepted_length{drafter="ngram"} 2.0' in text
    assert 'pallax_spec_empty_rounds_total{drafter="ngram"} 4.0' in text
    assert 'drafter=""' not in text and "pallax_spec_verifications_total{" in text


# -- soak ------------------------------------------------------------------------------------------
def test_soak_with_random_cancels_and_deadlines():
    """320 requests at concurrency 32, about a third cancelled or given short deadlines."""
    engine = MockEngine(tick_s=0.001, max_running=24, max_waiting=64, pages_total=400, page_size=4)
    bg = BackgroundServer(engine)
    rng = random.Random(0)
    n = 320
    plans = []
    for i in range(n):
        prompt = "".join(rng.choice(string.ascii_letters + "éß🙂") for _ in range(rng.randint(1, 24)))
        fate = rng.choices(["complete", "cancel", "deadline"], [2, 1, 1])[0]
        plans.append(dict(rid=f"soak-{i}", prompt=prompt, max_tokens=rng.randint(1, 60), stream=rng.random() < 0.5,
                          fate=fate, at=rng.uniform(0.0, 0.06)))
    results: dict[str, tuple[str, object]] = {}

    async def one(c: AsyncClient, p, sem):
        async with sem:
            kw = dict(request_id=p["rid"], max_tokens=p["max_tokens"])
            timeout = p["at"] + 0.001 if p["fate"] == "deadline" else 30
            try:
                if p["stream"]:
                    call = c.stream(p["prompt"], timeout=timeout, **kw)
                    if p["fate"] == "cancel":
                        asyncio.get_running_loop().call_later(p["at"], call.cancel)
                    parts = [r async for r in call]
                    assert all(r.request_id == p["rid"] for r in parts)
                    out = ("ok", "".join(r.text for r in parts), parts[-1].finish_reason)
                else:
                    task = asyncio.ensure_future(c.generate(p["prompt"], timeout=timeout, **kw))
                    if p["fate"] == "cancel":
                        asyncio.get_running_loop().call_later(p["at"], task.cancel)
                    r = await task
                    assert r.request_id == p["rid"]
                    out = ("ok", r.text, r.finish_reason)
            except asyncio.CancelledError:
                out = ("cancelled", None, None)
            except grpc.aio.AioRpcError as e:
                out = (e.code().name, e.details(), None)
            assert p["rid"] not in results, "duplicate result"
            results[p["rid"]] = out

    async def main():
        async with AsyncClient(bg.address) as c:
            sem = asyncio.Semaphore(32)
            await asyncio.gather(*(one(c, p, sem) for p in plans))

    try:
        bg.wait_ready()
        asyncio.run(main())
        assert len(results) == n
        outcomes = {"ok": 0, "ended": 0}
        for p in plans:
            status, text, reason = results[p["rid"]]
            if p["fate"] == "complete":
                assert status == "ok", (p, results[p["rid"]])
            if status == "ok":
                assert text == echo_text(p["prompt"], p["max_tokens"]), p
                assert reason == pb.FINISH_REASON_LENGTH
                outcomes["ok"] += 1
            else:
                assert status in {"cancelled", "CANCELLED", "DEADLINE_EXCEEDED"}, (p, results[p["rid"]])
                outcomes["ended"] += 1
        assert outcomes["ended"] >= n // 5  # most cancels and deadlines land before the request ends
        with Client(bg.address, timeout=5) as c:
            s = wait_pages_free(c, timeout=2)
            assert (s.pages_free, s.pages_total, s.running, s.waiting) == (400, 400, 0, 0)
            assert c.health() == "SERVING"
            assert c.generate("ok", max_tokens=3).text == "oko"
            v = c.stats().values
            # none lost: every request that reached the engine ended there exactly once (some cancels and
            # deadlines land before the server has submitted the request)
            ended = sum(v[f"finished_{k}"] for k in ("stop", "length", "cancelled", "deadline", "error"))
            assert ended == v["submitted"] and outcomes["ok"] + 1 <= v["submitted"] <= n + 1
            assert v["finished_error"] == 0
    finally:
        bg.stop(grace=2)


# -- graceful shutdown -----------------------------------------------------------------------------
def test_graceful_shutdown_drains_in_flight():
    engine = MockEngine(tick_s=0.004)
    bg = BackgroundServer(engine)
    bg.wait_ready()
    c = Client(bg.address, timeout=20)
    calls = [c.stream(f"p{i}", max_tokens=120) for i in range(4)]
    firsts = [next(call) for call in calls]
    stopper = threading.Thread(target=bg.stop, kwargs={"grace": 10})
    stopper.start()
    time.sleep(0.1)
    assert engine.ready and bg.server.servicer.draining
    code, _ = code_of(lambda: c.generate("new", max_tokens=2))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert c.health() == "NOT_SERVING"
    for i, (call, first) in enumerate(zip(calls, firsts)):
        rest = list(call)
        assert first.text + "".join(r.text for r in rest) == echo_text(f"p{i}", 120)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    stopper.join(10)
    assert not stopper.is_alive() and not bg.thread.is_alive()
    assert engine.stats()["pages_free"] == engine.pages_total
    assert engine._thread is not None and not engine._thread.is_alive()
    c.close()
