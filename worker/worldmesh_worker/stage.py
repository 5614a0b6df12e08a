"""One stage worker: batches rows, runs its slice of the model, and keeps every row moving.

Rows flow downstream in BATCH messages and their last-stage results flow back, hop
by hop, on the same worlds in RESULT messages, so each hop keeps the rows it sent
until they are answered and can resend them when a world breaks (see ``router``).
Every hop names rows with ids of its own and remembers, for each, the upstream
world and id it came with; a result whose upstream world is gone is dropped (the
request it belonged to is being retried upstream).

Flow control: a worker tells its upstream peers whether it is *accepting* (not
draining, and the last stage or with a live path further down). Drain announces
"not accepting" and is done when every upstream peer has acknowledged it (worlds
are FIFO, so nothing sent before the acknowledgement is still on its way) and no
row is queued, computing or in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .batching import BatchQueue, Item, concat
from .config import WorkerConfig
from .errors import InvalidInput, Overloaded, ServiceUnavailable
from .metrics import WorkerMetrics
from .router import Router
from .worlds import Message, MessageKind, World, WorldManager, WorldState, world_name

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"


@dataclass(slots=True)
class _Request:
    rows: list[int]
    future: asyncio.Future[tuple[torch.Tensor, ...]]
    results: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)


class Stage:
    def __init__(self, config: WorkerConfig, model: Any, metrics: WorkerMetrics) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.device = torch.device(config.device)
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
        self.roles: dict[str, str] = {}  # world name -> UP or DOWN
        self.origins: dict[int, tuple[str, int]] = {}  # my row -> (upstream world, its row)
        self.requests: dict[int, _Request] = {}  # front only: my row -> request
        self.draining = False
        self._drain_seq = 0
        self._acks: dict[str, int] = {}  # upstream world -> last acknowledged announcement
        self._announced: bool | None = None
        self._computing = 0
        self._ids = itertools.count(1)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="compute")
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

    @property
    def accepting(self) -> bool:
        if self.draining:
            return False
        return self.router is None or self.router.has_live()

    def drain(self) -> None:
        if not self.draining:
            log.info("draining: no new work, finishing what is in flight")
            self.draining = True
            self.metrics.draining.set(1)
            self._announce()

    @property
    def drained(self) -> bool:
        if not self.draining or self.queue.rows or self._computing or self.requests or self.origins:
            return False
        if self.router is not None and self.router.in_flight:
            return False
        upstream = [n for n, role in self.roles.items() if role == UP and n in self.manager.worlds]
        return all(self._acks.get(name, 0) >= self._drain_seq for name in upstream)

    def status(self) -> dict[str, Any]:
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
            "worlds": [dict(w, role=self.roles.get(w["name"])) for w in self.manager.info()],
        }

    # -- worlds ----------------------------------------------------------------------

    async def open_world(self, peer: str, peer_stage: int, **kwargs: Any) -> dict[str, Any]:
        if peer_stage == self.config.stage + 1 and not self.config.is_last:
            role = DOWN
        elif peer_stage == self.config.stage - 1 and not self.config.is_front:
            role = UP
        else:
            raise ValueError(
                f"peerStage: {peer_stage} is not a neighbour of stage {self.config.stage} "
                f"(of {self.config.stages})"
            )
        name = world_name(self.config.worker, peer)
        self.roles[name] = role  # before its first message
        try:
            return await self.manager.open(peer, **kwargs)
        except Exception:
            if name not in self.manager.worlds:
                self.roles.pop(name, None)
            raise

    def _world_ready(self, world: World) -> None:
        self._count_worlds()
        if self.roles.get(world.name) == DOWN:
            assert self.router is not None
            self.router.add_world(world)
        else:
            self._send_control(world, {"accepting": self.accepting, "seq": self._drain_seq})

    async def close_world(self, name: str) -> bool:
        closed = await self.manager.close(name)
        self.roles.pop(name, None)
        return closed

    def _on_world_down(self, world: World) -> None:
        if world.state is WorldState.BROKEN:
            self.metrics.world_failures.inc()
        role = self.roles.get(world.name)
        if role == DOWN and self.router is not None:
            self.router.world_down(world.name)
        if self.manager.worlds.get(world.name) is None:
            self.roles.pop(world.name, None)
        if role == UP:
            self._acks.pop(world.name, None)
            for row in [r for r, (w, _) in self.origins.items() if w == world.name]:
                del self.origins[row]
        self._count_worlds()
        self._announce()

    def _count_worlds(self) -> None:
        counts: dict[str, int] = {}
        for row in self.manager.info():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        self.metrics.worlds(counts)

    def _announce(self) -> None:
        """Tell upstream peers when ``accepting`` changes; each announcement has a new
        sequence number, which a drain waits to see acknowledged by every upstream peer."""
        accepting = self.accepting
        if accepting == self._announced:
            return
        self._announced = accepting
        self._drain_seq += 1
        for name, role in self.roles.items():
            world = self.manager.worlds.get(name)
            if role == UP and world is not None:
                self._send_control(world, {"accepting": accepting, "seq": self._drain_seq})

    def _send_control(self, world: World, meta: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            world.send(Message(MessageKind.CONTROL, (), (), meta))

    # -- messages from peers -----------------------------------------------------------

    def _on_message(self, world: World, message: Message) -> None:
        role = self.roles.get(world.name)
        kind = message.kind
        if kind is MessageKind.BATCH and role == UP:
            self._accept_rows(world, message)
        elif kind in (MessageKind.RESULT, MessageKind.FAILED) and role == DOWN and self.router:
            self.router.on_message(world.name, message)
            self.metrics.in_flight.set(self.router.in_flight)
        elif kind is MessageKind.CONTROL and role == DOWN and self.router:
            accepting = message.meta.get("accepting")
            if isinstance(accepting, bool):
                self.router.set_accepting(world.name, accepting)
                self._send_control(world, {"ack": message.meta.get("seq", 0)})
                self._announce()
        elif kind is MessageKind.CONTROL and role == UP:
            ack = message.meta.get("ack")
            if isinstance(ack, int):
                self._acks[world.name] = ack
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

    # -- the front's requests --------------------------------------------------------

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request through the whole pipeline (front stage only)."""
        if self.draining:
            raise ServiceUnavailable("this worker is draining", retry_after=1.0)
        if not self.accepting:
            raise ServiceUnavailable(
                f"stage {self.config.stage + 1} has no live worker", retry_after=1.0
            )
        try:
            tensors = self.model.preprocess(inputs)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        n = int(tensors[0].shape[0])
        if n == 0:
            raise InvalidInput("inputs: the batch dimension is 0")
        if self.queue.rows + len(self.requests) + n > self.config.limits.max_queue_rows:
            raise Overloaded(
                f"{self.queue.rows + len(self.requests)} rows queued, limit "
                f"{self.config.limits.max_queue_rows}",
                retry_after=0.1,
            )
        rows = [next(self._ids) for _ in range(n)]
        request = _Request(rows, asyncio.get_running_loop().create_future())
        for row in rows:
            self.requests[row] = request
        self.queue.put(Item(tensors, rows))
        self.metrics.queue_depth.set(self.queue.rows)
        try:
            outputs = await asyncio.wait_for(request.future, self.config.limits.request_timeout_s)
        except TimeoutError:
            raise ServiceUnavailable(
                f"no answer within {self.config.limits.request_timeout_s:g} s", retry_after=1.0
            ) from None
        finally:
            for row in rows:
                self.requests.pop(row, None)
            if self.router is not None:
                self.router.forget(rows)
        return self.model.postprocess(outputs)

    # -- compute ---------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self.queue.next_batch()
            self.metrics.queue_depth.set(self.queue.rows)
            rows = [row for item in items for row in item.context]
            self.metrics.batch_size.observe(len(rows))
            self._computing += 1
            try:
                with self.metrics.compute_duration.time():
                    outputs = await loop.run_in_executor(
                        self._compute, self._forward, concat(items)
                    )
            except Exception as exc:  # a model error fails these rows, never the worker
                log.exception("stage %d compute failed", self.config.stage)
                self._fail(rows, f"stage {self.config.stage} failed: {exc}")
                continue
            finally:
                self._computing -= 1
            if self.router is None:
                self._deliver(rows, outputs)
            else:
                self.router.dispatch(rows, outputs)
                self.metrics.in_flight.set(self.router.in_flight)

    def _forward(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                # Stage through pinned host memory: async host-to-device copies, and Gloo
                # (which cannot send CUDA tensors) gets host tensors back.
                batch = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
            outputs = self.module(*batch)
            if not isinstance(outputs, tuple):
                outputs = (outputs,)
            return tuple(t.to("cpu") if t.device.type != "cpu" else t for t in outputs)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.router is not None:
                self.router.sweep()
                self.metrics.in_flight.set(self.router.in_flight)

    # -- answers ---------------------------------------------------------------------

    def _deliver(self, rows: list[int], tensors: tuple[torch.Tensor, ...]) -> None:
        """Last-stage rows for ``rows``: finish requests (front) or send them upstream."""
        if self.config.is_front:
            for i, row in enumerate(rows):
                request = self.requests.pop(row, None)
                if request is None or request.future.done():
                    continue
                request.results[row] = tuple(t[i : i + 1] for t in tensors)
                if len(request.results) == len(request.rows):
                    parts = [request.results[r] for r in request.rows]
                    request.future.set_result(
                        tuple(torch.cat(cols) for cols in zip(*parts, strict=True))
                    )
            return
        for world, indices, upstream in self._by_origin(rows):
            index = torch.tensor(indices)
            part = tuple(t.index_select(0, index) for t in tensors)
            self._send_upstream(world, Message(MessageKind.RESULT, tuple(upstream), part))

    def _fail(self, rows: list[int], error: str) -> None:
        if self.config.is_front:
            for row in rows:
                request = self.requests.pop(row, None)
                if request is not None and not request.future.done():
                    request.future.set_exception(ServiceUnavailable(error, retry_after=1.0))
            return
        for world, _, upstream in self._by_origin(rows):
            self._send_upstream(
                world, Message(MessageKind.FAILED, tuple(upstream), (), {"error": error})
            )

    def _by_origin(self, rows: list[int]) -> list[tuple[World, list[int], list[int]]]:
        groups: dict[str, tuple[list[int], list[int]]] = {}
        for i, row in enumerate(rows):
            origin = self.origins.pop(row, None)
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

    def _send_upstream(self, world: World, message: Message) -> None:
        with contextlib.suppress(Exception):  # a broken world: upstream resends these rows
            world.send(message)
