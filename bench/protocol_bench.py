"""The front stage's protocol overhead: worldmesh and KServe, REST and gRPC, same run.

Both serve the ``toy`` model whole (one stage, a few microseconds of compute), so the
figures are the transport's and the server's own cost:

- worldmesh: one worker process (``LocalPipeline``), REST and gRPC on its own ports;
- KServe: its own model server (``kserve`` from PyPI in its own environment, ``make
  kserve``), one process with its default REST (uvicorn) and gRPC servers, serving the same
  MLP in numpy (``kserve_toy.py``). Its per-request access and latency log lines are
  turned off, as the worker logs none;
- the floors: the worker's own stacks (aiohttp, ``grpc.aio``) answering a fixed answer
  with no serving work at all (``echo_servers.py``), what a request costs each transport
  in Python before anything else.

Closed loops of 8 and 32 clients in this process, 5 s each: REST (aiohttp, JSON) and gRPC
(grpc.aio, tritonclient's generated messages, raw contents as tritonclient sends them),
the six servers-and-transports interleaved and the order rotated every round, on the
same cores. Every answer is checked. Per run: requests/s, p50/p99 latency, and the server
process's CPU per request. Figures per concurrency: worldmesh gRPC ÷ REST (goal >= 1.5)
and worldmesh ÷ KServe on each transport (goal >= 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import grpc
import numpy as np
from common import Figure, cpu_seconds, median, percentile
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline
from worldmesh_worker.models.toy import reference, toy_weights

KSERVE_PYTHON = Path(__file__).resolve().parent.parent / ".venv-kserve" / "bin" / "python"
READY_S = 120.0
MODEL = "proto"
SECONDS = 5.0


class Measured(NamedTuple):
    rate: float  # answers/s
    latencies: list[float]  # s, each answer of the counted window
    cpu_us: float  # the server process's CPU per answer (all its threads), microseconds


async def rest_round(url: str, pid: int, concurrency: int, seconds: float) -> Measured:
    async with ClosedLoop(url, toy_request, concurrency) as load:
        await load.answered(concurrency)
        ok, latencies = load.result.ok, len(load.result.latencies)
        start, cpu = time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(seconds)
        answers = load.result.ok - ok
        cpu, rate = cpu_seconds(pid) - cpu, answers / (time.monotonic() - start)
        sample = load.result.latencies[latencies:]
        if load.result.lost:
            raise RuntimeError(f"REST round failed: {load.result.messages[:3]}")
    return Measured(rate, sample, cpu / answers * 1e6)


async def grpc_round(target: str, pid: int, concurrency: int, seconds: float) -> Measured:
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
        start, cpu = time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(seconds)
        counting = False
        cpu, rate = cpu_seconds(pid) - cpu, len(latencies) / (time.monotonic() - start)
        stop.set()
        await asyncio.gather(*tasks)
    return Measured(rate, latencies, cpu / len(latencies) * 1e6)


class Endpoint(NamedTuple):
    url: str  # REST infer URL
    target: str  # gRPC host:port
    pid: int  # the serving process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def started(argv: list[str], ready_url: str, env: dict[str, str]) -> AsyncIterator[int]:
    """A server process (its pid), from when ``ready_url`` answers 200 until the block ends."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + READY_S
            async with aiohttp.ClientSession() as session:
                while True:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"{argv[1]} did not become ready:\n{log.read()[-3000:]}")
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(ready_url) as response:
                            if response.status == 200:
                                break
                    await asyncio.sleep(0.2)
            yield process.pid
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.asynccontextmanager
async def kserve_toy() -> AsyncIterator[Endpoint]:
    """KServe's model server with the toy model."""
    if not KSERVE_PYTHON.exists():
        raise RuntimeError(f"KServe's environment is missing ({KSERVE_PYTHON}): run `make kserve`")
    http_port, grpc_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "toy.npz"
        arrays = {}
        for i, (w, b) in enumerate(toy_weights()):
            arrays[f"w{i}"], arrays[f"b{i}"] = w, b
        np.savez(weights, **arrays)
        script = str(Path(__file__).parent / "kserve_toy.py")
        argv = [str(KSERVE_PYTHON), script, str(weights), "--model_name", MODEL]
        argv += ["--http_port", str(http_port), "--grpc_port", str(grpc_port)]
        base = f"http://127.0.0.1:{http_port}/v2/models/{MODEL}"
        async with started(argv, f"{base}/ready", {**os.environ, "PYTHONPATH": ""}) as pid:
            yield Endpoint(f"{base}/infer", f"127.0.0.1:{grpc_port}", pid)


