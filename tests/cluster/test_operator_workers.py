"""The operator with real workers: a test kubelet runs every pod as a worker process.

- A 3-stage ``toy`` ModelDeployment: the operator creates the pods, the scheduler binds
  them, the kubelet runs them on their own loopback addresses, the operator opens real
  worlds between neighbouring stages through the workers' control APIs, and requests to
  the front Service are answered (at a Ready pod behind it, as kube-proxy would route).
- Killing a middle-stage worker, then deleting a middle-stage pod, each under a closed
  loop: the operator replaces the pod, no other worker restarts (same pids) and no
  request fails; the deleted pod's worker drains on SIGTERM and exits 0.
- A frozen (SIGSTOPped) middle-stage worker under load: its pod is replaced, the other
  workers keep their pids, no request fails.
- A model that cannot load (the schema admits any ``module:function``): Degraded, with the
  worker's own error in the message.
- Early exits on, the ramps file in a ConfigMap that every worker mounts: the front
  worker's ramps (state, threshold, exit rate) reach ``status.earlyExits``.
"""

from __future__ import annotations

import base64
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import kopf

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_client import KubeClient
from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request

from .conftest import MD
from .kubelet import Kubelet
from .test_operator import pods_of, status_of

TIMEOUT = 60.0  # a deployment starting on a loaded 2-core machine


