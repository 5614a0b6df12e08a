"""Dynamic batching of rows for one stage: asyncio only, no threads.

A batch leaves when it holds ``max_batch_size`` rows or when its first row has
waited ``max_queue_delay_s``, whichever comes first (as Ray Serve's ``_BatchQueue``
and Triton's dynamic batcher do). An item is one request's rows (or one upstream
message's rows) and is never split: an item larger than the batch size travels
alone. Items keep their arrival order.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class Item:
    """Rows that travel together through one stage; ``context`` is the caller's bookkeeping."""

    tensors: tuple[torch.Tensor, ...]
    context: Any
    enqueued_at: float = 0.0

    @property
    def rows(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors else 0


class BatchQueue:
    def __init__(self, max_batch_size: int, max_queue_delay_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._items: deque[Item] = deque()
        self._rows = 0
        self._changed = asyncio.Event()

    @property
    def rows(self) -> int:
        """Rows waiting (the queue depth a load metric reads)."""
        return self._rows

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> None:
        item.enqueued_at = time.monotonic()
        self._items.append(item)
        self._rows += item.rows
        self._changed.set()

    async def next_batch(self) -> list[Item]:
        """Wait for the next batch: full, or due because its oldest row waited long enough."""
        while True:
            while not self._items:
                self._changed.clear()
                await self._changed.wait()
            deadline = self._items[0].enqueued_at + self.max_queue_delay_s
            while self._items and self._rows < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            if self._items:  # else every row was dropped while the batch filled
                return self._take()

    def drop(self, rows: set[int]) -> int:
        """Remove ``rows`` from the queue (an item's ``context`` is its rows' ids, in order):
        how many were here. An item left without rows goes; the others keep their place."""
        removed = 0
        kept: deque[Item] = deque()
        for item in self._items:
            keep = [i for i, row in enumerate(item.context) if row not in rows]
            if len(keep) < len(item.context):
                removed += len(item.context) - len(keep)
                if not keep:
                    continue
                index = torch.tensor(keep)
                item.tensors = tuple(t.index_select(0, index) for t in item.tensors)
                item.context = [item.context[i] for i in keep]
            kept.append(item)
        if removed:
            self._items = kept
            self._rows -= removed
            self._changed.set()
        return removed

    def _take(self) -> list[Item]:
        batch = [self._items.popleft()]
        rows = batch[0].rows
        while self._items and rows + self._items[0].rows <= self.max_batch_size:
            item = self._items.popleft()
            rows += item.rows
            batch.append(item)
        self._rows -= rows
        return batch


def concat(items: list[Item]) -> tuple[torch.Tensor, ...]:
    """Stack the items' rows into one batch, tensor by tensor."""
    if len(items) == 1:
        return items[0].tensors
    return tuple(torch.cat(parts) for parts in zip(*(item.tensors for item in items), strict=True))


def split(tensors: tuple[torch.Tensor, ...], sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Undo ``concat``: one tuple of row slices per item, in order."""
    if len(sizes) == 1:
        return [tensors]
    parts = [torch.split(t, sizes) for t in tensors]
    return [tuple(p[i] for p in parts) for i in range(len(sizes))]
