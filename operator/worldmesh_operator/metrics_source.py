"""Where the autoscaler reads load: ``MetricsSource``. ``DirectScrape`` asks the workers'
``/metrics`` itself (the local runtime, or pods without a Prometheus); ``PrometheusSource``
answers the same question with PromQL over the Prometheus HTTP API.

Signals per stage: ``queueDepthPerWorker`` is the rows waiting in the stage's queues
divided by its workers; ``busyFraction`` is the share of wall time the stage's workers
spent computing since the previous reading. A stage with no worker that answered gets
``None`` (missing or stale: the policy holds its size).

``PrometheusSource`` also says ``None`` for a stage when Prometheus does not answer, when a
target of the stage is down (``up == 0``), or when the stage's newest sample is older than
``stale_after_s`` (Prometheus stopped scraping it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .runtime.base import Target

log = logging.getLogger(__name__)


class MetricsSource(Protocol):
    #: per stage, the workers whose metrics made the last signals (new ones report late)
    reporting: dict[int, int]

    async def stage_signals(self, metric: str) -> dict[int, float | None]: ...


class DirectScrape:
    """Scrapes ``targets()`` itself on every reading."""

    def __init__(self, targets: Callable[[], list[Target]], timeout_s: float = 1.0) -> None:
        self.targets = targets
        self.timeout_s = timeout_s
        self._compute: dict[str, tuple[float, float]] = {}  # worker -> (time, compute seconds)
        self.reporting: dict[int, int] = {}

    async def stage_signals(self, metric: str) -> dict[int, float | None]:
        per_stage: dict[int, list[float]] = {}
        targets = self.targets()
        stages = {stage for _, stage, _ in targets}
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s)
        ) as session:
            for worker, stage, url in targets:
                values = await self._scrape(session, url)
                if values is None:
                    continue
                if metric == "busyFraction":
                    now, busy = (
                        time.monotonic(),
                        values.get("worldmesh_stage_compute_seconds_sum", 0.0),
                    )
                    last = self._compute.get(worker)
                    self._compute[worker] = (now, busy)
                    if last is None or now <= last[0]:
                        continue
                    per_stage.setdefault(stage, []).append((busy - last[1]) / (now - last[0]))
                else:
                    per_stage.setdefault(stage, []).append(values.get("worldmesh_queue_depth", 0.0))
        self.reporting = {s: len(v) for s, v in per_stage.items()}
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


class PrometheusSource:
    """Per-stage signals of one deployment from PromQL instant queries.

    ``rate_window_s`` is the ``rate()`` range for ``busyFraction`` (at least 4 scrape
    intervals); ``stale_after_s`` is the sample age past which a stage is stale (about 3
    scrape intervals).
    """

    def __init__(
        self,
        url: str,
        deployment: str,
        *,
        rate_window_s: float = 60.0,
        stale_after_s: float = 45.0,
        timeout_s: float = 2.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Prometheus URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.deployment = deployment
        self.rate_window_s = rate_window_s
        self.stale_after_s = stale_after_s
        self.timeout_s = timeout_s
        self.reporting: dict[int, int] = {}

    def queries(self, metric: str) -> dict[str, str]:
        """The PromQL asked for ``metric``: the signal, the sample age and the targets' health."""
        selector = f'{{deployment="{_escape(self.deployment)}"}}'
        if metric == "busyFraction":
            series = f"worldmesh_stage_compute_seconds_sum{selector}"
            per_worker = f"rate({series}[{self.rate_window_s:g}s])"
        elif metric == "queueDepthPerWorker":
            series = f"worldmesh_queue_depth{selector}"
            per_worker = series
        else:
            raise ValueError(f"unknown autoscaling metric {metric!r}")
        return {
            "signal": f"avg by (stage) ({per_worker})",
            "workers": f"count by (stage) ({per_worker})",
            "age": f"max by (stage) (time() - timestamp({series}))",
            "up": f"min by (stage) (up{selector})",
        }

    async def stage_signals(self, metric: str) -> dict[int, float | None]:
        queries = self.queries(metric)
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as session:
                answers = {name: await self._query(session, q) for name, q in queries.items()}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            log.warning("Prometheus at %s did not answer: %s", self.url, exc)
            self.reporting = {}
            return {}
        self.reporting = {stage: int(n) for stage, n in answers["workers"].items()}
        stages = answers["signal"].keys() | answers["up"].keys()
        signals: dict[int, float | None] = {}
        for stage in stages:
            value = answers["signal"].get(stage)
            fresh = answers["age"].get(stage, float("inf")) <= self.stale_after_s
            up = answers["up"].get(stage, 0.0) >= 1.0
            usable = value is not None and not math.isnan(value) and fresh and up
            signals[stage] = value if usable else None
        return signals

    async def _query(self, session: aiohttp.ClientSession, query: str) -> dict[int, float]:
        async with session.get(f"{self.url}/api/v1/query", params={"query": query}) as response:
            body = await response.json(content_type=None)
        if body.get("status") != "success":
            raise ValueError(f"query {query!r} failed: {body.get('error', body)}")
        values = {}
        for item in body["data"]["result"]:
            stage = item["metric"].get("stage")
            if stage is not None and stage.isdigit():
                values[int(stage)] = float(item["value"][1])
        return values


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')
