"""A client that goes away takes its rows with it, on every stage they reached.

Two ``toy-slow`` workers (split ``[1]``: stage 0 runs one block, stage 1 three, 0.1 s a
block, one row a batch), so rows pile up in both queues: 8 requests need 0.8 s of the
front's compute and 2.4 s of stage 1's. Each client gives up after 0.5 s: over gRPC by
its deadline (``client_timeout``), over REST by hanging up (aiohttp's timeout).

Covers, for both transports:
- the front drops its own queued rows and sends stage 1 a CANCEL for the rows in flight
  there; stage 1 drops those still queued (``worldmesh_cancelled_rows_total`` on both);
- stage 1 computes only the rows that reached it before the cancel (fewer than 8: without
  the cancel every row runs through every stage);
- afterwards nothing is left queued or in flight, and a new request gets the exact answer.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio

from worldmesh_worker.control import wait_until
from worldmesh_worker.local import LocalPipeline, WorkerProcess
from worldmesh_worker.models.toy import reference

MODEL = "demo"
REQUESTS = 8
PATIENCE_S = 0.5
SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.1"}


def inputs(i: int) -> np.ndarray:
    return (np.arange(16, dtype=np.float32).reshape(1, 16) * (i + 1) % 7) - 3


async def metric(pipeline: LocalPipeline, worker: WorkerProcess, name: str) -> float:
    async with pipeline.session.get(worker.http_url + "/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def give_up_over_grpc(pipeline: LocalPipeline) -> list[object]:
    async with triton_aio.InferenceServerClient(pipeline.front.grpc_target) as client:

        async def one(i: int) -> object:
            x = triton.InferInput("x", [1, 16], "FP32")
            x.set_data_from_numpy(inputs(i))
            return await client.infer(MODEL, [x], client_timeout=PATIENCE_S)

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)), return_exceptions=True)


async def give_up_over_rest(pipeline: LocalPipeline) -> list[object]:
    url = f"{pipeline.front.http_url}/v2/models/{MODEL}/infer"
    timeout = aiohttp.ClientTimeout(total=PATIENCE_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int) -> object:
            doc = {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 16],
                        "data": inputs(i).ravel().tolist(),
                    }
                ]
            }
            async with session.post(url, json=doc) as response:
                return await response.json()

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)), return_exceptions=True)


@pytest.mark.parametrize("give_up", [give_up_over_grpc, give_up_over_rest], ids=["grpc", "rest"])
async def test_a_client_that_gives_up_drops_its_rows_on_every_stage(give_up) -> None:
    async with LocalPipeline(
        "toy-slow",
        [1],
        [1, 1],
        deployment=MODEL,
        batching={"maxBatchSize": 1, "maxQueueDelayMs": 0},
        env=SLOW,
    ) as pipeline:
        await wait_until(pipeline.ready, 30, "the pipeline ready")
        front, last = pipeline.front, pipeline.stage(1)[0]
        results = await give_up(pipeline)
        gave_up = [r for r in results if isinstance(r, Exception)]
        assert len(gave_up) >= REQUESTS - 2, results  # stage 1 cannot answer more in 0.5 s

        async def idle() -> bool:
            statuses = [await w.control.status() for w in (front, last)]
            return all(s["queueRows"] == 0 and s["inFlightRows"] == 0 for s in statuses)

        await wait_until(idle, 10, "nothing left queued or in flight")
        assert await metric(pipeline, front, "worldmesh_cancelled_rows_total") >= 1
        assert await metric(pipeline, last, "worldmesh_cancelled_rows_total") >= 1
        computed = await metric(pipeline, last, "worldmesh_batch_size_sum")
        assert computed < REQUESTS, f"stage 1 computed {computed:g} rows of {REQUESTS} given up"

        async with triton_aio.InferenceServerClient(front.grpc_target) as client:
            x = triton.InferInput("x", [1, 16], "FP32")
            x.set_data_from_numpy(inputs(3))
            answer = await client.infer(MODEL, [x], client_timeout=30)
        np.testing.assert_array_equal(answer.as_numpy("y"), reference(inputs(3)).astype(np.float32))
