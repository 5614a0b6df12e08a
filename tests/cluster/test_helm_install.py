"""The chart as a user installs it, with the operator running in-cluster.

``helm install worldmesh helm/worldmesh -n worldmesh --create-namespace`` as shipped: the
Deployment's ReplicaSet makes the operator pod, the scheduler binds it and the test kubelet
runs it (kopf with the chart's arguments, the projected service-account token mounted where
in-cluster config reads it). Covers, in order:

- the operator pod Running and Ready, acting as the chart's ServiceAccount (and only as
  it: the API server's audit log shows its requests, none denied);
- ``kubectl apply`` of each example to Ready: printer columns filled, conditions, Events,
  requests through the front Service answered with the data set's labels;
- ``kubectl delete md``: the workers drain, then pods, Services and Secret are gone and
  nothing is left Terminating;
- the operator pod deleted: the ReplicaSet's new one adopts the running workers (no worker
  pod created again, no world opened again, same processes);
- two replicas: exactly one acts (every write request in the user's namespace comes from
  one operator pod, by the audit log), and each worker is created once;
- ``helm uninstall``: the operator's objects go; the CRDs stay (Helm never deletes them).

Early exits need ramps trained by ``make setup`` (not by ``make test``): where the ramps
file of an example's model is missing from the cache, that example is applied with
``earlyExits.enabled: false`` and the test says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import yaml

from worldmesh_operator import handlers
from worldmesh_operator.load import samples
from worldmesh_operator.runtime.kube_client import KubeClient, NotFound
from worldmesh_worker.control import wait_until
from worldmesh_worker.exits.ramps import ramps_path
from worldmesh_worker.loadgen import ClosedLoop, toy_request

from .conftest import MD, ROOT, Kubectl, delete_deployments
from .controlplane import ControlPlane
from .kubelet import Kubelet
from .namespaces import create_namespace
from .test_operator import pods_of, status_of
from .test_operator_lifecycle import audited, worlds_opened
from .test_operator_workers import manifest, pids, service_url, serving

NS = "worldmesh"
USER = f"system:serviceaccount:{NS}:worldmesh"  #: the chart's ServiceAccount
TIMEOUT = 60.0
DATASETS = {"efficientnet-lite0": "fashion-mnist", "minilm-l6": "rotten-tomatoes"}


@pytest.fixture(scope="module")
def release(helm: Kubectl, kubectl: Kubectl, kubelet: Kubelet) -> Iterator[str]:
    out = helm("install", "worldmesh", str(ROOT / "helm" / "worldmesh"), "-n", NS,
               "--create-namespace", "--wait", "--timeout", "120s")  # fmt: skip
    assert out.returncode == 0, out.stderr + "\n" + "\n".join(kubelet.errors[-5:])
    yield "worldmesh"
    if helm("status", "worldmesh", "-n", NS).returncode == 0:  # not uninstalled by a test
        out = helm("uninstall", "worldmesh", "-n", NS, "--wait", "--timeout", "120s")
        assert out.returncode == 0, out.stderr


def operator_pods(kubelet: Kubelet) -> list[Any]:
    return [p for p in list(kubelet.pods.values()) if p.namespace == NS]


async def ready_operators(admin: KubeClient) -> list[dict[str, Any]]:
    """The operator pods Running and Ready, none Terminating."""
    pods = await admin.list("v1", "pods", NS, "app.kubernetes.io/name=worldmesh")
    return [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions", [])
        )
    ]


def denied(plane: ControlPlane) -> list[str]:
    return [
        f"{e['verb']} {e['requestURI']}"
        for e in plane.audit_events()
        if e.get("user", {}).get("username") == USER  # type: ignore[union-attr]
        and (e.get("responseStatus") or {}).get("code") == 403  # type: ignore[union-attr]
    ]


@pytest.fixture
async def user_namespace(admin: KubeClient, release: str) -> AsyncIterator[str]:
    """A namespace for the user's deployments; deleted through the in-cluster operator."""
    name = f"apps-{os.urandom(2).hex()}"
    await create_namespace(admin, name)
    yield name
    await delete_deployments(admin, name)
    await admin.delete("v1", "namespaces", None, name)


