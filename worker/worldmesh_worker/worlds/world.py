"""One world: a 2-rank process group between two workers, and its heartbeat channel.

Failure detection (why a broken peer is seen within a bound, never a group timeout):

* **Dead peer (SIGKILL, crash, pod deleted).** The kernel closes the peer's sockets.
  A Gloo receive blocked on the peer fails with "connection closed by peer" at once
  (about 13 ms here), and the heartbeat channel, a plain TCP connection owned by this
  world, reads EOF or a reset at its next beat. Either marks the world broken: tens of ms.
* **Frozen peer (SIGSTOP, a stuck host, a partition).** Its sockets stay open, so
  nothing fails by itself, and a Gloo op would wait for the group timeout. Both ends
  write one heartbeat byte every ``heartbeat_interval_s`` on the side channel; an end
  that reads nothing for ``heartbeat_timeout_s`` (0.8 s by default) marks the world
  broken. The heartbeats run on the worker's heartbeat thread (``heartbeat.py``), never
  on the event loop: a worker busy with its own work keeps beating, and a heartbeat
  never waits behind a Gloo op.

Bounded threads. Each world has a sender and a receiver thread. ``Backend.abort()``
does not wake a Gloo receive blocked in another thread, so the receiver never blocks
without a deadline: every receive waits at most ``receive_deadline_s``, and a sender
with nothing to send for a quarter of that sends a header-only KEEPALIVE, so a live
world never hits that deadline (a frozen peer does, which also closes the Gloo pair and
fails any send blocked on it). Liveness is the heartbeat channel's alone, so the
deadline only bounds how long a broken world's threads outlive it: keepalives as often
as heartbeats were half of an idle deployment's CPU, and every 0.4 s still a third. A world closed on purpose
sends CLOSE as its last message; the peer answers with its own CLOSE, which ends
both receivers at once. So every thread ends within a bound after a world goes
down, and nothing outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .heartbeat import Channel, Heartbeats
from .threads import in_own_thread
from .wire import HEADER_LEN, MalformedMessage, Message, MessageKind, decode, encode, parse_header

log = logging.getLogger(__name__)

HEADER_TAG = 0  # headers and payloads travel on tags of their own, so the receiver can
PAYLOAD_TAG = 1  # post the next header's receive before this payload's: no rendezvous stall


class WorldBroken(Exception):
    """The world cannot carry messages any more; its in-flight work must go elsewhere."""

    def __init__(self, world: str, reason: str) -> None:
        super().__init__(f"world {world} is broken: {reason}")
        self.world = world
        self.reason = reason


class WorldState(enum.StrEnum):
    OPENING = "opening"
    READY = "ready"
    BROKEN = "broken"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class WorldOptions:
    """Bounds of every blocking step of a world (seconds, bytes)."""

    open_timeout_s: float = 10.0  #: the pair must be connected within this
    op_timeout_s: float = 30.0  #: deadline of one send
    heartbeat_interval_s: float = 0.1
    heartbeat_timeout_s: float = 0.8  #: silence that marks a frozen peer
    max_message_bytes: int = 256 * 1024 * 1024  #: larger payloads break the world
    #: the longest one receive waits (its thread's bound once the peer froze); a sender
    #: with nothing to send sends a KEEPALIVE every quarter of it
    receive_deadline_s: float = 8.0


Handler = Callable[["World", Message], None]
DownHandler = Callable[["World"], None]


class World:
    """A live 2-rank group: ``send`` queues a message, ``on_message`` gets the peer's,
    ``on_down`` hears once when the world breaks or closes.

    ``pg`` may be a group this world owns (the normal case) or a view on a shared
    group (``owns_group=False``, used by the benchmark's shared-group baseline).
    All methods but the threads' own run on the event loop that built the world.
    """

    def __init__(
        self,
        name: str,
        peer: str,
        rank: int,
        peer_rank: int,
        pg: Any,
        options: WorldOptions,
        on_message: Handler,
        on_down: DownHandler,
        *,
        heartbeat: tuple[socket.socket, Heartbeats] | None = None,
        owns_group: bool = True,
        device: torch.device | None = None,
        keep_alive: Any = None,
    ) -> None:
        self.name = name
        self.peer = peer
        self.rank = rank
        self.backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        self.state = WorldState.READY
        self.reason = ""
        self.opened_at = time.monotonic()
        self.messages_sent = 0
        self.messages_received = 0
        self._peer_rank = peer_rank
        self._pg = pg
        self._owns_group = owns_group
        self._device = device  # NCCL worlds move header and payload to this GPU
        self._keep_alive = keep_alive  # the group's store: it must live as long as the group
        self._options = options
        self._on_message = on_message
        self._on_down = on_down  # broken or closed: its in-flight work must move
        self._loop = asyncio.get_running_loop()
        self._outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._heartbeats: Heartbeats | None = None
        self._channel: Channel | None = None
        self._teardown_task: asyncio.Future[None] | None = None
        self._closing_task: asyncio.Future[None] | None = None
        self._receiver = threading.Thread(
            target=self._receive_loop, name=f"recv:{name}", daemon=True
        )
        self._sender = threading.Thread(target=self._send_loop, name=f"send:{name}", daemon=True)
        self._receiver.start()
        self._sender.start()
        if heartbeat is not None:
            sock, self._heartbeats = heartbeat
            self._channel = self._heartbeats.watch(sock, peer, self._from_heartbeats)

    # -- public, on the loop ------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue ``message`` for the peer; raise WorldBroken if the world is down."""
        if self.state is not WorldState.READY:
            raise WorldBroken(self.name, self.reason or self.state.value)
        self._outbox.put(message)

    async def close(self) -> None:
        """Close on purpose: tell the peer goodbye (it does not count a failure), tear down."""
        if self.state in (WorldState.BROKEN, WorldState.CLOSED):
            return
        self.state = WorldState.CLOSED
        self.reason = "closed"
        self._on_down(self)
        if self._heartbeats is not None and self._channel is not None:
            self._heartbeats.stop(self._channel, goodbye=True)
        await self._teardown()

    def break_(self, reason: str) -> None:
        """Mark broken (idempotent): the router moves this world's work elsewhere."""
        if self.state in (WorldState.BROKEN, WorldState.CLOSED):
            return
        self.state = WorldState.BROKEN
        self.reason = reason
        log.warning("world %s (peer %s) broken: %s", self.name, self.peer, reason)
        self._on_down(self)
        self._teardown_task = asyncio.ensure_future(self._teardown())

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peer": self.peer,
            "rank": self.rank,
            "backend": self.backend,
            "state": self.state.value,
            "reason": self.reason,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
        }

    # -- teardown ---------------------------------------------------------------------

    async def _teardown(self) -> None:
        if self.state is WorldState.CLOSED:
            self._outbox.put(Message(MessageKind.CLOSE, ()))  # ends the peer's receiver
        self._outbox.put(None)
        if self._heartbeats is not None and self._channel is not None:
            self._heartbeats.stop(self._channel)
        await in_own_thread(self._join_threads, f"join:{self.name}")  # never the shared pool
        if self._owns_group:
            with contextlib.suppress(RuntimeError):
                self._pg.abort()  # NCCL: frees the communicator; Gloo: closes what is left
            self._pg = None
            self._keep_alive = None

    def _join_threads(self) -> None:
        bound = self._options.receive_deadline_s + self._options.op_timeout_s
        for thread in (self._sender, self._receiver):
            if thread is not threading.current_thread():
                thread.join(timeout=bound)
                if thread.is_alive():
                    log.error("world %s: thread %s did not stop", self.name, thread.name)

    # -- threads ---------------------------------------------------------------------

    def _report(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _send_loop(self) -> None:
        deadline = datetime.timedelta(seconds=self._options.op_timeout_s)
        # Only often enough that the peer's receive (``receive_deadline_s``) never waits
        # out a live world: liveness itself is the heartbeat channel's.
        idle = self._options.receive_deadline_s / 4
        keepalive = Message(MessageKind.KEEPALIVE, ())
        while True:
            try:
                message = self._outbox.get(timeout=idle)
            except queue.Empty:
                message = keepalive
            if message is None:
                return
            try:
                header, payload = encode(message)
            except ValueError as exc:  # our own bug, not the peer's: drop loudly, keep the world
                log.error("world %s: cannot encode a %s message: %s", self.name, message.kind, exc)
                continue
            try:
                if self._device is not None:
                    header = header.to(self._device)
                    payload = payload.to(self._device)
                sends = [self._pg.send([header], self._peer_rank, HEADER_TAG)]
                if payload.numel():
                    sends.append(self._pg.send([payload], self._peer_rank, PAYLOAD_TAG))
                for work in sends:
                    work.wait(deadline)
            except (RuntimeError, AttributeError) as exc:
                self._report(self.break_, f"send failed: {_first_line(exc)}")
                return
            if message.kind is MessageKind.CLOSE:
                return
            if message is not keepalive:
                self.messages_sent += 1

    def _receive_loop(self) -> None:
        # Live peers send at least a KEEPALIVE every receive_deadline_s / 4: silence past
        # this deadline means a frozen peer, or a world being torn down (see the module doc).
        silence = datetime.timedelta(seconds=self._options.receive_deadline_s)
        op = datetime.timedelta(seconds=self._options.op_timeout_s)
        pending = self._post(torch.empty(HEADER_LEN, dtype=torch.int64), HEADER_TAG)
        while True:
            try:
                header = self._wait(pending, silence)
                # The next header's receive is posted before this payload's (see the tags).
                pending = self._post(torch.empty(HEADER_LEN, dtype=torch.int64), HEADER_TAG)
                layout = parse_header(header, self._options.max_message_bytes)
                payload = torch.empty(layout.payload_nbytes, dtype=torch.uint8)
                if layout.payload_nbytes:
                    payload = self._wait(self._post(payload, PAYLOAD_TAG), op)
                message = decode(layout, payload)
            except MalformedMessage as exc:
                log.error("world %s: malformed message from %s: %s", self.name, self.peer, exc)
                self._report(self.break_, f"malformed message from {self.peer}: {exc}")
                return
            except (RuntimeError, AttributeError) as exc:
                if self.state is WorldState.READY:
                    self._report(self.break_, f"receive failed: {_first_line(exc)}")
                return
            if message.kind is MessageKind.CLOSE:
                self._report(self._peer_closed)
                return
            if message.kind is not MessageKind.KEEPALIVE:
                self.messages_received += 1
                self._report(self._deliver, message)

    def _post(self, buffer: torch.Tensor, tag: int) -> tuple[Any, torch.Tensor]:
        if self._device is not None:
            buffer = buffer.to(self._device)
        return self._pg.recv([buffer], self._peer_rank, tag), buffer

    def _wait(self, posted: tuple[Any, torch.Tensor], deadline: datetime.timedelta) -> torch.Tensor:
        work, buffer = posted
        work.wait(deadline)
        return buffer.cpu() if self._device is not None else buffer

    def _peer_closed(self) -> None:
        self._closing_task = asyncio.ensure_future(self.close())

    def _deliver(self, message: Message) -> None:
        if self.state is WorldState.READY:
            self._on_message(self, message)

    # -- heartbeat -----------------------------------------------------------------

    def _from_heartbeats(self, reason: str, goodbye: bool) -> None:
        """The heartbeat thread's one report on this world, moved onto its loop."""
        self._loop.call_soon_threadsafe(self._heartbeat_ended, reason, goodbye)

    def _heartbeat_ended(self, reason: str, goodbye: bool) -> None:
        if goodbye:
            self._peer_closed()
        else:
            self.break_(reason)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
