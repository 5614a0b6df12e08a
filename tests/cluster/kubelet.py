"""A test kubelet: one Node of the real control plane whose pods run as local processes.

It does what a kubelet does, against the API server, as ``system:node:<name>`` (the Node
authorizer lets it read only what its own pods use):

- registers its Node (Ready, with cpu/memory/pods capacity) and renews its Lease in
  ``kube-node-lease``, so the scheduler binds pods to it and the node controller keeps it;
- runs every pod bound to it: its own loopback address ``127.N.x.y`` is the pod IP; its
  volumes are written under the pod's folder (Secrets, ConfigMaps, downward API, emptyDir,
  and the projected service-account token, requested through the TokenRequest API and
  bound to the pod) and bind-mounted at their ``mountPath`` in a mount namespace of the
  container's own (``unshare --mount``, as root); env with ``fieldRef`` and ``$(VAR)``
  expansion, and ``KUBERNETES_SERVICE_HOST/PORT`` pointing at the API server;
- an image is a local command (``images``: repository -> argv prefix; a container's
  ``command`` replaces it, as an image's ENTRYPOINT is replaced);
- writes pod status through ``pods/status``: IP, phase, conditions (Ready from the pod's
  own readinessProbe, gated by its startupProbe), container state and restart count;
- restarts a container whose livenessProbe fails ``failureThreshold`` times, or that
  exits, as ``restartPolicy`` says (with the kubelet's back-off, the first at once, then 10 s doubling to 5 min);
- finalises a deleted pod: SIGTERM, the deletion's grace period, SIGKILL, terminated
  status, then delete with grace 0 (the pod leaves the API only then). A pod that
  vanished from the API at once (deleted with grace 0) is killed the same way with the
  kubelet's minimum grace of 2 s.

It runs in a thread with an event loop of its own, so it keeps going while a test's loop
is busy or blocked. Everything is polled with deadlines; nothing binds outside loopback.
Not done (no test here needs it): init containers, more than one container per pod,
exec or TCP probes, image pulls, resource enforcement, ``runAsUser``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import itertools
import logging
import os
import random
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from worldmesh_operator.runtime.kube_client import ApiError, Conflict, KubeClient, NotFound

log = logging.getLogger(__name__)

BACKOFF_S = (10.0, 300.0)  #: a kubelet's crash back-off: first delay, cap
MIN_GRACE_S = 2.0  #: a kubelet never kills with less
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_addresses(network: int) -> Iterator[str]:
    """127.N.0.1, 127.N.0.2, ... 127.N.0.254, 127.N.1.1, ... (all of 127/8 is loopback;
    a kubelet of its own ``network`` N keeps two test sessions on one machine apart)."""
    for b, c in itertools.product(range(0, 256), range(1, 255)):
        yield f"127.{network}.{b}.{c}"


@dataclass
class Probe:
    """One httpGet probe of a container, with the kubelet's counting."""

    path: str
    port: int
    period_s: float
    timeout_s: float
    failures_allowed: int
    initial_delay_s: float
    next_at: float = 0.0
    failures: int = 0
    successes: int = 0

    @classmethod
    def of(cls, spec: dict[str, Any] | None, ports: dict[str, int]) -> Probe | None:
        if not spec:
            return None
        get = spec.get("httpGet")
        if get is None:
            raise ValueError(f"only httpGet probes are supported: {spec}")
        port = get["port"]
        return cls(
            get.get("path", "/"),
            ports[port] if isinstance(port, str) else int(port),
            float(spec.get("periodSeconds", 10)),
            float(spec.get("timeoutSeconds", 1)),
            int(spec.get("failureThreshold", 3)),
            float(spec.get("initialDelaySeconds", 0)),
        )


