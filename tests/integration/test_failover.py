"""Zero-loss serving while workers die, freeze, join and drain (real processes, real worlds).

Covers:
- a worker with worlds to two peers keeps one when the other peer is killed;
- SIGKILL of a middle worker under a steady closed-loop load: every request gets its exact
  answer, and the rows it held were resent (retries counted);
- SIGSTOP of a middle worker: the same, then SIGCONT: the thawed worker finds its worlds
  broken, takes no traffic, and serves again once re-wired;
- a worker joining under load gets traffic, nothing is lost, no other worker restarts;
- a drained worker finishes its in-flight work and then receives no new work.
"""

from __future__ import annotations

import pytest

from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline

# toy-slow sleeps per block, so rows spend long enough inside a worker to be caught there.
SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.02"}


def url(pipeline: LocalPipeline) -> str:
    return f"{pipeline.front.http_url}/v2/models/demo/infer"


async def world_states(worker) -> dict[str, str]:
    return {w["name"]: w["state"] for w in await worker.control.worlds()}


async def front_retries(pipeline: LocalPipeline) -> float:
    async with pipeline.session.get(pipeline.front.http_url + "/metrics") as response:
        text = await response.text()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("worldmesh_retries_total{")
    )


async def rows_inside(worker) -> bool:
    status = await worker.control.status()
    return status["queueRows"] + status["inFlightRows"] > 0


async def test_killing_one_peer_leaves_the_other_world_working():
    async with LocalPipeline("toy", [2], [1, 2]) as pipeline:
        front = pipeline.front
        victim, survivor = pipeline.stage(1)
        pipeline.kill(victim)
        states = await wait_until(
            lambda: _broken_count(front, 1), 10, "the victim's world marked broken"
        )
        assert states[f"{front.worker}~{survivor.worker}"] == "ready"
        async with ClosedLoop(url(pipeline), toy_request, 2) as load:
            await load.answered(20)
        assert load.result.lost == 0, load.result.messages[:5]


async def _broken_count(worker, n: int) -> dict[str, str] | None:
    states = await world_states(worker)
    return states if list(states.values()).count("broken") == n else None


@pytest.mark.parametrize("failure", ["kill", "stop"])
async def test_middle_worker_failure_under_load_loses_nothing(failure):
    async with LocalPipeline("toy-slow", [1, 3], [1, 2, 1], env=SLOW) as pipeline:
        victim = pipeline.stage(1)[0]
        async with ClosedLoop(url(pipeline), toy_request, 6) as load:
            await load.answered(30)
            await wait_until(lambda: rows_inside(victim), 10, "rows inside the victim")
            (pipeline.kill if failure == "kill" else pipeline.freeze)(victim)
            await wait_until(lambda: _broken_count(pipeline.front, 1), 10, "front sees it broken")
            await load.answered(60)
        assert load.result.lost == 0, load.result.messages[:5]
        assert await front_retries(pipeline) >= 1  # the victim's rows were really resent
        if failure == "stop":
            pipeline.thaw(victim)
            # Its peers closed their ends while it slept: it wakes with broken worlds only.
            await wait_until(lambda: _all_broken(victim), 10, "thawed worker sees broken worlds")
            status = await victim.control.status()
            assert status["accepting"] is False
            # Re-wired by the control plane, it serves again.
            await pipeline.wire(victim)
            before = await _received(victim)
            async with ClosedLoop(url(pipeline), toy_request, 6) as load:
                await wait_until(lambda: _received_more(victim, before), 20, "traffic to it")
            assert load.result.lost == 0, load.result.messages[:5]


async def _all_broken(worker) -> bool:
    states = await world_states(worker)
    return bool(states) and all(s == "broken" for s in states.values())


async def _received(worker) -> int:
    return sum(w.get("messages_received", 0) for w in await worker.control.worlds())


async def _received_more(worker, before: int) -> bool:
    return await _received(worker) > before + 10


async def test_worker_joins_under_load():
    async with LocalPipeline("toy-slow", [1, 3], [1, 1, 1], env=SLOW) as pipeline:
        pids = {w.worker: w.pid for w in pipeline.workers}
        async with ClosedLoop(url(pipeline), toy_request, 6) as load:
            await load.answered(20)
            newcomer = await pipeline.add_worker(1)
            await wait_until(lambda: _received_more(newcomer, 0), 20, "traffic to the newcomer")
            await load.answered(20)
        assert load.result.lost == 0, load.result.messages[:5]
        assert {w.worker: w.pid for w in pipeline.workers if w is not newcomer} == pids
        assert all(w.process.poll() is None for w in pipeline.workers)


async def test_drained_worker_finishes_in_flight_work_and_gets_no_more():
    async with LocalPipeline("toy-slow", [1, 3], [1, 2, 1], env=SLOW) as pipeline:
        draining, _ = pipeline.stage(1)
        async with ClosedLoop(url(pipeline), toy_request, 6) as load:
            await load.answered(20)
            await wait_until(lambda: rows_inside(draining), 10, "rows inside the worker")
            state = await draining.control.drain(wait=20)
            assert state == {"draining": True, "drained": True}
            received = await _received(draining)
            await load.answered(40)
            assert await _received(draining) == received  # no new work after the drain
        assert load.result.lost == 0, load.result.messages[:5]
