"""The operator (as the chart's ServiceAccount) on the real API server, the objects it makes.

Stage ``b`` asks for a GPU, which the test node does not have: the scheduler leaves its pod
Pending, so the deployment never becomes Ready (the front stage's pods do run).

- Creating a ModelDeployment makes the token Secret, the front Service, the headless peer
  Service and ``replicas.min`` worker pods per stage, each owned by the deployment (the
  controller ownerReference), labelled, with the stage's resources (``nvidia.com/gpu``
  included), health probes, the drain grace period and the token mounted read-only; the
  status reports conditions, observedGeneration, counts, the endpoint and /scale fields;
  a ``WorkerStarting`` Event per worker.
- A spec that breaks a CEL rule is refused by the API server (422, naming the field);
  nothing is created for it, and another deployment is served.
- A pod that failed (its status says so, as a kubelet would write it) is replaced, with
  ``WorkerFailed`` and ``WorkerReplaced`` Events.
- Deleting a deployment drains and deletes its pods, then its Services and Secret.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_client import ApiError, KubeClient, NotFound
from worldmesh_worker.control import wait_until

from .conftest import MD

TIMEOUT = 60.0  # a deployment starting on a loaded 2-core machine


def manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": MD,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "toy", "splitPoints": [2]},
            "stages": [
                {"name": "a", "replicas": {"min": 2, "max": 3}, "resources": {"cpu": "1"}},
                {
                    "name": "b",
                    "resources": {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": 1},
                },
            ],
        },
    }
    body["spec"].update(spec)
    return body


async def pods_of(api: KubeClient, name: str, namespace: str) -> list[dict[str, Any]]:
    return await api.list("v1", "pods", namespace, f"{builders.LABEL_DEPLOYMENT}={name}")


async def status_of(api: KubeClient, name: str, namespace: str) -> dict[str, Any]:
    body = await api.get(MD, "modeldeployments", namespace, name)
    return dict(body.get("status") or {})


async def test_create_makes_owned_pods_services_and_secret(
    operator: kopf.Memo, admin: KubeClient, namespace: str
) -> None:
    ns = namespace
    api = admin
    created = await api.create("modeldeployments", manifest("fashion", ns))
    uid = created["metadata"]["uid"]

    async def three_pods() -> bool:
        return len(await pods_of(api, "fashion", ns)) == 3

    await wait_until(three_pods, TIMEOUT, "three worker pods", interval=0.2)
    pods = await pods_of(api, "fashion", ns)
    by_stage = {
        s: [p for p in pods if p["metadata"]["labels"][builders.LABEL_STAGE] == s] for s in "01"
    }
    assert len(by_stage["0"]) == 2 and len(by_stage["1"]) == 1
    for pod in pods:
        meta = pod["metadata"]
        assert meta["ownerReferences"] == [
            {
                "apiVersion": MD,
                "kind": "ModelDeployment",
                "name": "fashion",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/name"] == "worldmesh"
        assert meta["labels"]["app.kubernetes.io/instance"] == "fashion"
        assert meta["labels"]["app.kubernetes.io/component"] == "worker"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "worldmesh-operator"
        assert meta["labels"][builders.LABEL_WORKER] == meta["name"]
        container = pod["spec"]["containers"][0]
        assert container["image"] == "worldmesh/worldmesh-worker:0.1.0"
        http = {"port": "http", "scheme": "HTTP"}  # the scheme is the API server's default
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", **http}
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", **http}
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
        token = next(v for v in pod["spec"]["volumes"] if v["name"] == "token")
        assert token["secret"]["secretName"] == "fashion-control-token"
        assert {"name": "token", "mountPath": builders.TOKEN_DIR, "readOnly": True} in container[
            "volumeMounts"
        ]
    gpu_pod = by_stage["1"][0]["spec"]["containers"][0]["resources"]
    assert gpu_pod["limits"] == {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": "1"}
    assert by_stage["0"][0]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1"}

    secret = await api.get("v1", "secrets", ns, "fashion-control-token")
    front = await api.get("v1", "services", ns, "fashion")
    peers = await api.get("v1", "services", ns, "fashion-peers")
    for obj in (secret, front, peers):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    assert front["spec"]["selector"][builders.LABEL_STAGE] == "0"
    assert peers["spec"]["clusterIP"] == "None"
    assert builders.TOKEN_KEY in secret["data"]

    async def status_reported() -> dict[str, Any] | None:
        status = await status_of(api, "fashion", ns)
        return status if status.get("conditions") else None

    status = await wait_until(status_reported, TIMEOUT, "a status", interval=0.2)
    assert status["observedGeneration"] == 1
    assert status["phase"] == "Pending"  # the GPU stage never runs
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "False",
        "Progressing": "True",
        "Degraded": "False",
    }
    assert status["endpoint"] == f"http://fashion.{ns}.svc:8080/v2/models/fashion/infer"
    assert status["desiredWorkers"] == 3 and status["stageCount"] == 2
    assert (
        status["selector"] == "app.kubernetes.io/component=worker,worldmesh.io/deployment=fashion"
    )
    assert len(await pods_of(api, "fashion", ns)) == 3  # no duplicates on later ticks

    # An Event is posted (asynchronously, by kopf's poster) for every worker started.
    async def started() -> bool:
        return sum(r == "WorkerStarting" for r in await reasons(api, ns, "fashion")) >= 3

    await wait_until(started, TIMEOUT, "WorkerStarting events", interval=0.2)


async def reasons(api: KubeClient, namespace: str, name: str) -> list[str]:
    """The reasons of the Events about ModelDeployment ``name``."""
    events = await api.list("v1", "events", namespace)
    return [
        e.get("reason", "")
        for e in events
        if e["involvedObject"].get("kind") == "ModelDeployment"
        and e["involvedObject"].get("name") == name
    ]


async def test_invalid_spec_is_refused_by_the_server_and_others_still_served(
    operator: kopf.Memo, admin: KubeClient, namespace: str
) -> None:
    ns = namespace
    api = admin
    bad = manifest("broken", ns)
    bad["spec"]["model"]["splitPoints"] = [2, 4]  # 3 stages' worth of splits, 2 stages: CEL
    with pytest.raises(ApiError) as refused:
        await api.create("modeldeployments", bad)
    assert refused.value.status == 422 and "spec.stages" in refused.value.message
    await api.create("modeldeployments", manifest("good", ns))

    async def good_pods() -> bool:
        return len(await pods_of(api, "good", ns)) == 3

    await wait_until(good_pods, TIMEOUT, "the good deployment's pods", interval=0.2)
    assert await pods_of(api, "broken", ns) == []


async def test_failed_pod_is_replaced_with_events(
    operator: kopf.Memo, admin: KubeClient, namespace: str
) -> None:
    ns = namespace
    api = admin
    await api.create("modeldeployments", manifest("fail", ns))

    async def three() -> list[dict[str, Any]] | None:
        pods = await pods_of(api, "fail", ns)
        return pods if len(pods) == 3 else None

    first = await wait_until(three, TIMEOUT, "three worker pods", interval=0.2)
    victim = next(p for p in first if p["metadata"]["labels"][builders.LABEL_STAGE] == "1")
    name = victim["metadata"]["name"]
    failed = {"status": {"phase": "Failed", "reason": "OOMKilled"}}
    await api.patch("v1", "pods", ns, name, failed, subresource="status")

    async def replaced() -> bool:
        pods = {p["metadata"]["name"] for p in await pods_of(api, "fail", ns)}
        return name not in pods and len(pods) == 3

    await wait_until(replaced, TIMEOUT, "the failed pod replaced", interval=0.2)
    survivors = {p["metadata"]["name"] for p in first} - {name}
    assert survivors <= {p["metadata"]["name"] for p in await pods_of(api, "fail", ns)}

    async def announced() -> bool:
        return {"WorkerFailed", "WorkerReplaced"} <= set(await reasons(api, ns, "fail"))

    await wait_until(announced, TIMEOUT, "events", interval=0.2)


async def test_delete_removes_everything_owned(
    operator: kopf.Memo, admin: KubeClient, namespace: str
) -> None:
    ns = namespace
    api = admin
    await api.create("modeldeployments", manifest("gone", ns))

    async def pods() -> bool:
        return len(await pods_of(api, "gone", ns)) == 3

    await wait_until(pods, TIMEOUT, "three worker pods", interval=0.2)
    await api.delete(MD, "modeldeployments", ns, "gone")

    async def all_gone() -> bool:
        if await pods_of(api, "gone", ns):
            return False
        for plural, name in (
            ("services", "gone"),
            ("services", "gone-peers"),
            ("secrets", "gone-control-token"),
        ):
            try:
                await api.get("v1", plural, ns, name)
                return False
            except NotFound:
                pass
        try:
            await api.get(MD, "modeldeployments", ns, "gone")
        except NotFound:
            return True
        return False

    await wait_until(all_gone, TIMEOUT, "everything the deployment owned deleted", interval=0.2)


def test_manifest_helper_is_not_shared() -> None:
    a, b = manifest("x", "ns"), manifest("x", "ns")
    a["spec"]["stages"].append({})
    assert copy.deepcopy(b) == manifest("x", "ns")
