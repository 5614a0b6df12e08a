"""Run a piece of work on the event loop when it is known to be cheap, else on a thread.

Handing work to a thread and back costs the loop two wake-ups and the GIL's hand-over.
On a busy 2-core machine that hand-over cost more CPU than a small model's whole batch:
the toy front stage spent ~1.4 ms of CPU per request with every batch on the compute
thread, ~0.5 ms with it inline. A large model's batch, though, must stay off the loop so
that requests keep being accepted and answered while it computes.

So every call is timed, and two moving averages are kept: the cost per call and the cost
per row. A call's predicted cost is the larger of the cost per call and the cost per row
times its rows (a GPU batch is launch-bound, a CPU batch grows with its rows); a call
predicted under ``inline_below_s`` runs inline, any other on the executor. Until its cost
is known, work goes to the executor. Liveness never rests on this: heartbeats have their
own thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")

#: Work predicted to take less than this runs on the event loop.
INLINE_BELOW_S = 0.001
#: Weight of the newest sample in the per-row cost's moving average.
SMOOTHING = 0.2


class Offload:
    """Runs calls inline or on ``executor`` by their measured cost (see the module doc)."""

    def __init__(self, executor: Executor | None, inline_below_s: float = INLINE_BELOW_S) -> None:
        self.executor = executor
        self.inline_below_s = inline_below_s
        self.per_call_s: float | None = None  # None until the first call is timed
        self.per_row_s = 0.0
        self.inline_calls = 0
        self.offloaded_calls = 0

    def inline(self, rows: int) -> bool:
        """Whether a call over ``rows`` rows would run on the loop."""
        if self.per_call_s is None:
            return False
        return max(self.per_call_s, self.per_row_s * rows) < self.inline_below_s

    async def run(self, rows: int, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, inline or on the executor; its duration updates the estimate."""
        if self.inline(rows):
            self.inline_calls += 1
            return self._timed(rows, fn, *args)
        self.offloaded_calls += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._timed, rows, fn, *args)

    def _timed(self, rows: int, fn: Callable[..., T], *args: object) -> T:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            took = time.perf_counter() - start
            if self.per_call_s is None:
                self.per_call_s, self.per_row_s = took, took / max(rows, 1)
            else:
                self.per_call_s += SMOOTHING * (took - self.per_call_s)
                self.per_row_s += SMOOTHING * (took / max(rows, 1) - self.per_row_s)
