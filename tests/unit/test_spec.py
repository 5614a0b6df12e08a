"""The ModelDeployment spec (``spec.py``) and its one schema, the CRD file (``schema.py``).

Covers:
- both examples parse, every field lands in its dataclass, and ``worldmesh validate``
  says ``ok`` for them;
- a minimal manifest takes every default of the CRD (stages, worlds, autoscaling,
  early exits, ports, limits), including defaults nested in defaulted objects;
- ``stage_config(i)`` is a configuration the worker's ``parse_config`` accepts, with the
  stage's batching and the deployment's limits and worlds;
- the /scale semantics: ``pinned_replicas`` is ``spec.replicas`` for the stage named by
  ``scaleTarget`` (every stage without one) and None elsewhere;
- each bad manifest is rejected with the exact field path and message: wrong types
  (booleans and fractions are not integers), bounds, enums, patterns, unknown fields,
  required fields, duplicate stage names and split points (list keys), and every CEL rule
  (min > max, split points not increasing, stage count, heartbeat, ports, scaleTarget,
  replicas range, nccl without GPUs, autoscaling target); the header (apiVersion, kind,
  metadata.name, metadata.namespace);
- all errors of a manifest are reported together; a rule is skipped only where its own
  subtree has schema errors;
- the CRD is sound as far as can be checked offline: names, one storage version, a
  structural schema (types everywhere but int-or-string, nothing typed or defaulted in
  anyOf branches beyond int-or-string's bare pair, list-map keys required, no
  additionalProperties beside properties), defaults valid against their own schema and
  CEL rules as written (the API server does not default inside a default), every CEL rule compiles
  and evaluates on a manifest that sets every field, every ``fieldPath``, printer
  column and scale path exists; any shipped copy of the CRD is byte-equal;
- ``worldmesh validate`` (``cli``): exit 0/1/2, errors on stderr with the file and field path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import pytest
import yaml
from celpy import celtypes

from worldmesh_operator import cli
from worldmesh_operator import schema as crd_schema
from worldmesh_operator.schema import CrdError, CrdSchema, cel_escape, load_schema, to_cel
from worldmesh_operator.spec import DeploymentSpec, SpecError, parse_spec
from worldmesh_worker.config import parse_config
from worldmesh_worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "modeldeployment.yaml"
EXAMPLES = ROOT / "examples"


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "worldmesh.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "toy"},
        "spec": {
            "model": {"name": "toy", "splitPoints": [2]},
            "stages": [{"name": "a"}, {"name": "b"}],
        },
    }


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return data


def errors_of(manifest: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(manifest)
    assert str(info.value) == "\n".join(str(e) for e in info.value.errors)
    return [str(e) for e in info.value.errors]


def test_fashion_example_parses() -> None:
    spec = parse_spec(example("efficientnet-fashion.yaml"))
    assert (spec.name, spec.namespace, spec.model) == ("fashion", "default", "efficientnet-lite0")
    assert spec.split_points == (6, 12)
    assert [s.name for s in spec.stages] == ["stem", "middle", "head"]
    assert [s.index for s in spec.stages] == [0, 1, 2]
    middle = spec.stage("middle")
    assert (middle.min_replicas, middle.max_replicas) == (1, 4)
    assert (middle.resources.cpu, middle.resources.memory, middle.resources.gpus) == ("2", "2Gi", 0)
    assert middle.batching.max_queue_delay_ms == 1.0
    assert spec.autoscaling.enabled and spec.autoscaling.target == 8.0
    assert spec.autoscaling.scale_down_stabilization_seconds == 120
    assert spec.early_exits.enabled and spec.limits.max_queue_rows == 1024
    with pytest.raises(KeyError):
        spec.stage("tail")


def test_minilm_example_parses() -> None:
    spec = parse_spec(example("minilm-reviews.yaml"))
    assert (spec.model, spec.split_points, len(spec.stages)) == ("minilm-l6", (4,), 2)
    assert (spec.autoscaling.metric, spec.autoscaling.target) == ("busyFraction", 0.7)


def test_defaults_come_from_the_crd() -> None:
    spec = parse_spec(minimal())
    assert spec == DeploymentSpec(
        name="toy", namespace="default", model="toy", split_points=(2,), stages=spec.stages
    )
    stage = spec.stages[0]
    assert (stage.min_replicas, stage.max_replicas, stage.resources.gpus) == (1, 1, 0)
    assert (stage.batching.max_batch_size, stage.batching.max_queue_delay_ms) == (8, 2.0)
    assert (spec.worlds.heartbeat_interval_ms, spec.worlds.heartbeat_timeout_ms) == (100.0, 800.0)
    assert spec.autoscaling.scale_up_limit.period_seconds == 15  # nested in a defaulted object
    assert (spec.ports.http, spec.ports.control, spec.replicas, spec.image) == (
        8080,
        8081,
        None,
        None,
    )
    assert (spec.early_exits.accuracy_budget, spec.early_exits.ramp_budget) == (0.01, 0.1)
    manifest = minimal()
    parse_spec(manifest)
    assert "worlds" not in manifest["spec"]  # the caller's dict is left alone


def test_split_points_default_to_one_stage() -> None:
    manifest = minimal()
    manifest["spec"]["model"] = {"name": "pkg.mod:build"}
    manifest["spec"]["stages"] = [{"name": "only"}]
    manifest["metadata"]["namespace"] = "serving"
    spec = parse_spec(manifest)
    assert (spec.split_points, spec.namespace, spec.model) == ((), "serving", "pkg.mod:build")


def test_stage_config_is_a_worker_config() -> None:
    spec = parse_spec(example("efficientnet-fashion.yaml"))
    config = parse_config({**spec.stage_config(2), "worker": "fashion-head-0"}, WorkerSettings())
    assert (config.deployment, config.stage, config.model) == ("fashion", 2, "efficientnet-lite0")
    assert config.split_points == (6, 12) and config.is_last
    assert config.batching.max_batch_size == 32
    assert config.limits.request_timeout_s == 20.0
    assert config.worlds.heartbeat_timeout_s == pytest.approx(0.8)
    assert not {"worker", "host", "ports", "token"} & spec.stage_config(0).keys()
    with pytest.raises(IndexError):
        spec.stage_config(3)


def test_pinned_replicas() -> None:
    manifest = minimal()
    manifest["spec"]["stages"] = [
        {"name": "a", "replicas": {"min": 1, "max": 4}},
        {"name": "b", "replicas": {"max": 4}},
    ]
    assert [parse_spec(manifest).pinned_replicas(i) for i in (0, 1)] == [None, None]
    manifest["spec"]["replicas"] = 3
    assert [parse_spec(manifest).pinned_replicas(i) for i in (0, 1)] == [3, 3]
    manifest["spec"]["scaleTarget"] = "b"
    assert [parse_spec(manifest).pinned_replicas(i) for i in (0, 1)] == [None, 3]


def _set(manifest: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Set ``a.b[1].c`` (``...c=DELETE`` removes it)."""
    keys: list[str | int] = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        keys.append(int(part) if part.isdigit() else part)
    node: Any = manifest
    for key in keys[:-1]:
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return manifest


