"""``worldmesh load <endpoint>``: a real Open Inference Protocol client sending real samples.

Fashion-MNIST test images (UINT8 ``image``), Rotten Tomatoes test sentences (BYTES
``text``) or the toy model's rows (FP32 ``x [1, 16]``, small integers: its labels are the
exact reference answer's), chosen by ``--dataset``; by default (``auto``) from the
model's metadata (``GET`` the endpoint without ``/infer``): its input's name. Closed loop with ``--concurrency`` clients, or open loop
at ``--rate`` requests/s (Poisson arrivals), for ``--duration`` seconds: at the deadline
the requests still in flight are cut off (counted apart, neither answered nor failed), so
it stops on time. Prints a progress line and a summary: requests, errors by HTTP status,
p50/p99 latency, throughput, and accuracy against the data set's labels. Exits 1 when the
share of failed requests is above ``--max-error-rate`` (default 0), or none was answered.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

DATASETS = ("auto", "fashion-mnist", "rotten-tomatoes", "toy")
#: The data set whose samples a model takes, by the name of its input.
BY_INPUT = {"image": "fashion-mnist", "text": "rotten-tomatoes", "x": "toy"}
TOY_ROWS = 1000


@dataclass
class Summary:
    codes: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    correct: int = 0
    answered: int = 0
    cut: int = 0  #: in flight at the deadline: cut off, neither answered nor failed
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def failed(self) -> int:
        return self.requests - self.codes[200]

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def lines(self) -> list[str]:
        lat = np.array(self.latencies or [0.0]) * 1e3
        errors = {c: n for c, n in sorted(self.codes.items()) if c != 200}
        accuracy = self.correct / self.answered if self.answered else 0.0
        return [
            f"requests {self.requests} in {self.seconds:.1f} s: {self.requests / max(self.seconds, 1e-9):.1f}/s",
            f"errors by code: {errors or 'none'} ({self.error_rate:.2%} failed; "
            f"{self.cut} in flight at the deadline, cut off)",
            f"latency p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms",
            f"accuracy {self.correct}/{self.answered} = {accuracy:.1%} against the labels",
        ]


def samples(dataset: str) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Request input lists and labels of the data set's test split."""
    from worldmesh_worker import data

    if dataset == "fashion-mnist":
        images, labels = data.fashion_mnist("test")
        return [
            [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [1, 28, 28],
                    "data": image.ravel().tolist(),
                }
            ]
            for image in images
        ], labels
    if dataset == "toy":
        from worldmesh_worker.models.toy import reference

        rows = np.random.default_rng(0).integers(-3, 4, size=(TOY_ROWS, 16)).astype(np.float32)
        return [
            [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": row.tolist()}]
            for row in rows
        ], reference(rows).argmax(axis=1)
    texts, labels = data.rotten_tomatoes("test")
    return [
        [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}] for t in texts
    ], labels


async def dataset_of(endpoint: str) -> str:
    """The data set for the model at ``endpoint``, from its metadata's input name;
    ``ValueError`` saying why when it cannot tell."""
    url = endpoint.removesuffix("/").removesuffix("/infer")
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            metadata = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"answered {response.status}: {metadata}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ValueError(f"cannot read the model's metadata at {url} ({exc})") from None
    names = [i.get("name") for i in metadata.get("inputs") or [] if isinstance(i, dict)]
    for name in names:
        if name in BY_INPUT:
            return BY_INPUT[name]
    raise ValueError(f"no samples for a model with inputs {names}")


async def drive(
    endpoint: str,
    dataset: str,
    duration: float,
    concurrency: int = 8,
    rate: float | None = None,
    progress: bool = True,
) -> Summary:
    inputs, labels = samples(dataset)
    summary = Summary()
    order = iter(range(10**9))
    deadline = time.monotonic() + duration
    start = time.monotonic()

    in_flight = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal in_flight
        in_flight += 1
        try:
            await ask(session)
        finally:
            in_flight -= 1

    async def ask(session: aiohttp.ClientSession) -> None:
        i = next(order) % len(inputs)
        body = {"id": str(i), "inputs": inputs[i], "outputs": [{"name": "label"}]}
        t0 = time.perf_counter()
        try:
            async with session.post(endpoint, json=body) as response:
                answer = await response.json(content_type=None)
                summary.codes[response.status] += 1
        except (aiohttp.ClientError, TimeoutError, ValueError):
            summary.codes[0] += 1
            return
        if response.status == 200:
            summary.latencies.append(time.perf_counter() - t0)
            summary.answered += 1
            summary.correct += int(answer["outputs"][0]["data"][0] == labels[i])

    async def closed(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            await one(session)

    async def opened(session: aiohttp.ClientSession) -> None:
        pending: set[asyncio.Task[None]] = set()
        try:
            while time.monotonic() < deadline:
                task = asyncio.create_task(one(session))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(random.expovariate(rate or 1.0))
            await asyncio.Event().wait()  # until the deadline cancels it, with what is pending
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def show() -> None:
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                done = min(1.0, (time.monotonic() - start) / duration)
                bar = "#" * int(done * 30)
                print(
                    f"\r[{bar:<30}] {summary.requests} requests, {summary.failed} errors",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            print(file=sys.stderr)

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.create_task(show())] if progress else []
        if rate is None:
            tasks += [asyncio.create_task(closed(session)) for _ in range(concurrency)]
        else:
            tasks.append(asyncio.create_task(opened(session)))
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        summary.cut = in_flight
        for task in tasks:  # on time: whatever is still in flight is cut off
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    summary.seconds = time.monotonic() - start
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "endpoint", help="the infer URL, e.g. http://127.0.0.1:8080/v2/models/fashion/infer"
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="auto",
        help="the samples to send (default: the model's, from its metadata)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--max-error-rate",
        type=float,
        default=0.0,
        help="exit 1 when a larger share of the requests failed (default 0: any failure)",
    )


async def main(args: argparse.Namespace) -> int:
    dataset = args.dataset
    if dataset == "auto":
        try:
            dataset = await dataset_of(args.endpoint)
        except ValueError as exc:
            print(f"worldmesh load: {exc}; choose one with --dataset", file=sys.stderr)
            return 2
    summary = await drive(args.endpoint, dataset, args.duration, args.concurrency, args.rate)
    print("\n".join(summary.lines()))
    if summary.error_rate > args.max_error_rate:
        print(
            f"{summary.failed} of {summary.requests} requests failed ({summary.error_rate:.2%}), "
            f"above --max-error-rate {args.max_error_rate:g}",
            file=sys.stderr,
        )
        return 1
    if not summary.answered:
        print("no request was answered", file=sys.stderr)
        return 1
    return 0
