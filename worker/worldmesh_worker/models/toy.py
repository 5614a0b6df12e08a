"""A tiny deterministic MLP for serving tests: torch only, no cache, no data.

Covers:
- ``x`` FP32 ``[N, 16]`` -> 4 blocks (16->32 ReLU, 32->32 ReLU, 32->32 ReLU,
  32->4) -> ``y`` FP32 ``[N, 4]`` and ``label`` INT64 ``[N]`` (argmax, first index
  on ties). Between stages travels one FP32 ``activation [N, 32]``.
- Weights are integers in {-1, 0, 1} and biases in -2..2 drawn from a fixed
  seed, the same in every process. So for integer inputs with ``|x| <= 10``
  every intermediate value is an integer below 2**24 and every answer is
  exact in float32, whatever the batching or split; ``reference(x)`` computes
  it in float64 numpy for tests to check each answer.
- ``block_delay_s``: each block sleeps that long (the ``toy-slow`` model, for
  tests of batching, scaling and in-flight failures).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch
from torch import nn

from worldmesh_worker.models.base import BlockPipeline, frozen, require_input
from worldmesh_worker.protocol import TensorSpec
from worldmesh_worker.settings import TOY_BLOCK_DELAY

NAME = "toy"
SEED = 1234
WIDTHS = (16, 32, 32, 32, 4)
#: Environment variable with the per-block delay of ``toy-slow`` in seconds.
DELAY_ENV = TOY_BLOCK_DELAY


def toy_weights() -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(weight [out, in], bias [out])`` of each layer, as float64 integers."""
    rng = np.random.default_rng(SEED)
    return [
        (
            rng.integers(-1, 2, size=(n_out, n_in)).astype(np.float64),
            rng.integers(-2, 3, size=n_out).astype(np.float64),
        )
        for n_in, n_out in itertools.pairwise(WIDTHS)
    ]


def reference(x: np.ndarray) -> np.ndarray:
    """``y`` for rows ``x [N, 16]``, in float64 numpy (exact for small integer inputs)."""
    h = np.asarray(x, dtype=np.float64)
    layers = toy_weights()
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


class _Block(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray, relu: bool, delay_s: float) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(weight))
            self.linear.bias.copy_(torch.from_numpy(bias))
        self.relu = relu
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        y = self.linear(x)
        return (torch.relu(y) if self.relu else y,)


class ToyModel(BlockPipeline):
    """See the module docstring."""

    def __init__(self, block_delay_s: float = 0.0, name: str = NAME) -> None:
        if block_delay_s < 0:
            raise ValueError(f"block_delay_s must be >= 0, got {block_delay_s}")
        self.name = name
        self.block_delay_s = block_delay_s
        self.inputs = [TensorSpec("x", "FP32", (-1, WIDTHS[0]))]
        self.outputs = [
            TensorSpec("y", "FP32", (-1, WIDTHS[-1])),
            TensorSpec("label", "INT64", (-1,)),
        ]
        layers = toy_weights()
        self._blocks = [
            frozen(_Block(w, b, relu=i < len(layers) - 1, delay_s=block_delay_s))
            for i, (w, b) in enumerate(layers)
        ]
        self._activation_names = ("activation",)

    def example_inputs(self) -> dict[str, np.ndarray]:
        return {"x": np.zeros((1, WIDTHS[0]), dtype=np.float32)}

    def preprocess(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        x = require_input(inputs, self.inputs[0], (np.floating, np.integer))
        return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),)

    def postprocess(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        y = outputs[0].detach().to(torch.float32)
        return {
            "y": y.numpy().copy(),
            "label": y.argmax(dim=1).to(torch.int64).numpy().copy(),
        }
