"""The reconciler: a pure ``plan(desired, observed) -> list[Action]`` (no kopf, no I/O, no clock).

The caller turns the spec and the autoscaler's wish into a ``Desired``, the runtime reports
an ``Observed``, and the runtime applies the returned actions. Nothing here remembers
anything between calls: every decision is made again from the observation (level-based),
so an action whose effect is already visible (a worker STARTING, a world OPENING) is not
asked for again, and a converged observation gives ``[]``.

Rules, per stage (``live`` = STARTING or READY, and not failed):

- A DEAD or DRAINED worker is stopped (``StopWorker``); a STOPPING one is left alone. A
  DEAD worker is replaced by a new one (new id from ``new_id(stage)``), never restarted.
- A READY worker whose worlds are all BROKEN, while a peer at the other end of one of them
  still has a healthy world, has failed (it is frozen: its peers see it, it does not
  answer): it is stopped and replaced. Otherwise a BROKEN world between two kept workers is
  closed, and re-opened (``CloseWorld`` then ``OpenWorld``) when both ends are READY. Two
  workers whose only world broke cannot be told apart: the world is re-opened (a runtime
  that cannot reach a worker's control API should report it DEAD).
- Rolling update, as a Kubernetes Deployment with maxSurge 1 and maxUnavailable 0: a
  worker whose ``config_hash`` differs from the stage's is outdated. New workers are
  started first (live at most ``workers + 1`` while outdated ones remain), and a worker
  that serves (READY and *wired*: a READY world to a worker of each neighbouring stage)
  is drained only while the stage keeps ``max(workers, 1)`` serving workers. So an
  outdated worker is drained once its replacement is READY and wired.
- Scale down drains, in order: outdated workers, then surplus up-to-date ones (those not
  serving yet first, then the newest by ``created``). A drained worker is stopped at the
  next observation that shows it DRAINED. The last live worker of a stage is never
  drained (so ``workers == 0`` keeps one), unless the deployment is deleted or the stage
  is no longer desired (the split now has fewer stages): such a stage is drained whole,
  once no desired stage has outdated workers left.
- Worlds: only READY workers get new worlds, with READY, compatible workers of the
  neighbouring stages (``|stage difference| == 1``, same ``layout``): with every one
  (``desired.fan_out`` None), or with a bounded subset (``_fan_out``): each worker gets
  about ``k`` peers in each neighbouring stage (all of them when it has fewer, more when
  that stage is larger by a factor, so that each of its workers gets ``k``), every
  worker's count balanced within one across its stage. The healthy worlds that exist are
  kept (a join opens about ``k`` worlds per neighbouring stage and closes few), a worker
  over its share closes its worlds to the busiest peers, and a worker short of peers (a
  new one, or one whose worlds broke) gets the least-connected ones first. A DRAINING or
  STARTING worker keeps the worlds it has but gets no new one. A world is closed when an
  end is gone, stopped or stopping, when the ends are not neighbours or differ in
  ``layout``, or when it is BROKEN.
- ``deleted``: every live worker is drained, drained and dead ones are stopped; nothing is
  started or opened.

Actions come in a fixed order (closes, stops, starts, drains, opens; each kind sorted),
so a plan is deterministic and a close precedes the re-open of the same world.
"""

from __future__ import annotations

import heapq
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import astuple, dataclass
from enum import StrEnum
from typing import Any

from .desired import Desired, DesiredStage


class WorkerState(StrEnum):
    STARTING = "Starting"
    READY = "Ready"  # a FROZEN worker shows up as READY with broken worlds
    DRAINING = "Draining"
    DRAINED = "Drained"
    STOPPING = "Stopping"  # StopWorker is under way: nothing to do but close its worlds
    DEAD = "Dead"  # the process or pod is gone or failed


@dataclass(frozen=True, slots=True)
class ObservedWorker:
    id: str
    stage: int
    state: WorkerState
    config_hash: str
    #: Hash of the pipeline's shape (model and split points): a world joins two workers
    #: only if these agree, so a split change never wires an old stage to a new one.
    #: Leave it "" where every config is compatible.
    layout: str = ""
    #: When the worker was started, in the caller's seconds: "newest" for scale down.
    created: float = 0.0


class WorldState(StrEnum):
    OPENING = "Opening"
    READY = "Ready"
    BROKEN = "Broken"


@dataclass(frozen=True, slots=True)
class ObservedWorld:
    a: str  # a < b: the sorted worker ids (unsorted ones are sorted on reading)
    b: str
    state: WorldState


