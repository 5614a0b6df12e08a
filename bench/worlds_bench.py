"""Per-pair worlds against one shared group, failure detection, and world opening.

Forwarding: the same peer code (bench/world_peer.py, World objects, the real wire format
and threads) carries a closed-loop request/result flow either over per-pair 2-rank
groups opened by WorldManager (with heartbeats: the real thing) or over views on one
shared N-rank Gloo group (the baseline: what ``init_process_group`` would give).
Topologies: a chain (source -> middle -> sink), a fan (2 sources -> middle -> 2 sinks:
the middle holds four worlds) and a wide fan (32 sources -> middle -> 32 sinks: 64
worlds, two repetitions, one in each order; 65 processes share the 2 cores). Modes alternate within each
repetition, and the ratio is taken within the repetition.

Detection: this process holds a world with a peer process, SIGKILLs or SIGSTOPs it, and
times how long until the world is reported down here. Opening: the time from the host's
open call to both ends ready, 500 times over (its tail is the figure: with TCPStore as
the rendezvous, one open in fifty waited 5 s on a reverse DNS lookup).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from common import Figure, median, percentile

from worldmesh_worker.worlds import World, WorldManager, WorldOptions, WorldState

PEER = Path(__file__).with_name("world_peer.py")


class PeerProcess:
    def __init__(self, name: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(PEER), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    async def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"peer {self.name} exited (op {op})")
        return json.loads(line)

    async def started(self) -> None:
        assert self.process.stdout
        await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 120)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
        self.process.wait(timeout=30)


TOPOLOGIES = {
    # name: (sources, sinks) around one middle
    "chain": (["src-a"], ["sink-a"]),
    "fan": (["src-a", "src-b"], ["sink-a", "sink-b"]),
    # a middle worker with 64 worlds: 32 upstream, 32 downstream (65 processes)
    "fan64": ([f"src-{i:02d}" for i in range(32)], [f"sink-{i:02d}" for i in range(32)]),
}


async def forward_rate(topology: str, mode: str, seconds: float, floats: int, window: int) -> float:
    sources, sinks = TOPOLOGIES[topology]
    names = [*sources, "mid", *sinks]
    peers = {name: PeerProcess(name) for name in names}
    try:
        await asyncio.gather(*(p.started() for p in peers.values()))
        edges = [(s, "mid") for s in sources] + [("mid", s) for s in sinks]
        if mode == "pairs":
            for a, b in edges:
                host, joiner = sorted((a, b))
                hosted = await peers[host].call("host", peer=joiner)
                await peers[joiner].call("join", peer=host, heartbeat=hosted["heartbeat"])
            await asyncio.gather(
                *(
                    peers[n].call(
                        "wait_ready", peers=[b if a == n else a for a, b in edges if n in (a, b)]
                    )
                    for n in names
                )
            )
        else:
            timeout = datetime.timedelta(seconds=30)
            store = dist.TCPStore(
                "127.0.0.1", 0, len(names), True, wait_for_workers=False, timeout=timeout
            )
            ranks = {name: i for i, name in enumerate(names)}
            await asyncio.gather(
                *(
                    peers[n].call(
                        "shared",
                        store=f"127.0.0.1:{store.port}",
                        rank=ranks[n],
                        size=len(names),
                        ranks=ranks,
                    )
                    for n in names
                )
            )
        runs = [
            peers[s].call("run", role="sink", down=[], seconds=seconds, window=0, floats=floats)
            for s in sinks
        ]
        runs.append(
            peers["mid"].call(
                "run", role="middle", down=sinks, seconds=seconds, window=0, floats=floats
            )
        )
        runs += [
            peers[s].call(
                "run",
                role="source",
                down=["mid"],
                seconds=seconds,
                window=window,
                floats=floats,
                first_id=i * 10**12,
            )
            for i, s in enumerate(sources)
        ]
        results = await asyncio.gather(*runs)
        return sum(r["done"] for r in results) / seconds
    finally:
        for p in peers.values():
            p.stop()


async def forwarding(
    topology: str, reps: int, seconds: float, floats: int, window: int, name: str
) -> Figure:
    ratios, pairs, shared = [], [], []
    for rep in range(reps):
        order = ("pairs", "shared") if rep % 2 == 0 else ("shared", "pairs")
        rates = {}
        for mode in order:
            rates[mode] = await forward_rate(topology, mode, seconds, floats, window)
        pairs.append(rates["pairs"])
        shared.append(rates["shared"])
        ratios.append(rates["pairs"] / rates["shared"])
    return Figure(
        name,
        median(ratios),
        "x",
        ">= 0.99",
        f"shared group {median(shared):.0f} msg/s vs per-pair {median(pairs):.0f} msg/s",
        samples=ratios,
        detail={
            "pairs_msgs_per_s": pairs,
            "shared_msgs_per_s": shared,
            "floats": floats,
            "window": window,
            "seconds": seconds,
        },
    )


class Local:
    """This process's end of worlds with peer processes."""

    def __init__(self) -> None:
        self.down: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.manager = WorldManager(
            "aaa-bench",
            "127.0.0.1",
            WorldOptions(),
            lambda w, m: None,
            self._down,
            on_ready=self._ready,
        )

    def _down(self, world: World) -> None:
        self.down.setdefault(world.peer, time.monotonic())

    def _ready(self, world: World) -> None:
        self.ready[world.peer] = time.monotonic()

    async def open(self, peer: PeerProcess) -> float:
        """Open the world with ``peer``: this side hosts ('aaa-' sorts first). Seconds taken."""
        self.ready.pop(peer.name, None)
        start = time.monotonic()
        hosted = await self.manager.open(peer.name)
        await peer.call("join", peer=self.manager.worker, heartbeat=hosted["heartbeat"])
        while peer.name not in self.ready:
            await asyncio.sleep(0.0005)
        return self.ready[peer.name] - start


