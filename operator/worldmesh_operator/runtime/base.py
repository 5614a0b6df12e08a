"""What the control loop needs from a runtime: an observation, and actions carried out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from ..reconciler import Action, Observed, ObservedWorld, WorldState


class Runtime(Protocol):
    async def observe(self) -> Observed:
        """The workers and worlds as they are now (a worker that does not answer is DEAD)."""
        ...

    async def apply(self, actions: Sequence[Action]) -> list[str]:
        """Carry out ``actions`` concurrently; return one message per action that failed."""
        ...


_SEVERITY = {WorldState.READY: 0, WorldState.OPENING: 1, WorldState.BROKEN: 2}


def merge_worlds(statuses: Iterable[dict[str, Any] | None]) -> tuple[ObservedWorld, ...]:
    """The worlds that workers' control statuses report, each once; when the two ends
    disagree the worse state wins (broken over opening over ready). Closed ones are gone."""
    worlds: dict[tuple[str, str], WorldState] = {}
    for status in statuses:
        for world in (status or {}).get("worlds", []):
            if world["state"] == "closed":
                continue
            a, _, b = world["name"].partition("~")
            seen = {"ready": WorldState.READY, "opening": WorldState.OPENING}.get(
                world["state"], WorldState.BROKEN
            )
            if (a, b) not in worlds or _SEVERITY[seen] > _SEVERITY[worlds[(a, b)]]:
                worlds[(a, b)] = seen
    return tuple(ObservedWorld(a, b, s) for (a, b), s in sorted(worlds.items()))
