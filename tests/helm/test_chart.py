"""The Helm chart (helm/worldmesh) and the images (docker/*.Dockerfile), checked offline.

Behaviours covered:
- `helm lint --strict` passes with the default values and with every optional part on
  (`ci/all-on-values.yaml`); `helm template` renders both, and the PodMonitors (workers,
  operator; the operator's job is what the alert rules match) appear when
  asked for or when the cluster serves monitoring.coreos.com/v1.
- The PrometheusRule (asked for, or auto-detected) is the plain rules file
  rules/worldmesh.rules.yaml with the operator selector of the values, and promtool accepts
  it; the dashboard ConfigMaps carry the sidecar label and exactly dashboards/*.json.
- Bad values (a typo'd key, a wrong enum, a negative replica count, a bad pull policy) make
  both `helm lint` and `helm template` fail, and the error names the value.
- The chart's CRD is byte-equal to the top-level crds/modeldeployment.yaml.
- Every rendered built-in object validates, strictly (unknown fields fail), against the
  Kubernetes API schemas bundled in `kubernetes-validate`, for the oldest and newest
  Kubernetes it knows; kopf peering objects validate against the chart's own CRD schema.
- RBAC grants exactly the verbs and resources the operator uses (the tables below), as one
  ClusterRole for all namespaces, or per-namespace Roles when watchNamespaces is set.
- The operator Deployment runs non-root on a read-only root filesystem, with a liveness probe
  on kopf's /healthz, the worker image in WORLDMESH_WORKER_IMAGE and kopf's namespace flags.
- The NetworkPolicy opens every worker port only to the operator and the workers, and the
  inference port to `networkPolicy.inferenceFrom`.
- values.yaml documents every value with a `# --` comment and names its schema on line 1.
- The Dockerfiles (no Docker engine here, so they are parsed, not built): pinned slim
  Python 3.11 base, a builder stage, no build tools in the final stage, a non-root USER,
  torch==2.13.0 from the wheel index given at build time, and the expected ENTRYPOINTs;
  the worker image trains the built-in models' heads and ramps into its model cache.

helm is expected at tools/helm (`make tools`, part of `make setup`); without it these
tests fail rather than skip.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / "tools" / "helm"
CHART = ROOT / "helm" / "worldmesh"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
RELEASE, NAMESPACE = "wm", "worldmesh-system"
FULLNAME = f"{RELEASE}-worldmesh"
# 1.28: the CRD's CEL rules use x-kubernetes-validations[].fieldPath (the chart's kubeVersion).
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ClusterKopfPeering", "KopfPeering", "PodMonitor", "PrometheusRule"}

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


def _expand(group: str, resources: list[str], verbs: list[str]) -> set[Rule]:
    return {(group, r, v) for r in resources for v in verbs}


# What the operator does in the namespaces it serves.
NAMESPACED_RULES: set[Rule] = (
    _expand(
        "worldmesh.io",
        ["modeldeployments", "modeldeployments/status", "modeldeployments/scale"],
        ["get", "list", "watch", "patch", "update"],
    )
    | _expand(
        "", ["pods", "services", "secrets"], ["get", "list", "watch", "create", "delete", "patch"]
    )
    | _expand("", ["events"], ["create", "patch"])
    | _expand("events.k8s.io", ["events"], ["create", "patch"])
)
CRD_SCAN: set[Rule] = _expand(
    "apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"]
)
CLUSTER_WIDE_RULES: set[Rule] = (
    NAMESPACED_RULES
    | CRD_SCAN
    | _expand("", ["namespaces"], ["list", "watch"])
    | _expand("kopf.dev", ["clusterkopfpeerings"], ["get", "list", "watch", "patch"])
)
PER_NAMESPACE_RULES: set[Rule] = NAMESPACED_RULES | _expand(
    "kopf.dev", ["kopfpeerings"], ["get", "list", "watch", "patch"]
)


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        pytest.fail(f"helm is not installed at {HELM}: run `make tools` (part of `make setup`)")
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=60, check=False
    )


@functools.cache
def render(*args: str) -> tuple[dict[str, Any], ...]:
    """`helm template` of the chart with extra arguments; the documents, in order."""
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rules_of(role: dict[str, Any]) -> set[Rule]:
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


DEFAULT = ()
ALL_ON_ARGS = ("-f", str(ALL_ON))
WITH_MONITORING_API = ("--api-versions", "monitoring.coreos.com/v1/PodMonitor")


# --- lint and template -----------------------------------------------------------------


@pytest.mark.parametrize("args", [DEFAULT, ALL_ON_ARGS], ids=["default", "all-on"])
def test_lint_passes(args: tuple[str, ...]) -> None:
    out = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *args)
    assert out.returncode == 0, out.stdout + out.stderr


def test_default_render_has_the_operator_and_no_optional_monitoring() -> None:
    kinds = sorted(d["kind"] for d in render())
    assert kinds == sorted(
        [
            "ClusterKopfPeering",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "NetworkPolicy",
            "ServiceAccount",
        ]
    )


def test_all_on_render_has_every_optional_part() -> None:
    docs = render(*ALL_ON_ARGS)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Role") == kinds.count("RoleBinding") == 2
    assert kinds.count("KopfPeering") == kinds.count("NetworkPolicy") == 2
    assert "PodMonitor" in kinds and "ClusterKopfPeering" not in kinds
    assert "PrometheusRule" in kinds and kinds.count("ConfigMap") == 2
    assert {d["metadata"]["namespace"] for d in by_kind(docs, "Role")} == {"serving", "staging"}


def test_pod_monitors_are_rendered_when_the_cluster_serves_their_api() -> None:
    docs = render(*WITH_MONITORING_API)
    workers, operator = by_kind(docs, "PodMonitor")
    assert workers["spec"]["namespaceSelector"] == {"any": True}
    assert workers["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    # The operator's: its pods' metrics port, job "worldmesh-operator" from their label,
    # which is what the alert rules' default operatorSelector matches.
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    assert operator["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert operator["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert {"name": "metrics", "containerPort": 8081, "protocol": "TCP"} in pod["spec"][
        "containers"
    ][0]["ports"]
    job = pod["metadata"]["labels"][operator["spec"]["jobLabel"]]
    default = yaml.safe_load((CHART / "values.yaml").read_text())
    assert default["monitoring"]["prometheusRule"]["operatorSelector"] == f'job="{job}"'
    off = render(*WITH_MONITORING_API, "--set", "monitoring.podMonitor.autoDetect=false")
    assert not by_kind(off, "PodMonitor")


BAD_VALUES = [
    (["--set", "operator.replicsa=2"], "replicsa"),
    (["--set", "operator.logFormat=xml"], "/operator/logFormat"),
    (["--set", "operator.replicas=-1"], "/operator/replicas"),
    (["--set", "worker.image.pullPolicy=Sometimes"], "/worker/image/pullPolicy"),
    (["--set", "networkPolicy.enabld=false"], "enabld"),
    (["--set", "monitoring.dashboards.enabeld=true"], "enabeld"),
    (
        ["--set-string", "monitoring.prometheusRule.operatorSelector=operator"],
        "/monitoring/prometheusRule/operatorSelector",
    ),
]


@pytest.mark.parametrize("command", ["lint", "template"])
@pytest.mark.parametrize(("args", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_fail_naming_the_value(command: str, args: list[str], named: str) -> None:
    out = helm(command, *([RELEASE] if command == "template" else []), str(CHART), *args)
    assert out.returncode != 0, f"helm {command} {shlex.join(args)} passed"
    assert named in out.stdout + out.stderr


def test_chart_crd_is_byte_equal_to_the_top_level_crd() -> None:
    top = (ROOT / "crds" / "modeldeployment.yaml").read_bytes()
    assert (CHART / "crds" / "modeldeployment.yaml").read_bytes() == top


# --- dashboards and alert rules ------------------------------------------------------------


def test_prometheus_rule_is_the_rules_file_with_the_operator_selector(tmp_path: Path) -> None:
    (rule,) = by_kind(render(*ALL_ON_ARGS), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    text = (CHART / "rules" / "worldmesh.rules.yaml").read_text()
    assert 'absent(up{job="worldmesh-operator"} == 1)' in text
    expected = yaml.safe_load(text.replace('job="worldmesh-operator"', 'job="wm-operator"'))
    assert rule["spec"]["groups"] == expected["groups"]
    rendered = tmp_path / "rendered.rules.yaml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run(
        ["promtool", "check", "rules", str(rendered)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_rule_is_rendered_when_the_cluster_serves_its_api() -> None:
    assert not by_kind(render(), "PrometheusRule")
    api = ("--api-versions", "monitoring.coreos.com/v1/PrometheusRule")
    assert by_kind(render(*api), "PrometheusRule")
    off = render(*api, "--set", "monitoring.prometheusRule.autoDetect=false")
    assert not by_kind(off, "PrometheusRule")


def test_dashboard_config_maps_carry_the_sidecar_label_and_the_json() -> None:
    assert not by_kind(render(), "ConfigMap")
    maps = by_kind(render(*ALL_ON_ARGS), "ConfigMap")
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files and len(maps) == len(files)
    for config_map in maps:
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "worldmesh"}
    data = {k: v for m in maps for k, v in m["data"].items()}
    assert data == {f.name: f.read_text() for f in files}


# --- every manifest against the Kubernetes API schemas -----------------------------------


def chart_crds() -> list[dict[str, Any]]:
    return [
        d
        for f in sorted((CHART / "crds").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "args", [DEFAULT, ALL_ON_ARGS, WITH_MONITORING_API], ids=["default", "all-on", "monitoring"]
)
def test_every_built_in_manifest_validates(args: tuple[str, ...], version: str) -> None:
    docs = [*render(*args), *chart_crds()]
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {e.message}")
    assert {d["kind"] for d in docs} - CUSTOM_KINDS, "nothing was validated"


@pytest.mark.parametrize("args", [DEFAULT, ALL_ON_ARGS], ids=["default", "all-on"])
def test_kopf_peerings_validate_against_the_chart_crds(args: tuple[str, ...]) -> None:
    crds = {c["spec"]["names"]["kind"]: c for c in chart_crds()}
    peerings = [d for d in render(*args) if d["kind"] in ("KopfPeering", "ClusterKopfPeering")]
    assert peerings
    for doc in peerings:
        crd = crds[doc["kind"]]
        assert doc["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
        assert ("namespace" in doc["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        jsonschema.validate(doc, schema)


# --- RBAC --------------------------------------------------------------------------------


def test_rbac_all_namespaces_is_exactly_what_the_operator_uses() -> None:
    docs = render()
    (role,) = by_kind(docs, "ClusterRole")
    assert rules_of(role) == CLUSTER_WIDE_RULES
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]
    assert not by_kind(docs, "Role")


def test_rbac_watch_namespaces_uses_roles_and_only_the_crd_scan_cluster_wide() -> None:
    docs = render(*ALL_ON_ARGS)
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert rules_of(cluster_role) == CRD_SCAN
    for role in by_kind(docs, "Role"):
        assert rules_of(role) == PER_NAMESPACE_RULES
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "worldmesh-op", "namespace": NAMESPACE}
        ]


def test_rbac_create_false_renders_no_rbac() -> None:
    kinds = {d["kind"] for d in render("--set", "rbac.create=false")}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


# --- the operator Deployment and the NetworkPolicy ---------------------------------------


def operator_container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_operator_runs_non_root_read_only_with_a_liveness_probe() -> None:
    docs = render()
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    c = operator_container(docs)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://$(POD_IP):8080/healthz" in c["args"]
    assert c["args"][:2] == ["run", "--module=worldmesh_operator.handlers"]
    assert "--all-namespaces" in c["args"]
    assert f"--peering={FULLNAME}" in c["args"]
    # The selector carries no version: it must not change on upgrade.
    assert "app.kubernetes.io/version" not in deployment["spec"]["selector"]["matchLabels"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WORLDMESH_WORKER_IMAGE"] == "worldmesh/worldmesh-worker:0.1.0"
    assert env["WORLDMESH_PEERING_PRIORITY"] == "100"


def test_operator_serves_only_the_watched_namespaces_when_set() -> None:
    c = operator_container(render(*ALL_ON_ARGS))
    assert "--all-namespaces" not in c["args"]
    assert {
        "--namespace=serving",
        "--namespace=staging",
        "--priority=$(WORLDMESH_PEERING_PRIORITY)",
    } <= set(c["args"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["WORLDMESH_WORKER_IMAGE"] == "registry.example.com/worldmesh-worker:0.1.0-cuda"


def test_network_policy_isolates_worker_ports() -> None:
    (policy,) = by_kind(render(), "NetworkPolicy")
    workers = {"matchExpressions": [{"key": "worldmesh.io/deployment", "operator": "Exists"}]}
    assert policy["spec"]["podSelector"] == workers
    every_port, inference = policy["spec"]["ingress"]
    assert "ports" not in every_port
    operator_peer, worker_peer = every_port["from"]
    assert operator_peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert operator_peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": NAMESPACE
    }
    assert worker_peer == {"podSelector": workers}
    # the inference ports, REST and gRPC: from anyone by default
    assert inference == {
        "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 8001, "protocol": "TCP"}]
    }
    restricted = by_kind(render(*ALL_ON_ARGS), "NetworkPolicy")[0]["spec"]["ingress"][1]
    assert restricted["ports"] == [
        {"port": "http", "protocol": "TCP"},
        {"port": 8001, "protocol": "TCP"},
    ]
    assert restricted["from"]
    assert not by_kind(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_notes_tell_what_to_do_next() -> None:
    out = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply -f examples/" in notes and "kubectl get md" in notes


# --- values.yaml documentation -----------------------------------------------------------


def test_every_value_is_documented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.-]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m[1]), m[2], m[3].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(documented for _, _, documented in stack):
            continue  # content of a documented value (resources.requests.cpu ...)
        above = []
        for prev in reversed(lines[:i]):
            if not prev.strip().startswith("#"):
                break
            above.append(prev.strip())
        documented = any(c.startswith("# --") for c in above)
        path = ".".join([k for _, k, _ in stack] + [key])
        if not documented and rest not in ("", "|", ">"):
            undocumented.append(path)
        stack.append((indent, key, documented))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_schema_rejects_unknown_keys_everywhere() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)

    def walk(node: dict[str, Any], path: str) -> None:
        assert node.get("description"), f"{path or '/'} has no description"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} allows unknown keys"
            assert set(node.get("required", [])) <= set(node["properties"]), path
            for key, child in node["properties"].items():
                if isinstance(child, dict) and "description" in child:
                    walk(child, f"{path}/{key}")

    walk(schema, "")


# --- Dockerfiles (parsed; there is no Docker engine to build them here) -------------------


def dockerfile_stages(name: str) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and each stage's instructions (FROM first) as (op, args)."""
    text = (ROOT / "docker" / name).read_text()
    joined = re.sub(r"\\\n", " ", text)
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stages.append([])
        if op == "ARG" and not stages and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
        if stages:
            stages[-1].append((op, rest.strip()))
    return args, stages


BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|make|cmake|clang|python3?-dev)\b")


@pytest.mark.parametrize(
    ("name", "entrypoint"),
    [("worker.Dockerfile", ["worldmesh", "worker"]), ("operator.Dockerfile", ["kopf"])],
)
def test_dockerfile_is_pinned_multi_stage_and_non_root(name: str, entrypoint: list[str]) -> None:
    args, stages = dockerfile_stages(name)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", args["PYTHON_IMAGE"]), args
    assert len(stages) >= 2, "no builder stage"
    for stage in stages:
        image = stage[0][1].split()[0]
        assert image == "${PYTHON_IMAGE}", f"FROM {image} is not the pinned base"
    builder, final = stages[0], stages[-1]
    builder_text = "\n".join(rest for _, rest in builder)
    assert BUILD_TOOLS.search(builder_text), "the builder installs no build tools"
    assert "ARG TORCH_VERSION=2.13.0" in {f"{op} {rest}" for op, rest in builder}
    # the wheel index is the builder's choice: an empty default, used only when set
    assert "ARG TORCH_INDEX_URL=" in {f"{op} {rest}" for op, rest in builder}
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"' in (
        builder_text
    )
    for op, rest in final:
        if op == "RUN":
            assert not BUILD_TOOLS.search(rest), f"build tools in the final stage: {rest}"
        if op == "COPY" and "--from=" in rest:
            assert rest.split()[-2:] in (
                ["/opt/venv", "/opt/venv"],
                ["/var/cache/worldmesh", "/var/cache/worldmesh"],  # heads and ramps
            ), rest
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (ep,) = [json.loads(rest) for op, rest in final if op == "ENTRYPOINT"]
    assert ep == entrypoint
    for op, rest in builder:
        if op == "COPY" and "--from=" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context"


def test_the_worker_image_ships_the_trained_heads_and_ramps() -> None:
    # A pod has no data sets and no time to train: the image carries the model cache.
    _, stages = dockerfile_stages("worker.Dockerfile")
    builder, final = stages[0], stages[-1]
    builder_text = "\n".join(rest for _, rest in builder)
    for model in ("efficientnet-lite0", "minilm-l6"):
        assert f"worldmesh ramps train {model}" in builder_text
        assert re.search(rf"models prepare [a-z0-9 -]*\b{model}\b", builder_text)
    assert ("ENV", "WORLDMESH_CACHE=/var/cache/worldmesh") in builder
    copies = [rest.split() for op, rest in final if op == "COPY" and "--from=builder" in rest]
    assert ["/var/cache/worldmesh", "/var/cache/worldmesh"] in [c[-2:] for c in copies]
    assert any("WORLDMESH_CACHE=/var/cache/worldmesh" in rest for op, rest in final if op == "ENV")
