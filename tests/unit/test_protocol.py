"""The OIP v2 REST layer without sockets: errors, request validation, round trips.

Covers: the error hierarchy's statuses and bodies; every ``InvalidInput`` case of
``decode_infer_request`` (type, status 400 and the field path that starts the message);
JSON (flat, nested, partly nested) and binary requests built by tritonclient for every
datatype; responses decoded by tritonclient's ``InferResult`` (JSON, binary, mixed, requested
order, ``binary_data_output``); metadata objects.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from worldmesh_worker.errors import (
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    PeerFailed,
    ServiceUnavailable,
    Unauthorized,
    WorldmeshError,
    WorldNotFound,
    error_body,
)
from worldmesh_worker.protocol import (
    InferRequest,
    RequestedOutput,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    model_metadata,
    server_metadata,
)

INPUTS = (TensorSpec("x", "FP32", (-1, 3)), TensorSpec("mask", "INT64", (-1, 3)))
OUTPUTS = (TensorSpec("y", "FP32", (-1, 2)), TensorSpec("label", "BYTES", (-1,)))
HEADER = "Inference-Header-Content-Length"


def good_inputs() -> list[dict[str, Any]]:
    return [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6.5]},
        {"name": "mask", "datatype": "INT64", "shape": [2, 3], "data": [[1, 1, 1], [1, 0, 0]]},
    ]


def decode(doc: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> InferRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    specs = kwargs.pop("inputs", INPUTS)
    return decode_infer_request(body, headers or {}, specs, OUTPUTS, **kwargs)


def assert_invalid(field: str, doc: Any, headers: dict[str, str] | None = None, **kw: Any) -> str:
    with pytest.raises(InvalidInput) as info:
        decode(doc, headers, **kw)
    assert info.value.status == 400
    message = str(info.value)
    assert message.startswith(f"{field}:"), message
    assert error_body(info.value) == {"error": message}
    return message


def with_input(index: int, **changes: Any) -> dict[str, Any]:
    inputs = good_inputs()
    inputs[index].update(changes)
    return {"inputs": [{k: v for k, v in i.items() if v is not None} for i in inputs]}


def binary_request(
    tensors: list[tuple[str, str, np.ndarray]], binary: bool = True, **kw: Any
) -> tuple[bytes, dict[str, str]]:
    inputs = []
    for name, datatype, array in tensors:
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    body, length = triton.InferenceServerClient.generate_request_body(inputs, **kw)
    return body, ({} if length is None else {HEADER: str(length)})


def good_binary() -> tuple[bytes, dict[str, str]]:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    return binary_request([("x", "FP32", x), ("mask", "INT64", np.ones((2, 3), np.int64))])


# --- errors ---------------------------------------------------------------------------------


def test_errors_map_to_statuses_once() -> None:
    table = {
        WorldmeshError: 500,
        InvalidInput: 400,
        Unauthorized: 401,
        ModelNotFound: 404,
        WorldNotFound: 404,
        PayloadTooLarge: 413,
        Overloaded: 429,
        ServiceUnavailable: 503,
        ModelNotReady: 503,
        InternalError: 500,
        PeerFailed: 502,
    }
    for cls, status in table.items():
        exc = cls("what is wrong")
        assert exc.status == status and exc.retry_after is None
        assert isinstance(exc, WorldmeshError) and error_body(exc) == {"error": "what is wrong"}
    assert Overloaded("queue full", retry_after=1.5).retry_after == 1.5
    assert ServiceUnavailable("draining", retry_after=3).retry_after == 3


# --- request validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("body", b"{not json"),
        ("body", b"\xff\xfe\x00"),
        ("body", b"[1, 2]"),
        ("body", b"[" * 100_000),
        ("id", {"id": 7, "inputs": good_inputs()}),
        ("parameters", {"parameters": [], "inputs": good_inputs()}),
        ("parameters.binary_data_output", {"parameters": {"binary_data_output": 1}}),
        ("inputs", {}),
        ("inputs", {"inputs": {"x": []}}),
        ("inputs[0]", {"inputs": ["x"]}),
        ("inputs[0].name", {"inputs": [{"datatype": "FP32"}]}),
        ("inputs[0].name", {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1]}]}),
        ("inputs[2].name", {"inputs": [*good_inputs(), good_inputs()[0]]}),
        ("inputs", {"inputs": good_inputs()[:1]}),
    ],
)
def test_body_and_input_list_errors(field: str, body: Any) -> None:
    assert_invalid(field, body)


def test_missing_input_is_named() -> None:
    assert "'mask'" in assert_invalid("inputs", {"inputs": good_inputs()[:1]})


@pytest.mark.parametrize(
    ("field", "changes", "words"),
    [
        ("inputs[0].datatype", {"datatype": "FLOAT32"}, "not an OIP datatype"),
        ("inputs[0].datatype", {"datatype": 3}, "expected a datatype string"),
        ("inputs[0].datatype", {"datatype": "BF16"}, "BF16 is not supported"),
        ("inputs[0].datatype", {"datatype": "INT64"}, "takes FP32"),
        ("inputs[0].shape", {"shape": "2x3"}, "list of non-negative integers"),
        ("inputs[0].shape", {"shape": None}, "list of non-negative integers"),
        ("inputs[0].shape[1]", {"shape": [2, "3"]}, "non-negative integer"),
        ("inputs[0].shape[1]", {"shape": [2, 3.0]}, "non-negative integer"),
        ("inputs[0].shape[0]", {"shape": [True, 3]}, "non-negative integer"),
        ("inputs[0].shape[1]", {"shape": [2, -3]}, "non-negative"),
        ("inputs[0].shape", {"shape": [6]}, "2 dimensions"),
        ("inputs[0].shape[1]", {"shape": [3, 2]}, "needs 3"),
        ("inputs[0].parameters", {"parameters": [1]}, "expected an object"),
        (
            "inputs[0].parameters.shared_memory_region",
            {"parameters": {"shared_memory_region": "r"}},
            "not supported",
        ),
        ("inputs[0].data", {"data": None}, "missing"),
        ("inputs[0].data", {"data": 5}, "expected a list"),
        ("inputs[0].data", {"data": [1, 2, 3, 4, 5]}, "expected 6 elements"),
        ("inputs[0].data[1]", {"data": [[1, 2, 3], [4, 5]]}, "expected 3 elements"),
        ("inputs[0].data", {"data": [[1, 2, 3]]}, "expected 2 elements"),
        ("inputs[0].data[1]", {"data": [[1, 2, 3], 4]}, "expected a list"),
        (
            "inputs[0].data[0][1]",
            {"data": [[1, "2", 3], [4, 5, 6]]},
            "expected a number, got string",
        ),
        ("inputs[0].data[4]", {"data": [1, 2, 3, 4, True, 6]}, "expected a number, got boolean"),
        (
            "inputs[0].data[0][0]",
            {"data": [[[1], [2], [3]], [[4], [5], [6]]]},
            "deeper than the shape",
        ),
        ("inputs[0].data[2]", {"data": [1, 2, [3], 4, 5, 6]}, "deeper than the shape"),
        ("inputs[0].data[0][2]", {"data": [[1, 2, None], [4, 5, 6]]}, "got NoneType"),
        ("inputs[0].data[0]", {"data": [int("1" + "0" * 400), 2, 3, 4, 5, 6]}, "out of range"),
        (
            "inputs[1].data[0][1]",
            {"data": [[1, 2.5, 1], [1, 1, 1]]},
            "expected an integer, got number",
        ),
        ("inputs[1].data[1][2]", {"data": [[1, 1, 1], [1, 1, False]]}, "got boolean"),
        ("inputs[1].data[5]", {"data": [1, 1, 1, 1, 1, 2**63]}, "out of range for INT64"),
        ("inputs[1].shape[0]", {"shape": [3, 3], "data": [1] * 9}, "batch size 3 differs"),
    ],
)
def test_input_field_errors(field: str, changes: dict[str, Any], words: str) -> None:
    index = int(field[7])
    assert words in assert_invalid(field, with_input(index, **changes))


@pytest.mark.parametrize(
    ("datatype", "data", "field", "words"),
    [
        ("BOOL", [True, 1], "data[1]", "expected a boolean, got integer"),
        ("BYTES", ["a", 1], "data[1]", "expected a string, got integer"),
        ("BYTES", ["a", "\ud800"], "data", "not valid Unicode"),
        ("UINT8", [0, 256], "data[1]", "out of range for UINT8 [0, 255]"),
        ("UINT16", [-1, 0], "data[0]", "out of range for UINT16"),
        ("INT8", [-129, 0], "data[0]", "out of range for INT8"),
        ("UINT64", [2**64, 0], "data[0]", "out of range for UINT64"),
        ("FP16", [1, "nan"], "data[1]", "expected a number, got string"),
    ],
)
def test_element_type_and_range_errors(
    datatype: str, data: list[Any], field: str, words: str
) -> None:
    spec = (TensorSpec("t", datatype, (-1,)),)
    doc = {"inputs": [{"name": "t", "datatype": datatype, "shape": [2], "data": data}]}
    assert words in assert_invalid(f"inputs[0].{field}", doc, inputs=spec)


def test_nesting_beyond_max_depth_is_refused_without_recursion() -> None:
    spec = (TensorSpec("t", "INT32", (-1,) + (1,) * 11),)
    data: Any = [0]
    for _ in range(11):
        data = [data]
    doc = {"inputs": [{"name": "t", "datatype": "INT32", "shape": [1] * 12, "data": data}]}
    assert "limit of 8 levels" in assert_invalid("inputs[0].data", doc, inputs=spec)
    assert decode(doc, inputs=spec, max_depth=12).inputs[0].data.shape == (1,) * 12
    flat = {"inputs": [{"name": "t", "datatype": "INT32", "shape": [1] * 12, "data": [0]}]}
    assert decode(flat, inputs=spec).inputs[0].data.shape == (1,) * 12


@pytest.mark.parametrize(
    ("field", "outputs"),
    [
        ("outputs", {"name": "y"}),
        ("outputs[0]", ["y"]),
        ("outputs[0].name", [{"name": 1}]),
        ("outputs[1].name", [{"name": "y"}, {"name": "logits"}]),
        ("outputs[1].name", [{"name": "y"}, {"name": "y"}]),
        ("outputs[0].parameters", [{"name": "y", "parameters": True}]),
        ("outputs[0].parameters.binary_data", [{"name": "y", "parameters": {"binary_data": 1}}]),
        (
            "outputs[0].parameters.classification",
            [{"name": "y", "parameters": {"classification": 2}}],
        ),
    ],
)
def test_requested_output_errors(field: str, outputs: Any) -> None:
    assert_invalid(field, {"inputs": good_inputs(), "outputs": outputs})


def test_binary_size_mismatches() -> None:
    body, headers = good_binary()
    head = json.loads(body[: int(headers[HEADER])])

    def rebuild(tail: bytes) -> bytes:
        text = json.dumps(head).encode()
        headers[HEADER] = str(len(text))
        return text + tail

    tail = body[int(headers[HEADER]) :]
    head["inputs"][0]["parameters"]["binary_data_size"] = 20
    message = assert_invalid("inputs[0].parameters.binary_data_size", rebuild(tail), headers)
    assert "expected 24 bytes" in message
    head["inputs"][0]["parameters"]["binary_data_size"] = 24
    message = assert_invalid("inputs[1].parameters.binary_data_size", rebuild(tail[:-8]), headers)
    assert "48 bytes claimed, but only 40 remain" in message
    assert "belong to no input" in assert_invalid("body", rebuild(tail + b"\0"), headers)
    for size in (-1, "24", 24.0):
        head["inputs"][0]["parameters"]["binary_data_size"] = size
        assert_invalid("inputs[0].parameters.binary_data_size", rebuild(tail), headers)
    head["inputs"][0]["parameters"]["binary_data_size"] = 24
    head["inputs"][0]["data"] = [0] * 6
    assert_invalid("inputs[0].data", rebuild(tail), headers)
    del head["inputs"][0]["data"]
    message = assert_invalid("inputs[0].parameters.binary_data_size", json.dumps(head).encode())
    assert HEADER in message


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "99999999"])
def test_bad_header_length_is_named(value: str) -> None:
    body, _ = good_binary()
    assert_invalid(HEADER, body, {HEADER: value})


def test_malformed_binary_bytes_and_bool() -> None:
    spec = (TensorSpec("t", "BYTES", (-1,)),)
    body, headers = binary_request([("t", "BYTES", np.array([b"ab", b"c"], dtype=object))])
    length = int(headers[HEADER])
    truncated = body[:length] + b"\x04\0\0\0abcd" + b"\0\0\0"
    assert "truncated length" in assert_invalid("inputs[0]", truncated, headers, inputs=spec)
    runs_past = body[:length] + b"\x02\0\0\0ab\x09\0\0\0x"
    assert "runs past" in assert_invalid("inputs[0]", runs_past, headers, inputs=spec)
    three = body[:length] + b"\x01\0\0\0a" * 2 + b"\0" * 3
    assert "exactly 2 BYTES" in assert_invalid(
        "inputs[0].parameters.binary_data_size", three, headers, inputs=spec
    )
    spec = (TensorSpec("t", "BOOL", (-1,)),)
    body, headers = binary_request([("t", "BOOL", np.array([True, False]))])
    assert "0 or 1" in assert_invalid("inputs[0]", body[:-1] + b"\x02", headers, inputs=spec)


# --- decoding round trips -------------------------------------------------------------------

SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-(2**15), 0, 2**15 - 1]], np.int16),
    "INT32": np.array([[-(2**31), 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-(2**63), 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[-1.5, 0, 65504]], np.float16),
    "FP32": np.array([[-1.5, 0.1, 3e38]], np.float32),
    "FP64": np.array([[-1.5, 0.1, 1e300]], np.float64),
    "BYTES": np.array([[b"", "héllo".encode(), b"tail"]], dtype=object),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_round_trips(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    spec = (TensorSpec("t", datatype, (-1, 3)),)
    body, headers = binary_request([("t", datatype, array)], binary=binary)
    assert (HEADER in headers) is binary
    request = decode_infer_request(body, headers, spec, OUTPUTS)
    (got,) = request.inputs
    assert (got.name, got.datatype, got.shape) == ("t", datatype, (1, 3))
    assert got.data.dtype == array.dtype and got.data.shape == array.shape
    np.testing.assert_array_equal(got.data, array)
    assert got.data.flags.writeable


def test_nested_partly_nested_and_flat_data_agree() -> None:
    spec = (TensorSpec("t", "INT32", (-1, 2, 2)),)
    flat = list(range(8))
    forms = [flat, [[0, 1, 2, 3], [4, 5, 6, 7]], [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]]
    for data in forms:
        doc = {"inputs": [{"name": "t", "datatype": "INT32", "shape": [2, 2, 2], "data": data}]}
        got = decode(doc, inputs=spec).inputs[0].data
        np.testing.assert_array_equal(got, np.arange(8, dtype=np.int32).reshape(2, 2, 2))


def test_request_fields_order_and_case_insensitive_header() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    mask = np.ones((2, 3), np.int64)
    body, headers = binary_request(
        [("mask", "INT64", mask), ("x", "FP32", x)],
        request_id="req-1",
        outputs=[triton.InferRequestedOutput("label"), triton.InferRequestedOutput("y", False)],
        parameters={"tenant": "a"},
    )
    request = decode(body, {k.lower(): v for k, v in headers.items()})
    assert [i.name for i in request.inputs] == ["x", "mask"]
    np.testing.assert_array_equal(request.inputs[0].data, x)
    assert request.id == "req-1" and request.parameters == {"tenant": "a"}
    assert request.outputs == (RequestedOutput("label", True), RequestedOutput("y", False))


def test_outputs_default_to_binary_data_output_and_empty_means_all() -> None:
    doc = {"inputs": good_inputs(), "parameters": {"binary_data_output": True}}
    assert decode(doc).outputs is None
    doc["outputs"] = [{"name": "y"}, {"name": "label", "parameters": {"binary_data": False}}]
    assert decode(doc).outputs == (RequestedOutput("y", True), RequestedOutput("label", False))
    assert decode({"inputs": good_inputs(), "outputs": []}).outputs is None


def test_empty_batch_decodes() -> None:
    empty = np.zeros((0, 3), np.float32)
    body, headers = binary_request(
        [("x", "FP32", empty), ("mask", "INT64", empty.astype(np.int64))]
    )
    assert decode(body, headers).inputs[0].data.shape == (0, 3)
    doc = {"inputs": [{**i, "shape": [0, 3], "data": []} for i in good_inputs()]}
    assert decode(doc).inputs[1].data.shape == (0, 3)


# --- responses ------------------------------------------------------------------------------


def results(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get(HEADER)
    return triton.InferResult.from_response_body(body, header_length=length and int(length))


OUT = {
    "y": np.array([[0.5, -1.0], [2.0, 3.25]], np.float32),
    "label": np.array([b"cat", "dög".encode()], dtype=object),
}


def request_with(outputs: tuple[RequestedOutput, ...] | None, **params: Any) -> InferRequest:
    return InferRequest(id="r7", inputs=(), outputs=outputs, parameters=params)


def test_json_response_decodes_with_tritonclient() -> None:
    body, headers = encode_infer_response("m", "1", request_with(None), OUT)
    assert headers == {"Content-Type": "application/json"}
    result = results(body, headers)
    np.testing.assert_array_equal(result.as_numpy("y"), OUT["y"])
    np.testing.assert_array_equal(result.as_numpy("label"), np.array(["cat", "dög"], dtype=object))
    doc = result.get_response()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "1", "r7")


def test_binary_and_mixed_responses_decode_with_tritonclient() -> None:
    body, headers = encode_infer_response(
        "m", None, request_with(None, binary_data_output=True), OUT
    )
    assert headers["Content-Type"] == "application/octet-stream"
    result = results(body, headers)
    for name, array in OUT.items():
        np.testing.assert_array_equal(result.as_numpy(name), array)
    assert "model_version" not in result.get_response()

    wanted = (RequestedOutput("label", True), RequestedOutput("y", False))
    body, headers = encode_infer_response("m", "2", request_with(wanted), OUT, {"exit": 1})
    result = results(body, headers)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "y"]
    assert result.get_response()["parameters"] == {"exit": 1}
    np.testing.assert_array_equal(result.as_numpy("label"), OUT["label"])
    np.testing.assert_array_equal(result.as_numpy("y"), OUT["y"])


def test_only_requested_outputs_are_sent() -> None:
    body, headers = encode_infer_response(
        "m", "1", request_with((RequestedOutput("y", True),)), OUT
    )
    result = results(body, headers)
    assert result.as_numpy("label") is None
    np.testing.assert_array_equal(result.as_numpy("y"), OUT["y"])


def test_response_errors() -> None:
    binary_bytes = {"label": np.array([b"\xff"], dtype=object)}
    json_request = request_with((RequestedOutput("label", False),))
    with pytest.raises(InvalidInput, match=r"^outputs\.label: .*binary_data"):
        encode_infer_response("m", "1", json_request, binary_bytes)
    body, headers = encode_infer_response(
        "m", "1", request_with(None, binary_data_output=True), binary_bytes
    )
    np.testing.assert_array_equal(results(body, headers).as_numpy("label"), binary_bytes["label"])
    with pytest.raises(WorldmeshError, match="'label'") as info:
        encode_infer_response("m", "1", json_request, {"y": OUT["y"]})
    assert info.value.status == 500
    with pytest.raises(WorldmeshError, match="complex64") as info:
        encode_infer_response("m", "1", request_with(None), {"y": np.zeros(2, np.complex64)})
    assert info.value.status == 500


def test_metadata_objects() -> None:
    assert model_metadata("m", ["1"], "pytorch_torchscript", INPUTS, OUTPUTS) == {
        "name": "m",
        "versions": ["1"],
        "platform": "pytorch_torchscript",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "mask", "datatype": "INT64", "shape": [-1, 3]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }
    assert server_metadata("worldmesh", "0.1.0", ("binary_tensor_data",)) == {
        "name": "worldmesh",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    with pytest.raises(ValueError, match="BF16"):
        TensorSpec("t", "BF16", (-1,))
