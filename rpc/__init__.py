"""pallax.rpc: the gRPC Generate service.

`server.serve(engine, host, port, ...)` (async) / `server.run(...)` (blocking) /
`server.BackgroundServer(engine, ...)` (own thread) serve any `pallax.decode.requests.Engine`;
`client.Client` / `client.AsyncClient` call it; `mock_engine.MockEngine` is an echo engine for
tests and `pallax serve --mock`. See rpc/README.md.
"""
