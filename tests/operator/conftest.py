"""kopf embedded over HTTP against kmock's Kubernetes emulator.

``Emulator`` adds what kopf needs and kmock leaves out: ``metadata.resourceVersion``,
``uid`` and ``creationTimestamp`` on every created object (and a new resourceVersion on
every patch). The ``operator`` fixture runs ``kopf.operator`` (standalone: no peering) in
a task with a ``memo`` that points the handlers' API client at the emulator, and stops it
on teardown. The login handler is registered here only, for the tests.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import attrs
import kmock
import kopf
import pytest

from worldmesh_operator import handlers  # noqa: F401  (registers the handlers)
from worldmesh_operator.runtime.kube_api import KubeApi


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == kmock.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                meta["resourceVersion"] = str(next(self._versions))
        elif request.action == kmock.action.UPDATE and isinstance(request.data, list):
            # A JSON patch: its "test" of the resourceVersion fails with 422, as the API's does.
            key = (request.resource, request.namespace, request.name)
            current = (
                self.objects[key].get("metadata", {}).get("resourceVersion")
                if key in self.objects
                else None
            )
            for op in request.data:
                if (
                    op.get("op") == "test"
                    and op.get("path") == "/metadata/resourceVersion"
                    and op.get("value") != current
                ):
                    raise kmock.KubernetesError(422, "Invalid", "resourceVersion changed")
            request.data.append(
                {
                    "op": "add",
                    "path": "/metadata/resourceVersion",
                    "value": str(next(self._versions)),
                }
            )
        return await super()._handle(request)


#: What the emulator's discovery serves; kopf waits for ``v1/namespaces`` even cluster-wide.
RESOURCES: dict[str, dict[str, Any]] = {
    "v1/namespaces": {
        "namespaced": False,
        "kind": "Namespace",
        "singular": "namespace",
        "verbs": ["list", "watch", "get"],
        "shortnames": ["ns"],
        "categories": [],
        "subresources": [],
    },
    "worldmesh.io/v1alpha1/modeldeployments": {
        "namespaced": True,
        "kind": "ModelDeployment",
        "singular": "modeldeployment",
        "verbs": ["list", "watch", "get", "patch", "create", "delete", "update"],
        "shortnames": ["md"],
        "categories": [],
        "subresources": ["status", "scale"],
    },
    **{
        f"v1/{plural}": {
            "namespaced": True,
            "kind": kind,
            "singular": plural[:-1],
            "verbs": ["list", "watch", "get", "patch", "create", "delete"],
            "shortnames": [],
            "categories": [],
            "subresources": ["status"] if plural == "pods" else [],
        }
        for plural, kind in (
            ("pods", "Pod"),
            ("services", "Service"),
            ("secrets", "Secret"),
            ("events", "Event"),
        )
    },
}


@kopf.on.login()
def _login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=memo.kube_url, default_namespace="default")


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": Emulator}


@pytest.fixture
def emulator(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    for key, info in RESOURCES.items():
        kmock.resources[key] = info
    return kmock


@pytest.fixture
async def operator(emulator: kmock.KubernetesEmulator) -> AsyncIterator[kopf.Memo]:
    """kopf in a thread of its own: at exit it cancels every task left in its loop."""
    url = str(emulator.url).rstrip("/")
    memo = kopf.Memo(api=KubeApi(url), image="worldmesh/worker:test", kube_url=url)
    ready, stop = threading.Event(), threading.Event()

    def run() -> None:
        asyncio.run(
            kopf.operator(
                standalone=True, clusterwide=True, memo=memo, ready_flag=ready, stop_flag=stop
            )
        )

    thread = threading.Thread(target=run, name="kopf")
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10), "kopf did not start"
        async with KubeApi(url) as api:
            yield kopf.Memo(api=api, operator=memo)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 20)
        assert not thread.is_alive(), "kopf did not stop"
