"""The front stage's protocol overhead: worldmesh and KServe, REST and gRPC, same run.

Both serve the ``toy`` model whole (one stage, a few microseconds of compute), so the
figures are the transport's and the server's own cost:

- worldmesh: one worker process (``LocalPipeline``), REST and gRPC on its own ports;
- KServe: its own model server (``kserve`` from PyPI in its own environment, ``make
  kserve``), one process with its default REST (uvicorn) and gRPC servers, serving the same
  MLP in numpy (``kserve_toy.py``). Its per-request access and latency log lines are
  turned off, as the worker logs none.

Closed loops of 8 and 32 clients in this process, 5 s each: REST (aiohttp, JSON) and gRPC
(grpc.aio, tritonclient's generated messages, raw contents as tritonclient sends them),
the four servers-and-transports interleaved and the order rotated every round, on the
same cores. Every answer is checked against the model's reference. Figures per
concurrency: worldmesh gRPC ÷ REST (goal >= 1.5) and worldmesh ÷ KServe on each transport
(goal >= 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
from common import Figure, median, percentile
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline
from worldmesh_worker.models.toy import reference, toy_weights

KSERVE_PYTHON = Path(__file__).resolve().parent.parent / ".venv-kserve" / "bin" / "python"
KSERVE_READY_S = 120.0
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def kserve_toy() -> AsyncIterator[tuple[str, str]]:
    """KServe's model server with the toy model: yields its REST infer URL and gRPC target."""
    if not KSERVE_PYTHON.exists():
        raise RuntimeError(f"KServe's environment is missing ({KSERVE_PYTHON}): run `make kserve`")
    http_port, grpc_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "toy.npz"
        arrays = {}
        for i, (w, b) in enumerate(toy_weights()):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        np.savez(weights, **arrays)
        log = open(Path(tmp) / "kserve.log", "w+")  # noqa: SIM115 (read back on failure)
        process = subprocess.Popen(
            [
                str(KSERVE_PYTHON),
                str(Path(__file__).parent / "kserve_toy.py"),
                str(weights),
                "--model_name",
                MODEL,
                "--http_port",
                str(http_port),
                "--grpc_port",
                str(grpc_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": ""},
        )
        base = f"http://127.0.0.1:{http_port}"
        try:
            deadline = time.monotonic() + KSERVE_READY_S
            async with aiohttp.ClientSession() as session:
                while True:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"KServe did not become ready:\n{log.read()[-3000:]}")
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{base}/v2/models/{MODEL}/ready") as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
            yield f"{base}/v2/models/{MODEL}/infer", f"127.0.0.1:{grpc_port}"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


SERVERS = ("worldmesh", "kserve")
TRANSPORTS = ("rest", "grpc")


async def run(quick: bool = False) -> list[Figure]:
    seconds = 2.0 if quick else SECONDS
    rounds = 1 if quick else 2
    results: dict[tuple[str, str, int], list[tuple[float, list[float]]]] = {}
    async with (
        LocalPipeline("toy", [], [1], deployment=MODEL) as pipeline,
        kserve_toy() as (kserve_url, kserve_target),
    ):
        endpoints = {
            "worldmesh": (
                f"{pipeline.front.http_url}/v2/models/{MODEL}/infer",
                pipeline.front.grpc_target,
            ),
            "kserve": (kserve_url, kserve_target),
        }
        runs = [(server, transport) for server in SERVERS for transport in TRANSPORTS]
        for r in range(rounds):
            for concurrency in (8, 32):
                # Rotate the order each round so that no pair always runs first or last.
                shift = r % len(runs)
                for server, transport in runs[shift:] + runs[:shift]:
                    url, target = endpoints[server]
                    measured = (
                        await rest_round(url, concurrency, seconds)
                        if transport == "rest"
                        else await grpc_round(target, concurrency, seconds)
                    )
                    results.setdefault((server, transport, concurrency), []).append(measured)
    figures = []
    for concurrency in (8, 32):
        summary: dict[str, dict[str, Any]] = {}
        for server in SERVERS:
            for transport in TRANSPORTS:
                measured = results[(server, transport, concurrency)]
                latencies = [t for _, sample in measured for t in sample]
                summary[f"{server} {transport}"] = {
                    "rps": median([rate for rate, _ in measured]),
                    "rps_rounds": [rate for rate, _ in measured],
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                }

        def line(key: str, summary: dict[str, dict[str, Any]] = summary) -> str:
            m = summary[key]
            return f"{key} {m['rps']:.0f} req/s (p50 {m['p50_ms']:.1f}, p99 {m['p99_ms']:.1f} ms)"

        def ratio(a: str, b: str, summary: dict[str, dict[str, Any]] = summary) -> float:
            return summary[a]["rps"] / summary[b]["rps"]

        clients = f"toy front stage, {concurrency} clients"
        figures.append(
            Figure(
                f"{clients}: requests/s, worldmesh gRPC ÷ REST",
                ratio("worldmesh grpc", "worldmesh rest"),
                "x",
                ">= 1.5",
                f"{line('worldmesh rest')} vs {line('worldmesh grpc')}; {rounds} rounds",
                detail=summary,
            )
        )
        for transport in TRANSPORTS:
            ours, theirs = f"worldmesh {transport}", f"kserve {transport}"
            figures.append(
                Figure(
                    f"{clients}: requests/s over {transport}, worldmesh ÷ KServe",
                    ratio(ours, theirs),
                    "x",
                    ">= 2",
                    f"{line(theirs)} vs {line(ours)}; {rounds} rounds, interleaved",
                    detail={theirs: summary[theirs], ours: summary[ours]},
                )
            )
    return figures
