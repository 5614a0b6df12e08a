"""``worldmesh ramps train MODEL``: train a model's ramps by distillation.

The backbone stays frozen: every training row runs through the full model once, the
pooled features at every ramp site are kept, and each ramp (one linear layer on them)
is fitted, like the task heads (``heads.train_linear_head``), to the *full model's own
softmax* (soft targets), not to the data set's labels: a ramp is only useful where it
agrees with the final answer, and the full model's doubt teaches it where to doubt too
(on 3,000 / 2,000 held-out rows, soft targets let 1-8 points more rows exit within a 1%
budget than the full model's argmax does, by site). Held-out rows (``--heldout-rows``,
2,000) come first from a seeded permutation of the training split, the training rows
(``--train-rows``, 30,000, or what the split has left) after them; the held-out rows
measure each ramp's agreement with the full model and tune the offline thresholds:

- per ramp: ``tuner.tune`` on the held-out rows, with the latency saved by a ramp taken
  as the fraction of blocks it skips, under the accuracy budget;
- shared: the highest single threshold that keeps every ramp on within the budget (the
  "every ramp on, one threshold tuned once offline" baseline).

Rows run in batches of similar size, and a model that can drop padding (``compact``)
runs each batch only as long as its longest row: the features are the same, and the
text model's pass is about twice as fast. On 2 cores: 290 s for EfficientNet-Lite0 (30,000
rows), 65 s for MiniLM-L6 (8,202).

The file is written to ``--out``, else ``<cache>/ramps/<model>.pt``; with ``--keep-valid``
a file there that loads for the model is kept (``make setup`` trains only what is missing
or stale). ``--sites`` picks the ramps (default: the model's candidates), ``--budget`` the
accuracy budget of the offline thresholds. ``worldmesh ramps train MANIFEST`` (the operator's
CLI) reads a manifest and passes its model, ``earlyExits.ramps``, ``rampsFile`` and
``accuracyBudget`` as these. Exit status 2 on a bad argument or model.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worldmesh_worker.exits import tuner
from worldmesh_worker.exits.ramps import (
    Ramp,
    RampFileError,
    RampInfo,
    RampSet,
    candidate_sites,
    check_sites,
    load_ramps,
    pooled,
    ramps_path,
    save_ramps,
)
from worldmesh_worker.models.heads import train_linear_head

SEED = 0
L2 = 1e-3  #: fixed (no selection): ramps are many, and one fit each keeps training short


def samples(model: Any, split: str, rows: int) -> list[Any]:
    """Up to ``rows`` inputs of ``model``'s data set, in a seeded order."""
    rng = np.random.default_rng(SEED)
    if model.name == "efficientnet-lite0":
        from worldmesh_worker.data import fashion_mnist

        images, _ = fashion_mnist(split)  # type: ignore[arg-type]
        pick = rng.permutation(len(images))[:rows]
        return [images[i] for i in pick]
    if model.name in ("minilm-l6", "mpnet-base"):
        from worldmesh_worker.data import rotten_tomatoes

        texts, _ = rotten_tomatoes(split)  # type: ignore[arg-type]
        pick = rng.permutation(len(texts))[:rows]
        return [texts[i].encode() for i in pick]
    if model.name in ("toy", "toy-slow"):
        return list(rng.integers(-10, 11, size=(rows, 16)).astype(np.float32))
    raise ValueError(f"model {model.name!r}: no training data known for its ramps")


def batch_inputs(model: Any, rows: Sequence[Any]) -> dict[str, np.ndarray]:
    """One request holding ``rows`` for the model's single input."""
    spec = model.inputs[0]
    if spec.datatype == "BYTES":
        return {spec.name: np.array(list(rows), dtype=object)}
    return {spec.name: np.stack(rows)}


#: How the features are kept until the ramps are fitted: half the memory of float32
#: (EfficientNet-Lite0's 17 sites make 13,000 features a row), and the fit reads them
#: standardised in float32, where half precision loses nothing it needs.
STORED = torch.float16


def features(
    model: Any, rows: Sequence[Any], sites: Sequence[int], chunk: int = 64, desc: str = ""
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Pooled features at every site (``STORED``), and the full model's logits, of ``rows``
    (in order). Each batch's features go straight into one buffer per site, at their
    rows' places: nothing is held twice, so memory is the buffers and one batch."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar sizes together
    compact = getattr(model, "compact", lambda tensors: tensors)
    wanted = set(sites)
    feats: dict[int, torch.Tensor] = {}
    logits: torch.Tensor | None = None
    blocks = model.blocks()
    with torch.inference_mode():
        for i in tqdm(range(0, len(rows), chunk), desc=desc, unit="batch", leave=False):
            index = torch.tensor(order[i : i + chunk])
            batch = [rows[j] for j in index.tolist()]
            tensors = compact(model.preprocess(batch_inputs(model, batch)))
            for b, block in enumerate(blocks):
                tensors = block(*tensors)
                if b in wanted:
                    x = pooled(tensors)
                    if b not in feats:
                        feats[b] = _buffer(len(rows), x.shape[1], STORED)
                    feats[b][index] = x.to(STORED)
            if logits is None:
                logits = _buffer(len(rows), tensors[0].shape[1], torch.float32)
            logits[index] = tensors[0].float()
    assert logits is not None, "features() of no rows"
    for site, x in feats.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"block {site}: a pooled feature is out of {STORED}'s range")
    return {s: feats[s] for s in sites}, logits


