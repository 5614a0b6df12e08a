"""The alerting and recording rules (helm/worldmesh/rules/worldmesh.rules.yaml).

Covers:
- ``promtool check rules`` accepts the file, and ``promtool test rules`` passes
  rules_test.yaml; that file has, for every alert of the rules file, a case where it fires
  and one where it does not, and an alert it does not know fails the check here;
- every alert carries a severity (critical or warning) and a summary, description and
  runbook annotation; the alerts the issue asks for all exist;
- on the live Prometheus of ``conftest.live`` the file loads, every rule evaluates with
  health "ok" and no error, and every metric an expression names is declared on a live
  ``/metrics`` endpoint (or recorded by the file); the operator-down expression matches
  the live operator target and is quiet while it is up.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import RULES, Live
from .promql import metric_names

UNIT_TESTS = Path(__file__).resolve().parent / "rules_test.yaml"
REQUIRED_ALERTS = {
    "WorldmeshStageNoReadyWorker",
    "WorldmeshErrorRatioHigh",
    "WorldmeshLatencyBudgetBurnFast",
    "WorldmeshLatencyBudgetBurnSlow",
    "WorldmeshWorldFailuresSpiking",
    "WorldmeshAutoscalerPinnedAtMax",
    "WorldmeshOperatorDown",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: run `make setup` (Debian package prometheus)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def test_promtool_check_rules_accepts_the_file() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = promtool("test", "rules", str(UNIT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) == fires | quiet, "unit tests name an alert the rules lack, or miss one"
    assert not set(alerts()) - fires, f"never seen firing: {set(alerts()) - fires}"
    assert not set(alerts()) - quiet, f"never seen quiet: {set(alerts()) - quiet}"


def test_alerts_have_severity_and_runbook_text() -> None:
    assert set(alerts()) >= REQUIRED_ALERTS
    for name, alert in alerts().items():
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description", "runbook"} <= set(alert["annotations"]), name
        assert alert.get("for"), f"{name} fires on a single evaluation"


def test_rules_load_and_evaluate_on_a_live_prometheus(live: Live) -> None:
    groups = live.api("/api/v1/rules")["groups"]
    loaded = [r for g in groups for r in g["rules"]]
    assert len(loaded) == len(rules())
    for rule in loaded:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        # `up` is not on any /metrics: Prometheus writes it for every scrape target.
        unknown = metric_names(rule["expr"]) - live.exported - recorded - {"up"}
        assert not unknown, f"{rule.get('alert') or rule['record']} reads {unknown}"


def test_operator_down_watches_a_live_operator_target(live: Live) -> None:
    up = live.query('up{job="worldmesh-operator"}')["data"]["result"]
    assert [s["value"][1] for s in up] == ["1"]
    assert not live.query(alerts()["WorldmeshOperatorDown"]["expr"])["data"]["result"]


@pytest.mark.parametrize("name", sorted(alerts()))
def test_alert_expression_runs_on_a_live_prometheus(live: Live, name: str) -> None:
    answer = live.query(alerts()[name]["expr"])
    assert answer["status"] == "success", answer.get("error")
