"""A sentence-transformers encoder with a Rotten Tomatoes sentiment head, as blocks.

What MiniLM-L6 (BERT, 6 layers) and MPNet-base (12 layers) share; each model's module
gives its ``Encoder`` spec (name, widths, where its files come from).

Covers:
- Blocks: 0 = embeddings; 1..L = the encoder's layers 0..L-1; L+1 = sentence embedding
  (mean over unmasked tokens, L2-normalised, as sentence-transformers does for these
  models) and the 2-class linear head. Split point ``p`` in 1..L+1 cuts before encoder
  layer ``p - 1`` (``p = L+1``: before pooling).
- Between stages travel ``hidden`` FP32 ``[N, T, H]`` and ``attention_mask`` INT64
  ``[N, T]``; each layer block rebuilds the additive attention mask with the same
  ``create_bidirectional_mask`` the library's forward uses (and, for MPNet, the relative
  position bias its encoder computes once and gives every layer), so chaining the blocks
  equals the library's forward.
- ``preprocess``: ``text`` BYTES ``[N]`` (UTF-8) -> token ids and mask padded or
  truncated to the spec's ``max_tokens``. The tokenizer is guarded by a lock: the Rust
  tokenizer raises "Already borrowed" if two threads share it.
- ``postprocess``: ``logits``, ``label`` (0 fresh, 1 rotten), ``probabilities``.
- ``prepare_head``: train the head on frozen sentence embeddings of the train split and
  score it on the test split, with progress shown.

``HF_HUB_OFFLINE=1`` is set before loading, so nothing is fetched.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from worldmesh_worker.data import ROTTEN_TOMATOES_CLASSES, rotten_tomatoes
from worldmesh_worker.models.base import (
    BlockPipeline,
    ModelInputError,
    classifier_outputs,
    frozen,
    require_input,
)
from worldmesh_worker.models.heads import HeadInfo, load_head, record_head
from worldmesh_worker.models.heads import train_linear_head as _train
from worldmesh_worker.protocol import TensorSpec

CLASSES = ROTTEN_TOMATOES_CLASSES
SEED = 0


@dataclass(frozen=True)
class Encoder:
    """One sentence encoder: its name, sizes, head recipe, and where its files are."""

    name: str
    hidden: int
    layers: int
    max_tokens: int
    recipe: int
    model_dir: Callable[[], str]  #: a Hugging Face folder (tokenizer and weights)
    train_rows: int = 4000
    test_rows: int = 2000


def load_backbone(encoder: Encoder) -> tuple[Any, nn.Module]:
    """``(tokenizer, model)`` from the encoder's files, offline, in eval mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per worker start is noise
    path = encoder.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    return tokenizer, frozen(model)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling followed by its Normalize module."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(1)
    pooled = summed / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


class _Embeddings(nn.Module):
    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embeddings(input_ids=input_ids), attention_mask


