"""``PrometheusSource`` against a real Prometheus scraping real worker metrics registries.

Each target is a ``WorkerMetrics`` registry (the workers' own metrics code) served on
127.0.0.1 and listed in a file-SD targets file. Covers:
- ``queueDepthPerWorker`` is the mean of the stage's workers' queue depth, per stage;
- ``busyFraction`` is the rate of the stage's compute seconds;
- a stage with a target down is ``None`` (the autoscaler holds), the others keep their
  signal; a stage that has no series is absent; samples older than ``stale_after_s`` are
  ``None``;
- an unreachable Prometheus gives no signals (never an exception), and a bad URL or metric
  name is a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from worldmesh_operator.metrics_source import PrometheusSource
from worldmesh_worker.control import wait_until
from worldmesh_worker.metrics import WorkerMetrics

from .prometheus import free_port, running_prometheus


class Target:
    """One worker's metrics registry on its own port."""

    def __init__(self, stage: int, worker: str) -> None:
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry, "src", stage, worker)
        self.stage, self.worker, self.port = stage, worker, free_port()

    async def start(self) -> None:
        async def metrics(_: web.Request) -> web.Response:
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    def sd(self) -> dict[str, object]:
        labels = {"deployment": "src", "stage": str(self.stage), "worker": self.worker}
        return {"targets": [f"127.0.0.1:{self.port}"], "labels": labels}


@contextlib.asynccontextmanager
async def targets(*items: Target) -> AsyncIterator[None]:
    for item in items:
        await item.start()
    try:
        yield
    finally:
        for item in items:
            await item.stop()


def write_sd(path: Path, *items: Target) -> None:
    path.write_text(json.dumps([t.sd() for t in items]))


async def signals_become(source: PrometheusSource, metric: str, check) -> dict:
    latest: dict = {}

    async def ok() -> bool:
        latest.update(await source.stage_signals(metric))
        return check(latest)

    try:
        await wait_until(ok, 30, f"{metric} signals", interval=0.2)
    except TimeoutError as exc:
        raise AssertionError(f"last signals {latest}") from exc
    return latest


async def test_signals_per_stage_and_down_targets_hold(tmp_path):
    a, b1, b2 = Target(0, "a"), Target(1, "b1"), Target(1, "b2")
    a.metrics.queue_depth.set(2)
    b1.metrics.queue_depth.set(6)
    b2.metrics.queue_depth.set(2)
    sd = tmp_path / "targets.json"
    write_sd(sd, a, b1, b2)
    async with targets(a, b1, b2), running_prometheus(tmp_path, sd) as url:
        source = PrometheusSource(url, "src", rate_window_s=2, stale_after_s=2)
        got = await signals_become(
            source, "queueDepthPerWorker", lambda s: s.get(0) == 2.0 and s.get(1) == 4.0
        )
        assert set(got) == {0, 1} and source.reporting == {0: 1, 1: 2}

        await b2.stop()  # a worker of stage 1 stops answering: stage 1 is held, 0 is not
        await signals_become(
            source, "queueDepthPerWorker", lambda s: s.get(1, 0) is None and s.get(0) == 2.0
        )
        write_sd(sd, a, b1)  # the runtime drops it from the targets: stage 1 is b1 alone
        await signals_become(source, "queueDepthPerWorker", lambda s: s.get(1) == 6.0)
        await b2.start()

        stale = PrometheusSource(url, "src", stale_after_s=-1)  # every sample is too old
        assert set((await stale.stage_signals("queueDepthPerWorker")).values()) == {None}
        other = PrometheusSource(url, "another-deployment")
        assert await other.stage_signals("queueDepthPerWorker") == {}


async def test_busy_fraction_is_the_rate_of_compute_seconds(tmp_path):
    busy, idle = Target(0, "busy"), Target(1, "idle")
    sd = tmp_path / "targets.json"
    write_sd(sd, busy, idle)

    async def compute() -> None:  # half of every second computing, as a worker reports it
        while True:
            busy.metrics.compute_duration.observe(0.05)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(compute())
    try:
        async with targets(busy, idle), running_prometheus(tmp_path, sd) as url:
            source = PrometheusSource(url, "src", rate_window_s=2, stale_after_s=2)
            got = await signals_become(
                source, "busyFraction", lambda s: s.get(0) is not None and s.get(1) is not None
            )
            await signals_become(source, "busyFraction", lambda s: 0.25 < (s.get(0) or 0) < 0.6)
            assert got[1] == 0.0
    finally:
        task.cancel()


async def test_unreachable_prometheus_and_bad_input():
    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", "src", timeout_s=1)
    assert await source.stage_signals("queueDepthPerWorker") == {}
    with pytest.raises(ValueError, match="http://"):
        PrometheusSource("127.0.0.1:9090", "src")
    with pytest.raises(ValueError, match="unknown autoscaling metric 'cpu'"):
        source.queries("cpu")
