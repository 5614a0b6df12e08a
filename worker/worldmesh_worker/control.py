"""The operator's contract with a worker: its READY line, its control API, and wiring.

A supervisor (the operator's runtimes, ``LocalPipeline``) starts a worker, reads the line
``READY_PREFIX {"http": PORT, "control": PORT, "grpc": PORT}`` from its stdout (local
processes), and then speaks only the control API (``ControlClient``: status, worlds, drain; bearer token).
``connect`` opens the world between two ``Peer`` s of neighbouring stages: the one whose id
sorts first hosts (it opens the rendezvous and answers its address), the other joins, and
the call returns once the host reports the world ready (``worlds.manager`` explains why
the order is fixed). ``wait_until`` is the bounded poll everything here waits with.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import aiohttp

READY_PREFIX = "WORLDMESH_READY "
#: What two workers must share to open a world: 2 since the heartbeat hellos carry an HMAC
#: under the deployment's token, 3 since the rendezvous runs over the heartbeat channel,
#: 4 since CANCEL messages drop a gone client's rows downstream (a worker of one version
#: cannot open a world with one of another).
WIRE_VERSION = 4


def world_name(a: str, b: str) -> str:
    """The world between workers ``a`` and ``b``: both ends derive it from the sorted pair."""
    first, second = sorted((a, b))
    return f"{first}~{second}"


def world_ends(name: str) -> tuple[str, str]:
    """The two workers of the world ``name`` (``world_name``'s inverse)."""
    first, _, second = name.partition("~")
    return first, second


class ControlError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"control API answered {status}: {message}")
        self.status = status


class ControlClient:
    def __init__(self, session: aiohttp.ClientSession, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        async with self._session.request(
            method,
            self.url + path,
            json=body,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            data = await response.json(content_type=None)
            if response.status >= 400:
                raise ControlError(response.status, data.get("error", "") if data else "")
            return data

    async def status(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/status")

    async def worlds(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/v1/worlds"))["worlds"]

    async def open_world(self, **body: Any) -> dict[str, Any]:
        return await self.call("POST", "/v1/worlds", body)

    async def close_world(self, name: str) -> None:
        await self.call("DELETE", f"/v1/worlds/{name}")

    async def drain(self, wait: float = 0.0) -> dict[str, Any]:
        return await self.call("POST", f"/v1/drain?wait={wait}", timeout=wait + 30)


class Peer(Protocol):
    """What ``connect`` needs of a worker (a ``WorkerProcess``, or an operator's view of a
    pod): its id, stage, device and control client."""

    @property
    def worker(self) -> str: ...

    @property
    def stage(self) -> int: ...

    @property
    def device(self) -> str: ...

    @property
    def control(self) -> ControlClient: ...


async def connect(a: Peer, b: Peer, timeout: float = 15.0) -> str:
    """Open the world between ``a`` and ``b`` (neighbouring stages); return its name."""
    host, joiner = (a, b) if a.worker < b.worker else (b, a)
    hosted = await host.control.open_world(
        peer=joiner.worker, peerStage=joiner.stage, peerDevice=joiner.device
    )
    if hosted["state"] == "ready":
        return hosted["name"]
    await joiner.control.open_world(
        peer=host.worker,
        peerStage=host.stage,
        peerDevice=host.device,
        heartbeat=hosted["heartbeat"],
    )
    await wait_until(lambda: _world_state(host, hosted["name"]), timeout, f"world {hosted['name']}")
    return hosted["name"]


async def _world_state(worker: Peer, name: str) -> bool:
    worlds = {w["name"]: w for w in await worker.control.worlds()}
    state = worlds.get(name, {}).get("state")
    if state == "broken":
        raise ControlError(502, f"world {name} broke while opening: {worlds[name].get('reason')}")
    return state == "ready"


async def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll ``condition`` (sync or async) until truthy; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)
