"""The operator's lifecycle: scaling through /scale and the spec, restarts, two replicas.

- ``kubectl scale md/NAME --replicas 3`` (the real kubectl, through the /scale subresource)
  grows the stage that ``spec.scaleTarget`` names from 1 to 3 real workers with their
  worlds; a spec edit (``spec.replicas: 1``) shrinks it again. All under a closed loop of
  requests: none fails, and each removed worker was drained (a WorkerDraining Event) and
  exited 0 on its own; each change is a Scaled Event; the /scale subresource reports the
  stage's workers.
- The operator stopped mid-way (pods created, worlds not yet all open) and started again:
  the new one adopts the pods (same names, same processes, no pod created again) and the
  status converges; restarted again under load, through three reconcile steps of the new
  operator, no request fails and nothing is re-created.
- Two operators in one kopf peering: the higher priority one acts alone (the other holds
  no deployment); once it stops, the other takes over and applies the next spec change.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path
from typing import Any

import kopf
import pytest

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_api import USER_AGENT, KubeApi, path_of
from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import wait_until

from .conftest import Emulator, running_operator
from .kubelet import Kubelet
from .test_operator import MD, pods_of, status_of
from .test_operator_workers import manifest as workers_manifest
from .test_operator_workers import serving

TIMEOUT = 30.0
KUBECTL = Path(__file__).resolve().parents[2] / "tools" / "kubectl"


def manifest(name: str, middle: int = 1) -> dict[str, Any]:
    """Three toy stages; ``/scale`` drives the middle one (``middle``..3 workers)."""
    return workers_manifest(name, middle=(middle, 3), scaleTarget="middle")


def stage_of(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["labels"][builders.LABEL_STAGE])


async def kubectl(emulator: Emulator, *args: str) -> str:
    out = await asyncio.to_thread(
        subprocess.run,
        [str(KUBECTL), "--server", str(emulator.url).rstrip("/"), "-n", "default", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def events(emulator: Emulator, reason: str) -> list[str]:
    return [
        str(r.data.get("message", ""))
        for r in emulator["post"]
        if r.url.path.endswith("/events") and r.data.get("reason") == reason
    ]


async def test_kubectl_scale_and_a_spec_edit_scale_a_stage_under_load(
    operator: kopf.Memo, kubelet: Kubelet, emulator: Emulator
) -> None:
    api: KubeApi = operator.api
    await api.create("modeldeployments", manifest("elastic"))

    async def up(workers: int) -> str | None:
        return await serving(api, kubelet, "elastic", workers)

    front = await wait_until(lambda: up(3), TIMEOUT, "three workers serving", interval=0.1)
    url = f"{front}/v2/models/elastic/infer"
    async with ClosedLoop(url, toy_request, 4, timeout=20) as load:
        await load.answered(10, timeout=TIMEOUT)
        assert "scaled" in await kubectl(emulator, "scale", "md/elastic", "--replicas", "3")

        await wait_until(lambda: up(5), TIMEOUT, "the middle stage at 3 workers", interval=0.1)
        status = await status_of(api, "elastic")
        assert status["worlds"] == {"ready": 6, "broken": 0}  # 1x3 + 3x1
        assert [s["desired"] for s in status["stages"]] == [1, 3, 1]
        scale = await api.request(
            "GET", path_of(MD, "modeldeployments", "default", "elastic") + "/scale"
        )
        assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 3
        assert "worldmesh.io/deployment=elastic" in scale["status"]["selector"]
        await load.answered(20, timeout=TIMEOUT)

        middle = {
            p["metadata"]["name"] for p in await pods_of(api, "elastic") if stage_of(p) == "1"
        }
        await api.patch(MD, "modeldeployments", "default", "elastic", {"spec": {"replicas": 1}})

        async def shrunk() -> str | None:
            pods = await pods_of(api, "elastic")
            return await up(3) if len(pods) == 3 else None

        await wait_until(shrunk, TIMEOUT, "the middle stage back at 1 worker", interval=0.1)
        await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]

    kept = {p["metadata"]["name"] for p in await pods_of(api, "elastic") if stage_of(p) == "1"}
    removed = middle - kept
    assert len(removed) == 2 and len(kept) == 1
    gone = [p for p in kubelet.history if p.name in removed]
    await wait_until(
        lambda: all(p.process.poll() is not None for p in gone), TIMEOUT, "removed workers exit"
    )
    assert [p.process.returncode for p in gone] == [0, 0]  # drained, then exited on their own
    await wait_until(
        lambda: all(any(n in m for m in events(emulator, "WorkerDraining")) for n in removed),
        TIMEOUT,
        "a WorkerDraining event for each removed worker",
        interval=0.1,
    )
    scaled = ["stage middle: 1 -> 3 workers", "stage middle: 3 -> 1 workers"]
    await wait_until(
        lambda: events(emulator, "Scaled") == scaled, TIMEOUT, "a Scaled event each way", 0.1
    )
    body = await api.get(MD, "modeldeployments", "default", "elastic")
    assert body["metadata"]["generation"] == 3  # created, scaled, edited
    await wait_until(
        lambda: _observed(api, "elastic", 3), TIMEOUT, "observedGeneration 3", interval=0.1
    )


async def _observed(api: KubeApi, name: str, generation: int) -> bool:
    return (await status_of(api, name)).get("observedGeneration") == generation


async def test_a_restarted_operator_adopts_pods_and_worlds(
    emulator: Emulator, api: KubeApi, kubelet: Kubelet
) -> None:
    def created() -> int:  # pods the operators created (each POST of a pod, exactly)
        return sum(c.method == "POST" and c.path.endswith("/pods") for c in emulator.calls)

    def steps() -> int:  # the operators' observations (each lists the deployment's pods)
        return sum(
            c.method == "GET" and c.path.endswith("/pods") and c.user_agent == USER_AGENT
            for c in emulator.calls
        )

    async with running_operator(emulator):
        await api.create("modeldeployments", manifest("adopt", middle=2))
        await wait_until(lambda: created() == 4, TIMEOUT, "four pods created", interval=0.05)
    # Stopped mid-way: the pods exist, their workers may still be starting or unwired.
    first = {p["metadata"]["name"] for p in await pods_of(api, "adopt")}

    async with running_operator(emulator) as second:
        front = await wait_until(
            lambda: serving(api, kubelet, "adopt", 4), TIMEOUT, "serving", interval=0.1
        )
        assert ("default", "adopt") in second.deployments
    assert {p["metadata"]["name"] for p in await pods_of(api, "adopt")} == first
    assert created() == 4  # the second operator adopted them: no pod was created again
    status = await status_of(api, "adopt")
    assert status["worlds"] == {"ready": 4, "broken": 0}
    pids = {p.name: p.pid for p in kubelet.pods.values()}
    assert set(pids) == first

    # Restarted under load: the data plane does not need the operator; nothing is redone.
    async with ClosedLoop(f"{front}/v2/models/adopt/infer", toy_request, 4, timeout=20) as load:
        await load.answered(10, timeout=TIMEOUT)
        before = steps()
        async with running_operator(emulator) as third:
            await wait_until(
                lambda: ("default", "adopt") in third.deployments and steps() >= before + 3,
                TIMEOUT,
                "the third operator through three reconcile steps",
                interval=0.1,
            )
            await load.answered(20, timeout=TIMEOUT)
    assert load.result.lost == 0, load.result.messages[:5]
    assert created() == 4
    assert {p.name: p.pid for p in kubelet.pods.values()} == pids
    assert (await status_of(api, "adopt"))["worlds"] == {"ready": 4, "broken": 0}


async def test_two_operators_in_a_peering_one_acts(
    emulator: Emulator, api: KubeApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kopf")
    await api.create(
        "clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "wm"}},
    )

    async def peers() -> int:
        body = await api.get("kopf.dev/v1", "clusterkopfpeerings", "", "wm")
        return len(body.get("status") or {})

    async with running_operator(emulator, peering="wm", priority=50) as standby:
        async with running_operator(emulator, peering="wm", priority=100) as active:
            await wait_until(lambda: _at_least(peers, 2), TIMEOUT, "both in the peering", 0.1)
            await wait_until(
                lambda: any("Pausing operations" in r.getMessage() for r in caplog.records),
                TIMEOUT,
                "the lower priority operator paused",
                interval=0.1,
            )
            await api.create("modeldeployments", manifest("peer"))

            async def handled() -> bool:
                return (await status_of(api, "peer")).get("observedGeneration") == 1

            await wait_until(handled, TIMEOUT, "the deployment handled", interval=0.1)
            assert ("default", "peer") in active.deployments
            assert standby.deployments == {}
            assert len(await pods_of(api, "peer")) == 3
        # The active operator left the peering: the standby resumes and acts.
        await api.patch(MD, "modeldeployments", "default", "peer", {"spec": {"replicas": 2}})

        async def four() -> bool:
            return len(await pods_of(api, "peer")) == 4

        await wait_until(four, TIMEOUT, "the standby scaling the stage", interval=0.1)
        assert ("default", "peer") in standby.deployments


async def _at_least(count: Any, n: int) -> bool:
    return await count() >= n
