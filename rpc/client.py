"""Python clients of the Generate service.

    from pallax.rpc.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("The capital of France is", max_tokens=16).text)
        for r in c.stream(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(r.text, end="", flush=True)

    async with AsyncClient("127.0.0.1:50051") as c:
        r = await c.generate("Hello", max_tokens=8)
        async for r in c.stream("Hello", max_tokens=8): ...

Errors arrive as `grpc.RpcError` (`.code()`, `.details()`, `.trailing_metadata()`).
"""

from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pallax.rpc import pallax_pb2 as pb
from pallax.rpc import pallax_pb2_grpc as pb_grpc

_SAMPLING = tuple(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def build_request(prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                  token_ids: Sequence[int] | None = None, request_id: str = "", adapter: str = "",
                  priority: int = 0, **sampling) -> pb.GenerateRequest:
    """A GenerateRequest; keyword arguments are SamplingParams fields (max_tokens, temperature,
    top_k, top_p, min_p, repetition_penalty, seed, stop, stop_token_ids, ignore_eos, logprobs)."""
    unknown = set(sampling) - set(_SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling parameters: {sorted(unknown)}; known: {list(_SAMPLING)}")
    sp = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    req = pb.GenerateRequest(request_id=request_id, adapter=adapter, priority=priority, sampling=sp)
    if prompt is not None:
        req.text = prompt
    if token_ids is not None:
        req.token_ids.extend(token_ids)
    for m in messages or ():
        req.messages.add(role=m["role"], content=m["content"])
    return req


def _tokenize_request(text: str | None, messages: Sequence[dict] | None) -> pb.TokenizeRequest:
    req = pb.TokenizeRequest(text=text or "")
    for m in messages or ():
        req.messages.add(role=m["role"], content=m["content"])
    return req


def _channel_args(max_message_bytes: int):
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _credentials(tls: bool, root_certificates: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates=root_certificates) if tls or root_certificates else None


class _Base:
    def __init__(self, target: str, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None,
                 max_message_bytes: int = 16 << 20, channel=None):
        self.target, self.timeout = target, timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._creds = _credentials(tls, root_certificates)
        self._options = _channel_args(max_message_bytes)
        self.channel = channel

    def _kw(self, timeout):
        t = self.timeout if timeout is None else timeout
        return {"timeout": t, "metadata": self.metadata}


class Client(_Base):
    """Synchronous client. `stream()` returns the gRPC call: iterate it; `.cancel()` stops it."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self.channel is None:
            self.channel = (grpc.secure_channel(target, self._creds, self._options) if self._creds
                            else grpc.insecure_channel(target, self._options))
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return self.stub.Generate(build_request(prompt, **kwargs), **self._kw(timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> Iterator[pb.GenerateResponse]:
        return self.stub.GenerateStream(build_request(prompt, **kwargs), **self._kw(timeout))

    def tokenize(self, text: str | None = None, *, messages=None, timeout: float | None = None) -> pb.TokenizeResponse:
        return self.stub.Tokenize(_tokenize_request(text, messages), **self._kw(timeout))

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout))

    def stats(self, timeout: float | None = None) -> pb.GetStatsResponse:
        return self.stub.GetStats(pb.GetStatsRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ..."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), **self._kw(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_serving(self, timeout: float = 60.0) -> None:
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{self.target} is not SERVING after {timeout}s")
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    """asyncio client. `stream()` is an async iterator of responses."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self.channel is None:
            self.channel = (grpc.aio.secure_channel(target, self._creds, self._options) if self._creds
                            else grpc.aio.insecure_channel(target, self._options))
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> pb.GenerateResponse:
        return await self.stub.Generate(build_request(prompt, **kwargs), **self._kw(timeout))

    def stream(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs) -> AsyncIterator[pb.GenerateResponse]:
        """The call object: `async for r in call`; `call.cancel()` stops it."""
        return self.stub.GenerateStream(build_request(prompt, **kwargs), **self._kw(timeout))

    async def tokenize(self, text: str | None = None, *, messages=None, timeout: float | None = None) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(_tokenize_request(text, messages), **self._kw(timeout))

    async def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout))

    async def stats(self, timeout: float | None = None) -> pb.GetStatsResponse:
        return await self.stub.GetStats(pb.GetStatsRequest(), **self._kw(timeout))

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        r = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), **self._kw(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
