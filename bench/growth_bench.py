"""What a deployment costs as its stages grow, at full fan-out and at fan-out 2.

``worldmesh run``'s loop on a 3-stage ``toy-slow`` deployment (1 ms per block) with N
workers in every stage, N = 1, 2, 4, 8, once with ``spec.worlds.fanOut: all`` (every pair
of neighbouring workers) and once with 2, one after the other in the same run:

- worlds once converged; seconds from the start to the first answer through the
  deployment's one endpoint (``worldmesh run``'s front service, round robin over the front
  workers), and to every world open (the last step's summary: Ready, no world opening,
  nothing planned);
- per worker, medians over the deployment: threads, file descriptors and RSS (``/proc``);
  the deployment's idle CPU (cores, over 10 s with no request, from 2 s after it settled);
- world opens that failed (the workers' logs), from the start to the end;
- throughput: a closed loop of 8 clients for 6 s, and the share of the middle stage's rows
  each of its workers computed (max / mean: balanced is 1.0).

Goals at N = 8 with fan-out 2: every world open within 5 s of the first answer (from the
start, 24 worker processes must first load torch on 2 cores: reported beside it), idle CPU
of the deployment under 0.2 cores, throughput no lower than at N = 4.

Then the fashion example (EfficientNet-Lite0 on Fashion-MNIST images, early exits off,
every stage pinned at 4 workers: at its own maximum sizes fan-out 2 already wires every
pair), at fan-out 2 and all in alternating order over two rounds: throughput at 2 equals
all's within noise (goal >= 0.95x), and the middle stage's workers share the rows within
10%.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from common import Figure, cpu_seconds, fashion_requests, median

from worldmesh_operator.run import LocalDeployment
from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request

SIZES = (1, 2, 4, 8)
FAN_OUTS: tuple[int | str, ...] = ("all", 2)
SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.001"}
FASHION = Path(__file__).parents[1] / "examples" / "efficientnet-fashion.yaml"
FASHION_N = 4  # the fashion example's stages at 4 workers each: 12 EfficientNet workers


def manifest(n: int, fan_out: int | str) -> dict[str, Any]:
    pinned = {"min": n, "max": n}
    return {
        "apiVersion": "worldmesh.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "growth"},
        "spec": {
            "model": {"name": "toy-slow", "splitPoints": [1, 3]},
            "stages": [{"name": s, "replicas": pinned} for s in ("a", "b", "c")],
            "worlds": {"fanOut": fan_out},
        },
    }


def proc(pid: int) -> tuple[int, int, float, float]:
    """(threads, fds, RSS MiB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    threads = int(fields["Threads"])
    rss = int(fields["VmRSS"].split()[0]) / 1024
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return threads, fds, rss, cpu_seconds(pid)


async def middle_rows(deployment: LocalDeployment) -> dict[str, float]:
    """Rows each middle-stage worker computed, from its ``/metrics``."""
    rows = {}
    async with aiohttp.ClientSession() as session:
        for worker, stage, url in deployment.runtime.targets():
            if stage != 1:
                continue
            async with session.get(f"{url}/metrics") as response:
                text = await response.text()
            rows[worker] = sum(
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("worldmesh_batch_size_sum")
            )
    return rows


def fashion(n: int, fan_out: int | str) -> dict[str, Any]:
    """The fashion example with N workers in every stage, pinned (no autoscaling), early
    exits off: the pipeline's own throughput."""
    example = yaml.safe_load(FASHION.read_text())
    spec = example["spec"]
    for stage in spec["stages"]:
        stage["replicas"] = {"min": n, "max": n}
    spec["worlds"]["fanOut"] = fan_out
    spec["autoscaling"]["enabled"] = False
    spec["earlyExits"]["enabled"] = False
    return example


async def one(
    n: int,
    fan_out: int | str,
    workdir: Path,
    model: str = "toy",
) -> dict[str, Any]:
    label = f"{model}-{n}-{fan_out}"
    path = workdir / f"growth-{label}.yaml"
    toy = model == "toy"
    path.write_text(yaml.safe_dump(manifest(n, fan_out) if toy else fashion(n, fan_out)))
    deployment = LocalDeployment(
        path, workdir / f"run-{label}", env=SLOW if toy else {}, out=lambda _: None, port=0
    )
    requests = toy_request if toy else fashion_requests()
    start = time.monotonic()
    task = asyncio.create_task(deployment.run())
    try:
        body, _ = requests(0)
        async with aiohttp.ClientSession() as session:

            async def answered() -> bool:
                endpoint = deployment.runtime.endpoint
                if not endpoint:
                    return False
                try:
                    async with session.post(endpoint, json=body) as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(answered, 180, f"N={n} answering", interval=0.05)
        ready = time.monotonic() - start

        def settled() -> bool:
            step = deployment.loop.last
            return (
                step is not None
                and step.summary["phase"] == "Ready"
                and not step.summary["worlds"]["opening"]
                and not step.actions
            )

        await wait_until(settled, 180, f"N={n} worlds open", interval=0.05)
        opened = time.monotonic() - start
        worlds = deployment.loop.last.summary["worlds"]["ready"]  # type: ignore[union-attr]
        pids = [w.process.pid for w in deployment.runtime.live()]
        await asyncio.sleep(2.0)
        before = {pid: proc(pid) for pid in pids}
        await asyncio.sleep(10.0)
        after = {pid: proc(pid) for pid in pids}
        idle = sum(after[p][3] - before[p][3] for p in pids) / 10.0
        rows_before = await middle_rows(deployment)
        async with ClosedLoop(deployment.runtime.endpoint, requests, 8) as load:
            await load.answered(20)
            counted = load.result.ok
            t0 = time.monotonic()
            await asyncio.sleep(6.0)
            rate = (load.result.ok - counted) / (time.monotonic() - t0)
        rows_after = await middle_rows(deployment)
        shares = [rows_after[w] - rows_before.get(w, 0.0) for w in rows_after]
        mean = sum(shares) / len(shares) if shares else 0.0
        return {
            "model": model,
            "workers_per_stage": n,
            "fan_out": fan_out,
            "worlds": worlds,
            "first_answer_s": round(ready, 2),
            "worlds_open_s": round(opened, 2),
            "threads": median([after[p][0] for p in pids]),
            "fds": median([after[p][1] for p in pids]),
            "rss_mib": round(median([after[p][2] for p in pids]), 1),
            "idle_cores": round(idle, 3),
            "throughput_rps": round(rate, 1),
            "middle_max_over_mean": round(max(shares) / mean, 3) if mean else None,
            "lost": load.result.lost,
            "open_failures": sum(
                log.read_text(errors="replace").count("failed to open")
                for log in (workdir / f"run-{label}").glob("*.log")
            ),
        }
    finally:
        deployment.delete()
        await asyncio.wait_for(task, 120)


async def fashion_rounds(workdir: Path, rounds: int) -> list[Figure]:
    """The fashion example at ``FASHION_N`` workers per stage, fan-out 2 against all, in
    alternating order over ``rounds``: throughput ratio and the middle stage's balance."""
    ratios, bounded, full = [], [], []
    for r in range(rounds):
        order: tuple[int | str, ...] = (2, "all") if r % 2 == 0 else ("all", 2)
        (workdir / f"round-{r}").mkdir()
        got = {k: await one(FASHION_N, k, workdir / f"round-{r}", "fashion") for k in order}
        bounded.append(got[2])
        full.append(got["all"])
        ratios.append(got[2]["throughput_rps"] / got["all"]["throughput_rps"])
    balance = [row["middle_max_over_mean"] for row in bounded]
    return [
        Figure(
            f"fashion example, {FASHION_N} workers per stage: throughput, fan-out 2 ÷ all",
            median(ratios),
            "x",
            ">= 0.95",
            f"{', '.join(str(b['throughput_rps']) for b in bounded)} vs "
            f"{', '.join(str(f['throughput_rps']) for f in full)} requests/s over {rounds} "
            "alternating rounds",
            samples=ratios,
            detail={"table": bounded + full},
        ),
        Figure(
            f"fashion example, {FASHION_N} workers per stage, fan-out 2: "
            "middle stage's busiest worker over the mean",
            max(balance),
            "x",
            "<= 1.1",
            f"fan-out all: {max(row['middle_max_over_mean'] for row in full):.3f} x "
            f"(worst of {rounds} rounds)",
            samples=balance,
        ),
    ]


async def run(quick: bool = False) -> list[Figure]:
    sizes = SIZES[:3] if quick else SIZES
    rows: dict[tuple[int, int | str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="worldmesh-growth-") as tmp:
        for n in sizes:
            for fan_out in FAN_OUTS:
                rows[(n, fan_out)] = await one(n, fan_out, Path(tmp))
        fashion_figures = await fashion_rounds(Path(tmp), 1 if quick else 2)
    table = [rows[key] for key in sorted(rows, key=lambda k: (k[0], str(k[1])))]
    top = sizes[-1]
    bounded, full = rows[(top, 2)], rows[(top, "all")]
    below = rows[(sizes[-2], 2)]

    def figure(name: str, key: str, unit: str, goal: str = "", scale: float = 1.0) -> Figure:
        return Figure(
            f"N={top} per stage, fan-out 2: {name}",
            bounded[key] * scale,
            unit,
            goal,
            f"fan-out all: {full[key] * scale:.4g} {unit}",
            detail={"table": table} if key == "worlds" else {},
        )

    return [
        figure("worlds", "worlds", ""),
        Figure(
            f"N={top} per stage, fan-out 2: every world open, after the first answer",
            bounded["worlds_open_s"] - bounded["first_answer_s"],
            "s",
            "<= 5",
            f"fan-out all: {full['worlds_open_s'] - full['first_answer_s']:.2f} s; from the start: "
            f"{bounded['worlds_open_s']:.2f} s (all: {full['worlds_open_s']:.2f} s)",
        ),
        figure("idle CPU of the deployment", "idle_cores", "cores", "<= 0.2"),
        figure("world opens that failed", "open_failures", "", "== 0"),
        figure("threads per worker (median)", "threads", ""),
        figure("RSS per worker (median)", "rss_mib", "MiB"),
        Figure(
            f"N={top} per stage, fan-out 2: throughput over N={sizes[-2]}'s",
            bounded["throughput_rps"] / below["throughput_rps"],
            "x",
            ">= 1",
            f"{bounded['throughput_rps']} vs {below['throughput_rps']} requests/s; "
            f"fan-out all at N={top}: {full['throughput_rps']} requests/s",
        ),
        figure("middle stage's busiest worker over the mean", "middle_max_over_mean", "x"),
        *fashion_figures,
    ]
