"""Offload: cheap work on the event loop, costly or unknown work on the executor."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worldmesh_worker.offload import Offload


def where(delay_s: float = 0.0) -> str:
    if delay_s:
        time.sleep(delay_s)
    return threading.current_thread().name


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1, thread_name_prefix="compute") as pool:
        yield pool


async def test_work_of_unknown_cost_goes_to_the_executor_then_cheap_work_runs_inline(executor):
    offload = Offload(executor, inline_below_s=1.0)
    loop_thread = threading.current_thread().name
    assert (await offload.run(1, where)).startswith("compute")
    assert await offload.run(1, where) == loop_thread
    assert (offload.offloaded_calls, offload.inline_calls) == (1, 1)


async def test_work_that_turns_out_costly_moves_off_the_loop(executor):
    offload = Offload(executor, inline_below_s=0.005)
    await offload.run(1, where)  # cheap: learnt
    assert offload.inline(1)
    assert await offload.run(1, where, 0.05) == threading.current_thread().name
    # one 50 ms call moves the moving average over 5 ms: the next goes to the thread
    assert not offload.inline(1)
    assert (await offload.run(1, where)).startswith("compute")


async def test_a_batch_is_predicted_by_its_rows(executor):
    offload = Offload(executor, inline_below_s=1.0)
    await offload.run(1, where, 0.002)  # at least 2 ms for one row
    assert offload.inline(1)
    assert not offload.inline(1000)  # at least 2 s predicted
    assert (await offload.run(1000, where)).startswith("compute")


async def test_a_launch_bound_call_stays_off_the_loop_whatever_its_rows(executor):
    # 20 ms for 100 rows is 0.2 ms a row, but a one-row call still costs the launch
    offload = Offload(executor, inline_below_s=0.01)
    await offload.run(100, where, 0.02)
    assert not offload.inline(1)


async def test_an_error_propagates_and_the_call_still_counts(executor):
    offload = Offload(executor, inline_below_s=1.0)

    def fail() -> None:
        raise ValueError("bad rows")

    with pytest.raises(ValueError, match="bad rows"):
        await offload.run(1, fail)
    assert offload.per_call_s is not None
    with pytest.raises(ValueError, match="bad rows"):
        await offload.run(1, fail)  # now inline: the same error
    assert offload.inline_calls == 1


async def test_the_loop_keeps_turning_while_costly_work_runs(executor):
    offload = Offload(executor, inline_below_s=0.001)
    await offload.run(1, where, 0.01)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    before = ticks
    await offload.run(1, where, 0.2)
    ticker.cancel()
    assert ticks > before + 1, "the loop was blocked while the work ran"
