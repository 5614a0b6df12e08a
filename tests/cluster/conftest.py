"""Fixtures for the tests on a real Kubernetes API server (controlplane.py, kubelet.py).

- ``control_plane`` (session): etcd, kube-apiserver, kube-controller-manager and
  kube-scheduler from ``$KUBEBUILDER_ASSETS``, once per test session. Where the binaries
  are missing every test here is skipped with that reason.
- ``kubectl(*args)``: the real kubectl as the cluster admin; a CompletedProcess.
- ``admin``: an async ``KubeClient`` (the operator's own client) as the cluster admin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from worldmesh_operator.runtime.kube_client import KubeClient

from .controlplane import NODE_NAME, ControlPlane, assets
from .kubelet import Kubelet

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / "tools" / "kubectl"
HELM = ROOT / "tools" / "helm"
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
