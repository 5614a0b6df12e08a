"""``KubernetesRuntime``: one deployment's workers as pods; the LocalRuntime's twin.

Observing lists the deployment's pods (label ``worldmesh.io/deployment``) and asks each
running pod's control API (``http://<pod IP>:<controlPort>``, bearer token from the
deployment's Secret) for its status, bounded by ``answer_timeout_s``. A pod is:

- STOPPING once it has a ``deletionTimestamp`` (SIGTERM sent: it drains, then exits);
- DEAD when its phase is Failed/Succeeded, or when it answered before (or was Ready) and
  its control port now refuses (the worker is gone), or it has not answered for
  ``busy_limit_s`` (wedged); silent for less, it is busy with its own work, or frozen: its
  peers' heartbeats tell (a frozen worker's worlds break, and the reconciler stops it);
- STARTING while it has no IP or has never answered (the model may still be loading);
- else READY / DRAINING / DRAINED from the worker's own status, worlds included.

Applying: StartWorker creates a pod (``builders.build_worker_pod``, owned by the
ModelDeployment); DrainWorker asks the control API (a pod that never answered is deleted at
once, it served nothing); StopWorker deletes the pod (grace period 0 for a DEAD one: a
frozen worker never handles SIGTERM; else the pod's, during which SIGTERM drains it);
OpenWorld/CloseWorld go to both ends' control APIs (``WorkerRuntime``, as for processes).
``ensure_objects`` creates
the token Secret and both Services if absent and reads the token back, so a restarted
operator adopts what exists rather than rotating the token under running workers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from worldmesh_worker.control import ControlClient

from .. import builders
from ..reconciler import Observed, ObservedWorker, WorkerState
from ..spec import DeploymentSpec
from .base import Target, WorkerRuntime, merge_worlds
from .kube_client import KubeClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Peer:
    """A pod as ``connect`` sees a worker (``control.Peer``): id, stage, device, control."""

    worker: str
    stage: int
    device: str
    control: ControlClient


class KubernetesRuntime(WorkerRuntime):
    def __init__(
        self,
        api: KubeClient,
        spec: Callable[[], DeploymentSpec],
        owner: dict[str, Any],
        image: str,
        *,
        pull_policy: str = "IfNotPresent",
        answer_timeout_s: float = 2.0,
        busy_limit_s: float = 10.0,
    ) -> None:
        """``spec()`` gives the deployment's current spec; ``owner`` is the CR body (uid)."""
        super().__init__(answer_timeout_s, busy_limit_s)
        self.api = api
        self.spec = spec
        self.owner = owner
        self.image = image
        self.pull_policy = pull_policy
        self.token: str | None = None
        self.pods: dict[str, dict[str, Any]] = {}  # the last observation, by worker id
        #: The front workers' early-exit state (``earlyExits`` of their control status).
        self._answered: set[str] = set()
        self._dead: set[str] = set()  #: workers the last observe() found dead
        self._refused: set[str] = set()  #: workers whose control port refused the last call
        self._last: dict[str, dict[str, Any]] = {}  #: each worker's last status
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        await super().close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- owned objects ----------------------------------------------------------------

    async def ensure_objects(self) -> None:
        """Create the token Secret and the Services if absent; adopt the existing token."""
        spec = self.spec()
        name = builders.token_secret_name(spec)
        secret = builders.build_token_secret(spec, secrets.token_urlsafe(32), self.owner)
        await self.api.create_if_absent("secrets", secret)
        current = await self.api.get("v1", "secrets", spec.namespace, name)
        self.token = base64.b64decode(current["data"][builders.TOKEN_KEY]).decode()
        await self.api.create_if_absent("services", builders.build_front_service(spec, self.owner))
        await self.api.create_if_absent(
            "services", builders.build_peer_headless_service(spec, self.owner)
        )

    async def delete_objects(self) -> None:
        """Delete the Services and the Secret now (the garbage collector would, later)."""
        spec = self.spec()
        for plural, name in (
            ("services", builders.front_service_name(spec)),
            ("services", builders.peer_service_name(spec)),
            ("secrets", builders.token_secret_name(spec)),
        ):
            await self.api.delete("v1", plural, spec.namespace, name)

    # -- observe -----------------------------------------------------------------------

    async def observe(self) -> Observed:
        spec = self.spec()
        pods = await self.api.list(
            "v1",
            "pods",
            spec.namespace,
            builders.selector_string(builders.worker_selector(spec)),
        )
        self.pods = {p["metadata"]["name"]: p for p in pods}
        statuses = await asyncio.gather(*(self._status(p) for p in pods))
        workers: list[ObservedWorker] = []
        self.failures = []
        dead: set[str] = set()
        for pod, status in zip(pods, statuses, strict=True):
            meta = pod["metadata"]
            annotations = meta.get("annotations") or {}
            state = self._state(pod, status)
            if state is WorkerState.DEAD:
                self.failures.append(_failure(pod))
                dead.add(meta["name"])
            workers.append(
                ObservedWorker(
                    meta["name"],
                    int(meta["labels"][builders.LABEL_STAGE]),
                    state,
                    annotations.get(builders.ANNOTATION_CONFIG_HASH, ""),
                    annotations.get(builders.ANNOTATION_LAYOUT, ""),
                    _timestamp(meta.get("creationTimestamp")),
                )
            )
        self._answered &= set(self.pods)
        self._dead = dead
        for gone in set(self._last) - set(self.pods):
            self._last.pop(gone, None)
            self._refused.discard(gone)
        self.keep_clocks(self.pods)
        self.early_exits = {
            pod["metadata"]["name"]: status["earlyExits"]
            for pod, status in zip(pods, statuses, strict=True)
            if status
            and pod["metadata"]["labels"][builders.LABEL_STAGE] == "0"
            and "ramps" in (status.get("earlyExits") or {})
        }
        return Observed(tuple(workers), merge_worlds(statuses))

    async def _status(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        if _gone(pod) or not pod.get("status", {}).get("podIP"):
            return None
        name = pod["metadata"]["name"]
        try:
            status = await asyncio.wait_for(self._control(pod).status(), self.answer_timeout_s)
        except TimeoutError:
            return None  # busy with its own work, or frozen: _state tells them apart
        except (aiohttp.ClientError, OSError, ValueError, RuntimeError):
            self._refused.add(name)  # nothing answers on its port: the worker is gone
            return None
        self._answered.add(name)
        self._refused.discard(name)
        self.heard(name)
        self._last[name] = status
        return status

    def _state(self, pod: dict[str, Any], status: dict[str, Any] | None) -> WorkerState:
        if pod["metadata"].get("deletionTimestamp"):
            return WorkerState.STOPPING
        if _gone(pod):
            return WorkerState.DEAD
        if status is None:
            name = pod["metadata"]["name"]
            if not (name in self._answered or _condition(pod, "Ready")):
                return WorkerState.STARTING
            if name in self._refused:
                return WorkerState.DEAD  # it served, and its port is closed: gone
            # It served and does not answer in time: busy with its own work, or frozen. A
            # frozen one's peers see its heartbeats stop (the reconciler then stops it);
            # a busy one keeps beating, and is dead only after ``busy_limit_s`` of silence.
            if self.silent_too_long(name):
                return WorkerState.DEAD
            status = self._last.get(name) or {}
        if status.get("draining"):
            return WorkerState.DRAINED if status.get("drained") else WorkerState.DRAINING
        return WorkerState.READY

    # -- apply (``WorkerRuntime.apply`` calls these) -----------------------------------

    async def start_worker(self, stage: int, worker_id: str) -> None:
        spec = self.spec()
        pod = builders.build_worker_pod(
            spec,
            stage,
            worker_id,
            self.image,
            builders.token_secret_name(spec),
            self.owner,
            pull_policy=self.pull_policy,
        )
        await self.api.create("pods", pod)

    async def drain_worker(self, worker_id: str) -> None:
        if worker_id not in self._answered:
            await self._delete(worker_id, 0)  # never served: nothing to drain
        else:
            await self._control(self.pods[worker_id]).drain(wait=0)

    async def stop_worker(self, worker_id: str) -> None:
        # A dead or frozen worker never handles SIGTERM: a grace period would only keep
        # its pod (its name, address and the stage's slot) for nothing.
        stopped = self.pods.get(worker_id)
        dead = (
            stopped is None
            or _gone(stopped)
            or worker_id not in self._answered
            or worker_id in self._dead
            or self.silent(worker_id)  # judged frozen by its peers' worlds
        )
        await self._delete(worker_id, 0 if dead else None)

    def targets(self) -> list[Target]:
        """The pods of the last observation that run, have an IP and are not being deleted."""
        port = self.spec().ports.http
        return [
            (name, int(pod["metadata"]["labels"][builders.LABEL_STAGE]), f"http://{ip}:{port}")
            for name, pod in self.pods.items()
            if (ip := pod.get("status", {}).get("podIP"))
            and not pod["metadata"].get("deletionTimestamp")
            and pod.get("status", {}).get("phase") == "Running"
        ]

    async def _delete(self, worker_id: str, grace_period_s: int | None) -> None:
        await self.api.delete("v1", "pods", self.spec().namespace, worker_id, grace_period_s)
        self._answered.discard(worker_id)

    def peer(self, worker_id: str) -> _Peer:
        pod = self.pods.get(worker_id)
        if pod is None or worker_id not in self._answered:
            raise RuntimeError(f"worker {worker_id} is not serving")
        stage = int(pod["metadata"]["labels"][builders.LABEL_STAGE])
        gpus = self.spec().stages[stage].resources.gpus if stage < len(self.spec().stages) else 0
        return _Peer(worker_id, stage, "cuda" if gpus else "cpu", self._control(pod))

    def reachable(self, worker_id: str) -> ControlClient | None:
        pod = self.pods.get(worker_id)
        if pod is None or worker_id not in self._answered or _gone(pod):
            return None
        return self._control(pod)

    def _control(self, pod: dict[str, Any]) -> ControlClient:
        if self.token is None:
            raise RuntimeError("no control token yet: ensure_objects() first")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        ip = pod["status"]["podIP"]
        return ControlClient(self._session, f"http://{ip}:{self.spec().ports.control}", self.token)

    def endpoint_ready(self) -> bool:
        """Whether some front-stage pod is Ready (the Service has an endpoint)."""
        return any(
            p["metadata"]["labels"].get(builders.LABEL_STAGE) == "0" and _condition(p, "Ready")
            for p in self.pods.values()
        )


def _gone(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Failed", "Succeeded")


def _condition(pod: dict[str, Any], kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions") or []
    )


def _failure(pod: dict[str, Any]) -> str:
    status = pod.get("status", {})
    reason = status.get("reason") or status.get("message") or ""
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            reason = (
                reason or f"exit code {terminated.get('exitCode')} ({terminated.get('reason')})"
            )
            # The termination message (the log's tail): its last line says why, usually.
            last = [line for line in (terminated.get("message") or "").splitlines() if line]
            if last:
                reason += f": {last[-1][:300]}"
    phase = status.get("phase", "Running")
    return f"worker {pod['metadata']['name']} failed ({phase}{': ' + reason if reason else ''})"


def _timestamp(value: str | None) -> float:
    if not value:
        return 0.0
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0
