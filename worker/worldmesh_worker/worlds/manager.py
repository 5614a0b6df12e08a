"""Opening and closing a worker's worlds, each on its own, none blocking another.

Opening a world takes one call on each end (the control plane makes them):

1. the end whose worker id sorts first (rank 0) *hosts*: it starts a heartbeat listener
   on port 0 and returns its address at once; it then waits, bounded, for the peer;
2. the other end (rank 1) *joins* with that address: it connects the heartbeat channel
   and reads the host's hello, which proves the host is alive, then builds its side of
   the group.

The two hellos name the world and the end's role (host or join: its rank) and carry an
HMAC of both under the deployment's control token, so each end knows its peer is the
expected one: the host refuses any other connection (wrong world, rank or token) and
goes on waiting for its peer; the joiner gives up on a host that is not. The listener
binds to the worker's own address only.

The group's rendezvous then runs over that same channel (``rendezvous.PairStore``, kept
by the host): no second port, no name lookup. Afterwards the channel is a plain socket
handed to the worker's heartbeat thread (``heartbeat.py``), never to the event loop.

Every step has a deadline (``open_timeout_s``). Group construction runs on a thread
of its own, never on the event loop or a shared pool, so a peer that freezes in
the middle of an open stalls only that open. On Gloo every world of the process
shares one Gloo device (one I/O loop): a device per world made four 2-rank worlds
forward at 0.5-0.66x the rate of one shared group; shared, they reach parity.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import logging
import re
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

from ..control import world_name
from .heartbeat import Heartbeats
from .rendezvous import PairStore
from .threads import in_own_thread
from .world import DownHandler, Handler, World, WorldBroken, WorldOptions, WorldState

log = logging.getLogger(__name__)

_WORKER_ID = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
_HELLO = b"worldmesh-world "
BACKENDS = ("auto", "gloo", "nccl")


def check_worker_id(worker: str) -> str:
    if not _WORKER_ID.match(worker):
        raise ValueError(
            f"worker id {worker!r} must be a DNS label (lowercase letters, digits, '-', '.')"
        )
    return worker


def device_identity(device: torch.device) -> str:
    """'cpu', or 'cuda:<uuid>' naming the physical GPU (two ranks on one GPU is refused by NCCL)."""
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.get_device_properties(device).uuid}"


def choose_backend(requested: str, mine: str, peer: str) -> str:
    """NCCL only between two different GPUs; Gloo otherwise (GPU tensors go through host memory).

    Symmetric in (mine, peer), so both ends choose the same backend on their own.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {', '.join(BACKENDS)}")
    distinct_gpus = mine.startswith("cuda:") and peer.startswith("cuda:") and mine != peer
    if requested == "nccl" and not distinct_gpus:
        raise ValueError(f"backend nccl needs two different GPUs, got {mine} and {peer}")
    if requested == "gloo" or not distinct_gpus:
        return "gloo"
    return "nccl"