DELETE = object()
S = "spec.stages"
BAD = [
    (
        "spec.stages[0].replicas",
        {"max": "two"},
        f"{S}[0].replicas.max: must be an integer, got 'two'",
    ),
    ("spec.stages[1].batching", {"maxBatchSize": 0}, f"{S}[1].batching.maxBatchSize: must be >= 1"),
    (
        "spec.stages[1].batching",
        {"maxBatchSize": 5000},
        f"{S}[1].batching.maxBatchSize: must be <= 4096",
    ),
    (
        "spec.stages[0].batching",
        {"maxBatchSize": True},
        f"{S}[0].batching.maxBatchSize: must be an integer, got True",
    ),
    (
        "spec.stages[0].batching",
        {"maxBatchSize": 8.5},
        f"{S}[0].batching.maxBatchSize: must be an integer, got 8.5",
    ),
    (
        "spec.stages[0].batching",
        {"maxQueueDelayMs": -1},
        f"{S}[0].batching.maxQueueDelayMs: must be >= 0",
    ),
    ("spec.stages[1].replicas", {"max": 0}, f"{S}[1].replicas.max: must be >= 1"),
    (
        "spec.worlds",
        {"backend": "mpi"},
        "spec.worlds.backend: must be one of auto, gloo, nccl, got 'mpi'",
    ),
    (
        "spec.autoscaling",
        {"metric": "cpu"},
        "spec.autoscaling.metric: must be one of queueDepthPerWorker, busyFraction, got 'cpu'",
    ),
    ("spec.earlyExits", {"accuracyBudget": 1.5}, "spec.earlyExits.accuracyBudget: must be <= 1"),
    ("spec.stages[0].replica", {"min": 1}, f"{S}[0].replica: unknown field"),
    ("spec.worlds", {"heartbeat": 5}, "spec.worlds.heartbeat: unknown field"),
    ("spce", {}, "spce: unknown field"),
    ("spec.stages[1].name", "a", f"{S}[1].name: duplicate value 'a'"),
    (
        "spec.stages[0].name",
        "Stem",
        f"{S}[0].name: must match ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$, got 'Stem'",
    ),
    (
        "spec.stages[0].replicas",
        {"min": 3, "max": 2},
        f"{S}[0].replicas.max: must be >= replicas.min",
    ),
    ("spec.model.splitPoints", [3, 2], "spec.model.splitPoints: must be strictly increasing"),
    ("spec.model.splitPoints", [2, 2], "spec.model.splitPoints[1]: duplicate value 2"),
    ("spec.model.splitPoints", [0], "spec.model.splitPoints[0]: must be >= 1"),
    (
        "spec.model.splitPoints",
        [2, 4],
        f"{S}: must have exactly one more stage than model.splitPoints has split points",
    ),
    ("spec.model.name", "resnet50", "spec.model.name: must match"),
    ("spec.model.name", DELETE, "spec.model.name: required"),
    ("spec.stages", DELETE, "spec.stages: required"),
    ("spec.stages", [], "spec.stages: must have at least 1 item(s)"),
    (
        "spec.stages[0].resources",
        {"nvidia.com/gpu": -1},
        f"{S}[0].resources.nvidia.com/gpu: must be >= 0",
    ),
    ("spec.stages[0].resources", {"cpu": "lots"}, f"{S}[0].resources.cpu: must match"),
    ("spec.stages[0].resources", {"memory": -5}, f"{S}[0].resources.memory: must be >= 0"),
    (
        "spec.stages[0].resources",
        {"cpu": [1]},
        f"{S}[0].resources.cpu: must be an integer or a string, got [1]",
    ),
    (
        "spec.worlds",
        {"heartbeatTimeoutMs": 150},
        "spec.worlds.heartbeatTimeoutMs: must exceed twice heartbeatIntervalMs",
    ),
    ("spec.controlPort", 8080, "spec.controlPort: must differ from port"),
    ("spec.grpcPort", 8080, "spec.grpcPort: must differ from port and controlPort"),
    ("spec.port", 70000, "spec.port: must be <= 65535"),
    ("spec.scaleTarget", "tail", "spec.scaleTarget: must name a stage of spec.stages"),
    (
        "spec.replicas",
        2,
        "spec.replicas: must lie within replicas.min..replicas.max of every stage it scales",
    ),
    (
        "spec.worlds",
        {"backend": "nccl"},
        "spec.worlds.backend: nccl worlds need every stage to request resources nvidia.com/gpu >= 1",
    ),
    (
        "spec.autoscaling",
        {"enabled": True},
        "spec.autoscaling.target: is required when autoscaling is enabled",
    ),
    (
        "spec.autoscaling",
        {"metric": "busyFraction", "target": 2},
        "spec.autoscaling.target: must be <= 1 for the busyFraction metric",
    ),
    ("spec.autoscaling", {"target": 0}, "spec.autoscaling.target: must be > 0"),
    ("spec.earlyExits", {"ramps": [3, 3]}, "spec.earlyExits.ramps[1]: duplicate value 3"),
    (
        "spec.earlyExits",
        {"rampsFile": "/r.pt", "rampsConfigMap": {"name": "r"}},
        "spec.earlyExits: rampsFile and rampsConfigMap are exclusive",
    ),
    ("spec.earlyExits", {"rampsConfigMap": {}}, "spec.earlyExits.rampsConfigMap.name: required"),
    ("spec.image", "", "spec.image: must be at least 1 characters long"),
    ("spec", "toy", "spec: must be a mapping, got 'toy'"),
    (
        "apiVersion",
        "worldmesh.io/v1",
        "apiVersion: must be worldmesh.io/v1alpha1, got 'worldmesh.io/v1'",
    ),
    ("kind", "Deployment", "kind: must be ModelDeployment, got 'Deployment'"),
    ("metadata.name", "Bad_Name", "metadata.name: must be a DNS-1035 label, got 'Bad_Name'"),
    ("metadata.name", DELETE, "metadata.name: must be a DNS-1035 label, got None"),
    ("metadata.namespace", "Prod", "metadata.namespace: must be a DNS label, got 'Prod'"),
    ("metadata", None, "metadata: must be a mapping with a name"),
]


