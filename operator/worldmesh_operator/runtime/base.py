"""What the control loop needs from a runtime, and what both runtimes share.

``Runtime`` is the loop's view: an observation, the plan's actions carried out, and the
workers that serve metrics. ``WorkerRuntime`` is what the two runtimes (processes, pods)
have in common, so each keeps only what differs:

- ``apply``: stops first (a replacement starts only once the dead worker is gone, so a
  stage never holds more workers than it wants), then the closes, starts and drains
  concurrently, then the opens, as the plan orders them (a broken world is closed before
  it is opened again). A world open runs on as a task of its own (it waits, bounded, for both ends), so the loop goes on observing
  and a worker that dies while others are being wired is seen at once; its error is
  reported by the next ``apply``, and the reconciler retries it. The rest run concurrently.
- closing a world asks both ends that still answer (``world_name`` names it, as the
  workers do);
- the silence clock: a worker that served and stops answering is busy with its own work,
  and only after ``busy_limit_s`` of silence wedged (DEAD).

A runtime says how to start, drain and stop a worker, and how to reach one (``peer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, Protocol

from worldmesh_worker.control import ControlClient, Peer, connect, world_ends, world_name

from ..reconciler import (
    Action,
    CloseWorld,
    DrainWorker,
    Observed,
    ObservedWorld,
    OpenWorld,
    StartWorker,
    StopWorker,
    WorldState,
)

log = logging.getLogger(__name__)

Target = tuple[str, int, str]  #: (worker, stage, base URL of its /metrics)


class Runtime(Protocol):
    #: Why workers of the last observation are DEAD, one message each (Events, status).
    failures: list[str]
    #: The front workers' early-exit states in the last observation (their ``/v1/status``
    #: ``earlyExits``, those that tune ramps): the ramp leader's and its followers'.
    early_exits: dict[str, dict[str, Any]]

    async def observe(self) -> Observed:
        """The workers and worlds as they are now (a worker that does not answer is DEAD)."""
        ...

    async def apply(self, actions: Sequence[Action]) -> list[str]:
        """Carry out ``actions``; return one message per action that failed."""
        ...

    def reachable(self, worker_id: str) -> ControlClient | None:
        """The control API of a worker that may still answer, else None."""
        ...

    def targets(self) -> list[Target]:
        """The workers that serve metrics now (running, not stopping)."""
        ...


class WorkerRuntime(ABC):
    def __init__(self, answer_timeout_s: float, busy_limit_s: float) -> None:
        self.answer_timeout_s = answer_timeout_s
        self.busy_limit_s = busy_limit_s
        self.failures: list[str] = []
        self.early_exits: dict[str, dict[str, Any]] = {}
        self._silent: dict[str, float] = {}  #: since when a worker that served is silent
        self._opening: set[tuple[str, str]] = set()  #: worlds whose open runs as a task
        self._late_errors: list[str] = []  #: of those opens, for the next apply()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what differs ------------------------------------------------------------------

    @abstractmethod
    async def start_worker(self, stage: int, worker_id: str) -> None: ...

    @abstractmethod
    async def drain_worker(self, worker_id: str) -> None: ...

    @abstractmethod
    async def stop_worker(self, worker_id: str) -> None: ...

    @abstractmethod
    def peer(self, worker_id: str) -> Peer:
        """A worker that serves, to wire; ``RuntimeError`` if it does not."""

    @abstractmethod
    def reachable(self, worker_id: str) -> ControlClient | None:
        """The control API of a worker that may still answer, else None."""

    async def applied(self) -> None:  # noqa: B027  (optional: most runtimes need nothing)
        """After each ``apply`` (bookkeeping a runtime needs)."""

    # -- apply -------------------------------------------------------------------------

    async def apply(self, actions: Sequence[Action]) -> list[str]:
        stops = [a for a in actions if isinstance(a, StopWorker)]
        opens = [a for a in actions if isinstance(a, OpenWorld)]
        rest = [a for a in actions if not isinstance(a, StopWorker | OpenWorld)]
        done = await asyncio.gather(*(self._apply(a) for a in stops), return_exceptions=True)
        done += await asyncio.gather(*(self._apply(a) for a in rest), return_exceptions=True)
        for action in opens:  # last, as planned: after the close of a world it re-opens
            if (action.a, action.b) not in self._opening:
                self._opening.add((action.a, action.b))
                self.spawn(self._open(action))
        errors, self._late_errors = self._late_errors, []
        for action, outcome in zip([*stops, *rest], done, strict=True):
            if isinstance(outcome, BaseException):
                errors.append(f"{action}: {outcome}")
                log.warning("%s failed: %s", action, outcome)
        await self.applied()
        return errors

    async def _apply(self, action: Action) -> None:
        if isinstance(action, StartWorker):
            await self.start_worker(action.stage, action.worker_id)
        elif isinstance(action, DrainWorker):
            await self.drain_worker(action.worker_id)
        elif isinstance(action, StopWorker):
            await self.stop_worker(action.worker_id)
        elif isinstance(action, CloseWorld):
            await self._close_world(action)

    async def _open(self, action: OpenWorld) -> None:
        try:
            await connect(self.peer(action.a), self.peer(action.b))
        except Exception as exc:  # reported by the next apply(); the reconciler retries
            self._late_errors.append(f"{action}: {exc}")
            log.warning("%s failed: %s", action, exc)
        finally:
            self._opening.discard((action.a, action.b))

    async def _close_world(self, action: CloseWorld) -> None:
        name = world_name(action.a, action.b)
        for end in (action.a, action.b):
            control = self.reachable(end)
            if control is not None:
                with contextlib.suppress(Exception):  # a gone end has closed it already
                    await asyncio.wait_for(control.close_world(name), self.answer_timeout_s)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` as a task this runtime keeps (and cancels on ``close``)."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the silence clock -------------------------------------------------------------

    def heard(self, worker_id: str) -> None:
        """``worker_id`` answered: it is not silent."""
        self._silent.pop(worker_id, None)

    def silent_too_long(self, worker_id: str) -> bool:
        """``worker_id`` did not answer now: whether it has been silent past ``busy_limit_s``
        (the clock starts at its first silence)."""
        since = self._silent.setdefault(worker_id, time.monotonic())
        return time.monotonic() - since > self.busy_limit_s

    def silent(self, worker_id: str) -> bool:
        return worker_id in self._silent

    def keep_clocks(self, worker_ids: Iterable[str]) -> None:
        """Forget the silence of every worker but ``worker_ids`` (the others are gone)."""
        kept = set(worker_ids)
        for worker_id in set(self._silent) - kept:
            del self._silent[worker_id]


_SEVERITY = {WorldState.READY: 0, WorldState.OPENING: 1, WorldState.BROKEN: 2}


def merge_worlds(statuses: Iterable[dict[str, Any] | None]) -> tuple[ObservedWorld, ...]:
    """The worlds that workers' control statuses report, each once; when the two ends
    disagree the worse state wins (broken over opening over ready). Closed ones are gone."""
    worlds: dict[tuple[str, str], WorldState] = {}
    for status in statuses:
        for world in (status or {}).get("worlds", []):
            if world["state"] == "closed":
                continue
            ends = world_ends(world["name"])
            seen = {"ready": WorldState.READY, "opening": WorldState.OPENING}.get(
                world["state"], WorldState.BROKEN
            )
            if ends not in worlds or _SEVERITY[seen] > _SEVERITY[worlds[ends]]:
                worlds[ends] = seen
    return tuple(ObservedWorld(a, b, s) for (a, b), s in sorted(worlds.items()))
