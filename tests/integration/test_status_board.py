"""The live table's traffic line when front workers come and go (``worldmesh run``):
requests/s counts each front worker's own requests since the last draw, so a worker that
left does not take the rate below zero and one that joined counts from zero."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from worldmesh_operator.status import StatusBoard

METRICS = '# TYPE worldmesh_requests_total counter\nworldmesh_requests_total{{code="200"}} {n}\n'


@dataclass
class Handle:
    http_port: int


@dataclass
class Worker:
    id: str
    handle: Handle
    stage: int = 0


@dataclass
class Runtime:
    host: str = "127.0.0.1"
    workers: dict[str, Worker] = field(default_factory=dict)


@pytest.fixture
async def front() -> Any:
    counts: dict[int, int] = {}
    runners = []

    async def start(count: int) -> int:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=METRICS.format(n=counts[port]))

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        port = runner.addresses[0][1]
        counts[port] = count
        return port

    yield start, counts
    for runner in runners:
        await runner.cleanup()


async def test_a_front_worker_replaced_never_makes_the_rate_negative(front: Any) -> None:
    start, counts = front
    a, b = await start(1000), await start(10)
    runtime = Runtime(workers={"a": Worker("a", Handle(a)), "b": Worker("b", Handle(b))})
    board = StatusBoard(out=lambda line: None)
    assert (await board._traffic(runtime))[0] == 0.0  # the first draw has nothing to compare
    counts[b] = 30  # b answered 20 more; a is replaced by c, which answered 5 so far
    c = await start(5)
    runtime.workers = {"b": Worker("b", Handle(b)), "c": Worker("c", Handle(c))}
    last_draw = board._last[0]  # type: ignore[index]
    rate = (await board._traffic(runtime))[0]
    elapsed = board._last[0] - last_draw  # type: ignore[index]
    assert rate == pytest.approx(25 / elapsed)
