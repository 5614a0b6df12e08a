"""The autoscaling policy under a fake clock.

Covers: scale up at once past the target; the tolerance band; scale down only after the
down-stabilization window, and only as far as the window's highest recommendation; rate
limits per period; the bottleneck stage grows first; missing metrics hold the size; min
and max bound every decision; workers not yet reporting count as idle on the way up and at
target on the way down (the HPA's rule); an autoscaler restored from its exported memory
(as a restarted operator does) carries out a pending scale down at the same time as the
one that never stopped, and does not flap back down right after a scale up.
"""

from __future__ import annotations

from worldmesh_operator.scaling import Autoscaler, StageLoad, StageMemory
from worldmesh_operator.spec import AutoscalingSpec, ScaleLimit

SPEC = AutoscalingSpec(
    enabled=True,
    metric="queueDepthPerWorker",
    target=4.0,
    scale_down_stabilization_seconds=300,
    scale_up_limit=ScaleLimit(4, 15),
    scale_down_limit=ScaleLimit(1, 60),
)


def load(signal, current=2, stage=1, lo=1, hi=8, reporting=None):
    return StageLoad(stage, current, signal, lo, hi, reporting)


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


def test_a_stage_waits_to_grow_while_a_later_stage_has_workers_on_the_way():
    # stage 1 grew to 3 and 2 of them do not report yet; the front's queue (5 rows per
    # worker) may be waiting for stage 1, whose newcomers drain it
    scaler = Autoscaler(SPEC)
    front, middle = load(10.0, current=1, stage=0), load(2.0, current=3, stage=1, reporting=1)
    held = scaler.decide([front, middle], 0)[0]
    assert held.workers == 1 and "stage 1 has workers on the way" in held.reason
    # once they report, a queue still long at the front is its own
    middle = load(2.0, current=3, stage=1, reporting=3)
    assert scaler.decide([front, middle], 1)[0].workers == 3  # ceil(1 x 10 / 4)


def test_missing_metrics_hold_and_bounds_clamp():
    scaler = Autoscaler(SPEC)
    held = scaler.decide([load(None, current=3)], 0)[0]
    assert held.workers == 3 and held.held
    assert scaler.decide([load(100.0, current=2, hi=3)], 0)[0].workers == 3
    assert scaler.decide([load(0.0, current=2, lo=2)], 1000)[0].workers == 2


def test_workers_not_reporting_yet_count_as_capacity_on_the_way():
    scaler = Autoscaler(SPEC)
    # 1 of 2 workers reports (the other just started): 8 rows on it is 4 per worker.
    assert scaler.decide([load(8.0, current=2, reporting=1)], 0)[0].workers == 2
    assert scaler.decide([load(16.0, current=2, reporting=1)], 1)[0].workers == 4
    # On the way down the silent one counts at target: 1 row on the reporting one is not
    # a reason to shrink (it would be at 2 * 1 / 4 without the rule).
    scaler = Autoscaler(SPEC)
    scaler.decide([load(1.0, current=2, reporting=1)], 0)
    assert scaler.decide([load(1.0, current=2, reporting=1)], 400)[0].workers == 2


def _tick_both(live, restored, signal, current, t):
    return (
        live.decide([load(signal, current=current)], t)[0].workers,
        restored.decide([load(signal, current=current)], t)[0].workers,
    )


def test_restored_mid_window_scales_down_exactly_when_the_original_would():
    live = Autoscaler(SPEC)
    live.decide([load(16.0, current=4)], 0)  # recommends 8 (capped at hi=8)
    for t in range(1, 100, 5):
        live.decide([load(0.5, current=8)], t)  # under target from t=1 on
    memory = live.export()
    assert memory[1].runs[0][2] == 8 and len(memory[1].runs) == 2  # 8 at t=0, then 1s
    restored = Autoscaler(SPEC, restored=memory)  # the operator restarted at t=100
    for t in range(101, 300, 7):
        assert _tick_both(live, restored, 0.5, 8, t) == (8, 8)  # window not over: hold
    assert _tick_both(live, restored, 0.5, 8, 301) == (7, 7)  # both at the same tick
    fresh = Autoscaler(SPEC)  # what a restart without the memory would do: shrink at once
    assert fresh.decide([load(0.5, current=8)], 101)[0].workers == 7


def test_restored_keeps_rate_limits_and_does_not_flap():
    scaler = Autoscaler(SPEC)
    assert scaler.decide([load(16.0, current=2, hi=20)], 0)[0].workers == 6  # +4 per 15 s
    memory = scaler.export()
    assert memory[1].changes == ((0, 4),)
    restored = Autoscaler(SPEC, restored=memory)
    # Still over target 5 s later: the rate limit remembered holds the stage at 6.
    assert restored.decide([load(16.0, current=6, hi=20)], 5)[0].workers == 6
    # Load gone right after the restart: the scale up is not undone before the window.
    assert restored.decide([load(0.0, current=6, hi=20)], 10)[0].workers == 6


def test_export_rounds_only_the_last_run_and_restore_rebuilds_it():
    scaler = Autoscaler(SPEC)
    for t in (0, 1, 2):
        scaler.decide([load(8.0, current=4)], t)  # 8 recommended three times
    for t in (3, 14, 27):
        scaler.decide([load(4.0, current=4)], t)  # then 4
    memory = scaler.export(resolution_s=10)
    assert memory[1].runs == ((0, 2, 8), (3, 23, 4))  # 27 rounded down to 3 + 2 * 10
    again = Autoscaler(SPEC, restored={1: StageMemory(memory[1].runs)}).export()
    assert again[1].runs == memory[1].runs
