"""The ModelDeployment CRD (crds/modeldeployment.yaml) on a real Kubernetes API server.

Covers, with one CRD install for the module (``kubectl apply -f crds/``):
- the CRD is created and Established, its names accepted, its schema structural (no
  NonStructuralSchema condition) and served exactly as written, and ``kubectl explain``
  (the published OpenAPI, only there for structural schemas) describes its fields;
- each ``examples/*.yaml`` is really applied, read back and deleted: the stored spec is
  the one the project's validator gets after applying the CRD's defaults, so the server
  and ``parse_spec`` default alike (a few defaulted fields are checked by value), and
  ``worldmesh validate`` accepts it too; a minimal manifest gets every default,
  including those of the objects defaulted to ``{}`` (stages' replicas, worlds,
  autoscaling), and a manifest that sets every optional field is accepted by both;
- bad manifests through ``kubectl apply --dry-run=server --validate=strict``, each its
  own case, are rejected by the server naming the field: wrong types (an integer, an
  int-or-string quantity), unknown fields (the server's strict field validation), negative
  or zero replicas and quantities, a bad quantity string, split points out of range or
  duplicated or too many, nccl without GPUs on every stage;
- every CEL rule (``x-kubernetes-validations``) of the CRD, enumerated from the file: a
  manifest that breaks just that rule is rejected by the server with exactly one error,
  at the rule's field path with the rule's message (a rule without a case fails);
- ``worldmesh validate`` (``worldmesh validate`` (``cli``)) rejects each of those bad manifests naming
  the same field (and, for the rules, the same message), so the project's validator and
  the real server agree.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worldmesh_operator import cli
from worldmesh_operator import schema as crd_schema
from worldmesh_operator.runtime.kube_client import KubeClient

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "modeldeployment.yaml"
CRD_NAME = "modeldeployments.worldmesh.io"
API_VERSION = "worldmesh.io/v1alpha1"
PLURAL = "modeldeployments"
NAMESPACE = "crd-test"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


# ----- manifests ----------------------------------------------------------------------


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": "toy"},
        "spec": {
            "model": {"name": "toy", "splitPoints": [2]},
            "stages": [{"name": "a"}, {"name": "b"}],
        },
    }


def three_stages() -> dict[str, Any]:
    manifest = minimal()
    manifest["spec"]["model"]["splitPoints"] = [2, 4]
    manifest["spec"]["stages"].append({"name": "c"})
    return manifest


def everything_set() -> dict[str, Any]:
    """Every optional field set (and every rule's other branch taken)."""
    manifest = minimal()
    manifest["metadata"]["name"] = "everything"
    manifest["spec"] = {
        "model": {"name": "toy", "splitPoints": [2]},
        "stages": [
            {
                "name": "a",
                "replicas": {"min": 1, "max": 4},
                "resources": {"cpu": 2, "memory": "2Gi", "nvidia.com/gpu": 1},
                "batching": {"maxBatchSize": 16, "maxQueueDelayMs": 0.5},
            },
            {
                "name": "b",
                "replicas": {"min": 2, "max": 2},
                "resources": {"cpu": "500m", "memory": 1073741824, "nvidia.com/gpu": 2},
            },
        ],
        "worlds": {
            "backend": "nccl",
            "openTimeoutSeconds": 5,
            "opTimeoutSeconds": 5.5,
            "heartbeatIntervalMs": 50,
            "heartbeatTimeoutMs": 101,
            "maxMessageBytes": 4096,
        },
        "autoscaling": {
            "enabled": True,
            "metric": "busyFraction",
            "target": 1,
            "scaleUpStabilizationSeconds": 5,
            "scaleDownStabilizationSeconds": 60,
            "scaleUpLimit": {"workers": 2, "periodSeconds": 10},
            "scaleDownLimit": {"workers": 1, "periodSeconds": 30},
        },
        "earlyExits": {
            "enabled": True,
            "accuracyBudget": 0.02,
            "rampBudget": 0.2,
            "ramps": [0, 1],
            "rampsConfigMap": {"name": "toy-ramps", "key": "r.pt"},
            "policy": "fixed",
            "threshold": 0.3,
        },
        "image": "worldmesh/worker:0.1",
        "port": 9000,
        "controlPort": 9001,
        "limits": {
            "maxRequestBytes": 2048,
            "maxQueueRows": 16,
            "requestTimeoutSeconds": 1.5,
            "maxRetries": 0,
        },
        "replicas": 2,
        "scaleTarget": "b",
    }
    return manifest


def edited(edits: dict[str, Any], base: Callable[[], dict[str, Any]] = minimal) -> dict[str, Any]:
    """``base()`` with each ``a.b[1].c`` path set to its value."""
    manifest = base()
    for path, value in edits.items():
        keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
        node: Any = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = copy.deepcopy(value)
    return manifest


# ----- the cluster side ---------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(kubectl: Kubectl) -> Iterator[str]:
    """The CRD installed from crds/ (once for the module) and a namespace to use; the
    CRD is deleted afterwards unless it was there before."""
    existed = kubectl("get", "crd", CRD_NAME).returncode == 0
    applied = kubectl("apply", "-f", str(CRD_FILE.parent))
    assert applied.returncode == 0, applied.stderr
    assert f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}" in applied.stdout
    # not `kubectl wait`: it fails, not waits, while a new CRD has no status.conditions yet
    assert established(kubectl), "the CRD did not become Established within 60 s"
    # kubectl's --validate=strict and explain read the published OpenAPI, which follows
    assert published(kubectl), "the CRD's OpenAPI was not published within 30 s"
    made = kubectl("create", "namespace", NAMESPACE)
    assert made.returncode == 0 or "AlreadyExists" in made.stderr, made.stderr
    yield NAMESPACE
    kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    if not existed:
        kubectl("delete", "crd", CRD_NAME, "--timeout=60s")


