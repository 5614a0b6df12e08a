"""Fixtures for the tests on a real Kubernetes API server (controlplane.py, kubelet.py).

- ``control_plane`` (session): etcd, kube-apiserver, kube-controller-manager and
  kube-scheduler from ``$KUBEBUILDER_ASSETS``, once per test session. Where the binaries
  are missing every test here is skipped with that reason.
- ``kubectl(*args)``: the real kubectl as the cluster admin; a CompletedProcess.
- ``admin``: an async ``KubeClient`` (the operator's own client) as the cluster admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest

from worldmesh_operator import handlers  # noqa: F401  (registers the handlers)
from worldmesh_operator.runtime.kube_client import KubeClient, NotFound
from worldmesh_worker.control import wait_until

from .controlplane import NODE_NAME, ControlPlane, assets
from .kubelet import Kubelet
from .namespaces import create_namespace

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / "tools" / "kubectl"
HELM = ROOT / "tools" / "helm"
MD = "worldmesh.io/v1alpha1"
TEST_AGENT = "worldmesh-tests"  #: the User-Agent of the tests' own API client

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    folder, why = assets()
    if folder is not None:
        return
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.skip(reason=f"no Kubernetes control plane: {why}"))


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    folder, why = assets()
    if folder is None:
        pytest.skip(f"no Kubernetes control plane: {why}")
    for tool in (KUBECTL, HELM):
        if not tool.is_file():
            pytest.fail(f"{tool} is missing: run `make tools`")
    with tempfile.TemporaryDirectory(prefix="worldmesh-cluster-") as workdir:
        plane = ControlPlane(folder, Path(workdir))
        try:
            plane.start()
            yield plane
        finally:
            plane.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    def run(
        *args: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(control_plane.kubeconfig("admin")), *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def helm(control_plane: ControlPlane) -> Kubectl:
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig("admin"))}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(HELM), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )

    return run


@pytest.fixture
async def admin(control_plane: ControlPlane) -> AsyncIterator[KubeClient]:
    client = await KubeClient.connect(control_plane.kubeconfig("admin"), user_agent=TEST_AGENT)
    async with client:
        yield client


#: The test kubelet's "container runtime": an image repository is a local command.
IMAGES = {
    "worldmesh/worldmesh-operator": [str(Path(sys.executable).parent / "kopf")],
    "worldmesh/worldmesh-worker": [str(Path(sys.executable).parent / "worldmesh"), "worker"],
    #: Any command in the test environment's Python, for the kubelet's own tests.
    "worldmesh-test/python": [sys.executable],
}


@pytest.fixture(scope="session")
def kubelet(control_plane: ControlPlane) -> Iterator[Kubelet]:
    """One Node whose pods run as local processes (kubelet.py), for the whole session."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("the test kubelet mounts volumes in a mount namespace: needs root and unshare")
    with tempfile.TemporaryDirectory(prefix="worldmesh-kubelet-") as workdir:
        node = Kubelet(
            kubeconfig=control_plane.kubeconfig("kubelet"),
            api_url=control_plane.url,
            ca_file=control_plane.ca_file,
            workdir=Path(workdir),
            images=IMAGES,
            node_name=NODE_NAME,
        )
        node.start()
        try:
            yield node
        finally:
            node.stop()


# -- the operator ------------------------------------------------------------------------

OPERATOR_NAMESPACE = "worldmesh-tests"
RELEASE = "wm"  #: the chart's objects are named "wm-worldmesh"


@dataclass(frozen=True)
class Identity:
    """Who the operator runs as in the tests: the chart's own ServiceAccount."""

    user: str  #: system:serviceaccount:NS:NAME, as the audit log names it
    kubeconfig: Path
    token: str


@pytest.fixture(scope="session")
def chart_identity(control_plane: ControlPlane, helm: Kubectl, kubectl: Kubectl) -> Identity:
    """``helm install`` of the chart with no operator replica: its CRDs, ServiceAccount
    and RBAC, so that an operator run by a test has exactly the chart's rights."""
    out = helm(
        "install", RELEASE, str(ROOT / "helm" / "worldmesh"), "-n", OPERATOR_NAMESPACE,
        "--create-namespace", "--set", "operator.replicas=0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    account = f"{RELEASE}-worldmesh"
    token = kubectl("create", "token", account, "-n", OPERATOR_NAMESPACE, "--duration=24h")
    assert token.returncode == 0, token.stderr
    path = control_plane.write_kubeconfig("operator", token.stdout.strip())
    return Identity(
        f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}", path, token.stdout.strip()
    )


