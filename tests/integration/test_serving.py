"""Serving behaviour a client relies on, through real worker processes.

Covers:
- overload: past ``limits.maxQueueRows`` the front answers 429 with ``Retry-After``, and
  every request it accepted is answered correctly;
- no live worker in a stage: 503 with ``Retry-After`` (and readiness false) only while the
  stage is empty; a new worker brings 200s back;
- SIGTERM on a middle worker under load: it drains, exits 0, nothing is lost;
- the real models over HTTP, batched across concurrent requests, answer what the unsplit
  model answers in one process (EfficientNet-Lite0 in three stages, MiniLM-L6 in two).
"""

from __future__ import annotations

import asyncio
import signal

import numpy as np
import pytest
import torch

from worldmesh_worker.control import wait_until
from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline

SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.02"}


async def post(pipeline: LocalPipeline, body: dict) -> tuple[int, dict, dict]:
    url = f"{pipeline.front.http_url}/v2/models/{pipeline.deployment}/infer"
    async with pipeline.session.post(url, json=body) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def test_overload_answers_429_with_retry_after_and_keeps_accepted_work():
    async with LocalPipeline(
        "toy-slow", [2], [1, 1], env=SLOW, limits={"maxQueueRows": 4}, batching={"maxBatchSize": 2}
    ) as pipeline:
        requests = [toy_request(i) for i in range(40)]
        answers = await asyncio.gather(*(post(pipeline, body) for body, _ in requests))
        codes = [status for status, _, _ in answers]
        assert codes.count(429) > 0 and codes.count(200) > 0, codes
        assert set(codes) == {200, 429}, codes
        for (status, answer, headers), (_, check) in zip(answers, requests, strict=True):
            if status == 429:
                assert int(headers["Retry-After"]) >= 1 and "limit" in answer["error"]
            else:
                assert check(answer), answer


async def test_503_only_while_a_stage_has_no_live_worker():
    async with LocalPipeline("toy", [2], [1, 1]) as pipeline:
        body, check = toy_request(1)
        pipeline.kill(pipeline.stage(1)[0])
        await wait_until(lambda: _not_ready(pipeline), 10, "front not ready")
        status, answer, headers = await post(pipeline, body)
        assert status == 503 and "stage 1 has no live worker" in answer["error"]
        assert int(headers["Retry-After"]) >= 1
        await pipeline.add_worker(1)
        await wait_until(pipeline.ready, 10, "front ready again")
        status, answer, _ = await post(pipeline, body)
        assert status == 200 and check(answer)


async def _not_ready(pipeline: LocalPipeline) -> bool:
    return not await pipeline.ready()


async def test_sigterm_drains_then_exits_without_losing_requests():
    async with LocalPipeline("toy-slow", [1, 3], [1, 2, 1], env=SLOW) as pipeline:
        leaving = pipeline.stage(1)[0]
        async with ClosedLoop(
            f"{pipeline.front.http_url}/v2/models/demo/infer", toy_request, 6
        ) as load:
            await load.answered(20)
            leaving.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(asyncio.to_thread(leaving.process.wait), 60)
            await load.answered(20)
        assert code == 0
        assert load.result.lost == 0, load.result.messages[:5]
        assert "drained" in leaving.log_path.read_text()


def _unsplit(model_name: str, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    from worldmesh_worker.models import load_model

    torch.set_num_threads(1)
    model = load_model(model_name)
    full = model.full().eval()
    with torch.inference_mode():
        return [full(*model.preprocess(x))[0].numpy() for x in inputs]


@pytest.mark.models
async def test_efficientnet_pipeline_over_http_equals_the_unsplit_model():
    from worldmesh_worker.data import fashion_mnist

    images, _ = fashion_mnist("test")
    batches = [images[i : i + 1 + i % 2] for i in range(0, 24, 2)]  # 1 or 2 rows each
    expected = _unsplit("efficientnet-lite0", [{"image": b} for b in batches])
    async with LocalPipeline(
        "efficientnet-lite0",
        [6, 12],
        [1, 1, 1],
        deployment="fashion",
        batching={"maxBatchSize": 4, "maxQueueDelayMs": 5},
    ) as pipeline:
        answers = await asyncio.gather(
            *(
                post(
                    pipeline,
                    {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "UINT8",
                                "shape": list(b.shape),
                                "data": b.ravel().tolist(),
                            }
                        ],
                        "outputs": [{"name": "logits"}],
                    },
                )
                for b in batches
            )
        )
        batch_sizes = await _mean_batch(pipeline)
    for (status, answer, _), want in zip(answers, expected, strict=True):
        assert status == 200, answer
        got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert batch_sizes > 1.0  # rows of different requests really were batched together


async def _mean_batch(pipeline: LocalPipeline) -> float:
    """Mean rows per batch at stage 1, from its /metrics."""
    async with pipeline.session.get(pipeline.stage(1)[0].http_url + "/metrics") as response:
        text = await response.text()
    values = {
        line.split("{")[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("worldmesh_batch_size_")
    }
    return values["worldmesh_batch_size_sum"] / values["worldmesh_batch_size_count"]


@pytest.mark.models
async def test_minilm_pipeline_over_http_equals_the_unsplit_model():
    texts = [
        "a warm, funny and wise film",
        "tedious and predictable from start to finish",
        "the cast is fine but the script is a mess",
        "one of the year's best",
    ]
    expected = _unsplit(
        "minilm-l6", [{"text": np.array([t.encode()], dtype=object)} for t in texts]
    )
    async with LocalPipeline("minilm-l6", [3], [1, 1], deployment="reviews") as pipeline:
        answers = await asyncio.gather(
            *(
                post(
                    pipeline,
                    {
                        "inputs": [
                            {"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}
                        ],
                        "outputs": [{"name": "logits"}],
                    },
                )
                for t in texts
            )
        )
    for (status, answer, _), want in zip(answers, expected, strict=True):
        assert status == 200, answer
        got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.models
async def test_worldmesh_load_drives_real_samples_and_scores_them():
    from worldmesh_operator.load import drive

    async with LocalPipeline("efficientnet-lite0", [9], [1, 1], deployment="fashion") as pipeline:
        url = f"{pipeline.front.http_url}/v2/models/fashion/infer"
        summary = await drive(url, "fashion-mnist", duration=3.0, concurrency=4, progress=False)
    assert summary.answered > 10 and set(summary.codes) == {200}
    assert summary.correct / summary.answered > 0.6  # the trained head, on real test images
    assert any(line.startswith("accuracy") for line in summary.lines())
