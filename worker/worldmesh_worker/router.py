"""Sending rows to the next stage, and getting every one of them back.

Algorithm. A batch goes, whole, to the *dispatchable* next-stage world with the
fewest outstanding rows (ties rotate). A world is dispatchable while it is ready
and its peer last said it is *accepting* (a peer that drains, or has lost every
path further down, says it is not). Every row sent stays in the in-flight table
with its input until its result (or a failure) comes back on the same world. When
a world goes down, its in-flight rows are re-batched and sent to the other
dispatchable worlds; with none, they are parked until one appears or their
deadline passes. Retries are bounded per row (``max_retries``). A late duplicate
result (the first copy already answered) is ignored, so a resend never answers a
request twice.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .worlds import Message, MessageKind, World, WorldBroken

Results = Callable[[list[int], tuple[torch.Tensor, ...]], None]
Failures = Callable[[list[int], str], None]


@dataclass(slots=True)
class _Pending:
    batch: tuple[torch.Tensor, ...]  # the whole batch this row left in
    index: int  # this row's index in it
    world: str | None  # None while parked
    attempts: int
    deadline: float


@dataclass(slots=True)
class _Target:
    world: World
    accepting: bool = False
    outstanding: int = 0


class Router:
    def __init__(
        self,
        on_results: Results,
        on_failures: Failures,
        max_retries: int,
        timeout_s: float,
        on_retry: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_results = on_results
        self._on_failures = on_failures
        self._on_retry = on_retry
        self._max_retries = max_retries
        self._timeout_s = timeout_s
        self._clock = clock
        self._targets: dict[str, _Target] = {}
        self._pending: dict[int, _Pending] = {}
        self._rotation = itertools.count()

    # -- worlds ----------------------------------------------------------------------

    def add_world(self, world: World) -> None:
        self._targets[world.name] = _Target(world)

    def set_accepting(self, world: str, accepting: bool) -> None:
        target = self._targets.get(world)
        if target is not None:
            target.accepting = accepting
            if accepting:
                self._flush_parked()

    def world_down(self, world: str) -> None:
        """Move the rows in flight on ``world`` elsewhere."""
        if self._targets.pop(world, None) is None:
            return
        rows = [row for row, p in self._pending.items() if p.world == world]
        self._resend(rows)

    def has_live(self) -> bool:
        return any(t.accepting for t in self._targets.values())

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def outstanding(self) -> dict[str, int]:
        return {name: t.outstanding for name, t in self._targets.items()}

    # -- rows ------------------------------------------------------------------------

    def dispatch(self, rows: list[int], batch: tuple[torch.Tensor, ...]) -> None:
        deadline = self._clock() + self._timeout_s
        for i, row in enumerate(rows):
            self._pending[row] = _Pending(batch, i, None, 0, deadline)
        self._send(rows, batch)

    def on_message(self, world: str, message: Message) -> None:
        """A RESULT or FAILED message from the next stage."""
        target = self._targets.get(world)
        known = []
        for i, row in enumerate(message.request_ids):
            pending = self._pending.get(row)
            if pending is not None and pending.world == world:
                del self._pending[row]
                known.append(i)
        if target is not None:
            target.outstanding = max(0, target.outstanding - len(known))
        if not known:
            return
        rows = [message.request_ids[i] for i in known]
        if message.kind is MessageKind.FAILED:
            self._on_failures(rows, str(message.meta.get("error", "failed downstream")))
            return
        if len(known) == len(message.request_ids):
            self._on_results(rows, message.tensors)
        else:
            index = torch.tensor(known)
            self._on_results(rows, tuple(t.index_select(0, index) for t in message.tensors))

    def sweep(self) -> None:
        """Fail rows past their deadline (parked with no live next stage, or lost)."""
        now = self._clock()
        late = [row for row, p in self._pending.items() if p.deadline <= now]
        for row in late:
            pending = self._pending.pop(row)
            if pending.world in self._targets:
                self._targets[pending.world].outstanding -= 1
        if late:
            self._on_failures(late, f"no result within {self._timeout_s:g} s")

    def cancel(self, rows: list[int]) -> int:
        """Nobody wants ``rows`` any more (their client went away): forget those in flight
        and tell each world that has some to drop them (a CANCEL; a broken world has
        dropped them already). Returns how many were in flight."""
        by_world: dict[str, list[int]] = {}
        for row in rows:
            pending = self._pending.pop(row, None)
            if pending is None:
                continue
            target = self._targets.get(pending.world) if pending.world else None
            if target is not None:
                target.outstanding -= 1
                by_world.setdefault(pending.world, []).append(row)  # type: ignore[arg-type]
        for world, cancelled in by_world.items():
            with contextlib.suppress(WorldBroken):
                self._targets[world].world.send(Message(MessageKind.CANCEL, tuple(cancelled)))
        return sum(map(len, by_world.values()))

    # -- internals -------------------------------------------------------------------

    def _choose(self) -> _Target | None:
        live = [t for t in self._targets.values() if t.accepting]
        if not live:
            return None
        k = next(self._rotation) % len(live)  # rotate so ties spread over the worlds
        return min(live[k:] + live[:k], key=lambda t: t.outstanding)

    def _send(self, rows: list[int], batch: tuple[torch.Tensor, ...]) -> None:
        while rows:
            target = self._choose()
            if target is None:
                return  # parked: _flush_parked sends them when a world accepts
            try:
                target.world.send(Message(MessageKind.BATCH, tuple(rows), batch))
            except WorldBroken:
                target.accepting = False
                continue
            for row in rows:
                self._pending[row].world = target.world.name
            target.outstanding += len(rows)
            return

    def _resend(self, rows: list[int]) -> None:
        retry, exhausted = [], []
        for row in rows:
            pending = self._pending[row]
            pending.world = None
            pending.attempts += 1
            (exhausted if pending.attempts > self._max_retries else retry).append(row)
        if exhausted:
            for row in exhausted:
                del self._pending[row]
            self._on_failures(exhausted, f"gave up after {self._max_retries} retries")
        if retry:
            self._on_retry(len(retry))
            self._send(retry, self._gather(retry))

    def _flush_parked(self) -> None:
        parked = [row for row, p in self._pending.items() if p.world is None]
        if parked:
            self._send(parked, self._gather(parked))

    def _gather(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        first = self._pending[rows[0]]
        width = len(first.batch)
        return tuple(
            torch.cat([self._pending[r].batch[k][self._pending[r].index :][:1] for r in rows])
            for k in range(width)
        )
