"""The kopf handlers: Kubernetes events in, one control step (``loop.ControlLoop``) out.

- startup: the settings, read once from the environment (``settings.py``; a test may put
  its own in ``memo.settings``); our finalizer, progress and diff-base annotations under
  ``worldmesh.io``; the API client in ``memo`` unless a test put its own there. Peering
  comes from the command line (the chart passes ``--peering`` and ``--priority``);
  replicas of one priority are told apart by their pod's name, so exactly one of them acts.
- create/update/resume: parse the spec (a ``SpecError`` sets Degraded/InvalidSpec and is
  a ``kopf.PermanentError``: this deployment waits for a new spec, others go on), make
  sure the Secret and Services exist, and run one control step.
- a timer every ``RECONCILE_INTERVAL_S``: one control step (scale, observe, plan, apply),
  then the status (conditions, counts, endpoint, /scale fields, the autoscaler's memory)
  and an Event per scale, start, drain and replacement. Level-based: a restarted operator
  adopts the pods it finds.
- delete: drain every worker, delete the pods, then the Services and the Secret.
- pod events: a failed worker pod is a Warning Event on its ModelDeployment.

No scheduling or wiring logic lives here: that is ``reconciler.plan``, driven by ``loop``.
"""

from __future__ import annotations

import asyncio
import datetime
import zlib
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import autoscaling, builders
from .builders import GROUP, PLURAL, VERSION
from .loop import ControlLoop, Step
from .reconciler import Action, DrainWorker, StartWorker, StopWorker, WorkerState
from .runtime.kube_client import KubeClient
from .runtime.kubernetes import KubernetesRuntime
from .settings import RECONCILE_INTERVAL_S, Settings, SettingsError
from .spec import DeploymentSpec, SpecError, parse_spec

PRIORITY_SPREAD = 100_000  #: tie-breakers between replicas of one priority


@dataclass
class Managed:
    """What the operator holds for one ModelDeployment (in ``memo.deployments``)."""

    loop: ControlLoop
    runtime: KubernetesRuntime
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ensured: bool = False
    restored: bool = False  #: the autoscaler's memory was read back from the status
    workers: dict[int, int] = field(default_factory=dict)  #: desired per stage, last step
    last_failure: str = ""  #: a worker failure seen by a recent step, until Ready

    @property
    def spec(self) -> DeploymentSpec:
        return self.loop.spec


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    if "settings" not in memo:
        try:
            memo.settings = Settings.from_env()
        except SettingsError as exc:  # the chart's values are wrong: nothing can start
            raise kopf.PermanentError(str(exc)) from None
    ours: Settings = memo.settings
    settings.persistence.finalizer = "worldmesh.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="worldmesh.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="worldmesh.io", key="last-handled-configuration"
    )
    # The replicas of one Deployment share ``--priority``, and kopf pauses every operator
    # that a live peer's priority ties: none would act. The pod's name breaks the tie and
    # keeps the order of different ``--priority`` values (the highest still wins).
    if ours.pod_name and not settings.peering.standalone:
        tie_breaker = zlib.crc32(ours.pod_name.encode()) % PRIORITY_SPREAD
        settings.peering.priority = settings.peering.priority * PRIORITY_SPREAD + tie_breaker
    if "api" not in memo:  # in-cluster, else the kubeconfig (``memo.kubeconfig`` or kubectl's)
        memo.api = await KubeClient.connect(memo.get("kubeconfig"))
    memo.setdefault("deployments", {})
    await autoscaling.configure(memo, ours)  # the control metrics (and their server)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    for managed in memo.get("deployments", {}).values():
        await managed.runtime.close()
    await autoscaling.close(memo)
    await memo.api.close()


