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

Early exits (``config.early_exits``): a stage runs its active ramps inside its compute,
right after their blocks, and sends each ramp's logits upstream at once (EXIT messages,
passed on hop by hop like results, without forgetting the rows). The front decides
(``exits.controller``): a request whose rows are all confidently answered is released
to the client, but its rows run on to the last stage, whose answer labels the exit. The
front's ramp manager changes the active set; CONTROL ``{"ramps": [...]}`` carries it
downstream (and to every new downstream world).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .batching import BatchQueue, Item, concat
from .config import ConfigError, WorkerConfig
from .errors import InvalidInput, Overloaded, ServiceUnavailable
from .exits.controller import ExitController
from .exits.ramps import Ramp, RampFileError, check_sites, load_ramps, ramps_path
from .metrics import WorkerMetrics
from .models.base import stage_bounds
from .router import Router
from .worlds import Message, MessageKind, World, WorldManager, WorldState, world_name

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"


@dataclass(slots=True)
class _Request:
    rows: list[int]
    future: asyncio.Future[tuple[torch.Tensor, ...]]
    results: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    #: early exits: the released rows' ramp logits, and the future of the early answer
    early: asyncio.Future[int] | None = None
    ramp_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    exit: int = -1  #: the deepest ramp among the released rows


def exit_problem(message: Message, classes: int, sites: frozenset[int]) -> str | None:
    """What is wrong with an EXIT message (None: nothing): ``meta`` ``ramps`` (known ramp
    sites, ints) and ``costs`` (finite seconds >= 0), one list entry per ramp, and one
    float tensor ``[ramps, ids, classes]`` of finite logits."""
    ramps, costs = message.meta.get("ramps"), message.meta.get("costs")
    n = len(message.request_ids)
    if not isinstance(ramps, list) or not isinstance(costs, list) or len(costs) != len(ramps):
        return "whose meta lacks equal-length lists 'ramps' and 'costs'"
    for site in ramps:
        if type(site) is not int or site not in sites:
            return f"with ramp {site!r}, not one of the deployment's ramps {sorted(sites)}"
    for cost in costs:
        if type(cost) not in (int, float) or not math.isfinite(cost) or cost < 0:
            return f"with ramp cost {cost!r}, not a finite number of seconds"
    if len(message.tensors) != 1:
        return f"with {len(message.tensors)} tensors, not one"
    logits = message.tensors[0]
    want = (len(ramps), n, classes)
    if tuple(logits.shape) != want:
        return (
            f"whose logits have shape {list(logits.shape)}, not {list(want)} (ramps, ids, classes)"
        )
    if not logits.is_floating_point() or not bool(torch.isfinite(logits).all()):
        return "whose logits are not finite floats"
    return None


