"""Autoscaling under a bursty trace: worldmesh's per-stage policy against two baselines,
one after the other in the same run, on the same trace and the same deployment.

The deployment is 3-stage ``toy-slow`` (20 ms a block, one row a batch): stage 1 has two
blocks, so it is the bottleneck (25 rows/s a worker; stages 0 and 2 serve 50). The trace
is open-loop (requests at a set rate whatever the answers, as users send): a low level, a
step up, a burst, the step again, low again. Policies:

- **worldmesh**: the built-in autoscaler, per stage on ``busyFraction`` (target 0.6,
  bottleneck first, down-stabilization ``WINDOW_S``), every stage within 1..3;
- **static-peak**: no autoscaler, each stage pinned at the workers the burst needs
  (2, 3, 2);
- **pipeline-hpa**: what a plain HPA on one Deployment holding the whole pipeline would do:
  the same policy (same target and windows) on one signal, the mean busy fraction over
  all workers, and the same worker count for every stage.

Per policy: the fraction of requests answered within ``OBJECTIVE_S``, worker-seconds (live
worker processes integrated over the trace), scale events (per stage changed), requests
lost, and flapping: a stage's decisions reversing direction while the rate holds (within
one segment of the trace). Goals for worldmesh: >= 99 % within the
objective, fewer worker-seconds than static-peak, no flapping, zero lost. A timeline PNG
(load, workers per stage, p99 per second; one column per policy) goes beside the JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from common import RESULTS, Figure, percentile

from worldmesh_operator.metrics_source import DirectScrape
from worldmesh_operator.run import LocalDeployment
from worldmesh_operator.scaling import Autoscaler, StageLoad
from worldmesh_operator.spec import AutoscalingSpec, ScaleLimit
from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import toy_request

OBJECTIVE_S = 0.5
WINDOW_S = 10
TARGET = 0.6
SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.02"}
#: (seconds, requests per second): low, step, burst, step, low
TRACE = ((15, 6.0), (20, 22.0), (10, 38.0), (20, 22.0), (15, 6.0))
STATIC = (2, 3, 2)
POLICIES = ("worldmesh", "static-peak", "pipeline-hpa")


def manifest(policy: str) -> dict[str, Any]:
    stages = []
    for i, name in enumerate(("a", "b", "c")):
        low, high = (STATIC[i], STATIC[i]) if policy == "static-peak" else (1, 3)
        stages.append(
            {"name": name, "replicas": {"min": low, "max": high}, "batching": {"maxBatchSize": 1}}
        )
    spec: dict[str, Any] = {"model": {"name": "toy-slow", "splitPoints": [1, 3]}, "stages": stages}
    if policy == "worldmesh":
        spec["autoscaling"] = {
            "enabled": True,
            "metric": "busyFraction",
            "target": TARGET,
            "scaleUpStabilizationSeconds": 2,
            "scaleDownStabilizationSeconds": WINDOW_S,
            "scaleDownLimit": {"workers": 1, "periodSeconds": 5},
        }
    return {
        "apiVersion": "worldmesh.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "autobench"},
        "spec": spec,
    }


@dataclass
class Run:
    policy: str
    sent: list[tuple[float, float | None]] = field(default_factory=list)  # (t, latency|None)
    workers: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)  # per stage
    decisions: list[tuple[float, int, int]] = field(default_factory=list)  # (t, stage, +-1)
    messages: list[str] = field(default_factory=list)


async def replay(url: str, trace: tuple[tuple[float, float], ...], run: Run, t0: float) -> None:
    """Send the trace open-loop; every request's latency (None: lost) lands in ``run.sent``."""
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(i: int, at: float) -> None:
            body, check = toy_request(i)
            start = time.perf_counter()
            try:
                async with session.post(url, json=body) as response:
                    answer = await response.json(content_type=None)
                    ok = response.status == 200 and check(answer)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                ok, answer = False, repr(exc)
            latency = time.perf_counter() - start
            run.sent.append((at, latency if ok else None))
            if not ok:
                run.messages.append(f"request {i}: {answer}"[:200])

        i, due, begin = 0, t0, t0
        for seconds, rate in trace:
            end = begin + seconds
            while due < end:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(one(i, due - t0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
                due += 1.0 / rate
            begin = end
        await asyncio.gather(*tasks)


async def pipeline_hpa(deployment: LocalDeployment, run: Run, t0: float) -> None:
    """One signal (mean busy fraction of every worker), one count for every stage."""
    policy = AutoscalingSpec(
        enabled=True,
        metric="busyFraction",
        target=TARGET,
        scale_up_stabilization_seconds=2,
        scale_down_stabilization_seconds=WINDOW_S,
        scale_down_limit=ScaleLimit(1, 5),
    )
    scaler, source = Autoscaler(policy), DirectScrape(deployment.runtime.targets)
    count = 1
    while True:
        await asyncio.sleep(1.0)
        signals = await source.stage_signals("busyFraction")
        weighted = [
            (value, source.reporting.get(stage, 0))
            for stage, value in signals.items()
            if value is not None
        ]
        workers = sum(n for _, n in weighted)
        mean = sum(v * n for v, n in weighted) / workers if workers else None
        (decision,) = scaler.decide([StageLoad(0, count, mean, 1, 3)], time.monotonic())
        if decision.workers != count:
            for stage in range(3):
                run.decisions.append((time.monotonic() - t0, stage, decision.workers - count))
            count = decision.workers
        deployment.wishes = dict.fromkeys(range(3), count)


async def run_policy(policy: str, trace: tuple[tuple[float, float], ...], workdir: Path) -> Run:
    path = workdir / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(manifest(policy)))
    run = Run(policy)
    deployment = LocalDeployment(path, workdir / policy, env=SLOW, out=lambda line: None)
    task = asyncio.create_task(deployment.run())
    helpers: list[asyncio.Task[None]] = []
    try:
        await wait_until(deployment.ready, 90, f"{policy}: deployment ready", interval=0.1)
        assert deployment.runtime.endpoint is not None
        t0 = time.monotonic()
        wishes = dict(deployment.wishes)

        async def sample() -> None:
            nonlocal wishes
            while True:
                live = deployment.runtime.live()
                run.workers.append(
                    (
                        time.monotonic() - t0,
                        tuple(sum(w.stage == s for w in live) for s in range(3)),
                    )
                )
                if policy == "worldmesh":
                    for stage, n in deployment.wishes.items():
                        if n != wishes.get(stage, 1):
                            run.decisions.append(
                                (time.monotonic() - t0, stage, n - wishes.get(stage, 1))
                            )
                    wishes = dict(deployment.wishes)
                await asyncio.sleep(0.25)

        helpers.append(asyncio.create_task(sample()))
        if policy == "pipeline-hpa":
            helpers.append(asyncio.create_task(pipeline_hpa(deployment, run, t0)))
        await replay(deployment.runtime.endpoint, trace, run, t0)
    finally:
        for helper in helpers:
            helper.cancel()
        for helper in helpers:
            with contextlib.suppress(asyncio.CancelledError):
                await helper
        deployment.delete()
        await asyncio.wait_for(task, 90)
    return run


def summarize(run: Run, trace: tuple[tuple[float, float], ...]) -> dict[str, Any]:
    latencies = [lat for _, lat in run.sent if lat is not None]
    within = sum(1 for _, lat in run.sent if lat is not None and lat <= OBJECTIVE_S)
    worker_seconds = sum(sum(a[1]) * (b[0] - a[0]) for a, b in itertools.pairwise(run.workers))
    # Flapping: a stage's decisions reversing direction within one constant-rate segment
    # (the load did not change, the size went up and down or down and up).
    flips, start = 0, 0.0
    for seconds, _ in trace:
        for stage in range(3):
            steps = [
                step for t, s, step in run.decisions if s == stage and start <= t < start + seconds
            ]
            flips += sum((a > 0) != (b > 0) for a, b in itertools.pairwise(steps))
        start += seconds
    return {
        "requests": len(run.sent),
        "within_objective": within / len(run.sent) if run.sent else 0.0,
        "worker_seconds": worker_seconds,
        "scale_events": len(run.decisions),
        "lost": len(run.sent) - len(latencies),
        "flips_at_steady_load": flips,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "max_workers": [max(c[s] for _, c in run.workers) for s in range(3)],
        "lost_examples": run.messages[:3],
    }


def plot(runs: list[Run], trace: tuple[tuple[float, float], ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(runs), figsize=(5 * len(runs), 8), sharex=True, squeeze=False)
    steps_t, steps_r, start = [], [], 0.0
    for seconds, rate in trace:
        steps_t += [start, start + seconds]
        steps_r += [rate, rate]
        start += seconds
    for column, run in enumerate(runs):
        load, workers, p99 = axes[0][column], axes[1][column], axes[2][column]
        load.plot(steps_t, steps_r, color="black")
        load.set_title(run.policy)
        load.set_ylabel("load (requests/s)")
        times = [t for t, _ in run.workers]
        for stage in range(3):
            workers.step(
                times, [c[stage] for _, c in run.workers], where="post", label=f"stage {stage}"
            )
        workers.set_ylabel("workers")
        workers.legend(loc="upper left", fontsize="small")
        bins: dict[int, list[float]] = {}
        for t, lat in run.sent:
            bins.setdefault(int(t), []).append(lat if lat is not None else float("inf"))
        seconds = sorted(bins)
        p99.plot(seconds, [min(percentile(bins[s], 99), 5.0) for s in seconds], color="tab:red")
        p99.axhline(OBJECTIVE_S, color="gray", linestyle="--", label="objective")
        p99.set_ylabel("p99 latency (s)")
        p99.set_xlabel("time (s)")
        p99.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def run(quick: bool = False) -> list[Figure]:
    trace = tuple((s / 2, r) for s, r in TRACE) if quick else TRACE
    with tempfile.TemporaryDirectory(prefix="worldmesh-autobench-") as tmp:
        runs = [await run_policy(policy, trace, Path(tmp)) for policy in POLICIES]
    results = {r.policy: summarize(r, trace) for r in runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, trace, RESULTS / "autoscale.png")
    wm, static, hpa = (results[p] for p in POLICIES)

    def others(key: str, fmt: str) -> str:
        return f"static-peak {static[key]:{fmt}}, pipeline-hpa {hpa[key]:{fmt}}"

    detail = {
        "trace": trace,
        "objective_s": OBJECTIVE_S,
        "window_s": WINDOW_S,
        **results,
        "decisions": {r.policy: r.decisions for r in runs},  # (s into the trace, stage, +-n)
    }
    return [
        Figure(
            "worldmesh autoscaler: requests within the latency objective",
            wm["within_objective"],
            "",
            ">= 0.99",
            f"objective {OBJECTIVE_S} s; {others('within_objective', '.4f')}",
            detail=detail,
        ),
        Figure(
            "worldmesh autoscaler: worker-seconds over the trace",
            wm["worker_seconds"],
            "s",
            f"<= {static['worker_seconds']:.1f}",
            others("worker_seconds", ".1f"),
        ),
        Figure(
            "worldmesh autoscaler: scale events",
            wm["scale_events"],
            "",
            "",
            others("scale_events", "d"),
        ),
        Figure(
            "worldmesh autoscaler: direction reversals at steady load",
            wm["flips_at_steady_load"],
            "",
            "== 0",
            others("flips_at_steady_load", "d"),
        ),
        Figure(
            "worldmesh autoscaler: requests lost",
            wm["lost"],
            "",
            "== 0",
            f"of {wm['requests']} sent; {others('lost', 'd')}",
        ),
        Figure(
            "worldmesh autoscaler: p99 latency over the trace",
            wm["p99_s"],
            "s",
            "",
            others("p99_s", ".3f"),
        ),
    ]
