"""Ramps: small classifier heads after intermediate blocks, and their file.

Covers:
- ``pooled(tensors)``: the features a ramp reads from a block's output tuple: ``k x k``
  average pooling of a ``[N, C, H, W]`` activation (CNNs), with the finest grid up to
  5x5 that keeps ``k*k*C`` within ``POOLED_FEATURES`` (some layout survives, most where
  channels are few: 5x5 on EfficientNet-Lite0's first six blocks, 1x1 on its last). On
  EfficientNet-Lite0 after block 5 (40 channels), measured on 3,000 held-out
  Fashion-MNIST rows, 65% of them can exit within a 0.7% budget (about what the online
  policy spends of a 1% one) with 5x5 pooling and 30,000 training rows, against 61%
  with 3x3 (with 12,000 rows: 63% against 62%; finer grids need more rows). The masked
  mean of a ``[N, T, D]`` hidden state with its ``[N, T]`` attention mask
  (transformers), or a ``[N, D]`` activation as is (MLPs). Anything else is a
  ``ValueError``.
- ``Ramp``: pooling plus one linear layer; ``site`` is the block index whose output it
  reads, so a ramp at site ``b`` answers once block ``b`` has run.
- ``candidate_sites(model)``: every block boundary before the final head,
  ``0..num_blocks-2``; ``check_sites`` names the field of a site that is not one.
- ``RampSet`` file (``save_ramps``/``load_ramps``): the ramps of one model, each with
  its held-out agreement with the full model and an offline threshold, plus one shared
  offline threshold (the "one threshold tuned once" baseline). Written atomically.
  ``load_ramps`` refuses, with ``RampFileError`` naming what differs, a file made for
  another model, another block count, or with a feature or class width that does not
  fit the model's activations, and a requested site the file has no ramp for; any
  malformed file (another format, a ramp that is not a dict keyed by its block, a
  missing tensor, a threshold or agreement outside [0, 1]) is a ``RampFileError`` too,
  never a raw ``TypeError``/``KeyError``.

The default file is ``<cache>/ramps/<model>.pt`` (cache as for heads).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from worldmesh_worker.models.heads import cache_dir

FORMAT = 3  #: 3: grids by channel count (format 2 ramps read 3x3, format 1 2x2 features)
POOLED_FEATURES = 1024  #: the most features a CNN ramp's pooling grid may make


class RampFileError(ValueError):
    """A ramps file is missing, unreadable, or does not match the model it is used with."""


def pooled(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[N, D]`` float32 features of one block's output tuple (see module docstring)."""
    x = tensors[0]
    if x.dim() == 4:  # a pooling grid: some layout survives (better early ramps)
        grid = max(1, min(5, math.isqrt(POOLED_FEATURES // x.shape[1])))
        return F.adaptive_avg_pool2d(x.float(), grid).flatten(1)
    if x.dim() == 3:
        if len(tensors) > 1 and tensors[1].shape == x.shape[:2]:
            mask = tensors[1].unsqueeze(-1).to(x.dtype)
            return (x * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return x.float().mean(dim=1)
    if x.dim() == 2:
        return x.float()
    raise ValueError(f"a ramp cannot read a {x.dim()}-D activation of shape {list(x.shape)}")


class Ramp(nn.Module):
    """Pooling plus a linear layer after block ``site``; returns logits ``[N, classes]``."""

    def __init__(self, site: int, linear: nn.Linear) -> None:
        super().__init__()
        self.site = site
        self.linear = linear

    def forward(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.linear(pooled(tensors))


def candidate_sites(model: Any) -> list[int]:
    """Every block whose output a ramp may read: all but the final (head) block."""
    return list(range(model.num_blocks - 1))


def check_sites(model: Any, sites: Sequence[int], path: str = "earlyExits.ramps") -> None:
    """``ValueError`` naming ``path[i]`` for a site that is not a candidate of ``model``."""
    last = model.num_blocks - 2
    for i, site in enumerate(sites):
        if not 0 <= site <= last:
            raise ValueError(
                f"{path}[{i}]: {site} is not a ramp site of model {model.name!r} "
                f"(sites are blocks 0..{last}, before its final head)"
            )


def ramps_path(model: str, cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_dir(cache) / "ramps" / f"{model}.pt"


@dataclass(frozen=True, slots=True)
class RampInfo:
    site: int
    agreement: float  #: agreement with the full model on the held-out split
    threshold: float  #: this ramp's offline threshold (per-ramp greedy tuning)


@dataclass(slots=True)
class RampSet:
    """The trained ramps of one model (see module docstring)."""

    model: str
    num_blocks: int
    classes: int
    ramps: dict[int, Ramp]
    info: dict[int, RampInfo]
    threshold: float  #: one shared offline threshold for every ramp
    meta: dict[str, Any] = field(default_factory=dict)

    def select(self, sites: Sequence[int]) -> dict[int, Ramp]:
        missing = [s for s in sites if s not in self.ramps]
        if missing:
            raise RampFileError(
                f"the ramps file of {self.model!r} has no ramp at block {missing[0]} "
                f"(it has {sorted(self.ramps)}); train it with `worldmesh ramps train`"
            )
        return {s: self.ramps[s] for s in sites}


def save_ramps(path: Path, ramps: RampSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model": ramps.model,
        "num_blocks": ramps.num_blocks,
        "classes": ramps.classes,
        "threshold": ramps.threshold,
        "meta": ramps.meta,
        "ramps": {
            site: {
                "weight": r.linear.weight.detach().clone(),
                "bias": r.linear.bias.detach().clone(),
                "agreement": ramps.info[site].agreement,
                "threshold": ramps.info[site].threshold,
            }
            for site, r in ramps.ramps.items()
        },
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_ramps(path: str | os.PathLike[str], model: Any) -> RampSet:
    """The ramps in ``path``, checked against ``model`` (``RampFileError`` naming the mismatch)."""
    path = Path(path)
    if not path.is_file():
        raise RampFileError(
            f"no ramps file {path}; train one with `worldmesh ramps train {model.name}`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RampFileError(f"{path}: not a ramps file: {exc}") from None
    if not isinstance(payload, dict):
        raise RampFileError(f"{path}: not a ramps file: a {type(payload).__name__}, not a dict")
    missing = [
        k
        for k in ("format", "model", "num_blocks", "classes", "threshold", "ramps")
        if k not in payload
    ]
    if missing:
        raise RampFileError(f"{path}: not a ramps file: no {missing[0]!r} entry")
    if payload["format"] != FORMAT:
        raise RampFileError(
            f"{path}: ramps file format {payload['format']!r}, this worker reads format {FORMAT}"
        )
    name, blocks, classes = payload["model"], payload["num_blocks"], payload["classes"]
    raw, threshold = payload["ramps"], payload["threshold"]
    if type(classes) is not int or classes < 1:
        raise RampFileError(f"{path}: classes {classes!r} is not a positive integer")
    if not isinstance(raw, dict):
        raise RampFileError(f"{path}: ramps is a {type(raw).__name__}, not a dict by block")
    _check_fraction(path, "threshold", threshold)
    meta = payload.get("meta", {})
    if not isinstance(meta, dict):
        raise RampFileError(f"{path}: meta is a {type(meta).__name__}, not a dict")
    if name != model.name or blocks != model.num_blocks:
        raise RampFileError(
            f"{path}: ramps for model {name!r} with {blocks} blocks do not match model "
            f"{model.name!r} with {model.num_blocks} blocks"
        )
    last = model.num_blocks - 2
    for site, r in raw.items():
        if type(site) is not int or not 0 <= site <= last:
            raise RampFileError(
                f"{path}: ramp key {site!r} is not a block index 0..{last} of {model.name!r}"
            )
        where = f"{path}: the ramp at block {site}"
        if not isinstance(r, dict):
            raise RampFileError(f"{where} is a {type(r).__name__}, not a dict")
        for key in ("weight", "bias", "agreement", "threshold"):
            if key not in r:
                raise RampFileError(f"{where} has no {key!r}")
        for key in ("weight", "bias"):
            if not isinstance(r[key], torch.Tensor) or not r[key].is_floating_point():
                raise RampFileError(f"{where}: {key} is not a float tensor")
        _check_fraction(path, f"ramp {site} agreement", r["agreement"])
        _check_fraction(path, f"ramp {site} threshold", r["threshold"])
    widths = feature_widths(model, sorted(raw))
    ramps, info = {}, {}
    for site, r in raw.items():
        weight, bias = r["weight"], r["bias"]
        want = (classes, widths[site])
        if tuple(weight.shape) != want or tuple(bias.shape) != (classes,):
            raise RampFileError(
                f"{path}: the ramp at block {site} has weight shape {list(weight.shape)}, "
                f"but model {model.name!r} needs {list(want)} there"
            )
        linear = nn.Linear(want[1], classes)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        ramps[site] = Ramp(site, linear).eval().requires_grad_(False)
        info[site] = RampInfo(site, float(r["agreement"]), float(r["threshold"]))
    return RampSet(name, blocks, classes, ramps, info, float(threshold), dict(meta))


def _check_fraction(path: Path, what: str, value: Any) -> None:
    """``RampFileError`` unless ``value`` is a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise RampFileError(f"{path}: {what} {value!r} is not a number in [0, 1]")


def feature_widths(model: Any, sites: Sequence[int]) -> dict[int, int]:
    """The pooled feature width at each site, found by running one example row."""
    check_sites(model, sites, "ramps")
    widths: dict[int, int] = {}
    with torch.inference_mode():
        tensors = model.preprocess(model.example_inputs())
        for index, block in enumerate(model.blocks()[: max(sites, default=-1) + 1]):
            tensors = block(*tensors)
            if index in sites:
                widths[index] = int(pooled(tensors).shape[1])
    return widths