async def test_helm_install_runs_the_operator_in_cluster(
    release: str, admin: KubeClient, kubelet: Kubelet, control_plane: ControlPlane
) -> None:
    deployment = await admin.get("apps/v1", "deployments", NS, "worldmesh")
    assert deployment["status"].get("availableReplicas") == 1
    (pod,) = await wait_until(lambda: ready_operators(admin), TIMEOUT, "the operator Ready")
    assert pod["spec"]["serviceAccountName"] == "worldmesh"
    (running,) = operator_pods(kubelet)
    assert running.container.argv[-1].startswith("--log-format")  # the chart's arguments
    assert "--peering=worldmesh" in running.container.argv
    log = running.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]

    async def acting() -> bool:  # it watches ModelDeployments as the chart's account
        return any(
            e.get("user", {}).get("username") == USER  # type: ignore[union-attr]
            and "modeldeployments" in str(e.get("requestURI"))
            for e in control_plane.audit_events()
        )

    await wait_until(acting, TIMEOUT, "the operator's requests", interval=0.5)
    assert denied(control_plane) == []


@pytest.mark.models
@pytest.mark.parametrize("example", ["efficientnet-fashion", "minilm-reviews"])
async def test_kubectl_apply_an_example_to_ready_then_delete_it(
    example: str,
    release: str,
    user_namespace: str,
    admin: KubeClient,
    kubectl: Kubectl,
    kubelet: Kubelet,
    control_plane: ControlPlane,
) -> None:
    ns = user_namespace
    body = yaml.safe_load((ROOT / "examples" / f"{example}.yaml").read_text())
    name, model = body["metadata"]["name"], body["spec"]["model"]["name"]
    if body["spec"].get("earlyExits", {}).get("enabled") and not ramps_path(model).exists():
        body["spec"]["earlyExits"]["enabled"] = False  # no ramps trained (make setup does)
    out = await asyncio.to_thread(kubectl, "apply", "-n", ns, "-f", "-", input=json.dumps(body))
    assert out.returncode == 0, out.stderr
    stages = len(body["spec"]["stages"])

    async def ready() -> str | None:
        status = await status_of(admin, name, ns)
        return status.get("endpoint") if status.get("phase") == "Ready" else None

    try:
        await wait_until(ready, 240, f"{example} Ready", interval=0.5)
    except TimeoutError:
        logs = {p.name: kubelet.log_of(p.name)[-800:] for p in kubelet.history if p.namespace == ns}
        raise AssertionError(f"{await status_of(admin, name, ns)}\n{logs}") from None
    out = await asyncio.to_thread(kubectl, "get", "md", name, "-n", ns)
    header, row = out.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "STAGES", "READY", "DESIRED", "ENDPOINT", "AGE"]
    columns = row.split()
    assert columns[:4] == [name, str(stages), str(stages), str(stages)], out.stdout
    assert columns[4] == f"http://{name}.{ns}.svc:8080/v2/models/{name}/infer"
    status = await status_of(admin, name, ns)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    out = await asyncio.to_thread(kubectl, "describe", "md", name, "-n", ns)
    assert "WorkerStarting" in out.stdout, out.stdout

    front = await wait_until(  # the kubelet's readiness probe marks the front pod Ready
        lambda: service_url(admin, ns, name, "http"), TIMEOUT, "a Ready pod behind the Service"
    )
    inputs, labels = samples(DATASETS[model])
    correct = 0
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            request = {"id": str(i), "inputs": inputs[i], "outputs": [{"name": "label"}]}
            async with session.post(f"{front}/v2/models/{name}/infer", json=request) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
            assert answer["id"] == str(i)
            correct += int(answer["outputs"][0]["data"][0] == labels[i])
    assert correct >= 12, f"{correct}/20 right: the model is not the trained one"

    workers = [p.name for p in kubelet.history if p.namespace == ns]
    out = await asyncio.to_thread(kubectl, "delete", "md", name, "-n", ns, "--timeout=180s")
    assert out.returncode == 0, out.stderr
    assert await pods_of(admin, name, ns) == []  # nothing left, Terminating or not
    for plural, obj in (
        ("services", name),
        ("services", f"{name}-peers"),
        ("secrets", f"{name}-control-token"),
    ):
        with pytest.raises(NotFound):
            await admin.get("v1", plural, ns, obj)
    exits = {p.name: p.process.returncode for p in kubelet.history if p.name in workers}
    logs = {w: kubelet.log_of(w)[-1500:] for w, code in exits.items() if code != 0}
    assert set(exits.values()) == {0}, (exits, logs)  # every worker drained and exited
    assert denied(control_plane) == []