@kopf.on.create(GROUP, VERSION, PLURAL, backoff=RECONCILE_INTERVAL_S)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", backoff=RECONCILE_INTERVAL_S)
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=RECONCILE_INTERVAL_S)
async def reconcile(
    body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    managed = _managed(body, patch, memo)
    if managed is None:
        raise kopf.PermanentError("invalid spec: see the Degraded condition")
    await _step(managed, body, patch, meta.get("generation"))


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL_S, backoff=RECONCILE_INTERVAL_S)
async def tick(
    body: kopf.Body, meta: kopf.Meta, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    managed = _managed(body, patch, memo)
    if managed is not None:
        await _step(managed, body, patch, meta.get("generation"))


@kopf.on.delete(GROUP, VERSION, PLURAL, backoff=1.0)
async def delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    managed = memo.deployments.get(key) or _managed(body, kopf.Patch(), memo)
    if managed is None:
        return  # never valid: it owns nothing
    async with managed.lock:
        step = await managed.loop.step(deleted=True)
        if step.observed.workers:
            raise kopf.TemporaryError(f"{len(step.observed.workers)} workers draining", delay=1)
        await managed.runtime.delete_objects()
        await managed.runtime.close()
    memo.deployments.pop(key, None)
    memo.metrics.forget(body.metadata.name)


@kopf.on.event("v1", "pods", labels={"app.kubernetes.io/managed-by": builders.MANAGED_BY})
async def pod_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    if event["type"] != "MODIFIED" or body.get("status", {}).get("phase") != "Failed":
        return
    for owner in body.metadata.get("ownerReferences") or []:
        if owner.get("kind") == builders.KIND:
            target = {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "metadata": {
                    "name": owner["name"],
                    "namespace": body.metadata.namespace,
                    "uid": owner["uid"],
                },
            }
            reason = body.get("status", {}).get("reason") or "the worker exited"
            kopf.warn(
                kopf.Body(target),  # type: ignore[arg-type]  # a RawBody is enough here
                reason="WorkerFailed",
                message=f"pod {body.metadata.name}: {reason}",
            )


def _managed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> Managed | None:
    """The deployment's state with its current spec, or None (status set) if invalid."""
    key = (body.metadata.namespace, body.metadata.name)
    manifest = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": body.metadata.name, "namespace": body.metadata.namespace},
        "spec": dict(body.spec),
    }
    try:
        spec = parse_spec(manifest)
    except SpecError as exc:
        status = builders.build_invalid_status(
            str(exc),
            body.metadata.get("generation"),
            body.get("status", {}).get("conditions", []),
            _now(),
        )
        if body.get("status", {}).get("conditions") != status["conditions"]:
            patch.status.update(status)
        return None
    managed: Managed | None = memo.deployments.get(key)
    if managed is None:
        owner = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": dict(body.metadata),
        }
        settings: Settings = memo.settings
        runtime = KubernetesRuntime(
            memo.api,
            lambda: memo.deployments[key].spec,
            owner,
            settings.worker_image,
            pull_policy=settings.worker_image_pull_policy,
        )
        source = autoscaling.metrics_source(spec, runtime, settings)
        loop = ControlLoop(spec, runtime, source, memo.metrics)
        managed = memo.deployments[key] = Managed(loop, runtime)
    managed.loop.spec = spec
    return managed


async def _step(
    managed: Managed, body: kopf.Body, patch: kopf.Patch, generation: int | None
) -> None:
    previous = body.get("status", {})
    async with managed.lock:
        if not managed.ensured:
            await managed.runtime.ensure_objects()
            managed.ensured = True
        policy = managed.spec.autoscaling
        if policy.enabled and not managed.restored:
            autoscaling.restore(managed.loop.scaling, policy, previous.get("autoscaler") or {})
            managed.restored = True
        step = await managed.loop.step()
    _announce_step(body, managed, step)
    workers: dict[int, list[str]] = {}
    for w in step.observed.workers:
        if w.state in (WorkerState.STARTING, WorkerState.READY):
            workers.setdefault(w.stage, []).append(w.id)
    summary = dict(step.summary)
    # A crash loop alternates Degraded and Pending: keep saying why until Ready.
    managed.last_failure = (step.failures or [managed.last_failure])[-1]
    if summary["phase"] == "Ready":
        managed.last_failure = ""
    elif managed.last_failure:
        summary["reason"] += f"; last failure: {managed.last_failure}"
    conditions = previous.get("conditions", [])
    status = builders.build_status(managed.spec, summary, workers, generation, conditions, _now())
    autoscaling.report(status, managed.loop.scaling, managed.spec, conditions, _now())
    if managed.runtime.early_exits:
        status["earlyExits"] = builders.build_early_exit_status(managed.runtime.early_exits)
    current = {k: previous.get(k) for k in status}
    if current != status:
        patch.status.update(status)


def _announce_step(body: kopf.Body, managed: Managed, step: Step) -> None:
    """Events for what a step did: scales, starts, drains, replacements, failed actions."""
    _announce_scale(body, managed, {s.index: s.workers for s in step.desired.stages})
    autoscaling.announce(body, managed.spec, step.scaled)
    for action in step.actions:
        _announce(body, action, step.dead, step.failures)
    for error in step.errors:
        kopf.warn(body, reason="ActionFailed", message=error)


def _announce(body: kopf.Body, action: Action, dead: set[str], failures: list[str]) -> None:
    if isinstance(action, StartWorker):
        kopf.info(
            body, reason="WorkerStarting", message=f"stage {action.stage}: {action.worker_id}"
        )
    elif isinstance(action, DrainWorker):
        kopf.info(
            body, reason="WorkerDraining", message=f"{action.worker_id} (scale down or update)"
        )
    elif isinstance(action, StopWorker) and action.worker_id in dead:
        why = [f for f in failures if action.worker_id in f]
        message = why[0] if why else f"worker {action.worker_id} is dead"
        kopf.warn(body, reason="WorkerReplaced", message=message)


def _announce_scale(body: kopf.Body, managed: Managed, workers: dict[int, int]) -> None:
    """A ``Scaled`` Event for each stage whose desired worker count changed."""
    for stage, count in workers.items():
        before = managed.workers.get(stage)
        if before is not None and before != count:
            name = managed.spec.stages[stage].name
            kopf.info(body, reason="Scaled", message=f"stage {name}: {before} -> {count} workers")
    managed.workers = workers


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