class Stage:
    def __init__(self, config: WorkerConfig, model: Any, metrics: WorkerMetrics) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.device = torch.device(config.device)
        self.ramps: dict[int, Ramp] = {}  # my ramps: block index -> ramp
        self.ramp_active: set[int] = set()  # the ramps this stage runs (when it owns them)
        self._asked: dict[str, set[int]] = {}  # not the front: upstream world -> its ramps
        self.exits: ExitController | None = None  # the front's, when early exits are on
        self.ramp_sites: frozenset[int] = frozenset()  # the deployment's ramps
        self._ramp_classes = 0  # the ramps' class width
        self._running_on = 0  # front: released rows still running to the last stage
        self._running_on_limit = 2 * config.batching.max_batch_size * config.stages
        self._room = asyncio.Event()
        if config.early_exits.enabled:
            # before the blocks move to the device: loading runs the model's blocks on CPU
            # example inputs to find each ramp's feature width (``.to`` moves them in place)
            self._load_ramps()
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
        #: early-exit tuning: off the loop (a decision may take 250 ms), beside compute
        self._tuning = ThreadPoolExecutor(1, thread_name_prefix="tuning")
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
        self._tuning.shutdown(wait=False, cancel_futures=True)

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
            self._room.set()  # requests waiting for room are refused now
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
            "earlyExits": self.exits_status(),
        }

    # -- early exits -----------------------------------------------------------------

    def _load_ramps(self) -> None:
        """Load my ramps from the ramps file; ``ConfigError`` naming the field otherwise."""
        exits = self.config.early_exits
        path = exits.ramps_file or str(ramps_path(self.model.name))
        try:
            check_sites(self.model, exits.ramps)
            ramp_set = load_ramps(path, self.model)
            sites = list(exits.ramps) or sorted(ramp_set.ramps)
            ramps = ramp_set.select(sites)
        except RampFileError as exc:
            raise ConfigError(f"earlyExits.rampsFile: {exc}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        first, end = stage_bounds(self.model, list(self.config.split_points), self.config.stage)
        self.ramps = {s: r.to(self.device) for s, r in ramps.items() if first <= s < end}
        self.ramp_sites = frozenset(sites)
        self._ramp_classes = ramp_set.classes
        self.ramp_active = set(sites)
        if self.config.is_front:
            if exits.policy == "fixed":
                shared = ramp_set.threshold if exits.threshold is None else exits.threshold
                thresholds = dict.fromkeys(sites, shared)
            else:  # online: every ramp starts closed and opens as labelled rows agree
                thresholds = dict.fromkeys(sites, 0.0)
            self.exits = ExitController(
                sites,
                thresholds,
                self.metrics,
                budget=exits.accuracy_budget,
                ramp_budget=exits.ramp_budget,
                policy=exits.policy,
                on_active=self._set_ramps,
                offload=self._tune_off_loop,
            )

    def _tune_off_loop(self, work: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run an early-exit tune on its own thread, and adopt it back on the loop."""
        future = asyncio.get_running_loop().run_in_executor(self._tuning, work)

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.warning(
                    "early-exit tuning failed: %s", None if f.cancelled() else f.exception()
                )
                then(None)
            else:
                then(f.result())

        future.add_done_callback(done)

    def exits_status(self) -> dict[str, Any]:
        if self.exits is not None:
            return self.exits.status()
        return {"enabled": bool(self.ramp_active), "active": sorted(self.ramp_active)}

    def _set_ramps(self, active: list[int]) -> None:
        """A new active set (the front's manager, or the union asked from upstream): apply
        it and pass it downstream."""
        if set(active) == self.ramp_active:
            return
        self.ramp_active = set(active)
        for name, role in self.roles.items():
            world = self.manager.worlds.get(name)
            if role == DOWN and world is not None and world.state is WorldState.READY:
                self._send_control(world, {"ramps": active})

    def _taps(self, rows: list[int], answers: list[Any]) -> dict[int, Any]:
        """Callbacks that run my active ramps inside the stage compute (compute thread).

        The front decides on each ramp's answer at once (mid-stage). Other stages collect
        their ramps' answers in ``answers`` and send them in one EXIT message when the
        batch is computed: one message per ramp would cost the pipeline more than the
        ramps themselves (half the throughput with 17 ramps on EfficientNet-Lite0)."""
        if not self.ramps:
            return {}
        loop = asyncio.get_running_loop()
        taps = {}
        for site, ramp in self.ramps.items():
            if site not in self.ramp_active:
                continue

            def tap(tensors: tuple[torch.Tensor, ...], site: int = site, ramp: Ramp = ramp) -> None:
                if tensors[0].is_cuda:  # the backbone's kernels are not the ramp's cost
                    torch.cuda.synchronize(tensors[0].device)
                start = time.perf_counter()
                logits = ramp(tensors).float().to("cpu")
                cost = time.perf_counter() - start
                if self.exits is not None:
                    loop.call_soon_threadsafe(self._ramp_answer, rows, site, logits, cost)
                else:
                    answers.append((site, logits, cost))

            taps[self._local_index(site)] = tap
        return taps

    def _send_ramp_answers(self, rows: list[int], answers: list[Any]) -> None:
        """One EXIT message upstream per origin: logits ``[ramps, rows, classes]``."""
        if not answers:
            return
        stacked = torch.stack([logits for _, logits, _ in answers])
        meta = {"ramps": [a[0] for a in answers], "costs": [a[2] for a in answers]}
        for world, indices, upstream in self._by_origin(rows, keep=True):
            part = stacked.index_select(1, torch.tensor(indices))
            self._send_upstream(world, Message(MessageKind.EXIT, tuple(upstream), (part,), meta))

    def _local_index(self, site: int) -> int:
        first, _ = stage_bounds(self.model, list(self.config.split_points), self.config.stage)
        return site - first

    def _ramp_answer(self, rows: list[int], site: int, logits: torch.Tensor, cost: float) -> None:
        """A ramp's logits for ``rows`` (front): release the rows it answers confidently."""
        assert self.exits is not None
        self.exits.on_cost(site, cost)
        probs = torch.softmax(logits.double(), dim=1).max(dim=1)
        confidence, labels = probs.values.tolist(), probs.indices.tolist()
        for i, row in enumerate(rows):
            request = self.requests.get(row)
            if request is None:
                continue
            if self.exits.on_ramp(row, site, confidence[i], labels[i]):
                request.ramp_logits[row] = logits[i : i + 1].clone()
                request.exit = max(request.exit, site)
                done = len(request.ramp_logits) == len(request.rows)
                if done and request.early is not None and not request.early.done():
                    request.early.set_result(request.exit)
                    self._running_on += len(request.rows)
                    self.exits.on_release(request.exit)  # one early exit per request

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
            if self.config.early_exits.enabled:
                self._send_control(world, {"ramps": sorted(self.ramp_active)})
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
            # (the last front gone: keep its set until a new front asks, nothing runs)
            if self._asked.pop(world.name, None) is not None and self._asked:
                self._set_ramps(sorted(set().union(*self._asked.values())))
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
        elif kind is MessageKind.EXIT and role == DOWN:
            self._on_exit(world, message)
        elif kind is MessageKind.CONTROL and role == UP:
            ack = message.meta.get("ack")
            if isinstance(ack, int):
                self._acks[world.name] = ack
            ramps = message.meta.get("ramps")
            if isinstance(ramps, list) and self.exits is None:
                # Several fronts each manage their own ramps: run what any of them asks
                # for (each front decides on its own set and ignores the other answers).
                self._asked[world.name] = {s for s in ramps if type(s) is int}
                self._set_ramps(sorted(set().union(*self._asked.values())))
        else:
            world.break_(f"unexpected {kind.name} message from a {role or 'unknown'} peer")

    def _on_exit(self, world: World, message: Message) -> None:
        """Ramp answers from downstream: decide (front) or pass them on upstream."""
        problem = exit_problem(message, self._ramp_classes, self.ramp_sites)
        if problem is not None:  # checked whole before any of it is used
            world.break_(f"EXIT message {problem}")
            return
        ramps, costs = message.meta["ramps"], message.meta["costs"]
        rows = list(message.request_ids)
        if self.exits is None:  # a middle stage: my rows -> my upstream's rows
            answers = [
                (s, message.tensors[0][k], c)
                for k, (s, c) in enumerate(zip(ramps, costs, strict=True))
            ]
            self._send_ramp_answers(rows, answers)
            return
        for k, (site, cost) in enumerate(zip(ramps, costs, strict=True)):
            self._ramp_answer(rows, int(site), message.tensors[0][k], float(cost))

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
        outputs, _ = await self.answer(inputs, early=False)
        return outputs

    async def answer(
        self, inputs: dict[str, np.ndarray], early: bool = True
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """Run one request; return its outputs and the ramp that answered (None: the final
        answer). With ``early`` and early exits on, the answer is released as soon as a
        ramp is confident for every row; the rows still run to the last stage, whose answer
        labels the exit for the tuner (front stage only)."""
        self._admit(0)
        try:  # off the loop: tokenizing a large batch of long texts takes a while
            tensors = await asyncio.to_thread(self.model.preprocess, inputs)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        n = int(tensors[0].shape[0])
        if n == 0:
            raise InvalidInput("inputs: the batch dimension is 0")
        self._admit(n)
        # Released rows still run to the end: a client answered early must not let the
        # front run ahead of the pipeline (closed-loop clients would pile up work below).
        # The wait is bounded by the request timeout, and what it waited for is checked again.
        loop = asyncio.get_running_loop()
        timeout = self.config.limits.request_timeout_s
        deadline = loop.time() + timeout
        while self.exits is not None and self._running_on >= self._running_on_limit:
            self._room.clear()
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait_for(self._room.wait(), left)
            except TimeoutError:
                raise ServiceUnavailable(
                    f"no room within {timeout:g} s: {self._running_on} answered rows "
                    "still run to the last stage",
                    retry_after=1.0,
                ) from None
            self._admit(n)
        rows = [next(self._ids) for _ in range(n)]
        request = _Request(rows, loop.create_future())
        if self.exits is not None:
            request.early = loop.create_future()
            self.exits.start_request(rows, early)
        for row in rows:
            self.requests[row] = request
        self.queue.put(Item(tensors, rows))
        self.metrics.queue_depth.set(self.queue.rows)
        released = False
        try:
            waiting = {request.future} if request.early is None else {request.future, request.early}
            done, _ = await asyncio.wait(
                waiting, timeout=self.config.limits.request_timeout_s, return_when="FIRST_COMPLETED"
            )
            if request.future in done:
                outputs = request.future.result()
            elif request.early is not None and request.early in done:
                released = True  # the rows run on: the final answer labels this exit
                logits = torch.cat([request.ramp_logits[r] for r in rows])
                return self.model.postprocess((logits,)), request.early.result()
            else:
                raise ServiceUnavailable(
                    f"no answer within {self.config.limits.request_timeout_s:g} s",
                    retry_after=1.0,
                )
        finally:
            if not released:
                pending = 0  # rows not yet back: their return would have made room
                for row in rows:
                    pending += self.requests.pop(row, None) is not None
                    if self.exits is not None:
                        self.exits.drop(row)
                if request.early is not None and request.early.done():
                    # released, then this handler was cancelled or timed out: its rows
                    # can no longer give back their room when they return
                    self._running_on -= pending
                    self._room.set()
                if self.router is not None:
                    self.router.forget(rows)
        return self.model.postprocess(outputs), None

    def _admit(self, n: int) -> None:
        """Refuse a request of ``n`` rows while draining, not accepting or over the queue limit."""
        if self.draining:
            raise ServiceUnavailable("this worker is draining", retry_after=1.0)
        if not self.accepting:
            raise ServiceUnavailable(
                f"stage {self.config.stage + 1} has no live worker", retry_after=1.0
            )
        if n and self.queue.rows + len(self.requests) + n > self.config.limits.max_queue_rows:
            raise Overloaded(
                f"{self.queue.rows + len(self.requests)} rows queued, limit "
                f"{self.config.limits.max_queue_rows}",
                retry_after=0.1,
            )

    # -- compute ---------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self.queue.next_batch()
            self.metrics.queue_depth.set(self.queue.rows)
            rows = [row for item in items for row in item.context]
            self.metrics.batch_size.observe(len(rows))
            self._computing += 1
            answers: list[Any] = []  # my ramps' answers, when not the front
            try:
                with self.metrics.compute_duration.time():
                    outputs = await loop.run_in_executor(
                        self._compute, self._forward, concat(items), self._taps(rows, answers)
                    )
            except Exception as exc:  # a model error fails these rows, never the worker
                log.exception("stage %d compute failed", self.config.stage)
                self._fail(rows, f"stage {self.config.stage} failed: {exc}")
                continue
            finally:
                self._computing -= 1
            self._send_ramp_answers(rows, answers)
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
        while True:
            await asyncio.sleep(0.1)
            if self.router is not None:
                self.router.sweep()
                self.metrics.in_flight.set(self.router.in_flight)

    # -- answers ---------------------------------------------------------------------

    def _deliver(self, rows: list[int], tensors: tuple[torch.Tensor, ...]) -> None:
        """Last-stage rows for ``rows``: finish requests (front) or send them upstream."""
        if self.config.is_front:
            labels = tensors[0].argmax(dim=1).tolist() if self.exits is not None else []
            for i, row in enumerate(rows):
                request = self.requests.pop(row, None)
                if self.exits is not None:
                    self.exits.on_final(row, labels[i])
                    self._ran_on(request)
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

    def _ran_on(self, request: _Request | None) -> None:
        """A row of ``request`` left the pipeline: if it had been released, make room."""
        if request is not None and request.early is not None and request.early.done():
            self._running_on -= 1
            self._room.set()

    def _fail(self, rows: list[int], error: str) -> None:
        if self.config.is_front:
            for row in rows:
                request = self.requests.pop(row, None)
                if self.exits is not None:
                    self.exits.drop(row)
                    self._ran_on(request)
                released = (
                    request is not None and request.early is not None and request.early.done()
                )
                if request is not None and not request.future.done() and not released:
                    request.future.set_exception(ServiceUnavailable(error, retry_after=1.0))
            return
        for world, _, upstream in self._by_origin(rows):
            self._send_upstream(
                world, Message(MessageKind.FAILED, tuple(upstream), (), {"error": error})
            )

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

    def _send_upstream(self, world: World, message: Message) -> None:
        with contextlib.suppress(Exception):  # a broken world: upstream resends these rows
            world.send(message)
