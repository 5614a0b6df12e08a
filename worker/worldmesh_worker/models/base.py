"""The contract between a model and the stage server, and the block pipeline behind it.

Covers:
- ``PipelineModel``: what the stage server calls (``preprocess``, ``stage``,
  ``full``, ``postprocess``, the OIP ``inputs``/``outputs`` specs).
- ``validate_split``: split points must be integers, strictly increasing and
  within ``1..num_blocks-1``; anything else is a ``ValueError`` naming the problem.
- ``BlockPipeline``: a model given as an ordered list of blocks, each a module
  whose ``forward(*tensors)`` returns a tuple of batch-first tensors. Stage ``i``
  of split ``[s_1, ..., s_k]`` runs blocks ``[s_i, s_{i+1})`` with ``s_0 = 0`` and
  ``s_{k+1} = num_blocks``; ``full()`` runs them all, so chaining the stages is
  the same computation as ``full()``.
- ``activation_specs(point)``: the (name, dtype, per-row shape) of the tensors
  that cross a split point, found by running one example row, so a receiver can
  size its buffers and a sender can check what it sends.

Parameters never require grad and every module is returned in eval mode, so a
caller that forgets ``torch.inference_mode()`` still builds no autograd graph
and sees no dropout.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from worldmesh_worker.errors import InvalidInput
from worldmesh_worker.protocol import TensorSpec

#: OIP datatype of each torch dtype allowed between stages.
TORCH_TO_OIP: dict[torch.dtype, str] = {
    torch.float32: "FP32",
    torch.int64: "INT64",
    torch.bool: "BOOL",
}


class ModelInputError(InvalidInput, ValueError):
    """A request's inputs do not fit the model (HTTP 400); the message names the input."""


@runtime_checkable
class PipelineModel(Protocol):
    """A model the stage server can split into stages (see module docstring)."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    num_blocks: int

    def preprocess(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]: ...

    def stage(self, split_points: Sequence[int], index: int) -> nn.Module: ...

    def full(self) -> nn.Module: ...

    def postprocess(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]: ...


def validate_split(model: PipelineModel, split_points: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``split_points`` is a valid split of ``model``.

    An empty split is valid (one stage runs the whole model).
    """
    points = list(split_points)
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int | np.integer):
            raise ValueError(f"split point {p!r} of model {model.name!r} is not an integer")
    for a, b in itertools.pairwise(points):
        if b <= a:
            raise ValueError(
                f"split points {points} of model {model.name!r} are not strictly increasing "
                f"({a} then {b})"
            )
    for p in points:
        if not 1 <= p <= model.num_blocks - 1:
            raise ValueError(
                f"split point {p} of model {model.name!r} is out of range: valid points are "
                f"1..{model.num_blocks - 1} ({model.num_blocks} blocks)"
            )


def stage_bounds(model: PipelineModel, split_points: Sequence[int], index: int) -> tuple[int, int]:
    """Return ``(first block, end block)`` of stage ``index``; ``ValueError`` if invalid."""
    validate_split(model, split_points)
    n_stages = len(split_points) + 1
    if isinstance(index, bool) or not 0 <= index < n_stages:
        raise ValueError(
            f"stage index {index!r} of model {model.name!r} is out of range: "
            f"split {list(split_points)} has stages 0..{n_stages - 1}"
        )
    bounds = [0, *(int(p) for p in split_points), model.num_blocks]
    return bounds[index], bounds[index + 1]


