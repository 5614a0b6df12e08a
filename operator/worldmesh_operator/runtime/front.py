"""``FrontService``: one stable address for a local deployment, as a Service gives a cluster.

Front workers come and go (replaced when they die or freeze, rolled on an edit, scaled),
each on a port of its own; the endpoint ``worldmesh run`` prints must keep working through
all of it. This is a small reverse proxy on one port: every request goes to a ready front
worker (the one with the fewest requests in flight through here), never to one that is
draining or gone, as kube-proxy routes only to Ready pods. A request whose worker could
not be reached, or closed the connection before answering (it was killed or stopped with
the request in flight), is sent to another front worker: inference requests are
idempotent. So is a 503 (the worker lost its next stage, or began to drain since the
control loop last looked), while another one is left to try; the last 503 is passed on.
With no ready front worker it answers 503 with ``{"error": ...}``.

With ``grpc_port`` it serves the gRPC side the same way on a port of its own: every call
(the protocol's methods are all unary) goes, as bytes, to a ready front worker's gRPC
port with the caller's deadline and metadata; a worker that cannot be reached, or
answers UNAVAILABLE while another is left to try, gets the call sent to another. Any
other status is the worker's answer and passes through.

It runs on a thread with an event loop of its own, so proxying under load never delays
the control loop (whose status calls judge workers alive), nor the other way round.
``set_backends`` is the control loop's side: the ready front workers' addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import aiohttp
import grpc
from aiohttp import web

#: Headers that belong to one hop, not to the request (RFC 9110 7.6.1), and those that
#: aiohttp sets again for the body it sends.
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
TRIES = 3  #: front workers tried per request before it fails
#: gRPC metadata that belongs to the call, not to the caller (set again by the next hop).
CALL_METADATA = frozenset(("grpc-timeout", "user-agent", "te", "content-type"))


class Backend(NamedTuple):
    """A front worker's two doors."""

    http: str  #: base URL, ``http://host:port``
    grpc: str  #: ``host:port``


class FrontService:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, grpc_port: int | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.grpc_port = grpc_port  #: None: no gRPC side
        self.retried = 0  #: requests sent again to another front worker
        self._backends: tuple[Backend, ...] = ()
        self._in_flight: Counter[Backend] = Counter()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str | None:
        return None if self.grpc_port is None else f"{self.host}:{self.grpc_port}"

    def set_backends(self, backends: list[Backend]) -> None:
        """The front workers that take requests."""
        self._backends = tuple(backends)  # one atomic swap: the proxy thread reads it as is

    # -- lifecycle (from the control loop's thread) -----------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve from now on (again: nothing); OSError when the port cannot be had."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="front-service", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the front service did not start")
        if self._error is not None:
            raise OSError(f"cannot serve on {self.host}:{self.port}: {self._error}")

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    # -- the proxy thread -----------------------------------------------------------------

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=1 << 30)  # the worker enforces its own limit
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        server = None
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = runner.addresses[0][1]
            if self.grpc_port is not None:
                server = await self._serve_grpc()
        except OSError as exc:
            self._error = exc
            self._ready.set()
            await self._session.close()
            await runner.cleanup()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if server is not None:
                await server.stop(grace=1.0)
            for channel in self._channels.values():
                await channel.close()
            await runner.cleanup()
            await self._session.close()

    async def _serve_grpc(self) -> grpc.aio.Server:
        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        server = grpc.aio.server(options=[*unlimited, ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_GrpcForwarder(self),))
        bound = server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        if bound == 0:
            raise OSError(f"gRPC port {self.host}:{self.grpc_port} could not be bound")
        await server.start()
        self.grpc_port = bound
        return server

    def _candidates(self) -> Iterator[tuple[Backend, set[Backend]]]:
        """The front workers to try for one request or call, up to ``TRIES``, each picked
        (``_pick``) among those not tried yet, with the set tried so far."""
        tried: set[Backend] = set()
        for _ in range(TRIES):
            backend = self._pick(tried)
            if backend is None:
                return
            tried.add(backend)
            yield backend, tried

    @contextlib.asynccontextmanager
    async def _busy(self, backend: Backend) -> AsyncIterator[None]:
        """Count a request in flight on ``backend`` while it is there."""
        self._in_flight[backend] += 1
        try:
            yield
        finally:
            self._in_flight[backend] -= 1

    def _pick(self, tried: set[Backend]) -> Backend | None:
        choices = [b for b in self._backends if b not in tried]
        if not choices:
            return None
        least = min(self._in_flight[b] for b in choices)
        fewest = [b for b in choices if self._in_flight[b] == least]
        return fewest[next(self._turn) % len(fewest)]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        last_error = "no front worker is ready"
        for backend, tried in self._candidates():
            try:
                async with (
                    self._busy(backend),
                    self._session.request(
                        request.method,
                        backend.http + request.rel_url.raw_path_qs,
                        data=body,
                        headers=headers,
                    ) as answer,
                ):
                    payload = await answer.read()
                    kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
                    response = web.Response(status=answer.status, body=payload, headers=kept)
                if answer.status != 503 or self._pick(tried) is None:
                    return response
                # Unavailable there (it just lost its next stage, or began to drain since
                # the control loop last looked): another front worker may answer.
                last_error = payload.decode(errors="replace")[:300]
                self.retried += 1
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                # Not reached, or gone before it answered: another front worker answers.
                last_error = f"front worker {backend.http} failed: {exc or type(exc).__name__}"
                self.retried += 1
        return web.json_response({"error": last_error}, status=503)

    async def _forward_call(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        await self._forget_channels()
        timeout = context.time_remaining()  # None: the caller set no deadline
        metadata = tuple(
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if not key.startswith(":") and key not in CALL_METADATA
        )
        last = (grpc.StatusCode.UNAVAILABLE, "no front worker is ready")
        for backend, _ in self._candidates():
            call = self._channel(backend.grpc).unary_unary(method)
            try:
                async with self._busy(backend):
                    return await call(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                last = (exc.code(), exc.details() or "")
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    break  # the worker's answer (a bad request, a passed deadline, ...)
                # Not reached, gone, or unavailable there: another front worker answers.
                self.retried += 1
        await context.abort(*last)
        raise AssertionError("unreachable: abort raises")

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            unlimited = [("grpc.max_receive_message_length", -1)]
            self._channels[target] = grpc.aio.insecure_channel(target, options=unlimited)
        return self._channels[target]

    async def _forget_channels(self) -> None:
        """Close the channels of front workers that are gone (replaced, scaled down) once
        no call through here is still waiting on them."""
        live = {b.grpc for b in self._backends}
        busy = {b.grpc for b, n in self._in_flight.items() if n > 0}
        for target in [t for t in self._channels if t not in live and t not in busy]:
            await self._channels.pop(target).close()


class _GrpcForwarder(grpc.GenericRpcHandler):
    """Every method, unary, as bytes: ``FrontService._forward_call``."""

    def __init__(self, front: FrontService) -> None:
        self.front = front

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        forward = functools.partial(self.front._forward_call, handler_call_details.method)
        return grpc.unary_unary_rpc_method_handler(forward)