async def test_operator_pod_deleted_the_new_one_adopts(
    release: str,
    user_namespace: str,
    admin: KubeClient,
    kubectl: Kubectl,
    kubelet: Kubelet,
    control_plane: ControlPlane,
) -> None:
    ns = user_namespace
    await admin.create("modeldeployments", manifest("adopted", ns))
    front = await wait_until(lambda: serving(admin, "adopted", ns, 4), TIMEOUT, "serving", 0.2)
    before, opened = pids(kubelet, ns), worlds_opened(kubelet, ns)
    (old,) = await ready_operators(admin)
    async with ClosedLoop(f"{front}/v2/models/adopted/infer", toy_request, 4) as load:
        await load.answered(10, timeout=TIMEOUT)
        out = await asyncio.to_thread(
            kubectl, "delete", "pod", old["metadata"]["name"], "-n", NS, "--wait=true"
        )
        assert out.returncode == 0, out.stderr

        async def replaced() -> list[dict[str, Any]] | None:
            pods = await ready_operators(admin)
            new = [p for p in pods if p["metadata"]["name"] != old["metadata"]["name"]]
            return new or None

        (_new,) = await wait_until(replaced, TIMEOUT, "a new operator pod Ready", interval=0.5)
        # The new operator has observed the deployment: it patched the status since.
        steps = audited(control_plane, USER, "list", ns)
        await wait_until(
            lambda: audited(control_plane, USER, "list", ns) >= steps + 3,
            TIMEOUT,
            "three reconcile steps of the new operator",
            interval=0.5,
        )
        await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]
    assert audited(control_plane, USER, "create", ns) == 4  # no worker pod created again
    assert pids(kubelet, ns) == before
    assert worlds_opened(kubelet, ns) == opened


async def test_two_replicas_one_acts(
    release: str,
    user_namespace: str,
    admin: KubeClient,
    kubectl: Kubectl,
    kubelet: Kubelet,
    control_plane: ControlPlane,
) -> None:
    """Both replicas Ready and their peering settled; a deployment created and then scaled
    is handled by one of them alone (the API server's audit log names the pod behind each
    request's bound token), and each worker pod is created once. (Until the older replica
    hears of a newer one of higher priority, both act: kopf's peering is not a lock.)"""
    ns = user_namespace
    out = await asyncio.to_thread(
        kubectl, "scale", "deployment/worldmesh", "-n", NS, "--replicas=2"
    )
    assert out.returncode == 0, out.stderr
    try:
        pods = await wait_until(
            lambda: _exactly(ready_operators(admin), 2), TIMEOUT, "two operators", interval=0.5
        )
        await wait_until(lambda: settled(admin, kubelet, pods), TIMEOUT, "the peering settled")
        await admin.create(
            "modeldeployments", manifest("standby", ns, middle=(1, 3), scaleTarget="middle")
        )
        await wait_until(lambda: serving(admin, "standby", ns, 3), TIMEOUT, "serving", 0.2)
        await admin.patch(MD, "modeldeployments", ns, "standby", {"spec": {"replicas": 2}})
        await wait_until(lambda: serving(admin, "standby", ns, 4), TIMEOUT, "scaled", 0.2)
        actors = acting_pods(control_plane, ns)
        assert len(actors) == 1, actors
        creates = [
            (e["objectRef"].get("name"), e["responseStatus"].get("code"))  # type: ignore[index,union-attr]
            for e in control_plane.audit_events()
            if e.get("user", {}).get("username") == USER  # type: ignore[union-attr]
            and e.get("verb") == "create"
            and (e.get("objectRef") or {}).get("resource") == "pods"  # type: ignore[union-attr]
            and (e.get("objectRef") or {}).get("namespace") == ns  # type: ignore[union-attr]
        ]
        assert len(creates) == 4, creates  # each worker created once
    finally:
        out = await asyncio.to_thread(
            kubectl, "scale", "deployment/worldmesh", "-n", NS, "--replicas=1"
        )
        assert out.returncode == 0, out.stderr