def denied_requests(control_plane: ControlPlane, user: str, since: int) -> list[str]:
    """Every request of ``user`` that the API server answered 403, from audit line
    ``since`` on."""
    denied = []
    for i, event in enumerate(control_plane.audit_events()):
        if i < since or event.get("user", {}).get("username") != user:  # type: ignore[union-attr]
            continue
        if (event.get("responseStatus") or {}).get("code") == 403:  # type: ignore[union-attr]
            denied.append(f"{event['verb']} {event['requestURI']}")
    return sorted(set(denied))


@kopf.on.login()
def _login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf in the tests logs in as the memo says (the chart's ServiceAccount)."""
    return memo.kube_login  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def running_operator(
    control_plane: ControlPlane,
    identity: Identity,
    *,
    peering: str | None = None,
    priority: int = 0,
    settings: kopf.OperatorSettings | None = None,
) -> AsyncIterator[kopf.Memo]:
    """The operator (kopf and our handlers) in a thread of its own, as the chart's
    ServiceAccount, standalone or in ``peering``; its memo. Any 403 it met fails the test.
    """
    memo = kopf.Memo(
        kubeconfig=str(identity.kubeconfig),
        kube_login=kopf.ConnectionInfo(
            server=control_plane.url,
            ca_path=str(control_plane.ca_file),
            token=identity.token,
        ),
    )
    ready, stop = threading.Event(), threading.Event()
    since = sum(1 for _ in control_plane.audit_events())
    if settings is None:
        settings = kopf.OperatorSettings()
    # Peers re-announce every 5-10 s instead of kopf's 50-55 s, so a peering event the
    # watch missed is made good well within the tests' 30 s waits.
    settings.peering.lifetime = 15

    def run() -> None:
        asyncio.run(
            kopf.operator(
                standalone=peering is None,
                peering_name=peering,
                priority=priority,
                clusterwide=True,
                settings=settings,
                memo=memo,
                ready_flag=ready,
                stop_flag=stop,
            )
        )

    thread = threading.Thread(target=run, name=f"kopf-{priority}")
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 20), "kopf did not start"
        yield memo
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "kopf did not stop"
    await asyncio.sleep(0.3)  # the audit log's batch (100 ms) reaches the file
    denied = denied_requests(control_plane, identity.user, since)
    assert not denied, "the operator made requests its RBAC does not allow:\n" + "\n".join(denied)


async def delete_deployments(admin: KubeClient, namespace: str, timeout_s: float = 60) -> None:
    """``kubectl delete md --all``, then wait until the operator has released them all."""
    for md in await admin.list(MD, "modeldeployments", namespace):
        await admin.delete(MD, "modeldeployments", namespace, md["metadata"]["name"])

    async def released() -> bool:
        return not await admin.list(MD, "modeldeployments", namespace)

    await wait_until(released, timeout_s, f"the deployments of {namespace} deleted", 0.2)


@pytest.fixture
async def namespace(admin: KubeClient, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A namespace of this test's own, deleted after it (its pods with it)."""
    name = "t-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name += "-" + secrets.token_hex(2)
    await create_namespace(admin, name)
    yield name
    # As a user would: delete the ModelDeployments while the test's operator still runs
    # (a test asks for ``namespace`` after ``operator``, or deletes them itself), wait
    # until it has drained and released them, then delete the namespace.
    try:
        await delete_deployments(admin, name, timeout_s=30)
    except TimeoutError:  # no operator left to finalise them: release them, so they go
        for md in await admin.list(MD, "modeldeployments", name):
            patch = {"metadata": {"finalizers": None}}
            with contextlib.suppress(NotFound):
                await admin.patch(MD, "modeldeployments", name, md["metadata"]["name"], patch)
    await admin.delete("v1", "namespaces", None, name)


@pytest.fixture
async def operator(
    control_plane: ControlPlane, chart_identity: Identity, kubelet: Kubelet
) -> AsyncIterator[kopf.Memo]:
    """One standalone operator as the chart's ServiceAccount, with the kubelet running."""
    async with running_operator(control_plane, chart_identity) as memo:
        yield memo


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many tests ran on the real control plane (CI prints it)."""
    here = Path(__file__).parent
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            path = Path(str(getattr(report, "fspath", "") or report.nodeid.split("::")[0]))
            # One report per test: its call, or the setup that failed or skipped it.
            counted = report.when == "call" or (report.when == "setup" and outcome != "passed")
            if counted and (ROOT / path).resolve().is_relative_to(here):
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        folder, why = assets()
        where = f"KUBEBUILDER_ASSETS={folder}" if folder else f"no control plane: {why}"
        summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
        terminalreporter.write_line(f"real Kubernetes API server tests: {summary} ({where})")
