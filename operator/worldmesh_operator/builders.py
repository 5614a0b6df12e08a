"""Pure builders of the Kubernetes objects of one ModelDeployment: whole manifests, no I/O.

- ``build_worker_pod``: one worker of one stage. Its worker config (the stage's fields, its
  id, ports, the token file) is the pod annotation ``worldmesh.io/config``, which a
  downward-API volume turns into the file the worker reads (``--config``): no ConfigMap per
  worker, and the pod carries exactly what it was started with. Resources come from the
  stage spec (``nvidia.com/gpu`` included); readiness and liveness probe the worker's
  ``/v2/health/ready`` and ``/v2/health/live``; SIGTERM makes the worker drain, so the
  grace period covers its drain timeout. ``spec.earlyExits.rampsConfigMap`` is mounted
  read-only at ``RAMPS_DIR``, where the worker config's ``rampsFile`` points.
- ``build_front_service`` (the front stage's HTTP port), ``build_peer_headless_service``
  (every worker, both ports, not-ready addresses published so worlds can open early) and
  ``build_token_secret`` (the control API's bearer token, mounted read-only).

Every object carries the recommended ``app.kubernetes.io/*`` labels and, through
``owner_reference``, its ModelDeployment as controller owner, so deleting the
deployment removes them (in a real cluster, by the garbage collector).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from .desired import config_digest, layout_of
from .spec import RAMPS_DIR, DeploymentSpec

GROUP = "worldmesh.io"
VERSION = "v1alpha1"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
MANAGED_BY = "worldmesh-operator"

LABEL_DEPLOYMENT = "worldmesh.io/deployment"
LABEL_STAGE = "worldmesh.io/stage"
LABEL_WORKER = "worldmesh.io/worker"
ANNOTATION_CONFIG = "worldmesh.io/config"
ANNOTATION_CONFIG_HASH = "worldmesh.io/config-hash"
ANNOTATION_LAYOUT = "worldmesh.io/layout"

CONFIG_DIR = "/etc/worldmesh"
TOKEN_DIR = "/var/run/worldmesh/token"
TOKEN_KEY = "token"
#: The worker drains for at most 60 s after SIGTERM (``worldmesh_worker.main``); a margin on top.
TERMINATION_GRACE_SECONDS = 75


def labels(spec: DeploymentSpec, component: str) -> dict[str, str]:
    """The recommended labels plus ``worldmesh.io/deployment``."""
    return {
        "app.kubernetes.io/name": "worldmesh",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_DEPLOYMENT: spec.name,
    }


def worker_selector(spec: DeploymentSpec, stage: int | None = None) -> dict[str, str]:
    """The labels that select the deployment's workers (of one stage, when given)."""
    selector = {LABEL_DEPLOYMENT: spec.name, "app.kubernetes.io/component": "worker"}
    if stage is not None:
        selector[LABEL_STAGE] = str(stage)
    return selector


