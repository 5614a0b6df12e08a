"""A worker's configuration (``config.py``): parsed once at the edge, errors name the field.

Covers:
- a minimal configuration (deployment, worker, stage, model) parses, and every field
  not given takes its documented default (ports, batching, limits, worlds, token);
- the model given as a section (``model.name``, ``model.splitPoints``) as in the CRD;
- every field given is read, with unit conversions (ms -> s);
- ``stages``, ``is_front``, ``is_last``;
- each bad field raises ``ConfigError`` whose message starts with the field path:
  required fields, wrong types (bools are not numbers), ranges (``batching.maxBatchSize``,
  ``ports.http``, limits, worlds), ``worlds.backend`` not a backend, ``stage`` beyond the
  stages that ``splitPoints`` make, a worker id that is not a DNS label, a heartbeat
  timeout not above twice the interval, sections and the top level not mappings;
- non-finite numbers (NaN) are refused;
- the token: ``token`` beats ``tokenFile`` beats ``WORLDMESH_TOKEN``; an unreadable
  ``tokenFile`` names the field;
- ``load_config`` reads YAML and JSON files; an unreadable or invalid file is a
  ``ConfigError`` naming the path.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from worldmesh_worker.config import (
    Batching,
    ConfigError,
    Limits,
    WorkerConfig,
    load_config,
    parse_config,
)
from worldmesh_worker.settings import WorkerSettings
from worldmesh_worker.worlds import WorldOptions

MINIMAL: dict[str, Any] = {
    "deployment": "demo",
    "worker": "demo-s0-w1",
    "stage": 0,
    "model": "toy",
}


def config(env: dict[str, str] | None = None, **fields: Any) -> WorkerConfig:
    return parse_config({**MINIMAL, **fields}, WorkerSettings.from_env(env or {}))


def nested(path: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for ``"a.b"``, merged over MINIMAL."""
    keys = path.split(".")
    raw: dict[str, Any] = {**MINIMAL}
    cursor = raw
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = value
    return raw


def test_minimal_config_and_defaults() -> None:
    c = config()
    assert c.deployment == "demo"
    assert c.worker == "demo-s0-w1"
    assert c.stage == 0
    assert c.model == "toy"
    assert c.split_points == ()
    assert c.host == "127.0.0.1"
    assert (c.http_port, c.control_port) == (8080, 8081)
    assert c.device == "cpu" and c.threads == 1 and c.backend == "auto"
    assert c.batching == Batching(max_batch_size=8, max_queue_delay_s=0.002)
    assert c.limits == Limits(
        max_request_bytes=16 * 1024 * 1024,
        max_queue_rows=512,
        request_timeout_s=30.0,
        max_retries=3,
    )
    assert c.worlds == WorldOptions(
        open_timeout_s=10.0,
        op_timeout_s=30.0,
        heartbeat_interval_s=0.1,
        heartbeat_timeout_s=0.8,
        max_message_bytes=256 * 1024 * 1024,
    )
    assert c.token == ""
    assert (c.stages, c.is_front, c.is_last) == (1, True, True)


def test_null_values_take_the_default() -> None:
    c = config(batching=None, ports={"http": None}, host=None)
    assert c.batching == Batching()
    assert c.http_port == 8080
    assert c.host == "127.0.0.1"


def test_every_field_is_read() -> None:
    c = config(
        {"WORLDMESH_TOKEN": "from-env"},
        stage=1,
        splitPoints=[1, 3],
        host="10.0.0.7",
        ports={"http": 0, "control": 9001},
        device="cuda:1",
        threads=4,
        batching={"maxBatchSize": 32, "maxQueueDelayMs": 5},
        limits={
            "maxRequestBytes": 2048,
            "maxQueueRows": 7,
            "requestTimeoutSeconds": 1.5,
            "maxRetries": 0,
        },
        worlds={
            "backend": "gloo",
            "openTimeoutSeconds": 2,
            "opTimeoutSeconds": 3.5,
            "heartbeatIntervalMs": 50,
            "heartbeatTimeoutMs": 250,
            "maxMessageBytes": 4096,
        },
        token="explicit",
    )
    assert c.split_points == (1, 3)
    assert (c.stages, c.is_front, c.is_last) == (3, False, False)
    assert c.host == "10.0.0.7"
    assert (c.http_port, c.control_port) == (0, 9001)
    assert (c.device, c.threads, c.backend) == ("cuda:1", 4, "gloo")
    assert c.batching == Batching(32, 0.005)
    assert c.limits == Limits(2048, 7, 1.5, 0)
    assert c.worlds == WorldOptions(2.0, 3.5, 0.05, 0.25, 4096)
    assert c.token == "explicit"


def test_model_section_as_in_the_crd() -> None:
    c = config(model={"name": "toy-slow", "splitPoints": [2]}, stage=1)
    assert c.model == "toy-slow"
    assert c.split_points == (2,)
    assert (c.stages, c.is_front, c.is_last) == (2, False, True)


