"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on ``ports.grpc``.

Every stage serves liveness, readiness and metadata; the front stage serves ModelInfer.
A request goes through the same path as REST below the transport: it is turned into the
protocol's JSON form with its tensors as binary data (``protocol.decode_infer_doc``
validates both alike, and names the field at fault), then ``Front.serve`` (batching,
early exits, resends, metrics). Inputs come as typed ``contents`` or as
``raw_input_contents`` (one entry per input, never both); outputs go back as
``raw_output_contents`` when the request sent raw inputs or asked ``binary_data`` for an
output (as tritonclient does), else as typed contents. The response echoes ``id`` and
holds the requested outputs only (all without a list).

Errors: each data-plane error answers the gRPC status code of its type (``errors.py``)
with the same message REST gives; a message over ``limits.maxRequestBytes`` is refused
by gRPC itself (RESOURCE_EXHAUSTED). A client's deadline or cancel cancels the handler,
which gives up the request's rows as a REST client's disconnect does.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

import grpc
import numpy as np

from . import __version__
from ._tensor_codec import datatype_of, to_binary
from .errors import InternalError, InvalidInput, ModelNotFound, WorldmeshError
from .oip import grpc_predict_v2_pb2 as pb
from .oip import grpc_predict_v2_pb2_grpc as pb_grpc
from .protocol import decode_infer_doc
from .stage import Stage

log = logging.getLogger(__name__)
MODEL_VERSION = "1"

# The typed contents field of each datatype, and the numpy dtype it holds on the wire.
_CONTENTS = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int8),
    "INT16": ("int_contents", np.int16),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint8),
    "UINT16": ("uint_contents", np.uint16),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", None),
}
_LENGTH = struct.Struct("<I")


