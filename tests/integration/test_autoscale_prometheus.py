"""The autoscaler on a real Prometheus, end to end: ``worldmesh run``'s loop with
``prometheus=URL``, Prometheus scraping the real workers through the file-SD targets the
runtime writes, and an open-loop load (a fixed rate, as users send, not as fast as
answered).

The ``toy-slow`` model split ``[1, 3]`` gives stage 1 two blocks and the others one, so
stage 1 is the bottleneck. Covers, in one run:
- the targets file lists exactly the ready workers, with deployment/stage/worker labels;
- raise the load: stage 1 (only) scales up, and the decision is exported;
- steady load across several down-stabilization windows: no decision flips back and forth
  (counted from ``worldmesh_autoscaler_decisions_total``);
- drop the load: stage 1 scales down, not before its window, draining the removed worker
  before stopping it; zero requests lost throughout.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import yaml

from worldmesh_operator.reconciler import WorkerState
from worldmesh_operator.run import LocalDeployment
from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import LoadResult, toy_request

from .prometheus import SCRAPE_INTERVAL_S, running_prometheus

WINDOW_S = 4  # the scale-down stabilization window of this test
MANIFEST = {
    "apiVersion": "worldmesh.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "promauto"},
    "spec": {
        "model": {"name": "toy-slow", "splitPoints": [1, 3]},
        "stages": [
            {"name": name, "replicas": {"min": 1, "max": 3}, "batching": {"maxBatchSize": 1}}
            for name in ("a", "b", "c")
        ],
        "autoscaling": {
            "enabled": True,
            "metric": "busyFraction",
            "target": 0.7,
            "scaleUpStabilizationSeconds": 2,  # a worker's first second (warm-up) is no load
            "scaleDownStabilizationSeconds": WINDOW_S,
            "scaleDownLimit": {"workers": 2, "periodSeconds": 5},
        },
    },
}
# Stage 1 computes 2 x 20 ms a row: one worker serves 25 rows/s, two serve 50.
SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.02"}
HIGH_RATE = 20.0  # busy: stage 1 about 0.9 on one worker, 0.45 on two; stages 0, 2 0.45
LOW_RATE = 2.0


class OpenLoop:
    """Requests at ``rate`` per second whatever the answers; ``rate`` may change live."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.rate = url, rate
        self.result = LoadResult()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> OpenLoop:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self._pacer = asyncio.create_task(self._pace())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._pacer.cancel()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def _pace(self) -> None:
        i, due = 0, time.monotonic()
        while True:
            due += 1.0 / self.rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(self._one(i))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            i += 1

    async def _one(self, i: int) -> None:
        body, check = toy_request(i)
        start = time.perf_counter()
        try:
            async with self._session.post(self.url, json=body) as response:
                answer = await response.json(content_type=None)
                ok = response.status == 200 and check(answer)
        except Exception as exc:  # every failure is a lost request, counted not raised
            self.result.errors[0] += 1
            self.result.messages.append(f"request {i}: {exc!r}")
            return
        if ok:
            self.result.ok += 1
            self.result.latencies.append(time.perf_counter() - start)
        else:
            self.result.wrong += 1
            self.result.messages.append(f"request {i}: {answer}")


def workers(deployment: LocalDeployment, stage: int, state: WorkerState | None = None) -> int:
    return len(
        [
            w
            for w in deployment.observed.workers
            if w.stage == stage and (state is None or w.state is state)
        ]
    )


def decisions(deployment: LocalDeployment, stage: int, direction: str) -> float:
    value = deployment.control_metrics.registry.get_sample_value(
        "worldmesh_autoscaler_decisions_total",
        {"deployment": "promauto", "stage": str(stage), "direction": direction},
    )
    return value or 0.0


async def test_prometheus_driven_autoscaling_up_steady_and_down(tmp_path):
    manifest = tmp_path / "promauto.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    targets = tmp_path / "targets.json"
    lines: list[str] = []
    async with running_prometheus(tmp_path, targets) as url:
        deployment = LocalDeployment(
            manifest,
            tmp_path / "run",
            env=SLOW,
            out=lines.append,
            prometheus=url,
            targets_path=targets,
            scrape_interval_s=SCRAPE_INTERVAL_S,
        )
        task = asyncio.create_task(deployment.run())
        try:
            await wait_until(deployment.ready, 60, "deployment ready")
            listed = json.loads(targets.read_text())
            assert sorted(t["labels"]["stage"] for t in listed) == ["0", "1", "2"]
            assert {t["labels"]["worker"] for t in listed} == {
                w.id for w in deployment.observed.workers
            }
            assert all(t["labels"]["deployment"] == "promauto" for t in listed)

            async with OpenLoop(deployment.runtime.endpoint, HIGH_RATE) as load:
                await wait_until(
                    lambda: workers(deployment, 1, WorkerState.READY) >= 2,
                    60,
                    "stage 1 scaled up from Prometheus metrics",
                )
                assert decisions(deployment, 1, "up") >= 1
                assert deployment.wishes[0] == 1 and deployment.wishes[2] == 1

                # Steady: let the new worker's load settle, then hold for several windows.
                await asyncio.sleep(WINDOW_S)  # the span observed, not a wait for a condition
                counted = {d: decisions(deployment, 1, d) for d in ("up", "down")}
                await asyncio.sleep(3 * WINDOW_S)
                flips = {d: decisions(deployment, 1, d) - counted[d] for d in counted}
                assert flips["down"] == 0 and flips["up"] <= 1, (flips, "\n".join(lines))

                size = deployment.wishes[1]
                load.rate = LOW_RATE
                dropped = time.monotonic()
                await wait_until(
                    lambda: workers(deployment, 1) == 1 and deployment.wishes[1] == 1,
                    60,
                    "stage 1 scaled down after the load dropped",
                )
                assert time.monotonic() - dropped >= WINDOW_S  # not before its window
                assert decisions(deployment, 1, "down") >= 1 and size >= 2
            assert load.result.lost == 0, load.result.messages[:5]
            assert load.result.ok > HIGH_RATE * 3 * WINDOW_S

            stops = [line.split()[-1] for line in lines if "StopWorker" in line]
            assert stops, lines
            for worker in stops:  # every worker removed by the scale-down was drained first
                drain = next(i for i, x in enumerate(lines) if "DrainWorker" in x and worker in x)
                stop = next(i for i, x in enumerate(lines) if "StopWorker" in x and worker in x)
                assert drain < stop
            await wait_until(
                lambda: len(json.loads(targets.read_text())) == 3, 10, "targets file updated"
            )
        finally:
            print("\n".join(lines))  # shown when the test fails: the loop's decisions
            deployment.delete()
            await asyncio.wait_for(task, 60)
