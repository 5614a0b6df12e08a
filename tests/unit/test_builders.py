"""Pure builders of a deployment's Kubernetes objects, and the status they report.

- a worker pod: name, recommended labels plus worldmesh.io/{deployment,stage,worker}, the
  controller ownerReference, requests/limits from the stage (nvidia.com/gpu as a limit),
  probes on the health endpoints, the drain grace period, the worker config (its id, ports,
  token file, device) as an annotation mounted through the downward API, the token Secret
  mounted read-only, and the spec's image over the operator's default;
- the front Service selects stage 0 only and serves REST and gRPC, the headless peer
  Service every worker;
- the token Secret holds the token base64-encoded;
- the status: conditions from the phase (transition time kept while a status holds),
  /scale's replicas and selector with and without scaleTarget; an invalid spec's status.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from worldmesh_operator import builders
from worldmesh_operator.spec import DeploymentSpec, parse_spec

OWNER = {
    "apiVersion": "worldmesh.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "toy", "namespace": "ml", "uid": "u-1"},
}


def spec(**extra: Any) -> DeploymentSpec:
    return parse_spec(
        {
            "apiVersion": "worldmesh.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "toy", "namespace": "ml"},
            "spec": {
                "model": {"name": "toy", "splitPoints": [2]},
                "stages": [
                    {"name": "a", "replicas": {"min": 1, "max": 3}, "resources": {"cpu": "500m"}},
                    {"name": "b", "resources": {"memory": "1Gi", "nvidia.com/gpu": 2}},
                ],
                **extra,
            },
        }
    )


def test_worker_pod() -> None:
    pod = builders.build_worker_pod(spec(), 1, "toy-s1-abc", "img:1", "toy-control-token", OWNER)
    meta = pod["metadata"]
    assert meta["name"] == "toy-s1-abc" and meta["namespace"] == "ml"
    assert meta["labels"] == {
        "app.kubernetes.io/name": "worldmesh",
        "app.kubernetes.io/instance": "toy",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "worldmesh-operator",
        "worldmesh.io/deployment": "toy",
        "worldmesh.io/stage": "1",
        "worldmesh.io/worker": "toy-s1-abc",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "worldmesh.io/v1alpha1",
            "kind": "ModelDeployment",
            "name": "toy",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "img:1"
    assert container["resources"] == {
        "requests": {"memory": "1Gi"},
        "limits": {"memory": "1Gi", "nvidia.com/gpu": "2"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080,
        "control": 8081,
        "grpc": 8001,
    }
    assert pod["spec"]["terminationGracePeriodSeconds"] > 60  # the worker's drain timeout
    assert pod["spec"]["restartPolicy"] == "Never"
    config = json.loads(meta["annotations"][builders.ANNOTATION_CONFIG])
    assert config["worker"] == "toy-s1-abc" and config["stage"] == 1
    assert config["ports"] == {"http": 8080, "control": 8081, "grpc": 8001}
    assert "host" not in config
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    assert container["env"] == [pod_ip]  # the worker serves on its pod's address
    assert config["tokenFile"] == f"{builders.TOKEN_DIR}/token" and config["device"] == "cuda"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "toy-control-token"
    item = volumes["config"]["downwardAPI"]["items"][0]
    assert item["fieldRef"]["fieldPath"] == "metadata.annotations['worldmesh.io/config']"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["token"]["readOnly"] and mounts["config"]["readOnly"]
    assert container["args"] == ["--config", f"{builders.CONFIG_DIR}/{item['path']}"]


def test_worker_pod_cpu_stage_and_spec_image() -> None:
    pod = builders.build_worker_pod(spec(image="mine:2"), 0, "w0", "img:1", "s")
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "mine:2"
    assert container["resources"] == {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m"}}
    assert json.loads(pod["metadata"]["annotations"][builders.ANNOTATION_CONFIG])["device"] == "cpu"
    assert "ownerReferences" not in pod["metadata"]
    with pytest.raises(IndexError):
        builders.build_worker_pod(spec(), 2, "w", "img", "s")


def test_worker_pod_mounts_the_ramps_config_map_where_its_config_reads_it() -> None:
    exits = {"enabled": True, "rampsConfigMap": {"name": "toy-ramps", "key": "toy.pt"}}
    pod = builders.build_worker_pod(spec(earlyExits=exits), 1, "w0", "img:1", "s")
    (container,) = pod["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "ramps"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "ramps"]
    assert mount["readOnly"] and volume["configMap"] == {
        "name": "toy-ramps",
        "items": [{"key": "toy.pt", "path": "toy.pt"}],
    }
    config = json.loads(pod["metadata"]["annotations"][builders.ANNOTATION_CONFIG])
    assert config["earlyExits"]["rampsFile"] == f"{mount['mountPath']}/toy.pt"
    plain = builders.build_worker_pod(spec(), 1, "w0", "img:1", "s")  # no ramps: no volume
    assert [v["name"] for v in plain["spec"]["volumes"]] == ["config", "token"]


def test_config_hash_changes_with_the_stage_config_only() -> None:
    def digest(s: DeploymentSpec, worker: str) -> str:
        pod = builders.build_worker_pod(s, 0, worker, "img", "s")
        return str(pod["metadata"]["annotations"][builders.ANNOTATION_CONFIG_HASH])

    assert digest(spec(), "w1") == digest(spec(), "w2")
    assert digest(spec(), "w1") != digest(spec(limits={"maxRetries": 7}), "w1")


def test_services_and_secret() -> None:
    front = builders.build_front_service(spec(), OWNER)
    assert front["metadata"]["name"] == "toy"
    assert front["spec"]["selector"] == {
        "worldmesh.io/deployment": "toy",
        "app.kubernetes.io/component": "worker",
        "worldmesh.io/stage": "0",
    }
    assert front["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    # one endpoint, both transports of the protocol
    assert {p["name"]: (p["port"], p["targetPort"]) for p in front["spec"]["ports"]} == {
        "http": (8080, "http"),
        "grpc": (8001, "grpc"),
    }
    peers = builders.build_peer_headless_service(spec(), OWNER)
    assert peers["metadata"]["name"] == "toy-peers"
    assert peers["spec"]["clusterIP"] == "None" and peers["spec"]["publishNotReadyAddresses"]
    assert "worldmesh.io/stage" not in peers["spec"]["selector"]
    secret = builders.build_token_secret(spec(), "s3cret", OWNER)
    assert secret["metadata"]["name"] == "toy-control-token"
    assert base64.b64decode(secret["data"]["token"]).decode() == "s3cret"
    assert builders.endpoint(spec()) == "http://toy.ml.svc:8080/v2/models/toy/infer"


def summary(phase: str, ready: tuple[int, int]) -> dict[str, Any]:
    return {
        "phase": phase,
        "reason": "why",
        "stages": [
            {"stage": 0, "desired": 2, "ready": ready[0]},
            {"stage": 1, "desired": 1, "ready": ready[1]},
        ],
        "worlds": {"ready": 2, "opening": 0, "broken": 0},
    }


def test_status_conditions_and_scale_fields() -> None:
    status = builders.build_status(spec(), summary("Ready", (2, 1)), {0: ["b", "a"]}, 3, [], "T1")
    assert status["phase"] == "Ready" and status["observedGeneration"] == 3
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "False",
    }
    assert status["stages"][0] == {"name": "a", "desired": 2, "ready": 2, "workers": ["a", "b"]}
    assert (status["readyWorkers"], status["desiredWorkers"], status["replicas"]) == (3, 3, 1)
    assert status["selector"] == "app.kubernetes.io/component=worker,worldmesh.io/deployment=toy"
    later = builders.build_status(
        spec(), summary("Degraded", (2, 1)), {}, 3, status["conditions"], "T2"
    )
    since = {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}
    assert since == {"Ready": "T2", "Progressing": "T1", "Degraded": "T2"}
    targeted = builders.build_status(
        spec(replicas=2, scaleTarget="a"), summary("Progressing", (2, 0)), {}, 1, [], "T"
    )
    assert targeted["replicas"] == 2
    assert targeted["selector"].endswith(",worldmesh.io/stage=0")


def test_invalid_status() -> None:
    status = builders.build_invalid_status("spec.stages: bad", 4, [], "T")
    assert status["phase"] == "Failed"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded == {
        "type": "Degraded",
        "status": "True",
        "reason": "InvalidSpec",
        "message": "spec.stages: bad",
        "lastTransitionTime": "T",
        "observedGeneration": 4,
    }


def test_early_exit_status_is_what_the_crd_keeps() -> None:
    """The front workers' ramp states, rounded, unknown values left out, and valid against
    the CRD's status schema (an API server prunes what its schema does not declare)."""
    import jsonschema
    import yaml

    from worldmesh_operator.schema import default_crd_path

    fronts = {
        "md-s0-b": {
            "policy": "online",
            "leader": "md-s0-a",
            "labelled": 120,
            "ramps": [
                {
                    "ramp": 0,
                    "active": True,
                    "threshold": 0.123456,
                    "exitRate": 0.25,
                    "agreement": 1.0,
                },
                {"ramp": 2, "active": False, "threshold": 0.0, "exitRate": 0.0, "agreement": None},
            ],
        },
        "md-s0-a": {"policy": "online", "leader": None, "labelled": 0, "ramps": []},
    }
    status = builders.build_early_exit_status(fronts)
    assert [w["worker"] for w in status["workers"]] == ["md-s0-a", "md-s0-b"]
    assert "leader" not in status["workers"][0] and status["workers"][1]["leader"] == "md-s0-a"
    assert status["workers"][1]["ramps"] == [
        {"ramp": 0, "active": True, "threshold": 0.1235, "exitRate": 0.25, "agreement": 1.0},
        {"ramp": 2, "active": False, "threshold": 0.0, "exitRate": 0.0},
    ]
    crd = yaml.safe_load(default_crd_path().read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    jsonschema.validate({"earlyExits": status}, _closed(schema))


def _closed(schema: Any) -> Any:
    """The schema with every object closed: a field it does not declare fails (pruned)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in schema:
        out["additionalProperties"] = False
    return out


def test_another_wire_version_is_outdated_and_never_wired_with_this_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upgrade whose workers cannot open worlds with the old ones rolls every worker
    (new config digest) and keeps the two apart (new layout), as a split change does."""
    from worldmesh_operator import desired

    current = (desired.config_digest(spec().stage_config(0)), builders.layout(spec()))
    monkeypatch.setattr(desired, "WIRE_VERSION", desired.WIRE_VERSION - 1)
    older = (desired.config_digest(spec().stage_config(0)), builders.layout(spec()))
    assert older[0] != current[0] and older[1] != current[1]
