"""The autoscaling policy: pure, per stage, with the clock passed in.

Each tick gets, per stage, the current worker count and a load signal (``queueDepthPerWorker``:
rows waiting per worker; ``busyFraction``: the share of time a worker computes), and returns
the worker count it wants, as the Kubernetes HPA does:

- raw recommendation ``ceil(current * signal / target)``; within the tolerance band
  (``|signal / target - 1| <= 0.1``) the current count stands;
- workers still starting count as capacity on the way: ``current`` includes them, and
  when only ``reporting`` of them made the signal (a new worker reaches Prometheus seconds
  after it is ready), the others count, as in the HPA, as idle on the way up and at target
  on the way down; if that reverses the direction, the size stands. So a stage neither
  grows twice for one overload nor shrinks because its newcomer is not measured yet;
- stabilization: a scale up takes the *lowest* recommendation of the last
  ``scaleUpStabilizationSeconds`` (0: at once), a scale down the *highest* of the last
  ``scaleDownStabilizationSeconds`` (300 s by default), so a dip does not shrink a stage;
- rate limits: at most ``scaleUpLimit.workers`` added (``scaleDownLimit.workers`` removed)
  per ``periodSeconds``;
- the bottleneck first: in one tick only the stage with the highest ``signal / target``
  grows; the others are looked at again on the next tick. And a stage does not grow
  while a later stage has workers that do not report yet: the rows queued upstream may
  be waiting for that stage, and its new workers drain them (a local run grew its front
  stage one second after the slow middle stage had grown, before any newcomer of it was
  ready);
- missing or stale metrics hold the stage at its current size (``held`` says why): never
  a scale to zero or to max on no data;
- the result is clamped to the stage's min..max.

The policy's memory (recent recommendations, recent changes) can be exported and restored
(``export()`` / ``Autoscaler(spec, restored=...)``), so a restarted operator neither flaps
nor forgets a pending scale down: a run of equal recommendations is kept as its first and
last time, which is all the windows' min and max need.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .spec import AutoscalingSpec, DeploymentSpec

TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class StageLoad:
    stage: int
    current: int  #: workers ready or starting (capacity on the way counts)
    signal: float | None  #: None: no fresh metrics
    min_workers: int
    max_workers: int
    reporting: int | None = None  #: workers whose metrics made ``signal``; None: all

    def ratio(self, target: float) -> float | None:
        """Load over target per worker of ``current``, the unmeasured ones as the HPA counts
        them; None when no signal."""
        if self.signal is None:
            return None
        ratio = self.signal / target
        measured = self.reporting if self.reporting is not None else self.current
        if 0 < measured < self.current and ratio != 1:
            assumed = 0.0 if ratio > 1 else target
            missing = self.current - measured
            adjusted = (self.signal * measured + assumed * missing) / (self.current * target)
            return adjusted if (adjusted > 1) == (ratio > 1) else 1.0
        return ratio


def stage_loads(
    spec: DeploymentSpec,
    wishes: dict[int, int],
    signals: dict[int, float | None],
    reporting: dict[int, int],
    running: dict[int, int] | None = None,
) -> list[StageLoad]:
    """The loads of the stages the autoscaler steers (those ``spec.replicas`` does not pin):
    each stage's current size is its last wish, else what runs (an operator that restarts
    without memory), at least ``min``."""
    return [
        StageLoad(
            s.index,
            wishes.get(s.index, max(s.min_replicas, (running or {}).get(s.index, 0))),
            signals.get(s.index),
            s.min_replicas,
            s.max_replicas,
            reporting=reporting.get(s.index),
        )
        for s in spec.stages
        if spec.pinned_replicas(s.index) is None
    ]


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


@dataclass(frozen=True, slots=True)
class StageMemory:
    """What the policy remembers of a stage, as plain data (times on the caller's clock)."""

    runs: tuple[tuple[float, float, int], ...] = ()  #: (first, last, workers) recommended
    changes: tuple[tuple[float, int], ...] = ()  #: (time, +added/-removed)


class Autoscaler:
    def __init__(
        self, spec: AutoscalingSpec, restored: dict[int, StageMemory] | None = None
    ) -> None:
        self.spec = spec
        self._history: dict[int, _History] = {}
        for stage, memory in (restored or {}).items():
            history = self._history[stage] = _History()
            for first, last, workers in memory.runs:
                history.recommendations.append((first, workers))
                if last > first:
                    history.recommendations.append((last, workers))
            history.changes.extend(memory.changes)

    def export(self, resolution_s: float = 0.0) -> dict[int, StageMemory]:
        """The memory of every stage. The last run's end is rounded down to ``resolution_s``
        so that a caller storing it writes only when something changed or that much passed."""
        exported = {}
        for stage, history in sorted(self._history.items()):
            runs: list[tuple[float, float, int]] = []
            for when, workers in history.recommendations:
                if runs and runs[-1][2] == workers:
                    runs[-1] = (runs[-1][0], when, workers)
                else:
                    runs.append((when, when, workers))
            if runs and resolution_s > 0:
                first, last, workers = runs[-1]
                runs[-1] = (first, first + (last - first) // resolution_s * resolution_s, workers)
            exported[stage] = StageMemory(tuple(runs), tuple(history.changes))
        return exported

    def decide(self, loads: list[StageLoad], now: float) -> list[Decision]:
        target = self.spec.target or 1.0
        raw: dict[int, int] = {}
        ratios: dict[int, float] = {}
        for load in loads:
            ratio = load.ratio(target)
            if ratio is not None:
                ratios[load.stage] = ratio
                raw[load.stage] = (
                    load.current if abs(ratio - 1) <= TOLERANCE else math.ceil(load.current * ratio)
                )
        growing = [load for load in loads if raw.get(load.stage, load.current) > load.current]
        bottleneck = max(growing, key=lambda ld: ratios[ld.stage], default=None)
        arriving = [
            ld.stage for ld in loads if ld.reporting is not None and ld.reporting < ld.current
        ]
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
            later = [stage for stage in arriving if stage > load.stage]
            if wanted > load.current and bottleneck is not None and load.stage != bottleneck.stage:
                wanted, reason = (
                    load.current,
                    f"stage {bottleneck.stage} is the bottleneck: it grows first",
                )
            elif wanted > load.current and later:
                wanted, reason = (
                    load.current,
                    f"stage {later[0]} has workers on the way: they drain this queue first",
                )
            period = max(
                self.spec.scale_up_limit.period_seconds, self.spec.scale_down_limit.period_seconds
            )
            while history.changes and history.changes[0][0] <= now - period:
                history.changes.popleft()
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
