"""Linear classification heads: training on frozen features, and the on-disk cache.

Covers:
- ``train_linear_head``: multinomial logistic regression on fixed features
  (full-batch L-BFGS, L2 strength picked on a held-out tenth of the training
  rows) on class labels or on another model's class probabilities (distillation),
  with the feature standardisation folded into the returned
  ``nn.Linear`` so serving needs no extra step. Deterministic for given inputs.
- ``save_head`` / ``load_head``: one ``<cache>/heads/<model>.pt`` file per model,
  written to a temporary file and renamed, so a reader never sees half a file
  and concurrent ``prepare`` runs are harmless. A missing file or one from an
  older recipe raises ``ModelNotPrepared`` telling the user to run ``prepare``.

The cache directory is ``$WORLDMESH_CACHE``, else ``~/.cache/worldmesh``.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from worldmesh_worker.settings import CACHE, WorkerSettings

_L2_CHOICES = (1e-4, 1e-3, 1e-2)


class ModelNotPrepared(RuntimeError):
    """A model's trained head is not in the cache (or is stale); run ``prepare``."""

    def __init__(self, name: str, path: Path, why: str) -> None:
        super().__init__(
            f"model {name!r} is not prepared: {why} ({path}); run "
            f"`python -m worldmesh_worker.models prepare {name}` "
            f"(cache dir from ${CACHE}, default ~/.cache/worldmesh)"
        )
        self.name = name
        self.path = path


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``override``, else ``$WORLDMESH_CACHE``, else ``~/.cache/worldmesh``."""
    return Path(override) if override is not None else WorkerSettings.from_env().cache


def head_path(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / "heads" / f"{name}.pt"


@dataclass(frozen=True, slots=True)
class HeadInfo:
    """What ``prepare`` measured when it trained a head."""

    model: str
    recipe: int
    classes: tuple[str, ...]
    train_rows: int
    test_rows: int
    test_accuracy: float
    l2: float
    seconds: float


def save_head(path: Path, head: nn.Linear, info: HeadInfo) -> None:
    """Write ``head`` and ``info`` to ``path`` atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "weight": head.weight.detach().clone(),
        "bias": head.bias.detach().clone(),
        "model": info.model,
        "recipe": info.recipe,
        "classes": list(info.classes),
        "train_rows": info.train_rows,
        "test_rows": info.test_rows,
        "test_accuracy": info.test_accuracy,
        "l2": info.l2,
        "seconds": info.seconds,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; workers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_head(
    name: str,
    recipe: int,
    classes: tuple[str, ...],
    head: nn.Linear,
    l2: float,
    train_rows: int,
    predictions: np.ndarray,
    test_labels: np.ndarray,
    started: float,
    cache: str | os.PathLike[str] | None,
) -> HeadInfo:
    """Score a freshly trained head on the test rows, save it with its info, return the info."""
    info = HeadInfo(
        model=name,
        recipe=recipe,
        classes=classes,
        train_rows=train_rows,
        test_rows=len(test_labels),
        test_accuracy=float((predictions == test_labels).mean()),
        l2=l2,
        seconds=time.perf_counter() - started,
    )
    save_head(head_path(name, cache), head, info)
    return info


def load_head(
    name: str, recipe: int, in_features: int, n_classes: int, cache: str | os.PathLike[str] | None
) -> tuple[nn.Linear, HeadInfo]:
    """Load the cached head of ``name``; ``ModelNotPrepared`` if absent, stale or malformed."""
    path = head_path(name, cache)
    if not path.is_file():
        raise ModelNotPrepared(name, path, "no trained head in the cache")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        weight, bias = payload["weight"], payload["bias"]
        info = HeadInfo(
            model=str(payload["model"]),
            recipe=int(payload["recipe"]),
            classes=tuple(payload["classes"]),
            train_rows=int(payload["train_rows"]),
            test_rows=int(payload["test_rows"]),
            test_accuracy=float(payload["test_accuracy"]),
            l2=float(payload["l2"]),
            seconds=float(payload["seconds"]),
        )
    except Exception as exc:  # any unreadable file means: prepare again
        raise ModelNotPrepared(name, path, f"unreadable head file: {exc}") from exc
    if info.recipe != recipe:
        raise ModelNotPrepared(name, path, f"head is from recipe {info.recipe}, need {recipe}")
    if tuple(weight.shape) != (n_classes, in_features) or tuple(bias.shape) != (n_classes,):
        raise ModelNotPrepared(name, path, f"head has shape {tuple(weight.shape)}")
    head = nn.Linear(in_features, n_classes)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head, info


def _fit(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 300
) -> tuple[torch.Tensor, ...]:
    """Logistic regression on standardised ``x`` (hard or soft ``y``); ``(weight, bias)``."""
    w = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    labels = y.argmax(1) if y.dim() == 2 else y
    return float(((x @ w.T + b).argmax(1) == labels).float().mean())


def train_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    l2: float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    max_iter: int = 300,
) -> tuple[nn.Linear, float]:
    """Fit a linear classifier on ``features [N, D]``; return it and the chosen L2 strength
    (``l2`` given: that one, with no selection, a quarter of the fits).

    ``labels`` are class indices ``[N]``, or class probabilities ``[N, n_classes]`` (soft
    targets: distillation from another model's softmax). ``dtype`` and ``max_iter`` trade
    precision for time (float32 and 100 iterations fit a ramp as well, six times faster)."""
    x = features.to(dtype)
    soft = labels.dim() == 2
    if soft and tuple(labels.shape) != (len(x), n_classes):
        raise ValueError(f"soft targets of shape {list(labels.shape)}, not [{len(x)}, {n_classes}]")
    y = labels.to(dtype) if soft else labels.to(torch.int64)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    n_val = max(1, len(z) // 10)
    best_l2, best_acc = _L2_CHOICES[0] if l2 is None else l2, -1.0
    for choice in _L2_CHOICES if l2 is None else ():
        w, b = _fit(z[n_val:], y[n_val:], n_classes, choice, max_iter)
        acc = _accuracy(z[:n_val], y[:n_val], w, b)
        if acc > best_acc:
            best_l2, best_acc = choice, acc
    w, b = _fit(z, y, n_classes, best_l2, max_iter)
    head = nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():  # fold the standardisation: w·(x-m)/s + b = (w/s)·x + (b - (w/s)·m)
        scaled = w / std
        head.weight.copy_(scaled.to(torch.float32))
        head.bias.copy_((b - scaled @ mean).to(torch.float32))
    return head, best_l2
