"""One stage worker: batches rows, runs its slice of the model, and keeps every row moving.

Rows flow downstream in BATCH messages and their last-stage results flow back, hop
by hop, on the same worlds in RESULT messages, so each hop keeps the rows it sent
until they are answered and can resend them when a world breaks (see ``router``).
Every hop names rows with ids of its own and remembers, for each, the upstream
world and id it came with; a result whose upstream world is gone is dropped (the
request it belonged to is being retried upstream).

``Stage`` is the core: lifecycle, the compute loop, dispatch of peers' messages by
kind and role, and rows back upstream. It delegates by role:

- ``front.Front`` (stage 0 only, else ``front`` is None): the requests, their
  admission and their answers;
- ``peers.Peers``: the worlds' roles (UP/DOWN), opening and closing them, flow control
  and drain;
- ``exits.stage.StageExits``: early exits (ramps run inside the compute, their answers,
  the active set).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .batching import BatchQueue, Item, concat
from .config import WorkerConfig
from .exits.stage import StageExits
from .front import Front
from .metrics import WorkerMetrics
from .offload import Offload
from .peers import DOWN, UP, Peers
from .router import Router
from .worlds import Message, MessageKind, World, WorldManager

log = logging.getLogger(__name__)


class Stage:
    def __init__(self, config: WorkerConfig, model: Any, metrics: WorkerMetrics) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.device = torch.device(config.device)
        # Before the blocks move to the device: loading the ramps runs the model's blocks
        # on CPU example inputs to find each ramp's feature width (``.to`` moves them in
        # place). The peers come later, hence the late-bound ``downstream``.
        self.exits = StageExits(
            config,
            model,
            metrics,
            self.device,
            self._send_back,
            downstream=lambda: self.peers.downstream(),
        )
        self.module = model.stage(list(config.split_points), config.stage).to(self.device).eval()
        # Only the front waits for a batch to fill: later stages get rows already batched,
        # and batch what arrived while they computed; a second wait would only add latency.
        delay = config.batching.max_queue_delay_s if config.is_front else 0.0
        self.queue = BatchQueue(config.batching.max_batch_size, delay)
        self.manager = WorldManager(
            config.worker,
            config.host,
            config.worlds,
            self._on_message,
            self._on_world_down,
            self.device,
            on_ready=self._world_ready,
            token=config.token,  # both ends of a world prove they hold it
        )
        self.router: Router | None = None
        if not config.is_last:
            self.router = Router(
                self._deliver,
                self._fail,
                config.limits.max_retries,
                config.limits.request_timeout_s,
                on_retry=metrics.retries.inc,
            )
        self.peers = Peers(config, metrics, self.manager, self.router)
        self.origins: dict[int, tuple[str, int]] = {}  # my row -> (upstream world, its row)
        self._computing = 0
        self._ids = itertools.count(1)
        self.front: Front | None = None
        if config.is_front:
            self.front = Front(
                config,
                model,
                metrics,
                self.queue,
                self._ids,
                self.peers,
                self.router,
                self.exits.controller,
            )
            self.exits.decide = self.front.ramp_answer  # the front decides on ramp answers
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
        # A small model's batch is cheaper on the loop than handed to the compute thread.
        self._offload = Offload(self._compute)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._batch_loop()),
            asyncio.create_task(self._sweep_loop()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.manager.close_all()
        self._compute.shutdown(wait=False, cancel_futures=True)
        self.exits.stop()

    @property
    def accepting(self) -> bool:
        return self.peers.accepting

    @property
    def draining(self) -> bool:
        return self.peers.draining

    def drain(self) -> None:
        self.peers.drain()
        if self.front is not None:
            self.front.wake()  # requests waiting for room are refused now

    @property
    def drained(self) -> bool:
        if not self.draining or self.queue.rows or self._computing or self.origins:
            return False
        if self.front is not None and self.front.requests:
            return False
        if self.router is not None and self.router.in_flight:
            return False
        return self.peers.acknowledged()

    def status(self) -> dict[str, Any]:
        roles = self.peers.roles
        return {
            "worker": self.config.worker,
            "deployment": self.config.deployment,
            "stage": self.config.stage,
            "stages": self.config.stages,
            "model": self.config.model,
            "device": self.manager.identity,
            "accepting": self.accepting,
            "draining": self.draining,
            "drained": self.drained,
            "queueRows": self.queue.rows,
            "inFlightRows": self.router.in_flight if self.router else 0,
            "outstanding": self.router.outstanding() if self.router else {},
            "worlds": [dict(w, role=roles.get(w["name"])) for w in self.manager.info()],
            "earlyExits": self.exits.status(),
        }

    # -- worlds ----------------------------------------------------------------------

    def _world_ready(self, world: World) -> None:
        if self.peers.ready(world) == DOWN:
            self.exits.tell(world)

    def _on_world_down(self, world: World) -> None:
        if self.peers.down(world) == UP:
            self.exits.upstream_gone(world.name)
            for row in [r for r, (w, _) in self.origins.items() if w == world.name]:
                del self.origins[row]
        self.peers.count_worlds()
        self.peers.announce()

    # -- messages from peers -----------------------------------------------------------

    def _on_message(self, world: World, message: Message) -> None:
        role = self.peers.roles.get(world.name)
        kind = message.kind
        if kind is MessageKind.BATCH and role == UP:
            self._accept_rows(world, message)
        elif kind is MessageKind.CANCEL and role == UP:
            self._cancel_rows(world, message)
        elif kind in (MessageKind.RESULT, MessageKind.FAILED) and role == DOWN and self.router:
            self.router.on_message(world.name, message)
            self.metrics.in_flight.set(self.router.in_flight)
        elif kind is MessageKind.CONTROL and role == DOWN and self.router:
            self.peers.on_control_from_downstream(world, message.meta)
        elif kind is MessageKind.EXIT and role == DOWN:
            self.exits.on_exit(world, message)
        elif kind is MessageKind.CONTROL and role == UP:
            self.peers.on_control_from_upstream(world, message.meta)
            self.exits.on_asked(world, message.meta)
        else:
            world.break_(f"unexpected {kind.name} message from a {role or 'unknown'} peer")

    def _accept_rows(self, world: World, message: Message) -> None:
        n = len(message.request_ids)
        if not message.tensors or any(t.dim() == 0 or t.shape[0] != n for t in message.tensors):
            world.break_(f"BATCH with {n} ids whose tensors do not have {n} rows")
            return
        rows = [next(self._ids) for _ in range(n)]
        for row, upstream in zip(rows, message.request_ids, strict=True):
            self.origins[row] = (world.name, upstream)
        self.queue.put(Item(message.tensors, rows))
        self.metrics.queue_depth.set(self.queue.rows)

    def _cancel_rows(self, world: World, message: Message) -> None:
        """The upstream no longer wants these ids (their client went away or timed out):
        drop them from the queue, forget them, and cancel those already sent on."""
        wanted = set(message.request_ids)
        rows = [r for r, (w, up) in self.origins.items() if w == world.name and up in wanted]
        for row in rows:
            del self.origins[row]
        self.queue.drop(set(rows))
        self.metrics.queue_depth.set(self.queue.rows)
        if self.router is not None:
            self.router.cancel(rows)
            self.metrics.in_flight.set(self.router.in_flight)
        self.metrics.cancelled_rows.inc(len(rows))

    def _wanted(self, rows: list[int]) -> list[int]:
        """The indices of ``rows`` still wanted after their compute: those cancelled while
        it ran are not sent on."""
        if self.front is not None:
            requests = self.front.requests
            return [i for i, row in enumerate(rows) if row in requests]
        return [i for i, row in enumerate(rows) if row in self.origins]

    # -- compute ---------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        while True:
            items = await self.queue.next_batch()
            self.metrics.queue_depth.set(self.queue.rows)
            rows = [row for item in items for row in item.context]
            self.metrics.batch_size.observe(len(rows))
            self._computing += 1
            answers: list[Any] = []  # my ramps' answers, when not the front
            try:
                with self.metrics.compute_duration.time():
                    outputs = await self._offload.run(
                        len(rows), self._forward, concat(items), self.exits.taps(rows, answers)
                    )
            except Exception as exc:  # a model error fails these rows, never the worker
                log.exception("stage %d compute failed", self.config.stage)
                self._fail(rows, f"stage {self.config.stage} failed: {exc}")
                continue
            finally:
                self._computing -= 1
            self.exits.send_answers(rows, answers)
            wanted = self._wanted(rows)
            if not wanted:
                continue
            if len(wanted) < len(rows):
                index = torch.tensor(wanted)
                rows = [rows[i] for i in wanted]
                outputs = tuple(t.index_select(0, index) for t in outputs)
            if self.router is None:
                self._deliver(rows, outputs)
            else:
                self.router.dispatch(rows, outputs)
                self.metrics.in_flight.set(self.router.in_flight)

    def _forward(
        self, batch: tuple[torch.Tensor, ...], taps: dict[int, Any]
    ) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                # Stage through pinned host memory: async host-to-device copies, and Gloo
                # (which cannot send CUDA tensors) gets host tensors back.
                batch = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
            outputs = self.module.run(batch, taps) if taps else self.module(*batch)
            if not isinstance(outputs, tuple):
                outputs = (outputs,)
            return tuple(t.to("cpu") if t.device.type != "cpu" else t for t in outputs)

    async def _sweep_loop(self) -> None:
        # A lost row fails within 5% of its timeout (1 s of the default 30 s): no need to
        # wake an idle worker ten times a second for it.
        period = min(1.0, max(0.1, self.config.limits.request_timeout_s / 20))
        while True:
            await asyncio.sleep(period)
            if self.router is not None:
                self.router.sweep()
                self.metrics.in_flight.set(self.router.in_flight)

    # -- rows back upstream ------------------------------------------------------------

    def _deliver(self, rows: list[int], tensors: tuple[torch.Tensor, ...]) -> None:
        """Last-stage rows for ``rows``: finish requests (front) or send them upstream."""
        if self.front is not None:
            self.front.deliver(rows, tensors)
        else:
            self._send_back(rows, MessageKind.RESULT, tensors)

    def _fail(self, rows: list[int], error: str) -> None:
        if self.front is not None:
            self.front.fail(rows, error)
        else:
            self._send_back(rows, MessageKind.FAILED, (), {"error": error})

    def _send_back(
        self,
        rows: list[int],
        kind: MessageKind,
        tensors: tuple[torch.Tensor, ...],
        meta: dict[str, Any] | None = None,
        *,
        dim: int = 0,
        keep: bool = False,
    ) -> None:
        """Send each upstream world its rows of ``rows``, under its own ids, with their
        part of ``tensors`` (rows along ``dim``); their origins are forgotten unless
        ``keep``."""
        for world, indices, upstream in self._by_origin(rows, keep):
            index = torch.tensor(indices)
            part = tuple(t.index_select(dim, index) for t in tensors)
            message = Message(kind, tuple(upstream), part, {} if meta is None else meta)
            with contextlib.suppress(Exception):  # a broken world: upstream resends these rows
                world.send(message)

    def _by_origin(
        self, rows: list[int], keep: bool = False
    ) -> list[tuple[World, list[int], list[int]]]:
        """``rows`` grouped by upstream world (forgetting their origins unless ``keep``)."""
        groups: dict[str, tuple[list[int], list[int]]] = {}
        for i, row in enumerate(rows):
            origin = self.origins.get(row) if keep else self.origins.pop(row, None)
            if origin is None:
                continue  # its upstream world went down: the row is being retried up there
            indices, upstream = groups.setdefault(origin[0], ([], []))
            indices.append(i)
            upstream.append(origin[1])
        out = []
        for name, (indices, upstream) in groups.items():
            world = self.manager.worlds.get(name)
            if world is not None:
                out.append((world, indices, upstream))
        return out
