"""The operator over HTTP against kmock's Kubernetes emulator (no kubelet: pods never run).

- Creating a ModelDeployment makes the token Secret, the front Service, the headless peer
  Service and ``replicas.min`` worker pods per stage, each owned by the deployment (the
  controller ownerReference), labelled, with the stage's resources (``nvidia.com/gpu``
  included), health probes, the drain grace period and the token mounted read-only; the
  status reports conditions, observedGeneration, counts, the endpoint and /scale fields.
- A spec that passed the API server but breaks a CEL rule sets Degraded (InvalidSpec)
  with the field in the message and creates nothing, while another deployment is served.
- Deleting a deployment drains and deletes its pods, then its Services and Secret.
"""

from __future__ import annotations

import copy
from typing import Any

import kmock
import kopf

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_api import KubeApi, path_of
from worldmesh_worker.local import wait_until

MD = "worldmesh.io/v1alpha1"
TIMEOUT = 15.0


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": MD,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
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


async def pods_of(api: KubeApi, name: str) -> list[dict[str, Any]]:
    return await api.list("v1", "pods", "default", f"{builders.LABEL_DEPLOYMENT}={name}")


async def status_of(api: KubeApi, name: str) -> dict[str, Any]:
    body = await api.get(MD, "modeldeployments", "default", name)
    return dict(body.get("status") or {})


async def test_create_makes_owned_pods_services_and_secret(
    operator: kopf.Memo, emulator: kmock.KubernetesEmulator
) -> None:
    api: KubeApi = operator.api
    created = await api.create("modeldeployments", manifest("fashion"))
    uid = created["metadata"]["uid"]

    async def three_pods() -> bool:
        return len(await pods_of(api, "fashion")) == 3

    await wait_until(three_pods, TIMEOUT, "three worker pods", interval=0.2)
    pods = await pods_of(api, "fashion")
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
        assert container["image"] == "worldmesh/worker:test"
        assert container["readinessProbe"]["httpGet"] == {
            "path": "/v2/health/ready",
            "port": "http",
        }
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 60
        token = next(v for v in pod["spec"]["volumes"] if v["name"] == "token")
        assert token["secret"]["secretName"] == "fashion-control-token"
        assert {"name": "token", "mountPath": builders.TOKEN_DIR, "readOnly": True} in container[
            "volumeMounts"
        ]
    gpu_pod = by_stage["1"][0]["spec"]["containers"][0]["resources"]
    assert gpu_pod["limits"] == {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": "1"}
    assert by_stage["0"][0]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "1"}

    secret = await api.get("v1", "secrets", "default", "fashion-control-token")
    front = await api.get("v1", "services", "default", "fashion")
    peers = await api.get("v1", "services", "default", "fashion-peers")
    for obj in (secret, front, peers):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    assert front["spec"]["selector"][builders.LABEL_STAGE] == "0"
    assert peers["spec"]["clusterIP"] == "None"
    assert builders.TOKEN_KEY in secret["data"]

    async def status_reported() -> dict[str, Any] | None:
        status = await status_of(api, "fashion")
        return status if status.get("conditions") else None

    status = await wait_until(status_reported, TIMEOUT, "a status", interval=0.2)
    assert status["observedGeneration"] == 1
    assert status["phase"] == "Pending"  # no kubelet: no worker ever answers
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "False",
        "Progressing": "True",
        "Degraded": "False",
    }
    assert status["endpoint"] == "http://fashion.default.svc:8080/v2/models/fashion/infer"
    assert status["desiredWorkers"] == 3 and status["stageCount"] == 2
    assert (
        status["selector"] == "app.kubernetes.io/component=worker,worldmesh.io/deployment=fashion"
    )
    assert len(await pods_of(api, "fashion")) == 3  # no duplicates on later ticks

    # An Event is posted (asynchronously, by kopf's poster) for every worker started.
    def started() -> bool:
        events = [r.data for r in emulator["post"] if r.url.path.endswith("/events")]
        return sum(e.get("reason") == "WorkerStarting" for e in events) >= 3

    await wait_until(started, TIMEOUT, "WorkerStarting events", interval=0.2)


