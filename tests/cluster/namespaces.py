"""A namespace as the tests and the cluster benchmark use one."""

from __future__ import annotations

from worldmesh_operator.runtime.kube_client import KubeClient, NotFound
from worldmesh_worker.control import wait_until


async def create_namespace(api: KubeClient, name: str, timeout_s: float = 30) -> None:
    """Create namespace ``name`` and wait for its ``default`` ServiceAccount: the API server
    refuses pods until the controller manager has made it."""
    await api.create(
        "namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )

    async def has_account() -> bool:
        try:
            await api.get("v1", "serviceaccounts", name, "default")
        except NotFound:
            return False
        return True

    await wait_until(has_account, timeout_s, f"the default ServiceAccount of {name}", 0.1)
