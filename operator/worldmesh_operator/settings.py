"""The operator's settings, read once from its environment at start-up (the chart sets it).

Every variable the operator reads is named here and nowhere else; a bad value is an
error naming the variable. The kopf handlers keep one ``Settings`` in ``memo.settings``
(a test may put its own there before the operator starts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

#: One reconcile step a second: a dead worker is replaced, a new one wired, within a step
#: or two (each step lists the deployment's pods and asks each worker for its status).
#: A constant, not a setting: kopf's timers take their interval when the module loads.
RECONCILE_INTERVAL_S = 1.0
DEFAULT_IMAGE = "worldmesh/worldmesh-worker:0.1.0"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

WORKER_IMAGE = "WORLDMESH_WORKER_IMAGE"
WORKER_IMAGE_PULL_POLICY = "WORLDMESH_WORKER_IMAGE_PULL_POLICY"
PROMETHEUS_URL = "WORLDMESH_PROMETHEUS_URL"
SCRAPE_INTERVAL = "WORLDMESH_PROMETHEUS_SCRAPE_INTERVAL_S"
METRICS_PORT = "WORLDMESH_METRICS_PORT"
OPERATOR_POD = "WORLDMESH_OPERATOR_POD"
POD_IP = "POD_IP"


class SettingsError(ValueError):
    """An environment variable's value is not what it should be (the message names it)."""


@dataclass(frozen=True, slots=True)
class Settings:
    worker_image: str = DEFAULT_IMAGE
    worker_image_pull_policy: str = "IfNotPresent"
    #: Read the autoscaler's signals there; None: scrape the worker pods directly.
    prometheus_url: str | None = None
    #: That Prometheus's scrape interval: how old a signal may be before it is stale.
    scrape_interval_s: float = 15.0
    #: Serve the control metrics (``worldmesh_stage_*``, ``worldmesh_autoscaler_*``) here.
    metrics_port: int | None = None
    #: This operator's pod: its address (servers bind to it) and its name (the tie-breaker
    #: between replicas of one peering priority).
    pod_ip: str | None = None
    pod_name: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        policy = env.get(WORKER_IMAGE_PULL_POLICY) or "IfNotPresent"
        if policy not in PULL_POLICIES:
            raise SettingsError(
                f"{WORKER_IMAGE_PULL_POLICY} must be one of {', '.join(PULL_POLICIES)}, "
                f"got {policy!r}"
            )
        url = env.get(PROMETHEUS_URL) or None
        if url is not None and not url.startswith(("http://", "https://")):
            raise SettingsError(f"{PROMETHEUS_URL} must be an http(s):// URL, got {url!r}")
        every = env.get(SCRAPE_INTERVAL) or "15"
        try:
            scrape_interval_s = float(every)
        except ValueError:
            raise SettingsError(f"{SCRAPE_INTERVAL} must be seconds, got {every!r}") from None
        if not scrape_interval_s > 0:
            raise SettingsError(f"{SCRAPE_INTERVAL} must be > 0 seconds, got {every!r}")
        port = env.get(METRICS_PORT) or None
        if port is not None and not (port.isdigit() and 0 <= int(port) < 65536):
            raise SettingsError(f"{METRICS_PORT} must be a port number, got {port!r}")
        return cls(
            worker_image=env.get(WORKER_IMAGE) or DEFAULT_IMAGE,
            worker_image_pull_policy=policy,
            prometheus_url=url,
            scrape_interval_s=scrape_interval_s,
            metrics_port=None if port is None else int(port),
            pod_ip=env.get(POD_IP) or None,
            pod_name=env.get(OPERATOR_POD) or None,
        )
