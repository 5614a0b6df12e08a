"""The desired state: what a deployment's spec and its autoscaler ask for, as plain data.

``desired_of`` turns the spec and the autoscaler's wishes into a ``Desired``: workers per
stage (``spec.replicas`` where it pins a stage, else the wish or ``min``, clamped to
min..max) and each stage's config digest, which marks a worker started from another config
as outdated. No I/O: the reconciler plans from this, and the Kubernetes objects
(``builders``) carry the same digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from worldmesh_worker.control import WIRE_VERSION

from .spec import DeploymentSpec


@dataclass(frozen=True, slots=True)
class DesiredStage:
    index: int
    #: Desired worker count, already clamped (min/max, autoscaler).
    workers: int
    #: Hash of the stage's worker config (model, split, batching...): differs -> outdated.
    config_hash: str


@dataclass(frozen=True, slots=True)
class Desired:
    deployment: str
    #: Stages numbered 0..n-1, each once.
    stages: tuple[DesiredStage, ...]
    #: The deployment is being deleted: drain and stop everything.
    deleted: bool = False
    #: Workers of each neighbouring stage a worker opens worlds with (None: all).
    fan_out: int | None = None


def config_digest(config: dict[str, Any]) -> str:
    """A stage config's identity: a worker started from another one, or speaking another
    wire version (an upgrade), is outdated and rolled."""
    identity = json.dumps([WIRE_VERSION, config], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def layout_of(model: Any, split_points: Any) -> str:
    """The pipeline's shape and wire version: workers of different layouts never share a
    world (a split change, or an upgrade whose workers cannot talk to the old ones)."""
    return json.dumps([model, list(split_points or []), WIRE_VERSION])


def desired_of(spec: DeploymentSpec, wishes: dict[int, int], deleted: bool = False) -> Desired:
    """Workers per stage: ``spec.replicas`` where it pins a stage, else the autoscaler's wish
    (or ``min``), clamped to the stage's min..max."""
    stages = []
    for stage in spec.stages:
        pinned = spec.pinned_replicas(stage.index)
        wish = pinned if pinned is not None else wishes.get(stage.index, stage.min_replicas)
        workers = max(stage.min_replicas, min(stage.max_replicas, wish))
        stages.append(
            DesiredStage(stage.index, workers, config_digest(spec.stage_config(stage.index)))
        )
    return Desired(spec.name, tuple(stages), deleted, spec.worlds.fan_out)