@pytest.mark.parametrize(
    ("path", "value", "error"), BAD, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD]
)
def test_bad_manifest_names_the_field(path: str, value: Any, error: str) -> None:
    found = errors_of(_set(minimal(), path, value))
    assert any(e.startswith(error) for e in found), found


def test_every_error_is_reported_at_once() -> None:
    manifest = minimal()
    manifest["kind"] = "Pod"
    manifest["spec"]["stages"][0]["replicas"] = {"min": 0}
    manifest["spec"]["stages"][1]["replicas"] = {"min": 2, "max": 1}
    manifest["spec"]["port"] = "http"
    found = errors_of(manifest)
    assert found == [
        "kind: must be ModelDeployment, got 'Pod'",
        "spec.port: must be an integer, got 'http'",
        "spec.stages[0].replicas.min: must be >= 1",
        "spec.stages[1].replicas.max: must be >= replicas.min",
    ]


def test_not_a_mapping() -> None:
    assert errors_of(["toy"]) == ["(manifest): must be a mapping"]


def test_any_mapping_is_a_manifest() -> None:
    """kopf hands over a Body, a read-only Mapping rather than a dict."""
    manifest = minimal()
    manifest["spec"]["stages"][1]["batching"] = MappingProxyType({"maxBatchSize": 4})
    spec = parse_spec(MappingProxyType(manifest))
    assert spec.stages[1].batching.max_batch_size == 4


