"""A test model (``busy_front:build``): the toy model, whose worker's event loop is kept
busy with pure Python work for ``BUSY_S`` seconds by a request whose inputs are all 99:
a worker busy with its own work, not frozen (its process runs; its heartbeats go on)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from worldmesh_worker.models.toy import ToyModel

BUSY_S = 3.0
MARKER = 99.0


def spin(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        sum(i * i for i in range(10_000))  # holds the GIL as much as Python lets it


class BusyFront(ToyModel):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop

    def preprocess(self, inputs: dict[str, np.ndarray]) -> Any:
        if all(np.all(v == MARKER) for v in inputs.values()):
            self._loop.call_soon_threadsafe(spin, BUSY_S)
        return super().preprocess(inputs)


def build() -> BusyFront:
    return BusyFront(asyncio.get_running_loop())