class Stage(nn.Module):
    """Runs a contiguous run of blocks, passing each block's tuple to the next.

    With ``channels_last``, 4-D inputs are converted to channels-last memory
    order on entry (convolutions on CPU run about twice as fast so) and 4-D
    outputs are made contiguous again on exit, so what a stage returns is
    always plain contiguous NCHW, ready to send or concatenate.
    """

    def __init__(self, blocks: Sequence[nn.Module], channels_last: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.channels_last = channels_last

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(tensors)

    def run(
        self,
        tensors: tuple[torch.Tensor, ...],
        taps: dict[int, Callable[[tuple[torch.Tensor, ...]], None]] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """``forward``, calling ``taps[i](outputs)`` right after the stage's ``i``-th block
        (how early-exit ramps read intermediate activations without a second pass)."""
        if self.channels_last:
            tensors = tuple(
                t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
                for t in tensors
            )
        for i, block in enumerate(self.blocks):
            tensors = block(*tensors)
            if taps and i in taps:
                taps[i](tensors)
        if self.channels_last:
            tensors = tuple(t.contiguous() for t in tensors)
        return tuple(tensors)


def frozen(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no parameter requiring grad; return it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class BlockPipeline:
    """Implements ``stage``/``full`` for a model given as a list of blocks.

    Subclasses set ``name``, ``inputs``, ``outputs``, ``_blocks`` and
    ``_activation_names`` (the names of the tensors that cross any split
    point, in tuple order) and implement ``preprocess``, ``postprocess`` and ``example_inputs``.
    """

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    _blocks: list[nn.Module]
    _activation_names: tuple[str, ...]
    #: Run stages in channels-last memory order (see ``Stage``).
    _channels_last: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def blocks(self) -> list[nn.Module]:
        """All blocks in order; block ``i``'s output is what crosses split point ``i + 1``."""
        return list(self._blocks)

    def stage(self, split_points: Sequence[int], index: int) -> nn.Module:
        first, end = stage_bounds(self, split_points, index)
        return frozen(Stage(self._blocks[first:end], self._channels_last))

    def full(self) -> nn.Module:
        return frozen(Stage(self._blocks, self._channels_last))

    def example_inputs(self) -> dict[str, np.ndarray]:
        """One request of one row, valid for ``preprocess``."""
        raise NotImplementedError

    def activation_specs(self, point: int) -> list[TensorSpec]:
        """The tensors that cross split point ``point`` (shape ``-1`` = rows)."""
        validate_split(self, [point])
        with torch.inference_mode():
            tensors = self.preprocess(self.example_inputs())
            tensors = Stage(self._blocks[:point], self._channels_last)(*tensors)
        specs = []
        for name, t in zip(self._activation_names, tensors, strict=True):
            if t.dtype not in TORCH_TO_OIP:
                raise TypeError(f"{self.name}: activation {name!r} has dtype {t.dtype}")
            specs.append(TensorSpec(name, TORCH_TO_OIP[t.dtype], (-1, *t.shape[1:])))
        return specs

    def preprocess(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def postprocess(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def require_input(
    inputs: dict[str, np.ndarray], spec: TensorSpec, dtypes: Sequence[type]
) -> np.ndarray:
    """Return ``inputs[spec.name]`` checked against ``spec``'s shape and the allowed dtypes.

    Raises ``ModelInputError`` (a ``ValueError``) naming the input and what is wrong.
    """
    if spec.name not in inputs:
        raise ModelInputError(f"inputs: missing input {spec.name!r}; got {sorted(inputs)}")
    array = np.asarray(inputs[spec.name])
    if not any(np.issubdtype(array.dtype, d) for d in dtypes):
        raise ModelInputError(
            f"inputs.{spec.name}.datatype: numpy dtype {array.dtype} does not fit {spec.datatype}"
        )
    shape = tuple(spec.shape)
    if array.ndim != len(shape) or any(
        want != -1 and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        raise ModelInputError(
            f"inputs.{spec.name}.shape: expected {list(shape)}, got {list(array.shape)}"
        )
    return array


def classifier_outputs(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """``logits``/``label``/``probabilities`` arrays of a batch of classifier logits."""
    logits = logits.detach().to(torch.float32)
    return {
        "logits": logits.numpy().copy(),
        "label": logits.argmax(dim=1).to(torch.int64).numpy().copy(),
        "probabilities": torch.softmax(logits, dim=1).numpy().copy(),
    }