@dataclass
class Container:
    """The running container of a pod (its one process) and its probes."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    readiness: Probe | None
    liveness: Probe | None
    startup: Probe | None
    process: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    started_mono: float = 0.0
    restarts: int = 0
    restart_at: float = 0.0  #: when a crashed container may start again
    last_exit: dict[str, Any] | None = None
    ready: bool = False
    started: bool = False  #: its startupProbe succeeded (or it has none)
    killing: bool = False  #: a failed probe's kill is under way


@dataclass
class RunningPod:
    name: str
    namespace: str
    uid: str
    ip: str
    body: dict[str, Any]
    folder: Path
    container: Container
    ports: dict[str, int]
    deleting_since: float | None = None
    finished: bool = False
    pids: list[int] = field(default_factory=list)  #: every process it ever ran

    @property
    def pid(self) -> int:
        assert self.container.process is not None
        return self.container.process.pid

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.container.process is not None
        return self.container.process

    def url(self, port: str = "http") -> str:
        return f"http://{self.ip}:{self.ports[port]}"

    @property
    def http_url(self) -> str:
        return self.url("http")

    @property
    def log_path(self) -> Path:
        return self.container.log_path


@dataclass
class Kubelet:
    kubeconfig: Path
    api_url: str  #: https://127.0.0.1:PORT: KUBERNETES_SERVICE_HOST/PORT of the pods
    ca_file: Path
    workdir: Path
    images: dict[str, list[str]]  #: image repository (no tag) -> argv prefix
    node_name: str
    capacity: dict[str, str] = field(
        default_factory=lambda: {"cpu": "64", "memory": "128Gi", "pods": "200"}
    )
    interval_s: float = 0.05
    lease_s: int = 40
    pods: dict[str, RunningPod] = field(default_factory=dict)  #: live, by namespace/name
    history: list[RunningPod] = field(default_factory=list)  #: every pod it ever ran
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._addresses = pod_addresses(random.randint(1, 254))
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the thread ----------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._main, name="kubelet", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"the kubelet did not register its node: {self.errors}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        for pod in self.history:  # never leave a process behind
            process = pod.container.process
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with await KubeClient.connect(self.kubeconfig, user_agent="test-kubelet") as api:
            self.api = api
            self._session = aiohttp.ClientSession()
            try:
                await self._register()
                self._started.set()
                next_lease = 0.0
                while not self._stop.is_set():
                    try:
                        if time.monotonic() >= next_lease:
                            await self._renew_lease()
                            next_lease = time.monotonic() + self.lease_s / 4
                        await self._sync()
                    except Exception as exc:  # an API hiccup: report, go on
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                        log.warning("kubelet sync failed: %s", exc, exc_info=True)
                    await asyncio.sleep(self.interval_s)
                await asyncio.gather(
                    *(self._kill(p, MIN_GRACE_S) for p in list(self.pods.values()))
                )
            finally:
                for task in self._tasks:
                    task.cancel()
                await self._session.close()

    # -- the node ------------------------------------------------------------------------

    async def _register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux"},
            },
        }
        with contextlib.suppress(Conflict):
            await self.api.create("nodes", node)
        await self._node_status()
        with contextlib.suppress(Conflict):
            await self.api.create(
                "leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                    "spec": {
                        "holderIdentity": self.node_name,
                        "leaseDurationSeconds": self.lease_s,
                    },
                },
            )

    async def _node_status(self) -> None:
        stamp = now()
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "test kubelet is posting ready status",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        await self.api.patch(
            "v1",
            "nodes",
            None,
            self.node_name,
            {
                "status": {
                    "capacity": self.capacity,
                    "allocatable": self.capacity,
                    "conditions": [condition],
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": self.node_name},
                    ],
                    "nodeInfo": {"kubeletVersion": "v1.36.2-test", "operatingSystem": "linux"},
                }
            },
            subresource="status",
        )

    async def _renew_lease(self) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await self.api.patch(
            "coordination.k8s.io/v1",
            "leases",
            "kube-node-lease",
            self.node_name,
            {"spec": {"renewTime": stamp, "holderIdentity": self.node_name}},
        )

    # -- pods ----------------------------------------------------------------------------

    async def _sync(self) -> None:
        listed = await self.api.list(
            "v1", "pods", None, field_selector=f"spec.nodeName={self.node_name}"
        )
        present = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in listed}
        for key, pod in list(self.pods.items()):
            body = present.get(key)
            if pod.deleting_since is not None:
                continue  # being finalised
            if body is None or body["metadata"]["uid"] != pod.uid:
                # Gone from the API without us (deleted with grace 0): kill it all the same.
                pod.deleting_since = time.monotonic()
                self._spawn_task(self._finalize(pod, MIN_GRACE_S, delete=False))
            elif body["metadata"].get("deletionTimestamp"):
                grace = float(body["metadata"].get("deletionGracePeriodSeconds") or 0)
                pod.deleting_since = time.monotonic()
                self._spawn_task(self._finalize(pod, max(grace, MIN_GRACE_S), delete=True))
            else:
                pod.body = body
        for key, body in present.items():
            phase = (body.get("status") or {}).get("phase")
            if key in self.pods or phase in ("Failed", "Succeeded"):
                if phase in ("Failed", "Succeeded") and body["metadata"].get(
                    "deletionTimestamp"
                ):  # finished, then deleted: nothing runs, let it go
                    await self._delete_now(body)
                continue
            if body["metadata"].get("deletionTimestamp"):
                await self._delete_now(body)  # deleted before it ever ran
                continue
            try:
                await self._launch(body)
            except Exception as exc:  # a missing Secret or ConfigMap: retried, as a kubelet
                self.errors.append(f"{key}: {type(exc).__name__}: {exc}")
                await self._report_waiting(body, "CreateContainerConfigError", str(exc))
        await asyncio.gather(
            *(self._check(p) for p in list(self.pods.values()) if p.deleting_since is None)
        )

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, body: dict[str, Any]) -> None:
        meta, spec = body["metadata"], body["spec"]
        key = f"{meta['namespace']}/{meta['name']}"
        if len(spec["containers"]) != 1:
            raise ValueError("the test kubelet runs pods of one container")
        container = spec["containers"][0]
        ip = next(self._addresses)
        folder = self.workdir / meta["namespace"] / f"{meta['name']}-{meta['uid'][:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        mounts = await self._volumes(body, folder, ip)
        ports = {
            p.get("name", str(p["containerPort"])): p["containerPort"]
            for p in container.get("ports", [])
        }
        env = await self._env(body, container, ip)
        image = (
            container["image"].rsplit(":", 1)[0]
            if "@" not in container["image"]
            else container["image"].split("@")[0]
        )
        if image not in self.images and not container.get("command"):
            raise ValueError(f"image {container['image']!r} is not known to the test kubelet")
        argv = [_expand(a, env) for a in (container.get("command") or self.images[image])]
        argv += [_expand(a, env) for a in container.get("args", [])]
        script = ["set -e"]
        # A mount over a folder above the kubelet's own (an emptyDir at /tmp) hides every
        # later source: those go last.
        mounts.sort(key=lambda m: self.workdir.is_relative_to(m[1]))
        for source, target, read_only in mounts:
            script.append(f"mkdir -p {shlex.quote(target)}")
            script.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        script.append('exec "$@"')
        wrapped = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            "\n".join(script),
            "sh",
            *argv,
        ]
        running = RunningPod(
            meta["name"],
            meta["namespace"],
            meta["uid"],
            ip,
            body,
            folder,
            Container(
                wrapped,
                env,
                folder / "container.log",
                Probe.of(container.get("readinessProbe"), ports),
                Probe.of(container.get("livenessProbe"), ports),
                Probe.of(container.get("startupProbe"), ports),
            ),
            ports,
        )
        self.pods[key] = running
        self.history.append(running)
        self._start_container(running)
        await self._report(running)

    def _start_container(self, pod: RunningPod) -> None:
        c = pod.container
        with c.log_path.open("ab") as out:
            c.process = subprocess.Popen(
                c.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=c.env,
                cwd=pod.folder,
                start_new_session=True,
            )
        pod.pids.append(c.process.pid)
        c.started_at, c.started_mono = now(), time.monotonic()
        c.ready, c.started, c.killing = False, c.startup is None, False
        for probe in (c.readiness, c.liveness, c.startup):
            if probe is not None:
                probe.next_at = c.started_mono + probe.initial_delay_s
                probe.failures = probe.successes = 0

    # -- volumes and env -------------------------------------------------------------------

    async def _volumes(
        self, body: dict[str, Any], folder: Path, ip: str
    ) -> list[tuple[Path, str, bool]]:
        """Write every volume the container mounts; (source, mountPath, readOnly)."""
        meta, spec = body["metadata"], body["spec"]
        ns = meta["namespace"]
        written: dict[str, Path] = {}
        for volume in spec.get("volumes", []):
            target = folder / "volumes" / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            files: dict[str, tuple[bytes, int]] = {}
            mode = 0o644
            if "secret" in volume:
                source = volume["secret"]
                mode = source.get("defaultMode", mode)
                secret = await self.api.get("v1", "secrets", ns, source["secretName"])
                data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
                files.update(_items(data, source.get("items"), mode, source["secretName"]))
            elif "configMap" in volume:
                source = volume["configMap"]
                mode = source.get("defaultMode", mode)
                files.update(
                    _items(
                        await self._config_map(ns, source["name"]),
                        source.get("items"),
                        mode,
                        source["name"],
                    )
                )
            elif "downwardAPI" in volume:
                source = volume["downwardAPI"]
                for item in source["items"]:
                    value = _field(body, item["fieldRef"]["fieldPath"], ip)
                    files[item["path"]] = (
                        value.encode(),
                        item.get("mode", source.get("defaultMode", mode)),
                    )
            elif "projected" in volume:
                source = volume["projected"]
                mode = source.get("defaultMode", mode)
                for part in source["sources"]:
                    if "serviceAccountToken" in part:
                        token = await self._token(body, part["serviceAccountToken"])
                        files[part["serviceAccountToken"]["path"]] = (token.encode(), mode)
                    elif "configMap" in part:
                        cm = part["configMap"]
                        try:
                            found = await self._config_map(ns, cm["name"])
                        except NotFound:
                            if cm.get("optional"):
                                continue  # an optional source that does not exist: skipped
                            raise
                        files.update(_items(found, cm.get("items"), mode, cm["name"]))
                    elif "downwardAPI" in part:
                        for item in part["downwardAPI"]["items"]:
                            value = _field(body, item["fieldRef"]["fieldPath"], ip)
                            files[item["path"]] = (value.encode(), mode)
            elif "emptyDir" not in volume:
                raise ValueError(f"volume {volume['name']}: a kind the test kubelet lacks")
            for path, (data, file_mode) in files.items():
                out = target / path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
                out.chmod(file_mode)
            written[volume["name"]] = target
        container = spec["containers"][0]
        return [
            (written[m["name"]], m["mountPath"], bool(m.get("readOnly")))
            for m in container.get("volumeMounts", [])
        ]

    async def _config_map(self, namespace: str, name: str) -> dict[str, bytes]:
        found = await self.api.get("v1", "configmaps", namespace, name)
        data = {k: v.encode() for k, v in (found.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (found.get("binaryData") or {}).items()})
        return data

    async def _token(self, body: dict[str, Any], source: dict[str, Any]) -> str:
        """A token of the pod's service account bound to the pod (TokenRequest API)."""
        meta = body["metadata"]
        account = body["spec"].get("serviceAccountName", "default")
        request: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": int(source.get("expirationSeconds", 3607)),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        if source.get("audience"):
            request["spec"]["audiences"] = [source["audience"]]
        answer = await self.api.request(
            "POST",
            f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
            request,
        )
        return str(answer["status"]["token"])

    async def _env(
        self, body: dict[str, Any], container: dict[str, Any], ip: str
    ) -> dict[str, str]:
        host, _, port = self.api_url.removeprefix("https://").rpartition(":")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.workdir)),
            "HOSTNAME": body["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "PYTHONUNBUFFERED": "1",
        }
        # What the "image" needs of the test machine (the venv's torch threads, caches).
        for name in ("WORLDMESH_CACHE", "VIRTUAL_ENV", "OMP_NUM_THREADS", "PYTHONPATH"):
            if name in os.environ:
                env[name] = os.environ[name]
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = _expand(item["value"], env)
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = _field(body, item["valueFrom"]["fieldRef"]["fieldPath"], ip)
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = await self.api.get(
                    "v1", "secrets", body["metadata"]["namespace"], ref["name"]
                )
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    # -- probes, exits, status -------------------------------------------------------------

    async def _check(self, pod: RunningPod) -> None:
        c = pod.container
        changed = False
        if c.process is None:  # waiting out a back-off
            if time.monotonic() >= c.restart_at:
                self._start_container(pod)
                changed = True
        elif (code := c.process.poll()) is not None:
            c.last_exit = {
                "exitCode": code if code >= 0 else 128 - code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": now(),
                "message": _termination_message(pod, code),
            }
            c.process, c.ready = None, False
            policy = pod.body["spec"].get("restartPolicy", "Always")
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                c.restarts += 1
                c.restart_at = time.monotonic() + _backoff(c.restarts)
            else:
                pod.finished = True
                self.pods.pop(f"{pod.namespace}/{pod.name}", None)
            changed = True
        elif not c.killing:
            changed = await self._probe_all(pod)
        if changed:
            await self._report(pod)

    async def _probe_all(self, pod: RunningPod) -> bool:
        c = pod.container
        clock = time.monotonic()
        changed = False
        if not c.started and c.startup is not None and clock >= c.startup.next_at:
            ok = await self._probe(pod, c.startup)
            if ok:
                c.started = changed = True
            elif c.startup.failures >= c.startup.failures_allowed:
                await self._restart(pod, "startup probe failed")
                return True
        if not c.started:
            return changed
        if c.liveness is not None and clock >= c.liveness.next_at:
            await self._probe(pod, c.liveness)
            if c.liveness.failures >= c.liveness.failures_allowed:
                await self._restart(pod, "liveness probe failed")
                return True
        if c.readiness is None:
            if not c.ready:
                c.ready = changed = True
        elif clock >= c.readiness.next_at:
            ok = await self._probe(pod, c.readiness)
            ready = c.ready
            if ok:
                ready = True
            elif c.readiness.failures >= c.readiness.failures_allowed:
                ready = False
            if ready != c.ready:
                c.ready, changed = ready, True
        return changed

    async def _probe(self, pod: RunningPod, probe: Probe) -> bool:
        probe.next_at = time.monotonic() + probe.period_s
        try:
            async with self._session.get(
                f"http://{pod.ip}:{probe.port}{probe.path}",
                timeout=aiohttp.ClientTimeout(total=probe.timeout_s),
            ) as response:
                ok = 200 <= response.status < 400
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        probe.failures = 0 if ok else probe.failures + 1
        return ok

    async def _restart(self, pod: RunningPod, why: str) -> None:
        """Kill the container (its grace period, in a task: the other pods go on), then
        restart it as restartPolicy says (the next _check sees the exit)."""
        log.info("pod %s: %s, killing the container", pod.name, why)
        grace = float(pod.body["spec"].get("terminationGracePeriodSeconds", 30))
        pod.container.killing = True
        self._spawn_task(self._kill(pod, grace))

    async def _kill(self, pod: RunningPod, grace_s: float) -> None:
        process = pod.container.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, 10)

    async def _finalize(self, pod: RunningPod, grace_s: float, *, delete: bool) -> None:
        """A deleted pod: SIGTERM, its grace, SIGKILL, the final status, then delete with
        grace 0 (only then does it leave the API)."""
        await self._kill(pod, grace_s)
        self.pods.pop(f"{pod.namespace}/{pod.name}", None)
        if delete:
            with contextlib.suppress(ApiError):
                await self._report(pod)
            await self._delete_now(pod.body)

    async def _delete_now(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        with contextlib.suppress(NotFound, Conflict):
            await self.api.request(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]},
                },
            )

    async def _report(self, pod: RunningPod) -> None:
        c = pod.container
        if c.process is not None:
            state: dict[str, Any] = {"running": {"startedAt": c.started_at}}
        elif pod.finished or pod.deleting_since is not None:
            state = {"terminated": c.last_exit or {"exitCode": 137, "reason": "Error"}}
        else:
            state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off restarting the failed container",
                }
            }
        status_of = {True: "True", False: "False"}
        finished = pod.finished and c.last_exit is not None
        phase = (
            ("Succeeded" if c.last_exit and c.last_exit["exitCode"] == 0 else "Failed")
            if finished
            else "Running"
        )
        container_status = {
            "name": pod.body["spec"]["containers"][0]["name"],
            "image": pod.body["spec"]["containers"][0]["image"],
            "imageID": "",
            "containerID": f"test://{c.process.pid if c.process else 0}",
            "ready": c.ready,
            "started": c.process is not None and c.started,
            "restartCount": c.restarts,
            "state": state,
        }
        if c.last_exit is not None and not finished:
            container_status["lastState"] = {"terminated": c.last_exit}
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": c.started_at,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": status_of[c.ready]},
                {"type": "Ready", "status": status_of[c.ready]},
            ],
            "containerStatuses": [container_status],
        }
        with contextlib.suppress(NotFound):
            await self.api.patch(
                "v1", "pods", pod.namespace, pod.name, {"status": status}, subresource="status"
            )

    async def _report_waiting(self, body: dict[str, Any], reason: str, message: str) -> None:
        meta = body["metadata"]
        status = {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": body["spec"]["containers"][0]["name"],
                    "image": body["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": message[:500]}},
                }
            ],
        }
        with contextlib.suppress(NotFound):
            await self.api.patch(
                "v1",
                "pods",
                meta["namespace"],
                meta["name"],
                {"status": status},
                subresource="status",
            )

    # -- for tests -------------------------------------------------------------------------

    def pod(self, name: str, namespace: str = "default") -> RunningPod:
        return self.pods[f"{namespace}/{name}"]

    def log_of(self, name: str) -> str:
        for pod in reversed(self.history):
            if pod.name == name:
                return pod.log_path.read_text(errors="replace")[-3000:]
        return ""


