"""The autoscaling policy: pure, per stage, with the clock passed in.

Each tick gets, per stage, the current worker count and a load signal (``queueDepthPerWorker``:
rows waiting per worker; ``busyFraction``: the share of time a worker computes), and returns
the worker count it wants, as the Kubernetes HPA does:

- raw recommendation ``ceil(current * signal / target)``; within the tolerance band
  (``|signal / target - 1| <= 0.1``) the current count stands;
- stabilization: a scale up takes the *lowest* recommendation of the last
  ``scaleUpStabilizationSeconds`` (0: at once), a scale down the *highest* of the last
  ``scaleDownStabilizationSeconds`` (300 s by default), so a dip does not shrink a stage;
- rate limits: at most ``scaleUpLimit.workers`` added (``scaleDownLimit.workers`` removed)
  per ``periodSeconds``;
- the bottleneck first: in one tick only the stage with the highest ``signal / target``
  grows; the others are looked at again on the next tick;
- missing or stale metrics hold the stage at its current size (``held`` says why): never
  a scale to zero or to max on no data;
- the result is clamped to the stage's min..max.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .spec import AutoscalingSpec

TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class StageLoad:
    stage: int
    current: int  #: workers ready or starting (capacity on the way counts)
    signal: float | None  #: None: no fresh metrics
    min_workers: int
    max_workers: int


@dataclass(frozen=True, slots=True)
class Decision:
    stage: int
    workers: int
    reason: str
    held: bool = False  #: metrics missing or stale: the size was held


@dataclass
class _History:
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    changes: deque[tuple[float, int]] = field(default_factory=deque)  # (time, +added/-removed)


class Autoscaler:
    def __init__(self, spec: AutoscalingSpec) -> None:
        self.spec = spec
        self._history: dict[int, _History] = {}

    def decide(self, loads: list[StageLoad], now: float) -> list[Decision]:
        target = self.spec.target or 1.0
        raw: dict[int, int] = {}
        for load in loads:
            if load.signal is not None:
                ratio = load.signal / target
                raw[load.stage] = (
                    load.current if abs(ratio - 1) <= TOLERANCE else math.ceil(load.current * ratio)
                )
        growing = [load for load in loads if raw.get(load.stage, load.current) > load.current]
        bottleneck = max(growing, key=lambda ld: ld.signal or 0.0, default=None)
        decisions = []
        for load in loads:
            if load.stage not in raw:
                decisions.append(
                    Decision(load.stage, load.current, "metrics missing or stale: holding", True)
                )
                continue
            history = self._history.setdefault(load.stage, _History())
            history.recommendations.append(
                (now, max(load.min_workers, min(load.max_workers, raw[load.stage])))
            )
            wanted, reason = self._stabilized(history, load, now)
            if wanted > load.current and bottleneck is not None and load.stage != bottleneck.stage:
                wanted, reason = (
                    load.current,
                    f"stage {bottleneck.stage} is the bottleneck: it grows first",
                )
            wanted = self._rate_limited(history, load.current, wanted, now)
            if wanted != load.current:
                history.changes.append((now, wanted - load.current))
                reason = f"{reason}: {load.current} -> {wanted}"
            decisions.append(Decision(load.stage, wanted, reason))
        return decisions

    def _stabilized(self, history: _History, load: StageLoad, now: float) -> tuple[int, str]:
        up = self.spec.scale_up_stabilization_seconds
        down = self.spec.scale_down_stabilization_seconds
        keep = max(up, down)
        while history.recommendations and history.recommendations[0][0] < now - keep:
            history.recommendations.popleft()
        recent_up = [r for t, r in history.recommendations if t >= now - up]
        recent_down = [r for t, r in history.recommendations if t >= now - down]
        lowest_up = min(recent_up) if recent_up else load.current
        highest_down = max(recent_down) if recent_down else load.current
        if lowest_up > load.current:
            return lowest_up, f"load {load.signal:.2f} over target {self.spec.target:g}"
        if highest_down < load.current:
            return highest_down, f"load {load.signal:.2f} under target for {down} s"
        return load.current, "within target"

    def _rate_limited(self, history: _History, current: int, wanted: int, now: float) -> int:
        if wanted > current:
            limit = self.spec.scale_up_limit
            added = sum(d for t, d in history.changes if d > 0 and t > now - limit.period_seconds)
            return min(wanted, current + max(0, limit.workers - added))
        if wanted < current:
            limit = self.spec.scale_down_limit
            removed = -sum(
                d for t, d in history.changes if d < 0 and t > now - limit.period_seconds
            )
            return max(wanted, current - max(0, limit.workers - removed))
        return wanted