def test_errors_follow_the_list_order() -> None:
    manifest = minimal()
    manifest["spec"]["model"]["splitPoints"] = list(range(1, 12))
    manifest["spec"]["stages"] = [{"name": f"s{i}"} for i in range(12)]
    for i in (2, 10):
        manifest["spec"]["stages"][i]["replicas"] = {"min": 0}
    assert errors_of(manifest) == [
        "spec.stages[2].replicas.min: must be >= 1",
        "spec.stages[10].replicas.min: must be >= 1",
    ]


def test_cel_binds_self_as_kubernetes_does() -> None:
    assert cel_escape("nvidia.com/gpu") == "nvidia__dot__com__slash__gpu"
    assert cel_escape("a__b-c") == "a__underscores__b__dash__c"
    assert cel_escape("namespace") == "__namespace__"
    schema = {
        "type": "object",
        "properties": {"n": {"type": "number"}, "nvidia.com/gpu": {"type": "integer"}},
    }
    cel = to_cel({"n": 2, "nvidia.com/gpu": 1, "extra": 1}, schema)
    assert set(map(str, cel)) == {"n", "nvidia__dot__com__slash__gpu"}
    assert isinstance(cel["n"], float)


# ----- the CRD itself ---------------------------------------------------------------


def crd() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return data


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, sub in node.get("properties", {}).items():
        found += schema_nodes(sub, f"{path}.{key}")
    if "items" in node:
        found += schema_nodes(node["items"], f"{path}[*]")
    return found


def resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = schema
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def full_manifest() -> dict[str, Any]:
    """Every optional field set, so that every branch of every rule is evaluated."""
    manifest = example("efficientnet-fashion.yaml")
    spec = manifest["spec"]
    for stage in spec["stages"]:
        stage["resources"]["nvidia.com/gpu"] = 1
    spec.update(replicas=2, scaleTarget="middle", image="worldmesh/worker:0.1")
    spec["worlds"].update(
        backend="nccl", openTimeoutSeconds=5, opTimeoutSeconds=5, maxMessageBytes=4096
    )
    spec["autoscaling"].update(metric="busyFraction", target=0.8)
    spec["earlyExits"]["ramps"] = [3, 9]
    return manifest


def test_crd_names_and_versions() -> None:
    spec = crd()["spec"]
    assert crd()["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    assert spec["names"] == {
        "kind": "ModelDeployment",
        "listKind": "ModelDeploymentList",
        "plural": "modeldeployments",
        "singular": "modeldeployment",
        "shortNames": ["md"],
    }
    assert spec["scope"] == "Namespaced"
    assert [(v["name"], v["served"], v["storage"]) for v in spec["versions"]] == [
        ("v1alpha1", True, True)
    ]


#: The only typed branches a structural schema allows: those of x-kubernetes-int-or-string.
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
#: What an anyOf/allOf/oneOf/not branch of a structural schema must not set.
NOT_IN_BRANCHES = {"type", "default", "nullable", "additionalProperties"}


def branch_problems(branch: dict[str, Any], path: str) -> list[str]:
    """Why a logical-junctor branch (and everything under it) is not structural."""
    found = [f"{path}.{key}" for key in branch if key in NOT_IN_BRANCHES]
    found += [f"{path}.{key}" for key in branch if key.startswith("x-kubernetes-")]
    for key, sub in branch.get("properties", {}).items():
        found += branch_problems(sub, f"{path}.properties[{key}]")
    if isinstance(branch.get("items"), dict):
        found += branch_problems(branch["items"], f"{path}.items")
    for word in ("anyOf", "allOf", "oneOf"):
        for i, sub in enumerate(branch.get(word, [])):
            found += branch_problems(sub, f"{path}.{word}[{i}]")
    if isinstance(branch.get("not"), dict):
        found += branch_problems(branch["not"], f"{path}.not")
    return found


def test_crd_schema_is_structural() -> None:
    """The rules of a structural schema as the API server applies them (the cluster test
    checks the real server agrees): a type on every node but int-or-string ones, no types,
    defaults or extensions inside anyOf/allOf/oneOf/not (int-or-string's bare
    ``anyOf: [{type: integer}, {type: string}]`` excepted, where bounds and patterns sit on
    the property itself), and every default valid (schema and CEL rules) as written: the
    server checks a default without defaulting the fields inside it."""
    compiled = CrdSchema(crd())
    schema = compiled.openapi
    for path, node in schema_nodes(schema):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node.get("anyOf", INT_OR_STRING) == INT_OR_STRING, path
        else:
            assert node.get("type") in {
                "object",
                "array",
                "string",
                "integer",
                "number",
                "boolean",
            }, path
        for word in ("anyOf", "allOf", "oneOf"):
            if node.get(word) == INT_OR_STRING and node.get("x-kubernetes-int-or-string"):
                continue
            for i, branch in enumerate(node.get(word, [])):
                assert branch_problems(branch, f"{path}.{word}[{i}]") == []
        if isinstance(node.get("not"), dict):
            assert branch_problems(node["not"], f"{path}.not") == []
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-list-type") == "map":
            items = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in items.get("required", []) or "default" in items["properties"][key], (
                    path
                )
        if node.get("x-kubernetes-list-type") == "set":
            assert node["items"]["type"] in {"string", "integer", "number", "boolean"}, path
        if "default" in node:
            jsonschema.validate(node["default"], crd_schema.to_json_schema(node))
            for value, sub, where in crd_schema.walk(node["default"], node):
                for rule in sub.get("x-kubernetes-validations", []):
                    program = compiled.programs[rule["rule"]]
                    result = program.evaluate({"self": to_cel(value, sub)})
                    assert isinstance(result, celtypes.BoolType), (path, where, rule, result)
                    assert result, (path, where, rule["rule"])
    assert set(schema["properties"]["metadata"]) == {"type"}


