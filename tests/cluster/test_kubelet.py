"""The test kubelet behaves as a kubelet on the real control plane (a small HTTP server as
the container, pods/probe_server.py):

- its Node is Ready with capacity and its Lease in ``kube-node-lease`` is renewed; the
  scheduler binds pods to it;
- a pod runs on its own loopback address with a Secret, a ConfigMap, a downward API file
  and the projected service-account token mounted at their paths, env from fieldRefs
  and ``$(VAR)``, ``KUBERNETES_SERVICE_HOST/PORT``; its status says Running and Ready
  (from its readinessProbe) and the token is one the API server accepts;
- a failing livenessProbe restarts the container (restartCount 1, a new process);
- ``kubectl delete pod``: SIGTERM, the pod leaves the API once the process exited; a
  process that ignores SIGTERM (stopped) is killed when its grace period ends.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from worldmesh_operator.runtime.kube_client import KubeClient, NotFound
from worldmesh_worker.control import wait_until

from .conftest import Kubectl
from .controlplane import NODE_NAME, ControlPlane
from .kubelet import Kubelet
from .namespaces import create_namespace

SERVER = Path(__file__).parent / "pods" / "probe_server.py"
NS = "kubelet-test"


def pod(name: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "worldmesh-test/python:1",
        "args": [str(SERVER)],
        "ports": [{"name": "web", "containerPort": 8000}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "value": "hello from $(POD_IP)"},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "web"}, "periodSeconds": 1},
        **spec.pop("container", {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "annotations": {"note": "from the API"}},
        "spec": {"containers": [container], **spec},
    }


@pytest.fixture
async def ns(admin: KubeClient, kubelet: Kubelet) -> AsyncIterator[str]:
    try:
        await admin.get("v1", "namespaces", None, NS)
    except NotFound:
        await create_namespace(admin, NS)
    yield NS
    for pod in await admin.list("v1", "pods", NS):  # their processes stop with them
        await admin.delete("v1", "pods", NS, pod["metadata"]["name"])


async def running(admin: KubeClient, name: str) -> dict[str, Any] | None:
    body = await admin.get("v1", "pods", NS, name)
    ready = any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in body.get("status", {}).get("conditions", [])
    )
    return body if ready else None


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def test_node_is_ready_and_its_lease_renewed(admin: KubeClient, kubelet: Kubelet) -> None:
    node = await admin.get("v1", "nodes", None, NODE_NAME)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True" and node["status"]["allocatable"]["cpu"] == "64"
    first = (await admin.get("coordination.k8s.io/v1", "leases", "kube-node-lease", NODE_NAME))[
        "spec"
    ]["renewTime"]

    async def renewed() -> bool:
        lease = await admin.get("coordination.k8s.io/v1", "leases", "kube-node-lease", NODE_NAME)
        return bool(lease["spec"]["renewTime"] != first)

    await wait_until(renewed, kubelet.lease_s, "the Lease renewed", interval=0.5)


async def test_pod_runs_with_its_volumes_env_and_readiness(
    admin: KubeClient, kubelet: Kubelet, ns: str, control_plane: ControlPlane
) -> None:
    await admin.create(
        "secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": ns},
         "data": {"password": base64.b64encode(b"p4ss").decode()}},
    )  # fmt: skip
    await admin.create(
        "configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": ns},
         "data": {"settings.yaml": "a: 1\n"}},
    )  # fmt: skip
    body = pod(
        "volumes",
        container={
            "volumeMounts": [
                {"name": "secret", "mountPath": "/var/run/test-kubelet/secret", "readOnly": True},
                {"name": "config", "mountPath": "/etc/test-kubelet/config"},
                {"name": "info", "mountPath": "/etc/test-kubelet/info"},
            ]
        },
        volumes=[
            {"name": "secret", "secret": {"secretName": "s"}},
            {"name": "config", "configMap": {"name": "c"}},
            {"name": "info", "downwardAPI": {"items": [
                {"path": "note", "fieldRef": {"fieldPath": "metadata.annotations['note']"}}]}},
        ],
    )  # fmt: skip
    await admin.create("pods", body)
    got = await wait_until(lambda: running(admin, "volumes"), 30, "the pod Ready", interval=0.2)
    assert got["spec"]["nodeName"] == NODE_NAME  # bound by the real scheduler
    ip = got["status"]["podIP"]
    assert ip.startswith("127.") and ip != "127.0.0.1"
    state = got["status"]["containerStatuses"][0]
    assert state["ready"] and "running" in state["state"] and state["restartCount"] == 0
    base = f"http://{ip}:8000"
    assert await fetch(f"{base}/file/var/run/test-kubelet/secret/password") == (200, b"p4ss")
    assert await fetch(f"{base}/file/etc/test-kubelet/config/settings.yaml") == (200, b"a: 1\n")
    assert await fetch(f"{base}/file/etc/test-kubelet/info/note") == (200, b"from the API")
    assert await fetch(f"{base}/env/GREETING") == (200, f"hello from {ip}".encode())
    host = (await fetch(f"{base}/env/KUBERNETES_SERVICE_HOST"))[1].decode()
    port = (await fetch(f"{base}/env/KUBERNETES_SERVICE_PORT"))[1].decode()
    assert f"https://{host}:{port}" == control_plane.url
    # The ServiceAccount admission plugin added the projected token volume: the token is
    # bound to this pod, and the API server authenticates it (403, not 401: no RBAC).
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    code, token = await fetch(f"{base}/file{sa}/token")
    assert code == 200
    assert (await fetch(f"{base}/file{sa}/namespace")) == (200, ns.encode())
    assert (await fetch(f"{base}/file{sa}/ca.crt"))[1] == control_plane.ca_file.read_bytes()
    request = urllib.request.Request(
        f"{control_plane.url}/api/v1/namespaces/kube-system/secrets",
        headers={"Authorization": f"Bearer {token.decode()}"},
    )
    context = ssl.create_default_context(cafile=str(control_plane.ca_file))
    with pytest.raises(urllib.error.HTTPError) as denied:
        await asyncio.to_thread(urllib.request.urlopen, request, context=context, timeout=10)
    assert denied.value.code == 403
    assert f"system:serviceaccount:{ns}:default" in denied.value.read().decode()
    # Nothing was mounted on this machine outside the container's own mount namespace.
    assert not os.path.exists("/var/run/test-kubelet/secret/password")


async def test_failing_liveness_probe_restarts_the_container(
    admin: KubeClient, kubelet: Kubelet, ns: str
) -> None:
    probe = {"httpGet": {"path": "/healthz", "port": "web"}, "periodSeconds": 1,
             "failureThreshold": 2}  # fmt: skip
    await admin.create("pods", pod("liveness", container={"livenessProbe": probe}))
    got = await wait_until(lambda: running(admin, "liveness"), 30, "the pod Ready", interval=0.2)
    first = kubelet.pod("liveness", ns).pid
    assert (await fetch(f"http://{got['status']['podIP']}:8000/healthz/fail"))[0] == 500

    async def restarted() -> dict[str, Any] | None:
        body = await running(admin, "liveness")
        count = body["status"]["containerStatuses"][0]["restartCount"] if body else 0
        return body if count == 1 else None

    got = await wait_until(restarted, 30, "the container restarted", interval=0.2)
    assert kubelet.pod("liveness", ns).pid != first
    last = got["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 0  # it drained on SIGTERM


async def test_deleted_pod_gets_sigterm_and_a_stopped_one_is_killed_after_its_grace(
    admin: KubeClient, kubelet: Kubelet, ns: str, kubectl: Kubectl
) -> None:
    await admin.create("pods", pod("polite", terminationGracePeriodSeconds=30))
    await admin.create("pods", pod("frozen", terminationGracePeriodSeconds=3))
    for name in ("polite", "frozen"):
        await wait_until(lambda n=name: running(admin, n), 30, f"{name} Ready", interval=0.2)
    polite, frozen = kubelet.pod("polite", ns).process, kubelet.pod("frozen", ns).process

    started = time.monotonic()
    out = await asyncio.to_thread(kubectl, "delete", "pod", "polite", "-n", ns, "--wait=true")
    assert out.returncode == 0, out.stderr
    assert polite.returncode == 0  # SIGTERM, and it exited on its own
    assert time.monotonic() - started < 20

    os.kill(frozen.pid, signal.SIGSTOP)
    started = time.monotonic()
    out = await asyncio.to_thread(kubectl, "delete", "pod", "frozen", "-n", ns, "--wait=true")
    assert out.returncode == 0, out.stderr
    assert frozen.returncode == -signal.SIGKILL
    assert time.monotonic() - started >= 3  # its grace period, then SIGKILL
    for name in ("polite", "frozen"):
        with pytest.raises(NotFound):
            await admin.get("v1", "pods", ns, name)