async def _exactly(pods: Any, n: int) -> list[dict[str, Any]] | None:
    found = await pods
    return found if len(found) == n else None


def priority(pod: str) -> int:
    """The kopf peering priority of an operator pod (the chart's 100, and the tie-breaker
    ``handlers.configure`` draws from the pod's name)."""
    return 100 * handlers.PRIORITY_SPREAD + zlib.crc32(pod.encode()) % handlers.PRIORITY_SPREAD


async def settled(admin: KubeClient, kubelet: Kubelet, pods: list[dict[str, Any]]) -> bool:
    """Both replicas are in the chart's peering, and the one that must stand down does: a
    newer replica of lower priority starts paused; an older one of lower priority pauses
    once it sees the newer one (kopf logs it)."""
    peering = await admin.get("kopf.dev/v1", "clusterkopfpeerings", None, "worldmesh")
    if len(peering.get("status") or {}) < 2:
        return False
    older, newer = sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])
    old, new = older["metadata"]["name"], newer["metadata"]["name"]
    if priority(new) < priority(old):
        return True
    (running,) = [p for p in operator_pods(kubelet) if p.name == old]
    return "Pausing operations" in running.log_path.read_text(errors="replace")


def acting_pods(plane: ControlPlane, namespace: str) -> set[str]:
    """The operator pods that created, patched or deleted anything in ``namespace``."""
    pod_key = "authentication.kubernetes.io/pod-name"
    return {
        str((e["user"].get("extra") or {}).get(pod_key, ["?"])[0])  # type: ignore[union-attr,index]
        for e in plane.audit_events()
        if e.get("user", {}).get("username") == USER  # type: ignore[union-attr]
        and e.get("verb") in ("create", "patch", "update", "delete")
        and (e.get("objectRef") or {}).get("namespace") == namespace  # type: ignore[union-attr]
    }


async def test_helm_uninstall_keeps_the_crds(
    helm: Kubectl, kubectl: Kubectl, admin: KubeClient, release: str
) -> None:
    """Last in this module: the release goes here (the fixture's uninstall then finds none)."""
    out = helm("uninstall", release, "-n", NS, "--wait", "--timeout", "120s")
    assert out.returncode == 0, out.stderr

    async def operator_gone() -> bool:
        return not await admin.list("v1", "pods", NS, "app.kubernetes.io/name=worldmesh")

    await wait_until(operator_gone, TIMEOUT, "the operator pod gone", interval=0.5)
    for kind in ("deployments.apps", "serviceaccounts", "clusterrolebindings"):
        out = kubectl("get", kind, "-A", "-l", "app.kubernetes.io/instance=worldmesh", "-o", "name")
        assert out.stdout.strip() == "", (kind, out.stdout)
    out = kubectl("get", "crd", "modeldeployments.worldmesh.io")
    assert out.returncode == 0, out.stderr  # Helm keeps CRDs
