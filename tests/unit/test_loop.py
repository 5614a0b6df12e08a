"""The one control step (``loop.ControlLoop``) and the runtimes' shared ``apply``
(``runtime.base.WorkerRuntime``), over a runtime that keeps its workers in memory.

The real runtimes under the same loop are tested end to end: processes in
``tests/integration/test_local_run.py``, pods on a real API server in ``tests/cluster``.
Here, what both drivers rely on:
- a step scales, observes, plans and applies: a new deployment converges to Ready, every
  worker id a DNS label, never issued twice; the stage sizes reach the control metrics;
- the autoscaler's tick: a decision that changes a stage is returned once (with the size
  before), a stage without metrics is held;
- ``deleted`` drains and stops every worker;
- ``apply`` stops before it starts; a world open does not hold up the step, and one that
  fails is reported by the next ``apply``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from worldmesh_operator.desired import config_digest
from worldmesh_operator.loop import ControlLoop
from worldmesh_operator.metrics import ControlMetrics
from worldmesh_operator.reconciler import (
    Observed,
    ObservedWorker,
    ObservedWorld,
    OpenWorld,
    StartWorker,
    StopWorker,
    WorkerState,
    WorldState,
)
from worldmesh_operator.runtime.base import Target, WorkerRuntime
from worldmesh_operator.spec import DeploymentSpec, parse_spec
from worldmesh_worker.control import world_name


def spec(**extra: Any) -> DeploymentSpec:
    return parse_spec(
        {
            "apiVersion": "worldmesh.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "toy"},
            "spec": {
                "model": {"name": "toy", "splitPoints": [2]},
                "stages": [{"name": "front"}, {"name": "back", "replicas": {"min": 1, "max": 3}}],
                **extra,
            },
        }
    )


class _Control:
    def __init__(self, runtime: MemoryRuntime, worker: str) -> None:
        self.runtime, self.worker = runtime, worker

    async def open_world(self, peer: str, **_: Any) -> dict[str, Any]:
        await self.runtime.open_gate.wait()
        name = world_name(self.worker, peer)
        self.runtime.worlds.add(name)
        return {"name": name, "state": "ready"}


class _Peer:
    def __init__(self, runtime: MemoryRuntime, worker: str, stage: int) -> None:
        self.worker, self.stage, self.device = worker, stage, "cpu"
        self.control = _Control(runtime, worker)


class MemoryRuntime(WorkerRuntime):
    """Workers are READY as soon as started; ``open_gate`` holds world opens back."""

    def __init__(self, spec: DeploymentSpec) -> None:
        super().__init__(answer_timeout_s=1.0, busy_limit_s=10.0)
        self.spec = spec
        self.workers: dict[str, tuple[int, WorkerState]] = {}
        self.worlds: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.unreachable: set[str] = set()
        self.open_gate = asyncio.Event()
        self.open_gate.set()

    async def observe(self) -> Observed:
        workers = tuple(
            ObservedWorker(w, stage, state, config_digest(self.spec.stage_config(stage)))
            for w, (stage, state) in sorted(self.workers.items())
        )
        worlds = tuple(
            ObservedWorld(*name.split("~"), WorldState.READY)  # type: ignore[call-arg]
            for name in sorted(self.worlds)
            if all(end in self.workers for end in name.split("~"))
        )
        return Observed(workers, worlds)

    async def start_worker(self, stage: int, worker_id: str) -> None:
        self.calls.append(("start", worker_id))
        self.workers[worker_id] = (stage, WorkerState.READY)

    async def drain_worker(self, worker_id: str) -> None:
        self.calls.append(("drain", worker_id))
        self.workers[worker_id] = (self.workers[worker_id][0], WorkerState.DRAINED)

    async def stop_worker(self, worker_id: str) -> None:
        self.calls.append(("stop", worker_id))
        self.workers.pop(worker_id, None)

    def peer(self, worker_id: str) -> _Peer:
        if worker_id in self.unreachable or worker_id not in self.workers:
            raise RuntimeError(f"worker {worker_id} is not serving")
        return _Peer(self, worker_id, self.workers[worker_id][0])

    def reachable(self, worker_id: str) -> None:
        return None

    def targets(self) -> list[Target]:
        return [(w, stage, f"http://{w}") for w, (stage, _) in self.workers.items()]


class Signals:
    def __init__(self, values: dict[int, float | None]) -> None:
        self.values, self.reporting = values, {}

    async def stage_signals(self, metric: str) -> dict[int, float | None]:
        self.reporting = {s: 1 for s, v in self.values.items() if v is not None}
        return dict(self.values)


async def converge(loop: ControlLoop, steps: int = 6) -> None:
    for _ in range(steps):
        await loop.step()
        await asyncio.sleep(0)  # the world opens' tasks
        if loop.last is not None and loop.last.summary["phase"] == "Ready":
            return


async def test_a_new_deployment_converges_and_exports_its_sizes() -> None:
    runtime, metrics = MemoryRuntime(spec()), ControlMetrics()
    loop = ControlLoop(runtime.spec, runtime, Signals({}), metrics)
    await converge(loop)
    assert loop.last is not None and loop.last.summary["phase"] == "Ready"
    assert [s["ready"] for s in loop.last.summary["stages"]] == [1, 1]
    assert len(runtime.worlds) == 1
    for worker in runtime.workers:
        assert re.fullmatch(r"toy-s[01]-[0-9a-f]{6}", worker)
    value = metrics.registry.get_sample_value(
        "worldmesh_stage_desired_workers", {"deployment": "toy", "stage": "1"}
    )
    assert value == 1


def test_worker_ids_are_never_issued_twice() -> None:
    runtime = MemoryRuntime(spec())
    loop = ControlLoop(runtime.spec, runtime, Signals({}), ControlMetrics())
    ids = {loop.new_id(0) for _ in range(5000)}
    assert len(ids) == 5000


async def test_the_autoscaler_reports_a_change_once_and_holds_a_stage_without_metrics() -> None:
    policy = {"enabled": True, "metric": "queueDepthPerWorker", "target": 4}
    runtime = MemoryRuntime(spec(autoscaling={**policy, "scaleUpStabilizationSeconds": 0}))
    signals = Signals({0: None, 1: 20.0})
    now = [1_000.0]
    loop = ControlLoop(runtime.spec, runtime, signals, ControlMetrics(), clock=lambda: now[0])
    step = await loop.step()
    (change,) = step.scaled
    assert (change.decision.stage, change.before, change.decision.workers) == (1, 1, 3)
    assert sum(isinstance(a, StartWorker) and a.stage == 1 for a in step.actions) == 3
    assert loop.scaling.wishes == {0: 1, 1: 3} and loop.scaling.last_scale == {1: now[0]}
    assert loop.scaling.held == [0]
    now[0] += 0.5  # within scale_every_s: no tick
    assert (await loop.step()).scaled == []
    now[0] += 1.0  # a tick that keeps the size: nothing to report
    assert (await loop.step()).scaled == [] and loop.scaling.wishes[1] == 3


async def test_deleted_drains_and_stops_every_worker() -> None:
    runtime = MemoryRuntime(spec())
    loop = ControlLoop(runtime.spec, runtime, Signals({}), ControlMetrics())
    await converge(loop)
    for _ in range(3):
        await loop.step(deleted=True)
    assert runtime.workers == {}
    assert [kind for kind, _ in runtime.calls] == [
        "start",
        "start",
        "drain",
        "drain",
        "stop",
        "stop",
    ]


async def test_apply_stops_first_and_does_not_wait_for_world_opens() -> None:
    runtime = MemoryRuntime(spec())
    runtime.workers = {"a": (0, WorkerState.READY), "b": (1, WorkerState.READY)}
    runtime.open_gate.clear()  # a world open that takes its time
    actions = [StartWorker(1, "c"), StopWorker("b"), OpenWorld("a", "c")]
    assert await runtime.apply(actions) == []
    assert runtime.calls == [("stop", "b"), ("start", "c")]
    assert runtime.worlds == set()  # still opening: the step went on
    runtime.open_gate.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert runtime.worlds == {"a~c"}
    runtime.unreachable = {"c"}
    assert await runtime.apply([OpenWorld("a", "c")]) == []
    await asyncio.sleep(0)
    (error,) = await runtime.apply([])
    assert "OpenWorld" in error and "worker c is not serving" in error