def _parameter(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _parameters(params: Any, path: str) -> dict[str, Any]:
    return {key: _parameter(value) for key, value in params.items()}


def _typed(tensor: Any, path: str) -> bytes:
    """An input's typed contents as the protocol's binary form (little endian; BYTES
    elements length-prefixed), so that one decoder checks both."""
    datatype = tensor.datatype
    if datatype not in _CONTENTS:
        # FP16 and the like have no typed field: an unknown one is named by the decoder
        if datatype in ("FP16", "BF16"):
            raise InvalidInput(f"{path}.contents: {datatype} travels as raw_input_contents only")
        return b""
    field, dtype = _CONTENTS[datatype]
    for other, _ in set(_CONTENTS.values()):
        if other != field and len(getattr(tensor.contents, other)):
            raise InvalidInput(f"{path}.contents.{other}: a {datatype} input takes {field}")
    values = getattr(tensor.contents, field)
    if dtype is None:
        return b"".join(_LENGTH.pack(len(item)) + item for item in values)
    array = np.asarray(values)
    if array.size and np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"{path}.contents.{field}: a value is out of range for {datatype}")
    return np.asarray(values, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def infer_doc(request: pb.ModelInferRequest) -> tuple[dict[str, Any], memoryview, bool]:
    """The request in the protocol's JSON form, its binary data, and whether the answer
    should be raw (binary) too."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs"
        )
    inputs, blobs = [], []
    for i, tensor in enumerate(request.inputs):
        path = f"inputs[{i}]"
        params = _parameters(tensor.parameters, f"{path}.parameters")
        # kserve's client sends the raw entry's size too, as over REST: it must agree
        size = params.pop("binary_data_size", None)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"{path}.contents: not with raw_input_contents")
            blob = raw[i]
            if size is not None and size != len(blob):
                raise InvalidInput(
                    f"{path}.parameters.binary_data_size: {size!r}, but its raw_input_contents "
                    f"entry holds {len(blob)} bytes"
                )
        else:
            if size is not None:
                raise InvalidInput(
                    f"{path}.parameters.binary_data_size: given without raw_input_contents"
                )
            blob = _typed(tensor, path)
        blobs.append(blob)
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {**params, "binary_data_size": len(blob)},
            }
        )
    outputs = []
    binary = bool(raw)
    for k, wanted in enumerate(request.outputs):
        params = _parameters(wanted.parameters, f"outputs[{k}].parameters")
        binary = binary or params.get("binary_data") is True
        outputs.append({"name": wanted.name, "parameters": params})
    doc: dict[str, Any] = {
        "inputs": inputs,
        "outputs": outputs,
        "parameters": _parameters(request.parameters, "parameters"),
    }
    if request.id:
        doc["id"] = request.id
    return doc, memoryview(b"".join(blobs)), binary


def _set(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.name = stage.config.deployment

    def _check_model(self, name: str, version: str) -> None:
        if name != self.name:
            raise ModelNotFound(f"model {name!r} is not served here (this serves {self.name!r})")
        if version and version != MODEL_VERSION:
            raise ModelNotFound(f"model {name!r} has no version {version!r} (only {MODEL_VERSION})")

    def _ready(self) -> bool:
        return not self.stage.draining and self.stage.accepting

    async def _abort(self, context: grpc.aio.ServicerContext, exc: WorldmeshError) -> None:
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self._check_model(request.name, request.version)
        except ModelNotFound as exc:
            await self._abort(context, exc)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="worldmesh", version=__version__, extensions=["binary_tensor_data"]
        )

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        try:
            self._check_model(request.name, request.version)
        except ModelNotFound as exc:
            await self._abort(context, exc)
        model = self.stage.model

        def tensors(specs: Any) -> list[pb.ModelMetadataResponse.TensorMetadata]:
            return [
                pb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=s.datatype, shape=list(s.shape)
                )
                for s in specs
            ]

        return pb.ModelMetadataResponse(
            name=self.name,
            versions=[MODEL_VERSION],
            platform="pytorch",
            inputs=tensors(model.inputs),
            outputs=tensors(model.outputs),
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        start = time.perf_counter()
        code = 500
        try:
            response = await self._infer(request)
            code = 200
            return response
        except WorldmeshError as exc:
            code = exc.status
            await self._abort(context, exc)
        except Exception:
            log.exception("unexpected error serving gRPC ModelInfer")
            await self._abort(context, InternalError("internal error (logged by the worker)"))
        finally:
            self.stage.metrics.request(code)
            if code == 200:
                self.stage.metrics.request_duration.observe(time.perf_counter() - start)
        raise AssertionError("unreachable: abort raises")

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        self._check_model(request.model_name, request.model_version)
        front = self.stage.front
        if front is None:
            raise ModelNotFound(
                f"this worker runs stage {self.stage.config.stage}; send requests to stage 0"
            )
        model = self.stage.model
        doc, binary, raw = infer_doc(request)
        req = decode_infer_doc(doc, binary, model.inputs, model.outputs)
        outputs, params = await front.serve(req)
        response = pb.ModelInferResponse(model_name=self.name, model_version=MODEL_VERSION)
        if req.id is not None:
            response.id = req.id
        for key, value in params.items():
            _set(response.parameters[key], value)
        names = [o.name for o in req.outputs] if req.outputs is not None else list(outputs)
        for name in names:
            array = np.asarray(outputs[name])
            tensor = response.outputs.add(name=name, shape=list(array.shape))
            tensor.datatype = datatype_of(array, name)
            if raw:
                response.raw_output_contents.append(to_binary(array, tensor.datatype, name))
            else:
                _fill(tensor.contents, array, tensor.datatype)
        return response


def _fill(contents: Any, array: np.ndarray[Any, Any], datatype: str) -> None:
    field, _ = _CONTENTS[datatype]
    flat = array.reshape(-1)
    if datatype == "BYTES":
        getattr(contents, field).extend(
            x if isinstance(x, bytes) else str(x).encode() for x in flat.tolist()
        )
    else:
        getattr(contents, field).extend(flat.tolist())


async def start(stage: Stage, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Serve the service on ``host:port`` (0: any free port); the server and its port."""
    limit = stage.config.limits.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 64 << 20)),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(stage), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC port {host}:{port} could not be bound")
    await server.start()
    return server, bound
