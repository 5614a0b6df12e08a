"""A benchmark peer process: holds worlds and plays one role of a forwarding pipeline.

Driven by the benchmark over stdin/stdout, one JSON object per line:
  {"op": "host", "peer": NAME}                       -> {"heartbeat": ..}
  {"op": "join", "peer": NAME, "heartbeat": ..}      -> {"ready": NAME}
  {"op": "shared", "store": "h:p", "rank": R, "size": N, "ranks": {NAME: R}} -> {"ready": ...}
  {"op": "wait_ready", "peers": [..]}               -> {"ready": [..]} once all are open
  {"op": "run", "role": source|middle|sink, "down": [..], "seconds": S, "window": W,
   "floats": F, "first_id": I}                       -> {"done": N} (sources), {"done": 0}
Roles: a source keeps ``window`` BATCH messages of ``floats`` float32 in flight over its
downstream worlds (round robin) and counts RESULTs; a middle forwards BATCHes down and
RESULTs back up; a sink answers each BATCH with a small RESULT. The same World class
carries both modes: per-pair groups (the real thing) or views on one shared group.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import sys
import time

import torch
import torch.distributed as dist

from worldmesh_worker.worlds import Message, MessageKind, World, WorldManager, WorldOptions


class Peer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.worlds: dict[str, World] = {}  # by peer name
        self.handler = lambda world, message: None
        self.manager = WorldManager(
            name,
            "127.0.0.1",
            WorldOptions(),
            self._on_message,
            lambda world: None,
            on_ready=self._ready,
        )

    def _ready(self, world: World) -> None:
        self.worlds[world.peer] = world

    def _on_message(self, world: World, message: Message) -> None:
        if message.kind is not MessageKind.CONTROL:
            self.handler(world, message)

    async def shared(self, store: str, rank: int, size: int, ranks: dict[str, int]) -> None:
        host, port = store.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=30)

        def build() -> object:
            client = dist.TCPStore(host, int(port), size, False, timeout=timeout)
            options = dist.ProcessGroupGloo._Options()
            options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = timeout
            options._threads = 1
            return client, dist.ProcessGroupGloo(client, rank, size, options)

        self._store, pg = await asyncio.to_thread(build)
        for peer, peer_rank in ranks.items():
            if peer != self.name:
                self.worlds[peer] = World(
                    f"shared:{peer}",
                    peer,
                    rank,
                    peer_rank,
                    pg,
                    WorldOptions(),
                    self._on_message,
                    lambda world: None,
                    owns_group=False,
                )

    async def run(
        self,
        role: str,
        down: list[str],
        seconds: float,
        window: int,
        floats: int,
        first_id: int = 0,
    ) -> int:
        rows = torch.ones(1, floats)
        answer = torch.ones(1, 10)
        if role == "sink":
            self.handler = lambda world, m: world.send(
                Message(MessageKind.RESULT, m.request_ids, (answer,))
            )
            await asyncio.sleep(seconds + 2)
            return 0
        downstream = [self.worlds[p] for p in down]
        turn = itertools.cycle(downstream)
        if role == "middle":
            origin: dict[int, World] = {}

            def forward(world: World, m: Message) -> None:
                if m.kind is MessageKind.BATCH:
                    origin[m.request_ids[0]] = world
                    next(turn).send(m)
                else:
                    origin.pop(m.request_ids[0]).send(m)

            self.handler = forward
            await asyncio.sleep(seconds + 2)
            return 0
        done = 0
        stop = time.monotonic() + seconds
        ids = itertools.count(first_id)

        def send_one() -> None:
            next(turn).send(Message(MessageKind.BATCH, (next(ids),), (rows,)))

        def on_result(world: World, m: Message) -> None:
            nonlocal done
            done += 1
            if time.monotonic() < stop:
                send_one()

        self.handler = on_result
        for _ in range(window):
            send_one()
        await asyncio.sleep(seconds)
        return done


async def main() -> None:
    peer = Peer(sys.argv[1])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"pid": __import__("os").getpid()}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "host":
            reply = await peer.manager.open(cmd["peer"])
        elif op == "join":
            reply = await peer.manager.open(cmd["peer"], heartbeat=cmd["heartbeat"])
        elif op == "shared":
            await peer.shared(**cmd)
            reply = {"ready": sorted(peer.worlds)}
        elif op == "wait_ready":
            while not set(cmd["peers"]) <= set(peer.worlds):
                await asyncio.sleep(0.001)
            reply = {"ready": sorted(peer.worlds)}
        elif op == "run":
            reply = {"done": await peer.run(**cmd)}
        elif op == "close":
            await peer.manager.close_all()
            reply = {"closed": True}
        else:
            reply = {"error": f"unknown op {op}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    asyncio.run(main())
