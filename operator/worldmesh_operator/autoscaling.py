"""The autoscaler inside the kopf operator: the same ``scaling.Autoscaler`` policy as
``worldmesh run``, fed by Prometheus when ``WORLDMESH_PROMETHEUS_URL`` is set (the chart's
``operator.prometheusUrl``) and else by scraping the worker pods' ``/metrics`` directly.

- ``DeploymentScaling.tick`` (once per reconcile step, at most every ``MIN_TICK_S``) reads
  the signals, decides, records every decision in the control metrics and as an Event
  (``ScaledUp``/``ScaledDown`` with the policy's reason), and returns the worker count it
  wants per stage. Stages pinned by ``spec.replicas`` are left alone.
- Its memory (each stage's current wish, recent recommendations as runs, recent changes,
  the last scale time; wall-clock RFC 3339 times) goes in ``status.autoscaler``. The first
  tick of a (re)started operator restores it from there, so a pending scale down still
  happens when its window ends and nothing flaps back to ``min``.
- ``ScalingActive`` condition: False with reason ``FailedGetMetrics`` (naming the stages)
  while any stage's metrics are missing or stale, and that stage holds its size; True
  (``ValidMetricFound``) otherwise. Absent when autoscaling is off.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import builders
from .metrics import ControlMetrics
from .metrics_source import DirectScrape, MetricsSource, PrometheusSource, Target
from .runtime.kubernetes import KubernetesRuntime
from .scaling import Autoscaler, Decision, StageMemory, stage_loads
from .spec import DeploymentSpec

log = logging.getLogger(__name__)

PROMETHEUS_ENV = "WORLDMESH_PROMETHEUS_URL"
SCRAPE_INTERVAL_ENV = "WORLDMESH_PROMETHEUS_SCRAPE_INTERVAL_S"
METRICS_PORT_ENV = "WORLDMESH_METRICS_PORT"
MIN_TICK_S = 1.0
MAX_RUNS = 200  #: recommendation runs kept per stage in the status (the CRD allows 256)


async def configure(memo: kopf.Memo) -> None:
    """At operator start: the control metrics (served on ``WORLDMESH_METRICS_PORT``) and
    the Prometheus URL, unless a test put its own in ``memo``."""
    memo.setdefault("metrics", ControlMetrics())
    memo.setdefault("prometheus", os.environ.get(PROMETHEUS_ENV) or None)
    every = os.environ.get(SCRAPE_INTERVAL_ENV, "15")
    try:
        memo.setdefault("scrape_interval_s", float(every))
    except ValueError:
        raise kopf.PermanentError(f"{SCRAPE_INTERVAL_ENV} must be seconds, got {every!r}") from None
    port = os.environ.get(METRICS_PORT_ENV)
    if port and "metrics_server" not in memo:
        if not port.isdigit():
            raise kopf.PermanentError(f"{METRICS_PORT_ENV} must be a port number, got {port!r}")
        # The pod's own address where the chart gives it (two replicas may share a host).
        host = os.environ.get("POD_IP") or "0.0.0.0"
        memo.metrics_server = await memo.metrics.serve(host, int(port))


async def close(memo: kopf.Memo) -> None:
    server = memo.get("metrics_server")
    if server is not None:
        await server.cleanup()


def pod_targets(runtime: KubernetesRuntime, port: int) -> list[Target]:
    """The pods of the last observation that run, have an IP and are not being deleted."""
    return [
        (name, int(pod["metadata"]["labels"][builders.LABEL_STAGE]), f"http://{ip}:{port}")
        for name, pod in runtime.pods.items()
        if (ip := pod.get("status", {}).get("podIP"))
        and not pod["metadata"].get("deletionTimestamp")
        and pod.get("status", {}).get("phase") == "Running"
    ]


@dataclass
class DeploymentScaling:
    """One ModelDeployment's autoscaler state in the operator; ``memo`` is the operator's
    (its control metrics and Prometheus URL, from ``configure``)."""

    memo: kopf.Memo = field(default_factory=kopf.Memo)
    autoscaler: Autoscaler | None = None
    source: MetricsSource | None = None
    wishes: dict[int, int] = field(default_factory=dict)
    signals: dict[int, float | None] = field(default_factory=dict)
    last_scale: dict[int, float] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)  #: stages whose metrics are missing/stale
    restored: bool = False
    _last_tick: float = 0.0

    async def tick(
        self,
        spec: DeploymentSpec,
        runtime: KubernetesRuntime,
        body: kopf.Body,
    ) -> dict[int, int]:
        """The worker count wanted per autoscaled stage (from the last observation's pods)."""
        policy = spec.autoscaling
        if not policy.enabled:
            self.autoscaler, self.wishes, self.held = None, {}, []
            return {}
        if not self.restored:
            self.restore(policy, body.get("status", {}).get("autoscaler") or {})
        if self.autoscaler is None or self.autoscaler.spec != policy:
            self.autoscaler = Autoscaler(policy)
        now = time.time()
        if now - self._last_tick < MIN_TICK_S:
            return self.wishes
        self._last_tick = now
        if self.source is None:
            self.source = self._source(spec, runtime, self.memo)
        self.signals = await self.source.stage_signals(policy.metric)
        running: dict[int, int] = {}
        for _, stage, _ in pod_targets(runtime, spec.ports.http):
            running[stage] = running.get(stage, 0) + 1
        loads = stage_loads(spec, self.wishes, self.signals, self.source.reporting, running)
        current = {load.stage: load.current for load in loads}
        self.held = []
        for decision in self.autoscaler.decide(loads, now):
            self.metrics.decision(
                spec.name, decision, self.signals.get(decision.stage), current[decision.stage]
            )
            self._announce(body, spec, decision, current[decision.stage], now)
            if decision.held:
                self.held.append(decision.stage)
            self.wishes[decision.stage] = decision.workers
        return self.wishes

    @property
    def metrics(self) -> ControlMetrics:
        metrics: ControlMetrics = self.memo.setdefault("metrics", ControlMetrics())
        return metrics

    def _source(
        self, spec: DeploymentSpec, runtime: KubernetesRuntime, memo: kopf.Memo
    ) -> MetricsSource:
        if memo.get("prometheus"):
            every = memo.get("scrape_interval_s", 15.0)
            return PrometheusSource(
                memo.prometheus,
                spec.name,
                rate_window_s=max(4 * every, 2.0),
                stale_after_s=3 * every + 1.0,
            )
        port = spec.ports.http
        return DirectScrape(lambda: pod_targets(runtime, port))

    def _announce(
        self, body: kopf.Body, spec: DeploymentSpec, decision: Decision, current: int, now: float
    ) -> None:
        if decision.workers == current:
            return
        self.last_scale[decision.stage] = now
        up = decision.workers > current
        kopf.info(
            body,
            reason="ScaledUp" if up else "ScaledDown",
            message=f"stage {spec.stages[decision.stage].name}: {decision.reason}",
        )

    # -- status ----------------------------------------------------------------------

    def report(
        self,
        status: dict[str, Any],
        spec: DeploymentSpec,
        summary: dict[str, Any],
        previous: list[dict[str, Any]],
        now: str,
    ) -> None:
        """Export the stage sizes; add ``status.autoscaler`` and the ``ScalingActive``
        condition to ``status`` (``builders.build_status``'s) when autoscaling is on."""
        for s in summary["stages"]:
            bounds = spec.stages[s["stage"]]
            self.metrics.stage(
                spec.name,
                s["stage"],
                desired=s["desired"],
                ready=s["ready"],
                low=bounds.min_replicas,
                high=bounds.max_replicas,
            )
        if self.autoscaler is None:
            status["autoscaler"] = None  # autoscaling was switched off: no stale memory left
            return
        window = self.autoscaler.spec.scale_down_stabilization_seconds
        memory = self.autoscaler.export(resolution_s=min(10.0, max(1.0, window / 10)))
        stages = []
        for stage, wish in sorted(self.wishes.items()):
            kept = memory.get(stage, StageMemory())
            entry: dict[str, Any] = {
                "stage": stage,
                "name": spec.stages[stage].name,
                "workers": wish,
                "recommendations": [
                    {"from": _rfc3339(a), "to": _rfc3339(b), "workers": n}
                    for a, b, n in kept.runs[-MAX_RUNS:]
                ],
                "changes": [{"time": _rfc3339(t), "workers": d} for t, d in kept.changes],
            }
            if stage in self.last_scale:
                entry["lastScaleTime"] = _rfc3339(self.last_scale[stage])
            stages.append(entry)
        if self.held:
            names = ", ".join(spec.stages[s].name for s in self.held)
            reason = "FailedGetMetrics"
            message = f"metrics missing or stale for stage(s) {names}: holding their size"
        else:
            reason, message = "ValidMetricFound", f"scaling on {self.autoscaler.spec.metric}"
        status["conditions"] = [
            *status.get("conditions", []),
            *builders.conditions(
                {"ScalingActive": not self.held},
                reason,
                message,
                status.get("observedGeneration"),
                previous,
                now,
            ),
        ]
        status["autoscaler"] = {"metric": self.autoscaler.spec.metric, "stages": stages}

    def restore(self, policy: Any, saved: dict[str, Any]) -> None:
        """Resume from a ``status.autoscaler`` written by an earlier operator."""
        self.restored = True
        memory = {}
        try:
            for entry in saved.get("stages", []):
                stage = int(entry["stage"])
                self.wishes[stage] = int(entry["workers"])
                if "lastScaleTime" in entry:
                    self.last_scale[stage] = _epoch(entry["lastScaleTime"])
                memory[stage] = StageMemory(
                    tuple(
                        (_epoch(r["from"]), _epoch(r["to"]), int(r["workers"]))
                        for r in entry.get("recommendations", [])
                    ),
                    tuple((_epoch(c["time"]), int(c["workers"])) for c in entry.get("changes", [])),
                )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("status.autoscaler not restored (%s): starting afresh", exc)
            self.wishes, self.last_scale, memory = {}, {}, {}
        self.autoscaler = Autoscaler(policy, restored=memory)


def _rfc3339(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
