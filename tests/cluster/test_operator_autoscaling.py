"""The operator's autoscaler on the real API server, real workers from the test kubelet,
signals scraped from the worker pods' own ``/metrics`` (no Prometheus configured).

A 2-stage ``toy-slow`` deployment whose back stage has three blocks (the bottleneck) and
may grow to 2 workers. Covers:
- under load the operator scales the back stage up from its metrics (a second pod), posts
  a ``ScaledUp`` Event with the reason, and writes ``status.autoscaler`` (the stage's wish,
  recommendation runs with RFC 3339 times, the last scale time) and ``ScalingActive`` True;
  its ``/metrics`` (``WORLDMESH_METRICS_PORT``) exports the ``worldmesh_autoscaler_*`` and
  ``worldmesh_stage_*`` series;
- load stops, then the operator is restarted while the scale down is pending: the new one
  resumes from the status: it keeps 2 workers until the down-stabilization window that
  began under the first operator is over (a fresh autoscaler would shrink at once), then
  scales down with a ``ScaledDown`` Event.
"""

from __future__ import annotations

import datetime

import aiohttp
import kopf
import pytest

from worldmesh_operator import builders
from worldmesh_operator.runtime.kube_client import KubeClient
from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request

from .conftest import MD, Identity, delete_deployments, running_operator
from .controlplane import ControlPlane
from .kubelet import Kubelet
from .test_operator import pods_of, status_of
from .test_operator_workers import free_port, serving

WINDOW_S = 20  # scale-down stabilization: long enough to restart the operator inside it
TIMEOUT = 60.0


def manifest(name: str, namespace: str) -> dict[str, object]:
    return {
        "apiVersion": MD,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "toy-slow", "splitPoints": [1]},
            "port": free_port(),
            "controlPort": free_port(),
            "grpcPort": free_port(),
            "stages": [
                {"name": "front", "replicas": {"min": 1, "max": 1}},
                {
                    "name": "back",
                    "replicas": {"min": 1, "max": 2},
                    "batching": {"maxBatchSize": 1},
                },
            ],
            "autoscaling": {
                "enabled": True,
                "metric": "busyFraction",
                "target": 0.5,
                "scaleDownStabilizationSeconds": WINDOW_S,
            },
        },
    }


def back_pods(pods: list[dict[str, object]]) -> list[dict[str, object]]:
    return [
        p
        for p in pods
        if p["metadata"]["labels"][builders.LABEL_STAGE] == "1"  # type: ignore[index]
        and not p["metadata"].get("deletionTimestamp")  # type: ignore[attr-defined]
    ]


def epoch(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def reasons(api: KubeClient, namespace: str) -> list[dict[str, object]]:
    return list(await api.list("v1", "events", namespace))


async def test_operator_scales_from_metrics_and_resumes_after_a_restart(
    control_plane: ControlPlane,
    chart_identity: Identity,
    admin: KubeClient,
    kubelet: Kubelet,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api, ns = admin, namespace
    identity = (control_plane, chart_identity)
    metrics_port = free_port()
    monkeypatch.setenv("WORLDMESH_METRICS_PORT", str(metrics_port))
    await api.create("modeldeployments", manifest("auto", ns))

    async def back_status() -> dict[str, object] | None:
        scaler = (await status_of(api, "auto", ns)).get("autoscaler") or {}
        return next((s for s in scaler.get("stages", []) if s["stage"] == 1), None)

    async with running_operator(*identity) as memo:
        assert isinstance(memo, kopf.Memo)

        async def front() -> str | None:
            return await serving(api, "auto", ns, 2)

        url = await wait_until(front, TIMEOUT, "the deployment serving", interval=0.2)
        async with ClosedLoop(f"{url}/v2/models/auto/infer", toy_request, 6) as load:

            async def grown() -> bool:
                return len(back_pods(await pods_of(api, "auto", ns))) == 2

            await wait_until(grown, TIMEOUT, "the back stage scaled up", interval=0.2)
            await load.answered(10)
        assert load.result.lost == 0, load.result.messages[:5]
        up = [e for e in await reasons(api, ns) if e.get("reason") == "ScaledUp"]
        assert up and "stage back: load" in str(up[0].get("message")), up

        async def recorded() -> dict[str, object] | None:
            back = await back_status()
            return back if back and back.get("workers") == 2 else None

        back = await wait_until(recorded, TIMEOUT, "status.autoscaler", interval=0.2)
        assert back["lastScaleTime"] and back["recommendations"]
        conditions = {c["type"]: c for c in (await status_of(api, "auto", ns))["conditions"]}
        assert conditions["ScalingActive"]["status"] == "True", conditions

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
        ):
            text = await response.text()
        for name in (
            'worldmesh_autoscaler_decisions_total{deployment="auto",direction="up",stage="1"}',
            'worldmesh_autoscaler_recommended_workers{deployment="auto",stage="1"}',
            'worldmesh_stage_desired_workers{deployment="auto",stage="1"} 2.0',
            'worldmesh_stage_max_workers{deployment="auto",stage="1"} 2.0',
        ):
            assert name in text, text

        async def pending_down() -> dict[str, object] | None:
            back = await back_status()  # the load is gone: a run of 1s follows the 2s
            runs = (back or {}).get("recommendations") or []
            return back if runs and runs[-1]["workers"] == 1 and len(runs) >= 2 else None

        back = await wait_until(pending_down, TIMEOUT, "a pending scale down", interval=0.2)
    # The first operator is stopped mid-window. The window ends WINDOW_S after the last
    # recommendation of 2 it recorded; a fresh autoscaler would shrink at once.
    last_high = max(epoch(r["to"]) for r in back["recommendations"] if r["workers"] == 2)
    assert datetime.datetime.now(datetime.UTC).timestamp() < last_high + WINDOW_S
    async with running_operator(*identity):

        async def shrunk() -> float | None:
            pods = back_pods(await pods_of(api, "auto", ns))
            return datetime.datetime.now(datetime.UTC).timestamp() if len(pods) == 1 else None

        shrunk_at = await wait_until(shrunk, TIMEOUT, "the back stage scaled down", interval=0.1)
        assert shrunk_at >= last_high + WINDOW_S - 1  # not before the window (1 s: rounding)
        down = [e for e in await reasons(api, ns) if e.get("reason") == "ScaledDown"]
        assert down and "under target" in str(down[0].get("message")), down
        await delete_deployments(api, ns)
