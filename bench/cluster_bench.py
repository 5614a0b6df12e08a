"""Control-plane figures on a real Kubernetes API server, each beside ``worldmesh run``'s.

One control plane for the whole benchmark (``tests/cluster/controlplane.py``: etcd,
kube-apiserver, controller manager and scheduler from ``$KUBEBUILDER_ASSETS``, else from
``../shared/kube/unpack``), the test kubelet (``tests/cluster/kubelet.py``: pods run as
local processes on 127.N.x.y, in a thread of this process) and the operator in-cluster as
a user installs it (``helm install worldmesh helm/worldmesh -n worldmesh --wait``). Each
repetition uses a namespace of its own and a 3-stage ``toy`` ModelDeployment (stages
front/middle/back, the middle one min 1 max 3, ``spec.scaleTarget: middle``), and the same
manifest file under ``LocalDeployment`` (what ``worldmesh run`` runs) for the baseline.
Every wait polls every 50 ms; the cluster side through the API server as the admin.

- **apply**: from the start of ``kubectl apply`` (its own start included) to
  ``status.phase == Ready`` with 3 ready workers, and to the first answered request
  through the front Service (at its Ready pod, as kube-proxy would route: EndpointSlices
  cannot hold loopback addresses). Baseline: ``LocalDeployment`` on the same manifest, from
  its construction to ``ready()`` and to the first answer at its endpoint.
- **scale**: ``kubectl scale md/NAME --replicas 2`` (the middle stage 1 -> 2) until the
  status is Ready with 4 workers (Ready means every world open and no plan left).
  Baseline: the same ``spec.replicas: 2`` written to the manifest file ``LocalDeployment``
  re-reads on an mtime change, until two READY middle workers and ``ready()``.
- **delete pod**: under a closed loop of 4 clients (``toy_request``), ``kubectl delete pod``
  of a middle-stage worker with the default grace (the kubelet sends SIGTERM: it drains),
  until the pod is gone and the status is Ready with 4 workers again; requests lost (goal
  0). Baseline: SIGTERM sent from outside to that worker's process (``kill PID``, which is
  what the kubelet does on a default-grace delete; the local runtime sees it DRAINING,
  starts a replacement, stops it once DRAINED or exited), until it is forgotten and two
  READY middle workers are wired again.
- **operator restart**: under the same closed loop, ``kubectl delete pod`` of the operator
  until the Deployment's new pod is Ready *and* has made a reconcile request on the
  deployment (the API server's audit log: a ``list`` of its pods or a ``patch`` of the
  ModelDeployment by ``system:serviceaccount:worldmesh:worldmesh`` from the new pod's
  bound token); worker pods created meanwhile (goal 0). ``worldmesh run`` has no
  equivalent: it adopts nothing (on exit it drains and stops every worker; a new
  ``LocalRuntime`` starts with none), so the baseline is what a restart of it costs:
  stop (drain all) and start again to Ready, with every worker started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from common import Figure, median

from worldmesh_operator.reconciler import WorkerState
from worldmesh_operator.run import LocalDeployment
from worldmesh_worker.loadgen import ClosedLoop, toy_request

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests package: tests.cluster.*

NAME = "toy3"
POLL_S = 0.05
TIMEOUT_S = 120.0
OPERATOR_NS = "worldmesh"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"  # in user.extra of a bound token


def _find_assets() -> tuple[Path | None, str]:
    """``$KUBEBUILDER_ASSETS``, else what ``../shared/kube/unpack`` prints; None and why."""
    from tests.cluster.controlplane import assets

    folder, why = assets()
    if folder is not None:
        return folder, ""
    unpack = ROOT.parent / "shared" / "kube" / "unpack"
    if not unpack.is_file():
        return None, f"{why}; and no {unpack}"
    out = subprocess.run([str(unpack)], capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        return None, f"{why}; {unpack} failed: {out.stderr.strip()[-300:]}"
    print(f"cluster: {unpack} -> {out.stdout.strip()}", flush=True)
    os.environ["KUBEBUILDER_ASSETS"] = out.stdout.strip()
    return assets()


async def _until(
    condition: Callable[[], Awaitable[Any]],
    what: str,
    timeout: float = TIMEOUT_S,
    explain: Callable[[], Awaitable[str]] | None = None,
) -> Any:
    """Poll ``condition`` every ``POLL_S``; a TimeoutError naming ``what`` (and what
    ``explain`` says of the state then) past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            why = ""
            if explain is not None:
                try:
                    why = "\n" + await explain()
                except Exception as exc:  # the explanation must not hide the timeout
                    why = f"\n(no explanation: {exc!r})"
            raise TimeoutError(f"{what}: not within {timeout:g} s{why}")
        await asyncio.sleep(POLL_S)