def free_port() -> int:
    """A port nothing listens on now (bound on every address, so no wildcard clash later)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def manifest(
    name: str, namespace: str, middle: tuple[int, int] = (2, 2), **spec: Any
) -> dict[str, Any]:
    """Three toy stages on free ports; the middle one runs ``middle`` = (min, max) workers."""
    low, high = middle
    body: dict[str, Any] = {
        "apiVersion": MD,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "toy", "splitPoints": [1, 3]},
            "port": free_port(),
            "controlPort": free_port(),
            "grpcPort": free_port(),
            "stages": [
                {"name": "front", "replicas": {"min": 1, "max": 1}},
                {"name": "middle", "replicas": {"min": low, "max": high}},
                {"name": "back", "replicas": {"min": 1, "max": 1}},
            ],
        },
    }
    body["spec"].update(spec)
    return body


async def service_url(api: KubeClient, namespace: str, service: str, port: str) -> str | None:
    """``http://IP:PORT`` of a Ready pod behind ``service``, as kube-proxy would route to it:
    the Service's selector, the pods' Ready condition, the named ``targetPort``. (Computed
    here: the API server refuses loopback addresses in EndpointSlices, so the controller
    manager cannot publish the test pods' 127.N.x.y.)"""
    spec = (await api.get("v1", "services", namespace, service))["spec"]
    target = next(p["targetPort"] for p in spec["ports"] if p.get("name") == port)
    selector = ",".join(f"{k}={v}" for k, v in spec["selector"].items())
    for pod in await api.list("v1", "pods", namespace, selector):
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )
        if not ready or pod["metadata"].get("deletionTimestamp"):
            continue
        ports = {p.get("name"): p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        return f"http://{pod['status']['podIP']}:{ports[target] if isinstance(target, str) else target}"
    return None


async def serving(api: KubeClient, name: str, namespace: str, workers: int) -> str | None:
    """The front Service's URL once the status is Ready with ``workers`` ready workers,
    and they are the deployment's pods now (no pod Terminating, the status not stale)."""
    status = await status_of(api, name, namespace)
    if status.get("phase") != "Ready" or status.get("readyWorkers") != workers:
        return None
    pods = await pods_of(api, name, namespace)
    if any(p["metadata"].get("deletionTimestamp") for p in pods):
        return None
    listed = {w for stage in status.get("stages", []) for w in stage["workers"]}
    if listed != {p["metadata"]["name"] for p in pods}:
        return None
    return await service_url(api, namespace, name, "http")


def pids(kubelet: Kubelet, namespace: str) -> dict[str, int]:
    """The worker process of every live pod of ``namespace``, by pod name."""
    return {p.name: p.pid for p in list(kubelet.pods.values()) if p.namespace == namespace}


async def test_real_workers_serve_and_killed_or_deleted_ones_are_replaced(
    operator: kopf.Memo, admin: KubeClient, kubelet: Kubelet, namespace: str
) -> None:
    api, ns = admin, namespace
    await api.create("modeldeployments", manifest("real", ns))

    async def up() -> str | None:
        return await serving(api, "real", ns, 4)

    try:
        front = await wait_until(up, TIMEOUT, "the deployment serving", interval=0.1)
    except TimeoutError:
        logs = {p.name: p.log_path.read_text()[-1500:] for p in kubelet.history}
        raise AssertionError(
            f"{await status_of(api, 'real', ns)}\n{kubelet.errors}\n{logs}"
        ) from None
    url = f"{front}/v2/models/real/infer"
    status = await status_of(api, "real", ns)
    assert status["worlds"] == {"ready": 4, "broken": 0}  # 1x2 + 2x1 real worlds
    pods = await pods_of(api, "real", ns)
    assert len(pods) == 4
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 4 and all(ip.startswith("127.") for ip in ips)

    async with aiohttp.ClientSession() as session:
        for i in range(5):
            body, check = toy_request(i)
            async with session.post(url, json=body) as response:
                assert response.status == 200, await response.text()
                assert check(await response.json())

    # Kill one middle-stage worker under load: only it is replaced, nothing fails.
    before = pids(kubelet, ns)
    victim = next(
        kubelet.pod(p["metadata"]["name"], ns)
        for p in pods
        if p["metadata"]["labels"][builders.LABEL_STAGE] == "1"
    )
    async with ClosedLoop(url, toy_request, 4, timeout=20) as load:
        await load.answered(20, timeout=TIMEOUT)
        victim.process.send_signal(signal.SIGKILL)

        async def replaced() -> str | None:
            names = {p["metadata"]["name"] for p in await pods_of(api, "real", ns)}
            if victim.name in names or len(names) != 4:
                return None
            return await serving(api, "real", ns, 4)

        await wait_until(replaced, TIMEOUT, "the killed worker replaced", interval=0.1)
        await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]

    after = pids(kubelet, ns)
    survivors = {name: pid for name, pid in before.items() if name != victim.name}
    assert {name: after.get(name) for name in survivors} == survivors  # no other restart
    assert len(set(after) - set(before)) == 1

    # Delete a middle-stage pod (kubectl delete pod): SIGTERM drains it, it is replaced.
    before = after
    gone = next(
        p["metadata"]["name"]
        for p in await pods_of(api, "real", ns)
        if p["metadata"]["labels"][builders.LABEL_STAGE] == "1"
    )
    deleted = kubelet.pod(gone, ns)
    async with ClosedLoop(url, toy_request, 4, timeout=20) as load:
        await load.answered(20, timeout=TIMEOUT)
        await api.delete("v1", "pods", ns, gone)
        await wait_until(
            lambda: deleted.process.poll() is not None, TIMEOUT, "the deleted pod's worker exit"
        )

        async def recreated() -> str | None:
            names = {p["metadata"]["name"] for p in await pods_of(api, "real", ns)}
            if gone in names or len(names) != 4:
                return None
            return await serving(api, "real", ns, 4)

        await wait_until(recreated, TIMEOUT, "the deleted worker replaced", interval=0.1)
        await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]
    assert deleted.process.returncode == 0  # it drained and exited on SIGTERM, not killed
    after = pids(kubelet, ns)
    survivors = {name: pid for name, pid in before.items() if name != gone}
    assert {name: after.get(name) for name in survivors} == survivors
    assert len(set(after) - set(before)) == 1


async def test_a_frozen_worker_is_replaced_under_load(
    operator: kopf.Memo, admin: KubeClient, kubelet: Kubelet, namespace: str
) -> None:
    """SIGSTOP: the process lives but answers nothing. Its peers break its worlds and route
    around it within 1 s (no request takes longer), the operator finds its control API
    silent, deletes the pod with grace 0 (it would never handle SIGTERM) and replaces it;
    no request fails, no other worker restarts."""
    api, ns = admin, namespace
    await api.create("modeldeployments", manifest("frozen", ns))

    async def up() -> str | None:
        return await serving(api, "frozen", ns, 4)

    front = await wait_until(up, TIMEOUT, "the deployment serving", interval=0.1)
    pods = await pods_of(api, "frozen", ns)
    victim = next(
        kubelet.pod(p["metadata"]["name"], ns)
        for p in pods
        if p["metadata"]["labels"][builders.LABEL_STAGE] == "1"
    )
    before = pids(kubelet, ns)
    async with ClosedLoop(f"{front}/v2/models/frozen/infer", toy_request, 4, timeout=20) as load:
        await load.answered(20, timeout=TIMEOUT)
        victim.process.send_signal(signal.SIGSTOP)

        async def replaced() -> str | None:
            names = {p["metadata"]["name"] for p in await pods_of(api, "frozen", ns)}
            if victim.name in names or len(names) != 4:
                return None
            return await up()

        await wait_until(replaced, TIMEOUT, "the frozen worker replaced", interval=0.1)
        await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]
    after = pids(kubelet, ns)
    survivors = {name: pid for name, pid in before.items() if name != victim.name}
    assert {name: after.get(name) for name in survivors} == survivors
    assert max(load.result.latencies) <= 1.0, sorted(load.result.latencies)[-5:]
    await wait_until(lambda: victim.process.poll() is not None, TIMEOUT, "the frozen one gone")
    assert victim.process.returncode == -signal.SIGKILL