def selector_string(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """The controller ownerReference to a ModelDeployment body (``metadata.uid`` needed)."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", f"{GROUP}/{VERSION}"),
        "kind": owner.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def token_secret_name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-control-token"


def front_service_name(spec: DeploymentSpec) -> str:
    return spec.name


def peer_service_name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-peers"


def endpoint(spec: DeploymentSpec) -> str:
    """The in-cluster URL of the front stage's inference route."""
    host = f"{front_service_name(spec)}.{spec.namespace}.svc"
    return f"http://{host}:{spec.ports.http}/v2/models/{spec.name}/infer"


def layout(spec: DeploymentSpec) -> str:
    """The pipeline's shape (``desired.layout_of``)."""
    return layout_of(spec.model, spec.split_points)


def worker_config(spec: DeploymentSpec, stage: int, worker_id: str) -> dict[str, Any]:
    """The file a worker pod reads: the stage config plus its id, ports and token file."""
    config = spec.stage_config(stage)
    config.update(
        worker=worker_id,  # no host: the worker binds and advertises its pod IP ($POD_IP)
        ports={"http": spec.ports.http, "control": spec.ports.control, "grpc": spec.ports.grpc},
        tokenFile=f"{TOKEN_DIR}/{TOKEN_KEY}",
        device="cuda" if spec.stages[stage].resources.gpus else "cpu",
    )
    return config


def build_worker_pod(
    spec: DeploymentSpec,
    stage: int,
    worker_id: str,
    image: str,
    token_secret: str,
    owner: dict[str, Any] | None = None,
    pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """One worker pod of ``stage`` named ``worker_id`` (a DNS label). ``image`` is used when
    the spec names none; ``pull_policy`` is the chart's ``worker.image.pullPolicy``.
    ``IndexError`` for a stage that does not exist."""
    stage_spec = spec.stages[stage]
    resources: dict[str, str] = {}
    if stage_spec.resources.cpu is not None:
        resources["cpu"] = stage_spec.resources.cpu
    if stage_spec.resources.memory is not None:
        resources["memory"] = stage_spec.resources.memory
    limits = dict(resources)
    if stage_spec.resources.gpus:
        limits["nvidia.com/gpu"] = str(stage_spec.resources.gpus)
    pod_labels = {
        **labels(spec, "worker"),
        LABEL_STAGE: str(stage),
        LABEL_WORKER: worker_id,
    }
    meta: dict[str, Any] = {
        "name": worker_id,
        "namespace": spec.namespace,
        "labels": pod_labels,
        "annotations": {
            ANNOTATION_CONFIG: json.dumps(worker_config(spec, stage, worker_id), sort_keys=True),
            ANNOTATION_CONFIG_HASH: config_digest(spec.stage_config(stage)),
            ANNOTATION_LAYOUT: layout(spec),
        },
    }
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        }

    container = {
        "name": "worker",
        "image": spec.image or image,
        "imagePullPolicy": pull_policy,
        "args": ["--config", f"{CONFIG_DIR}/config.json"],
        # The worker serves on, and gives its peers, the pod's own address.
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            {"name": "http", "containerPort": spec.ports.http, "protocol": "TCP"},
            {"name": "control", "containerPort": spec.ports.control, "protocol": "TCP"},
            {"name": "grpc", "containerPort": spec.ports.grpc, "protocol": "TCP"},
        ],
        "resources": {"requests": resources, "limits": limits},
        "readinessProbe": probe("/v2/health/ready", 2, 3),
        "livenessProbe": probe("/v2/health/live", 5, 6),
        # Loading a model can take a while: liveness starts counting once it serves.
        "startupProbe": probe("/v2/health/live", 2, 150),
        # A worker that dies before it serves (a model that cannot load) tells why: the
        # tail of its log becomes the termination message that the operator reports.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [container],
            "restartPolicy": "Never",  # a dead worker is replaced, never restarted in place
            "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,  # SIGTERM drains
            "hostname": worker_id,
            "subdomain": peer_service_name(spec),
            "enableServiceLinks": False,
            "automountServiceAccountToken": False,
            "volumes": [
                {
                    "name": "config",
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "config.json",
                                "fieldRef": {
                                    "fieldPath": f"metadata.annotations['{ANNOTATION_CONFIG}']"
                                },
                            }
                        ]
                    },
                },
                {
                    "name": "token",
                    "secret": {"secretName": token_secret, "defaultMode": 0o440},
                },
            ],
        },
    }
    if spec.early_exits.ramps_config_map is not None:  # the ramps file, read-only
        name, key = spec.early_exits.ramps_config_map
        container["volumeMounts"].append(
            {"name": "ramps", "mountPath": RAMPS_DIR, "readOnly": True}
        )
        pod["spec"]["volumes"].append(
            {"name": "ramps", "configMap": {"name": name, "items": [{"key": key, "path": key}]}}
        )
    return pod


def build_front_service(
    spec: DeploymentSpec, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ClusterIP Service over the front stage's ready workers (the OIP endpoint: REST on
    ``http``, gRPC on ``grpc``)."""
    return _object(
        "Service",
        front_service_name(spec),
        spec,
        "front",
        owner,
        spec={
            "type": "ClusterIP",
            "selector": worker_selector(spec, 0),
            "ports": [
                {"name": "http", "port": spec.ports.http, "targetPort": "http"},
                {"name": "grpc", "port": spec.ports.grpc, "targetPort": "grpc"},
            ],
        },
    )


def build_peer_headless_service(
    spec: DeploymentSpec, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A headless Service naming every worker (``<worker>.<name>-peers``), ready or not."""
    return _object(
        "Service",
        peer_service_name(spec),
        spec,
        "peers",
        owner,
        spec={
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": worker_selector(spec),
            "ports": [
                {"name": "http", "port": spec.ports.http, "targetPort": "http"},
                {"name": "control", "port": spec.ports.control, "targetPort": "control"},
            ],
        },
    )


