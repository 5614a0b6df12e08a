"""The worker's HTTP surfaces through real sockets: one real two-stage ``toy`` pipeline.

One module-scoped ``LocalPipeline("toy", [2], [1, 1])`` (two worker processes wired by a
Gloo world, ``limits.maxRequestBytes`` = 64 KiB) serves every test, all on 127.0.0.1.

Covers:
- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; model metadata and readiness, also
  under ``/versions/1``; an unknown version or model is 404 naming it;
- ``POST .../infer`` with JSON returns exactly ``toy.reference`` (``y``) and its argmax
  (``label``) for several batch sizes, echoes the request id, honours the requested outputs
  and their order, and answers binary outputs when asked;
- the sync ``tritonclient.http.InferenceServerClient`` (no Content-Type) works with
  ``binary_data`` True and False, and reads health and metadata;
- bad requests are 400 with ``error`` naming the field: malformed JSON, wrong shape, wrong
  datatype, a string in a numeric tensor, a negative dimension, data nested deeper than the
  shape, a body nested too deeply for the JSON parser, a missing input; an unknown model is
  404; a body over ``limits.maxRequestBytes`` is 413; infer sent to the stage-1 worker is
  404 saying to use stage 0;
- ``/metrics`` exposes every ``worldmesh_`` series named below, each labelled deployment,
  stage and worker, and counts requests by code (200, 400, 404, 413);
- the control API: no token or a wrong one is 401; a body that is not JSON or not an
  object, a missing ``peer``, a ``peerStage`` that is not a neighbour, an unknown field
  are 400 naming the field; deleting an unknown world is 404; ``GET /v1/status`` and
  ``/v1/worlds`` report the worker and its ready world; a non-numeric drain ``wait`` is
  400 and drains nothing;
- after all of this both worker processes are alive, their world is still ready, nothing
  was logged as an unexpected error, and requests still get exact answers;
- on a single-worker pipeline of its own: an unknown route is a JSON 404 and a wrong
  method a JSON 405 (both ports); the front refuses ``peerStage`` -1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from worldmesh_worker.control import wait_until
from worldmesh_worker.local import LocalPipeline, WorkerProcess
from worldmesh_worker.models.toy import reference

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "demo"  # the deployment's name is the model's name on the protocol
MAX_REQUEST_BYTES = 64 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipeline() -> AsyncIterator[LocalPipeline]:
    async with LocalPipeline(
        "toy", [2], [1, 1], deployment=MODEL, limits={"maxRequestBytes": MAX_REQUEST_BYTES}
    ) as running:
        # The world is open; the front is ready once stage 1 has said it accepts.
        await wait_until(lambda: _ready(running), 30, "the front stage ready")
        yield running


async def _ready(pipeline: LocalPipeline) -> bool:
    async with pipeline.session.get(pipeline.front.http_url + "/v2/health/ready") as response:
        return response.status == 200


@pytest.fixture
def front(pipeline: LocalPipeline) -> WorkerProcess:
    return pipeline.front


@pytest.fixture
def last(pipeline: LocalPipeline) -> WorkerProcess:
    (worker,) = pipeline.stage(1)
    return worker


async def get(pipeline: LocalPipeline, url: str, **kw: Any) -> tuple[int, Any]:
    async with pipeline.session.get(url, **kw) as response:
        return response.status, await response.json(content_type=None)


async def post(pipeline: LocalPipeline, url: str, **kw: Any) -> tuple[int, Any]:
    async with pipeline.session.post(url, **kw) as response:
        return response.status, await response.json(content_type=None)


def infer_url(worker: WorkerProcess, model: str = MODEL) -> str:
    return f"{worker.http_url}/v2/models/{model}/infer"


def inputs(rows: int, seed: int = 0) -> np.ndarray:
    """Small integers, so every answer of ``toy`` is exact in float32."""
    rng = np.random.default_rng(seed)
    return rng.integers(-10, 11, size=(rows, 16)).astype(np.float32)


def request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ],
        **extra,
    }


def outputs_of(body: dict[str, Any]) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}


def assert_exact(x: np.ndarray, got: dict[str, np.ndarray]) -> None:
    want = reference(x)
    np.testing.assert_array_equal(got["y"], want)
    np.testing.assert_array_equal(got["label"], want.argmax(axis=1))


# -- server and model metadata ----------------------------------------------------------------


async def test_server_metadata_and_health(pipeline: LocalPipeline, front: WorkerProcess) -> None:
    status, body = await get(pipeline, front.http_url + "/v2")
    assert status == 200
    assert await get(pipeline, front.http_url + "/v2/") == (200, body)  # a trailing slash
    assert body["name"] == "worldmesh"
    assert isinstance(body["version"], str) and body["version"]
    assert "binary_tensor_data" in body["extensions"]
    assert await get(pipeline, front.http_url + "/v2/health/live") == (200, {"live": True})
    assert await get(pipeline, front.http_url + "/v2/health/ready") == (200, {"ready": True})


@pytest.mark.parametrize("prefix", [f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"])
async def test_model_metadata_and_ready(
    pipeline: LocalPipeline, front: WorkerProcess, prefix: str
) -> None:
    status, body = await get(pipeline, front.http_url + prefix)
    assert status == 200
    assert body == {
        "name": MODEL,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }
    assert await get(pipeline, front.http_url + prefix + "/ready") == (200, {"ready": True})


@pytest.mark.parametrize(("suffix", "status"), [("", 404), ("/ready", 400)])
async def test_unknown_version_and_model_are_named(
    pipeline: LocalPipeline, front: WorkerProcess, suffix: str, status: int
) -> None:
    """Metadata of a model not served here is 404; its readiness is "not ready", which
    the protocol answers with 400 (it lists 200 and 400 only); both name it."""
    got, body = await get(pipeline, f"{front.http_url}/v2/models/{MODEL}/versions/2{suffix}")
    assert got == status
    assert "version '2'" in body["error"]
    got, body = await get(pipeline, f"{front.http_url}/v2/models/nope{suffix}")
    assert got == status
    assert "'nope'" in body["error"]


async def test_stage_one_serves_health_and_metadata(
    pipeline: LocalPipeline, last: WorkerProcess
) -> None:
    assert (await get(pipeline, last.http_url + "/v2/health/live"))[0] == 200
    assert (await get(pipeline, last.http_url + "/v2/health/ready"))[0] == 200
    status, body = await get(pipeline, f"{last.http_url}/v2/models/{MODEL}")
    assert status == 200 and body["name"] == MODEL


# -- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 17])
async def test_infer_json_gives_exact_answers(
    pipeline: LocalPipeline, front: WorkerProcess, rows: int
) -> None:
    x = inputs(rows, seed=rows)
    status, body = await post(pipeline, infer_url(front), json=request(x, id=f"req-{rows}"))
    assert status == 200, body
    assert body["id"] == f"req-{rows}"
    assert body["model_name"] == MODEL
    assert body["model_version"] == "1"
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("y", "FP32", [rows, 4]),
        ("label", "INT64", [rows]),
    ]
    assert_exact(x, outputs_of(body))


async def test_infer_without_id_answers_without_id(
    pipeline: LocalPipeline, front: WorkerProcess
) -> None:
    x = inputs(2, seed=5)
    status, body = await post(pipeline, infer_url(front), json=request(x))
    assert status == 200 and "id" not in body
    assert_exact(x, outputs_of(body))


async def test_concurrent_requests_each_get_their_own_answer(
    pipeline: LocalPipeline, front: WorkerProcess
) -> None:
    xs = [inputs(1 + k % 4, seed=100 + k) for k in range(16)]
    answers = await asyncio.gather(
        *(post(pipeline, infer_url(front), json=request(x, id=str(k))) for k, x in enumerate(xs))
    )
    for k, (x, (status, body)) in enumerate(zip(xs, answers, strict=True)):
        assert status == 200, body
        assert body["id"] == str(k)
        assert_exact(x, outputs_of(body))


async def test_requested_outputs_are_honoured(
    pipeline: LocalPipeline, front: WorkerProcess
) -> None:
    x = inputs(4, seed=7)
    want = reference(x)
    status, body = await post(
        pipeline, infer_url(front), json=request(x, id="o1", outputs=[{"name": "label"}])
    )
    assert status == 200, body
    assert [o["name"] for o in body["outputs"]] == ["label"]
    np.testing.assert_array_equal(outputs_of(body)["label"], want.argmax(axis=1))

    outputs = [{"name": "label"}, {"name": "y"}]
    status, body = await post(pipeline, infer_url(front), json=request(x, outputs=outputs))
    assert status == 200, body
    assert [o["name"] for o in body["outputs"]] == ["label", "y"]
    assert_exact(x, outputs_of(body))

    status, body = await post(
        pipeline, infer_url(front), json=request(x, outputs=[{"name": "nope"}])
    )
    assert status == 400
    assert body["error"].startswith("outputs[0].name: unknown output 'nope'")


async def test_binary_output_on_request(pipeline: LocalPipeline, front: WorkerProcess) -> None:
    x = inputs(3, seed=8)
    outputs = [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}]
    async with pipeline.session.post(
        infer_url(front), json=request(x, id="bin", outputs=outputs)
    ) as response:
        assert response.status == 200
        length = int(response.headers["Inference-Header-Content-Length"])
        raw = await response.read()
    result = triton.InferResult.from_response_body(raw, header_length=length)
    assert result.get_response()["id"] == "bin"
    np.testing.assert_array_equal(result.as_numpy("y"), reference(x).astype(np.float32))
    np.testing.assert_array_equal(result.as_numpy("label"), reference(x).argmax(axis=1))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_tritonclient_sync_client(front: WorkerProcess, binary: bool) -> None:
    x = inputs(5, seed=11 + binary)

    def call() -> tuple[Any, ...]:
        client = triton.InferenceServerClient(f"127.0.0.1:{front.http_port}")
        try:
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            result = client.infer(
                MODEL,
                [tensor],
                request_id=f"triton-{binary}",
                outputs=[
                    triton.InferRequestedOutput("y", binary_data=binary),
                    triton.InferRequestedOutput("label", binary_data=binary),
                ],
            )
            return (
                client.is_server_live(),
                client.is_server_ready(),
                client.is_model_ready(MODEL),
                client.get_model_metadata(MODEL),
                result,
            )
        finally:
            client.close()

    live, ready, model_ready, metadata, result = await asyncio.to_thread(call)
    assert live and ready and model_ready
    assert metadata["name"] == MODEL
    assert result.get_response()["id"] == f"triton-{binary}"
    np.testing.assert_array_equal(result.as_numpy("y"), reference(x).astype(np.float32))
    np.testing.assert_array_equal(result.as_numpy("label"), reference(x).argmax(axis=1))


async def test_tritonclient_sees_errors(front: WorkerProcess) -> None:
    def call() -> str:
        client = triton.InferenceServerClient(f"127.0.0.1:{front.http_port}")
        try:
            tensor = triton.InferInput("x", [2, 15], "FP32")
            tensor.set_data_from_numpy(np.zeros((2, 15), dtype=np.float32))
            with pytest.raises(InferenceServerException) as caught:
                client.infer(MODEL, [tensor])
            return str(caught.value)
        finally:
            client.close()

    message = await asyncio.to_thread(call)
    assert "inputs[0].shape[1]" in message


# -- bad requests ------------------------------------------------------------------------------


def with_input(**fields: Any) -> dict[str, Any]:
    x = inputs(2, seed=3)
    body = request(x)
    body["inputs"][0].update(fields)
    return body


BAD_REQUESTS: dict[str, tuple[Any, str]] = {
    "malformed-json": (b'{"inputs": [', "body: malformed JSON"),
    "not-an-object": (b"[1, 2]", "body: expected a JSON object"),
    "wrong-shape": (with_input(shape=[2, 15]), "inputs[0].shape[1]: input 'x' needs 16, got 15"),
    "wrong-rank": (with_input(shape=[32]), "inputs[0].shape: input 'x' has 2 dimensions"),
    "shape-data-mismatch": (
        with_input(shape=[3, 16]),
        "inputs[0].data: expected 48 elements for shape [3, 16], got 32",
    ),
    "wrong-datatype": (with_input(datatype="INT32"), "inputs[0].datatype: input 'x' takes FP32"),
    "not-a-datatype": (with_input(datatype="FLOAT"), "inputs[0].datatype: 'FLOAT' is not"),
    "string-in-numeric": (
        with_input(data=["1.0"] + [0] * 31),
        "inputs[0].data[0]: expected a number, got string",
    ),
    "string-in-nested-numeric": (
        with_input(data=[[0] * 16, [0, "x"] + [0] * 14]),
        "inputs[0].data[1][1]: expected a number, got string",
    ),
    "bool-in-numeric": (
        with_input(data=[0] * 17 + [True] + [0] * 14),
        "inputs[0].data[17]: expected a number, got boolean",
    ),
    "negative-dimension": (
        with_input(shape=[-2, 16]),
        "inputs[0].shape[0]: dimension must be non-negative, got -2",
    ),
    "nested-deeper-than-shape": (
        with_input(data=[[[[[[[[[[0]]]]]]]], *[0] * 15], [0] * 16]),
        "inputs[0].data[0][0]: expected a number, got list (nested deeper than the shape)",
    ),
    "nested-too-deeply": (
        b'{"inputs": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        "body: JSON is nested too deeply",
    ),
    "missing-input": ({"inputs": []}, "inputs: missing input 'x'"),
    "unknown-input": (
        {"inputs": [{**with_input()["inputs"][0], "name": "z"}]},
        "inputs[0].name: unknown input 'z'",
    ),
    "id-not-string": ({**with_input(), "id": 7}, "id: expected a string, got integer"),
    "zero-rows": (with_input(shape=[0, 16], data=[]), "inputs: the batch dimension is 0"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_request_is_400_naming_the_field(
    pipeline: LocalPipeline, front: WorkerProcess, case: str
) -> None:
    body, error = BAD_REQUESTS[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert len(data) < MAX_REQUEST_BYTES
    status, answer = await post(pipeline, infer_url(front), data=data)
    assert status == 400, answer
    assert answer["error"].startswith(error), answer["error"]


async def test_unknown_model_is_404(pipeline: LocalPipeline, front: WorkerProcess) -> None:
    status, body = await post(pipeline, infer_url(front, "nope"), json=request(inputs(1)))
    assert status == 404
    assert "model 'nope' is not served here" in body["error"]
    status, body = await post(
        pipeline, f"{front.http_url}/v2/models/{MODEL}/versions/9/infer", json=request(inputs(1))
    )
    assert status == 404
    assert "version '9'" in body["error"]


async def test_body_over_the_limit_is_413(pipeline: LocalPipeline, front: WorkerProcess) -> None:
    rows = MAX_REQUEST_BYTES // (16 * 4) + 64  # binary FP32 rows: just over the limit
    x = np.ones((rows, 16), dtype=np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [rows, 16],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    data = header + x.tobytes()
    assert len(data) > MAX_REQUEST_BYTES
    status, body = await post(
        pipeline,
        infer_url(front),
        data=data,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 413
    assert body["error"].startswith("body:")
    # Just under the limit is served.
    small = inputs(2, seed=21)
    status, body = await post(pipeline, infer_url(front), json=request(small))
    assert status == 200
    assert_exact(small, outputs_of(body))


async def test_infer_at_stage_one_is_404_pointing_at_stage_zero(
    pipeline: LocalPipeline, last: WorkerProcess
) -> None:
    status, body = await post(pipeline, infer_url(last), json=request(inputs(1)))
    assert status == 404
    assert body["error"] == "this worker runs stage 1; send requests to stage 0"


# -- metrics -----------------------------------------------------------------------------------

SERIES = {
    "worldmesh_requests": "counter",
    "worldmesh_request_duration_seconds": "histogram",
    "worldmesh_queue_depth": "gauge",
    "worldmesh_batch_size": "histogram",
    "worldmesh_stage_compute_seconds": "histogram",
    "worldmesh_worlds": "gauge",
    "worldmesh_world_failures": "counter",
    "worldmesh_retries": "counter",
    "worldmesh_cancelled_rows": "counter",
}


async def scrape(pipeline: LocalPipeline, worker: WorkerProcess) -> dict[str, Any]:
    async with pipeline.session.get(worker.http_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_metrics_expose_every_series_with_labels(
    pipeline: LocalPipeline, front: WorkerProcess, last: WorkerProcess
) -> None:
    # Make sure each code this module provokes has happened at least once by now.
    await post(pipeline, infer_url(front), json=request(inputs(2)))
    await post(pipeline, infer_url(front), data=b"{")
    await post(pipeline, infer_url(front, "nope"), json=request(inputs(1)))
    for worker in (front, last):
        families = await scrape(pipeline, worker)
        for name, kind in SERIES.items():
            assert name in families, f"{worker.worker}: no {name}"
            family = families[name]
            assert family.type == kind, (name, family.type)
            labelled = [s for s in family.samples if s.labels]
            if name != "worldmesh_requests" or worker is front:
                assert labelled, f"{worker.worker}: {name} has no samples"
            for sample in labelled:
                assert sample.labels["deployment"] == MODEL
                assert sample.labels["stage"] == str(worker.stage)
                assert sample.labels["worker"] == worker.worker
        worlds = {
            s.labels["state"]: s.value for s in families["worldmesh_worlds"].samples if s.labels
        }
        assert worlds["ready"] == 1
        assert worlds.get("broken", 0) == 0
        batches = families["worldmesh_batch_size"].samples
        assert any(s.name.endswith("_count") and s.value > 0 for s in batches)

    families = await scrape(pipeline, front)
    codes = {
        s.labels["code"]: s.value
        for s in families["worldmesh_requests"].samples
        if s.name == "worldmesh_requests_total"
    }
    assert codes["200"] >= 1 and codes["400"] >= 1 and codes["404"] >= 1
    durations = families["worldmesh_request_duration_seconds"].samples
    assert any(s.name.endswith("_count") and s.value >= codes["200"] for s in durations)


async def test_metrics_count_413(pipeline: LocalPipeline, front: WorkerProcess) -> None:
    data = b'{"inputs": []}' + b" " * MAX_REQUEST_BYTES
    async with pipeline.session.post(infer_url(front), data=data) as response:
        assert response.status == 413
    families = await scrape(pipeline, front)
    codes = {
        s.labels["code"] for s in families["worldmesh_requests"].samples if s.labels.get("code")
    }
    assert "413" in codes


# -- control API -------------------------------------------------------------------------------


def control_url(worker: WorkerProcess, path: str) -> str:
    return f"http://127.0.0.1:{worker.control_port}{path}"


def auth(pipeline: LocalPipeline) -> dict[str, str]:
    return {"Authorization": f"Bearer {pipeline.token}"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic xyz"}],
    ids=["missing", "wrong", "other-scheme"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/status"), ("GET", "/v1/worlds"), ("POST", "/v1/worlds"), ("POST", "/v1/drain")],
)
async def test_control_without_the_token_is_401(
    pipeline: LocalPipeline, front: WorkerProcess, headers: dict[str, str], method: str, path: str
) -> None:
    async with pipeline.session.request(
        method, control_url(front, path), headers=headers, json={}
    ) as response:
        assert response.status == 401
        body = await response.json(content_type=None)
    assert "token" in body["error"]


async def test_unknown_control_route_without_the_token_is_401(
    pipeline: LocalPipeline, front: WorkerProcess
) -> None:
    status, body = await get(pipeline, control_url(front, "/v1/nothing"))
    assert status == 401  # no route is disclosed before authentication
    assert "token" in body["error"]


BAD_OPENS: dict[str, tuple[Any, str]] = {
    "malformed-json": (b"{nope", "body: not valid JSON"),
    "not-an-object": (b"[]", "body: must be a JSON object"),
    "missing-peer": ({"peerStage": 1}, "peer: required"),
    "peer-not-string": ({"peer": 5, "peerStage": 1}, "peer: must be a string"),
    "missing-peer-stage": ({"peer": "demo-s1-w9"}, "peerStage: required"),
    "peer-stage-not-int": ({"peer": "demo-s1-w9", "peerStage": "1"}, "peerStage: must be an"),
    "peer-stage-bool": ({"peer": "demo-s1-w9", "peerStage": True}, "peerStage: must be an"),
    "not-a-neighbour": ({"peer": "demo-s1-w9", "peerStage": 5}, "peerStage: 5 is not a neighbour"),
    "unknown-field": ({"peer": "demo-s1-w9", "peerStage": 1, "colour": "red"}, "colour: unknown"),
    "heartbeat-not-string": (
        {"peer": "demo-s1-w9", "peerStage": 1, "heartbeat": 1},
        "heartbeat: must be",
    ),
    "store-no-more": ({"peer": "demo-s1-w9", "peerStage": 1, "store": "h:1"}, "store: unknown"),
}


@pytest.mark.parametrize("case", list(BAD_OPENS))
async def test_bad_world_open_is_400_naming_the_field(
    pipeline: LocalPipeline, front: WorkerProcess, case: str
) -> None:
    body, error = BAD_OPENS[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = await post(
        pipeline, control_url(front, "/v1/worlds"), data=data, headers=auth(pipeline)
    )
    assert status == 400, answer
    assert answer["error"].startswith(error), answer["error"]


async def test_last_stage_has_no_downstream_neighbour(
    pipeline: LocalPipeline, last: WorkerProcess
) -> None:
    status, answer = await post(
        pipeline,
        control_url(last, "/v1/worlds"),
        json={"peer": "demo-s2-w9", "peerStage": 2},
        headers=auth(pipeline),
    )
    assert status == 400
    assert answer["error"].startswith("peerStage: 2 is not a neighbour of stage 1 (of 2)")


async def test_closing_an_unknown_world_is_404(
    pipeline: LocalPipeline, front: WorkerProcess
) -> None:
    async with pipeline.session.delete(
        control_url(front, "/v1/worlds/no~such"), headers=auth(pipeline)
    ) as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"] == "no world 'no~such'"


async def test_bad_drain_wait_is_400(pipeline: LocalPipeline, front: WorkerProcess) -> None:
    status, body = await post(
        pipeline, control_url(front, "/v1/drain?wait=soon"), headers=auth(pipeline)
    )
    assert status == 400
    assert body["error"].startswith("wait:")
    status, body = await get(pipeline, control_url(front, "/v1/drain"), headers=auth(pipeline))
    assert status == 200
    assert body == {"draining": False, "drained": False}  # the bad call drained nothing


async def test_status_reports_the_worker_and_its_world(
    pipeline: LocalPipeline, front: WorkerProcess, last: WorkerProcess
) -> None:
    world = f"{front.worker}~{last.worker}"
    for worker, role in ((front, "down"), (last, "up")):
        status, body = await get(
            pipeline, control_url(worker, "/v1/status"), headers=auth(pipeline)
        )
        assert status == 200
        assert body["worker"] == worker.worker
        assert body["deployment"] == MODEL
        assert body["stage"] == worker.stage
        assert body["stages"] == 2
        assert body["model"] == "toy"
        assert body["device"] == "cpu"
        assert body["accepting"] is True
        assert body["draining"] is False and body["drained"] is False
        assert isinstance(body["queueRows"], int) and isinstance(body["inFlightRows"], int)
        (info,) = body["worlds"]
        assert info["name"] == world
        assert info["state"] == "ready"
        assert info["role"] == role
        assert info["backend"] == "gloo"
        status, listed = await get(
            pipeline, control_url(worker, "/v1/worlds"), headers=auth(pipeline)
        )
        assert status == 200
        assert [w["name"] for w in listed["worlds"]] == [world]
    status, body = await get(pipeline, control_url(front, "/v1/status"), headers=auth(pipeline))
    assert body["outstanding"] == {world: 0}


# -- and nothing broke ---------------------------------------------------------------------------


async def test_workers_survived_everything(
    pipeline: LocalPipeline, front: WorkerProcess, last: WorkerProcess
) -> None:
    for worker in (front, last):
        assert worker.process.poll() is None, f"{worker.worker} exited"
        status = await worker.control.status()
        assert [w["state"] for w in status["worlds"]] == ["ready"]
        assert status["accepting"] is True
        log = worker.log_path.read_text()
        assert "unexpected error" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    x = inputs(6, seed=99)
    status, body = await post(pipeline, infer_url(front), json=request(x, id="after"))
    assert status == 200 and body["id"] == "after"
    assert_exact(x, outputs_of(body))
    families = await scrape(pipeline, front)
    assert not any(s.labels.get("code") == "500" for s in families["worldmesh_requests"].samples), (
        "a request was answered 500"
    )
    failures = families["worldmesh_world_failures"].samples
    assert all(s.value == 0 for s in failures if s.name.endswith("_total"))


# -- a single-stage pipeline of its own: these leave stray state behind ----------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[LocalPipeline]:
    """One single-stage worker (stage 0 is also the last), for the tests below."""
    async with LocalPipeline("toy", [], [1], deployment="solo") as running:
        yield running


@pytest.mark.parametrize("port", ["http", "control"])
async def test_unknown_route_is_json_404(solo: LocalPipeline, port: str) -> None:
    worker = solo.front
    url = worker.http_url + "/v2/nothing" if port == "http" else control_url(worker, "/v1/no")
    async with solo.session.get(url, headers=auth(solo)) as response:
        status, content_type = response.status, response.content_type
        text = await response.text()
    assert status == 404, text
    assert content_type == "application/json"
    assert json.loads(text)["error"]


async def test_wrong_method_is_json_405(solo: LocalPipeline) -> None:
    async with solo.session.put(solo.front.http_url + "/v2") as response:
        status, allow = response.status, response.headers.get("Allow", "")
        text = await response.text()
    assert status == 405, text
    assert "GET" in allow
    assert json.loads(text)["error"]


async def test_front_stage_has_no_upstream_neighbour(solo: LocalPipeline) -> None:
    status, answer = await post(
        solo,
        control_url(solo.front, "/v1/worlds"),
        json={"peer": "solo-s9-w9", "peerStage": -1},
        headers=auth(solo),
    )
    assert status == 400, answer
    assert answer["error"].startswith("peerStage: -1 is not a neighbour of stage 0")
