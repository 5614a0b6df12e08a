"""The control step of one deployment: what the kopf operator and ``worldmesh run`` both drive.

One ``ControlLoop.step()``: the autoscaler's tick (at most every ``scale_every_s``; stages
pinned by ``spec.replicas`` are left alone) -> the desired state -> the runtime's
observation -> the reconciler's plan -> the runtime applies it -> the status summary,
and the stage sizes in the control metrics. The drivers keep only what is theirs: the
kopf handlers turn a ``Step`` into Events and the ModelDeployment's status, ``worldmesh
run`` into its live table; each sets ``spec`` when the manifest changes.

The autoscaler's memory (``Scaling``) lives here; the kopf operator also writes it to, and
restores it from, ``status.autoscaler`` (``autoscaling``), on the same wall clock.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from worldmesh_worker.control import ControlError

from . import ramp_leader
from .desired import Desired, desired_of
from .metrics import ControlMetrics
from .metrics_source import MetricsSource
from .reconciler import Action, Observed, WorkerState, reconcile
from .runtime.base import Runtime
from .scaling import Autoscaler, Decision, stage_loads
from .spec import DeploymentSpec


@dataclass
class Scaling:
    """The autoscaler's state for one deployment."""

    autoscaler: Autoscaler | None = None
    wishes: dict[int, int] = field(default_factory=dict)  #: workers wanted per stage
    signals: dict[int, float | None] = field(default_factory=dict)  #: the last reading
    held: list[int] = field(default_factory=list)  #: stages whose metrics are missing/stale
    last_scale: dict[int, float] = field(default_factory=dict)  #: when each stage last moved


@dataclass(frozen=True, slots=True)
class Scaled:
    """An autoscaler decision that changed a stage's size."""

    decision: Decision
    before: int


@dataclass
class Step:
    desired: Desired
    observed: Observed
    actions: list[Action]
    errors: list[str]  #: one per action that failed (or world open since the last step)
    failures: list[str]  #: why workers of this observation are DEAD
    scaled: list[Scaled]
    summary: dict[str, Any]  #: ``reconciler.summarize``: phase, reason, counts per stage

    @property
    def dead(self) -> set[str]:
        return {w.id for w in self.observed.workers if w.state is WorkerState.DEAD}


class ControlLoop:
    def __init__(
        self,
        spec: DeploymentSpec,
        runtime: Runtime,
        source: MetricsSource,
        metrics: ControlMetrics,
        *,
        scale_every_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.runtime = runtime
        self.source = source
        self.metrics = metrics
        self.scale_every_s = scale_every_s
        self.clock = clock
        self.scaling = Scaling()
        self.last: Step | None = None
        self._last_tick = -math.inf
        self._issued: set[str] = set()

    def new_id(self, stage: int) -> str:
        """A new worker's id (a DNS label: it names a pod), never one issued before."""
        while True:
            worker_id = f"{self.spec.name}-s{stage}-{secrets.token_hex(3)}"
            if worker_id not in self._issued:
                self._issued.add(worker_id)
                return worker_id

    async def autoscale(self, now: float) -> list[Scaled]:
        """One tick of the autoscaler, when due; the decisions that change a stage's size."""
        policy, state = self.spec.autoscaling, self.scaling
        if not policy.enabled:
            state.autoscaler, state.wishes, state.held = None, {}, []
            return []
        if state.autoscaler is None or state.autoscaler.spec != policy:
            state.autoscaler = Autoscaler(policy)
        if now - self._last_tick < self.scale_every_s:
            return []
        self._last_tick = now
        state.signals = await self.source.stage_signals(policy.metric)
        running: dict[int, int] = {}
        for _, stage, _ in self.runtime.targets():
            running[stage] = running.get(stage, 0) + 1
        loads = stage_loads(self.spec, state.wishes, state.signals, self.source.reporting, running)
        current = {load.stage: load.current for load in loads}
        state.held = []
        scaled = []
        for decision in state.autoscaler.decide(loads, now):
            before = current[decision.stage]
            self.metrics.decision(
                self.spec.name, decision, state.signals.get(decision.stage), before
            )
            if decision.held:
                state.held.append(decision.stage)
            if decision.workers != before:
                state.last_scale[decision.stage] = now
                scaled.append(Scaled(decision, before))
            state.wishes[decision.stage] = decision.workers
        return scaled

    async def share_ramps(self, observed: Observed) -> list[str]:
        """One ramp state for the deployment (``ramp_leader``): the oldest ready front
        worker tunes, every other follows it. One message per worker that did not take it."""
        ready = {
            w.id: w.created
            for w in observed.workers
            if w.stage == 0 and w.state is WorkerState.READY
        }
        errors = []
        for worker, body in ramp_leader.plan(ready, self.runtime.early_exits).items():
            control = self.runtime.reachable(worker)
            if control is None:
                continue
            try:
                await control.call("PUT", "/v1/ramps", body, timeout=5.0)
            except (ControlError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                errors.append(f"sharing the ramp state with {worker} failed: {exc}")
        return errors

    async def step(self, deleted: bool = False) -> Step:
        """Scale, observe, plan, apply; ``deleted``: drain and stop everything instead."""
        scaled = [] if deleted else await self.autoscale(self.clock())
        desired = desired_of(self.spec, self.scaling.wishes, deleted)
        observed = await self.runtime.observe()
        failures = list(self.runtime.failures)
        actions, summary = reconcile(desired, observed, self.new_id)
        errors = await self.runtime.apply(actions)
        errors += await self.share_ramps(observed)
        for stage in summary["stages"]:
            bounds = self.spec.stages[stage["stage"]]
            self.metrics.stage(
                self.spec.name,
                stage["stage"],
                desired=stage["desired"],
                ready=stage["ready"],
                low=bounds.min_replicas,
                high=bounds.max_replicas,
            )
        self.last = Step(desired, observed, actions, errors, failures, scaled, summary)
        return self.last
