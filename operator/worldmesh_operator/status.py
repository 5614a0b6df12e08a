"""The live status of ``worldmesh run``: a table redrawn in place on a terminal, or a line
every few seconds otherwise, plus one line per action and note.

Requests/s and latency quantiles come from the front workers' ``/metrics`` (the change of
``worldmesh_requests_total`` and of the latency histogram since the last draw); queue
depth and worlds from the workers' control status.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


class StatusBoard:
    def __init__(self, out: Callable[[str], None] | None = None, every_s: float = 1.0) -> None:
        self.tty = out is None and sys.stdout.isatty()
        self.out = out or (lambda line: print(line, flush=True))
        self.every_s = every_s if self.tty else 5.0
        self.lines: list[str] = []
        self._last_draw = 0.0
        #: the last draw's time, and each front worker's request count and latency buckets
        self._last: tuple[float, dict[str, tuple[float, dict[float, float]]]] | None = None

    def event(self, action: object) -> None:
        self._log(f"{type(action).__name__} {_fields(action)}")

    def note(self, message: str) -> None:
        self._log(message)

    def _log(self, line: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {line}"
        self.lines = [*self.lines, line][-8:]
        if not self.tty:
            self.out(line)

    async def render(self, runtime: Any, summary: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last_draw < self.every_s:
            return
        self._last_draw = now
        rate, p50, p99 = await self._traffic(runtime)
        header = (
            f"{runtime.deployment}: {summary['phase']} ({summary.get('reason', '')})  "
            f"endpoint {runtime.endpoint or '-'}"
        )
        worlds = summary["worlds"]
        traffic = (
            f"requests/s {rate:.1f}  p50 {p50 * 1e3:.1f} ms  p99 {p99 * 1e3:.1f} ms  "
            f"worlds ready {worlds['ready']} opening {worlds['opening']} broken {worlds['broken']}"
        )
        rows = [f"{'stage':<6}{'desired':>8}{'ready':>7}{'queue':>7}  workers"]
        for stage in summary["stages"]:
            members = [w for w in runtime.workers.values() if w.stage == stage["stage"]]
            queue = sum(w.last.get("queueRows", 0) for w in members)
            names = " ".join(w.id for w in members)
            rows.append(
                f"{stage['stage']:<6}{stage['desired']:>8}{stage['ready']:>7}{queue:>7}  {names}"
            )
        if self.tty:
            self.out("\x1b[H\x1b[2J" + "\n".join([header, traffic, *rows, "", *self.lines]))
        else:
            self.out(
                f"{header} | {traffic} | "
                + "; ".join(
                    f"stage {s['stage']} {s['ready']}/{s['desired']}" for s in summary["stages"]
                )
            )

    async def _traffic(self, runtime: Any) -> tuple[float, float, float]:
        """Requests/s, p50 and p99 at the front since the last draw (from /metrics).

        Counted per front worker: one that left takes its counters with it (summed over the
        workers, the total fell and the rate came out negative), and one that joined since
        the last draw counts from zero."""
        seen: dict[str, tuple[float, dict[float, float]]] = {}
        front = [w for w in runtime.workers.values() if w.stage == 0 and w.handle is not None]
        for worker in front:
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(
                        f"http://{runtime.host}:{worker.handle.http_port}/metrics",
                        timeout=aiohttp.ClientTimeout(total=1),
                    ) as response,
                ):
                    text = await response.text()
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            total, buckets = 0.0, {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "worldmesh_requests_total":
                        total += sample.value
                    elif sample.name == "worldmesh_request_duration_seconds_bucket":
                        le = float(sample.labels["le"])
                        buckets[le] = buckets.get(le, 0.0) + sample.value
            seen[worker.id] = (total, buckets)
        now = time.monotonic()
        last, self._last = self._last, (now, seen)
        if last is None or now <= last[0]:
            return 0.0, 0.0, 0.0
        requests, delta = 0.0, {}
        for worker_id, (total, buckets) in seen.items():
            before_total, before = last[1].get(worker_id, (0.0, {}))
            if total < before_total:  # restarted counters: all of it is new
                before_total, before = 0.0, {}
            requests += total - before_total
            for le, count in buckets.items():
                delta[le] = delta.get(le, 0.0) + count - before.get(le, 0.0)
        return requests / (now - last[0]), _quantile(delta, 0.5), _quantile(delta, 0.99)


def _quantile(cumulative: dict[float, float], q: float) -> float:
    """The upper bound of the histogram bucket holding quantile ``q`` (0 when empty)."""
    if not cumulative:
        return 0.0
    bounds = sorted(cumulative)
    count = cumulative[bounds[-1]]
    if count <= 0:
        return 0.0
    for bound in bounds:
        if cumulative[bound] >= q * count:
            return bound if bound != float("inf") else bounds[-2]
    return bounds[-1]


def _fields(action: object) -> str:
    return " ".join(str(getattr(action, f)) for f in getattr(action, "__dataclass_fields__", {}))