def test_crd_rules_compile_and_evaluate() -> None:
    compiled = CrdSchema(crd())
    schema = compiled.openapi
    rules = [(n, r) for _, n in schema_nodes(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) == len(compiled.programs) >= 8
    for node, rule in rules:
        assert rule["message"], rule
        if "fieldPath" in rule:  # relative to the rule's node
            resolve(node, rule["fieldPath"])
    for manifest in (
        full_manifest(),
        example("efficientnet-fashion.yaml"),
        example("minilm-reviews.yaml"),
    ):
        assert compiled.check(manifest)[1] == []  # no rule failed, none could not be evaluated


def test_crd_printer_columns_and_scale_paths_exist() -> None:
    version = crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == ["Stages", "Ready", "Desired", "Endpoint", "Age"]
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"] != ".metadata.creationTimestamp":
            assert resolve(schema, column["jsonPath"])["type"] == column["type"]
    scale = version["subresources"]["scale"]
    assert version["subresources"]["status"] == {}
    assert resolve(schema, scale["specReplicasPath"])["type"] == "integer"
    assert resolve(schema, scale["statusReplicasPath"])["type"] == "integer"
    assert resolve(schema, scale["labelSelectorPath"])["type"] == "string"
    conditions = resolve(schema, ".status.conditions")["items"]
    assert set(conditions["required"]) == {
        "type",
        "status",
        "lastTransitionTime",
        "reason",
        "message",
    }


def test_every_copy_of_the_crd_is_byte_equal() -> None:
    copies = [
        ROOT / "helm" / "worldmesh" / "crds" / "modeldeployment.yaml",
        ROOT / "operator" / "worldmesh_operator" / "crds" / "modeldeployment.yaml",
    ]
    for copy_path in copies:
        if copy_path.exists():
            assert copy_path.read_bytes() == CRD_PATH.read_bytes(), copy_path
    assert crd_schema.default_crd_path() == CRD_PATH


def test_a_missing_or_broken_crd_is_a_crd_error(tmp_path: Path) -> None:
    with pytest.raises(CrdError, match="cannot read"):
        load_schema(tmp_path / "absent.yaml")
    broken = copy.deepcopy(crd())
    openapi = broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    openapi["x-kubernetes-validations"] = [{"rule": "self.spec.stages <=", "message": "x"}]
    with pytest.raises(CrdError, match="rule"):
        CrdSchema(broken)
    with pytest.raises(CrdError, match="not a CustomResourceDefinition"):
        CrdSchema({"spec": {}})


# ----- worldmesh validate -------------------------------------------------------------


def test_validate_main_ok(capsys: pytest.CaptureFixture[str]) -> None:
    names = ("efficientnet-fashion.yaml", "minilm-reviews.yaml", "mpnet-reviews.yaml")
    assert cli.main(["validate", *(str(EXAMPLES / name) for name in names)]) == 0
    assert capsys.readouterr().out == "ok: fashion\nok: reviews\nok: reviews-mpnet\n"


def test_validate_main_reports_every_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _set(_set(minimal(), "spec.port", 0), "spec.stages[1].name", "a")
    file = tmp_path / "two.yaml"
    file.write_text(yaml.safe_dump_all([minimal(), bad, "text"]))
    assert cli.main(["validate", str(file)]) == 1
    out, err = capsys.readouterr()
    assert out == "ok: toy\n"
    assert err.splitlines() == [
        f"{file}: toy: spec.port: must be >= 1",
        f"{file}: toy: spec.stages[1].name: duplicate value 'a'",
        f"{file}: document 3: (manifest): must be a mapping",
    ]


def test_validate_main_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = str(EXAMPLES / "minilm-reviews.yaml")
    assert cli.main(["validate", str(tmp_path / "absent.yaml"), good]) == 2
    assert capsys.readouterr().out == "ok: reviews\n"  # the other files are still checked
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    assert cli.main(["validate", str(tmp_path / "bad.yaml")]) == 2
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert cli.main(["validate", str(tmp_path / "empty.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err
