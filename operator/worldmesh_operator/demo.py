"""``worldmesh demo``: a three-stage EfficientNet-Lite0 pipeline serving real Fashion-MNIST.

Starts one worker process per stage (more with ``--workers``), wires their worlds, sends
test-split images over the Open Inference Protocol with a few concurrent clients, and
prints predictions, accuracy against the labels, throughput and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
import numpy as np

from worldmesh_worker.data import FASHION_MNIST_CLASSES, fashion_mnist
from worldmesh_worker.local import LocalPipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="6,12", help="split points (default: 6,12 = 3 stages)")
    parser.add_argument("--workers", default="", help="workers per stage, e.g. 1,2,1")
    parser.add_argument("--images", type=int, default=300, help="test images to send")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--show", type=int, default=10, help="predictions to print")


async def run(args: argparse.Namespace) -> int:
    split = [int(p) for p in args.split.split(",") if p]
    counts = [int(c) for c in args.workers.split(",")] if args.workers else [1] * (len(split) + 1)
    images, labels = fashion_mnist("test")
    images, labels = images[: args.images], labels[: args.images]
    print(f"starting {len(counts)} stages of efficientnet-lite0 (split {split}, workers {counts})")
    async with LocalPipeline("efficientnet-lite0", split, counts, deployment="fashion") as pipeline:
        url = f"{pipeline.front.http_url}/v2/models/fashion/infer"
        print(f"serving at {url}")
        predictions: dict[int, tuple[int, float]] = {}
        latencies: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(images)):
            queue.put_nowait(i)

        async def client(session: aiohttp.ClientSession) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body: dict[str, Any] = {
                    "id": str(i),
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "UINT8",
                            "shape": [1, 28, 28],
                            "data": images[i].ravel().tolist(),
                        }
                    ],
                    "outputs": [{"name": "label"}, {"name": "probabilities"}],
                }
                start = time.perf_counter()
                async with session.post(url, json=body) as response:
                    answer = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"request {i}: {response.status} {answer}")
                latencies.append(time.perf_counter() - start)
                outputs = {o["name"]: o["data"] for o in answer["outputs"]}
                label = int(outputs["label"][0])
                predictions[i] = (label, float(outputs["probabilities"][label]))

        start = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    for i in range(min(args.show, len(images))):
        label, p = predictions[i]
        mark = "ok " if label == labels[i] else "MISS"
        print(
            f"  {mark} #{i:<4} true={FASHION_MNIST_CLASSES[labels[i]]:<12} "
            f"predicted={FASHION_MNIST_CLASSES[label]:<12} p={p:.2f}"
        )
    correct = sum(predictions[i][0] == labels[i] for i in range(len(images)))
    lat = np.array(latencies) * 1e3
    print(
        f"accuracy {correct}/{len(images)} = {correct / len(images):.1%}; "
        f"{len(images) / elapsed:.1f} images/s; latency p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms"
    )
    return 0