def _backoff(restarts: int) -> float:
    """The wait before restart number ``restarts``: none for the first, then 10 s doubling."""
    return 0.0 if restarts <= 1 else min(BACKOFF_S[0] * 2 ** (restarts - 2), BACKOFF_S[1])


def _items(
    data: dict[str, bytes], items: list[dict[str, Any]] | None, mode: int, source: str
) -> dict[str, tuple[bytes, int]]:
    """A Secret's or ConfigMap's keys as files: every key, or the ``items`` named (a
    missing key fails the pod's start, as a kubelet's does)."""
    if items is None:
        return {k: (v, mode) for k, v in data.items()}
    out = {}
    for item in items:
        if item["key"] not in data:
            raise KeyError(f"{source} has no key {item['key']!r}")
        out[item["path"]] = (data[item["key"]], item.get("mode", mode))
    return out


def _field(body: dict[str, Any], path: str, ip: str) -> str:
    """A downward API ``fieldPath``'s value."""
    meta = body["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": body["spec"].get("nodeName", ""),
        "spec.serviceAccountName": body["spec"].get("serviceAccountName", ""),
        "status.podIP": ip,
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ValueError(f"fieldPath {path!r}: not known to the test kubelet")


def _expand(value: str, env: dict[str, str]) -> str:
    """``$(VAR)`` references to defined variables, as a kubelet expands them; ``$$`` is $."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


def _termination_message(pod: RunningPod, code: int) -> str:
    """``FallbackToLogsOnError``: on a failure, the log's tail, at most 80 lines and 2 KiB."""
    policy = pod.body["spec"]["containers"][0].get("terminationMessagePolicy", "File")
    if code == 0 or policy != "FallbackToLogsOnError" or not pod.log_path.exists():
        return ""
    lines = pod.log_path.read_bytes().splitlines(keepends=True)[-80:]
    return b"".join(lines)[-2048:].decode(errors="replace")
