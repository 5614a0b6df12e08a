"""Where the autoscaler reads load: ``MetricsSource``. ``DirectScrape`` asks the workers'
``/metrics`` itself (the local runtime); a Prometheus-backed source will answer the same
question from the Prometheus HTTP API.

Signals per stage: ``queueDepthPerWorker`` is the rows waiting in the stage's queues
divided by its workers; ``busyFraction`` is the share of wall time the stage's workers
spent computing since the previous reading. A stage with no worker that answered gets
``None`` (missing or stale: the policy holds its size).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


class MetricsSource(Protocol):
    async def stage_signals(self, metric: str) -> dict[int, float | None]: ...


class DirectScrape:
    def __init__(self, runtime: Any, timeout_s: float = 1.0) -> None:
        self.runtime = runtime
        self.timeout_s = timeout_s
        self._compute: dict[str, tuple[float, float]] = {}  # worker -> (time, compute seconds)

    async def stage_signals(self, metric: str) -> dict[int, float | None]:
        per_stage: dict[int, list[float]] = {}
        stages = {w.stage for w in self.runtime.workers.values()}
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        ) as session:
            for worker in list(self.runtime.workers.values()):
                if worker.handle is None or worker.stopping:
                    continue
                values = await self._scrape(session, worker.handle.http_url)
                if values is None:
                    continue
                if metric == "busyFraction":
                    now, busy = (
                        time.monotonic(),
                        values.get("worldmesh_stage_compute_seconds_sum", 0.0),
                    )
                    last = self._compute.get(worker.id)
                    self._compute[worker.id] = (now, busy)
                    if last is None or now <= last[0]:
                        continue
                    per_stage.setdefault(worker.stage, []).append(
                        (busy - last[1]) / (now - last[0])
                    )
                else:
                    per_stage.setdefault(worker.stage, []).append(
                        values.get("worldmesh_queue_depth", 0.0)
                    )
        return {s: (sum(v) / len(v) if (v := per_stage.get(s)) else None) for s in stages}

    @staticmethod
    async def _scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
        try:
            async with session.get(url + "/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        return {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name in ("worldmesh_queue_depth", "worldmesh_stage_compute_seconds_sum")
        }