async def test_a_model_that_cannot_load_is_degraded_with_the_workers_error(
    operator: kopf.Memo, admin: KubeClient, kubelet: Kubelet, namespace: str
) -> None:
    """The schema admits any ``module:function`` model; the workers die loading it. The
    status says Degraded with the worker's own last log line, and the pods are replaced
    (never more than desired) while the spec stays wrong."""
    api, ns = admin, namespace
    body = manifest("unloadable", ns)
    body["spec"]["model"]["name"] = "no_such_package.models:build"
    await api.create("modeldeployments", body)

    async def degraded() -> dict[str, Any] | None:
        status = await status_of(api, "unloadable", ns)
        assert len(await pods_of(api, "unloadable", ns)) <= 4
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        condition = conditions.get("Degraded", {})
        wrong = condition.get("status") == "True" and "no_such_package" in condition["message"]
        return condition if wrong else None

    condition = await wait_until(degraded, TIMEOUT, "Degraded with the worker's error", 0.1)
    assert "No module named 'no_such_package'" in condition["message"], condition
    assert (await status_of(api, "unloadable", ns))["readyWorkers"] == 0


async def test_early_exit_state_reaches_the_status(
    operator: kopf.Memo, admin: KubeClient, kubelet: Kubelet, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    """With early exits on and the ramps file in a ConfigMap (``rampsConfigMap``, mounted
    into every worker), the front worker's ramps (state, threshold, exit rate) show in
    ``status.earlyExits`` once requests have labelled them."""
    from worldmesh_worker.exits.ramps import save_ramps
    from worldmesh_worker.exits.train import train
    from worldmesh_worker.models import toy

    ramps = tmp_path / "toy-ramps.pt"
    save_ramps(ramps, train(toy.ToyModel(), [0, 1, 2], train_rows=600, heldout_rows=300))
    api, ns = admin, namespace
    config_map = {  # what `kubectl create configmap toy-ramps --from-file=ramps.pt=FILE` makes
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "toy-ramps", "namespace": ns},
        "binaryData": {"ramps.pt": base64.b64encode(ramps.read_bytes()).decode()},
    }
    await api.create("configmaps", config_map)
    body = manifest("exits", ns)
    body["spec"]["earlyExits"] = {"enabled": True, "rampsConfigMap": {"name": "toy-ramps"}}
    await api.create("modeldeployments", body)
    front = await wait_until(lambda: serving(api, "exits", ns, 4), TIMEOUT, "serving", interval=0.1)
    async with aiohttp.ClientSession() as session:
        for i in range(40):
            request, check = toy_request(i)
            async with session.post(f"{front}/v2/models/exits/infer", json=request) as response:
                assert response.status == 200 and check(await response.json())

    async def reported() -> dict[str, Any] | None:
        exits = (await status_of(api, "exits", ns)).get("earlyExits", {})
        workers = exits.get("workers", [])
        return workers[0] if workers and workers[0]["labelled"] >= 40 else None

    (front_pod,) = [
        p["metadata"]["name"]
        for p in await pods_of(api, "exits", ns)
        if p["metadata"]["labels"][builders.LABEL_STAGE] == "0"
    ]
    state = await wait_until(reported, TIMEOUT, "early exits in the status", interval=0.2)
    assert state["worker"] == front_pod and state["policy"] == "online"
    assert [r["ramp"] for r in state["ramps"]] == [0, 1, 2]
    assert all("threshold" in r and "exitRate" in r for r in state["ramps"])
