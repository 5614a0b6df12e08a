"""The operator's Kubernetes API access outside kopf, over the official ``kubernetes``
package's asyncio client (``kubernetes.aio``).

``KubeClient.connect()`` finds the API server as kubectl and kopf do: in-cluster (the
pod's service-account token, refreshed as the kubelet rotates it, and CA) when
``KUBERNETES_SERVICE_HOST`` is set, else a kubeconfig (``$KUBECONFIG`` or
``~/.kube/config``, or the file given). The package's client holds the configuration,
TLS, auth and the connection pool; objects are addressed by path
(``/api/v1/namespaces/NS/pods/NAME``), because the operator treats its handful of kinds
(pods, services, secrets, its own ModelDeployments) alike and wants plain dicts, as kopf
hands them over, not the generated models.

Errors are ``ApiError(status, message)`` with the API server's own message;
``NotFound`` (404) and ``Conflict`` (409) are its subclasses.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes.aio import client as kube
from kubernetes.aio import config as kube_config

USER_AGENT = "worldmesh-operator/0.1.0"


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {message}")
        self.status = status
        self.message = message


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def path_of(
    api_version: str,
    plural: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The URL path of a collection or an object: ``/api/v1/namespaces/ns/pods/name``."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    path = f"{base}{ns}/{plural}" + (f"/{name}" if name else "")
    return path + (f"/{subresource}" if subresource else "")


class KubeClient:
    """Owns one ``kubernetes.aio`` ApiClient; use ``async with`` or call ``close()``."""

    def __init__(self, api_client: kube.ApiClient) -> None:
        self._client = api_client

    @classmethod
    async def connect(
        cls, kubeconfig: str | os.PathLike[str] | None = None, *, user_agent: str = USER_AGENT
    ) -> KubeClient:
        """In-cluster credentials when running in a pod (and no file is named), else the
        kubeconfig's current context."""
        configuration = kube.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            await kube_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                client_configuration=configuration,
            )
        api_client = kube.ApiClient(configuration)
        # The API server's audit log records it beside the authenticated user.
        api_client.user_agent = user_agent
        return cls(api_client)

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    @property
    def server(self) -> str:
        return str(self._client.configuration.host)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
    ) -> Any:
        """One API call; the decoded JSON answer (``{}`` if empty)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = await self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((params or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await self._client.call_api(
            method, url, headers, body, _request_timeout=timeout_s
        )
        raw = await response.read()
        data = json.loads(raw) if raw else {}
        if response.status >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            error = {404: NotFound, 409: Conflict}.get(response.status, ApiError)
            raise error(response.status, message or str(response.reason or ""))
        return data

    async def list(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[dict[str, Any]]:
        params = {
            k: v
            for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector))
            if v
        }
        data = await self.request("GET", path_of(api_version, plural, namespace), params=params)
        return list(data.get("items") or [])

    async def get(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        subresource: str | None = None,
    ) -> Any:
        return await self.request("GET", path_of(api_version, plural, namespace, name, subresource))

    async def create(self, plural: str, body: dict[str, Any], namespace: str | None = None) -> Any:
        namespace = namespace or body["metadata"].get("namespace")
        return await self.request("POST", path_of(body["apiVersion"], plural, namespace), body)

    async def create_if_absent(self, plural: str, body: dict[str, Any]) -> bool:
        """Create ``body``; False (and no error) if an object of that name exists."""
        try:
            await self.create(plural, body)
        except Conflict:
            return False
        return True

    async def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> Any:
        """A JSON merge patch (RFC 7386) of an object or of its ``subresource``."""
        return await self.request(
            "PATCH",
            path_of(api_version, plural, namespace, name, subresource),
            patch,
            content_type="application/merge-patch+json",
        )

    async def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        grace_period_s: int | None = None,
    ) -> bool:
        """Delete an object; False if it was already gone. Dependents (by their
        ownerReferences) go in the background, as kubectl's default."""
        params = None if grace_period_s is None else {"gracePeriodSeconds": str(grace_period_s)}
        try:
            await self.request(
                "DELETE", path_of(api_version, plural, namespace, name), params=params
            )
        except NotFound:
            return False
        return True