def _buffer(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor: the fit's autograd reads it
        return torch.empty(rows, width, dtype=dtype)


def errors_and_labels(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row, a head's error ``1 - max softmax`` and its label."""
    probs = torch.softmax(logits.double(), dim=1)
    best = probs.max(dim=1)
    return (1.0 - best.values).numpy(), best.indices.numpy()


def train(
    model: Any,
    sites: Sequence[int],
    train_rows: int = 30000,
    heldout_rows: int = 2000,
    budget: float = 0.01,
) -> RampSet:
    """Fit a ramp at every site of ``model``; return them with their measurements."""
    check_sites(model, sites)
    if train_rows < 1 or heldout_rows < 1:
        raise ValueError(f"train rows {train_rows} and held-out rows {heldout_rows}: need >= 1")
    started = time.perf_counter()
    rows = samples(model, "train", heldout_rows + train_rows)
    held, rows = rows[:heldout_rows], rows[heldout_rows:]
    if not rows:
        raise ValueError(f"the training split of {model.name!r} has no rows left for training")
    train_x, final_train = features(model, rows, sites, desc="train rows")
    held_x, final_held = features(model, held, sites, desc="held-out rows")
    target = torch.softmax(final_train, dim=1)
    label = final_held.argmax(1).numpy()
    classes = int(final_train.shape[1])
    ramps: dict[int, Ramp] = {}
    errs = np.zeros((len(label), len(sites)))
    agree = np.zeros((len(label), len(sites)), dtype=bool)
    for i, site in enumerate(tqdm(sites, desc="ramps", unit="ramp", leave=False)):
        linear, _ = train_linear_head(
            train_x[site], target, classes, l2=L2, dtype=torch.float32, max_iter=100
        )
        ramps[site] = Ramp(site, linear).eval().requires_grad_(False)
        with torch.inference_mode():
            errs[:, i], pred = errors_and_labels(linear(held_x[site].float()))
        agree[:, i] = pred == label
    saved = np.array([(model.num_blocks - 1 - s) / model.num_blocks for s in sites])
    levels = tuner.tune(errs, agree, [0] * len(sites), saved, budget)
    shared = 0
    for level in range(len(tuner.LEVELS)):
        loss, _, _ = tuner.evaluate(errs, agree, np.full(len(sites), tuner.LEVELS[level]), saved)
        if loss <= budget:
            shared = level
    info = {
        site: RampInfo(site, float(agree[:, i].mean()), float(tuner.LEVELS[levels[i]]))
        for i, site in enumerate(sites)
    }
    meta = {
        "train_rows": len(rows),
        "heldout_rows": len(label),
        "budget": budget,
        "seconds": time.perf_counter() - started,
    }
    return RampSet(
        model.name, model.num_blocks, classes, ramps, info, float(tuner.LEVELS[shared]), meta
    )


def _loads(path: Path, model: Any, sites: Sequence[int]) -> bool:
    """Whether ``path`` holds ramps at ``sites`` that load for ``model`` (this format)."""
    try:
        load_ramps(path, model).select(sites)
    except RampFileError:
        return False
    return True


def _sites(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of block indices: {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="worldmesh ramps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the ramps of a manifest's model (or a model name)")
    p.add_argument("model", help="a model name (worldmesh ramps train also takes a manifest)")
    p.add_argument("--out", default=None, help="the ramps file (default: see above)")
    p.add_argument("--sites", type=_sites, default=[], help="ramp sites, e.g. 2,4 (default: all)")
    p.add_argument("--budget", type=float, default=0.01, help="accuracy budget (default 0.01)")
    p.add_argument("--train-rows", type=int, default=30000)
    p.add_argument("--heldout-rows", type=int, default=2000)
    p.add_argument(
        "--keep-valid", action="store_true", help="keep a ramps file there that loads for the model"
    )
    p.add_argument("--cache", default=None, help="cache dir (default $WORLDMESH_CACHE)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from worldmesh_worker.models import ModelNotPrepared, load_model

    try:
        model = load_model(args.model, cache=args.cache)
        sites = args.sites or candidate_sites(model)
        path = Path(args.out) if args.out else ramps_path(model.name, args.cache)
        if args.keep_valid and _loads(path, model, sites):
            print(f"{path}: ramps for {model.name} are up to date")
            return 0
        ramps = train(model, sites, args.train_rows, args.heldout_rows, args.budget)
    except (ValueError, OSError, ModelNotPrepared) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_ramps(path, ramps)
    for site in sorted(ramps.info):
        i = ramps.info[site]
        print(
            f"ramp after block {site:2d}: agreement {i.agreement:.4f} with the full model "
            f"on {ramps.meta['heldout_rows']} held-out rows, threshold {i.threshold:.4g}"
        )
    print(
        f"shared offline threshold {ramps.threshold:.4g} (budget {args.budget:g}); "
        f"trained on {ramps.meta['train_rows']} rows in {ramps.meta['seconds']:.1f} s -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
