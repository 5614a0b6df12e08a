"""The front stage's protocol overhead: the same request over REST and over gRPC.

One worker process serving the ``toy`` model whole (one stage, a few microseconds of
compute), so the figures are the transport's and the front's own cost. Closed loops of 8
and 32 clients in this process, 5 s each, REST (aiohttp, JSON) and gRPC (grpc.aio,
tritonclient's generated messages, raw contents as tritonclient sends them) interleaved,
two rounds with the order swapped: requests/s and p50/p99 latency per transport, and the
gRPC ÷ REST ratio (goal >= 1.5). Every answer is checked against the model's reference.

Not measured here: KServe's own model server beside it (the issue's baseline); see the
README.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
from common import Figure, median, percentile
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline
from worldmesh_worker.models.toy import reference

MODEL = "proto"
SECONDS = 5.0


async def rest_round(url: str, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    async with ClosedLoop(url, toy_request, concurrency) as load:
        await load.answered(concurrency)
        ok, latencies = load.result.ok, len(load.result.latencies)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        rate = (load.result.ok - ok) / (time.monotonic() - start)
        sample = load.result.latencies[latencies:]
        if load.result.lost:
            raise RuntimeError(f"REST round failed: {load.result.messages[:3]}")
    return rate, sample


async def grpc_round(target: str, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    x = np.arange(16, dtype=np.float32).reshape(1, 16) % 7 - 3
    want = reference(x)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(x.tobytes())
    latencies: list[float] = []
    counting = False
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def client() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                response = await stub.ModelInfer(request)
                y = np.frombuffer(response.raw_output_contents[0], np.float32)
                if not np.array_equal(y, want.ravel()):
                    raise RuntimeError(f"gRPC answered {y}, not {want}")
                if counting:
                    latencies.append(time.perf_counter() - start)

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(0.5)  # every client has had answers: warm
        counting = True
        start = time.monotonic()
        await asyncio.sleep(seconds)
        counting = False
        rate = len(latencies) / (time.monotonic() - start)
        stop.set()
        await asyncio.gather(*tasks)
    return rate, latencies


async def run(quick: bool = False) -> list[Figure]:
    seconds = 2.0 if quick else SECONDS
    rounds = 1 if quick else 2
    results: dict[tuple[str, int], list[tuple[float, list[float]]]] = {}
    async with LocalPipeline("toy", [], [1], deployment=MODEL) as pipeline:
        front = pipeline.front
        url = f"{front.http_url}/v2/models/{MODEL}/infer"
        for r in range(rounds):
            for concurrency in (8, 32):
                order = ("rest", "grpc") if r % 2 == 0 else ("grpc", "rest")
                for transport in order:
                    measured = (
                        await rest_round(url, concurrency, seconds)
                        if transport == "rest"
                        else await grpc_round(front.grpc_target, concurrency, seconds)
                    )
                    results.setdefault((transport, concurrency), []).append(measured)
    figures = []
    for concurrency in (8, 32):
        summary: dict[str, dict[str, Any]] = {}
        for transport in ("rest", "grpc"):
            runs = results[(transport, concurrency)]
            latencies = [t for _, sample in runs for t in sample]
            summary[transport] = {
                "rps": median([rate for rate, _ in runs]),
                "p50_ms": percentile(latencies, 50) * 1e3,
                "p99_ms": percentile(latencies, 99) * 1e3,
            }
        rest, grpc_ = summary["rest"], summary["grpc"]
        figures.append(
            Figure(
                f"toy front stage, {concurrency} clients: requests/s, gRPC ÷ REST",
                grpc_["rps"] / rest["rps"],
                "x",
                ">= 1.5",
                f"REST {rest['rps']:.0f} req/s (p50 {rest['p50_ms']:.1f} ms, p99 "
                f"{rest['p99_ms']:.1f} ms) vs gRPC {grpc_['rps']:.0f} req/s (p50 "
                f"{grpc_['p50_ms']:.1f} ms, p99 {grpc_['p99_ms']:.1f} ms); {rounds} rounds",
                detail=summary,
            )
        )
    return figures
