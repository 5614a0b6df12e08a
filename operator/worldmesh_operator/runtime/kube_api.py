"""A small async client of the Kubernetes API over aiohttp (already a dependency).

kopf ships no client for general use, and ``kubernetes_asyncio`` would add a large
generated package for the five verbs the runtime needs: list, get, create, merge-patch and
delete. ``KubeApi.from_environment()`` finds the API server as kubectl does: in-cluster
(the service account's token and CA) or the current context of ``$KUBECONFIG`` /
``~/.kube/config`` (a bearer token, or a client certificate, and a CA). Errors are
``ApiError(status, reason)``; ``NotFound`` and ``Conflict`` are its subclasses.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
USER_AGENT = "worldmesh-operator/0.1.0"


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {message}")
        self.status = status


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


def path_of(api_version: str, plural: str, namespace: str | None, name: str | None = None) -> str:
    """The URL path of a collection or an object: ``/api/v1/namespaces/ns/pods/name``."""
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    ns = f"/namespaces/{namespace}" if namespace else ""
    return f"{base}{ns}/{plural}" + (f"/{name}" if name else "")


class KubeApi:
    """Owns one aiohttp session; use ``async with`` or call ``close()``."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 30.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.server = server.rstrip("/")
        # The API server records it in its audit log beside the authenticated user.
        self._headers = {"User-Agent": user_agent}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In-cluster credentials if present, else the kube config's current context."""
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if host and (SA_DIR / "token").exists():
            context = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))
            return cls(
                f"https://{host}:{port}",
                token=(SA_DIR / "token").read_text().strip(),
                ssl_context=context,
            )
        return cls._from_kubeconfig()

    @classmethod
    def _from_kubeconfig(cls) -> KubeApi:
        path = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0])
        config = yaml.safe_load(path.expanduser().read_text())
        context_name = config.get("current-context")
        context = _named(config, "contexts", context_name)["context"]
        cluster = _named(config, "clusters", context["cluster"])["cluster"]
        user = _named(config, "users", context["user"]).get("user", {})
        ssl_context = None
        if cluster["server"].startswith("https"):
            ssl_context = ssl.create_default_context(
                cafile=cluster.get("certificate-authority"),
                cadata=_b64(cluster.get("certificate-authority-data")),
            )
            if cluster.get("insecure-skip-tls-verify"):
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
            cert = user.get("client-certificate") or _tmpfile(user.get("client-certificate-data"))
            key = user.get("client-key") or _tmpfile(user.get("client-key-data"))
            if cert and key:
                ssl_context.load_cert_chain(cert, key)
        return cls(cluster["server"], token=user.get("token"), ssl_context=ssl_context)

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {**self._headers, "Content-Type": content_type}
        async with self._session.request(
            method,
            self.server + path,
            json=body,
            params=params,
            headers=headers,
            ssl=self._ssl if self._ssl is not None else True,
        ) as response:
            data = await response.json(content_type=None) if response.content_length != 0 else {}
            if response.status >= 400:
                message = (data or {}).get("message", response.reason or "")
                error = {404: NotFound, 409: Conflict}.get(response.status, ApiError)
                raise error(response.status, message)
            return data

    async def list(
        self, api_version: str, plural: str, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        data = await self.request("GET", path_of(api_version, plural, namespace), params=params)
        # Equality selectors are checked here too: an API emulator may not apply them.
        wanted = dict(term.split("=", 1) for term in label_selector.split(",") if "=" in term)
        return [
            item
            for item in (data or {}).get("items", [])
            if all(
                ((item.get("metadata") or {}).get("labels") or {}).get(k) == v
                for k, v in wanted.items()
            )
        ]

    async def get(self, api_version: str, plural: str, namespace: str, name: str) -> Any:
        return await self.request("GET", path_of(api_version, plural, namespace, name))

    async def create(self, plural: str, body: dict[str, Any]) -> Any:
        namespace = body["metadata"].get("namespace")
        return await self.request("POST", path_of(body["apiVersion"], plural, namespace), body)

    async def create_if_absent(self, plural: str, body: dict[str, Any]) -> bool:
        """Create ``body``; False (and no error) if an object of that name exists."""
        try:
            await self.create(plural, body)
        except Conflict:
            return False
        return True

    async def patch(
        self, api_version: str, plural: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> Any:
        return await self.request(
            "PATCH",
            path_of(api_version, plural, namespace, name),
            patch,
            content_type="application/merge-patch+json",
        )

    async def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str,
        name: str,
        grace_period_s: int | None = None,
    ) -> bool:
        """Delete an object; False if it was already gone."""
        params = None if grace_period_s is None else {"gracePeriodSeconds": str(grace_period_s)}
        try:
            await self.request(
                "DELETE", path_of(api_version, plural, namespace, name), params=params
            )
        except NotFound:
            return False
        return True


def _named(config: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    for item in config.get(section) or []:
        if item.get("name") == name:
            return dict(item)
    raise ValueError(f"kube config: no {section[:-1]} named {name!r}")


def _b64(data: str | None) -> str | None:
    return base64.b64decode(data).decode() if data else None


def _tmpfile(data: str | None) -> str | None:
    if not data:
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as handle:
        handle.write(base64.b64decode(data))
    os.chmod(handle.name, 0o600)
    return handle.name
