"""``LocalRuntime``: a deployment as worker processes on this machine (the embedded default).

Each worker gets its config file, a port pair chosen by the OS (reported on its READY
line), the deployment's control token (a file readable only by this user), and a log file
of its own under the work directory. Observing asks every worker's control API, bounded
by ``answer_timeout_s``; a worker that does not answer is reported DEAD, so the reconciler
replaces it, at once when its process is stopped (frozen), but only after ``busy_limit_s``
of silence when it runs: busy with its own work, it is not replaced for that. Stopping
sends SIGTERM (the worker drains, then exits) and SIGKILL past ``stop_timeout_s``, or at
once for a worker that is DEAD (a frozen process never handles SIGTERM).

With ``targets_path``, the runtime keeps a Prometheus ``file_sd_configs`` file there: one
target per worker that is ready and not stopping, labelled deployment, stage and worker,
rewritten (atomically: Prometheus watches the file) whenever that set changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from worldmesh_worker.control import READY_PREFIX, ControlClient
from worldmesh_worker.local import WorkerProcess

from ..desired import config_digest, layout_of
from ..reconciler import Observed, ObservedWorker, WorkerState
from .base import Target, WorkerRuntime, merge_worlds
from .front import Backend

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    id: str
    stage: int
    config_hash: str
    layout: str
    process: subprocess.Popen[str]
    log_path: Path
    created: float
    handle: WorkerProcess | None = None  # once its READY line was read
    stopping: bool = False
    last: dict[str, Any] = field(default_factory=dict)  # last control status
    dead: bool = False  # the last observation found it DEAD
    draining: bool = False  # told to drain: it takes no new requests


class LocalRuntime(WorkerRuntime):
    def __init__(
        self,
        deployment: str,
        stage_config: Callable[[int], dict[str, Any]],
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        answer_timeout_s: float = 2.0,
        busy_limit_s: float = 10.0,
        stop_timeout_s: float = 30.0,
        targets_path: Path | None = None,
    ) -> None:
        """``stage_config(stage)`` gives the worker config of a stage, without worker/ports/token."""
        super().__init__(answer_timeout_s, busy_limit_s)
        self.deployment = deployment
        self.stage_config = stage_config
        self.workdir = workdir
        self.host = host
        self.env = env or {}
        self.stop_timeout_s = stop_timeout_s
        self.workers: dict[str, _Worker] = {}
        self.targets_path = targets_path
        self._targets: list[dict[str, Any]] | None = None  # as last written
        workdir.mkdir(parents=True, exist_ok=True)
        self.token_path = workdir / "token"
        self.token_path.write_text(secrets.token_urlsafe(32))
        self.token_path.chmod(0o600)
        self._session: aiohttp.ClientSession | None = None
        #: The base URL of a ``FrontService`` in front of the front workers, if one runs.
        self.service_url: str | None = None

    async def __aenter__(self) -> LocalRuntime:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers.values():
            _kill(worker.process)
        for worker in self.workers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(timeout=10)
        await self.close()
        if self._session is not None:
            await self._session.close()
        self._write_targets()

    @property
    def endpoint(self) -> str | None:
        """The inference URL: the stable front service's (``service_url``, when one runs)
        once a front worker takes requests, else the first ready front worker's own."""
        fronts = self.fronts()
        if self.service_url is not None:
            base: str | None = self.service_url if fronts else None
        else:
            base = next(
                (
                    f"http://{self.host}:{w.handle.http_port}"
                    for w in sorted(self.workers.values(), key=lambda w: w.created)
                    if w.stage == 0 and w.handle is not None and w.process.poll() is None
                ),
                None,
            )
        return f"{base}/v2/models/{self.deployment}/infer" if base else None

    def fronts(self) -> list[Backend]:
        """The front workers that take requests: answering, wired to a live worker of the
        next stage (``accepting``), not draining, dying or dead."""
        return [
            Backend(f"http://{self.host}:{w.handle.http_port}", f"{self.host}:{w.handle.grpc_port}")
            for w in sorted(self.workers.values(), key=lambda w: w.created)
            if w.stage == 0
            and w.handle is not None
            and w.process.poll() is None
            and not (w.stopping or w.dead or w.draining)
            and w.last.get("accepting")
            and not w.last.get("draining")
        ]

    def live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.process.poll() is None]

    def targets(self) -> list[Target]:
        """The workers that are ready and not stopping."""
        return [
            (w.id, w.stage, w.handle.http_url)
            for w in list(self.workers.values())
            if w.handle is not None and not w.stopping
        ]

    # -- observe ---------------------------------------------------------------------

    async def observe(self) -> Observed:
        workers = list(self.workers.values())
        seen = await asyncio.gather(*(self._observe(w) for w in workers))
        observed_workers = [
            ObservedWorker(
                worker.id,
                worker.stage,
                state,
                worker.config_hash,
                worker.layout,
                worker.created,
            )
            for worker, (state, _) in zip(workers, seen, strict=True)
        ]
        self.failures = [
            _failure(worker)
            for worker, (state, _) in zip(workers, seen, strict=True)
            if state is WorkerState.DEAD
        ]
        self.early_exits = {
            worker.id: status["earlyExits"]
            for worker, (_, status) in zip(workers, seen, strict=True)
            if status and worker.stage == 0 and "ramps" in (status.get("earlyExits") or {})
        }
        return Observed(tuple(observed_workers), merge_worlds([status for _, status in seen]))

    async def _observe(self, worker: _Worker) -> tuple[WorkerState, dict[str, Any] | None]:
        # The handle as it is when the status is asked for: one that appears while another
        # worker's status is awaited (a frozen one takes ``answer_timeout_s``) belongs to
        # the next observation. Read afterwards, a worker that became ready meanwhile had
        # no status yet and was judged dead.
        handle = worker.handle
        status = await self._status(worker, handle)
        state = self._state(worker, handle, status)
        worker.dead = state is WorkerState.DEAD
        return state, status

    async def _status(self, worker: _Worker, handle: WorkerProcess | None) -> dict[str, Any] | None:
        if handle is None or worker.process.poll() is not None:
            return None
        try:
            worker.last = await asyncio.wait_for(handle.control.status(), self.answer_timeout_s)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
        return worker.last

    def _state(
        self, worker: _Worker, handle: WorkerProcess | None, status: dict[str, Any] | None
    ) -> WorkerState:
        if worker.process.poll() is not None:
            return WorkerState.STOPPING if worker.stopping else WorkerState.DEAD
        if worker.stopping:
            return WorkerState.STOPPING
        if handle is None:
            return WorkerState.STARTING
        if status is None:
            # No answer: stopped (SIGSTOP: frozen) is dead at once; a running process is
            # busy with its own work, and only after ``busy_limit_s`` of silence wedged.
            if self.silent_too_long(worker.id) or _stopped(worker.process.pid):
                return WorkerState.DEAD
            status = worker.last  # as it last answered
        else:
            self.heard(worker.id)
        if not status:
            return WorkerState.STARTING
        if status["draining"]:
            return WorkerState.DRAINED if status["drained"] else WorkerState.DRAINING
        return WorkerState.READY

    # -- apply (``WorkerRuntime.apply`` calls these) ------------------------------------

    async def start_worker(self, stage: int, worker_id: str) -> None:
        self.start(stage, worker_id)

    async def drain_worker(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None and worker.handle is None:
            self.stop(worker_id)  # still starting: it never served, nothing to drain
            return
        if worker is not None:
            worker.draining = True
        await self.peer(worker_id).control.drain(wait=0)

    async def stop_worker(self, worker_id: str) -> None:
        self.stop(worker_id)

    def peer(self, worker_id: str) -> WorkerProcess:
        worker = self.workers.get(worker_id)
        if worker is None or worker.handle is None:
            raise RuntimeError(f"worker {worker_id} is not running")
        return worker.handle

    def reachable(self, worker_id: str) -> ControlClient | None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.handle is None or worker.process.poll() is not None:
            return None
        return worker.handle.control

    async def applied(self) -> None:
        self._forget_exited()
        self._write_targets()

    def start(self, stage: int, worker_id: str) -> None:
        config = self.stage_config(stage)
        config_hash = config_digest(config)
        config.update(
            worker=worker_id,
            host=self.host,
            ports={"http": 0, "control": 0, "grpc": 0},
            tokenFile=str(self.token_path),
        )
        layout = layout_of(config.get("model"), config.get("splitPoints"))
        path = self.workdir / f"{worker_id}.yaml"
        path.write_text(yaml.safe_dump(config))
        log_path = self.workdir / f"{worker_id}.log"
        with log_path.open("w") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "worldmesh_worker", "--config", str(path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, **self.env},
                start_new_session=True,  # Ctrl-C reaches the runtime, which drains the workers
            )
        worker = _Worker(worker_id, stage, config_hash, layout, process, log_path, time.time())
        self.workers[worker_id] = worker
        self.spawn(self._await_ready(worker))

    async def _await_ready(self, worker: _Worker) -> None:
        assert worker.process.stdout is not None and self._session is not None
        line = await asyncio.to_thread(worker.process.stdout.readline)
        if not line.startswith(READY_PREFIX):
            log.warning("worker %s exited before it was ready; see %s", worker.id, worker.log_path)
            return
        ports = json.loads(line[len(READY_PREFIX) :])
        control = ControlClient(
            self._session, f"http://{self.host}:{ports['control']}", self.token_path.read_text()
        )
        worker.handle = WorkerProcess(
            worker.id,
            worker.stage,
            worker.process,
            ports["http"],
            ports["control"],
            control,
            worker.log_path,
            grpc_port=ports["grpc"],
        )
        self._write_targets()

    def stop(self, worker_id: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        worker.stopping = True  # an exited one is forgotten after this round of actions
        if worker.process.poll() is not None:
            return
        if worker.handle is None or not worker.last or worker.dead:
            # Never served, or does not answer (a frozen process never handles SIGTERM,
            # and would hold its port and name for the whole drain timeout): no drain.
            _kill(worker.process)
            return
        worker.process.send_signal(signal.SIGTERM)  # drains, then exits
        self.spawn(self._reap(worker))

    async def _reap(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.to_thread(worker.process.wait), self.stop_timeout_s)
        except TimeoutError:
            log.warning(
                "worker %s did not exit %g s after SIGTERM: killing it",
                worker.id,
                self.stop_timeout_s,
            )
            _kill(worker.process)

    def _forget_exited(self) -> None:
        for worker_id in [
            w.id for w in self.workers.values() if w.stopping and w.process.poll() is not None
        ]:
            del self.workers[worker_id]
        self.keep_clocks(self.workers)

    def _write_targets(self) -> None:
        if self.targets_path is None:
            return
        targets = [
            {
                "targets": [f"{self.host}:{w.handle.http_port}"],
                "labels": {"deployment": self.deployment, "stage": str(w.stage), "worker": w.id},
            }
            for w in sorted(self.workers.values(), key=lambda w: w.id)
            if w.handle is not None and not w.stopping and w.process.poll() is None
        ]
        if targets == self._targets:
            return
        partial = self.targets_path.with_name(self.targets_path.name + ".tmp")
        partial.write_text(json.dumps(targets, indent=1))
        partial.replace(self.targets_path)  # atomic: Prometheus never reads half a file
        self._targets = targets


def _failure(worker: _Worker) -> str:
    code = worker.process.poll()
    why = "does not answer its control API" if code is None else f"exited with code {code}"
    return f"worker {worker.id} {why}; its log: {worker.log_path}"


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger): ``T``/``t`` in /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # gone: poll() tells
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
