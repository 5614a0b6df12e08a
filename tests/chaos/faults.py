"""The fault suite: seeded rounds of faults on a local deployment under load, on a machine
kept busy.

The deployment is a manifest with every stage pinned at ``workers`` (min = max, no
autoscaling), run by ``LocalDeployment`` (``worldmesh run``'s loop) with its front service,
the one endpoint that ``clients`` closed-loop clients use, optionally beside a CPU hog
(``hog`` processes spinning). Each round draws one fault from ``random.Random(seed)``, so a
failing round replays from its seed:

- ``kill``: SIGKILL of a random worker of a random stage (the front included);
- ``stop``: SIGSTOP of one for a random 2-20 s, then SIGCONT if it still exists;
- ``double``: SIGKILL of two workers at once, in two different stages;
- ``scale-up``, ``scale-down``: a stage edited to one worker more (or back, from one
  more), and a SIGKILL in another stage while that runs;
- ``opening``: a stage scaled up and its new worker SIGKILLed as soon as it serves, while
  its worlds are still opening (then scaled back);
- ``none``: no fault, the baseline for requests over 1 s.

Measured per round (``Round``): requests lost (those of rounds that kill a front worker
apart: in flight on it, they may be lost), requests over 1 s, false detections (a worker
stopped that was neither faulted nor drained: a live, unfrozen worker judged dead), time
from the fault to its detection (the victim's StopWorker), time until every stage is back
to its count and the deployment Ready, replacements started beyond one per fault, and
throughput in the 5 s before, during, and the 5 s after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from worldmesh_operator.reconciler import WorkerState
from worldmesh_operator.run import LocalDeployment
from worldmesh_worker.loadgen import ClosedLoop, RequestFactory

KINDS = ("kill", "stop", "double", "scale-up", "scale-down", "opening", "none")
WINDOW_S = 5.0  #: throughput before and after a fault is measured over this long (default)
RECOVERY_TIMEOUT_S = 90.0


@dataclass
class Round:
    seed: int
    index: int
    kind: str
    victims: list[str] = field(default_factory=list)
    front_fault: bool = False
    lost: int = 0
    over_1s: int = 0
    answered: int = 0
    false_detections: list[str] = field(default_factory=list)
    detected_s: float | None = None  #: fault -> the (first) victim's StopWorker
    recovered_s: float | None = None  #: fault -> every stage at its count, Ready
    extra_replacements: int = 0
    throughput: dict[str, float] = field(default_factory=dict)  #: before / during / after


def pinned(manifest: dict[str, Any], workers: int) -> dict[str, Any]:
    """``manifest`` with every stage at exactly ``workers`` and no autoscaling."""
    body = yaml.safe_load(yaml.safe_dump(manifest))
    for stage in body["spec"]["stages"]:
        stage["replicas"] = {"min": workers, "max": workers}
    body["spec"].pop("replicas", None)
    body["spec"].setdefault("autoscaling", {})["enabled"] = False
    return body


class Suite:
    def __init__(
        self,
        manifest: dict[str, Any],
        workdir: Path,
        request: RequestFactory,
        *,
        workers: int = 2,
        clients: int = 6,
        hog: int = 0,
        env: dict[str, str] | None = None,
        seed: int = 0,
        max_stop_s: float = 20.0,
        window_s: float = WINDOW_S,
    ) -> None:
        self.body = pinned(manifest, workers)
        self.workers = workers
        self.stages = len(self.body["spec"]["stages"])
        self.workdir = workdir
        self.request = request
        self.clients = clients
        self.hog = hog
        self.env = env or {}
        self.random = random.Random(seed)
        self.seed = seed
        self.max_stop_s = max_stop_s
        self.window_s = window_s
        self.events: list[tuple[float, str]] = []  #: (monotonic, the loop's action line)
        self.messages: list[str] = []  #: why each lost request was lost
        self._messages_seen = 0
        self._struck: float | None = None
        self.path = workdir / "manifest.yaml"

    # -- the run ----------------------------------------------------------------------

    async def run(self, kinds: list[str]) -> list[Round]:
        self.path.write_text(yaml.safe_dump(self.body))
        self.deployment = LocalDeployment(
            self.path, self.workdir / "run", env=self.env, out=self._record, port=0
        )
        hogs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.hog)
        ]
        task = asyncio.create_task(self.deployment.run())
        try:
            await self._until(self._recovered, 180, "the deployment ready")
            url = self.deployment.runtime.endpoint
            assert url is not None
            async with ClosedLoop(url, self.request, self.clients, timeout=30) as self.load:
                await self.load.answered(20, timeout=60)
                return [await self._round(i, kind) for i, kind in enumerate(kinds)]
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
            self.deployment.delete()
            await asyncio.wait_for(task, 120)

    def _record(self, line: str) -> None:
        self.events.append((time.monotonic(), line))

    async def _round(self, index: int, kind: str) -> Round:
        record = Round(self.seed, index, kind)
        start = time.monotonic()
        await asyncio.sleep(self.window_s)  # the "before" window
        seen = len(self.events)
        self._struck: float | None = None
        scaled = await self._fault(record)
        t0 = self._struck or time.monotonic()  # the first signal (a setup may come before)
        await self._until(
            lambda: self._recovered(record.victims),
            RECOVERY_TIMEOUT_S,
            f"round {index} ({kind}) recovery",
        )
        record.recovered_s = time.monotonic() - t0
        if scaled is not None:  # back to the pinned count (a scale-down, not measured apart)
            self._scale(scaled, self.workers)
            await self._until(self._recovered, RECOVERY_TIMEOUT_S, "scaled back")
        recovered = time.monotonic()
        await asyncio.sleep(self.window_s)  # the "after" window
        self._score(record, start, t0, recovered, self.events[seen:])
        self.messages += self.load.result.messages[self._messages_seen :]
        self._messages_seen = len(self.load.result.messages)
        return record

    async def _fault(self, record: Round) -> int | None:
        """Inflict this round's fault; the stage left scaled up, if any."""
        kind = record.kind
        if kind == "none":
            return None
        if kind == "kill":
            self._kill(record, self._pick())
        elif kind == "stop":
            victim = self._pick()
            pause = self.random.uniform(2.0, self.max_stop_s)
            self._signal(victim, signal.SIGSTOP)
            record.victims.append(victim)
            record.front_fault = self._stage(victim) == 0
            asyncio.get_running_loop().call_later(
                pause, lambda: self._signal(victim, signal.SIGCONT)
            )
        elif kind == "double":
            first, second = self.random.sample(range(self.stages), 2)
            self._kill(record, self._pick(first))
            self._kill(record, self._pick(second))
        elif kind in ("scale-up", "scale-down"):
            stage = self.random.randrange(self.stages)
            other = self.random.choice([s for s in range(self.stages) if s != stage])
            if kind == "scale-down":  # from one more, set up outside the fault
                self._scale(stage, self.workers + 1)
                await self._until(self._recovered, RECOVERY_TIMEOUT_S, "scaled up first")
                self._scale(stage, self.workers)
                self._kill(record, self._pick(other))
                return None
            self._scale(stage, self.workers + 1)
            self._kill(record, self._pick(other))
            return stage
        elif kind == "opening":
            stage = self.random.randrange(self.stages)
            before = set(self.deployment.runtime.workers)
            self._scale(stage, self.workers + 1)
            newcomer = await self._until(
                lambda: self._serving_newcomer(stage, before), 60, "a new worker serving"
            )
            self._kill(record, newcomer)
            return stage
        return None

    # -- faults -----------------------------------------------------------------------

    def _live(self, stage: int) -> list[str]:
        return sorted(
            w.id
            for w in self.deployment.observed.workers
            if w.stage == stage and w.state is WorkerState.READY
        )

    def _pick(self, stage: int | None = None) -> str:
        stage = self.random.randrange(self.stages) if stage is None else stage
        return self.random.choice(self._live(stage))

    def _stage(self, worker: str) -> int:
        return next(w.stage for w in self.deployment.observed.workers if w.id == worker)

    def _signal(self, worker: str, sig: signal.Signals) -> None:
        if self._struck is None:
            self._struck = time.monotonic()
        process = self.deployment.runtime.workers.get(worker)
        if process is not None and process.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.process.pid, sig)

    def _kill(self, record: Round, worker: str) -> None:
        self._signal(worker, signal.SIGKILL)
        record.victims.append(worker)
        record.front_fault |= self._stage(worker) == 0

    def _scale(self, stage: int, workers: int) -> None:
        body = yaml.safe_load(self.path.read_text())
        body["spec"]["stages"][stage]["replicas"] = {"min": workers, "max": workers}
        self.path.write_text(yaml.safe_dump(body))

    def _serving_newcomer(self, stage: int, before: set[str]) -> str | None:
        for worker in self.deployment.runtime.workers.values():
            if worker.id not in before and worker.stage == stage and worker.handle is not None:
                return worker.id
        return None

    def _recovered(self, victims: Sequence[str] = ()) -> bool:
        """Every stage at its count of READY workers, none of them a victim, and Ready (an
        observation from before the fault still shows its victims READY)."""
        body = yaml.safe_load(self.path.read_text())
        wanted = [s["replicas"]["min"] for s in body["spec"]["stages"]]
        live = [self._live(i) for i in range(self.stages)]
        return (
            self.deployment.ready()
            and all(len(ids) == n for ids, n in zip(live, wanted, strict=True))
            and not set(victims) & {w for ids in live for w in ids}
        )

    async def _until(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"seed {self.seed}: {what} not within {timeout:g} s")
            await asyncio.sleep(0.05)
        return value

    # -- scoring ----------------------------------------------------------------------

    def _score(
        self,
        record: Round,
        start: float,
        t0: float,
        recovered: float,
        events: list[tuple[float, str]],
    ) -> None:
        result = self.load.result
        end = time.monotonic()
        record.lost = sum(start <= t <= end for t in result.failed_at)
        in_round = [
            lat
            for t, lat in zip(result.answered_at, result.latencies, strict=False)
            if start <= t <= end
        ]
        record.answered = len(in_round)
        record.over_1s = sum(lat > 1.0 for lat in in_round)
        stopped = {line.split()[2]: t for t, line in events if line.split()[1:2] == ["StopWorker"]}
        drained = {line.split()[2] for _, line in events if line.split()[1:2] == ["DrainWorker"]}
        record.false_detections = sorted(set(stopped) - set(record.victims) - drained)
        detected = [stopped[v] - t0 for v in record.victims if v in stopped]
        record.detected_s = min(detected) if detected else None
        started = sum(line.split()[1:2] == ["StartWorker"] for _, line in events)
        scale_starts = {"scale-up": 1, "scale-down": 1, "opening": 1}.get(record.kind, 0)
        record.extra_replacements = max(0, started - len(record.victims) - scale_starts)

        def rate(a: float, b: float) -> float:
            return sum(a <= t <= b for t in result.answered_at) / max(b - a, 1e-9)

        record.throughput = {
            "before": rate(t0 - self.window_s, t0),
            "during": rate(t0, recovered),
            "after": rate(recovered, recovered + self.window_s),
        }


