"""Worlds between this test process and a real worker process.

Covers:
- 200 worlds opened, used and closed in a loop (closed from either end) leave the file
  descriptor and thread counts of both processes flat;
- a malformed or oversized message from a peer breaks that world only, with a clear reason
  and log line: the worker lives on and its other worlds keep serving;
- an end whose event loop is busy with its own work (pure Python, holding the GIL as
  much as it can) for three heartbeat timeouts is not judged frozen by its peer, nor does
  it judge its peer frozen when the loop frees up: the heartbeats run on a thread of
  their own; a SIGSTOPped worker is judged frozen within the timeout;
- a world opens one port, its heartbeat listener, on the hosting worker's own address
  only (the rendezvous runs over that channel), and an open that no peer joins leaves no
  thread, socket or file descriptor behind once it has failed;
- a peer that proves itself and then sends a bad rendezvous frame (an unknown op, a field
  over the limit) or hangs up fails that open only, with a reason that names it; the
  host's next open with a good peer succeeds;
- a world's host refuses a heartbeat peer that is not the expected one (garbage, another
  deployment's token, the wrong rank) and goes on waiting: the expected peer then joins;
  a joiner with another token gives up on the host, naming why.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time

import pytest
import torch

from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline
from worldmesh_worker.worlds import (
    Message,
    MessageKind,
    WorldBroken,
    WorldManager,
    WorldOptions,
    WorldState,
)
from worldmesh_worker.worlds.manager import _hello
from worldmesh_worker.worlds.wire import HEADER_LEN, MAGIC

FAKE = "fake-s0"  # this process plays a stage-0 worker of the pipeline


def counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


class Peer:
    """A WorldManager in this process that records what it receives."""

    def __init__(self, token: str) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.down: list[str] = []
        self.manager = WorldManager(
            FAKE,
            "127.0.0.1",
            WorldOptions(),
            self._receive,
            lambda world: self.down.append(world.name),
            token=token,  # the pipeline's: its workers check it
        )

    def _receive(self, world, message: Message) -> None:
        if message.kind is not MessageKind.CONTROL:  # flow control is the stage's business
            self.inbox.put_nowait(message)

    async def open(self, worker) -> str:
        hosted = await worker.control.open_world(peer=FAKE, peerStage=0)
        info = await self.manager.open(worker.worker, heartbeat=hosted["heartbeat"])
        await wait_until(lambda: _state(worker, info["name"], "ready"), 10, "worker side ready")
        return info["name"]


async def _state(worker, name: str, state: str) -> dict | None:
    for world in await worker.control.worlds():
        if world["name"] == name and world["state"] == state:
            return world
    return None


async def test_opening_and_closing_200_worlds_leaks_nothing():
    async with LocalPipeline("toy", [2], [1, 1]) as pipeline:
        worker = pipeline.stage(1)[0]
        peer = Peer(pipeline.token)
        here = os.getpid()
        rows = torch.ones(3, 32)
        baseline = {}
        for i in range(200):
            name = await peer.open(worker)
            world = peer.manager.worlds[name]
            world.send(Message(MessageKind.BATCH, (i, i + 1, i + 2), (rows,)))
            answer = await asyncio.wait_for(peer.inbox.get(), 10)
            assert answer.kind is MessageKind.RESULT and answer.request_ids == (i, i + 1, i + 2)
            if i % 2:
                await peer.manager.close(name)
            else:
                await worker.control.close_world(name)
            await wait_until(lambda n=name: n not in peer.manager.worlds, 10, "closed here")
            await wait_until(lambda n=name: _gone(worker, n), 10, "closed there")
            if i == 19:
                await asyncio.sleep(0)  # counts once the first worlds' teardown has settled
                baseline = {"here": counts(here), "worker": counts(worker.pid)}
        after = {"here": counts(here), "worker": counts(worker.pid)}
        for side in ("here", "worker"):
            fds, threads = after[side]
            assert fds <= baseline[side][0] + 2, (side, baseline, after)
            assert threads <= baseline[side][1] + 1, (side, baseline, after)
        assert all(w["state"] != "broken" for w in await worker.control.worlds())


async def _gone(worker, name: str) -> bool:
    return all(w["name"] != name or w["state"] != "ready" for w in await worker.control.worlds())


@pytest.mark.parametrize("bad", ["garbage header", "oversized payload"])
async def test_malformed_message_breaks_only_that_world(bad):
    async with LocalPipeline("toy", [2], [1, 1], worlds={"maxMessageBytes": 65536}) as pipeline:
        worker = pipeline.stage(1)[0]
        peer = Peer(pipeline.token)
        name = await peer.open(worker)
        world = peer.manager.worlds[name]
        if bad == "garbage header":
            header = torch.full((HEADER_LEN,), 7, dtype=torch.int64)
            header[0] = MAGIC ^ 0xFF
            world._pg.send([header], 0, 0).wait()  # what a confused peer could put on the wire
            expected = "bad magic"
        else:
            world.send(Message(MessageKind.BATCH, (1,), (torch.ones(1, 32, 1024),)))
            expected = "payload of"
        broken = await wait_until(lambda: _state(worker, name, "broken"), 10, "world broken")
        assert "malformed message from fake-s0" in broken["reason"] and expected in broken["reason"]
        assert expected in worker.log_path.read_text()
        assert worker.process.poll() is None
        async with ClosedLoop(
            f"{pipeline.front.http_url}/v2/models/demo/infer", toy_request, 2
        ) as load:
            await load.answered(10)
        assert load.result.lost == 0, load.result.messages[:5]
        await peer.manager.close_all()


async def test_a_busy_end_is_not_judged_frozen_but_a_stopped_one_is():
    async with LocalPipeline("toy", [2], [1, 1]) as pipeline:
        worker = pipeline.stage(1)[0]
        peer = Peer(pipeline.token)
        name = await peer.open(worker)
        timeout = WorldOptions().heartbeat_timeout_s
        busy_until = time.monotonic() + 3 * timeout
        while time.monotonic() < busy_until:  # this loop's own work: nothing else runs on it
            sum(i * i for i in range(10_000))
        await asyncio.sleep(0.3)  # whatever the heartbeat thread reported reaches the loop
        assert peer.down == [], peer.down
        assert await _state(worker, name, "ready"), await worker.control.worlds()
        world = peer.manager.worlds[name]
        world.send(Message(MessageKind.BATCH, (1,), (torch.ones(1, 32),)))
        answer = await asyncio.wait_for(peer.inbox.get(), 10)
        assert answer.kind is MessageKind.RESULT

        os.kill(worker.pid, signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            await wait_until(lambda: peer.down == [name], 5, "the stopped worker's world broken")
            assert time.monotonic() - stopped_at < timeout + 0.5
            assert "no heartbeat" in peer.manager.failures[name]
        finally:
            os.kill(worker.pid, signal.SIGCONT)


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


async def test_a_rendezvous_listens_on_its_own_address_and_a_failed_open_leaves_nothing():
    down: list[str] = []
    manager = WorldManager(
        "aaa-s0",
        "127.0.0.7",
        WorldOptions(open_timeout_s=1.0),
        lambda world, message: None,
        lambda world: down.append(world.name),
    )
    here = os.getpid()
    await manager.open("zzz-s1")  # warm-up: the first open starts threads that stay
    await wait_until(lambda: not manager.opening, 10, "the warm-up open failed")
    before = counts(here)
    for _ in range(3):
        info = await manager.open("zzz-s1")  # hosted: this end sorts first; nobody joins
        assert set(info) & {"store", "heartbeat"} == {"heartbeat"}  # one port per world
        host, _, port = info["heartbeat"].rpartition(":")
        assert host == "127.0.0.7"
        assert reachable("127.0.0.7", int(port))
        assert not reachable("127.0.0.1", int(port)), "the world listens on every address"
        await wait_until(lambda: not manager.opening, 10, "the open failed")

    # The failed opens' threads end and their sockets close; a leak never gets there.
    def back() -> bool:  # (other tests' worlds in this process may still be going away)
        now = counts(here)
        return now[0] <= before[0] and now[1] <= before[1]

    try:
        await wait_until(back, 5, "the counts back")
    except TimeoutError:
        raise AssertionError(f"{counts(here)} (fds, threads), {before} before") from None
    await manager.close_all()


def refused(address: str, hello: bytes) -> bool:
    """Whether the host hangs up on a heartbeat connection that says ``hello``."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(hello)
        sock.settimeout(5)
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True