def _local_state(deployment: LocalDeployment) -> Callable[[], Awaitable[str]]:
    async def explain() -> str:
        workers = [f"{w.id} stage {w.stage} {w.state.value}" for w in deployment.observed.workers]
        logs = {
            w.id: w.log_path.read_text(errors="replace")[-400:]
            for w in deployment.runtime.workers.values()
            if w.log_path.exists()
        }
        return (
            f"workers: {workers}\nworlds: {deployment.observed.worlds}\n"
            f"errors: {deployment.errors}\nboard: {deployment.board.lines}\n"
            f"endpoint: {deployment.runtime.endpoint}\nlogs: {logs}"
        )

    return explain


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    body, check = toy_request(0)
    try:
        async with session.post(url, json=body) as response:
            return response.status == 200 and bool(check(await response.json()))
    except (aiohttp.ClientError, OSError, ValueError):
        return False


class AuditTail:
    """The API server's audit log from a byte offset on (the file only grows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events


def _epoch(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


class Cluster:
    """The control plane, the kubelet, the in-cluster operator and the admin's tools."""

    def __init__(self, plane: Any, kubelet: Any, api: Any) -> None:
        self.plane, self.kubelet, self.api = plane, kubelet, api

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        from tests.cluster.conftest import KUBECTL

        kubeconfig = str(self.plane.kubeconfig("admin"))
        return subprocess.run(
            [str(KUBECTL), "--kubeconfig", kubeconfig, *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=180,
            check=False,
        )

    async def kubectl_ok(self, *args: str, stdin: str | None = None) -> str:
        out = await asyncio.to_thread(self.kubectl, *args, stdin=stdin)
        if out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout


def _middle(pods: list[dict[str, Any]]) -> list[str]:
    from worldmesh_operator import builders

    return sorted(
        p["metadata"]["name"]
        for p in pods
        if p["metadata"]["labels"].get(builders.LABEL_STAGE) == "1"
        and not p["metadata"].get("deletionTimestamp")
    )


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


async def cluster_rep(cluster: Cluster, rep: int) -> dict[str, Any]:
    """One repetition on the cluster: apply, scale, delete a pod, restart the operator."""
    from tests.cluster.conftest import delete_deployments
    from tests.cluster.namespaces import create_namespace
    from tests.cluster.test_helm_install import USER, ready_operators
    from tests.cluster.test_operator import pods_of, status_of
    from tests.cluster.test_operator_lifecycle import audited
    from tests.cluster.test_operator_workers import manifest, service_url, serving
    from worldmesh_operator.runtime.kube_client import NotFound

    api, plane = cluster.api, cluster.plane
    ns = f"bench-{rep}-{secrets.token_hex(2)}"
    await create_namespace(api, ns)

    async def explain() -> str:
        pods = {
            p["metadata"]["name"]: (p.get("status", {}).get("phase"), _pod_ready(p))
            for p in await pods_of(api, NAME, ns)
        }
        logs = {
            p.name: p.log_path.read_text(errors="replace")[-400:]
            for p in list(cluster.kubelet.history)
            if p.namespace in (ns, OPERATOR_NS) and p.log_path.exists()
        }
        return (
            f"status: {await status_of(api, NAME, ns)}\npods: {pods}\n"
            f"kubelet errors: {cluster.kubelet.errors[-3:]}\nlogs: {logs}"
        )

    got: dict[str, Any] = {}
    try:
        # -- apply -> first answer, Ready ---------------------------------------------
        body = manifest(NAME, ns, middle=(1, 3), scaleTarget="middle")
        got["manifest"] = body
        start = time.monotonic()
        await cluster.kubectl_ok("apply", "-f", "-", stdin=json.dumps(body))
        first = ready = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def up() -> bool:
                nonlocal first, ready
                if first is None:
                    try:
                        front = await service_url(api, ns, NAME, "http")
                    except NotFound:  # the operator has not made the Service yet
                        front = None
                    if front and await _answers(session, f"{front}/v2/models/{NAME}/infer"):
                        first = time.monotonic() - start
                if ready is None:
                    status = await status_of(api, NAME, ns)
                    if status.get("phase") == "Ready" and status.get("readyWorkers") == 3:
                        ready = time.monotonic() - start
                return first is not None and ready is not None

            await _until(up, "applied: Ready and answering", explain=explain)
        got["first"], got["ready"] = first, ready

        # -- kubectl scale: middle 1 -> 2 ---------------------------------------------
        start = time.monotonic()
        await cluster.kubectl_ok("scale", f"md/{NAME}", "--replicas", "2", "-n", ns)
        front = await _until(
            lambda: serving(api, NAME, ns, 4), "scaled to 4 workers", explain=explain
        )
        got["scale"] = time.monotonic() - start
        status = await status_of(api, NAME, ns)
        got["scale_worlds"] = status.get("worlds")
        url = f"{front}/v2/models/{NAME}/infer"

        # -- kubectl delete pod (default grace) under load ------------------------------
        before = _middle(await pods_of(api, NAME, ns))
        victim = before[0]
        async with ClosedLoop(url, toy_request, 4, timeout=20) as load:
            await load.answered(20, timeout=TIMEOUT_S)
            start = time.monotonic()
            deleting = asyncio.create_task(cluster.kubectl_ok("delete", "pod", victim, "-n", ns))
            replacement_ready = None

            async def back() -> Any:
                nonlocal replacement_ready
                pods = await pods_of(api, NAME, ns)
                fresh = [
                    p
                    for p in pods
                    if p["metadata"]["name"] in set(_middle(pods)) - set(before) and _pod_ready(p)
                ]
                if replacement_ready is None and fresh:
                    replacement_ready = time.monotonic() - start
                names = {p["metadata"]["name"] for p in pods}
                if victim in names or len(names) != 4:
                    return None
                return await serving(api, NAME, ns, 4)

            await _until(back, "the deleted pod replaced", explain=explain)
            got["delete"] = time.monotonic() - start
            got["delete_replacement_pod_ready"] = replacement_ready
            await deleting
            await load.answered(20, timeout=TIMEOUT_S)
        got["delete_lost"], got["delete_ok"] = load.result.lost, load.result.ok
        got["delete_errors"] = load.result.messages[:3]

        # -- operator pod deleted: the new one Ready and reconciling ---------------------
        (old,) = await ready_operators(api)
        old_name = old["metadata"]["name"]
        created_before = audited(plane, USER, "create", ns)
        tail = AuditTail(plane.audit_log)
        async with ClosedLoop(url, toy_request, 4, timeout=20) as load:
            await load.answered(20, timeout=TIMEOUT_S)
            wall, start = time.time(), time.monotonic()
            deleting = asyncio.create_task(
                cluster.kubectl_ok("delete", "pod", old_name, "-n", OPERATOR_NS)
            )
            new_name = new_ready = reconciled = None
            seen: list[dict[str, Any]] = []

            async def adopted() -> bool:
                nonlocal new_name, new_ready, reconciled
                if new_ready is None:
                    pods = [
                        p for p in await ready_operators(api) if p["metadata"]["name"] != old_name
                    ]
                    if pods:
                        new_name, new_ready = pods[0]["metadata"]["name"], time.monotonic() - start
                seen.extend(e for e in tail.new() if e.get("user", {}).get("username") == USER)
                if new_name is not None and reconciled is None:
                    for e in seen:
                        ref = e.get("objectRef") or {}
                        pod = (e.get("user", {}).get("extra") or {}).get(POD_NAME_KEY, [None])[0]
                        step = (ref.get("resource"), e.get("verb")) in (
                            ("pods", "list"),
                            ("modeldeployments", "patch"),
                        )
                        if pod == new_name and ref.get("namespace") == ns and step:
                            reconciled = _epoch(e["stageTimestamp"]) - wall
                            got["restart_first_request"] = f"{e['verb']} {e['requestURI']}"
                            break
                return new_ready is not None and reconciled is not None

            await _until(adopted, "the new operator reconciling", explain=explain)
            got["restart"] = max(new_ready, reconciled)  # type: ignore[type-var]
            got["restart_pod_ready"], got["restart_reconciled"] = new_ready, reconciled
            await deleting
            await asyncio.sleep(2 * 2.0 + 0.5)  # two more reconcile intervals of the new one
            await load.answered(10, timeout=TIMEOUT_S)
        got["restart_lost"], got["restart_ok"] = load.result.lost, load.result.ok
        got["restart_created"] = audited(plane, USER, "create", ns) - created_before
        got["restart_has_pod_name"] = any(
            POD_NAME_KEY in (e.get("user", {}).get("extra") or {}) for e in seen
        )
    finally:
        with contextlib.suppress(Exception):
            await delete_deployments(api, ns, timeout_s=60)
        with contextlib.suppress(Exception):
            await api.delete("v1", "namespaces", None, ns)
    return got


async def local_rep(body: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The same manifest under ``LocalDeployment``: start, file edit, SIGTERM, restart."""
    body = json.loads(json.dumps(body))
    body["metadata"].pop("namespace", None)
    path = workdir / "toy3.yaml"
    path.write_text(yaml.safe_dump(body))
    got: dict[str, Any] = {}

    def ready_middle(d: LocalDeployment) -> set[str]:
        return {w.id for w in d.observed.workers if w.stage == 1 and w.state is WorkerState.READY}

    start = time.monotonic()
    deployment = LocalDeployment(path, workdir / "run", out=lambda line: None)
    task = asyncio.create_task(deployment.run())
    try:
        first = ready = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

            async def up() -> bool:
                nonlocal first, ready
                endpoint = deployment.runtime.endpoint
                if first is None and endpoint and await _answers(session, endpoint):
                    first = time.monotonic() - start
                if ready is None and deployment.ready() and len(deployment.runtime.live()) == 3:
                    ready = time.monotonic() - start
                return first is not None and ready is not None

            await _until(up, "local: ready and answering", explain=_local_state(deployment))
        got["first"], got["ready"] = first, ready

        # -- the manifest edited: middle 1 -> 2 ----------------------------------------
        before = ready_middle(deployment)
        body["spec"]["replicas"] = 2
        start = time.monotonic()
        path.write_text(yaml.safe_dump(body))

        async def scaled() -> bool:
            return len(ready_middle(deployment)) == 2 and deployment.ready()

        await _until(scaled, "local: middle at 2", explain=_local_state(deployment))
        got["scale"] = time.monotonic() - start

        # -- SIGTERM of a middle worker under load --------------------------------------
        endpoint = deployment.runtime.endpoint
        assert endpoint is not None
        before = ready_middle(deployment)
        victim = sorted(before)[0]
        process = deployment.runtime.workers[victim].process
        async with ClosedLoop(endpoint, toy_request, 4, timeout=20) as load:
            await load.answered(20, timeout=TIMEOUT_S)
            start = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            replacement_ready = None

            async def back() -> bool:
                nonlocal replacement_ready
                middle = ready_middle(deployment)
                if replacement_ready is None and middle - before:
                    replacement_ready = time.monotonic() - start
                return (
                    victim not in deployment.runtime.workers
                    and len(middle) == 2
                    and deployment.ready()
                )

            await _until(
                back, "local: the stopped worker replaced", explain=_local_state(deployment)
            )
            got["delete"] = time.monotonic() - start
            got["delete_replacement_pod_ready"] = replacement_ready
            got["delete_victim_exit"] = process.poll()
            await load.answered(20, timeout=TIMEOUT_S)
        got["delete_lost"], got["delete_ok"] = load.result.lost, load.result.ok
        got["delete_errors"] = load.result.messages[:3]

        # -- restart of `worldmesh run`: stop (drain all), start again to Ready ---------
        start = time.monotonic()
        deployment.delete()
        await asyncio.wait_for(task, TIMEOUT_S)
        got["restart_stopped"] = time.monotonic() - start
        deployment = LocalDeployment(path, workdir / "run2", out=lambda line: None)
        task = asyncio.create_task(deployment.run())

        async def again() -> bool:
            return deployment.ready() and len(ready_middle(deployment)) == 2

        await _until(again, "local: restarted to Ready", explain=_local_state(deployment))
        got["restart"] = time.monotonic() - start
        got["restart_created"] = len(deployment.runtime.workers)
    finally:
        deployment.delete()
        await asyncio.wait_for(task, TIMEOUT_S)
    return got


def _series(reps: list[dict[str, Any]], key: str) -> list[float]:
    return [round(float(r[key]), 3) for r in reps]


def _figures(cluster: list[dict[str, Any]], local: list[dict[str, Any]]) -> list[Figure]:
    def pair(key: str) -> tuple[list[float], list[float]]:
        return _series(cluster, key), _series(local, key)

    def local_text(samples: list[float], what: str) -> str:
        return f"{what}: {median(samples):.2f} s (samples {samples})"

    figures = []
    for key, name, what in (
        (
            "ready",
            "kubectl apply (3-stage toy) to status.phase Ready",
            "worldmesh run (LocalDeployment), same manifest, to ready()",
        ),
        (
            "first",
            "kubectl apply to the first answer via the front Service",
            "worldmesh run, same manifest, to the first answer",
        ),
        (
            "scale",
            "kubectl scale md --replicas 2 (middle 1->2) to Ready, 4 workers wired",
            "worldmesh run, spec.replicas: 2 written to its manifest, to 2 ready wired",
        ),
        (
            "delete",
            "kubectl delete pod (middle, default grace) under load: pod gone, Ready with 4",
            "worldmesh run, SIGTERM (`kill PID`) of that worker: it gone, 2 ready wired",
        ),
    ):
        ours, theirs = pair(key)
        detail = {"local_samples": theirs}
        if key == "delete":
            detail.update(
                replacement_pod_ready=_series(cluster, "delete_replacement_pod_ready"),
                local_replacement_ready=_series(local, "delete_replacement_pod_ready"),
            )
        if key == "scale":
            detail["worlds"] = [r.get("scale_worlds") for r in cluster]
        figures.append(
            Figure(name, median(ours), "s", "", local_text(theirs, what), ours, detail=detail)
        )
    lost = sum(r["delete_lost"] for r in cluster)
    figures.append(
        Figure(
            "kubectl delete pod (middle) under load: requests lost",
            lost,
            "requests",
            "== 0",
            f"{sum(r['delete_ok'] for r in cluster)} answered over {len(cluster)} deletes; "
            f"worldmesh run SIGTERM: {sum(r['delete_lost'] for r in local)} lost, "
            f"{sum(r['delete_ok'] for r in local)} answered",
            [float(r["delete_lost"]) for r in cluster],
            detail={
                "errors": [r["delete_errors"] for r in cluster],
                "local_lost": [r["delete_lost"] for r in local],
                "local_errors": [r["delete_errors"] for r in local],
            },
        )
    )
    ours, theirs = pair("restart")
    figures.append(
        Figure(
            "operator pod deleted to the new pod Ready and reconciling the deployment",
            median(ours),
            "s",
            "",
            "no local equivalent: worldmesh run adopts nothing (it drains and stops every "
            f"worker on exit); a restart of it, drain all + start to Ready: "
            f"{median(theirs):.2f} s (samples {theirs}), "
            f"{int(median(_series(local, 'restart_created')))} workers started again",
            ours,
            detail={
                "new_pod_ready": _series(cluster, "restart_pod_ready"),
                "first_reconcile_request": _series(cluster, "restart_reconciled"),
                "first_request": [r.get("restart_first_request") for r in cluster],
                "requests_lost_meanwhile": [r["restart_lost"] for r in cluster],
                "audit_names_the_pod": [r["restart_has_pod_name"] for r in cluster],
                "local_restart_samples": theirs,
                "local_stop_samples": _series(local, "restart_stopped"),
            },
        )
    )
    created = sum(r["restart_created"] for r in cluster)
    figures.append(
        Figure(
            "operator pod deleted: worker pods created again",
            created,
            "pods",
            "== 0",
            f"worldmesh run restart: {sum(r['restart_created'] for r in local)} workers "
            f"started again over {len(local)} restarts; requests lost meanwhile in-cluster: "
            f"{sum(r['restart_lost'] for r in cluster)}",
            [float(r["restart_created"]) for r in cluster],
        )
    )
    return figures


async def run(quick: bool = False) -> list[Figure]:
    reps = 1 if quick else 3
    try:
        folder, why = _find_assets()
        from tests.cluster.conftest import HELM, IMAGES, KUBECTL
        from tests.cluster.controlplane import NODE_NAME, ControlPlane
        from tests.cluster.kubelet import Kubelet
        from worldmesh_operator.runtime.kube_client import KubeClient
    except ImportError as exc:
        print(f"cluster: no figures: cannot import the cluster test harness: {exc}")
        return []
    if folder is None:
        print(f"cluster: no figures: no Kubernetes control plane: {why}")
        return []
    missing = [str(t) for t in (KUBECTL, HELM) if not t.is_file()]
    if missing:
        print(f"cluster: no figures: {', '.join(missing)} missing (make tools)")
        return []
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("cluster: no figures: the test kubelet needs root and unshare")
        return []

    cluster_reps: list[dict[str, Any]] = []
    local_reps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="worldmesh-bench-cluster-") as tmp:
        plane = ControlPlane(folder, Path(tmp) / "plane")
        plane.workdir.mkdir()
        kubelet = None
        try:
            plane.start()
            kubelet = Kubelet(
                kubeconfig=plane.kubeconfig("kubelet"),
                api_url=plane.url,
                ca_file=plane.ca_file,
                workdir=Path(tmp) / "kubelet",
                images=IMAGES,
                node_name=NODE_NAME,
            )
            kubelet.workdir.mkdir()
            kubelet.start()
            env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig("admin"))}
            started = time.monotonic()
            out = await asyncio.to_thread(
                subprocess.run,
                [str(HELM), "install", "worldmesh", str(ROOT / "helm" / "worldmesh"),
                 "-n", OPERATOR_NS, "--create-namespace", "--wait", "--timeout", "120s"],
                capture_output=True, text=True, timeout=180, check=False, env=env,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"helm install: {out.stderr}\n{kubelet.errors[-5:]}")
            print(f"cluster: helm install --wait: {time.monotonic() - started:.1f} s", flush=True)
            async with await KubeClient.connect(
                plane.kubeconfig("admin"), user_agent="worldmesh-bench"
            ) as api:
                cluster = Cluster(plane, kubelet, api)
                for rep in range(reps):
                    cluster_reps.append(await cluster_rep(cluster, rep))
                    print(f"cluster: rep {rep + 1}/{reps}: {_brief(cluster_reps[-1])}", flush=True)
                    work = Path(tmp) / f"local-{rep}"
                    work.mkdir()
                    local_reps.append(await local_rep(cluster_reps[-1]["manifest"], work))
                    print(f"local:   rep {rep + 1}/{reps}: {_brief(local_reps[-1])}", flush=True)
        finally:
            if kubelet is not None:
                await asyncio.to_thread(kubelet.stop)
            await asyncio.to_thread(plane.stop)
    return _figures(cluster_reps, local_reps)


def _brief(got: dict[str, Any]) -> str:
    keys = ("ready", "first", "scale", "delete", "delete_lost", "restart", "restart_created")
    return ", ".join(
        f"{k}={got[k]:.2f}" if isinstance(got[k], float) else f"{k}={got[k]}" for k in keys
    )
