"""The control plane's Prometheus metrics, in a registry of its own (no global default).

Exported by the kopf operator and by ``worldmesh run`` (``serve()``), labelled
``deployment`` and ``stage``:

- ``worldmesh_stage_{desired,ready,min,max}_workers``: the size the control loop wants, the
  workers serving, and the stage's bounds;
- ``worldmesh_autoscaler_signal``: the load signal the autoscaler read (absent while stale);
- ``worldmesh_autoscaler_recommended_workers``: its decision for the stage;
- ``worldmesh_autoscaler_decisions_total{direction=up|down}``: decisions that changed a size;
- ``worldmesh_autoscaler_metrics_stale``: 1 while the stage's metrics are missing or stale
  (the autoscaler holds its size).

A deleted deployment's series are removed (``forget``), so dashboards do not show ghosts.
"""

from __future__ import annotations

import contextlib

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from .scaling import Decision

_LABELS = ("deployment", "stage")


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=self.registry)

        self.desired = gauge("worldmesh_stage_desired_workers", "Workers the control loop wants.")
        self.ready = gauge("worldmesh_stage_ready_workers", "Workers ready to serve.")
        self.min = gauge("worldmesh_stage_min_workers", "The stage's minimum workers.")
        self.max = gauge("worldmesh_stage_max_workers", "The stage's maximum workers.")
        self.signal = gauge(
            "worldmesh_autoscaler_signal", "The load signal the autoscaler read for the stage."
        )
        self.recommended = gauge(
            "worldmesh_autoscaler_recommended_workers", "The autoscaler's decision for the stage."
        )
        self.stale = gauge(
            "worldmesh_autoscaler_metrics_stale",
            "1 while the stage's metrics are missing or stale (its size is held).",
        )
        self.decisions = Counter(
            "worldmesh_autoscaler_decisions",
            "Autoscaler decisions that changed a stage's size, by direction.",
            (*_LABELS, "direction"),
            registry=self.registry,
        )
        self._stages: dict[str, set[str]] = {}  # deployment -> stages with series

    def stage(
        self, deployment: str, stage: int, *, desired: int, ready: int, low: int, high: int
    ) -> None:
        """The stage's sizes after a reconcile step."""
        key = (deployment, str(stage))
        self._stages.setdefault(deployment, set()).add(str(stage))
        self.desired.labels(*key).set(desired)
        self.ready.labels(*key).set(ready)
        self.min.labels(*key).set(low)
        self.max.labels(*key).set(high)

    def decision(
        self, deployment: str, decision: Decision, signal: float | None, current: int
    ) -> None:
        """One autoscaler decision for a stage that was at ``current`` workers."""
        key = (deployment, str(decision.stage))
        self._stages.setdefault(deployment, set()).add(str(decision.stage))
        self.recommended.labels(*key).set(decision.workers)
        self.stale.labels(*key).set(1 if decision.held else 0)
        if signal is None:
            with contextlib.suppress(KeyError):
                self.signal.remove(*key)
        else:
            self.signal.labels(*key).set(signal)
        if decision.workers != current:
            direction = "up" if decision.workers > current else "down"
            self.decisions.labels(*key, direction).inc()

    def forget(self, deployment: str) -> None:
        """Drop every series of a deleted deployment."""
        for stage in self._stages.pop(deployment, set()):
            for metric in (
                self.desired,
                self.ready,
                self.min,
                self.max,
                self.signal,
                self.recommended,
                self.stale,
            ):
                with contextlib.suppress(KeyError):
                    metric.remove(deployment, stage)
            for direction in ("up", "down"):
                with contextlib.suppress(KeyError):
                    self.decisions.remove(deployment, stage, direction)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int) -> web.AppRunner:
        """Serve ``/metrics`` on host:port (0: any free port; see ``bound_port``)."""

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a ``serve()`` runner listens on."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("the metrics server is not listening")
