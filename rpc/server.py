"""The gRPC Generate service on grpc.aio, over any `pallax.decode.requests.Engine`.

    server = await serve(engine, "127.0.0.1", 50051, metrics_port=9400)   # in a running event loop
    await server.wait_for_termination()

    run(engine, "127.0.0.1", 50051, metrics_port=9400)   # blocking; SIGTERM/SIGINT drain and exit

    bg = BackgroundServer(engine, port=0)   # tests and benchmarks: the server on its own thread
    ... bg.address ...; bg.stop()

The servicer only translates: it validates a request (INVALID_ARGUMENT naming the field), turns it
into an engine `Request` with the gRPC deadline, submits it with a callback that hops each
`RequestOutput` onto the event loop, and relays increments. When the RPC ends early (client
cancel, deadline) the handler's `finally` calls `engine.cancel`, which frees the request's pages.

Status codes: INVALID_ARGUMENT (bad field, unknown field, invalid UTF-8), RESOURCE_EXHAUSTED (queue
at its bound; trailing metadata `retry-after-ms`; also gRPC's own message-size limit),
UNAVAILABLE (warming up, shutting down, cancelled by the server), DEADLINE_EXCEEDED, UNAUTHENTICATED
(bearer token), INTERNAL (engine error).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pallax.decode.requests import QueueFull, Request, RequestError, RequestOutput, SamplingParams
from pallax.rpc import pallax_pb2 as pb
from pallax.rpc.metrics import ServerMetrics

SERVICE = "pallax.v1.Generator"
log = logging.getLogger("pallax.rpc")

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


# -- structured logs ------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pallax")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _log(event: str, level: int = logging.INFO, **fields) -> None:
    if log.isEnabledFor(level):
        log.log(level, event, extra={"fields": {"event": event, **fields}})


# -- request bytes: invalid UTF-8 and unknown fields -----------------------------------------------
@dataclass
class Malformed:
    """What the deserializer hands the handler when the bytes cannot become a valid request."""

    field: str
    message: str


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]  # IndexError on truncation: the caller reports it
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _is_repeated(f) -> bool:
    if hasattr(f, "is_repeated"):  # protobuf >= 6.31; `label` is gone in 7
        return bool(f.is_repeated)
    return f.label == FieldDescriptor.LABEL_REPEATED


def wire_problem(buf: bytes, descriptor, reject_unknown: bool = True, path: str = "") -> Malformed | None:
    """Walk the protobuf wire format of `buf` against `descriptor`: the first string field that is
    not valid UTF-8, or (when `reject_unknown`) the first field number the schema does not have.

    upb refuses invalid UTF-8 in proto3 strings while parsing, and gRPC would turn that failure
    into INTERNAL without naming the field; this walk lets the server answer INVALID_ARGUMENT with
    the field's path. Truncated or otherwise broken bytes return None and are left to the parser.
    """
    counts: dict[int, int] = {}
    i, n = 0, len(buf)
    try:
        while i < n:
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            f = descriptor.fields_by_number.get(number)
            if f is None and reject_unknown:
                return Malformed(f"{path}field number {number}" if path else f"field number {number}",
                                 f"unknown field in {descriptor.full_name} (this server rejects fields it does not know)")
            if wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                size, i = _varint(buf, i)
                chunk, i = buf[i:i + size], i + size
                if f is not None and f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
                    repeated = _is_repeated(f)
                    k = counts.get(number, 0)
                    counts[number] = k + 1
                    name = f"{path}{f.name}" + (f"[{k}]" if repeated else "")
                    if f.type == FieldDescriptor.TYPE_STRING:
                        try:
                            chunk.decode("utf-8")
                        except UnicodeDecodeError:
                            return Malformed(name, "is not valid UTF-8")
                    elif not f.message_type.GetOptions().map_entry:
                        inner = wire_problem(chunk, f.message_type, reject_unknown, name + ".")
                        if inner is not None:
                            return inner
            else:
                return None
        return None
    except (IndexError, ValueError):
        return None


def _deserializer(message_cls, reject_unknown: bool):
    def deserialize(data: bytes):
        problem = wire_problem(data, message_cls.DESCRIPTOR, reject_unknown)
        if problem is not None:
            return problem
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return Malformed("request", f"cannot be parsed as {message_cls.DESCRIPTOR.full_name}: {e}")
    return deserialize


# -- the servicer ---------------------------------------------------------------------------------
class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, trailers=()):
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, tuple(trailers)


def _field_error(e: RequestError, prefix: str = "") -> _Abort:
    message = str(e)
    if message.startswith(f"{e.field}: "):
        message = message[len(e.field) + 2:]
    return _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{prefix}{e.field}: {message}")


def _tokenizer_of(engine):
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(engine, "llm", None), "tokenizer", None)
    return tok


class Servicer:
    def __init__(self, engine, tokenizer, metrics: ServerMetrics, *, default_max_tokens: int = 256,
                 quantization: str = ""):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.quantization = quantization or str(getattr(engine, "quantization", "") or "")
        self.adapters = tuple(getattr(engine, "adapters", ()) or ())
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = itertools.count()

    # -- translation ---------------------------------------------------------------------------
    def _render(self, messages, field: str) -> str:
        if self.tokenizer is None:
            raise RequestError(field, "this server has no tokenizer; send token_ids")
        for i, m in enumerate(messages):
            if not m.role:
                raise RequestError(f"{field}[{i}].role", "must be non-empty")
        try:
            return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                      add_generation_prompt=True)
        except Exception as e:  # template errors (raise_exception in jinja, unknown role, ...)
            raise RequestError(field, f"the chat template cannot render them: {e}") from e

    def _encode(self, text: str, field: str, add_bos: bool) -> list[int]:
        if self.tokenizer is None:
            raise RequestError(field, "this server has no tokenizer; send token_ids")
        ids = list(self.tokenizer.encode(text))
        bos = getattr(self.tokenizer, "bos_id", None)
        # As the library does for text prompts; a rendered chat template brings its own specials.
        if add_bos and getattr(self.tokenizer, "add_bos", False) and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise RequestError(field, "encodes to no tokens")
        return ids

    def prompt_ids(self, text: str, token_ids, messages, what: str = "prompt") -> tuple[list[int], str, str]:
        """(ids, rendered text, field name) for whichever one of the three is set."""
        given = [name for name, v in (("text", text), ("token_ids", token_ids), ("messages", messages)) if len(v)]
        if not given:
            raise RequestError(what, "is empty: set one of text, token_ids, messages")
        if len(given) > 1:
            raise RequestError(what, f"set exactly one of text, token_ids, messages (got {', '.join(given)})")
        field = given[0]
        if field == "text":
            return self._encode(text, "text", add_bos=True), text, field
        if field == "messages":
            rendered = self._render(messages, "messages")
            return self._encode(rendered, "messages", add_bos=True), rendered, field
        ids = list(token_ids)
        for i, t in enumerate(ids):
            if not 0 <= t < self.engine.vocab_size:
                raise RequestError(f"token_ids[{i}]", f"token id {t} is outside the vocabulary [0, {self.engine.vocab_size})")
        return ids, "", field

    def to_request(self, msg: pb.GenerateRequest, rid: str, deadline: float | None) -> Request:
        if len(msg.request_id) > 256:
            raise RequestError("request_id", f"is {len(msg.request_id)} characters long; at most 256")
        ids, _, field = self.prompt_ids(msg.text, msg.token_ids, msg.messages)
        ctx = self.engine.max_context
        if len(ids) >= ctx:
            raise RequestError(field, f"the prompt has {len(ids)} tokens; the context holds {ctx} "
                                      f"(including at least one generated token)")
        sp = msg.sampling
        if sp.HasField("max_tokens"):
            max_tokens = sp.max_tokens
            if max_tokens > 0 and len(ids) + max_tokens > ctx:
                raise RequestError("sampling.max_tokens", f"{max_tokens} does not fit: the prompt has {len(ids)} "
                                                          f"tokens and the context holds {ctx}")
        else:
            max_tokens = min(self.default_max_tokens, ctx - len(ids))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=sp.temperature if sp.HasField("temperature") else 0.0,
            top_k=sp.top_k,
            top_p=sp.top_p if sp.HasField("top_p") else 1.0,
            min_p=sp.min_p,
            repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
            seed=sp.seed,
            stop=tuple(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids),
            ignore_eos=sp.ignore_eos,
            logprobs=sp.logprobs,
            speculative=sp.speculative or None,
            num_draft_tokens=sp.num_draft_tokens or SamplingParams.num_draft_tokens,
        )
        try:
            params.validate(self.engine.vocab_size)
        except RequestError as e:
            raise _field_error(e, "sampling.") from e
        if msg.adapter and msg.adapter not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise RequestError("adapter", f"unknown adapter {msg.adapter!r} (this server has: {known})")
        engine_id = f"{rid}#{next(self._ids)}"  # unique even when clients reuse request ids
        return Request(engine_id, ids, params, adapter=msg.adapter or None, priority=msg.priority, deadline=deadline)

    # -- the generate paths --------------------------------------------------------------------
    async def _run(self, msg, context: grpc.aio.ServicerContext):
        """Validate, submit, and yield (RequestOutput, response) increments until finished."""
        t0 = time.monotonic()
        if isinstance(msg, Malformed):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{msg.field}: {msg.message}")
        if self.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if not self.engine.ready:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up; retry shortly")
        rid = msg.request_id or uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = None if remaining is None else t0 + remaining
        try:
            req = self.to_request(msg, rid, deadline)
        except RequestError as e:
            raise _field_error(e) from e
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def callback(out: RequestOutput) -> None:  # the engine's thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, out)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                pass

        try:
            self.engine.submit(req, callback)
        except RequestError as e:
            raise _field_error(e, "sampling." if e.field in SamplingParams.__dataclass_fields__ else "") from e
        except QueueFull as e:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e),
                         [("retry-after-ms", str(max(1, int(e.retry_after_s * 1000))))]) from e
        except RuntimeError as e:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"the serving loop refused the request: {e}") from e
        self.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()
        finished, first, last, n_out = None, None, None, 0
        try:
            while True:
                out = await queue.get()
                now = time.monotonic()
                if out.token_ids:
                    if first is None:
                        first = now
                        self.metrics.ttft.observe(now - t0)
                    elif last is not None:
                        gap = (now - last) / len(out.token_ids)
                        for _ in out.token_ids:
                            self.metrics.tpot.observe(gap)
                    last = now
                    n_out += len(out.token_ids)
                if out.finished:
                    finished = out
                    break
                yield out, rid
        finally:
            reason = finished.finish_reason if finished else "cancelled"
            if finished is None:
                self.engine.cancel(req.request_id)  # client cancel or deadline: free the pages now
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if self.in_flight == 0:
                self._idle.set()
            self.metrics.requests.labels(reason).inc()
            self.metrics.tokens_in.inc(len(req.prompt_ids))
            self.metrics.tokens_out.inc(n_out)
            self.metrics.e2e.observe(time.monotonic() - t0)
            _log("request_finished", request_id=rid, finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                 completion_tokens=n_out, ttft_ms=round(1e3 * (first - t0), 3) if first else None,
                 total_ms=round(1e3 * (time.monotonic() - t0), 3), priority=req.priority,
                 adapter=req.adapter, error=finished.error if finished else None)
        if finished.finish_reason == "deadline":
            raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
        if finished.finish_reason == "cancelled":
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the request was cancelled by the server")
        if finished.finish_reason not in _FINISH:
            raise _Abort(grpc.StatusCode.INTERNAL, f"generation failed: {finished.error or finished.finish_reason}")
        yield finished, rid

    @staticmethod
    def _fill(resp: pb.GenerateResponse, out: RequestOutput) -> None:
        resp.token_ids.extend(out.token_ids)
        for lp in out.logprobs:
            resp.logprobs.add(token_id=lp.token_id, logprob=lp.logprob,
                              top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        if out.finished:
            resp.finish_reason = _FINISH[out.finish_reason]
            u, t = out.usage, out.timings
            resp.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                         cached_prompt_tokens=u.cached_prompt_tokens))
            resp.timings.CopyFrom(pb.Timings(queue_s=t.queue_s, ttft_s=t.ttft_s, total_s=t.total_s))

    async def _abort(self, context, e: _Abort):
        self.metrics.rejected.labels(e.code.name).inc()
        if e.code != grpc.StatusCode.INVALID_ARGUMENT or log.isEnabledFor(logging.DEBUG):
            _log("request_refused", logging.WARNING, code=e.code.name, detail=e.message)
        if e.trailers:
            context.set_trailing_metadata(e.trailers)
        await context.abort(e.code, e.message)

    async def Generate(self, msg, context):
        resp, texts = pb.GenerateResponse(), []
        run = self._run(msg, context)
        try:
            async for out, rid in run:
                resp.request_id = rid
                texts.append(out.text)
                self._fill(resp, out)
        except _Abort as e:
            await self._abort(context, e)
        finally:
            await run.aclose()  # on cancellation: runs _run's cleanup (engine.cancel) now, not at GC
        resp.text = "".join(texts)
        return resp

    async def GenerateStream(self, msg, context):
        run = self._run(msg, context)
        try:
            async for out, rid in run:
                if out.token_ids or out.text or out.finished:
                    resp = pb.GenerateResponse(request_id=rid, text=out.text)
                    self._fill(resp, out)
                    yield resp
        except _Abort as e:
            await self._abort(context, e)
        finally:
            await run.aclose()

    async def Tokenize(self, msg, context):
        try:
            if isinstance(msg, Malformed):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{msg.field}: {msg.message}")
            try:
                ids, rendered, _ = self.prompt_ids(msg.text, [], msg.messages)
            except RequestError as e:
                raise _field_error(e) from e
        except _Abort as e:
            await self._abort(context, e)
        return pb.TokenizeResponse(token_ids=ids, rendered=rendered)

    async def ListModels(self, msg, context):
        model = pb.Model(name=self.engine.model_name, adapters=self.adapters, context_length=self.engine.max_context,
                         quantization=self.quantization, vocab_size=self.engine.vocab_size)
        return pb.ListModelsResponse(models=[model])

    async def GetStats(self, msg, context):
        s = self.engine.stats()
        values = {k: float(v) for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return pb.GetStatsResponse(pages_total=int(s.get("pages_total", 0)), pages_free=int(s.get("pages_free", 0)),
                                   waiting=int(s.get("waiting", 0)), running=int(s.get("running", 0)),
                                   in_flight_rpcs=self.in_flight, values=values)

    def handler(self, reject_unknown: bool) -> grpc.GenericRpcHandler:
        ser = lambda m: m.SerializeToString()  # noqa: E731
        de = lambda cls: _deserializer(cls, reject_unknown)  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_unary_rpc_method_handler(self.Generate, de(pb.GenerateRequest), ser),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(self.GenerateStream, de(pb.GenerateRequest), ser),
            "Tokenize": grpc.unary_unary_rpc_method_handler(self.Tokenize, de(pb.TokenizeRequest), ser),
            "ListModels": grpc.unary_unary_rpc_method_handler(self.ListModels, pb.ListModelsRequest.FromString, ser),
            "GetStats": grpc.unary_unary_rpc_method_handler(self.GetStats, pb.GetStatsRequest.FromString, ser),
        })


# -- auth -----------------------------------------------------------------------------------------
class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuse (UNAUTHENTICATED) calls whose `authorization` metadata is not `Bearer <token>`.
    Health checks stay open so that load balancers and orchestrators can probe without a token."""

    def __init__(self, token: str, metrics: ServerMetrics | None = None,
                 open_prefixes: tuple[str, ...] = ("/grpc.health.v1.Health/",)):
        if not token:
            raise ValueError("BearerAuth needs a non-empty token")
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics
        self._open = open_prefixes

    def _allowed(self, details) -> bool:
        if details.method.startswith(self._open):
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler
        if self._metrics is not None:
            self._metrics.rejected.labels("UNAUTHENTICATED").inc()
        message = "missing or wrong bearer token in the `authorization` metadata"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover  (makes this an async generator)

        if handler.request_streaming:  # no client-streaming methods here; reflection is one
            if handler.response_streaming:
                async def deny_bidi(request_iterator, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                    yield  # pragma: no cover
                return grpc.stream_stream_rpc_method_handler(deny_bidi)
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


# -- the server -----------------------------------------------------------------------------------
class GenerateServer:
    """A started server: `port`, `metrics_port`, `await stop(grace)`, `await wait_for_termination()`."""

    def __init__(self, engine, servicer: Servicer, server: grpc.aio.Server, health_servicer, metrics: ServerMetrics,
                 port: int, metrics_port: int | None):
        self.engine, self.servicer, self.server = engine, servicer, server
        self.health, self.metrics = health_servicer, metrics
        self.port, self.metrics_port = port, metrics_port
        self._ready_task: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def _watch_ready(self, start_engine: bool) -> None:
        if start_engine:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.start)
        while not self.engine.ready:
            await asyncio.sleep(0.05)
        if not self.servicer.draining:
            for name in ("", SERVICE):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            _log("serving", port=self.port, metrics_port=self.metrics_port, model=self.engine.model_name)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop admitting (UNAVAILABLE, health NOT_SERVING), let in-flight requests finish for up to
        `grace` seconds, cancel what is left, stop the engine and the server."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        _log("draining", in_flight=self.servicer.in_flight, grace_s=grace)
        try:
            await asyncio.wait_for(self.servicer._idle.wait(), timeout=grace)
        except asyncio.TimeoutError:
            _log("drain_timeout", logging.WARNING, in_flight=self.servicer.in_flight)
        if self._ready_task is not None and not self._ready_task.done():
            self._ready_task.cancel()
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.engine.stop(drain=False, timeout=5.0))
        await self.server.stop(grace=1.0)
        self.metrics.close()
        _log("stopped")
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def serve(engine, host: str = "127.0.0.1", port: int = 0, *, tokenizer=None, metrics_host: str | None = None,
                metrics_port: int | None = None, auth_token: str | None = None, tls_cert: str | None = None,
                tls_key: str | None = None, max_message_bytes: int = 16 << 20, default_max_tokens: int = 256,
                reject_unknown_fields: bool = True, quantization: str = "", start_engine: bool = True) -> GenerateServer:
    """Start the Generate service in the running event loop and return it.

    `port=0` picks a free port (see `.port`); `metrics_port=None` serves no metrics, 0 picks a free
    one. The engine is started (`engine.start()`, warm-up) in a worker thread after the port is
    open; health says NOT_SERVING until `engine.ready`. `tokenizer` defaults to `engine.tokenizer`
    (or `engine.llm.tokenizer`); without one only `token_ids` prompts work. TLS when both
    `tls_cert` and `tls_key` (PEM paths) are given; bearer-token auth when `auth_token` is set.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both tls_cert and tls_key")
    metrics = ServerMetrics(engine)
    servicer = Servicer(engine, tokenizer or _tokenizer_of(engine), metrics,
                        default_max_tokens=default_max_tokens, quantization=quantization)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    interceptors = [BearerAuth(auth_token, metrics)] if auth_token else []
    server = grpc.aio.server(interceptors=interceptors, options=options)
    server.add_generic_rpc_handlers((servicer.handler(reject_unknown_fields),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if tls_cert:
        with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(f"cannot bind {address}")
    await server.start()
    mport = metrics.serve(metrics_host or host, metrics_port) if metrics_port is not None else None
    gs = GenerateServer(engine, servicer, server, health_servicer, metrics, bound, mport)
    gs._ready_task = asyncio.get_running_loop().create_task(gs._watch_ready(start_engine))
    _log("listening", host=host, port=bound, tls=bool(tls_cert), auth=bool(auth_token), metrics_port=mport)
    return gs


def run(engine, host: str = "127.0.0.1", port: int = 50051, *, grace: float = 30.0, **kwargs) -> None:
    """Serve until SIGTERM or SIGINT, then drain for up to `grace` seconds and return."""

    async def main():
        gs = await serve(engine, host, port, **kwargs)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (_log("signal", signal=signal.Signals(s).name),
                                                        loop.create_task(gs.stop(grace))))
        await gs.wait_for_termination()

    asyncio.run(main())


class BackgroundServer:
    """The server on its own thread and event loop (tests, benchmarks, notebooks)."""

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 0, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pallax-rpc", daemon=True)
        self.thread.start()
        self.host = host
        self.server: GenerateServer = self._call(serve(engine, host, port, **kwargs), 60)

    def _call(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not self.server.engine.ready:
            if time.monotonic() > end:
                raise TimeoutError("the engine did not become ready")
            time.sleep(0.01)
        self._call(asyncio.wait_for(asyncio.shield(self.server._ready_task), timeout))

    def stop(self, grace: float = 30.0) -> None:
        if self.thread.is_alive():
            self._call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
