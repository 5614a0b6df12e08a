"""Control-plane figures of ``worldmesh run``'s loop (the reconciler over local processes).

Covers:
- **start**: from the start of the loop on ``examples/efficientnet-fashion.yaml`` to the
  first answered request, and to every worker ready and wired; baseline: one bare worker
  process of the same model from spawn to its READY line (the floor a start cannot beat);
- **replacement**: a steady closed loop on a 3-stage ``toy-slow`` deployment with two
  middle workers; one is SIGKILLed; the time until the stage is back to two ready, wired
  workers, and the requests lost (goal 0).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml
from common import Figure, median

from worldmesh_operator.reconciler import WorkerState
from worldmesh_operator.run import LocalDeployment
from worldmesh_worker.control import READY_PREFIX, wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "efficientnet-fashion.yaml"
TOY = {
    "apiVersion": "worldmesh.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "toybench"},
    "spec": {
        "model": {"name": "toy-slow", "splitPoints": [1, 3]},
        "stages": [{"name": "a"}, {"name": "b", "replicas": {"min": 2, "max": 3}}, {"name": "c"}],
    },
}
IMAGE = {
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]
}


async def bare_worker_ready(workdir: Path) -> float:
    """Spawn one worker of stage 0 of the example and time it to its READY line."""
    config = {
        "deployment": "fashion",
        "worker": "bare-s0",
        "stage": 0,
        "model": "efficientnet-lite0",
        "splitPoints": [6, 12],
        "ports": {"http": 0, "control": 0, "grpc": 0},
        "token": "bench",
    }
    path = workdir / "bare.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "worldmesh_worker", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = await asyncio.to_thread(process.stdout.readline)  # type: ignore[union-attr]
        assert line.startswith(READY_PREFIX), line
        return time.monotonic() - start
    finally:
        process.kill()
        process.wait()


async def start_times(workdir: Path) -> tuple[float, float]:
    start = time.monotonic()
    deployment = LocalDeployment(EXAMPLE, workdir, out=lambda line: None)
    task = asyncio.create_task(deployment.run())
    first = None
    try:
        async with aiohttp.ClientSession() as session:
            while first is None:
                endpoint = deployment.runtime.endpoint
                if endpoint:
                    try:
                        async with session.post(endpoint, json=IMAGE) as response:
                            if response.status == 200:
                                first = time.monotonic() - start
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.01)
        await wait_until(deployment.ready, 120, "all workers ready")
        return first, time.monotonic() - start
    finally:
        deployment.delete()
        await asyncio.wait_for(task, 120)


async def replacement(workdir: Path) -> tuple[float, int, int]:
    manifest = workdir / "toy.yaml"
    manifest.write_text(yaml.safe_dump(TOY))
    deployment = LocalDeployment(
        manifest,
        workdir / "run",
        env={"WORLDMESH_TOY_BLOCK_DELAY_S": "0.005"},
        out=lambda line: None,
    )
    task = asyncio.create_task(deployment.run())
    try:
        await wait_until(deployment.ready, 60, "deployment ready")

        def ready_middle() -> set[str]:
            return {
                w.id
                for w in deployment.observed.workers
                if w.stage == 1 and w.state is WorkerState.READY
            }

        async with ClosedLoop(deployment.runtime.endpoint, toy_request, 6) as load:
            await load.answered(50)
            before = ready_middle()
            victim = sorted(before)[0]
            start = time.monotonic()
            deployment.runtime.workers[victim].process.kill()
            await wait_until(
                lambda: (
                    len(ready_middle() - before) == 1
                    and len(ready_middle()) == 2
                    and deployment.ready()
                ),
                60,
                "stage back to two",
            )
            back = time.monotonic() - start
            await load.answered(50)
        return back, load.result.lost, load.result.ok
    finally:
        deployment.delete()
        await asyncio.wait_for(task, 60)


async def run(quick: bool = False) -> list[Figure]:
    reps = 1 if quick else 3
    bare, first, ready, back, lost, answered = [], [], [], [], 0, 0
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="worldmesh-bench-") as tmp:
            bare.append(await bare_worker_ready(Path(tmp)))
            f, r = await start_times(Path(tmp) / "run")
            first.append(f)
            ready.append(r)
            b, n_lost, ok = await replacement(Path(tmp))
            back.append(b)
            lost += n_lost
            answered += ok
    return [
        Figure(
            "worldmesh run to the first answered request (EfficientNet, 3 stages)",
            median(first),
            "s",
            "",
            f"one bare worker spawn to READY: {median(bare):.2f} s",
            samples=first,
        ),
        Figure(
            "worldmesh run to all workers ready and wired",
            median(ready),
            "s",
            "",
            f"one bare worker spawn to READY: {median(bare):.2f} s",
            samples=ready,
        ),
        Figure(
            "a worker killed under load: stage back to its desired count",
            median(back),
            "s",
            "",
            "reconcile interval 0.25 s; includes the new process's start",
            samples=back,
        ),
        Figure(
            "a worker killed under load: requests lost",
            lost,
            "requests",
            "== 0",
            f"{answered} answered over {reps} kills",
        ),
    ]