class WorldManager:
    """The worlds of one worker, by name; ``on_ready``/``on_message``/``on_down`` go to the stage."""

    def __init__(
        self,
        worker: str,
        host: str,
        options: WorldOptions,
        on_message: Handler,
        on_down: DownHandler,
        device: torch.device | None = None,
        on_ready: DownHandler = lambda world: None,
        token: str = "",
    ) -> None:
        """``token``: the deployment's control token, which both ends of a world prove
        they hold (its peers are given the same)."""
        self.worker = check_worker_id(worker)
        self._token = token
        self.host = host
        self.options = options
        self.device = device or torch.device("cpu")
        self.identity = device_identity(self.device)
        self.worlds: dict[str, World] = {}
        self.opening: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, str] = {}  #: last failure reason per world name
        self._on_message = on_message
        self._on_down = on_down
        self._on_ready = on_ready  # runs before the world's first message is delivered
        self._gloo_device = dist.ProcessGroupGloo.create_device(hostname=host)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.heartbeats = Heartbeats(options.heartbeat_interval_s, options.heartbeat_timeout_s)

    # -- open ------------------------------------------------------------------------

    async def open(
        self,
        peer: str,
        *,
        heartbeat: str | None = None,
        backend: str = "auto",
        peer_device: str = "cpu",
    ) -> dict[str, Any]:
        """Host (rank 0) or join (rank 1) the world with ``peer``; see the module doc."""
        check_worker_id(peer)
        if peer == self.worker:
            raise ValueError("a worker cannot open a world with itself")
        name = world_name(self.worker, peer)
        current = self.worlds.get(name)
        if current is not None and current.state is WorldState.READY:
            return current.info()
        if name in self.opening:
            return self.opening[name]
        chosen = choose_backend(backend, self.identity, peer_device)
        rank = 0 if name.startswith(self.worker + "~") else 1
        if rank == 0:
            return await self._host(name, peer, chosen)
        if not heartbeat:
            raise ValueError(f"joining world {name} needs the host's 'heartbeat' address")
        return await self._join(name, peer, chosen, _address(heartbeat, "heartbeat"))

    async def _host(self, name: str, peer: str, backend: str) -> dict[str, Any]:
        listener = socket.create_server((self.host, 0))
        hb_port = listener.getsockname()[1]
        accepted = asyncio.ensure_future(
            in_own_thread(
                lambda: _accept_peer(listener, name, self._token, self.options.open_timeout_s),
                f"heartbeat:{name}",
            )
        )
        info = {
            "name": name,
            "peer": peer,
            "rank": 0,
            "backend": backend,
            "state": WorldState.OPENING.value,
            "heartbeat": f"{self.host}:{hb_port}",
        }
        self.opening[name] = info

        async def finish() -> None:
            channel: socket.socket | None = None
            group: asyncio.Future[Any] | None = None
            store = PairStore(self.options.open_timeout_s)
            try:
                async with asyncio.timeout(self.options.open_timeout_s):
                    channel = await accepted
                    group = asyncio.ensure_future(
                        in_own_thread(lambda: self._make_group(store, 0, backend), f"open:{name}")
                    )
                    await in_own_thread(lambda: store.serve(channel), f"rendezvous:{name}")
                    pg = await group
                self._add(
                    World(
                        name,
                        peer,
                        0,
                        1,
                        pg,
                        self.options,
                        self._on_message,
                        self._down,
                        heartbeat=(channel, self.heartbeats),
                        device=self._nccl_device(backend),
                        keep_alive=store,
                    )
                )
            except (TimeoutError, RuntimeError, OSError) as exc:
                self._fail(name, f"peer {peer} did not join: {_describe(exc)}")
                store.close("the open failed")  # ends the group's own wait
                if channel is not None:
                    channel.close()  # ends a wait in serve(): recv raises OSError
                listener.close()  # ends a wait in accept(): it raises OSError
                with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                    if group is not None:
                        await group
                    if channel is None:
                        (await accepted).close()  # a peer that joined too late: hung up
            finally:
                listener.close()
                self.opening.pop(name, None)

        self._spawn(finish())
        return info

    async def _join(
        self, name: str, peer: str, backend: str, heartbeat: tuple[str, int]
    ) -> dict[str, Any]:
        self.opening[name] = {
            "name": name,
            "peer": peer,
            "rank": 1,
            "backend": backend,
            "state": WorldState.OPENING.value,
        }
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.options.open_timeout_s):
                sock = await in_own_thread(
                    lambda: _connect_peer(
                        heartbeat, name, self._token, self.options.open_timeout_s
                    ),
                    f"heartbeat:{name}",
                )
                channel = sock

                def rendezvous() -> tuple[PairStore, Any]:
                    store = PairStore(self.options.open_timeout_s, channel)
                    pg = self._make_group(store, 1, backend)
                    store.finish()
                    return store, pg

                store, pg = await in_own_thread(rendezvous, f"open:{name}")
            world = World(
                name,
                peer,
                1,
                0,
                pg,
                self.options,
                self._on_message,
                self._down,
                heartbeat=(sock, self.heartbeats),
                device=self._nccl_device(backend),
                keep_alive=store,
            )
            self._add(world)
            return world.info()
        except (TimeoutError, RuntimeError, OSError) as exc:
            if sock is not None:
                sock.close()
            reason = f"could not join {peer}: {_describe(exc)}"
            self._fail(name, reason)
            raise WorldBroken(name, reason) from None
        finally:
            self.opening.pop(name, None)

    def _make_group(self, store: Any, rank: int, backend: str) -> Any:
        timeout = datetime.timedelta(seconds=self.options.open_timeout_s)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(store, rank, 2, options)
            # NCCL connects lazily; one tiny op makes the open fail here, not at first use.
            pg.allreduce([torch.zeros(1, device=self.device)]).wait(timeout)
            return pg
        options = dist.ProcessGroupGloo._Options()
        options._devices = [self._gloo_device]
        options._timeout = timeout
        options._threads = 1  # send/recv never use the group's worker threads
        return dist.ProcessGroupGloo(store, rank, 2, options)

    def _nccl_device(self, backend: str) -> torch.device | None:
        return self.device if backend == "nccl" else None

    # -- close, state ----------------------------------------------------------------

    async def close(self, name: str) -> bool:
        """Close a world on purpose, or forget the record of a broken one (the control plane
        has seen it); False if there was neither by that name."""
        recorded = self.failures.pop(name, None) is not None
        world = self.worlds.pop(name, None)
        if world is None:
            return recorded
        await world.close()
        return True

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(name) for name in list(self.worlds)))
        for task in list(self._tasks):
            task.cancel()
        self.heartbeats.close()

    def ready(self) -> list[World]:
        return [w for w in self.worlds.values() if w.state is WorldState.READY]

    def info(self) -> list[dict[str, Any]]:
        rows = [w.info() for w in self.worlds.values()]
        rows += [dict(info) for info in self.opening.values()]
        known = {row["name"] for row in rows}
        rows += [
            {"name": n, "state": WorldState.BROKEN.value, "reason": r}
            for n, r in self.failures.items()
            if n not in known
        ]
        return sorted(rows, key=lambda row: row["name"])

    def _add(self, world: World) -> None:
        self.failures.pop(world.name, None)
        self.worlds[world.name] = world
        self._on_ready(world)
        log.info(
            "world %s open (rank %d, %s) in %.1f ms",
            world.name,
            world.rank,
            world.backend,
            (time.monotonic() - world.opened_at) * 1e3,
        )

    def _down(self, world: World) -> None:
        if world.state is WorldState.BROKEN:
            self.failures[world.name] = world.reason
        if self.worlds.get(world.name) is world:
            del self.worlds[world.name]
        self._on_down(world)

    def _fail(self, name: str, reason: str) -> None:
        log.warning("world %s failed to open: %s", name, reason)
        self.failures[name] = reason

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _hello(role: bytes, name: str, token: str) -> bytes:
    """One end's hello: the world, the end's role (``host``: rank 0, ``join``: rank 1),
    and an HMAC of both under the deployment's token."""
    said = role + b" " + name.encode()
    proof = hmac.new(token.encode(), said, hashlib.sha256).hexdigest().encode()
    return _HELLO + said + b" " + proof + b"\n"


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only when the peer hangs up (its heartbeats may follow)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _accept_peer(listener: socket.socket, name: str, token: str, timeout_s: float) -> socket.socket:
    """The host's end of the heartbeat channel: the first connection whose hello proves
    it is world ``name``'s joining end gets the host's hello; any other is refused and
    the wait goes on (blocking, bounded: run on a thread of its own)."""
    deadline = time.monotonic() + timeout_s
    expected = _hello(b"join", name, token)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no peer of world {name} within {timeout_s:g} s")
        listener.settimeout(left)
        sock, address = listener.accept()
        try:
            sock.settimeout(min(left, max(1.0, timeout_s / 4)))  # a legit peer says it at once
            said = _read_exactly(sock, len(expected))
            if hmac.compare_digest(said, expected):
                sock.settimeout(timeout_s)
                sock.sendall(_hello(b"host", name, token))
                listener.close()  # one peer per world
                return sock
        except OSError:
            pass
        sock.close()
        log.warning("world %s: refused a heartbeat connection from %s:%d", name, *address[:2])


def _connect_peer(
    address: tuple[str, int], name: str, token: str, timeout_s: float
) -> socket.socket:
    """The joiner's end: connect, say its hello, and read the host's, which must prove
    it is world ``name``'s host."""
    sock = socket.create_connection(address, timeout=timeout_s)
    try:
        sock.sendall(_hello(b"join", name, token))
        expected = _hello(b"host", name, token)
        if not hmac.compare_digest(_read_exactly(sock, len(expected)), expected):
            raise OSError(
                f"heartbeat address {address[0]}:{address[1]} is not world {name}'s host "
                "(another world, or another deployment's token)"
            )
    except OSError:
        sock.close()
        raise
    return sock


def _address(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} address {value!r} is not host:port")
    return host, int(port)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
