"""A stage worker's configuration: the fields of the CRD's stage spec, parsed once at the edge.

The file is YAML or JSON with camelCase keys (the CRD's spelling). Every error is a
``ConfigError`` naming the field path, e.g. ``batching.maxBatchSize: must be >= 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .settings import WorkerSettings
from .worlds import WorldOptions
from .worlds.manager import BACKENDS, check_worker_id


class ConfigError(ValueError):
    """A configuration value is wrong; the message starts with its field path."""


@dataclass(frozen=True, slots=True)
class Batching:
    max_batch_size: int = 8  #: rows per stage compute
    max_queue_delay_s: float = 0.002  #: longest a row waits at the front for a batch to fill


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_bytes: int = 16 * 1024 * 1024  #: larger HTTP bodies get 413
    max_queue_rows: int = 512  #: rows admitted at the front before 429
    request_timeout_s: float = 30.0  #: a row that cannot finish by then fails with 503
    max_retries: int = 3  #: resends of one row after broken worlds


@dataclass(frozen=True, slots=True)
class EarlyExits:
    enabled: bool = False
    accuracy_budget: float = 0.01  #: largest disagreement of released answers with the full model
    ramp_budget: float = 0.1  #: largest ramp overhead, a fraction of the full-model latency
    ramps: tuple[int, ...] = ()  #: block indices; empty: every ramp in the ramps file
    ramps_file: str = ""  #: empty: <cache>/ramps/<model>.pt
    policy: str = "online"  #: online (tuner and manager) | fixed (every ramp, one threshold)
    threshold: float | None = None  #: the fixed policy's threshold; None: the file's


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    deployment: str
    worker: str
    stage: int
    model: str
    split_points: tuple[int, ...]
    host: str = "127.0.0.1"
    http_port: int = 8080
    control_port: int = 8081
    grpc_port: int = 8001  #: the Open Inference Protocol over gRPC (Triton's port)
    device: str = "cpu"
    threads: int = 1
    backend: str = "auto"
    batching: Batching = field(default_factory=Batching)
    limits: Limits = field(default_factory=Limits)
    worlds: WorldOptions = field(default_factory=WorldOptions)
    early_exits: EarlyExits = field(default_factory=EarlyExits)
    token: str = ""

    @property
    def stages(self) -> int:
        return len(self.split_points) + 1

    @property
    def is_front(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1


def load_config(path: str | Path, settings: WorkerSettings | None = None) -> WorkerConfig:
    """The config file at ``path``, with ``settings`` (default: the process environment's)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
    return parse_config(raw, WorkerSettings.from_env() if settings is None else settings)


def parse_config(raw: Any, settings: WorkerSettings) -> WorkerConfig:
    r = _Reader(raw, "")
    ports = r.section("ports")
    batching = r.section("batching")
    limits = r.section("limits")
    worlds = r.section("worlds")
    exits = r.section("earlyExits")
    model = r.section("model") if isinstance(r.data.get("model"), dict) else None
    model_name = model.str("name") if model else r.str("model")
    split = (
        model.int_list("splitPoints", default=[])
        if model
        else r.int_list("splitPoints", default=[])
    )
    stage = r.int("stage", lo=0)
    if stage > len(split):
        raise ConfigError(f"stage: {stage} but splitPoints make only {len(split) + 1} stages")
    worker = r.str("worker")
    try:
        check_worker_id(worker)
    except ValueError as exc:
        raise ConfigError(f"worker: {exc}") from None
    backend = worlds.str("backend", default="auto")
    if backend not in BACKENDS:
        raise ConfigError(f"worlds.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    token = r.str("token", default="") or _token_from(r.str("tokenFile", default=""), settings)
    config = WorkerConfig(
        deployment=r.str("deployment"),
        worker=worker,
        stage=stage,
        model=model_name,
        split_points=tuple(split),
        # On Kubernetes the pod's IP (downward API): workers give it to their peers.
        host=r.str("host", default=settings.pod_ip or "127.0.0.1"),
        http_port=ports.int("http", default=8080, lo=0, hi=65535),
        control_port=ports.int("control", default=8081, lo=0, hi=65535),
        grpc_port=ports.int("grpc", default=8001, lo=0, hi=65535),
        device=r.str("device", default="cpu"),
        threads=r.int("threads", default=1, lo=1),
        backend=backend,
        batching=Batching(
            max_batch_size=batching.int("maxBatchSize", default=8, lo=1, hi=4096),
            max_queue_delay_s=batching.num("maxQueueDelayMs", default=2.0, lo=0.0) / 1e3,
        ),
        limits=Limits(
            max_request_bytes=limits.int("maxRequestBytes", default=16 << 20, lo=1024),
            max_queue_rows=limits.int("maxQueueRows", default=512, lo=1),
            request_timeout_s=limits.num("requestTimeoutSeconds", default=30.0, lo=0.1),
            max_retries=limits.int("maxRetries", default=3, lo=0),
        ),
        worlds=WorldOptions(
            open_timeout_s=worlds.num("openTimeoutSeconds", default=10.0, lo=0.1),
            op_timeout_s=worlds.num("opTimeoutSeconds", default=30.0, lo=0.1),
            heartbeat_interval_s=worlds.num("heartbeatIntervalMs", default=100.0, lo=1.0) / 1e3,
            heartbeat_timeout_s=worlds.num("heartbeatTimeoutMs", default=800.0, lo=10.0) / 1e3,
            max_message_bytes=worlds.int("maxMessageBytes", default=256 << 20, lo=1024),
        ),
        early_exits=_early_exits(exits),
        token=token,
    )
    if config.worlds.heartbeat_timeout_s <= 2 * config.worlds.heartbeat_interval_s:
        raise ConfigError("worlds.heartbeatTimeoutMs: must exceed twice heartbeatIntervalMs")
    return config


def _early_exits(r: _Reader) -> EarlyExits:
    enabled = r.data.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{r._name('enabled')}: must be a boolean, got {enabled!r}")
    ramps = r.int_list("ramps", default=[])
    for i, site in enumerate(ramps):
        if site < 0 or site in ramps[:i]:
            raise ConfigError(f"{r._name('ramps')}[{i}]: {site} is negative or repeated")
    policy = r.str("policy", default="online")
    if policy not in ("online", "fixed"):
        raise ConfigError(f"{r._name('policy')}: must be online or fixed, got {policy!r}")
    # absent (or null): the ramps file's shared threshold; never a sentinel number
    unset = r.data.get("threshold") is None
    threshold = 0.0 if unset else r.num("threshold", default=0.0, lo=0.0)
    budget = r.num("accuracyBudget", default=0.01, lo=0.0)
    ramp_budget = r.num("rampBudget", default=0.1, lo=0.0)
    for key, value in (
        ("threshold", threshold),
        ("accuracyBudget", budget),
        ("rampBudget", ramp_budget),
    ):
        if value > 1:
            raise ConfigError(f"{r._name(key)}: must be <= 1, got {value}")
    return EarlyExits(
        enabled=enabled,
        accuracy_budget=budget,
        ramp_budget=ramp_budget,
        ramps=tuple(ramps),
        ramps_file=r.str("rampsFile", default=""),
        policy=policy,
        threshold=None if unset else threshold,
    )


def _token_from(token_file: str, settings: WorkerSettings) -> str:
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"tokenFile: cannot read {token_file}: {exc}") from None
    return settings.token


class _Reader:
    """Typed access to one mapping of the file, with field paths in every error."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path or '(top level)'}: must be a mapping")
        self.data = data
        self.path = path

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is _REQUIRED:
                raise ConfigError(f"{self._name(key)}: required")
            return default
        return self.data[key]

    def section(self, key: str) -> _Reader:
        return _Reader(self._get(key, {}), self._name(key))

    def str(self, key: str, default: Any = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._name(key)}: must be a string, got {value!r}")
        return value

    def num(self, key: str, default: float, lo: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self._name(key)}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{self._name(key)}: must be a finite number, got {value}")
        if value < lo:
            raise ConfigError(f"{self._name(key)}: must be >= {lo:g}, got {value}")
        return float(value)

    def int(
        self, key: str, default: Any = None, lo: int | None = None, hi: int | None = None
    ) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._name(key)}: must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise ConfigError(f"{self._name(key)}: must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"{self._name(key)}: must be <= {hi}, got {value}")
        return value

    def int_list(self, key: str, default: list[int]) -> list[int]:
        value = self._get(key, default)
        if not isinstance(value, list) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise ConfigError(f"{self._name(key)}: must be a list of integers, got {value!r}")
        return value


_REQUIRED = object()
