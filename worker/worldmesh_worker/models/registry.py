"""Finding models by name, and preparing their cached heads.

Covers:
- ``load_model(name)``: a built-in name (``MODEL_NAMES``) or a
  ``"package.module:function"`` entry point whose function, called with no
  arguments, returns a ``PipelineModel``. An unknown name, an unimportable
  module, a missing or non-callable attribute, or a result that is not a
  ``PipelineModel`` is a ``ValueError`` naming the model. A built-in model
  whose head is not cached raises ``ModelNotPrepared``; it is never trained
  silently.
- ``prepare(names)``: train and cache the heads that are missing or stale;
  idempotent (a valid cached head is kept and its recorded accuracy reported).

Heavy libraries (transformers, efficientnet) are imported only by the model
that needs them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from worldmesh_worker.models.base import PipelineModel
from worldmesh_worker.models.heads import HeadInfo, ModelNotPrepared, head_path, load_head
from worldmesh_worker.settings import WorkerSettings

Cache = str | os.PathLike[str] | None

#: Models with a trained head (``prepare`` builds them).
PREPARED_MODELS = ("efficientnet-lite0", "minilm-l6", "mpnet-base")
#: Every built-in name ``load_model`` accepts.
MODEL_NAMES = (*PREPARED_MODELS, "toy", "toy-slow")


def _toy(slow: bool, settings: WorkerSettings) -> PipelineModel:
    from worldmesh_worker.models import toy

    if not slow:
        return toy.ToyModel()
    return toy.ToyModel(block_delay_s=settings.toy_block_delay_s, name="toy-slow")


def _builtin(name: str, cache: Cache, settings: WorkerSettings) -> PipelineModel:
    if name in PREPARED_MODELS:
        model: PipelineModel = _head_module(name).build(cache)
        return model
    return _toy(name == "toy-slow", settings)


def _entry_point(spec: str) -> PipelineModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: entry point must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable")
    model = target()
    if not isinstance(model, PipelineModel):
        raise ValueError(
            f"model {spec!r}: {attr}() returned {type(model).__name__}, not a PipelineModel "
            "(needs name, inputs, outputs, num_blocks, preprocess, stage, full, postprocess)"
        )
    if not isinstance(model.num_blocks, int) or model.num_blocks < 1:
        raise ValueError(f"model {spec!r}: num_blocks must be a positive integer")
    return model


def load_model(
    name: str, *, cache: Cache = None, settings: WorkerSettings | None = None
) -> PipelineModel:
    """The model called ``name`` (see module docstring for what can fail); ``settings``
    (default: the environment's) give the cache, unless ``cache`` is given, and the
    toy-slow model's delay."""
    if name in MODEL_NAMES:
        settings = WorkerSettings.from_env() if settings is None else settings
        return _builtin(name, settings.cache if cache is None else cache, settings)
    if ":" in name:
        return _entry_point(name)
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} "
        "or a 'package.module:function' entry point"
    )


@dataclass(frozen=True, slots=True)
class PrepareResult:
    """One model's head: ``trained`` is False when a valid cached head was kept."""

    name: str
    trained: bool
    info: HeadInfo | None


def _head_module(name: str) -> ModuleType:
    """The module of a model with a trained head (cheap: the heavy imports are lazy)."""
    if name == "efficientnet-lite0":
        from worldmesh_worker.models import efficientnet

        return efficientnet
    if name == "mpnet-base":
        from worldmesh_worker.models import mpnet

        return mpnet
    from worldmesh_worker.models import minilm

    return minilm


def prepare(
    names: Iterable[str], *, cache: Cache = None, force: bool = False
) -> list[PrepareResult]:
    """Train and cache the heads of ``names``; ``ValueError`` for a name that has none to train.

    The toy models need nothing and are reported as not trained.
    """
    names = list(names)
    for name in names:
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model {name!r}: prepare takes {', '.join(MODEL_NAMES)}")
    results = []
    for name in names:
        if name not in PREPARED_MODELS:
            results.append(PrepareResult(name, trained=False, info=None))
            continue
        if not force:
            try:
                info = _cached_info(name, cache)
            except ModelNotPrepared:
                pass
            else:
                results.append(PrepareResult(name, trained=False, info=info))
                continue
        results.append(
            PrepareResult(name, trained=True, info=_head_module(name).prepare_head(cache))
        )
    return results


def _cached_info(name: str, cache: Cache) -> HeadInfo:
    m = _head_module(name)
    return load_head(name, m.RECIPE, m.IN_FEATURES, len(m.CLASSES), cache)[1]


__all__ = [
    "MODEL_NAMES",
    "PREPARED_MODELS",
    "ModelNotPrepared",
    "PrepareResult",
    "head_path",
    "load_model",
    "prepare",
]
