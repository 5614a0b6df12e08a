"""The KServe v2 / Open Inference Protocol REST messages, without any transport.

Follows https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol and
Triton's binary tensor data extension. Behaviours:
- ``decode_infer_request`` parses the JSON body, or, when the ``Inference-Header-Content-Length``
  header is present (looked up case-insensitively), the JSON header followed by each binary
  input's bytes in input order. No Content-Type is required: tritonclient sends none.
- It validates against the model's ``TensorSpec``s and raises ``InvalidInput`` naming the
  field: malformed or too deeply nested JSON, a body that is not an object, ``id`` not a
  string, ``parameters`` not an object, missing/unknown/duplicate inputs, a datatype that is
  not OIP's (BF16 is refused) or not the model's, a shape that is not a list of non-negative
  integers or differs from the spec where the spec is not -1, batch sizes (dim 0 where the
  spec says -1) that differ between inputs, data whose element count or nesting does not fit
  the shape, elements of the wrong type or out of an integer dtype's range, a
  ``binary_data_size`` that does not match the shape or the body, binary bytes no input
  claims, shared memory, unknown or duplicate requested outputs, classification.
- Inputs come back in the order of the model's input specs, as numpy arrays of their shape
  (BYTES: object arrays of ``bytes``). An empty ``outputs`` list means all outputs.
- ``encode_infer_response`` returns the requested outputs in the requested order (all of
  ``outputs`` otherwise), echoes the request id, and sends an output as binary data when it
  asked ``binary_data: true`` or, failing a per-output choice, when the request set
  ``parameters.binary_data_output``. Binary responses carry ``Inference-Header-Content-Length``
  and ``application/octet-stream``; all-JSON responses ``application/json``.
- ``model_metadata`` and ``server_metadata`` build the metadata response objects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worldmesh_worker._tensor_codec import (
    DTYPES,
    check_datatype,
    datatype_of,
    from_binary,
    from_json,
    kind,
    to_binary,
    to_json,
)
from worldmesh_worker.errors import InvalidInput, WorldmeshError

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: dim -1 takes any size; dim 0 is the batch dim (-1)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DTYPES:
            raise ValueError(f"TensorSpec {self.name!r}: unsupported datatype {self.datatype!r}")


@dataclass(frozen=True, slots=True, eq=False)
class InferInput:
    """One decoded input; ``data`` has ``shape`` and the datatype's numpy dtype."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary_data: bool


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    inputs: tuple[InferInput, ...]
    outputs: tuple[RequestedOutput, ...] | None
    parameters: dict[str, Any] = field(default_factory=dict)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _object(value: object, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{path}: expected an object, got {kind(value)}")
    return value


def _name(raw: object, path: str) -> tuple[dict[str, Any], str]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"{path}: expected an object, got {kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"{path}.name: expected a string, got {kind(name)}")
    return raw, name


def _shape(value: object, spec: TensorSpec, path: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise InvalidInput(f"{path}: expected a list of non-negative integers, got {kind(value)}")
    for j, dim in enumerate(value):
        if type(dim) is not int:
            raise InvalidInput(f"{path}[{j}]: expected a non-negative integer, got {kind(dim)}")
        if dim < 0:
            raise InvalidInput(f"{path}[{j}]: dimension must be non-negative, got {dim}")
    if len(value) != len(spec.shape):
        raise InvalidInput(
            f"{path}: input {spec.name!r} has {len(spec.shape)} dimensions "
            f"{list(spec.shape)}, got {len(value)}"
        )
    for j, (dim, want) in enumerate(zip(value, spec.shape, strict=True)):
        if want != -1 and dim != want:
            raise InvalidInput(f"{path}[{j}]: input {spec.name!r} needs {want}, got {dim}")
    return tuple(value)


def _body(body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], memoryview | None]:
    """The JSON object and the binary bytes after it (None without the extension's header)."""
    raw = _header(headers, HEADER_LENGTH)
    length = len(body)
    if raw is not None:
        text = raw.strip()
        if not (text.isascii() and text.isdigit()):
            raise InvalidInput(f"{HEADER_LENGTH}: expected a non-negative integer, got {raw!r}")
        length = int(text)
        if length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {length} exceeds the {len(body)}-byte body")
    try:
        doc = json.loads(body[:length])
    except RecursionError:
        raise InvalidInput("body: JSON is nested too deeply") from None
    except ValueError as exc:
        raise InvalidInput(f"body: malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"body: expected a JSON object, got {kind(doc)}")
    return doc, None if raw is None else memoryview(body)[length:]


def _input(
    raw: dict[str, Any],
    spec: TensorSpec,
    path: str,
    binary: memoryview | None,
    offset: int,
    max_depth: int,
) -> tuple[InferInput, int]:
    """Input ``path`` and the offset of the next input's binary data."""
    datatype = check_datatype(raw.get("datatype"), f"{path}.datatype")
    if datatype != spec.datatype:
        raise InvalidInput(
            f"{path}.datatype: input {spec.name!r} takes {spec.datatype}, got {datatype}"
        )
    shape = _shape(raw.get("shape"), spec, f"{path}.shape")
    params = _object(raw.get("parameters"), f"{path}.parameters")
    if "shared_memory_region" in params:
        raise InvalidInput(
            f"{path}.parameters.shared_memory_region: shared memory is not supported"
        )
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise InvalidInput(f"{path}.data: missing (and no binary_data_size)")
        data = from_json(raw["data"], datatype, shape, f"{path}.data", max_depth)
        return InferInput(spec.name, datatype, shape, data), offset
    where = f"{path}.parameters.binary_data_size"
    if type(size) is not int or size < 0:
        raise InvalidInput(f"{where}: expected a non-negative integer, got {size!r}")
    if "data" in raw:
        raise InvalidInput(f"{path}.data: must be absent when binary_data_size is given")
    if binary is None:
        raise InvalidInput(f"{where}: given, but the request has no {HEADER_LENGTH} header")
    if offset + size > len(binary):
        raise InvalidInput(f"{where}: {size} bytes claimed, but only {len(binary) - offset} remain")
    data = from_binary(binary[offset : offset + size], datatype, shape, path)
    return InferInput(spec.name, datatype, shape, data), offset + size


def decode_infer_request(
    body: bytes,
    headers: Mapping[str, str],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_depth: int = 8,
) -> InferRequest:
    """Parse and validate an inference request; raises ``InvalidInput`` naming the field."""
    doc, binary = _body(body, headers)
    return decode_infer_doc(doc, binary, inputs, outputs, max_depth=max_depth)


def decode_infer_doc(
    doc: dict[str, Any],
    binary: memoryview | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_depth: int = 8,
) -> InferRequest:
    """Validate a request already parsed into its JSON form, with the binary data after it
    (``binary_data_size`` inputs take theirs in input order); every transport ends here."""
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"id: expected a string, got {kind(request_id)}")
    parameters = _object(doc.get("parameters"), "parameters")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidInput(
            f"parameters.binary_data_output: expected a boolean, got {kind(binary_output)}"
        )
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput(f"inputs: expected a list, got {kind(raw_inputs)}")

    specs = {spec.name: spec for spec in inputs}
    decoded: dict[str, tuple[int, InferInput]] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        path = f"inputs[{i}]"
        raw, name = _name(item, path)
        if name not in specs:
            raise InvalidInput(
                f"{path}.name: unknown input {name!r}; the model takes {list(specs)}"
            )
        if name in decoded:
            raise InvalidInput(f"{path}.name: duplicate input {name!r}")
        tensor, offset = _input(raw, specs[name], path, binary, offset, max_depth)
        decoded[name] = (i, tensor)
    if binary is not None and offset != len(binary):
        raise InvalidInput(f"body: {len(binary) - offset} bytes of binary data belong to no input")
    missing = [name for name in specs if name not in decoded]
    if missing:
        raise InvalidInput(f"inputs: missing input {missing[0]!r}; the model takes {list(specs)}")

    batch: tuple[int, int] | None = None
    for spec in inputs:
        i, given = decoded[spec.name]
        if spec.shape and spec.shape[0] == -1:
            if batch is None:
                batch = (i, given.shape[0])
            elif given.shape[0] != batch[1]:
                raise InvalidInput(
                    f"inputs[{i}].shape[0]: batch size {given.shape[0]} differs from "
                    f"inputs[{batch[0]}]'s {batch[1]}"
                )
    return InferRequest(
        id=request_id,
        inputs=tuple(decoded[spec.name][1] for spec in inputs),
        outputs=_requested(doc.get("outputs"), outputs, binary_output),
        parameters=parameters,
    )


def _requested(
    value: object, specs: Sequence[TensorSpec], default_binary: bool
) -> tuple[RequestedOutput, ...] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"outputs: expected a list, got {kind(value)}")
    known = [spec.name for spec in specs]
    requested: list[RequestedOutput] = []
    for k, item in enumerate(value):
        path = f"outputs[{k}]"
        raw, name = _name(item, path)
        if name not in known:
            raise InvalidInput(f"{path}.name: unknown output {name!r}; the model produces {known}")
        if any(r.name == name for r in requested):
            raise InvalidInput(f"{path}.name: duplicate output {name!r}")
        params = _object(raw.get("parameters"), f"{path}.parameters")
        binary = params.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise InvalidInput(
                f"{path}.parameters.binary_data: expected a boolean, got {kind(binary)}"
            )
        if params.get("classification", 0) != 0:
            raise InvalidInput(f"{path}.parameters.classification: not supported")
        if "shared_memory_region" in params:
            raise InvalidInput(
                f"{path}.parameters.shared_memory_region: shared memory is not supported"
            )
        requested.append(RequestedOutput(name, binary))
    return tuple(requested)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request: InferRequest,
    outputs: Mapping[str, np.ndarray[Any, Any]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (Content-Type, and the binary header length)."""
    if request.outputs is not None:
        wanted = request.outputs
    else:
        binary = request.parameters.get("binary_data_output") is True
        wanted = tuple(RequestedOutput(name, binary) for name in outputs)
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = parameters
    items: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in wanted:
        if want.name not in outputs:
            raise WorldmeshError(f"output {want.name!r}: the model produced no such output")
        array = np.asarray(outputs[want.name])
        datatype = datatype_of(array, want.name)
        item: dict[str, Any] = {"name": want.name, "datatype": datatype, "shape": list(array.shape)}
        if want.binary_data:
            blobs.append(to_binary(array, datatype, want.name))
            item["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            item["data"] = to_json(array, datatype, want.name)
        items.append(item)
    doc["outputs"] = items
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not any(want.binary_data for want in wanted):
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> dict[str, Any]:
    """The ``GET v2/models/{name}`` response object."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [_tensor_metadata(spec) for spec in inputs],
        "outputs": [_tensor_metadata(spec) for spec in outputs],
    }


def server_metadata(name: str, version: str, extensions: Sequence[str]) -> dict[str, Any]:
    """The ``GET v2`` response object."""
    return {"name": name, "version": version, "extensions": list(extensions)}
