"""The control plane's metrics (``ControlMetrics``), read back from the text exposition.

Covers: the exact series names and labels a dashboard is built on; a decision that changes
a size counts once in its direction, a hold counts nothing and sets ``metrics_stale``; a
stale signal removes the signal series rather than leaving the last value; ``forget``
drops every series of a deleted deployment and leaves the others.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from worldmesh_operator.metrics import ControlMetrics
from worldmesh_operator.scaling import Decision


def samples(metrics: ControlMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def key(name: str, deployment: str = "d", stage: str = "1", **extra: str):
    return (name, tuple(sorted({"deployment": deployment, "stage": stage, **extra}.items())))


def test_names_labels_and_decision_counting():
    metrics = ControlMetrics()
    metrics.stage("d", 1, desired=3, ready=2, low=1, high=4)
    metrics.decision("d", Decision(1, 3, "load 9.00 over target 4: 2 -> 3"), 9.0, current=2)
    metrics.decision("d", Decision(1, 3, "within target"), 4.1, current=3)
    metrics.decision("d", Decision(1, 2, "load 1.00 under target for 300 s"), 1.0, current=3)
    got = samples(metrics)
    assert got[key("worldmesh_stage_desired_workers")] == 3
    assert got[key("worldmesh_stage_ready_workers")] == 2
    assert got[key("worldmesh_stage_min_workers")] == 1
    assert got[key("worldmesh_stage_max_workers")] == 4
    assert got[key("worldmesh_autoscaler_signal")] == 1.0
    assert got[key("worldmesh_autoscaler_recommended_workers")] == 2
    assert got[key("worldmesh_autoscaler_metrics_stale")] == 0
    assert got[key("worldmesh_autoscaler_decisions_total", direction="up")] == 1
    assert got[key("worldmesh_autoscaler_decisions_total", direction="down")] == 1


def test_a_hold_on_stale_metrics_is_exported_and_forget_cleans_up():
    metrics = ControlMetrics()
    metrics.decision("d", Decision(1, 2, "within target"), 4.0, current=2)
    metrics.decision("d", Decision(1, 2, "metrics missing or stale", held=True), None, current=2)
    metrics.decision("other", Decision(0, 1, "within target"), 0.5, current=1)
    got = samples(metrics)
    assert got[key("worldmesh_autoscaler_metrics_stale")] == 1
    assert key("worldmesh_autoscaler_signal") not in got  # no stale value left behind
    assert not any(
        name.endswith("decisions_total") and ("deployment", "d") in labels for name, labels in got
    )
    metrics.forget("d")
    left = {labels for _, labels in samples(metrics)}
    assert left and all(("deployment", "other") in labels for labels in left)
