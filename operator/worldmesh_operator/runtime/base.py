"""What the control loop needs from a runtime: an observation, and actions carried out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..reconciler import Action, Observed


class Runtime(Protocol):
    async def observe(self) -> Observed:
        """The workers and worlds as they are now (a worker that does not answer is DEAD)."""
        ...

    async def apply(self, actions: Sequence[Action]) -> list[str]:
        """Carry out ``actions`` concurrently; return one message per action that failed."""
        ...
