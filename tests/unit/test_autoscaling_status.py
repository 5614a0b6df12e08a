"""The operator autoscaler's status (``autoscaling.report``/``restore`` of a ``loop.Scaling``),
without a cluster.

Covers: ``status.autoscaler`` round-trips (written by one operator, restored by the next,
written again the same); held stages make ``ScalingActive`` False with reason
``FailedGetMetrics`` naming them, and True again once metrics are back, keeping the
transition time while the status holds; switching autoscaling off clears the memory; a
malformed ``status.autoscaler`` is not fatal (the autoscaler starts afresh).
"""

from __future__ import annotations

from worldmesh_operator import autoscaling
from worldmesh_operator.loop import Scaling
from worldmesh_operator.scaling import StageLoad
from worldmesh_operator.spec import parse_spec

SPEC = parse_spec(
    {
        "apiVersion": "worldmesh.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "st"},
        "spec": {
            "model": {"name": "toy", "splitPoints": [1]},
            "stages": [{"name": "front"}, {"name": "back", "replicas": {"min": 1, "max": 4}}],
            "autoscaling": {"enabled": True, "metric": "queueDepthPerWorker", "target": 4},
        },
    }
)
T0 = 1_800_000_000.0  # wall-clock seconds


def scaled() -> Scaling:
    scaling = Scaling()
    autoscaling.restore(scaling, SPEC.autoscaling, {})
    assert scaling.autoscaler is not None
    for t, signal in ((T0, 8.0), (T0 + 2, 4.0), (T0 + 4, 1.0)):
        loads = [StageLoad(1, scaling.wishes.get(1, 1), signal, 1, 4)]
        for decision in scaling.autoscaler.decide(loads, t):
            scaling.wishes[1] = decision.workers
    scaling.last_scale[1] = T0
    return scaling


def report(scaling: Scaling, previous=None, now="2027-01-15T08:00:00Z"):
    status: dict = {"observedGeneration": 3, "conditions": []}
    autoscaling.report(status, scaling, SPEC, previous or [], now)
    return status


def test_status_round_trips_through_a_restart():
    first = report(scaled())
    saved = first["autoscaler"]
    back = saved["stages"][0]
    assert back["stage"] == 1 and back["name"] == "back" and back["workers"] == 2
    assert [r["workers"] for r in back["recommendations"]] == [2, 1]
    assert back["recommendations"][0]["from"] == "2027-01-15T08:00:00.000Z"
    assert back["lastScaleTime"] == "2027-01-15T08:00:00.000Z"
    assert back["changes"] == [{"time": "2027-01-15T08:00:00.000Z", "workers": 1}]
    restarted = Scaling()
    autoscaling.restore(restarted, SPEC.autoscaling, saved)
    assert restarted.wishes == {1: 2}
    assert report(restarted)["autoscaler"] == saved


def test_scaling_active_condition_follows_held_stages():
    scaling = scaled()
    scaling.held = [1]
    held = report(scaling)["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in held] == [
        ("ScalingActive", "False", "FailedGetMetrics")
    ]
    assert "back" in held[0]["message"] and held[0]["observedGeneration"] == 3
    still = report(scaling, previous=held, now="2027-01-15T09:00:00Z")["conditions"]
    assert still[0]["lastTransitionTime"] == held[0]["lastTransitionTime"]
    scaling.held = []
    active = report(scaling, previous=held, now="2027-01-15T09:00:00Z")["conditions"]
    assert (active[0]["status"], active[0]["reason"]) == ("True", "ValidMetricFound")
    assert active[0]["lastTransitionTime"] == "2027-01-15T09:00:00Z"


def test_off_clears_the_memory_and_bad_memory_starts_afresh():
    scaling = scaled()
    scaling.autoscaler = None
    assert report(scaling)["autoscaler"] is None
    broken = Scaling()
    autoscaling.restore(broken, SPEC.autoscaling, {"stages": [{"stage": 1, "workers": "many"}]})
    assert broken.wishes == {} and broken.autoscaler is not None
