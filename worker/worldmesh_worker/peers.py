"""A stage's peers: which worlds are upstream and downstream, flow control, and drain.

Every world joins this stage to a neighbour: the next stage (DOWN, where rows go) or
the previous one (UP, where they came from). A world's role is set when it is opened,
before its first message, and only a neighbour is accepted.

Flow control: a worker tells its upstream peers whether it is *accepting* (not
draining, and the last stage or with a live path further down). Each announcement has
a new sequence number, and the peer acknowledges it; worlds are FIFO, so once every
upstream peer has acknowledged "not accepting", nothing sent before is still on its
way. ``Stage.drained`` adds that no row is queued, computing or in flight.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from .config import WorkerConfig
from .metrics import WorkerMetrics
from .router import Router
from .worlds import Message, MessageKind, World, WorldManager, WorldState, world_name

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"


def send_control(world: World, meta: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):  # a broken world is cleaned up by its down handler
        world.send(Message(MessageKind.CONTROL, (), (), meta))


class Peers:
    def __init__(
        self,
        config: WorkerConfig,
        metrics: WorkerMetrics,
        manager: WorldManager,
        router: Router | None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.manager = manager
        self.router = router  # None on the last stage: nothing downstream
        self.roles: dict[str, str] = {}  # world name -> UP or DOWN
        self.draining = False
        self._drain_seq = 0
        self._acks: dict[str, int] = {}  # upstream world -> last acknowledged announcement
        self._announced: bool | None = None

    @property
    def accepting(self) -> bool:
        if self.draining:
            return False
        return self.router is None or self.router.has_live()

    def downstream(self) -> Iterator[World]:
        """The ready downstream worlds."""
        for name, role in list(self.roles.items()):
            world = self.manager.worlds.get(name)
            if role == DOWN and world is not None and world.state is WorldState.READY:
                yield world

    # -- opening and closing ---------------------------------------------------------

    async def open_world(self, peer: str, peer_stage: int, **kwargs: Any) -> dict[str, Any]:
        """Open a world to ``peer``; ValueError unless it runs a neighbouring stage."""
        stage, stages = self.config.stage, self.config.stages
        if peer_stage == stage + 1 and not self.config.is_last:
            role = DOWN
        elif peer_stage == stage - 1 and not self.config.is_front:
            role = UP
        else:
            raise ValueError(
                f"peerStage: {peer_stage} is not a neighbour of stage {stage} (of {stages})"
            )
        name = world_name(self.config.worker, peer)
        self.roles[name] = role  # before its first message
        try:
            return await self.manager.open(peer, **kwargs)
        except Exception:
            if name not in self.manager.worlds:
                self.roles.pop(name, None)
            raise

    async def close_world(self, name: str) -> bool:
        """Close world ``name``; False if there is none."""
        closed = await self.manager.close(name)
        self.roles.pop(name, None)
        return closed

    def ready(self, world: World) -> str | None:
        """``world`` is open: route to it (DOWN) or tell it whether I accept (UP); its role."""
        self.count_worlds()
        role = self.roles.get(world.name)
        if role == DOWN:
            assert self.router is not None
            self.router.add_world(world)
        else:
            send_control(world, {"accepting": self.accepting, "seq": self._drain_seq})
        return role

    def down(self, world: World) -> str | None:
        """``world`` broke or closed: stop routing to it and forget its state; its role."""
        if world.state is WorldState.BROKEN:
            self.metrics.world_failures.inc()
        role = self.roles.get(world.name)
        if role == DOWN and self.router is not None:
            self.router.world_down(world.name)
        if self.manager.worlds.get(world.name) is None:
            self.roles.pop(world.name, None)
        if role == UP:
            self._acks.pop(world.name, None)
        return role

    def count_worlds(self) -> None:
        counts: dict[str, int] = {}
        for row in self.manager.info():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        self.metrics.worlds(counts)

    # -- flow control and drain --------------------------------------------------------

    def on_control_from_downstream(self, world: World, meta: dict[str, Any]) -> None:
        """A downstream peer says whether it accepts: route accordingly and acknowledge."""
        assert self.router is not None  # a stage with downstream peers routes to them
        accepting = meta.get("accepting")
        if isinstance(accepting, bool):
            self.router.set_accepting(world.name, accepting)
            send_control(world, {"ack": meta.get("seq", 0)})
            self.announce()  # my own path further down may have changed

    def on_control_from_upstream(self, world: World, meta: dict[str, Any]) -> None:
        ack = meta.get("ack")
        if isinstance(ack, int):
            self._acks[world.name] = ack

    def announce(self) -> None:
        """Tell upstream peers when ``accepting`` changes, under a new sequence number."""
        accepting = self.accepting
        if accepting == self._announced:
            return
        self._announced = accepting
        self._drain_seq += 1
        for name, role in self.roles.items():
            world = self.manager.worlds.get(name)
            if role == UP and world is not None:
                send_control(world, {"accepting": accepting, "seq": self._drain_seq})

    def drain(self) -> None:
        if not self.draining:
            log.info("draining: no new work, finishing what is in flight")
            self.draining = True
            self.metrics.draining.set(1)
            self.announce()

    def acknowledged(self) -> bool:
        """Every upstream peer has acknowledged my last announcement."""
        upstream = [n for n, role in self.roles.items() if role == UP and n in self.manager.worlds]
        return all(self._acks.get(name, 0) >= self._drain_seq for name in upstream)