@dataclass(frozen=True, slots=True)
class Observed:
    workers: tuple[ObservedWorker, ...] = ()
    #: As the workers report them; both ends may report one world: the worst state wins.
    worlds: tuple[ObservedWorld, ...] = ()


@dataclass(frozen=True, slots=True)
class StartWorker:
    stage: int
    worker_id: str


@dataclass(frozen=True, slots=True)
class DrainWorker:
    worker_id: str


@dataclass(frozen=True, slots=True)
class StopWorker:
    worker_id: str


@dataclass(frozen=True, slots=True)
class OpenWorld:
    a: str
    b: str


@dataclass(frozen=True, slots=True)
class CloseWorld:
    a: str
    b: str


Action = StartWorker | DrainWorker | StopWorker | OpenWorld | CloseWorld
_KINDS = (CloseWorld, StopWorker, StartWorker, DrainWorker, OpenWorld)  # the order in a plan
_RANK: dict[type, int] = {kind: rank for rank, kind in enumerate(_KINDS)}
_WORST = {WorldState.READY: 0, WorldState.OPENING: 1, WorldState.BROKEN: 2}
_LIVE = (WorkerState.STARTING, WorkerState.READY)
Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _View:
    """What both ``plan`` and ``summarize`` derive from one observation."""

    stages: dict[int, DesiredStage]
    workers: dict[str, ObservedWorker]
    worlds: dict[Pair, WorldState]
    peers: dict[str, list[tuple[str, WorldState]]]  #: each worker's worlds, by the other end
    frozen: frozenset[str]
    wired: frozenset[str]
    live: dict[int, list[ObservedWorker]]


def _view(desired: Desired, observed: Observed) -> _View:
    stages = {s.index: s for s in desired.stages}
    if sorted(stages) != list(range(len(desired.stages))):
        raise ValueError(f"desired stages must be numbered 0..n-1 once each, got {sorted(stages)}")
    workers = {w.id: w for w in observed.workers}
    worlds: dict[Pair, WorldState] = {}
    for world in observed.worlds:
        pair = (min(world.a, world.b), max(world.a, world.b))
        if pair not in worlds or _WORST[world.state] > _WORST[worlds[pair]]:
            worlds[pair] = world.state
    peers: dict[str, list[tuple[str, WorldState]]] = defaultdict(list)
    for (a, b), state in worlds.items():
        peers[a].append((b, state))
        peers[b].append((a, state))
    healthy = {w for w, mine in peers.items() if any(s is not WorldState.BROKEN for _, s in mine)}
    frozen = frozenset(
        w.id
        for w in workers.values()
        if w.state is WorkerState.READY
        and peers[w.id]
        and all(s is WorldState.BROKEN for _, s in peers[w.id])
        and any(
            p in healthy and p in workers and workers[p].state is not WorkerState.DEAD
            for p, _ in peers[w.id]
        )
    )
    live: dict[int, list[ObservedWorker]] = defaultdict(list)
    for w in sorted(workers.values(), key=lambda w: w.id):
        if w.state in _LIVE and w.id not in frozen:
            live[w.stage].append(w)

    def is_wired(w: ObservedWorker) -> bool:
        ready_peers = {
            workers[p].stage
            for p, s in peers[w.id]
            if s is WorldState.READY
            and p in workers
            and workers[p].state is WorkerState.READY
            and p not in frozen
            and _compatible(w, workers[p], set())
        }
        return all(n in ready_peers for n in (w.stage - 1, w.stage + 1) if n in stages)

    wired = frozenset(
        w.id for ws in live.values() for w in ws if w.state is WorkerState.READY and is_wired(w)
    )
    return _View(stages, workers, worlds, peers, frozen, wired, live)


def _scale(
    stage: DesiredStage, live: list[ObservedWorker], wired: frozenset[str]
) -> tuple[list[str], int]:
    """The workers of one stage to drain, and how many to start (see the module docstring)."""
    n = stage.workers
    current = [w for w in live if w.config_hash == stage.config_hash]
    outdated = [w for w in live if w.config_hash != stage.config_hash]
    # Not serving first (draining those costs nothing), then the newest.
    current.sort(key=lambda w: (w.id in wired, w.state is WorkerState.READY, -w.created, w.id))
    outdated.sort(key=lambda w: (w.id in wired, w.id))
    budget = sum(w.id in wired for w in live) - max(n, 1)  # serving workers we may take away
    drains: list[ObservedWorker] = []
    for w in outdated + current[: max(0, len(current) - n)]:
        if len(drains) >= len(live) - 1:
            break
        if w.id in wired:
            if budget <= 0:
                continue
            budget -= 1
        drains.append(w)
    kept_current = len(current) - sum(w in current for w in drains)
    need = n - kept_current
    if len(outdated) > sum(w in outdated for w in drains):
        need = min(need, n + 1 - (len(live) - len(drains)))
    return [w.id for w in drains], max(0, need)


