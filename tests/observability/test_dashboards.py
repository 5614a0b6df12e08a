"""The Grafana dashboards (dashboards/ -> helm/worldmesh/dashboards/*.json).

Covers:
- the committed JSON is exactly what the builders make (``python -m dashboards --check``
  agrees), so an edit of one without the other fails;
- every dashboard type-checks against @grafana/schema (tests/observability/schema/check.mjs:
  the document, each panel, and each panel's options and custom field config against its
  plugin's types), and the checker rejects a misspelled key, a wrong type and an unknown
  panel type, each named;
- the panels a user looks for exist (requests and errors by stage and code, latency
  quantiles, queue depth, batch size, workers desired vs ready, worlds by state, world
  failures and retries, autoscaler decisions, early exits and thresholds per ramp), every
  panel has a description, and the deployment and stage variables filter every query;
- on the live Prometheus of ``conftest.live``: every panel query and variable query runs
  without error, and every metric it names is declared on a live ``/metrics`` endpoint or
  recorded by the chart's rules (whose own expressions use only declared names); the core
  panels return series for the running deployment.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import OUT, render

from .conftest import DEPLOYMENT, RULES, Live
from .promql import grafana_to_promql, metric_names

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).resolve().parent / "schema"
FILES = sorted(OUT.glob("*.json"))
# Values for Grafana's variables when a query is sent to Prometheus directly.
VARIABLES = {
    "deployment": DEPLOYMENT,
    "stage": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "10m",
}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and variable, Grafana variables substituted."""
    out = [
        (f"{board['uid']} / {p['title']} / {t['refId']}", grafana_to_promql(t["expr"], VARIABLES))
        for p in panels(board)
        for t in p["targets"]
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # Grafana's label_values(SELECTOR, LABEL) is not PromQL; its PromQL equivalent:
        m = re.fullmatch(r"label_values\((.*), *(\w+)\)", variable["query"])
        assert m, f"{board['uid']} ${variable['name']}: not label_values(...)"
        promql = f"count by ({m[2]}) ({grafana_to_promql(m[1], VARIABLES)})"
        out.append((f"{board['uid']} / ${variable['name']}", promql))
    return out


def recorded() -> dict[str, list[str]]:
    """Recorded series name -> the expressions recording it."""
    out: dict[str, list[str]] = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                out.setdefault(rule["record"], []).append(rule["expr"])
    return out


def schema_check(*paths: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, "node is missing (Node 20 is expected on the machine)"
    if not (SCHEMA / "node_modules" / "@grafana" / "schema").is_dir():
        pytest.fail(f"@grafana/schema is not installed in {SCHEMA}: run `make setup` (npm ci)")
    return subprocess.run(
        [node, str(SCHEMA / "check.mjs"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- built from code ----------------------------------------------------------------------


def test_committed_json_is_what_the_code_builds() -> None:
    built = render()
    assert sorted(built) == [p.name for p in FILES]
    for path in FILES:
        assert path.read_text() == built[path.name], (
            f"{path} is stale: run `make dashboards` (python -m dashboards)"
        )
    out = subprocess.run(
        [sys.executable, "-m", "dashboards", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr


# --- @grafana/schema --------------------------------------------------------------------


def test_dashboards_validate_against_the_grafana_schema() -> None:
    out = schema_check(*FILES)
    assert out.returncode == 0, out.stdout + out.stderr


def test_schema_check_rejects_bad_dashboards_naming_the_fault(tmp_path: Path) -> None:
    board = load(OUT / "worldmesh-overview.json")
    graph = next(p for p in board["panels"] if p["type"] == "timeseries")
    stat = next(p for p in board["panels"] if p["type"] == "stat")
    cases = {
        "misspelled-custom": (
            "fillOpacty",
            lambda b, g, s: g["fieldConfig"]["defaults"]["custom"].update(fillOpacty=10),
        ),
        "wrong-type": ("schemaVersion", lambda b, g, s: b.update(schemaVersion="41")),
        "unknown-top-level": ("panelz", lambda b, g, s: b.update(panelz=[])),
        "bad-enum": ('"sideways"', lambda b, g, s: s["options"].update(graphMode="sideways")),
        "unknown-panel": (
            "no schema for type piechartz",
            lambda b, g, s: g.update(type="piechartz"),
        ),
    }
    paths = []
    for name, (_, mutate) in cases.items():
        bad = copy.deepcopy(board)
        i, j = board["panels"].index(graph), board["panels"].index(stat)
        mutate(bad, bad["panels"][i], bad["panels"][j])
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(bad))
    out = schema_check(*paths)
    assert out.returncode == 1, out.stdout + out.stderr
    for path, (named, _) in zip(paths, cases.values(), strict=True):
        lines = [line for line in out.stdout.splitlines() if line.startswith(f"{path}:")]
        assert any(named in line for line in lines), f"{path.name}: {named} not named in {lines}"


# --- content -----------------------------------------------------------------------------

REQUIRED_PANELS = {
    "worldmesh-overview": [
        "Requests/s by stage and code",
        "Errors/s by stage and code",
        "Request latency quantiles",
        "Stage compute time quantiles by stage",
        "Queue depth by stage",
        "Batch size by stage",
        "Workers desired vs ready by stage",
        "Autoscaler decisions",
    ],
    "worldmesh-worlds": [
        "Worlds by state",
        "World failures and retries",
        "Early exits/s by ramp",
        "Threshold per ramp",
    ],
}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_dashboard_has_the_panels_users_look_for(path: Path) -> None:
    board = load(path)
    titles = [p["title"] for p in panels(board)]
    assert set(REQUIRED_PANELS[board["uid"]]) <= set(titles)
    assert len(titles) == len(set(titles)), "duplicate panel titles"
    assert all(p["description"] for p in panels(board))
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "deployment", "stage"]
    for p in panels(board):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for t in p["targets"]:
            assert 'deployment=~"$deployment"' in t["expr"], (p["title"], t["expr"])


# --- on a live Prometheus ------------------------------------------------------------------


def test_recording_rules_read_only_exported_metrics(live: Live) -> None:
    for name, exprs in recorded().items():
        for expr in exprs:
            unknown = metric_names(expr) - live.exported
            assert not unknown, f"rule {name} reads {unknown}, not on any live /metrics"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_query_runs_and_names_only_exported_metrics(live: Live, path: Path) -> None:
    known = live.exported | set(recorded())
    for where, expr in queries(load(path)):
        unknown = metric_names(expr) - known
        assert not unknown, f"{where}: {unknown} neither exported nor recorded: {expr}"
        answer = live.query(expr)
        assert answer["status"] == "success", f"{where}: {answer.get('error')}: {expr}"
        assert not answer.get("warnings"), f"{where}: {answer['warnings']}"


# Panels that must show the running deployment: (dashboard, title).
SHOWING_DATA = [
    ("worldmesh-overview", "Requests/s by stage and code"),
    ("worldmesh-overview", "Errors/s by stage and code"),
    ("worldmesh-overview", "Request latency quantiles"),
    ("worldmesh-overview", "Stage compute time quantiles by stage"),
    ("worldmesh-overview", "Queue depth by stage"),
    ("worldmesh-overview", "Batch size by stage"),
    ("worldmesh-overview", "Workers desired vs ready by stage"),
    ("worldmesh-overview", "Autoscaler decisions"),
    ("worldmesh-worlds", "Worlds by state"),
    ("worldmesh-worlds", "World failures and retries"),
]


def test_core_panels_show_the_running_deployment(live: Live) -> None:
    empty = []
    for uid, title in SHOWING_DATA:
        (panel,) = [p for p in panels(load(OUT / f"{uid}.json")) if p["title"] == title]
        for target in panel["targets"]:
            answer = live.query(grafana_to_promql(target["expr"], VARIABLES))
            series = answer["data"]["result"]
            if not series or any(s["metric"].get("deployment") != DEPLOYMENT for s in series):
                empty.append(f"{title} / {target['refId']}")
    assert not empty, f"no series of {DEPLOYMENT} in: {empty}"
