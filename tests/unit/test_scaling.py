"""The autoscaling policy under a fake clock.

Covers: scale up at once past the target; the tolerance band; scale down only after the
down-stabilization window, and only as far as the window's highest recommendation; rate
limits per period; the bottleneck stage grows first; missing metrics hold the size; min
and max bound every decision.
"""

from __future__ import annotations

from worldmesh_operator.scaling import Autoscaler, StageLoad
from worldmesh_operator.spec import AutoscalingSpec, ScaleLimit

SPEC = AutoscalingSpec(
    enabled=True,
    metric="queueDepthPerWorker",
    target=4.0,
    scale_down_stabilization_seconds=300,
    scale_up_limit=ScaleLimit(4, 15),
    scale_down_limit=ScaleLimit(1, 60),
)


def load(signal, current=2, stage=1, lo=1, hi=8):
    return StageLoad(stage, current, signal, lo, hi)


def test_scales_up_at_once_and_holds_within_tolerance():
    scaler = Autoscaler(SPEC)
    assert scaler.decide([load(8.0)], 0)[0].workers == 4  # 2 * 8 / 4
    assert scaler.decide([load(4.3, current=4)], 1)[0].workers == 4  # within 10 %


def test_scale_down_waits_for_the_window_and_is_rate_limited():
    scaler = Autoscaler(SPEC)
    scaler.decide([load(4.0, current=4)], 0)
    decisions = [scaler.decide([load(0.5, current=4)], t)[0].workers for t in range(1, 300, 10)]
    assert set(decisions) == {4}  # the window still holds the recommendation of 4
    later = scaler.decide([load(0.5, current=4)], 302)[0]
    assert later.workers == 3 and "under target" in later.reason  # one worker per 60 s
    assert scaler.decide([load(0.5, current=3)], 320)[0].workers == 3
    assert scaler.decide([load(0.5, current=3)], 363)[0].workers == 2


def test_rate_limit_bounds_a_big_scale_up():
    scaler = Autoscaler(SPEC)
    assert scaler.decide([load(40.0, current=1, hi=20)], 0)[0].workers == 5  # +4 per 15 s
    assert scaler.decide([load(40.0, current=5, hi=20)], 5)[0].workers == 5
    assert scaler.decide([load(40.0, current=5, hi=20)], 16)[0].workers == 9


def test_the_bottleneck_grows_first():
    scaler = Autoscaler(SPEC)
    decisions = scaler.decide([load(8.0, stage=0), load(12.0, stage=1), load(6.0, stage=2)], 0)
    assert [d.workers for d in decisions] == [2, 6, 2]
    assert "bottleneck" in decisions[0].reason


def test_missing_metrics_hold_and_bounds_clamp():
    scaler = Autoscaler(SPEC)
    held = scaler.decide([load(None, current=3)], 0)[0]
    assert held.workers == 3 and held.held
    assert scaler.decide([load(100.0, current=2, hi=3)], 0)[0].workers == 3
    assert scaler.decide([load(0.0, current=2, lo=2)], 1000)[0].workers == 2