def build_token_secret(
    spec: DeploymentSpec, token: str, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The control API's bearer token (key ``token``)."""
    secret = _object("Secret", token_secret_name(spec), spec, "control-token", owner)
    secret["type"] = "Opaque"
    secret["data"] = {TOKEN_KEY: base64.b64encode(token.encode()).decode()}
    return secret


def _object(
    kind: str,
    name: str,
    deployment: DeploymentSpec,
    component: str,
    owner: dict[str, Any] | None,
    **body: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": deployment.namespace,
        "labels": labels(deployment, component),
    }
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    return {"apiVersion": "v1", "kind": kind, "metadata": meta, **body}


#: summarize()'s phases as the CRD's status.phase (Deleting is progress towards nothing).
_PHASES = {"Deleting": "Progressing"}


def build_status(
    spec: DeploymentSpec,
    summary: dict[str, Any],
    workers: dict[int, list[str]],
    generation: int | None,
    previous: list[dict[str, Any]],
    now: str,
) -> dict[str, Any]:
    """The ModelDeployment's ``status`` from ``reconciler.summarize``: conditions (Ready,
    Progressing, Degraded, each transition time kept while its status holds),
    observedGeneration, per stage counts, worlds, the endpoint, and ``replicas``/``selector``
    for ``/scale``. ``workers`` lists the live worker ids of each stage."""
    phase, reason = summary["phase"], summary["reason"]
    stages = [
        {
            "name": spec.stages[s["stage"]].name,
            "desired": s["desired"],
            "ready": s["ready"],
            "workers": sorted(workers.get(s["stage"], [])),
        }
        for s in summary["stages"]
    ]
    ready = {s["stage"]: s["ready"] for s in summary["stages"]}
    target = spec.stage(spec.scale_target).index if spec.scale_target else None
    replicas = ready.get(target, 0) if target is not None else min(ready.values(), default=0)
    truth = {
        "Ready": phase == "Ready",
        "Progressing": phase in ("Pending", "Progressing", "Deleting"),
        "Degraded": phase == "Degraded",
    }
    return {
        "observedGeneration": generation,
        "phase": _PHASES.get(phase, phase),
        "conditions": conditions(truth, phase, reason, generation, previous, now),
        "stages": stages,
        "worlds": {"ready": summary["worlds"]["ready"], "broken": summary["worlds"]["broken"]},
        "endpoint": endpoint(spec),
        "stageCount": len(spec.stages),
        "readyWorkers": sum(ready.values()),
        "desiredWorkers": sum(s["desired"] for s in summary["stages"]),
        "replicas": replicas,
        "selector": selector_string(worker_selector(spec, target)),
    }


def build_early_exit_status(fronts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``status.earlyExits`` from the front workers' control statuses: per front worker (one
    leads and tunes, the others follow it: ``leader``), every ramp's state, threshold, exit
    rate and recent agreement with the full model. Rounded, so that a status patch follows
    a real change; a value not known yet is left out."""

    def ramp(r: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"ramp": int(r["ramp"]), "active": bool(r["active"])}
        for key in ("threshold", "exitRate", "agreement"):
            if r.get(key) is not None:
                out[key] = round(float(r[key]), 4)
        return out

    def worker(name: str, state: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "worker": name,
            "policy": str(state.get("policy", "")),
            "labelled": int(state.get("labelled", 0)),
            "ramps": [ramp(r) for r in state["ramps"]],
        }
        if state.get("leader"):
            out["leader"] = str(state["leader"])
        return out

    return {"workers": [worker(name, state) for name, state in sorted(fronts.items())]}


def build_invalid_status(
    message: str, generation: int | None, previous: list[dict[str, Any]], now: str
) -> dict[str, Any]:
    """The status of a spec that cannot be served: phase Failed, Degraded (InvalidSpec)."""
    truth = {"Ready": False, "Progressing": False, "Degraded": True}
    return {
        "observedGeneration": generation,
        "phase": "Failed",
        "conditions": conditions(truth, "InvalidSpec", message, generation, previous, now),
    }


def conditions(
    truth: dict[str, bool],
    reason: str,
    message: str,
    generation: int | None,
    previous: list[dict[str, Any]],
    now: str,
) -> list[dict[str, Any]]:
    """metav1.Conditions; ``reason`` (a phase or a CamelCase word) goes on every one."""
    before = {c.get("type"): c for c in previous or []}
    result = []
    for kind, value in truth.items():
        status = "True" if value else "False"
        old = before.get(kind, {})
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        condition = {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message[:32768],
            "lastTransitionTime": since or now,
        }
        if generation is not None:
            condition["observedGeneration"] = generation
        result.append(condition)
    return result