async def test_a_host_refuses_the_wrong_peers_and_takes_the_right_one():
    def manager(worker: str, host: str, token: str) -> WorldManager:
        return WorldManager(
            worker, host, WorldOptions(open_timeout_s=5.0), lambda w, m: None, lambda w: None,
            token=token,
        )  # fmt: skip

    host = manager("aaa-s0", "127.0.0.7", "ours")
    info = await host.open("zzz-s1")
    name = info["name"]
    for wrong in (
        b"GET / HTTP/1.1\r\n\r\n" + b" " * 80,  # not a world's hello at all
        _hello(b"join", name, "theirs"),  # another deployment's token
        _hello(b"host", name, "ours"),  # the wrong rank
        _hello(b"join", "aaa-s0~other-s1", "ours"),  # another world
    ):
        assert await asyncio.to_thread(refused, info["heartbeat"], wrong), wrong
    stranger = manager("zzz-s1", "127.0.0.8", "theirs")
    with pytest.raises(WorldBroken, match="another deployment's token"):
        await stranger.open("aaa-s0", heartbeat=info["heartbeat"])
    assert name in host.opening  # still waiting for its peer
    peer = manager("zzz-s1", "127.0.0.8", "ours")
    await peer.open("aaa-s0", heartbeat=info["heartbeat"])
    await wait_until(
        lambda: name in host.worlds and host.worlds[name].state is WorldState.READY,
        10,
        "the right peer joined",
    )
    for m in (host, peer, stranger):
        await m.close_all()


