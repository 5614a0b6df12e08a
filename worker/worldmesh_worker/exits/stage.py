"""Early exits inside one stage worker: its ramps, the active set, and the ramps' answers.

A stage runs its active ramps inside its compute, right after their blocks (``taps``).
The front decides on each ramp's answer at once (``decide``, set by the stage to
``Front.ramp_answer``); any other stage sends its ramps' answers upstream in one EXIT
message per batch, and passes EXIT messages from below on upstream, hop by hop like
results, without forgetting the rows.

The front's ramp manager (in ``controller``) changes the active set; CONTROL
``{"ramps": [...]}`` carries it downstream, and to every new downstream world. A later
stage runs the union of what its upstream peers ask for: several fronts each manage
their own set (and ignore the answers of ramps they did not ask for).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..config import ConfigError, WorkerConfig
from ..metrics import WorkerMetrics
from ..models.base import stage_bounds
from ..peers import send_control
from ..worlds import Message, MessageKind, World
from .controller import ExitController
from .ramps import Ramp, RampFileError, check_sites, load_ramps, ramps_path

log = logging.getLogger(__name__)

#: a ramp's answer for some rows: (rows, ramp site, logits [rows, classes], cost in seconds)
Decide = Callable[[list[int], int, torch.Tensor, float], None]
#: sends rows' parts of tensors back upstream: (rows, kind, tensors, meta, dim=, keep=)
SendBack = Callable[..., None]


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


class StageExits:
    """A stage's early-exit state; with early exits off it has no ramps and does nothing."""

    def __init__(
        self,
        config: WorkerConfig,
        model: Any,
        metrics: WorkerMetrics,
        device: torch.device,
        send_back: SendBack,
        downstream: Callable[[], Iterable[World]],
    ) -> None:
        self.config = config
        self.model = model
        self.metrics = metrics
        self.device = device
        self._send_back = send_back
        self._downstream = downstream  # the ready downstream worlds
        self.ramps: dict[int, Ramp] = {}  # my ramps: block index -> ramp
        self.active: set[int] = set()  # the ramps this stage runs (when it owns them)
        self.sites: frozenset[int] = frozenset()  # the deployment's ramps
        self.classes = 0  # the ramps' class width
        self.controller: ExitController | None = None  # the front's
        self.decide: Decide | None = None  # the front's: decide on a ramp's answer at once
        self._asked: dict[str, set[int]] = {}  # not the front: upstream world -> its ramps
        self._first = 0  # my first block
        #: tuning: off the loop (a decision may take 250 ms), beside compute
        self._tuning = ThreadPoolExecutor(1, thread_name_prefix="tuning")
        if config.early_exits.enabled:
            self._load()

    def stop(self) -> None:
        self._tuning.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
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
        self._first = first
        self.ramps = {s: r.to(self.device) for s, r in ramps.items() if first <= s < end}
        self.sites = frozenset(sites)
        self.classes = ramp_set.classes
        self.active = set(sites)
        if self.config.is_front:
            if exits.policy == "fixed":
                shared = ramp_set.threshold if exits.threshold is None else exits.threshold
                thresholds = dict.fromkeys(sites, shared)
            else:  # online: every ramp starts closed and opens as labelled rows agree
                thresholds = dict.fromkeys(sites, 0.0)
            self.controller = ExitController(
                sites,
                thresholds,
                self.metrics,
                budget=exits.accuracy_budget,
                ramp_budget=exits.ramp_budget,
                policy=exits.policy,
                on_active=self.set_active,
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

    def status(self) -> dict[str, Any]:
        if self.controller is not None:
            return self.controller.status()
        return {"enabled": bool(self.active), "active": sorted(self.active)}

    # -- the active set ----------------------------------------------------------------

    def set_active(self, active: list[int]) -> None:
        """A new active set (the front's manager, or the union asked from upstream): apply
        it and pass it downstream."""
        if set(active) == self.active:
            return
        self.active = set(active)
        for world in self._downstream():
            send_control(world, {"ramps": active})

    def tell(self, world: World) -> None:
        """A new downstream world: it runs the ramps active here."""
        if self.config.early_exits.enabled:
            send_control(world, {"ramps": sorted(self.active)})

    def on_asked(self, world: World, meta: dict[str, Any]) -> None:
        """CONTROL from upstream: run the union of the ramps every upstream front asks for."""
        ramps = meta.get("ramps")
        if isinstance(ramps, list) and self.controller is None:
            self._asked[world.name] = {s for s in ramps if type(s) is int}
            self.set_active(sorted(set().union(*self._asked.values())))

    def upstream_gone(self, name: str) -> None:
        # (the last front gone: keep its set until a new front asks, nothing runs)
        if self._asked.pop(name, None) is not None and self._asked:
            self.set_active(sorted(set().union(*self._asked.values())))

    # -- ramp answers --------------------------------------------------------------------

    def taps(self, rows: list[int], answers: list[Any]) -> dict[int, Any]:
        """Callbacks that run my active ramps inside the stage compute (compute thread).

        The front decides on each ramp's answer at once (mid-stage). Other stages collect
        their ramps' answers in ``answers`` and send them in one EXIT message when the
        batch is computed: one message per ramp would cost the pipeline more than the
        ramps themselves (half the throughput with 17 ramps on EfficientNet-Lite0)."""
        if not self.ramps:
            return {}
        loop = asyncio.get_running_loop()
        decide = self.decide
        taps = {}
        for site, ramp in self.ramps.items():
            if site not in self.active:
                continue

            def tap(tensors: tuple[torch.Tensor, ...], site: int = site, ramp: Ramp = ramp) -> None:
                if tensors[0].is_cuda:  # the backbone's kernels are not the ramp's cost
                    torch.cuda.synchronize(tensors[0].device)
                start = time.perf_counter()
                logits = ramp(tensors).float().to("cpu")
                cost = time.perf_counter() - start
                if decide is not None:
                    loop.call_soon_threadsafe(decide, rows, site, logits, cost)
                else:
                    answers.append((site, logits, cost))

            taps[site - self._first] = tap
        return taps

    def send_answers(self, rows: list[int], answers: list[Any]) -> None:
        """One EXIT message upstream per origin: logits ``[ramps, rows, classes]``."""
        if not answers:
            return
        stacked = torch.stack([logits for _, logits, _ in answers])
        meta = {"ramps": [a[0] for a in answers], "costs": [a[2] for a in answers]}
        self._send_back(rows, MessageKind.EXIT, (stacked,), meta, dim=1, keep=True)

    def on_exit(self, world: World, message: Message) -> None:
        """Ramp answers from downstream: decide (front) or pass them on upstream."""
        problem = exit_problem(message, self.classes, self.sites)
        if problem is not None:  # checked whole before any of it is used
            world.break_(f"EXIT message {problem}")
            return
        ramps, costs = message.meta["ramps"], message.meta["costs"]
        rows = list(message.request_ids)
        if self.decide is None:  # a middle stage: my rows -> my upstream's rows
            answers = [
                (s, message.tensors[0][k], c)
                for k, (s, c) in enumerate(zip(ramps, costs, strict=True))
            ]
            self.send_answers(rows, answers)
            return
        for k, (site, cost) in enumerate(zip(ramps, costs, strict=True)):
            self.decide(rows, int(site), message.tensors[0][k], float(cost))