def established(kubectl: Kubectl, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        got = kubectl("get", "crd", CRD_NAME, "-o", "json")
        conditions = json.loads(got.stdout).get("status", {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def published(kubectl: Kubectl, timeout_s: float = 30) -> bool:
    """Only a structural schema is published as OpenAPI, a moment after Established."""
    deadline = time.monotonic() + timeout_s
    while kubectl("explain", "modeldeployment.spec").returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def apply(kubectl: Kubectl, manifest: dict[str, Any], *flags: str) -> Any:
    """``kubectl apply --dry-run=server --validate=strict``, as a CompletedProcess."""
    return kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        NAMESPACE,
        "-o",
        "json",
        *flags,
        "-f",
        "-",
        input=yaml.safe_dump(manifest),
    )


def server_errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The server's errors of a rejected apply, one string each."""
    assert result.returncode != 0, f"the server accepted it:\n{result.stdout[:2000]}"
    text = result.stderr.strip()
    head = re.match(r'The ModelDeployment "[^"]*" is invalid: ?', text)
    if head is None:
        return [text]
    rest = text[head.end() :].strip()
    if not rest.startswith("* "):
        return [rest]
    return [e.strip() for e in rest[2:].split("\n* ")]


def ours(manifest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """``worldmesh validate FILE``: its exit status and error lines, without the file
    and deployment name they start with."""
    file = tmp_path / "manifest.yaml"
    file.write_text(yaml.safe_dump(manifest))
    status = cli.main(["validate", str(file)])
    out, err = capsys.readouterr()
    prefix = f"{file}: {manifest['metadata']['name']}: "
    lines = err.splitlines()
    assert all(line.startswith(prefix) for line in lines), lines
    return status, out, [line[len(prefix) :] for line in lines]


# ----- 1. the CRD itself --------------------------------------------------------------


async def test_crd_is_established_and_structural(crd: str, admin: KubeClient) -> None:
    served = await admin.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, CRD_NAME)
    conditions = {c["type"]: c for c in served["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True", conditions
    assert conditions["NamesAccepted"]["status"] == "True", conditions
    assert "NonStructuralSchema" not in conditions, conditions["NonStructuralSchema"]
    written = yaml.safe_load(CRD_FILE.read_text())
    assert served["spec"]["versions"] == written["spec"]["versions"]  # nothing dropped
    assert served["status"]["acceptedNames"]["shortNames"] == ["md"]


def test_kubectl_explains_the_fields(crd: str, kubectl: Kubectl) -> None:
    """Only a structural schema is published as OpenAPI, which explain reads."""
    explained = kubectl("explain", "modeldeployment.spec.stages.resources.cpu")
    assert explained.returncode == 0, explained.stderr
    assert "A Kubernetes quantity" in explained.stdout
    explained = kubectl("explain", "modeldeployment.spec.worlds.heartbeatTimeoutMs")
    assert explained.returncode == 0, explained.stderr
    assert "<number>" in explained.stdout


# ----- 2. good manifests: accepted, defaulted as parse_spec defaults -------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
async def test_example_is_stored_with_the_expected_defaults(
    crd: str,
    kubectl: Kubectl,
    admin: KubeClient,
    example: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = yaml.safe_load(example.read_text())
    name = manifest["metadata"]["name"]
    created = kubectl("apply", "--validate=strict", "-n", crd, "-f", str(example))
    assert created.returncode == 0, created.stderr
    try:
        stored = await admin.get(API_VERSION, PLURAL, crd, name)
    finally:
        deleted = kubectl("delete", "-n", crd, "-f", str(example), "--timeout=30s")
        assert deleted.returncode == 0, deleted.stderr
    defaulted, errors = crd_schema.load_schema().check(manifest)
    assert errors == []
    assert stored["spec"] == defaulted["spec"]
    spec = stored["spec"]
    assert (spec["port"], spec["controlPort"], spec["grpcPort"]) == (8080, 8081, 8001)
    assert spec["worlds"]["maxMessageBytes"] == 268435456
    assert spec["autoscaling"]["scaleUpLimit"] == {"workers": 4, "periodSeconds": 15}
    assert spec["earlyExits"]["policy"] == "online"
    assert spec["limits"]["maxRetries"] == 3
    assert cli.main(["validate", str(example)]) == 0
    assert capsys.readouterr().out == f"ok: {name}\n"


def test_minimal_manifest_gets_every_default(crd: str, kubectl: Kubectl) -> None:
    result = apply(kubectl, minimal())
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)["spec"]
    assert spec == crd_schema.load_schema().check(minimal())[0]["spec"]
    for stage in spec["stages"]:  # replicas: {} defaulted, then its fields
        assert stage["replicas"] == {"min": 1, "max": 1}
        assert stage["batching"] == {"maxBatchSize": 8, "maxQueueDelayMs": 2}
    assert spec["worlds"] == {
        "backend": "auto",
        "openTimeoutSeconds": 10,
        "opTimeoutSeconds": 30,
        "heartbeatIntervalMs": 100,
        "heartbeatTimeoutMs": 800,
        "maxMessageBytes": 268435456,
        "fanOut": 2,
    }
    assert spec["autoscaling"] == {
        "enabled": False,
        "metric": "queueDepthPerWorker",
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
        "scaleUpLimit": {"workers": 4, "periodSeconds": 15},
        "scaleDownLimit": {"workers": 1, "periodSeconds": 60},
    }
    assert spec["earlyExits"]["ramps"] == [] and spec["model"]["splitPoints"] == [2]
    assert "replicas" not in spec and "image" not in spec


@pytest.mark.parametrize("make", [minimal, three_stages, everything_set])
def test_good_manifest_is_accepted_by_both(
    crd: str,
    kubectl: Kubectl,
    make: Callable[[], dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = apply(kubectl, make())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spec"] == crd_schema.load_schema().check(make())[0]["spec"]
    assert ours(make(), tmp_path, capsys)[0] == 0


# ----- 3. bad manifests: rejected by both, naming the field ---------------------------

S0 = "spec.stages[0]"
#: (id, edits of minimal(), the field both must name, a fragment of the server's error,
#: a fragment of worldmesh validate's error)
BAD: list[tuple[str, dict[str, Any], str, str, str]] = [
    ("port-not-integer", {"spec.port": "http"}, "spec.port", "must be of type integer", "must be an integer"),
    ("replicas-max-not-integer", {f"{S0}.replicas": {"max": "two"}}, f"{S0}.replicas.max", "must be of type integer", "must be an integer"),
    ("max-batch-fraction", {f"{S0}.batching": {"maxBatchSize": 8.5}}, f"{S0}.batching.maxBatchSize", "must be of type integer", "must be an integer"),
    ("cpu-list", {f"{S0}.resources": {"cpu": [1]}}, f"{S0}.resources.cpu", "must be of type integer,string", "must be an integer or a string"),
    ("cpu-fraction", {f"{S0}.resources": {"cpu": 1.5}}, f"{S0}.resources.cpu", "must be of type integer,string", "must be an integer or a string"),
    ("cpu-bad-quantity", {f"{S0}.resources": {"cpu": "lots"}}, f"{S0}.resources.cpu", "should match", "must match"),
    ("memory-negative", {f"{S0}.resources": {"memory": -5}}, f"{S0}.resources.memory", "greater than or equal to 0", "must be >= 0"),
    ("gpus-negative", {f"{S0}.resources": {"nvidia.com/gpu": -1}}, f"{S0}.resources.nvidia.com/gpu", "greater than or equal to 0", "must be >= 0"),
    ("unknown-stage-field", {f"{S0}.replica": {"min": 1}}, f"{S0}.replica", "unknown field", "unknown field"),
    ("unknown-worlds-field", {"spec.worlds": {"heartbeat": 5}}, "spec.worlds.heartbeat", "unknown field", "unknown field"),
    ("fan-out-zero", {"spec.worlds": {"fanOut": 0}}, "spec.worlds.fanOut", "greater than or equal to 1", "must be >= 1"),
    ("fan-out-word", {"spec.worlds": {"fanOut": "most"}}, "spec.worlds.fanOut", "should match", "must match"),
    ("unknown-spec-field", {"spec.replica": 1}, "spec.replica", "unknown field", "unknown field"),
    ("replicas-min-negative", {f"{S0}.replicas": {"min": -1}}, f"{S0}.replicas.min", "greater than or equal to 1", "must be >= 1"),
    ("replicas-max-zero", {f"{S0}.replicas": {"max": 0}}, f"{S0}.replicas.max", "greater than or equal to 1", "must be >= 1"),
    ("replicas-max-too-big", {f"{S0}.replicas": {"max": 257}}, f"{S0}.replicas.max", "less than or equal to 256", "must be <= 256"),
    ("scale-replicas-negative", {"spec.replicas": -1}, "spec.replicas", "greater than or equal to 1", "must be >= 1"),
    ("max-below-min", {f"{S0}.replicas": {"min": 3, "max": 2}}, f"{S0}.replicas.max", "must be >= replicas.min", "must be >= replicas.min"),
    ("split-point-zero", {"spec.model.splitPoints": [0]}, "spec.model.splitPoints[0]", "greater than or equal to 1", "must be >= 1"),
    ("split-point-negative", {"spec.model.splitPoints": [-3]}, "spec.model.splitPoints[0]", "greater than or equal to 1", "must be >= 1"),
    ("split-points-duplicate", {"spec.model.splitPoints": [2, 2]}, "spec.model.splitPoints[1]", "Duplicate value: 2", "duplicate value 2"),
    ("split-points-decreasing", {"spec.model.splitPoints": [3, 2], "spec.stages": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, "spec.model.splitPoints", "must be strictly increasing", "must be strictly increasing"),
    ("split-points-too-many", {"spec.model.splitPoints": list(range(1, 65))}, "spec.model.splitPoints", "must have at most 63 items", "must have at most 63 item(s)"),
    ("split-points-not-integers", {"spec.model.splitPoints": ["2"]}, "spec.model.splitPoints[0]", "must be of type integer", "must be an integer"),
    ("stages-miscounted", {"spec.model.splitPoints": [2, 4]}, "spec.stages", "must have exactly one more stage", "must have exactly one more stage"),
    ("nccl-without-gpus", {"spec.worlds": {"backend": "nccl"}}, "spec.worlds.backend", "nccl worlds need every stage", "nccl worlds need every stage"),
    ("nccl-one-stage-without-gpus", {"spec.worlds": {"backend": "nccl"}, f"{S0}.resources": {"nvidia.com/gpu": 1}}, "spec.worlds.backend", "nccl worlds need every stage", "nccl worlds need every stage"),
    ("nccl-zero-gpus", {"spec.worlds": {"backend": "nccl"}, f"{S0}.resources": {"nvidia.com/gpu": 0}, "spec.stages[1].resources": {"nvidia.com/gpu": 1}}, "spec.worlds.backend", "nccl worlds need every stage", "nccl worlds need every stage"),
    ("backend-unknown", {"spec.worlds": {"backend": "mpi"}}, "spec.worlds.backend", "Unsupported value", "must be one of auto, gloo, nccl"),
    ("model-name", {"spec.model.name": "resnet50"}, "spec.model.name", "should match", "must match"),
    ("stage-name", {f"{S0}.name": "Stem"}, f"{S0}.name", "should match", "must match"),
    ("stage-name-duplicate", {"spec.stages[1].name": "a"}, "spec.stages[1]", "Duplicate value", "duplicate value 'a'"),
    ("stages-empty", {"spec.stages": [], "spec.model.splitPoints": []}, "spec.stages", "should have at least 1 items", "must have at least 1 item(s)"),
    ("model-missing", {"spec.model": {"splitPoints": [2]}}, "spec.model.name", "Required value", "required"),
    ("image-empty", {"spec.image": ""}, "spec.image", "at least 1 chars long", "must be at least 1 characters long"),
    ("target-zero", {"spec.autoscaling": {"target": 0}}, "spec.autoscaling.target", "should be greater than 0", "must be > 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edits", "field", "theirs", "mine"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_manifest_is_rejected_by_both(
    crd: str,
    kubectl: Kubectl,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edits: dict[str, Any],
    field: str,
    theirs: str,
    mine: str,
) -> None:
    manifest = edited(edits)
    errors = server_errors(apply(kubectl, manifest))
    assert any(names(e, field) and theirs in e for e in errors), errors
    status, out, found = ours(manifest, tmp_path, capsys)
    assert (status, out) == (1, ""), found
    assert any(names(e, field) and mine in e for e in found), found


def names(error: str, field: str) -> bool:
    """Whether an error is about ``field`` (or a field inside it): ``field: ...``,
    ``field.name: ...``, or the server's ``unknown field "field"``."""
    at = error.split(":", 1)[0]
    return at == field or at.startswith((f"{field}.", f"{field}[")) or f'"{field}"' in error


# ----- every CEL rule of the CRD ------------------------------------------------------


def crd_rules() -> list[tuple[str, dict[str, str]]]:
    """Every x-kubernetes-validations rule of the CRD file with its node's path
    (``spec.stages[*].replicas``), in file order."""
    schema = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: dict[str, Any], path: str) -> None:
        found.extend((path, rule) for rule in node.get("x-kubernetes-validations", []))
        for key, sub in node.get("properties", {}).items():
            visit(sub, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[*]")

    visit(schema["openAPIV3Schema"], "")
    return found


#: For each rule (by its message): where its node is in the manifest and the manifest
#: that breaks that rule and nothing else.
VIOLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "must have exactly one more stage than model.splitPoints has split points": (
        "spec",
        {"spec.model.splitPoints": [2, 4]},
    ),
    "must differ from port": ("spec", {"spec.controlPort": 8080}),
    "must differ from port and controlPort": ("spec", {"spec.grpcPort": 8081}),
    "must name a stage of spec.stages": ("spec", {"spec.scaleTarget": "tail"}),
    "must lie within replicas.min..replicas.max of every stage it scales": (
        "spec",
        {"spec.replicas": 2, "spec.stages[0].replicas": {"max": 3}},
    ),
    "nccl worlds need every stage to request resources nvidia.com/gpu >= 1": (
        "spec",
        {"spec.worlds": {"backend": "nccl"}, "spec.stages[1].resources": {"nvidia.com/gpu": 1}},
    ),
    "must be strictly increasing": (
        "spec.model.splitPoints",
        {
            "spec.model.splitPoints": [4, 2],
            "spec.stages": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
        },
    ),
    "must be >= replicas.min": ("spec.stages[1].replicas", {"spec.stages[1].replicas": {"min": 2}}),
    "must exceed twice heartbeatIntervalMs": (
        "spec.worlds",
        {"spec.worlds": {"heartbeatIntervalMs": 400}},
    ),
    "is required when autoscaling is enabled": (
        "spec.autoscaling",
        {"spec.autoscaling": {"enabled": True}},
    ),
    "must be <= 1 for the busyFraction metric": (
        "spec.autoscaling",
        {"spec.autoscaling": {"metric": "busyFraction", "target": 1.5}},
    ),
    "rampsFile and rampsConfigMap are exclusive (rampsConfigMap mounts the file for the workers)": (
        "spec.earlyExits",
        {"spec.earlyExits": {"rampsFile": "/r.pt", "rampsConfigMap": {"name": "r"}}},
    ),
    "must not be '.' or start with '..'": (
        "spec.earlyExits.rampsConfigMap.key",
        {"spec.earlyExits": {"rampsConfigMap": {"name": "r", "key": "..ramps"}}},
    ),
}
RULES = crd_rules()


def rule_id(where: str, rule: dict[str, str]) -> str:
    """``spec.worlds-must-exceed-twice-heartbeatIntervalMs``: no spaces, for ``-k``."""
    words = re.sub(r"[^A-Za-z0-9]+", "-", rule["message"]).strip("-")
    return f"{where.replace('[*]', '')}-{words}"[:72].rstrip("-")


def test_every_case_names_a_rule_of_the_crd() -> None:
    messages = [rule["message"] for _, rule in RULES]
    assert len(set(messages)) == len(messages)  # a message identifies its rule
    assert set(VIOLATIONS) <= set(messages)


@pytest.mark.parametrize(("where", "rule"), RULES, ids=[rule_id(p, r) for p, r in RULES])
def test_each_rule_is_enforced_by_both(
    crd: str,
    kubectl: Kubectl,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    rule: dict[str, str],
) -> None:
    assert rule["message"] in VIOLATIONS, f"no manifest breaks the rule {rule['rule']!r}"
    node, edits = VIOLATIONS[rule["message"]]
    assert re.sub(r"\[\d+\]", "[*]", node) == where, "the case's node is not the rule's"
    field = node + rule.get("fieldPath", "")
    manifest = edited(edits)
    errors = server_errors(apply(kubectl, manifest))
    assert len(errors) == 1, errors  # just this rule
    assert errors[0].startswith(f"{field}: Invalid value: "), errors
    assert errors[0].endswith(rule["message"]), errors
    status, out, found = ours(manifest, tmp_path, capsys)
    assert (status, out, found) == (1, "", [f"{field}: {rule['message']}"])