def _rendezvous_then(address: str, name: str, token: str, then: bytes) -> None:
    """Join world ``name`` at the heartbeat ``address`` as its peer would, then send
    ``then`` where the rendezvous requests belong, and hang up."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_hello(b"join", name, token))
        expected = _hello(b"host", name, token)
        assert sock.recv(len(expected), socket.MSG_WAITALL) == expected
        sock.sendall(then)
        sock.shutdown(socket.SHUT_WR)  # and nothing more
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            sock.recv(1024)  # until the host hangs up (or answers with an error frame)


@pytest.mark.parametrize(
    "then, reason",
    [
        (b"\x00\x00", "unknown op byte 0"),
        (b"S\x01\xff\xff\xff\xff", "field of 4294967295 bytes"),
        (b"", "hung up"),
    ],
    ids=["unknown-op", "oversized-field", "hangs-up"],
)
async def test_a_bad_rendezvous_fails_that_open_only_with_a_clear_reason(then, reason):
    def manager(worker: str, host: str) -> WorldManager:
        return WorldManager(
            worker, host, WorldOptions(open_timeout_s=5.0), lambda w, m: None, lambda w: None,
            token="ours",
        )  # fmt: skip

    host = manager("aaa-s0", "127.0.0.7")
    info = await host.open("zzz-s1")
    name = info["name"]
    await asyncio.to_thread(_rendezvous_then, info["heartbeat"], name, "ours", then)
    await wait_until(lambda: name not in host.opening, 10, "the open failed")
    assert reason in host.failures[name], host.failures[name]
    assert name not in host.worlds

    peer = manager("zzz-s1", "127.0.0.8")
    info = await host.open("zzz-s1")
    await peer.open("aaa-s0", heartbeat=info["heartbeat"])
    await wait_until(
        lambda: name in host.worlds and host.worlds[name].state is WorldState.READY,
        10,
        "a good peer joined afterwards",
    )
    for m in (host, peer):
        await m.close_all()
