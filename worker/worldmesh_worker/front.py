"""The front stage's requests: admission, the request table, and the answers.

Only stage 0 takes requests (``Stage.front`` is None on every other stage). A request's
rows get ids of their own and join the batch queue; their last-stage results come back
(through the router, or straight from compute on a one-stage pipeline) and complete it.

Early exits: the ramps' answers (``ramp_answer``) release a request whose rows are all
confidently answered, but its rows run on to the last stage, whose answer labels the
exit for the tuner. At most ``2 x max batch x stages`` released rows may be running on:
a client answered early must not let the front run ahead of the pipeline (closed-loop
clients would pile up work below), so a new request waits for room, bounded by the
request timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .batching import BatchQueue, Item
from .config import WorkerConfig
from .errors import InvalidInput, Overloaded, ServiceUnavailable
from .exits.controller import ExitController
from .metrics import WorkerMetrics
from .offload import Offload
from .peers import Peers
from .protocol import InferRequest
from .router import Router


@dataclass(slots=True)
class _Request:
    rows: list[int]
    future: asyncio.Future[tuple[torch.Tensor, ...]]
    results: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    #: early exits: the released rows' ramp logits, and the future of the early answer
    early: asyncio.Future[int] | None = None
    ramp_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    exit: int = -1  #: the deepest ramp among the released rows

    @property
    def released(self) -> bool:
        return self.early is not None and self.early.done()


class Front:
    def __init__(
        self,
        config: WorkerConfig,
        model: Any,
        metrics: WorkerMetrics,
        queue: BatchQueue,
        ids: Iterator[int],
        peers: Peers,
        router: Router | None,
        controller: ExitController | None,
    ) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.queue = queue
        self._ids = ids  # the stage's row ids
        self.peers = peers
        self.router = router  # None on a one-stage pipeline
        self.controller = controller  # None without early exits
        self.requests: dict[int, _Request] = {}  # my row -> request
        self._running_on = 0  # released rows still running to the last stage
        self._running_on_limit = 2 * config.batching.max_batch_size * config.stages
        self._room = asyncio.Event()
        # Tokenizing a large batch of long texts takes a while: off the loop, unless cheap.
        self._preprocess = Offload(None)

    def wake(self) -> None:
        """Requests waiting for room check admission again (refused once draining)."""
        self._room.set()

    # -- admission -------------------------------------------------------------------

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request through the whole pipeline."""
        outputs, _ = await self.answer(inputs, early=False)
        return outputs

    async def serve(self, request: InferRequest) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Answer a decoded OIP request, whatever its transport: its outputs, and the
        response's parameters (``exit``: the ramp that answered, or ``"final"``, with early
        exits on). ``parameters.early_exit: false`` asks for the full model's answer."""
        early = request.parameters.get("early_exit", True)
        if not isinstance(early, bool):
            raise InvalidInput(f"parameters.early_exit: expected a boolean, got {early!r}")
        outputs, exit_ = await self.answer({i.name: i.data for i in request.inputs}, early)
        if self.controller is None:
            return outputs, {}
        return outputs, {"exit": "final" if exit_ is None else exit_}

    async def answer(
        self, inputs: dict[str, np.ndarray], early: bool = True
    ) -> tuple[dict[str, np.ndarray], int | None]:
        """Run one request; return its outputs and the ramp that answered (None: the final
        answer). With ``early`` and early exits on, the answer is released as soon as a
        ramp is confident for every row; the rows still run to the last stage, whose answer
        labels the exit for the tuner."""
        self._admit(0)
        given = max((len(v) for v in inputs.values() if np.ndim(v) > 0), default=1)
        try:
            tensors = await self._preprocess.run(given, self.model.preprocess, inputs)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        n = int(tensors[0].shape[0])
        if n == 0:
            raise InvalidInput("inputs: the batch dimension is 0")
        self._admit(n)
        # The wait for room is bounded by the request timeout, and admission is checked
        # again after it.
        loop = asyncio.get_running_loop()
        timeout = self.config.limits.request_timeout_s
        deadline = loop.time() + timeout
        while self.controller is not None and self._running_on >= self._running_on_limit:
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
        if self.controller is not None:
            request.early = loop.create_future()
            self.controller.start_request(rows, early)
        for row in rows:
            self.requests[row] = request
        self.queue.put(Item(tensors, rows))
        self.metrics.queue_depth.set(self.queue.rows)
        released = False
        try:
            late = ServiceUnavailable(f"no answer within {timeout:g} s", retry_after=1.0)
            if request.early is None:  # no ramps: one future, awaited without asyncio.wait
                try:
                    async with asyncio.timeout(timeout):
                        outputs = await request.future
                except TimeoutError:
                    raise late from None
                return self.model.postprocess(outputs), None
            waiting = {request.future, request.early}
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when="FIRST_COMPLETED")
            if request.future in done:
                outputs = request.future.result()
            elif request.early in done:
                released = True  # the rows run on: the final answer labels this exit
                logits = torch.cat([request.ramp_logits[r] for r in rows])
                # Counted here, as the client gets it: a final answer that arrived in the
                # same turn as the release wins (above), and is no early exit.
                assert self.controller is not None
                self.controller.on_release(request.exit)  # one early exit per request
                return self.model.postprocess((logits,)), request.early.result()
            else:
                raise late
        finally:
            if not released:
                pending = 0  # rows not yet back: their return would have made room
                for row in rows:
                    pending += self.requests.pop(row, None) is not None
                    if self.controller is not None:
                        self.controller.drop(row)
                if request.released:
                    # released, then this handler was cancelled or timed out: its rows
                    # can no longer give back their room when they return
                    self._running_on -= pending
                    self._room.set()
                if pending:
                    self._cancel(rows)
        return self.model.postprocess(outputs), None

    def _cancel(self, rows: list[int]) -> None:
        """Nobody waits for ``rows`` any more (the client went away, or its time ran out):
        drop those still queued here, and cancel those sent downstream."""
        cancelled = self.queue.drop(set(rows))
        self.metrics.queue_depth.set(self.queue.rows)
        if self.router is not None:
            cancelled += self.router.cancel(rows)
            self.metrics.in_flight.set(self.router.in_flight)
        self.metrics.cancelled_rows.inc(cancelled)

    def _admit(self, n: int) -> None:
        """Refuse a request of ``n`` rows while draining, not accepting or over the queue limit."""
        if self.peers.draining:
            raise ServiceUnavailable("this worker is draining", retry_after=1.0)
        if not self.peers.accepting:
            raise ServiceUnavailable(
                f"stage {self.config.stage + 1} has no live worker", retry_after=1.0
            )
        queued = self.queue.rows + len(self.requests)
        if n and queued + n > self.config.limits.max_queue_rows:
            raise Overloaded(
                f"{queued} rows queued, limit {self.config.limits.max_queue_rows}",
                retry_after=0.1,
            )

    # -- answers ---------------------------------------------------------------------

    def ramp_answer(self, rows: list[int], site: int, logits: torch.Tensor, cost: float) -> None:
        """A ramp's logits for ``rows``: release the requests it answers confidently."""
        assert self.controller is not None
        self.controller.on_cost(site, cost)
        probs = torch.softmax(logits.double(), dim=1).max(dim=1)
        confidence, labels = probs.values.tolist(), probs.indices.tolist()
        for i, row in enumerate(rows):
            request = self.requests.get(row)
            if request is None:
                continue
            if self.controller.on_ramp(row, site, confidence[i], labels[i]):
                request.ramp_logits[row] = logits[i : i + 1].clone()
                request.exit = max(request.exit, site)
                done = len(request.ramp_logits) == len(request.rows)
                if done and request.early is not None and not request.early.done():
                    request.early.set_result(request.exit)
                    self._running_on += len(request.rows)

    def deliver(self, rows: list[int], tensors: tuple[torch.Tensor, ...]) -> None:
        """Last-stage rows for ``rows``: label their exits, and finish their requests."""
        labels = tensors[0].argmax(dim=1).tolist() if self.controller is not None else []
        for i, row in enumerate(rows):
            request = self.requests.pop(row, None)
            if self.controller is not None:
                self.controller.on_final(row, labels[i])
                self._ran_on(request)
            if request is None or request.future.done():
                continue
            request.results[row] = tuple(t[i : i + 1] for t in tensors)
            if len(request.results) == len(request.rows):
                parts = [request.results[r] for r in request.rows]
                request.future.set_result(
                    tuple(torch.cat(cols) for cols in zip(*parts, strict=True))
                )

    def fail(self, rows: list[int], error: str) -> None:
        """``rows`` failed for good: fail their requests (unless already answered early)."""
        for row in rows:
            request = self.requests.pop(row, None)
            if self.controller is not None:
                self.controller.drop(row)
                self._ran_on(request)
            if request is not None and not request.future.done() and not request.released:
                request.future.set_exception(ServiceUnavailable(error, retry_after=1.0))

    def _ran_on(self, request: _Request | None) -> None:
        """A row of ``request`` left the pipeline: if it had been released, make room."""
        if request is not None and request.released:
            self._running_on -= 1
            self._room.set()