async def detection(sig: int, reps: int) -> list[float]:
    local = Local()
    times = []
    for _ in range(reps):
        peer = PeerProcess("zz-peer")
        try:
            await peer.started()
            await local.open(peer)
            await asyncio.sleep(0.3)  # a few heartbeats and keepalives flow first
            local.down.pop(peer.name, None)
            start = time.monotonic()
            os.kill(peer.process.pid, sig)
            while peer.name not in local.down:
                await asyncio.sleep(0.0005)
            times.append(local.down[peer.name] - start)
        finally:
            peer.stop()
    await local.manager.close_all()
    return times


async def opening(count: int) -> list[float]:
    local = Local()
    peer = PeerProcess("zz-peer")
    times = []
    try:
        await peer.started()
        for _ in range(count):
            times.append(await local.open(peer))
            world = next(iter(local.manager.worlds))
            await local.manager.close(world)
            while any(w.state is WorldState.READY for w in local.manager.worlds.values()):
                await asyncio.sleep(0.001)
    finally:
        peer.stop()
    return times


async def run(quick: bool = False) -> list[Figure]:
    reps = 1 if quick else 3
    seconds = 2.0 if quick else 5.0
    figures = [
        await forwarding(
            "chain",
            reps,
            seconds,
            256,
            16,
            "pipeline throughput, per-pair worlds ÷ one shared group (1 KiB messages)",
        ),
        await forwarding(
            "chain",
            reps,
            seconds,
            64 * 1024,
            8,
            "pipeline throughput, per-pair worlds ÷ one shared group (256 KiB messages)",
        ),
        await forwarding(
            "fan",
            reps,
            seconds,
            256,
            16,
            "a worker with four worlds (fan-in, fan-out), per-pair ÷ shared group",
        ),
    ]
    if not quick:
        figures.append(
            await forwarding(
                "fan64",
                2,  # one in each order
                seconds,
                256,
                2,
                "a worker with 64 worlds (32 in, 32 out), per-pair ÷ shared group",
            )
        )
    kill = await detection(signal.SIGKILL, 3 if quick else 10)
    figures.append(
        Figure(
            "SIGKILLed peer detected (worst of runs)",
            max(kill),
            "s",
            "<= 0.1",
            f"median {median(kill) * 1e3:.1f} ms over {len(kill)} kills",
            samples=kill,
        )
    )
    stop = await detection(signal.SIGSTOP, 3 if quick else 10)
    figures.append(
        Figure(
            "SIGSTOPped peer detected (worst of runs)",
            max(stop),
            "s",
            "<= 1",
            f"median {median(stop) * 1e3:.0f} ms over {len(stop)} freezes; heartbeat timeout 0.8 s",
            samples=stop,
        )
    )
    opens = await opening(50 if quick else 500)
    figures.append(
        Figure(
            "world open, per pair (p99)",
            percentile(opens, 99),
            "s",
            "<= 0.05",
            f"median {median(opens) * 1e3:.1f} ms, max {max(opens) * 1e3:.1f} ms "
            f"over {len(opens)} opens; {sum(t > 1.0 for t in opens)} over 1 s",
            samples=opens,
        )
    )
    return figures
