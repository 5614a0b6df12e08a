"""The autoscaler in the kopf operator: where it reads, what it tells, what it remembers.

The policy and its tick are the control loop's (``loop.ControlLoop.autoscale``, the same as
``worldmesh run``'s); this module adds what is the operator's own:

- where the signals come from: Prometheus when the settings name one (the chart's
  ``operator.prometheusUrl``), else the worker pods' ``/metrics`` scraped directly;
- an Event per decision that changes a stage (``ScaledUp``/``ScaledDown``, with the
  policy's reason);
- its memory (each stage's current wish, recent recommendations as runs, recent changes,
  the last scale time; wall-clock RFC 3339 times) in ``status.autoscaler``. The first step
  of a (re)started operator restores it from there, so a pending scale down still happens
  when its window ends and nothing flaps back to ``min``;
- the ``ScalingActive`` condition: False with reason ``FailedGetMetrics`` (naming the
  stages) while any stage's metrics are missing or stale, and that stage holds its size;
  True (``ValidMetricFound``) otherwise. Absent when autoscaling is off.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf

from . import builders
from .loop import Scaled, Scaling
from .metrics import ControlMetrics
from .metrics_source import DirectScrape, MetricsSource, PrometheusSource
from .runtime.kubernetes import KubernetesRuntime
from .scaling import Autoscaler, StageMemory
from .settings import Settings
from .spec import AutoscalingSpec, DeploymentSpec

log = logging.getLogger(__name__)

MAX_RUNS = 200  #: recommendation runs kept per stage in the status (the CRD allows 256)


async def configure(memo: kopf.Memo, settings: Settings) -> None:
    """At operator start: the control metrics, served on ``settings.metrics_port`` at the
    pod's own address (two replicas may share a host), unless a test put its own there."""
    memo.setdefault("metrics", ControlMetrics())
    if settings.metrics_port is not None and "metrics_server" not in memo:
        host = settings.pod_ip or "0.0.0.0"
        memo.metrics_server = await memo.metrics.serve(host, settings.metrics_port)


async def close(memo: kopf.Memo) -> None:
    server = memo.get("metrics_server")
    if server is not None:
        await server.cleanup()


def metrics_source(
    spec: DeploymentSpec, runtime: KubernetesRuntime, settings: Settings
) -> MetricsSource:
    """Prometheus when the settings name one, else the pods scraped directly."""
    if settings.prometheus_url:
        every = settings.scrape_interval_s
        return PrometheusSource(
            settings.prometheus_url,
            spec.name,
            rate_window_s=max(4 * every, 2.0),
            stale_after_s=3 * every + 1.0,
        )
    return DirectScrape(runtime.targets)


def announce(body: kopf.Body, spec: DeploymentSpec, scaled: list[Scaled]) -> None:
    """A ``ScaledUp``/``ScaledDown`` Event per decision that changed a stage's size."""
    for change in scaled:
        up = change.decision.workers > change.before
        kopf.info(
            body,
            reason="ScaledUp" if up else "ScaledDown",
            message=f"stage {spec.stages[change.decision.stage].name}: {change.decision.reason}",
        )


# -- status ----------------------------------------------------------------------------


def report(
    status: dict[str, Any],
    state: Scaling,
    spec: DeploymentSpec,
    previous: list[dict[str, Any]],
    now: str,
) -> None:
    """Add ``status.autoscaler`` and the ``ScalingActive`` condition to ``status``
    (``builders.build_status``'s) when autoscaling is on; clear them when it is off."""
    if state.autoscaler is None:
        status["autoscaler"] = None  # autoscaling was switched off: no stale memory left
        return
    window = state.autoscaler.spec.scale_down_stabilization_seconds
    memory = state.autoscaler.export(resolution_s=min(10.0, max(1.0, window / 10)))
    stages = []
    for stage, wish in sorted(state.wishes.items()):
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
        if stage in state.last_scale:
            entry["lastScaleTime"] = _rfc3339(state.last_scale[stage])
        stages.append(entry)
    if state.held:
        names = ", ".join(spec.stages[s].name for s in state.held)
        reason = "FailedGetMetrics"
        message = f"metrics missing or stale for stage(s) {names}: holding their size"
    else:
        reason, message = "ValidMetricFound", f"scaling on {state.autoscaler.spec.metric}"
    status["conditions"] = [
        *status.get("conditions", []),
        *builders.conditions(
            {"ScalingActive": not state.held},
            reason,
            message,
            status.get("observedGeneration"),
            previous,
            now,
        ),
    ]
    status["autoscaler"] = {"metric": state.autoscaler.spec.metric, "stages": stages}


def restore(state: Scaling, policy: AutoscalingSpec, saved: dict[str, Any]) -> None:
    """Resume from a ``status.autoscaler`` written by an earlier operator (a malformed one
    is logged, and the autoscaler starts afresh)."""
    wishes: dict[int, int] = {}
    last_scale: dict[int, float] = {}
    memory = {}
    try:
        for entry in saved.get("stages", []):
            stage = int(entry["stage"])
            wishes[stage] = int(entry["workers"])
            if "lastScaleTime" in entry:
                last_scale[stage] = _epoch(entry["lastScaleTime"])
            memory[stage] = StageMemory(
                tuple(
                    (_epoch(r["from"]), _epoch(r["to"]), int(r["workers"]))
                    for r in entry.get("recommendations", [])
                ),
                tuple((_epoch(c["time"]), int(c["workers"])) for c in entry.get("changes", [])),
            )
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("status.autoscaler not restored (%s): starting afresh", exc)
        wishes, last_scale, memory = {}, {}, {}
    state.wishes, state.last_scale = wishes, last_scale
    state.autoscaler = Autoscaler(policy, restored=memory)


def _rfc3339(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