# -- errors naming the field --------------------------------------------------------------


BAD: list[tuple[dict[str, Any], str]] = [
    # required
    ({k: v for k, v in MINIMAL.items() if k != "deployment"}, "deployment: required"),
    ({k: v for k, v in MINIMAL.items() if k != "worker"}, "worker: required"),
    ({k: v for k, v in MINIMAL.items() if k != "stage"}, "stage: required"),
    ({k: v for k, v in MINIMAL.items() if k != "model"}, "model: required"),
    ({**MINIMAL, "model": {"splitPoints": [1]}}, "model.name: required"),
    # types
    ({**MINIMAL, "deployment": 7}, "deployment: must be a string"),
    ({**MINIMAL, "stage": "0"}, "stage: must be an integer"),
    ({**MINIMAL, "stage": True}, "stage: must be an integer"),
    ({**MINIMAL, "stage": 1.0}, "stage: must be an integer"),
    ({**MINIMAL, "splitPoints": 2}, "splitPoints: must be a list of integers"),
    ({**MINIMAL, "splitPoints": [1, "2"]}, "splitPoints: must be a list of integers"),
    ({**MINIMAL, "splitPoints": [True]}, "splitPoints: must be a list of integers"),
    (
        {**MINIMAL, "model": {"name": "toy", "splitPoints": "1"}},
        "model.splitPoints: must be a list",
    ),
    (nested("batching.maxBatchSize", "8"), "batching.maxBatchSize: must be an integer"),
    (nested("batching.maxBatchSize", False), "batching.maxBatchSize: must be an integer"),
    (nested("batching.maxQueueDelayMs", "2"), "batching.maxQueueDelayMs: must be a number"),
    (nested("batching.maxQueueDelayMs", True), "batching.maxQueueDelayMs: must be a number"),
    (nested("limits.requestTimeoutSeconds", [1]), "limits.requestTimeoutSeconds: must be a"),
    (nested("worlds.backend", 1), "worlds.backend: must be a string"),
    ({**MINIMAL, "tokenFile": 3}, "tokenFile: must be a string"),
    # ranges
    (nested("batching.maxBatchSize", 0), "batching.maxBatchSize: must be >= 1, got 0"),
    (nested("batching.maxBatchSize", 4097), "batching.maxBatchSize: must be <= 4096"),
    (nested("batching.maxQueueDelayMs", -1), "batching.maxQueueDelayMs: must be >= 0"),
    (nested("ports.http", 65536), "ports.http: must be <= 65535, got 65536"),
    (nested("ports.http", -1), "ports.http: must be >= 0"),
    (nested("ports.control", 70000), "ports.control: must be <= 65535"),
    (nested("limits.maxRequestBytes", 1023), "limits.maxRequestBytes: must be >= 1024"),
    (nested("limits.maxQueueRows", 0), "limits.maxQueueRows: must be >= 1"),
    (nested("limits.requestTimeoutSeconds", 0), "limits.requestTimeoutSeconds: must be >= 0.1"),
    (nested("limits.maxRetries", -1), "limits.maxRetries: must be >= 0"),
    (nested("worlds.openTimeoutSeconds", 0), "worlds.openTimeoutSeconds: must be >= 0.1"),
    (nested("worlds.opTimeoutSeconds", 0.01), "worlds.opTimeoutSeconds: must be >= 0.1"),
    (nested("worlds.heartbeatIntervalMs", 0.5), "worlds.heartbeatIntervalMs: must be >= 1"),
    (nested("worlds.heartbeatTimeoutMs", 5), "worlds.heartbeatTimeoutMs: must be >= 10"),
    (nested("worlds.maxMessageBytes", 100), "worlds.maxMessageBytes: must be >= 1024"),
    ({**MINIMAL, "threads": 0}, "threads: must be >= 1"),
    ({**MINIMAL, "stage": -1}, "stage: must be >= 0"),
    # meaning
    (nested("worlds.backend", "mpi"), "worlds.backend: 'mpi' is not one of auto, gloo, nccl"),
    ({**MINIMAL, "stage": 1}, "stage: 1 but splitPoints make only 1 stages"),
    ({**MINIMAL, "stage": 3, "splitPoints": [1, 2]}, "stage: 3 but splitPoints make only 3"),
    (
        {**MINIMAL, "stage": 2, "model": {"name": "toy", "splitPoints": [2]}},
        "stage: 2 but splitPoints make only 2 stages",
    ),
    ({**MINIMAL, "worker": "Demo-W1"}, "worker: worker id 'Demo-W1' must be a DNS label"),
    ({**MINIMAL, "worker": "demo_w1"}, "worker: worker id 'demo_w1' must be a DNS label"),
    ({**MINIMAL, "worker": "-demo"}, "worker: .* must be a DNS label"),
    ({**MINIMAL, "worker": "demo-"}, "worker: .* must be a DNS label"),
    ({**MINIMAL, "worker": ""}, "worker: .* must be a DNS label"),
    ({**MINIMAL, "worker": "a" * 64}, "worker: .* must be a DNS label"),
    ({**MINIMAL, "worker": "demo~w1"}, "worker: .* must be a DNS label"),
    (
        {**MINIMAL, "worlds": {"heartbeatIntervalMs": 100, "heartbeatTimeoutMs": 200}},
        "worlds.heartbeatTimeoutMs: must exceed twice heartbeatIntervalMs",
    ),
    (
        {**MINIMAL, "worlds": {"heartbeatIntervalMs": 400}},  # default timeout 800 is not > 2 x 400
        "worlds.heartbeatTimeoutMs: must exceed twice heartbeatIntervalMs",
    ),
    # shapes
    ({**MINIMAL, "batching": 3}, "batching: must be a mapping"),
    ({**MINIMAL, "ports": [8080]}, "ports: must be a mapping"),
    ({**MINIMAL, "worlds": "gloo"}, "worlds: must be a mapping"),
    ({**MINIMAL, "limits": "big"}, "limits: must be a mapping"),
]


