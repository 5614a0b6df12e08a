"""Drives a worker with kserve's own ``InferenceGRPCClient``; prints what it saw as JSON.

Runs under KServe's environment (``make kserve``): its pins differ from worldmesh's, and
its generated messages would clash with tritonclient's in the test process.

    python kserve_client.py TARGET MODEL INPUTS_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput


def outputs(response) -> dict:
    return {
        o.name: {"shape": list(o.shape), "datatype": o.datatype, "data": o.as_numpy().tolist()}
        for o in response.outputs
    }


async def code_of(call) -> list[str]:
    try:
        await call
    except grpc.RpcError as exc:
        return [exc.code().name, exc.details()]
    return ["OK", ""]


async def main(target: str, model: str, rows: list[list[float]]) -> dict:
    x = np.asarray(rows, dtype=np.float32)
    seen: dict = {}
    async with InferenceGRPCClient(target, retries=0) as client:
        seen["live"] = await client.is_server_live()
        seen["ready"] = await client.is_server_ready()
        seen["model_ready"] = await client.is_model_ready(model)

        raw = InferInput("x", list(x.shape), "FP32")
        raw.set_data_from_numpy(x, binary_data=True)
        response = await client.infer(InferRequest(model, [raw], request_id="raw-1"))
        seen["raw"] = {"id": response.id, "outputs": outputs(response)}

        typed = InferInput("x", list(x.shape), "FP32", data=x.ravel().tolist())
        request = InferRequest(
            model, [typed], request_id="typed-2", request_outputs=[RequestedOutput("label")]
        )
        response = await client.infer(request)
        seen["typed"] = {"id": response.id, "outputs": outputs(response)}

        unknown = InferInput("nope", list(x.shape), "FP32", data=x.ravel().tolist())
        wrong = InferInput("x", list(x.shape), "INT32", data=x.astype(np.int32).ravel().tolist())
        seen["errors"] = {
            "unknown input": await code_of(client.infer(InferRequest(model, [unknown]))),
            "wrong datatype": await code_of(client.infer(InferRequest(model, [wrong]))),
            "unknown model": await code_of(client.infer(InferRequest("nope", [typed]))),
        }
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
