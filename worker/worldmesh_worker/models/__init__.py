"""Real and toy models split into pipeline stages (see ``base`` for the contract).

Built-in models: ``efficientnet-lite0`` (Fashion-MNIST), ``minilm-l6`` and
``mpnet-base`` (Rotten Tomatoes sentiment, 6 and 12 layers), ``toy`` and ``toy-slow``
(deterministic MLP for tests). The real models need their trained heads cached first:
``python -m worldmesh_worker.models prepare efficientnet-lite0 minilm-l6 mpnet-base``.
"""

from worldmesh_worker.models.base import PipelineModel, Stage, validate_split
from worldmesh_worker.models.heads import ModelNotPrepared, cache_dir
from worldmesh_worker.models.registry import (
    MODEL_NAMES,
    PREPARED_MODELS,
    PrepareResult,
    load_model,
    prepare,
)

__all__ = [
    "MODEL_NAMES",
    "PREPARED_MODELS",
    "ModelNotPrepared",
    "PipelineModel",
    "PrepareResult",
    "Stage",
    "cache_dir",
    "load_model",
    "prepare",
    "validate_split",
]
