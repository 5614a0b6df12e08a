"""The Open Inference Protocol over gRPC, with tritonclient's clients, on a real pipeline.

One module-scoped ``LocalPipeline("toy", [2], [1, 1])`` (two worker processes wired by a
Gloo world, ``limits.maxRequestBytes`` = 64 KiB) serves every test, all on 127.0.0.1.
This process never imports worldmesh's own generated messages: tritonclient's (the same
package and field numbers, Triton's superset of the protocol) would clash with them.

Covers:
- ``tritonclient.grpc`` (sync) and ``tritonclient.grpc.aio``: liveness, readiness (server
  and model), server and model metadata; ModelInfer with raw contents (as tritonclient
  sends them) returns exactly ``toy.reference`` and its argmax, echoes the id, and holds
  only the requested outputs;
- ModelInfer with typed ``contents`` (through tritonclient's generated stub) answers typed
  contents, and the same input gives the same answer over REST and gRPC;
- bad requests get the error table's code with a message naming what is wrong: a wrong
  datatype, raw contents shorter than the shape, typed and raw contents together, a
  ``binary_data_size`` that disagrees with its raw entry or comes without one, an unknown
  input or output (INVALID_ARGUMENT); an unknown model, or infer sent to the stage-1 worker
  (NOT_FOUND); a message over ``maxRequestBytes`` (RESOURCE_EXHAUSTED); a client deadline
  that passes (DEADLINE_EXCEEDED, on the client);
- kserve's own ``InferenceGRPCClient`` (run in KServe's environment, ``make kserve``):
  liveness and readiness, raw and typed contents with the exact answer, the id echoed,
  requested outputs, and the codes of an unknown input, a wrong datatype and an unknown
  model;
- after all of this both workers live, nothing was logged as an unexpected error, and a
  request still gets the exact answer.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from worldmesh_worker.control import wait_until
from worldmesh_worker.local import LocalPipeline, WorkerProcess
from worldmesh_worker.models.toy import reference

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "demo"
MAX_REQUEST_BYTES = 64 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipeline() -> AsyncIterator[LocalPipeline]:
    async with LocalPipeline(
        "toy", [2], [1, 1], deployment=MODEL, limits={"maxRequestBytes": MAX_REQUEST_BYTES}
    ) as running:
        client = triton.InferenceServerClient(running.front.grpc_target)
        await wait_until(client.is_server_ready, 30, "the front stage ready over gRPC")
        yield running


@pytest.fixture
def front(pipeline: LocalPipeline) -> WorkerProcess:
    return pipeline.front


@pytest.fixture
def client(front: WorkerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(front.grpc_target)


def inputs(rows: int, seed: int = 0) -> np.ndarray:
    """Small integers, so every answer of ``toy`` is exact in float32."""
    return np.random.default_rng(seed).integers(-10, 11, size=(rows, 16)).astype(np.float32)


def tensor(x: np.ndarray, name: str = "x", datatype: str = "FP32") -> triton.InferInput:
    given = triton.InferInput(name, list(x.shape), datatype)
    given.set_data_from_numpy(x)
    return given


def raw_request(x: np.ndarray, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, **fields)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code(), caught.value.details()


async def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata()
    assert server.name == "worldmesh" and "binary_tensor_data" in server.extensions
    model = client.get_model_metadata(MODEL)
    assert (model.name, list(model.versions), model.platform) == (MODEL, ["1"], "pytorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("x", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("y", "FP32", [-1, 4]),
        ("label", "INT64", [-1]),
    ]
    with pytest.raises(InferenceServerException, match="'nope'"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("rows", [1, 3])
async def test_infer_with_raw_contents_is_exact(
    client: triton.InferenceServerClient, rows: int
) -> None:
    x = inputs(rows, seed=rows)
    result = client.infer(MODEL, [tensor(x)], request_id=f"r-{rows}")
    want = reference(x)
    np.testing.assert_array_equal(result.as_numpy("y"), want)
    np.testing.assert_array_equal(result.as_numpy("label"), want.argmax(axis=1))
    assert result.get_response().id == f"r-{rows}"


async def test_only_the_requested_outputs_come_back(client: triton.InferenceServerClient) -> None:
    x = inputs(2, seed=5)
    result = client.infer(MODEL, [tensor(x)], outputs=[triton.InferRequestedOutput("label")])
    assert [o.name for o in result.get_response().outputs] == ["label"]
    np.testing.assert_array_equal(result.as_numpy("label"), reference(x).argmax(axis=1))


async def test_the_aio_client(front: WorkerProcess) -> None:
    async with triton_aio.InferenceServerClient(front.grpc_target) as client:
        assert await client.is_model_ready(MODEL)
        x = inputs(2, seed=7)
        result = await client.infer(MODEL, [tensor(x)])
        np.testing.assert_array_equal(result.as_numpy("y"), reference(x))


async def test_typed_contents_and_the_same_answer_as_rest(
    pipeline: LocalPipeline, front: WorkerProcess
) -> None:
    x = inputs(2, seed=9)
    request = pb.ModelInferRequest(model_name=MODEL, id="typed")
    given = request.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    given.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(front.grpc_target) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert response.id == "typed" and not response.raw_output_contents
    by_name = {o.name: o for o in response.outputs}
    y = np.asarray(by_name["y"].contents.fp32_contents, np.float32).reshape(by_name["y"].shape)
    label = np.asarray(by_name["label"].contents.int64_contents)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16], "data": x.ravel().tolist()}]
    }
    async with pipeline.session.post(f"{front.http_url}/v2/models/{MODEL}/infer", json=body) as r:
        rest = {o["name"]: np.asarray(o["data"]) for o in (await r.json())["outputs"]}
    np.testing.assert_array_equal(y, rest["y"].reshape(2, 4))
    np.testing.assert_array_equal(label, rest["label"])
    np.testing.assert_array_equal(y, reference(x))


def _bad_requests() -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, str]]:
    x = inputs(1)
    wrong_type = raw_request(x)
    wrong_type.inputs[0].datatype = "INT32"
    short = pb.ModelInferRequest(model_name=MODEL)
    short.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    short.raw_input_contents.append(x.tobytes()[:-4])
    both = raw_request(x)
    both.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    unknown_input = raw_request(x)
    unknown_input.inputs[0].name = "z"
    unknown_output = raw_request(x)
    unknown_output.outputs.add(name="w")
    unknown_model = raw_request(x)
    unknown_model.model_name = "nope"
    size_disagrees = raw_request(x)
    size_disagrees.inputs[0].parameters["binary_data_size"].int64_param = 60
    size_without_raw = pb.ModelInferRequest(model_name=MODEL)
    typed = size_without_raw.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    typed.contents.fp32_contents.extend(x.ravel().tolist())
    typed.parameters["binary_data_size"].int64_param = 64
    big = np.zeros((MAX_REQUEST_BYTES // 64 + 1, 16), np.float32)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "wrong-datatype": (wrong_type, invalid, "inputs[0].datatype"),
        "raw-shorter-than-shape": (short, invalid, "inputs[0]"),
        "typed-and-raw": (both, invalid, "inputs[0].contents"),
        "raw-size-disagrees": (size_disagrees, invalid, "binary_data_size: 60, but"),
        "size-without-raw": (size_without_raw, invalid, "without raw_input_contents"),
        "unknown-input": (unknown_input, invalid, "unknown input 'z'"),
        "unknown-output": (unknown_output, invalid, "unknown output 'w'"),
        "unknown-model": (unknown_model, grpc.StatusCode.NOT_FOUND, "'nope'"),
        "over-the-size-limit": (raw_request(big), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
async def test_a_bad_request_gets_its_code_naming_what_is_wrong(
    front: WorkerProcess, case: str
) -> None:
    request, code, words = _bad_requests()[case]
    with grpc.insecure_channel(front.grpc_target) as channel:
        got, details = code_of(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request)
    assert got is code, (got, details)
    assert words in details, details


async def test_infer_at_stage_one_and_a_passed_deadline(pipeline: LocalPipeline) -> None:
    (last,) = pipeline.stage(1)
    with grpc.insecure_channel(last.grpc_target) as channel:
        got, details = code_of(
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, raw_request(inputs(1))
        )
    assert got is grpc.StatusCode.NOT_FOUND and "stage 0" in details
    with grpc.insecure_channel(pipeline.front.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        got, _ = code_of(stub.ModelInfer, raw_request(inputs(1)), timeout=1e-4)
    assert got is grpc.StatusCode.DEADLINE_EXCEEDED


KSERVE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-kserve" / "bin" / "python"


@pytest.mark.skipif(not KSERVE_PYTHON.exists(), reason="no KServe environment: `make kserve`")
async def test_kserves_own_grpc_client(front: WorkerProcess) -> None:
    x = inputs(3, seed=5)
    script = Path(__file__).with_name("kserve_client.py")
    process = await asyncio.create_subprocess_exec(
        str(KSERVE_PYTHON),
        str(script),
        front.grpc_target,
        MODEL,
        json.dumps(x.tolist()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ""},
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-3000:]
    seen = json.loads(out)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    want = reference(x)
    raw = seen["raw"]
    assert raw["id"] == "raw-1"
    assert raw["outputs"]["y"] == {"shape": [3, 4], "datatype": "FP32", "data": want.tolist()}
    assert raw["outputs"]["label"]["data"] == want.argmax(axis=1).tolist()
    typed = seen["typed"]
    assert typed["id"] == "typed-2"
    assert list(typed["outputs"]) == ["label"]  # only what was asked for
    assert typed["outputs"]["label"]["data"] == want.argmax(axis=1).tolist()
    errors = seen["errors"]
    assert (
        errors["unknown input"][0] == "INVALID_ARGUMENT" and "'nope'" in errors["unknown input"][1]
    )
    assert (
        errors["wrong datatype"][0] == "INVALID_ARGUMENT" and "FP32" in errors["wrong datatype"][1]
    )
    assert errors["unknown model"][0] == "NOT_FOUND" and "'nope'" in errors["unknown model"][1]


async def test_the_workers_live_on_after_all_of_this(
    pipeline: LocalPipeline, client: triton.InferenceServerClient
) -> None:
    for worker in pipeline.workers:
        assert worker.process.poll() is None
        assert "unexpected error" not in worker.log_path.read_text()
    x = inputs(4, seed=11)
    np.testing.assert_array_equal(client.infer(MODEL, [tensor(x)]).as_numpy("y"), reference(x))