@contextlib.asynccontextmanager
async def echo_servers() -> AsyncIterator[Endpoint]:
    """The transports' floors (``echo_servers.py``)."""
    http_port, grpc_port = _free_port(), _free_port()
    script = str(Path(__file__).parent / "echo_servers.py")
    argv = [sys.executable, script, str(http_port), str(grpc_port)]
    base = f"http://127.0.0.1:{http_port}"
    async with started(argv, f"{base}/v2/health/ready", dict(os.environ)) as pid:
        yield Endpoint(f"{base}/v2/models/{MODEL}/infer", f"127.0.0.1:{grpc_port}", pid)


SERVERS = ("worldmesh", "kserve", "floor")
TRANSPORTS = ("rest", "grpc")
CONCURRENCY = (8, 32)


async def run(quick: bool = False) -> list[Figure]:
    seconds = 2.0 if quick else SECONDS
    rounds = 1 if quick else 2
    results: dict[tuple[str, str, int], list[Measured]] = {}
    async with (
        LocalPipeline("toy", [], [1], deployment=MODEL) as pipeline,
        kserve_toy() as kserve,
        echo_servers() as floor,
    ):
        front = pipeline.front
        endpoints = {
            "worldmesh": Endpoint(
                f"{front.http_url}/v2/models/{MODEL}/infer", front.grpc_target, front.pid
            ),
            "kserve": kserve,
            "floor": floor,
        }
        runs = [(server, transport) for server in SERVERS for transport in TRANSPORTS]
        for r in range(rounds):
            for concurrency in CONCURRENCY:
                # Rotate the order each round so that no pair always runs first or last.
                shift = (r * 2) % len(runs)
                for server, transport in runs[shift:] + runs[:shift]:
                    url, target, pid = endpoints[server]
                    measured = (
                        await rest_round(url, pid, concurrency, seconds)
                        if transport == "rest"
                        else await grpc_round(target, pid, concurrency, seconds)
                    )
                    results.setdefault((server, transport, concurrency), []).append(measured)
    figures = []
    for concurrency in CONCURRENCY:
        summary: dict[str, dict[str, Any]] = {}
        for server in SERVERS:
            for transport in TRANSPORTS:
                measured = results[(server, transport, concurrency)]
                latencies = [t for m in measured for t in m.latencies]
                summary[f"{server} {transport}"] = {
                    "rps": median([m.rate for m in measured]),
                    "rps_rounds": [m.rate for m in measured],
                    "p50_ms": percentile(latencies, 50) * 1e3,
                    "p99_ms": percentile(latencies, 99) * 1e3,
                    "server_cpu_us_per_request": median([m.cpu_us for m in measured]),
                }

        def line(key: str, summary: dict[str, dict[str, Any]] = summary) -> str:
            m = summary[key]
            return (
                f"{key} {m['rps']:.0f} req/s (p50 {m['p50_ms']:.1f}, p99 {m['p99_ms']:.1f} ms, "
                f"{m['server_cpu_us_per_request']:.0f} µs CPU)"
            )

        def ratio(a: str, b: str, summary: dict[str, dict[str, Any]] = summary) -> float:
            return summary[a]["rps"] / summary[b]["rps"]

        clients = f"toy front stage, {concurrency} clients"
        figures.append(
            Figure(
                f"{clients}: requests/s, worldmesh gRPC ÷ REST",
                ratio("worldmesh grpc", "worldmesh rest"),
                "x",
                ">= 1.5",
                f"{line('worldmesh rest')} vs {line('worldmesh grpc')}; floors: "
                f"{line('floor rest')}, {line('floor grpc')}; {rounds} rounds",
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
                    detail={key: summary[key] for key in (theirs, ours, f"floor {transport}")},
                )
            )
    return figures