@pytest.mark.parametrize(("raw", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_field_raises_config_error_naming_it(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message):
        parse_config(raw, WorkerSettings())


@pytest.mark.parametrize("raw", [["deployment", "demo"], "demo", 3])
def test_top_level_must_be_a_mapping(raw: Any) -> None:
    with pytest.raises(ConfigError, match=r"^\(top level\): must be a mapping"):
        parse_config(raw, WorkerSettings())


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_accepted_edges() -> None:
    assert config(batching={"maxBatchSize": 4096}).batching.max_batch_size == 4096
    assert config(batching={"maxQueueDelayMs": 0}).batching.max_queue_delay_s == 0.0
    assert config(ports={"http": 65535}).http_port == 65535
    assert config(limits={"maxRetries": 0}).limits.max_retries == 0
    assert config(worker="a" * 63).worker == "a" * 63
    assert config(worker="w.1-x").worker == "w.1-x"
    ok = config(worlds={"heartbeatIntervalMs": 100, "heartbeatTimeoutMs": 201}).worlds
    assert ok.heartbeat_timeout_s == pytest.approx(0.201)
    assert config(stage=2, splitPoints=[1, 2]).is_last


@pytest.mark.parametrize(
    "path",
    [
        "batching.maxQueueDelayMs",
        "limits.requestTimeoutSeconds",
        "worlds.heartbeatTimeoutMs",
        "worlds.opTimeoutSeconds",
    ],
)
def test_nan_is_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="^" + path.replace(".", r"\.")):
        parse_config(nested(path, math.nan), WorkerSettings())


# -- token -------------------------------------------------------------------------------


def test_token_from_env() -> None:
    assert config({"WORLDMESH_TOKEN": "s3cret"}).token == "s3cret"
    assert config({}).token == ""


def test_token_file_beats_env_and_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  from-file\n")
    c = config({"WORLDMESH_TOKEN": "from-env"}, tokenFile=str(path))
    assert c.token == "from-file"


def test_explicit_token_beats_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file")
    c = config({"WORLDMESH_TOKEN": "from-env"}, tokenFile=str(path), token="inline")
    assert c.token == "inline"


def test_unreadable_token_file_names_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"^tokenFile: cannot read {re.escape(str(missing))}"):
        config({"WORLDMESH_TOKEN": "from-env"}, tokenFile=str(missing))


# -- files -------------------------------------------------------------------------------


def test_load_config_reads_yaml_and_json(tmp_path: Path) -> None:
    yaml_path = tmp_path / "worker.yaml"
    yaml_path.write_text(
        "deployment: demo\nworker: demo-s1-w2\nstage: 1\n"
        "model: {name: toy, splitPoints: [2]}\nbatching: {maxBatchSize: 4}\n"
    )
    c = load_config(yaml_path, WorkerSettings(token="t"))
    assert (c.worker, c.stage, c.split_points, c.batching.max_batch_size, c.token) == (
        "demo-s1-w2",
        1,
        (2,),
        4,
        "t",
    )
    json_path = tmp_path / "worker.json"
    json_path.write_text(json.dumps({**MINIMAL, "ports": {"http": 1234}}))
    assert load_config(json_path, WorkerSettings()).http_port == 1234


def test_load_config_reads_the_token_from_the_process_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(MINIMAL))
    monkeypatch.setenv("WORLDMESH_TOKEN", "proc-env")
    assert load_config(path).token == "proc-env"


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(missing))}: cannot read the configuration"
    ):
        load_config(missing, WorkerSettings())
    broken = tmp_path / "broken.yaml"
    broken.write_text("deployment: [unclosed\n")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(str(broken))}: cannot read the configuration"
    ):
        load_config(broken, WorkerSettings())
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"^\w+: required"):  # an empty file is an empty mapping
        load_config(empty, WorkerSettings())
