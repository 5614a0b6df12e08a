"""A test kubelet: runs the emulator's worker pods as real worker processes on loopback.

For every pod in the emulator's namespace that it has not seen (and that is not finished)
it gives the pod an address of its own, ``127.0.0.N`` (N from 2 upward, unique; all of
127.0.0.0/8 is loopback on Linux), writes the worker config from the pod's
``worldmesh.io/config`` annotation to a file (``host`` set to the pod IP, the ports from
the container's ``ports``, ``tokenFile`` pointing at a file holding the token of the Secret
the pod mounts), starts ``python -m worldmesh_worker --config FILE`` and reports back on
the pod: ``status.podIP``, phase ``Running``, the ``Ready`` condition from the pod's own
``readinessProbe`` (simplified: one probe every ``probe_period_s``, Ready follows each
answer), and phase ``Failed`` (with the exit code, and the log's tail as the termination
message under ``FallbackToLogsOnError``) when the process exits. A pod that disappears
from the emulator is terminated: SIGTERM (the worker drains), then SIGKILL after
``grace_s``. ``close()`` stops every process.

Everything is polled with deadlines; nothing binds outside loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_api import KubeApi, NotFound

log = logging.getLogger(__name__)


@dataclass
class RunningPod:
    name: str
    uid: str
    ip: str
    http_port: int
    control_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    readiness_path: str
    message_policy: str
    ready: bool = False
    probed_at: float = 0.0
    reported_exit: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://{self.ip}:{self.http_port}"

    def termination_message(self, code: int) -> str:
        """``FallbackToLogsOnError``: on a failure, the log's tail, at most 80 lines and
        2 KiB (as a kubelet does; the worker writes no termination-log file)."""
        if code == 0 or self.message_policy != "FallbackToLogsOnError":
            return ""
        lines = self.log_path.read_bytes().splitlines(keepends=True)[-80:]
        return b"".join(lines)[-2048:].decode(errors="replace")


@dataclass
class Kubelet:
    api: KubeApi
    workdir: Path
    namespace: str = "default"
    interval_s: float = 0.05
    probe_period_s: float = 0.2
    grace_s: float = 10.0
    pods: dict[str, RunningPod] = field(default_factory=dict)  # live, by pod name
    history: list[RunningPod] = field(default_factory=list)  # every pod ever started
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._addresses = (f"127.0.0.{n}" for n in itertools.count(2))
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        self._task = asyncio.create_task(self._run(), name="kubelet")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        everything = list(self.pods.values())
        self.pods.clear()
        await asyncio.gather(*(self._terminate(p, grace_s=2.0) for p in everything))
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for pod in self.history:  # whatever is left: never leave a process behind
            if pod.process.poll() is None:
                pod.process.kill()
                await asyncio.to_thread(pod.process.wait, 10)
        if self._session is not None:
            await self._session.close()

    def log_of(self, name: str) -> str:
        for pod in self.history:
            if pod.name == name:
                return pod.log_path.read_text(errors="replace")[-3000:]
        return ""

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an emulator hiccup: report, go on
                self.errors.append(f"{type(exc).__name__}: {exc}")
                log.warning("kubelet sync failed: %s", exc, exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def _sync(self) -> None:
        listed = await self.api.list("v1", "pods", self.namespace)
        present = {p["metadata"]["name"]: p for p in listed}
        for name, pod in list(self.pods.items()):
            if name not in present or present[name]["metadata"].get("uid") != pod.uid:
                del self.pods[name]
                task = asyncio.create_task(self._terminate(pod, self.grace_s))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        for name, body in present.items():
            phase = (body.get("status") or {}).get("phase")
            if name not in self.pods and phase not in ("Failed", "Succeeded"):
                await self._launch(body)
        await asyncio.gather(*(self._check(p) for p in list(self.pods.values())))

    async def _mount_config_maps(
        self, body: dict[str, Any], pod_dir: Path, config: dict[str, Any]
    ) -> None:
        """Write each ConfigMap volume's items under ``pod_dir`` (a missing ConfigMap or key
        fails the launch, as a kubelet would never start the container) and point the
        worker's ``earlyExits.rampsFile`` inside a mount at the written file."""
        mounts = {m["name"]: m["mountPath"] for m in body["spec"]["containers"][0]["volumeMounts"]}
        for volume in body["spec"]["volumes"]:
            if "configMap" not in volume:
                continue
            source = volume["configMap"]
            found = await self.api.get("v1", "configmaps", self.namespace, source["name"])
            local = pod_dir / volume["name"]
            local.mkdir(exist_ok=True)
            for item in source["items"]:
                if item["key"] in found.get("binaryData", {}):
                    data = base64.b64decode(found["binaryData"][item["key"]])
                else:
                    data = found["data"][item["key"]].encode()
                (local / item["path"]).write_bytes(data)
            exits = config.get("earlyExits", {})
            mount = mounts[volume["name"]]
            if exits.get("rampsFile", "").startswith(mount + "/"):
                exits["rampsFile"] = str(local) + exits["rampsFile"][len(mount) :]

    async def _launch(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        name = meta["name"]
        container = body["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        secret_name = next(
            v["secret"]["secretName"] for v in body["spec"]["volumes"] if "secret" in v
        )
        secret = await self.api.get("v1", "secrets", self.namespace, secret_name)
        token = base64.b64decode(secret["data"][builders.TOKEN_KEY]).decode()
        ip = next(self._addresses)
        pod_dir = self.workdir / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        token_path = pod_dir / "token"
        token_path.write_text(token)
        config = json.loads(meta["annotations"][builders.ANNOTATION_CONFIG])
        await self._mount_config_maps(body, pod_dir, config)
        config.update(
            host=ip,
            ports={"http": ports["http"], "control": ports["control"]},
            tokenFile=str(token_path),
        )
        config_path = pod_dir / "config.json"
        config_path.write_text(json.dumps(config))
        probe = container["readinessProbe"]["httpGet"]
        assert probe["port"] == "http", probe
        log_path = pod_dir / "worker.log"
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "worldmesh_worker", "--config", str(config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k != "WORLDMESH_TOKEN"},
            )
        running = RunningPod(
            name,
            meta["uid"],
            ip,
            ports["http"],
            ports["control"],
            process,
            log_path,
            probe["path"],
            container.get("terminationMessagePolicy", "File"),
        )
        self.pods[name] = running
        self.history.append(running)
        await self._report(
            running,
            {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "False"}],
            },
        )

    async def _check(self, pod: RunningPod) -> None:
        code = pod.process.poll()
        if code is not None:
            if not pod.reported_exit:
                pod.reported_exit = True
                self.pods.pop(pod.name, None)
                await self._report(
                    pod,
                    {
                        "phase": "Failed",
                        "conditions": [{"type": "Ready", "status": "False"}],
                        "containerStatuses": [
                            {
                                "name": "worker",
                                "ready": False,
                                "state": {
                                    "terminated": {
                                        "exitCode": code,
                                        "reason": "Error",
                                        "message": pod.termination_message(code),
                                    }
                                },
                            }
                        ],
                    },
                )
            return
        now = asyncio.get_running_loop().time()
        if now - pod.probed_at < self.probe_period_s:
            return
        pod.probed_at = now
        assert self._session is not None
        try:  # the pod's own readinessProbe path
            async with self._session.get(pod.http_url + pod.readiness_path) as response:
                ready = response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ready = False
        if ready != pod.ready:
            pod.ready = ready
            status = "True" if ready else "False"
            await self._report(pod, {"conditions": [{"type": "Ready", "status": status}]})

    async def _report(self, pod: RunningPod, status: dict[str, Any]) -> None:
        with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to report on
            await self.api.patch("v1", "pods", self.namespace, pod.name, {"status": status})

    @staticmethod
    async def _terminate(pod: RunningPod, grace_s: float) -> None:
        process = pod.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 10)