async def test_invalid_spec_is_degraded_and_others_still_served(operator: kopf.Memo) -> None:
    api: KubeApi = operator.api
    bad = manifest("broken")
    bad["spec"]["model"]["splitPoints"] = [2, 4]  # 3 stages' worth of splits, 2 stages: CEL
    await api.create("modeldeployments", bad)
    await api.create("modeldeployments", manifest("good"))

    async def degraded() -> dict[str, Any] | None:
        conditions = {c["type"]: c for c in (await status_of(api, "broken")).get("conditions", [])}
        return (
            conditions.get("Degraded")
            if conditions.get("Degraded", {}).get("status") == "True"
            else None
        )

    condition = await wait_until(
        degraded, TIMEOUT, "Degraded on the broken deployment", interval=0.2
    )
    assert condition["reason"] == "InvalidSpec"
    assert "spec.stages" in condition["message"]
    assert (await status_of(api, "broken"))["phase"] == "Failed"

    async def good_pods() -> bool:
        return len(await pods_of(api, "good")) == 3

    await wait_until(good_pods, TIMEOUT, "the good deployment's pods", interval=0.2)
    assert await pods_of(api, "broken") == []


async def test_failed_pod_is_replaced_with_events(
    operator: kopf.Memo, emulator: kmock.KubernetesEmulator
) -> None:
    api: KubeApi = operator.api
    await api.create("modeldeployments", manifest("fail"))

    async def three() -> list[dict[str, Any]] | None:
        pods = await pods_of(api, "fail")
        return pods if len(pods) == 3 else None

    first = await wait_until(three, TIMEOUT, "three worker pods", interval=0.2)
    victim = next(p for p in first if p["metadata"]["labels"][builders.LABEL_STAGE] == "1")
    name = victim["metadata"]["name"]
    await api.patch(
        "v1", "pods", "default", name, {"status": {"phase": "Failed", "reason": "OOMKilled"}}
    )

    async def replaced() -> bool:
        pods = {p["metadata"]["name"] for p in await pods_of(api, "fail")}
        return name not in pods and len(pods) == 3

    await wait_until(replaced, TIMEOUT, "the failed pod replaced", interval=0.2)
    survivors = {p["metadata"]["name"] for p in first} - {name}
    assert survivors <= {p["metadata"]["name"] for p in await pods_of(api, "fail")}

    def reasons() -> set[str]:
        return {r.data.get("reason") for r in emulator["post"] if r.url.path.endswith("/events")}

    await wait_until(
        lambda: {"WorkerFailed", "WorkerReplaced"} <= reasons(), TIMEOUT, "events", interval=0.2
    )


async def test_delete_removes_everything_owned(operator: kopf.Memo) -> None:
    api: KubeApi = operator.api
    await api.create("modeldeployments", manifest("gone"))

    async def pods() -> bool:
        return len(await pods_of(api, "gone")) == 3

    await wait_until(pods, TIMEOUT, "three worker pods", interval=0.2)
    await api.delete(MD, "modeldeployments", "default", "gone")

    async def all_gone() -> bool:
        if await pods_of(api, "gone"):
            return False
        for plural, name in (
            ("services", "gone"),
            ("services", "gone-peers"),
            ("secrets", "gone-control-token"),
        ):
            try:
                await api.get("v1", plural, "default", name)
                return False
            except Exception:
                pass
        try:
            await api.request("GET", path_of(MD, "modeldeployments", "default", "gone"))
        except Exception:
            return True
        return False

    await wait_until(all_gone, TIMEOUT, "everything the deployment owned deleted", interval=0.2)


def test_manifest_helper_is_not_shared() -> None:
    a, b = manifest("x"), manifest("x")
    a["spec"]["stages"].append({})
    assert copy.deepcopy(b) == manifest("x")
