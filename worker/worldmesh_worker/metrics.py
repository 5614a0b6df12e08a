"""A worker's Prometheus metrics, in a registry of its own (no global default registry).

Every series carries ``deployment``, ``stage`` and ``worker``; names follow the
Prometheus conventions (``worldmesh_`` prefix, base units, ``_total`` counters).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WORLD_STATES = ("opening", "ready", "broken", "closed")


class WorkerMetrics:
    def __init__(
        self, registry: CollectorRegistry, deployment: str, stage: int, worker: str
    ) -> None:
        self.registry = registry
        base = ("deployment", "stage", "worker")
        values = (deployment, str(stage), worker)

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, base + extra, registry=registry)

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, base + extra, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, base, buckets=buckets, registry=registry)

        self._requests = counter(
            "worldmesh_requests", "Inference requests by HTTP status code.", "code"
        )
        self.request_duration = histogram(
            "worldmesh_request_duration_seconds",
            "Inference request latency at the front stage.",
            _LATENCY,
        ).labels(*values)
        self.queue_depth = gauge("worldmesh_queue_depth", "Rows waiting for a batch.").labels(
            *values
        )
        self.in_flight = gauge(
            "worldmesh_in_flight_rows", "Rows sent to the next stage and not yet answered."
        ).labels(*values)
        self.batch_size = histogram(
            "worldmesh_batch_size", "Rows per stage compute.", _BATCH
        ).labels(*values)
        self.compute_duration = histogram(
            "worldmesh_stage_compute_seconds", "Time of one stage compute (a batch).", _LATENCY
        ).labels(*values)
        self._worlds = gauge("worldmesh_worlds", "Worlds of this worker by state.", "state")
        self.world_failures = counter(
            "worldmesh_world_failures", "Worlds that broke (peer died, froze or misbehaved)."
        ).labels(*values)
        self.retries = counter(
            "worldmesh_retries", "Rows resent to another worker after a world went down."
        ).labels(*values)
        self.cancelled_rows = counter(
            "worldmesh_cancelled_rows",
            "Rows dropped here because their client went away or ran out of time (queued "
            "here, or cancelled downstream from here).",
        ).labels(*values)
        self.draining = gauge("worldmesh_draining", "1 while the worker drains.").labels(*values)
        # Early exits: exported by the front stage, which holds the tuner (label ramp = block).
        self._early_exits = counter(
            "worldmesh_early_exits", "Requests answered by an early-exit ramp.", "ramp"
        )
        self._ramp_threshold = gauge(
            "worldmesh_ramp_threshold", "A ramp's current threshold on 1 - max softmax.", "ramp"
        )
        self._ramp_active = gauge(
            "worldmesh_ramp_active", "1 if a ramp is active, 0 if off.", "ramp"
        )
        self._ramp_agreement = gauge(
            "worldmesh_ramp_agreement_ratio",
            "A ramp's agreement with the final answer over the recent window.",
            "ramp",
        )
        self._values = values

    def request(self, code: int) -> None:
        self._requests.labels(*self._values, str(code)).inc()

    def worlds(self, counts: dict[str, int]) -> None:
        for state in WORLD_STATES:
            self._worlds.labels(*self._values, state).set(counts.get(state, 0))

    def early_exits(self, ramp: int, n: int = 1) -> None:
        self._early_exits.labels(*self._values, str(ramp)).inc(n)

    def ramp(self, ramp: int, threshold: float, active: bool, agreement: float | None) -> None:
        """Export one ramp's state (agreement only once its window has labelled exits)."""
        labels = (*self._values, str(ramp))
        self._ramp_threshold.labels(*labels).set(threshold)
        self._ramp_active.labels(*labels).set(1 if active else 0)
        if agreement is not None:
            self._ramp_agreement.labels(*labels).set(agreement)
