"""Stage workers as local processes: the data plane's harness, without the operator.

``LocalPipeline`` starts worker processes (ports chosen by the OS), wires every pair of
neighbouring stages through their control APIs (``control.connect``), and can kill, freeze,
add and drain workers: what the demo, the tests and the benchmarks drive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .control import READY_PREFIX, ControlClient, connect, wait_until


@dataclass
class WorkerProcess:
    worker: str
    stage: int
    process: subprocess.Popen[str]
    http_port: int
    control_port: int
    control: ControlClient
    log_path: Path
    device: str = "cpu"
    grpc_port: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """``host:port`` of the worker's gRPC endpoint (as gRPC clients take it)."""
        return f"127.0.0.1:{self.grpc_port}"


@dataclass
class LocalPipeline:
    """Worker processes for one deployment; use ``async with``. Logs go under ``workdir``."""

    model: str
    split_points: Sequence[int]
    workers_per_stage: Sequence[int]
    deployment: str = "demo"
    batching: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    worlds: dict[str, Any] = field(default_factory=dict)
    early_exits: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    async def __aenter__(self) -> LocalPipeline:
        self._tmp = None
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="worldmesh-")
            self.workdir = Path(self._tmp.name)
        self.session = aiohttp.ClientSession()
        self._counter = 0
        try:
            started = await asyncio.gather(
                *(
                    self.start_worker(stage)
                    for stage, count in enumerate(self.workers_per_stage)
                    for _ in range(count)
                )
            )
            for worker in started:
                await self.wire(worker)
            if self.stage(0):
                await wait_until(self.ready, 60, "the front stage ready")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                _signal(worker, signal.SIGCONT)
                worker.process.kill()
        for worker in self.workers:
            worker.process.wait(timeout=30)
        await self.session.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def ready(self) -> bool:
        """The front's readiness probe: every stage has a live path (``/v2/health/ready``)."""
        async with self.session.get(self.front.http_url + "/v2/health/ready") as response:
            return response.status == 200

    def stage(self, index: int) -> list[WorkerProcess]:
        return [w for w in self.workers if w.stage == index and w.process.poll() is None]

    @property
    def front(self) -> WorkerProcess:
        return self.stage(0)[0]

    async def start_worker(self, stage: int) -> WorkerProcess:
        """Start one worker process and wait for its READY line (its worlds are not open yet)."""
        assert self.workdir is not None
        self._counter += 1
        name = f"{self.deployment}-s{stage}-w{self._counter}"
        config = {
            "deployment": self.deployment,
            "worker": name,
            "stage": stage,
            "model": self.model,
            "splitPoints": list(self.split_points),
            "host": "127.0.0.1",
            "ports": {"http": 0, "control": 0, "grpc": 0},
            "batching": self.batching,
            "limits": self.limits,
            "worlds": self.worlds,
            "earlyExits": self.early_exits,
        }
        config_path = self.workdir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, **self.env, "WORLDMESH_TOKEN": self.token}
        process = subprocess.Popen(
            [sys.executable, "-m", "worldmesh_worker", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=log_path.open("w"),
            text=True,
            env=env,
        )
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 120)  # type: ignore[union-attr]
        if not line.startswith(READY_PREFIX):
            process.kill()
            raise RuntimeError(f"worker {name} did not start:\n{log_path.read_text()[-3000:]}")
        ports = json.loads(line[len(READY_PREFIX) :])
        control = ControlClient(self.session, f"http://127.0.0.1:{ports['control']}", self.token)
        worker = WorkerProcess(
            name,
            stage,
            process,
            ports["http"],
            ports["control"],
            control,
            log_path,
            grpc_port=ports["grpc"],
        )
        self.workers.append(worker)
        return worker

    async def wire(self, worker: WorkerProcess) -> list[str]:
        """Open the worlds between ``worker`` and every live worker of its neighbouring stages."""
        peers = self.stage(worker.stage - 1) + self.stage(worker.stage + 1)
        return list(await asyncio.gather(*(connect(worker, peer) for peer in peers)))

    async def add_worker(self, stage: int) -> WorkerProcess:
        worker = await self.start_worker(stage)
        await self.wire(worker)
        return worker

    def kill(self, worker: WorkerProcess) -> None:
        worker.process.kill()
        worker.process.wait(timeout=30)

    def freeze(self, worker: WorkerProcess) -> None:
        _signal(worker, signal.SIGSTOP)

    def thaw(self, worker: WorkerProcess) -> None:
        _signal(worker, signal.SIGCONT)


def _signal(worker: WorkerProcess, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker.pid, sig)
