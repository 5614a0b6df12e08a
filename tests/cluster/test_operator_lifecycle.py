"""The operator's lifecycle: scaling through /scale and the spec, restarts.

- ``kubectl scale md/NAME --replicas 3`` (the real kubectl, through the /scale subresource)
  grows the stage that ``spec.scaleTarget`` names from 1 to 3 real workers with their
  worlds; a spec edit (``spec.replicas: 1``) shrinks it again. All under a closed loop of
  requests: none fails, and each removed worker was drained (a WorkerDraining Event) and
  exited 0 on its own; each change is a Scaled Event; the /scale subresource reports the
  stage's workers.
- The operator stopped mid-way (pods created, worlds not yet all open) and started again:
  the new one adopts the pods (same names, same processes, no pod created again, as the
  API server's audit log counts them) and the status converges; restarted again under
  load, through three reconcile steps of the new operator, no request fails, nothing is
  re-created and no worker opens a world again.

Two operator replicas in the chart's peering are tested in-cluster (test_helm_install.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_client import KubeClient
from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request

from .conftest import MD, Identity, Kubectl, delete_deployments, running_operator
from .controlplane import ControlPlane
from .kubelet import Kubelet
from .test_operator import pods_of, status_of
from .test_operator_workers import manifest as workers_manifest
from .test_operator_workers import pids, serving

TIMEOUT = 60.0  # a deployment starting on a loaded 2-core machine


def manifest(name: str, namespace: str, middle: int = 1) -> dict[str, Any]:
    """Three toy stages; ``/scale`` drives the middle one (``middle``..3 workers)."""
    return workers_manifest(name, namespace, middle=(middle, 3), scaleTarget="middle")


def stage_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"][builders.LABEL_STAGE])


async def events(api: KubeClient, namespace: str, reason: str) -> list[str]:
    """The messages of the Events with ``reason``, oldest first."""
    found = [e for e in await api.list("v1", "events", namespace) if e.get("reason") == reason]
    found.sort(key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))
    return [str(e.get("message", "")) for e in found]


def audited(plane: ControlPlane, user: str, verb: str, namespace: str) -> int:
    """How many requests on pods of ``namespace`` ``user`` made with ``verb``."""
    return sum(
        1
        for e in plane.audit_events()
        if e.get("user", {}).get("username") == user  # type: ignore[union-attr]
        and e.get("verb") == verb
        and (e.get("objectRef") or {}).get("resource") == "pods"  # type: ignore[union-attr]
        and (e.get("objectRef") or {}).get("namespace") == namespace  # type: ignore[union-attr]
        and not (e.get("objectRef") or {}).get("subresource")  # type: ignore[union-attr]
    )


def worlds_opened(kubelet: Kubelet, namespace: str) -> int:
    """World opens in the logs of every worker of ``namespace`` so far."""
    return sum(
        p.log_path.read_text(errors="replace").count(" open (rank ")
        for p in kubelet.history
        if p.namespace == namespace and p.log_path.exists()
    )


async def test_kubectl_scale_and_a_spec_edit_scale_a_stage_under_load(
    operator: kopf.Memo, admin: KubeClient, kubelet: Kubelet, kubectl: Kubectl, namespace: str
) -> None:
    api, ns = admin, namespace
    await api.create("modeldeployments", manifest("elastic", ns))

    async def up(workers: int) -> str | None:
        return await serving(api, "elastic", ns, workers)

    front = await wait_until(lambda: up(3), TIMEOUT, "three workers serving", interval=0.1)
    url = f"{front}/v2/models/elastic/infer"
    async with ClosedLoop(url, toy_request, 4, timeout=20) as load:
        await load.answered(10, timeout=TIMEOUT)
        out = await asyncio.to_thread(kubectl, "scale", "md/elastic", "--replicas", "3", "-n", ns)
        assert out.returncode == 0 and "scaled" in out.stdout, out.stderr

        await wait_until(lambda: up(5), TIMEOUT, "the middle stage at 3 workers", interval=0.1)
        status = await status_of(api, "elastic", ns)
        assert status["worlds"] == {"ready": 6, "broken": 0}  # 1x3 + 3x1
        assert [s["desired"] for s in status["stages"]] == [1, 3, 1]
        scale = await api.get(MD, "modeldeployments", ns, "elastic", subresource="scale")
        assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
        assert "worldmesh.io/deployment=elastic" in scale["status"]["selector"]
        await load.answered(20, timeout=TIMEOUT)

        middle = {
            p["metadata"]["name"] for p in await pods_of(api, "elastic", ns) if stage_of(p) == "1"
        }
        await api.patch(MD, "modeldeployments", ns, "elastic", {"spec": {"replicas": 1}})

        async def shrunk() -> str | None:
            pods = await pods_of(api, "elastic", ns)
            return await up(3) if len(pods) == 3 else None

        await wait_until(shrunk, TIMEOUT, "the middle stage back at 1 worker", interval=0.1)
        await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]

    kept = {p["metadata"]["name"] for p in await pods_of(api, "elastic", ns) if stage_of(p) == "1"}
    removed = middle - kept
    assert len(removed) == 2 and len(kept) == 1
    gone = [p for p in kubelet.history if p.name in removed]
    await wait_until(
        lambda: all(p.process.poll() is not None for p in gone), TIMEOUT, "removed workers exit"
    )
    assert [p.process.returncode for p in gone] == [0, 0]  # drained, then exited on their own
    await wait_until(
        lambda: _all_announced(api, ns, removed),
        TIMEOUT,
        "a WorkerDraining event for each removed worker",
        interval=0.1,
    )
    scaled = ["stage middle: 1 -> 3 workers", "stage middle: 3 -> 1 workers"]

    async def both_ways() -> bool:
        return await events(api, ns, "Scaled") == scaled

    await wait_until(both_ways, TIMEOUT, "a Scaled event each way", 0.1)
    body = await api.get(MD, "modeldeployments", ns, "elastic")
    assert body["metadata"]["generation"] == 3  # created, scaled, edited
    await wait_until(
        lambda: _observed(api, ns, "elastic", 3), TIMEOUT, "observedGeneration 3", interval=0.1
    )


async def _all_announced(api: KubeClient, namespace: str, removed: set[str]) -> bool:
    draining = await events(api, namespace, "WorkerDraining")
    return all(any(n in m for m in draining) for n in removed)


async def _observed(api: KubeClient, namespace: str, name: str, generation: int) -> bool:
    return (await status_of(api, name, namespace)).get("observedGeneration") == generation


async def test_a_restarted_operator_adopts_pods_and_worlds(
    control_plane: ControlPlane,
    chart_identity: Identity,
    admin: KubeClient,
    kubelet: Kubelet,
    namespace: str,
) -> None:
    api, ns = admin, namespace
    user = chart_identity.user

    def created() -> int:  # pods the operators created (each create of a pod, exactly)
        return audited(control_plane, user, "create", ns)

    def steps() -> int:  # the operators' observations (each lists the deployment's pods)
        return audited(control_plane, user, "list", ns)

    async with running_operator(control_plane, chart_identity):
        await api.create("modeldeployments", manifest("adopt", ns, middle=2))
        await wait_until(lambda: created() == 4, TIMEOUT, "four pods created", interval=0.05)
    # Stopped mid-way: the pods exist, their workers may still be starting or unwired.
    first = {p["metadata"]["name"] for p in await pods_of(api, "adopt", ns)}

    async with running_operator(control_plane, chart_identity) as second:
        front = await wait_until(
            lambda: serving(api, "adopt", ns, 4), TIMEOUT, "serving", interval=0.1
        )
        assert (ns, "adopt") in second.deployments
    assert {p["metadata"]["name"] for p in await pods_of(api, "adopt", ns)} == first
    assert created() == 4  # the second operator adopted them: no pod was created again
    status = await status_of(api, "adopt", ns)
    assert status["worlds"] == {"ready": 4, "broken": 0}
    running = pids(kubelet, ns)
    assert set(running) == first
    opened = worlds_opened(kubelet, ns)
    assert opened == 2 * 4  # each world opened once, at both ends

    # Restarted under load: the data plane does not need the operator; nothing is redone.
    async with ClosedLoop(f"{front}/v2/models/adopt/infer", toy_request, 4, timeout=20) as load:
        await load.answered(10, timeout=TIMEOUT)
        before = steps()
        async with running_operator(control_plane, chart_identity) as third:
            await wait_until(
                lambda: (ns, "adopt") in third.deployments and steps() >= before + 3,
                TIMEOUT,
                "the third operator through three reconcile steps",
                interval=0.1,
            )
            await load.answered(20, timeout=TIMEOUT)
            assert load.result.lost == 0, load.result.messages[:5]
            assert created() == 4
            assert pids(kubelet, ns) == running
            assert worlds_opened(kubelet, ns) == opened  # no world redone
            status = await status_of(api, "adopt", ns)
            assert status["worlds"] == {"ready": 4, "broken": 0}
            await delete_deployments(api, ns)
