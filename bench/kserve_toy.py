"""The ``toy`` model on KServe's own model server: the protocol bench's baseline.

Runs under the KServe environment (``make kserve``: ``kserve`` from PyPI, no torch, no
worldmesh), so it takes the toy model's weights from a ``.npz`` file the bench writes
(``toy_weights()``) and computes the same MLP in numpy: ``x [N, 16]`` -> ``y [N, 4]`` and
``label [N]``, exact for the bench's small integer inputs, as in the worker.

    python kserve_toy.py WEIGHTS.npz --model_name proto --http_port P --grpc_port G
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve import model_server as kserve_args


class Toy(Model):
    def __init__(self, name: str, weights: str) -> None:
        super().__init__(name)
        stored = np.load(weights)
        count = len(stored.files) // 2
        self.layers = [(stored[f"w{i}"], stored[f"b{i}"]) for i in range(count)]
        self.ready = True

    def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
        h = payload.inputs[0].as_numpy().astype(np.float64)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        y = h.astype(np.float32)
        label = np.argmax(y, axis=1).astype(np.int64)
        binary = payload.from_grpc
        outputs = []
        for name, value in (("y", y), ("label", label)):
            datatype = "FP32" if value.dtype == np.float32 else "INT64"
            output = InferOutput(name=name, shape=list(value.shape), datatype=datatype)
            output.set_data_from_numpy(value, binary_data=binary)
            outputs.append(output)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=binary,
        )


def main() -> None:
    parser = argparse.ArgumentParser(parents=[kserve_args.parser])
    parser.add_argument("weights", help="the toy model's weights (.npz: w0, b0, w1, b1, ...)")
    args, _ = parser.parse_known_args()
    model = Toy(args.model_name, args.weights)
    server = ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_latency_logging=False,
    )
    # A line per request costs KServe a good part of its throughput here, and the worker
    # logs none: measure serving, not logging.
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    sys.exit(main())