def reconcile(
    desired: Desired, observed: Observed, new_id: Callable[[int], str]
) -> tuple[list[Action], dict[str, Any]]:
    """``plan`` and ``summarize`` of one observation, derived once (one control tick)."""
    view = _view(desired, observed)
    actions = _plan(view, desired, new_id)
    return actions, _summarize(view, desired, observed, actions)


def plan(desired: Desired, observed: Observed, new_id: Callable[[int], str]) -> list[Action]:
    """The actions that move ``observed`` towards ``desired``; ``[]`` once they agree.

    ``new_id(stage)`` names each started worker; the caller keeps names unique. Raises
    ``ValueError`` when the desired stages are not numbered 0..n-1.
    """
    return _plan(_view(desired, observed), desired, new_id)


def _plan(view: _View, desired: Desired, new_id: Callable[[int], str]) -> list[Action]:
    workers = view.workers
    stop = {
        w.id
        for w in workers.values()
        if w.state in (WorkerState.DEAD, WorkerState.DRAINED) or w.id in view.frozen
    }
    drain: set[str] = set()
    actions: list[Action] = []
    if desired.deleted:
        drain = {w.id for ws in view.live.values() for w in ws}
    else:
        rolled = all(
            w.config_hash == view.stages[i].config_hash
            for i in view.stages
            for w in view.live.get(i, [])
        )
        for index in sorted(set(view.stages) | set(view.live)):
            live = view.live.get(index, [])
            if index not in view.stages:
                if rolled:
                    drain.update(w.id for w in live)
                continue
            drains, starts = _scale(view.stages[index], live, view.wired)
            drain.update(drains)
            actions += [StartWorker(index, new_id(index)) for _ in range(starts)]
    gone = stop | {w.id for w in workers.values() if w.state is WorkerState.STOPPING}
    for (a, b), state in view.worlds.items():
        if state is WorldState.BROKEN or not _compatible(workers.get(a), workers.get(b), gone):
            actions.append(CloseWorld(a, b))
    if not desired.deleted:
        openers = [
            w
            for ws in view.live.values()
            for w in ws
            if w.state is WorkerState.READY and w.id not in drain and w.id not in gone
        ]
        opens, trims = _fan_out(view, openers, desired.fan_out)
        actions += [OpenWorld(a, b) for a, b in opens]
        actions += [CloseWorld(a, b) for a, b in trims]
        if desired.fan_out is not None:
            drain -= _stranding(view, drain, set(trims), openers)
    actions.extend(StopWorker(w) for w in stop)
    actions.extend(DrainWorker(w) for w in drain)
    return sorted(actions, key=lambda a: (_RANK[type(a)], astuple(a)))


def _fan_out(
    view: _View, openers: list[ObservedWorker], k: int | None
) -> tuple[list[Pair], list[Pair]]:
    """The worlds to open, and the healthy ones to close, between READY workers of
    neighbouring stages (see the module docstring); linear in the worlds it keeps."""
    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for w in openers:
        groups[(w.stage, w.layout)].append(w.id)
    opens: list[Pair] = []
    trims: list[Pair] = []
    for (stage, layout), upper in sorted(groups.items()):
        lower = groups.get((stage + 1, layout))
        if not lower:
            continue
        if k is None:  # every pair: nothing to balance
            opens += [
                (min(a, b), max(a, b))
                for a in upper
                for b in lower
                if view.worlds.get((min(a, b), max(a, b))) in (None, WorldState.BROKEN)
            ]
            continue
        o, t = _subset(view, upper, lower, k)
        opens += o
        trims += t
    return opens, trims