class _Layer(nn.Module):
    """One encoder layer. MPNet's encoder owns a relative position bias that its forward
    computes once for every layer: each layer block computes the same here."""

    def __init__(self, layer: nn.Module, encoder: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self.config = config
        self.position_bias = getattr(encoder, "compute_position_bias", None)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        if self.position_bias is None:
            out = self.layer(hidden, mask)
        else:
            out = self.layer(hidden, mask, self.position_bias(hidden))
        return (out[0] if isinstance(out, tuple) else out), attention_mask  # MPNet: a tuple


class _Head(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.fc(mean_pool(hidden, attention_mask)),)


class SentenceClassifier(BlockPipeline):
    """See the module docstring. ``head`` is the 2-class linear layer on sentence embeddings."""

    def __init__(
        self, encoder: Encoder, head: nn.Linear, backbone: tuple[Any, nn.Module] | None = None
    ) -> None:
        self.name = encoder.name
        self.max_tokens = encoder.max_tokens
        self.inputs = [TensorSpec("text", "BYTES", (-1,))]
        self.outputs = [
            TensorSpec("logits", "FP32", (-1, 2)),
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 2)),
        ]
        self.tokenizer, self.bert = backbone if backbone is not None else load_backbone(encoder)
        self._tokenizer_lock = threading.Lock()
        self.head = frozen(head)
        model: Any = self.bert
        layers = [_Layer(layer, model.encoder, model.config) for layer in model.encoder.layer]
        if len(layers) != encoder.layers:
            raise ValueError(
                f"{encoder.name}: the weights have {len(layers)} layers, not {encoder.layers}"
            )
        self._blocks = [_Embeddings(model.embeddings), *layers, _Head(self.head)]
        self._activation_names = ("hidden", "attention_mask")

    def example_inputs(self) -> dict[str, np.ndarray]:
        return {"text": np.array([b"an example"], dtype=object)}

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 ``[N, max_tokens]``."""
        with self._tokenizer_lock:
            enc = self.tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)

    def preprocess(self, inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        array = require_input(inputs, self.inputs[0], (np.object_, np.bytes_, np.str_))
        texts = []
        for i, item in enumerate(array.tolist()):
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ModelInputError(f"inputs.text[{i}]: not valid UTF-8: {exc}") from exc
            if not isinstance(item, str):
                raise ModelInputError(
                    f"inputs.text[{i}]: {type(item).__name__}, expected UTF-8 bytes"
                )
            texts.append(item)
        if not texts:
            empty = torch.zeros((0, self.max_tokens), dtype=torch.int64)
            return empty, empty.clone()
        return self.tokenize(texts)

    def compact(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``preprocess``'s tensors cut to the batch's longest row: padding is masked out of
        attention, so every row's outputs stay the same, for less compute (training)."""
        ids, mask = tensors
        used = mask.any(dim=0).nonzero()  # the tokenizer pads on the right
        length = int(used.max()) + 1 if len(used) else ids.shape[1]
        return ids[:, :length].contiguous(), mask[:, :length].contiguous()

    def postprocess(self, outputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        return classifier_outputs(outputs[0])

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Normalised sentence embeddings ``[N, hidden]`` (for training heads)."""
        *encoder, _ = self._blocks
        tensors: tuple[torch.Tensor, ...] = self.compact(self.tokenize(texts))
        for block in encoder:
            tensors = block(*tensors)
        return mean_pool(*tensors)


def build(encoder: Encoder, cache: str | os.PathLike[str] | None = None) -> SentenceClassifier:
    """The served model with its cached head (``ModelNotPrepared`` if there is none)."""
    head, _ = load_head(encoder.name, encoder.recipe, encoder.hidden, len(CLASSES), cache)
    return SentenceClassifier(encoder, head)


def _embeddings(
    model: SentenceClassifier, texts: list[str], desc: str, chunk: int = 64
) -> torch.Tensor:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
    out = torch.empty(len(texts), model.head.in_features)
    with torch.inference_mode():
        for i in tqdm(range(0, len(texts), chunk), desc=desc, unit="batch", leave=False):
            rows = order[i : i + chunk]
            out[rows] = model.embed([texts[j] for j in rows])
    return out


def prepare_head(encoder: Encoder, cache: str | os.PathLike[str] | None = None) -> HeadInfo:
    """Train and cache the sentiment head; return what was measured."""
    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    train_texts, train_y = rotten_tomatoes("train")
    test_texts, test_y = rotten_tomatoes("test")
    tr = rng.permutation(len(train_texts))[: encoder.train_rows]
    te = rng.permutation(len(test_texts))[: encoder.test_rows]
    model = SentenceClassifier(encoder, nn.Linear(encoder.hidden, len(CLASSES)))
    train_x = _embeddings(model, [train_texts[i] for i in tr], f"{encoder.name} train rows")
    head, l2 = _train(train_x, torch.from_numpy(train_y[tr]), len(CLASSES))
    test_x = _embeddings(model, [test_texts[i] for i in te], f"{encoder.name} test rows")
    with torch.inference_mode():
        pred = head(test_x).argmax(1).numpy()
    return record_head(
        encoder.name, encoder.recipe, CLASSES, head, l2, len(tr), pred, test_y[te], start, cache
    )
