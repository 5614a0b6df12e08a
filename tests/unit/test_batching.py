"""Dynamic batching (``batching.py``): asyncio only, no sockets.

Covers:
- a full batch leaves at once, long before ``max_queue_delay_s``, also when the rows that
  fill it arrive while the queue is already waiting;
- a partial batch leaves once its first row has waited ``max_queue_delay_s`` (never
  before), and rows that arrive meanwhile travel in it; with a delay of 0 it leaves at once;
- ``next_batch`` on an empty queue waits for a ``put`` (no batch of nothing);
- an item is never split: one that does not fit waits for the next batch, and an item
  larger than ``max_batch_size`` travels alone;
- items keep their arrival order across batches;
- ``rows`` and ``len`` give the queue depth in rows and items;
- ``concat`` then ``split`` gives back every item's tensors (one item: unchanged);
- ``max_batch_size < 1`` is refused;
- ``drop`` removes rows by id (an item's ``context`` is its row ids): an item loses just
  those rows (its tensors keep the others, in order), an emptied item goes, the rest keep
  their places and the depth follows; a batch that was filling when every row was dropped
  waits for the next ``put`` instead of leaving empty.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from worldmesh_worker.batching import BatchQueue, Item, concat, split

LONG = 30.0  # a delay no test waits for: a batch that leaves is full, not due
GUARD = 10.0  # bound on any await that must finish


def item(rows: int, tag: object, width: int = 2) -> Item:
    base = torch.arange(rows * width, dtype=torch.float32).reshape(rows, width)
    return Item((base, torch.full((rows,), rows, dtype=torch.int64)), tag)


def tags(batch: list[Item]) -> list[object]:
    return [i.context for i in batch]


async def settle(task: asyncio.Task[object], rounds: int = 5) -> None:
    """Let the loop run a few rounds (no time passes that a timer would notice)."""
    for _ in range(rounds):
        if task.done():
            return
        await asyncio.sleep(0)


async def test_full_batch_leaves_without_waiting_for_the_delay() -> None:
    queue = BatchQueue(4, LONG)
    for tag in "abcd":
        queue.put(item(1, tag))
    batch = await asyncio.wait_for(queue.next_batch(), GUARD)
    assert tags(batch) == list("abcd")
    assert queue.rows == 0 and len(queue) == 0


async def test_batch_filled_while_waiting_leaves_at_once() -> None:
    queue = BatchQueue(3, LONG)
    queue.put(item(1, "a"))
    task = asyncio.create_task(queue.next_batch())
    await settle(task)
    assert not task.done()  # one row of three: waits for more or for the delay
    queue.put(item(2, "b"))
    batch = await asyncio.wait_for(task, GUARD)
    assert tags(batch) == ["a", "b"]


async def test_empty_queue_waits_for_a_put() -> None:
    queue = BatchQueue(2, LONG)
    task = asyncio.create_task(queue.next_batch())
    await settle(task)
    assert not task.done()
    queue.put(item(2, "a"))
    assert tags(await asyncio.wait_for(task, GUARD)) == ["a"]


async def test_partial_batch_leaves_after_the_delay_with_rows_that_came_meanwhile() -> None:
    delay = 0.05
    queue = BatchQueue(8, delay)
    first = item(1, "a")
    queue.put(first)
    task = asyncio.create_task(queue.next_batch())
    await settle(task)
    assert not task.done()  # partial: not before the delay
    queue.put(item(2, "b"))  # arrives while the first row waits: travels with it
    await settle(task)
    assert not task.done()
    batch = await asyncio.wait_for(task, GUARD)
    # The batch left only once its first row had waited the delay (same clock as the queue).
    assert time.monotonic() - first.enqueued_at >= delay - 1e-3
    assert tags(batch) == ["a", "b"]
    assert queue.rows == 0


async def test_delay_counts_from_the_first_row_of_each_batch() -> None:
    """The second batch's deadline comes from its own first row, not from the first batch's."""
    delay = 0.03
    queue = BatchQueue(2, delay)
    queue.put(item(2, "a"))  # full: leaves at once
    second = item(1, "b")
    queue.put(second)
    assert tags(await asyncio.wait_for(queue.next_batch(), GUARD)) == ["a"]
    batch = await asyncio.wait_for(queue.next_batch(), GUARD)
    assert tags(batch) == ["b"]
    assert time.monotonic() - second.enqueued_at >= delay - 1e-3


async def test_zero_delay_sends_a_partial_batch_at_once() -> None:
    queue = BatchQueue(8, 0.0)
    queue.put(item(1, "a"))
    queue.put(item(2, "b"))
    assert tags(await asyncio.wait_for(queue.next_batch(), GUARD)) == ["a", "b"]


async def test_items_are_never_split() -> None:
    queue = BatchQueue(4, 0.0)
    queue.put(item(3, "a"))
    queue.put(item(3, "b"))  # 3 + 3 > 4: b waits for the next batch, whole
    first = await asyncio.wait_for(queue.next_batch(), GUARD)
    assert tags(first) == ["a"] and sum(i.rows for i in first) == 3
    assert queue.rows == 3 and len(queue) == 1
    second = await asyncio.wait_for(queue.next_batch(), GUARD)
    assert tags(second) == ["b"]
    assert second[0].tensors[0].shape == (3, 2)  # the item's own tensors, not a slice


async def test_an_oversized_item_travels_alone_and_at_once() -> None:
    queue = BatchQueue(4, LONG)
    queue.put(item(1, "a"))
    queue.put(item(10, "big"))
    queue.put(item(1, "c"))
    queue.put(item(2, "d"))
    queue.put(item(1, "e"))
    batches = [await asyncio.wait_for(queue.next_batch(), GUARD) for _ in range(3)]
    assert [tags(b) for b in batches] == [["a"], ["big"], ["c", "d", "e"]]
    assert batches[1][0].rows == 10
    assert queue.rows == 0


async def test_order_is_kept_across_batches() -> None:
    queue = BatchQueue(5, 0.0)
    sizes = [1, 4, 2, 2, 3, 1, 5, 1, 1, 1, 7, 2]
    for n, size in enumerate(sizes):
        queue.put(item(size, n))
    seen: list[object] = []
    for _ in range(len(sizes)):  # bounded: each batch holds at least one item
        if not len(queue):
            break
        batch = await asyncio.wait_for(queue.next_batch(), GUARD)
        rows = sum(i.rows for i in batch)
        assert rows <= 5 or len(batch) == 1
        seen += tags(batch)
    assert seen == list(range(len(sizes)))


async def test_rows_and_len_report_the_depth() -> None:
    queue = BatchQueue(4, 0.0)
    assert queue.rows == 0 and len(queue) == 0
    queue.put(item(2, "a"))
    queue.put(item(3, "b"))
    queue.put(Item((), "empty"))
    assert queue.rows == 5 and len(queue) == 3
    await asyncio.wait_for(queue.next_batch(), GUARD)  # a (b does not fit)
    assert queue.rows == 3 and len(queue) == 2
    await asyncio.wait_for(queue.next_batch(), GUARD)  # b and the empty item
    assert queue.rows == 0 and len(queue) == 0


def test_item_rows() -> None:
    assert item(3, None).rows == 3
    assert Item((torch.zeros(0, 4),), None).rows == 0
    assert Item((), None).rows == 0


def test_concat_split_round_trip() -> None:
    items = [item(1, "a"), item(3, "b", width=2), item(2, "c")]
    batch = concat(items)
    assert len(batch) == 2
    assert batch[0].shape == (6, 2) and batch[1].shape == (6,)
    parts = split(batch, [i.rows for i in items])
    assert len(parts) == len(items)
    for got, want in zip(parts, items, strict=True):
        assert len(got) == len(want.tensors)
        for g, w in zip(got, want.tensors, strict=True):
            assert torch.equal(g, w)


def test_concat_and_split_of_one_item_are_identity() -> None:
    one = item(4, "a")
    assert concat([one]) is one.tensors
    assert split(one.tensors, [4]) == [one.tensors]


def test_max_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchQueue(0, 0.01)


def rows_item(ids: list[int]) -> Item:
    x = torch.tensor([[float(i), float(-i)] for i in ids])
    return Item((x,), list(ids))


async def test_drop_takes_out_exactly_the_given_rows() -> None:
    queue = BatchQueue(16, LONG)
    for ids in ([1, 2, 3], [4], [5, 6]):
        queue.put(rows_item(ids))
    assert queue.drop({2, 4, 99}) == 2
    assert queue.rows == 4 and len(queue) == 2
    assert queue.drop(set()) == 0
    queue.max_queue_delay_s = 0.0
    batch = await asyncio.wait_for(queue.next_batch(), GUARD)
    assert tags(batch) == [[1, 3], [5, 6]]
    assert batch[0].tensors[0].tolist() == [[1.0, -1.0], [3.0, -3.0]]


async def test_a_filling_batch_whose_rows_are_all_dropped_waits_for_the_next_put() -> None:
    queue = BatchQueue(4, 0.02)
    queue.put(rows_item([1]))
    task = asyncio.create_task(queue.next_batch())
    await settle(task)
    assert queue.drop({1}) == 1
    await asyncio.sleep(0.1)  # past the dropped row's deadline: nothing to leave
    assert not task.done()
    queue.put(rows_item([2, 3, 4, 5]))
    batch = await asyncio.wait_for(task, GUARD)
    assert tags(batch) == [[2, 3, 4, 5]]
