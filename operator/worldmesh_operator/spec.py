"""A ModelDeployment's spec as frozen dataclasses, parsed once at the edge.

``parse_spec(manifest)`` checks the whole manifest against the CRD file (header, schema
defaults, types, bounds, enums, unknown fields, list keys, CEL rules: see ``validate``)
and raises ``SpecError`` listing every problem with its field path, e.g.
``spec.stages[1].replicas.max: must be >= 1``. Nothing here repeats a rule of the CRD:
the dataclasses are built only from a manifest the CRD accepted, with its defaults.

``spec.replicas`` (the ``/scale`` target): unset, every stage runs between its
``replicas.min`` and ``replicas.max`` (the built-in autoscaler steers it when enabled,
else it runs ``min``). Set, the stage named by ``spec.scaleTarget`` (or every stage when
there is none) runs exactly ``spec.replicas`` workers, and the built-in autoscaler stands
down for those stages: ``DeploymentSpec.pinned_replicas(index)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldmesh_worker.exits.sites import site_error

from .schema import FieldError, SpecError, load_schema

#: where a worker pod mounts ``spec.earlyExits.rampsConfigMap``
RAMPS_DIR = "/var/run/worldmesh/ramps"

__all__ = [
    "AutoscalingSpec",
    "BatchingSpec",
    "DeploymentSpec",
    "EarlyExitsSpec",
    "FieldError",
    "LimitsSpec",
    "Ports",
    "Resources",
    "ScaleLimit",
    "SpecError",
    "StageSpec",
    "WorldsSpec",
    "parse_spec",
]


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: str | None = None  #: a Kubernetes quantity, e.g. "2" or "500m"
    memory: str | None = None  #: e.g. "2Gi"
    gpus: int = 0  #: whole nvidia.com/gpu per worker


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str  #: a DNS label, unique in the deployment
    index: int  #: position in the pipeline, from 0
    min_replicas: int = 1
    max_replicas: int = 1
    resources: Resources = Resources()
    batching: BatchingSpec = BatchingSpec()


@dataclass(frozen=True, slots=True)
class WorldsSpec:
    backend: str = "auto"  #: auto | gloo | nccl
    open_timeout_seconds: float = 10.0
    op_timeout_seconds: float = 30.0
    heartbeat_interval_ms: float = 100.0
    heartbeat_timeout_ms: float = 800.0
    max_message_bytes: int = 256 << 20
    #: Workers of each neighbouring stage a worker opens worlds with; None: all of them.
    #: The operator's concern only: not part of the worker config (a change rolls nothing).
    fan_out: int | None = 2


@dataclass(frozen=True, slots=True)
class ScaleLimit:
    workers: int  #: at most this many workers added (or removed) per stage ...
    period_seconds: int  #: ... per this many seconds


@dataclass(frozen=True, slots=True)
class AutoscalingSpec:
    enabled: bool = False
    metric: str = "queueDepthPerWorker"  #: queueDepthPerWorker | busyFraction
    target: float | None = None  #: set whenever enabled (a CRD rule)
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300
    scale_up_limit: ScaleLimit = ScaleLimit(4, 15)
    scale_down_limit: ScaleLimit = ScaleLimit(1, 60)


@dataclass(frozen=True, slots=True)
class EarlyExitsSpec:
    enabled: bool = False
    accuracy_budget: float = 0.01
    ramp_budget: float = 0.1
    ramps: tuple[int, ...] = ()  #: block indices; empty: every candidate of the model
    ramps_file: str | None = None  #: None: <cache>/ramps/<model>.pt on each worker
    #: (name, key) of a ConfigMap holding the ramps file, mounted at ``RAMPS_DIR``
    ramps_config_map: tuple[str, str] | None = None
    policy: str = "online"  #: online | fixed
    threshold: float | None = None  #: the fixed policy's threshold; None: the file's


@dataclass(frozen=True, slots=True)
class Ports:
    http: int = 8080
    control: int = 8081
    grpc: int = 8001


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    max_request_bytes: int = 16 << 20
    max_queue_rows: int = 512
    request_timeout_seconds: float = 30.0
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    name: str
    namespace: str
    model: str  #: a built-in name or ``package.module:function``
    split_points: tuple[int, ...]
    stages: tuple[StageSpec, ...]
    worlds: WorldsSpec = WorldsSpec()
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    early_exits: EarlyExitsSpec = EarlyExitsSpec()
    image: str | None = None  #: None: the operator's configured worker image
    ports: Ports = Ports()
    limits: LimitsSpec = LimitsSpec()
    replicas: int | None = None  #: the /scale target; see the module docstring
    scale_target: str | None = None  #: the stage that ``replicas`` drives; None: all

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name``; ``KeyError`` if there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def pinned_replicas(self, index: int) -> int | None:
        """The workers that ``spec.replicas`` fixes for stage ``index``, or None when the
        stage is left to its min..max (and to the built-in autoscaler, if enabled)."""
        stage = self.stages[index]
        if self.replicas is None or self.scale_target not in (None, stage.name):
            return None
        return self.replicas

    def stage_config(self, index: int) -> dict[str, Any]:
        """The worker-config fields of stage ``index`` in the worker's names (see
        ``worldmesh_worker.config.parse_config``), without worker, host, ports or token.
        ``IndexError`` for a stage that does not exist."""
        stage = self.stages[index]
        worlds, limits = self.worlds, self.limits
        return {
            "deployment": self.name,
            "stage": stage.index,
            "model": self.model,
            "splitPoints": list(self.split_points),
            "batching": {
                "maxBatchSize": stage.batching.max_batch_size,
                "maxQueueDelayMs": stage.batching.max_queue_delay_ms,
            },
            "limits": {
                "maxRequestBytes": limits.max_request_bytes,
                "maxQueueRows": limits.max_queue_rows,
                "requestTimeoutSeconds": limits.request_timeout_seconds,
                "maxRetries": limits.max_retries,
            },
            "worlds": {
                "backend": worlds.backend,
                "openTimeoutSeconds": worlds.open_timeout_seconds,
                "opTimeoutSeconds": worlds.op_timeout_seconds,
                "heartbeatIntervalMs": worlds.heartbeat_interval_ms,
                "heartbeatTimeoutMs": worlds.heartbeat_timeout_ms,
                "maxMessageBytes": worlds.max_message_bytes,
            },
            "earlyExits": self._early_exits_config(),
        }

    def _early_exits_config(self) -> dict[str, Any]:
        exits = self.early_exits
        config: dict[str, Any] = {
            "enabled": exits.enabled,
            "accuracyBudget": exits.accuracy_budget,
            "rampBudget": exits.ramp_budget,
            "ramps": list(exits.ramps),
            "policy": exits.policy,
        }
        if exits.ramps_file is not None:
            config["rampsFile"] = exits.ramps_file
        if exits.ramps_config_map is not None:
            config["rampsFile"] = f"{RAMPS_DIR}/{exits.ramps_config_map[1]}"
        if exits.threshold is not None:
            config["threshold"] = exits.threshold
        return config


def parse_spec(manifest: Any, crd: Path | None = None) -> DeploymentSpec:
    """A ModelDeployment manifest (apiVersion, kind, metadata, spec) as a DeploymentSpec.

    Raises ``SpecError`` listing every problem with its field path, and ``CrdError`` if
    the CRD file (``crd``, default: the project's) is missing or broken.
    """
    data, errors = load_schema(crd).check(manifest)
    if not errors:
        errors = _ramp_site_errors(data["spec"])
    if errors:
        raise SpecError(errors)
    meta, spec = data["metadata"], data["spec"]
    worlds, scaling, exits, limits = (
        spec["worlds"],
        spec["autoscaling"],
        spec["earlyExits"],
        spec["limits"],
    )
    return DeploymentSpec(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        model=spec["model"]["name"],
        split_points=tuple(spec["model"]["splitPoints"]),
        stages=tuple(_stage(i, s) for i, s in enumerate(spec["stages"])),
        worlds=WorldsSpec(
            backend=worlds["backend"],
            open_timeout_seconds=float(worlds["openTimeoutSeconds"]),
            op_timeout_seconds=float(worlds["opTimeoutSeconds"]),
            heartbeat_interval_ms=float(worlds["heartbeatIntervalMs"]),
            heartbeat_timeout_ms=float(worlds["heartbeatTimeoutMs"]),
            max_message_bytes=worlds["maxMessageBytes"],
            fan_out=None if worlds["fanOut"] == "all" else int(worlds["fanOut"]),
        ),
        autoscaling=AutoscalingSpec(
            enabled=scaling["enabled"],
            metric=scaling["metric"],
            target=float(scaling["target"]) if "target" in scaling else None,
            scale_up_stabilization_seconds=scaling["scaleUpStabilizationSeconds"],
            scale_down_stabilization_seconds=scaling["scaleDownStabilizationSeconds"],
            scale_up_limit=_limit(scaling["scaleUpLimit"]),
            scale_down_limit=_limit(scaling["scaleDownLimit"]),
        ),
        early_exits=EarlyExitsSpec(
            enabled=exits["enabled"],
            accuracy_budget=float(exits["accuracyBudget"]),
            ramp_budget=float(exits["rampBudget"]),
            ramps=tuple(exits["ramps"]),
            ramps_file=exits.get("rampsFile"),
            ramps_config_map=(
                (exits["rampsConfigMap"]["name"], exits["rampsConfigMap"]["key"])
                if "rampsConfigMap" in exits
                else None
            ),
            policy=exits["policy"],
            threshold=float(exits["threshold"]) if "threshold" in exits else None,
        ),
        image=spec.get("image"),
        ports=Ports(http=spec["port"], control=spec["controlPort"], grpc=spec["grpcPort"]),
        limits=LimitsSpec(
            max_request_bytes=limits["maxRequestBytes"],
            max_queue_rows=limits["maxQueueRows"],
            request_timeout_seconds=float(limits["requestTimeoutSeconds"]),
            max_retries=limits["maxRetries"],
        ),
        replicas=spec.get("replicas"),
        scale_target=spec.get("scaleTarget"),
    )


def _stage(index: int, stage: dict[str, Any]) -> StageSpec:
    resources = stage.get("resources", {})
    return StageSpec(
        name=stage["name"],
        index=index,
        min_replicas=stage["replicas"]["min"],
        max_replicas=stage["replicas"]["max"],
        resources=Resources(
            cpu=_quantity(resources.get("cpu")),
            memory=_quantity(resources.get("memory")),
            gpus=resources.get("nvidia.com/gpu", 0),
        ),
        batching=BatchingSpec(
            max_batch_size=stage["batching"]["maxBatchSize"],
            max_queue_delay_ms=float(stage["batching"]["maxQueueDelayMs"]),
        ),
    )


def _ramp_site_errors(spec: dict[str, Any]) -> list[FieldError]:
    """A ramp after a block the (built-in) model does not have, or after its final head."""
    model = spec["model"]["name"]
    return [
        FieldError(f"spec.earlyExits.ramps[{i}]", why)
        for i, site in enumerate(spec["earlyExits"]["ramps"])
        if (why := site_error(model, site)) is not None
    ]


def _limit(limit: dict[str, Any]) -> ScaleLimit:
    return ScaleLimit(workers=limit["workers"], period_seconds=limit["periodSeconds"])


def _quantity(value: int | str | None) -> str | None:
    return None if value is None else str(value)
