"""The settings of the operator and of the worker (each ``settings.py``): read once from
the environment (the chart's, the pod's).

Behaviours: every variable has a default; a bad value is an error naming the variable;
the worker image and its pull policy reach the worker pods; a worker's token and address
come from its settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worldmesh_operator import builders
from worldmesh_operator.settings import DEFAULT_IMAGE, Settings, SettingsError
from worldmesh_operator.spec import parse_spec
from worldmesh_worker.config import parse_config
from worldmesh_worker.settings import WorkerSettings


def test_defaults_without_any_variable() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.worker_image == DEFAULT_IMAGE and settings.metrics_port is None
    assert settings.prometheus_url is None and settings.scrape_interval_s == 15.0


def test_the_charts_variables_are_read() -> None:
    settings = Settings.from_env(
        {
            "WORLDMESH_WORKER_IMAGE": "reg/worker:2",
            "WORLDMESH_WORKER_IMAGE_PULL_POLICY": "Always",
            "WORLDMESH_PROMETHEUS_URL": "http://prometheus:9090",
            "WORLDMESH_PROMETHEUS_SCRAPE_INTERVAL_S": "5",
            "WORLDMESH_METRICS_PORT": "9100",
            "POD_IP": "10.0.0.7",
            "WORLDMESH_OPERATOR_POD": "worldmesh-operator-abc",
        }
    )
    assert settings == Settings(
        "reg/worker:2", "Always", "http://prometheus:9090", 5.0, 9100, "10.0.0.7",
        "worldmesh-operator-abc",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WORLDMESH_WORKER_IMAGE_PULL_POLICY", "Sometimes"),
        ("WORLDMESH_PROMETHEUS_URL", "prometheus:9090"),
        ("WORLDMESH_PROMETHEUS_SCRAPE_INTERVAL_S", "15s"),
        ("WORLDMESH_PROMETHEUS_SCRAPE_INTERVAL_S", "0"),
        ("WORLDMESH_METRICS_PORT", "metrics"),
        ("WORLDMESH_METRICS_PORT", "70000"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_the_worker_pull_policy_reaches_the_pod() -> None:
    spec = parse_spec(
        {
            "apiVersion": "worldmesh.io/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "toy"},
            "spec": {"model": {"name": "toy", "splitPoints": []}, "stages": [{"name": "a"}]},
        }
    )
    settings = Settings.from_env({"WORLDMESH_WORKER_IMAGE_PULL_POLICY": "Never"})
    pod = builders.build_worker_pod(
        spec, 0, "w0", settings.worker_image, "s", pull_policy=settings.worker_image_pull_policy
    )
    (container,) = pod["spec"]["containers"]
    assert container["image"] == DEFAULT_IMAGE and container["imagePullPolicy"] == "Never"


# -- the worker's ----------------------------------------------------------------------


def test_worker_settings_from_the_environment(tmp_path: Path) -> None:
    assert WorkerSettings.from_env({}) == WorkerSettings()
    settings = WorkerSettings.from_env(
        {
            "WORLDMESH_TOKEN": "secret",
            "POD_IP": "10.1.2.3",
            "WORLDMESH_CACHE": str(tmp_path),
            "WORLDMESH_TOY_BLOCK_DELAY_S": "0.5",
        }
    )
    assert (settings.token, settings.pod_ip, settings.cache) == ("secret", "10.1.2.3", tmp_path)
    assert settings.toy_block_delay_s == 0.5
    with pytest.raises(ValueError, match="WORLDMESH_TOY_BLOCK_DELAY_S"):
        WorkerSettings.from_env({"WORLDMESH_TOY_BLOCK_DELAY_S": "soon"})


def test_the_worker_config_takes_its_token_and_address_from_the_settings() -> None:
    raw = {"deployment": "d", "worker": "w0", "stage": 0, "model": "toy"}
    config = parse_config(raw, WorkerSettings(token="t", pod_ip="10.1.2.3"))
    assert (config.token, config.host) == ("t", "10.1.2.3")
    assert parse_config(raw, WorkerSettings()).host == "127.0.0.1"