def _stranding(
    view: _View, drain: set[str], trims: set[Pair], openers: list[ObservedWorker]
) -> set[str]:
    """The workers whose drain would leave a kept neighbour without a READY world to their
    stage: with a bounded fan-out it may have had no other. Drained a tick later, once the
    neighbour's new worlds (opened by this plan) are READY."""
    kept = {w.id for w in openers}
    # Where the neighbour could find another peer: (stage, layout) of the kept workers.
    could = {(w.stage, w.layout) for w in openers}
    stranding = set()
    for d in sorted(drain):
        worker = view.workers[d]
        if worker.state is not WorkerState.READY or worker.stage not in view.stages:
            continue
        for x, state in view.peers.get(d, []):
            if state is not WorldState.READY or x not in kept:
                continue
            if (worker.stage, view.workers[x].layout) not in could:
                continue  # no peer it could ever have there (a split change): no wait
            others = [
                p
                for p, s in view.peers.get(x, [])
                if s is WorldState.READY
                and p != d
                and p in kept
                and view.workers[p].stage == worker.stage
                and (min(x, p), max(x, p)) not in trims
            ]
            if not others:
                stranding.add(d)
                break
    return stranding


def _subset(
    view: _View, upper: list[str], lower: list[str], k: int
) -> tuple[list[Pair], list[Pair]]:
    """Bounded fan-out between two neighbouring stages' workers: each side's degrees
    within one of their share of ``max(n * min(k, m), m * min(k, n))`` worlds."""
    n, m = len(upper), len(lower)
    total = max(n * min(k, m), m * min(k, n))
    side = {w: 0 for w in upper} | {w: 1 for w in lower}
    lo = (total // n, total // m)
    hi = (-(-total // n), -(-total // m))
    adj: dict[str, set[str]] = {w: set() for w in side}
    for w in upper:  # the healthy worlds there are, kept unless a side is over its share
        for p, state in view.peers.get(w, []):
            if side.get(p) == 1 and state is not WorldState.BROKEN:
                adj[w].add(p)
                adj[p].add(w)
    kept = {(min(a, b), max(a, b)) for a in upper for b in adj[a]}
    ready = {pair for pair in kept if view.worlds.get(pair) is WorldState.READY}

    def drop(x: str, y: str) -> None:
        adj[x].discard(y)
        adj[y].discard(x)

    def droppable(x: str, y: str) -> bool:
        """Never the last READY world of either end to the other stage: a worker keeps
        serving while its new worlds open (they are only OPENING in this plan)."""
        if (min(x, y), max(x, y)) not in ready:
            return True
        return all(
            any(p != other and (min(w, p), max(w, p)) in ready for p in adj[w])
            for w, other in ((x, y), (y, x))
        )

    for x in sorted(side):  # over its share: close its worlds to the busiest peers
        while len(adj[x]) > hi[side[x]]:
            candidates = [y for y in adj[x] if droppable(x, y)]
            if not candidates:
                break  # once its new worlds are READY
            y = max(candidates, key=lambda y: (len(adj[y]) - lo[side[y]], y))
            drop(x, y)
    for this, other in ((upper, lower), (lower, upper)):
        heap = [(len(adj[y]), _spread(y), y) for y in other]
        heapq.heapify(heap)
        for x in sorted(this):
            want = lo[side[x]]
            while len(adj[x]) < want:
                y = _least_connected(heap, adj, x)
                if y is None:
                    break  # connected to every one already
                if len(adj[y]) >= hi[side[y]]:  # full: it gives up a world of a richer peer
                    richer = [z for z in adj[y] if len(adj[z]) > lo[side[z]] and droppable(y, z)]
                    if richer:
                        drop(y, max(richer, key=lambda z: (len(adj[z]), z)))
                adj[x].add(y)
                adj[y].add(x)
                heapq.heappush(heap, (len(adj[y]), _spread(y), y))
    # A worker still over its share, whose peers are all at theirs: trimming it leaves a
    # peer short, and the fill gives that peer back the same world (start-ups in a random
    # order ended so; a worker with 3 worlds where the others have 2 takes 1.5x the rows).
    # Swap with a worker of the other stage over its floor, not its peer: each drops one
    # peer, and those two take a world together; one world fewer in all.
    count = sum(len(adj[w]) for w in upper)
    for x in sorted(side):
        others = upper if side[x] else lower
        while count > total and len(adj[x]) > hi[side[x]]:
            swap = next(
                (
                    (y, z, v)
                    for z in sorted(others, key=lambda z: (lo[side[z]] - len(adj[z]), z))
                    if len(adj[z]) > lo[side[z]] and z not in adj[x]
                    for y in sorted(adj[z])
                    for v in sorted(adj[x])
                    if v not in adj[y] and droppable(x, v) and droppable(y, z)
                ),
                None,
            )
            if swap is None:
                break
            y, z, v = swap
            drop(x, v)
            drop(y, z)
            adj[y].add(v)
            adj[v].add(y)
            count -= 1
    final = {(min(a, b), max(a, b)) for a in upper for b in adj[a]}
    return sorted(final - kept), sorted(kept - final)


def _least_connected(
    heap: list[tuple[int, int, str]], adj: dict[str, set[str]], x: str
) -> str | None:
    """The peer with the fewest worlds that ``x`` has none with (``heap`` is lazy)."""
    skipped = []
    found = None
    while heap:
        count, order, y = heapq.heappop(heap)
        if count != len(adj[y]):
            heapq.heappush(heap, (len(adj[y]), order, y))  # stale: again, as it is now
            continue
        if y in adj[x]:
            skipped.append((count, order, y))
            continue
        found = y
        break
    for entry in skipped:
        heapq.heappush(heap, entry)
    return found


def _spread(worker: str) -> int:
    """A stable order between equally connected peers that is not the ids' (new workers'
    ids would otherwise all start with the same peers)."""
    return zlib.crc32(worker.encode())


def _compatible(x: ObservedWorker | None, y: ObservedWorker | None, gone: set[str]) -> bool:
    """Whether a world between ``x`` and ``y`` may exist: both there, neighbours, same layout."""
    if x is None or y is None or x.id in gone or y.id in gone:
        return False
    return abs(x.stage - y.stage) == 1 and x.layout == y.layout


def summarize(desired: Desired, observed: Observed) -> dict[str, Any]:
    """The status of a deployment: per stage counts, worlds by state, a phase and its reason.

    Phases, first match wins: Deleting; Degraded (a dead or frozen worker, a broken world);
    Pending (a stage has no READY worker); Progressing (a plan is not empty, a worker is
    draining or a world opening); Ready.
    """
    view = _view(desired, observed)
    return _summarize(view, desired, observed, _plan(view, desired, lambda s: f"new-s{s}"))


def _summarize(
    view: _View, desired: Desired, observed: Observed, planned: list[Action]
) -> dict[str, Any]:
    stages = []
    for index, stage in sorted(view.stages.items()):
        mine = [w for w in view.workers.values() if w.stage == index]
        ready = [w for w in mine if w.state is WorkerState.READY and w.id not in view.frozen]
        stages.append(
            {
                "stage": index,
                "desired": stage.workers,
                "ready": len(ready),
                "updated": sum(w.config_hash == stage.config_hash for w in ready),
                "starting": sum(w.state is WorkerState.STARTING for w in mine),
                "draining": sum(w.state is WorkerState.DRAINING for w in mine),
            }
        )
    worlds = {s.name.lower(): sum(v is s for v in view.worlds.values()) for s in WorldState}
    phase, reason = _phase(desired, observed, view, stages, worlds, planned)
    return {"phase": phase, "reason": reason, "stages": stages, "worlds": worlds}


def _phase(
    desired: Desired,
    observed: Observed,
    view: _View,
    stages: list[dict[str, int]],
    worlds: dict[str, int],
    planned: list[Action],
) -> tuple[str, str]:
    if desired.deleted:
        left = len(view.workers)
        return "Deleting", f"{left} workers left" if left else "all workers stopped"
    faults = [f"worker {w} is dead" for w, o in view.workers.items() if o.state is WorkerState.DEAD]
    faults += [f"worker {w} is frozen" for w in view.frozen]
    faults += [
        f"world {a}/{b} is broken" for (a, b), s in view.worlds.items() if s is WorldState.BROKEN
    ]
    if faults:
        return "Degraded", "; ".join(sorted(faults)[:3]) + ("; ..." if len(faults) > 3 else "")
    for s in stages:
        if not s["ready"]:
            return "Pending", f"stage {s['stage']} has no ready worker"
    for s in stages:
        if s["updated"] < s["desired"] or s["ready"] > max(s["desired"], 1):
            return (
                "Progressing",
                f"stage {s['stage']}: {s['updated']}/{s['desired']} updated and ready",
            )
    draining = sum(s["draining"] for s in stages)
    if draining or worlds["opening"] or planned:
        return "Progressing", f"{draining} workers draining, {worlds['opening']} worlds opening"
    workers = sum(s["ready"] for s in stages)
    return "Ready", f"{len(stages)} stages, {workers} workers, {worlds['ready']} worlds ready"
