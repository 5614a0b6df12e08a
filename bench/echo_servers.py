"""The transports' floors: servers that answer every infer request with a fixed answer.

The same stacks the worker serves on (aiohttp for REST, ``grpc.aio`` for gRPC), in one
process, with no decoding, batching or model: what a request costs before any serving
work. The protocol bench measures them beside the worker and KServe.

    python echo_servers.py HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import numpy as np
from aiohttp import web

from worldmesh_worker.models.toy import reference
from worldmesh_worker.oip import grpc_predict_v2_pb2 as pb
from worldmesh_worker.oip import grpc_predict_v2_pb2_grpc as pb_grpc

X = np.arange(16, dtype=np.float32).reshape(1, 16) % 7 - 3  # the bench's gRPC input
Y = reference(X).astype(np.float32)


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request, context):
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="y", datatype="FP32", shape=[1, 4])
        response.raw_output_contents.append(Y.tobytes())
        return response


ANSWERS: dict[tuple[float, ...], list[float]] = {}  # the bench's REST inputs: 7 of them


async def rest_echo(request: web.Request) -> web.Response:
    doc = json.loads(await request.read())  # parsed: the client checks the id it sent
    data = tuple(doc["inputs"][0]["data"])
    if data not in ANSWERS:
        ANSWERS[data] = reference(np.asarray(data).reshape(1, 16)).ravel().tolist()
    y = {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": ANSWERS[data]}
    return web.json_response({"id": doc.get("id"), "outputs": [y]})


async def main(http_port: int, grpc_port: int) -> None:
    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", rest_echo)
    app.router.add_get("/v2/health/ready", lambda _: web.json_response({"ready": True}))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
