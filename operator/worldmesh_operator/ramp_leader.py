"""One ramp state per deployment: which front worker tunes, and who must follow it.

Every front worker sees its own requests' ramp answers and final answers, and could tune
its own thresholds and active set; two that did would release rows by different rules,
and ask the later stages (which run the union of what they are asked) for more ramps than
either needs. So one front worker leads: the oldest ready one, which keeps leading until
it is gone (the next oldest follows it by then, so the state carries over). Every other
ready front worker follows it: the leader's thresholds and active set, pushed through its
control API (``PUT /v1/ramps``) whenever they differ from what it applies. A follower
still labels its own rows, so a new leader tunes on a full window at once.

``plan`` is pure: the control loop feeds it the ready front workers and their
``/v1/status`` ``earlyExits``, and sends what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Thresholds closer than this are the same (a status rounds nothing, JSON floats do).
SAME = 1e-9


def leader_of(created: Mapping[str, float]) -> str | None:
    """The oldest of the ready front workers (ties: by name), or None with none."""
    return min(created, key=lambda w: (created[w], w), default=None)


def _ramps(state: Mapping[str, Any]) -> dict[int, tuple[float, bool]]:
    return {int(r["ramp"]): (float(r["threshold"]), bool(r["active"])) for r in state["ramps"]}


def _same(a: dict[int, tuple[float, bool]], b: dict[int, tuple[float, bool]]) -> bool:
    return a.keys() == b.keys() and all(
        abs(a[s][0] - b[s][0]) <= SAME and a[s][1] == b[s][1] for s in a
    )


def plan(created: Mapping[str, float], states: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``PUT /v1/ramps`` bodies by worker: ``created`` holds the ready front workers (their
    start times), ``states`` their early-exit states (those with a tuning controller:
    ``ramps`` and ``leader``); workers with no state are left out. Nothing for a policy
    other than ``online`` (fixed thresholds need no agreement)."""
    tuning = {w: created[w] for w in created if "ramps" in (states.get(w) or {})}
    leader = leader_of(tuning)
    if leader is None or states[leader].get("policy") != "online":
        return {}
    bodies: dict[str, Any] = {}
    if states[leader].get("leader") is not None:
        bodies[leader] = {"leader": None}  # it tunes from here on, from what it followed
    want = _ramps(states[leader])
    body = {
        "leader": leader,
        "ramps": [{"ramp": s, "threshold": t, "active": on} for s, (t, on) in sorted(want.items())],
    }
    for worker in tuning:
        if worker == leader:
            continue
        state = states[worker]
        if state.get("leader") != leader or not _same(_ramps(state), want):
            bodies[worker] = body
    return bodies