def draw(seed: int, rounds: int) -> list[str]:
    """The kinds of ``rounds`` rounds for ``seed``: every kind once, then at random."""
    rng = random.Random(seed)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    return (kinds + [rng.choice(KINDS) for _ in range(rounds)])[:rounds]


def summary(rounds: list[Round]) -> dict[str, Any]:
    faulted = [r for r in rounds if r.kind != "none"]
    quiet = [r for r in rounds if r.kind == "none"]
    after_detection = [
        r.recovered_s - r.detected_s
        for r in faulted
        if r.recovered_s is not None and r.detected_s is not None
    ]
    return {
        "rounds": len(rounds),
        "lost": sum(r.lost for r in faulted if not r.front_fault),
        "lost_with_a_front_worker_faulted": sum(r.lost for r in faulted if r.front_fault),
        "over_1s_faulted_per_round": sum(r.over_1s for r in faulted) / max(len(faulted), 1),
        "over_1s_fault_free_per_round": sum(r.over_1s for r in quiet) / max(len(quiet), 1),
        "false_detections": sum(len(r.false_detections) for r in rounds),
        "detection_s": sorted(r.detected_s for r in faulted if r.detected_s is not None),
        "back_after_detection_s": sorted(after_detection),
        "extra_replacements": sum(r.extra_replacements for r in rounds),
        "rows": [asdict(r) for r in rounds],
    }
