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

It runs on a thread with an event loop of its own, so proxying under load never delays
the control loop (whose status calls judge workers alive), nor the other way round.
``set_backends`` is the control loop's side: the base URLs of the ready front workers.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter

import aiohttp
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


class FrontService:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.retried = 0  #: requests sent again to another front worker
        self._backends: tuple[str, ...] = ()
        self._in_flight: Counter[str] = Counter()
        self._turn = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_backends(self, urls: list[str]) -> None:
        """The base URLs (``http://host:port``) of the front workers that take requests."""
        self._backends = tuple(urls)  # one atomic swap: the proxy thread reads it as is

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
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            self.port = runner.addresses[0][1]
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
            await runner.cleanup()
            await self._session.close()

    def _pick(self, tried: set[str]) -> str | None:
        choices = [b for b in self._backends if b not in tried]
        if not choices:
            return None
        least = min(self._in_flight[b] for b in choices)
        fewest = [b for b in choices if self._in_flight[b] == least]
        return fewest[next(self._turn) % len(fewest)]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        tried: set[str] = set()
        last_error = "no front worker is ready"
        for _ in range(TRIES):
            backend = self._pick(tried)
            if backend is None:
                break
            tried.add(backend)
            self._in_flight[backend] += 1
            try:
                async with self._session.request(
                    request.method,
                    backend + request.rel_url.raw_path_qs,
                    data=body,
                    headers=headers,
                ) as answer:
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
                last_error = f"front worker {backend} failed: {exc or type(exc).__name__}"
                self.retried += 1
            finally:
                self._in_flight[backend] -= 1
        return web.json_response({"error": last_error}, status=503)
