"""Early exits served by real worker processes over HTTP and Gloo worlds (toy models).

Covers:
- a ramp's answer reaches the client before the last stage finishes: with the last
  stage's process stopped (SIGSTOP, its worlds told to wait for it), the client holds an
  answer marked ``exit: 0`` while the front has labelled no row yet; once the last stage
  runs again, the row runs to the end and its final answer labels the exit (ordering
  held by the test, never wall time);
- ``parameters.early_exit: false`` gets the full model's exact answer (``exit: final``),
  and a non-boolean value is a 400 naming the parameter;
- with the online policy over two stages, the ramp that lives in the second stage sends
  its answers back to the front (EXIT messages), every ramp is labelled, the front exports
  the ramp metrics and ``GET /v1/ramps`` shows their state, and the second stage comes to
  run the front's active set (a CONTROL message: waited for); the pipeline then drains;
- a worker refuses a ramps file made for another model, naming ``earlyExits.rampsFile``;
- two front workers under load (``worldmesh run``'s runtime and its front service) keep one
  ramp state: the oldest leads, the other follows its thresholds and active set (within a
  control-loop step), the later stage's active set changes no more often than the
  leader's, and the answers over both fronts together stay within the accuracy budget.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import yaml

from worldmesh_operator.reconciler import WorkerState
from worldmesh_operator.run import LocalDeployment
from worldmesh_worker.control import ControlError, wait_until
from worldmesh_worker.exits.ramps import save_ramps
from worldmesh_worker.exits.train import train
from worldmesh_worker.loadgen import toy_request
from worldmesh_worker.local import LocalPipeline
from worldmesh_worker.models import toy


@pytest.fixture(scope="module")
def ramps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ramps")
    paths = {}
    paths["toy"] = out / "toy.pt"
    save_ramps(paths["toy"], train(toy.ToyModel(), [0, 1, 2], train_rows=600, heldout_rows=300))
    return paths


async def post(pipeline: LocalPipeline, body: dict) -> tuple[int, dict]:
    url = f"{pipeline.front.http_url}/v2/models/{pipeline.deployment}/infer"
    async with pipeline.session.post(url, json=body) as response:
        return response.status, await response.json(content_type=None)


async def metric(pipeline: LocalPipeline, stage: int, name: str) -> float:
    async with pipeline.session.get(pipeline.stage(stage)[0].http_url + "/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def body(x: list[float], **parameters: object) -> dict:
    doc: dict = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": x}]}
    if parameters:
        doc["parameters"] = parameters
    return doc


async def test_a_ramp_answer_reaches_the_client_before_the_last_stage_finishes(ramps):
    exits = {"enabled": True, "rampsFile": str(ramps["toy"]), "ramps": [0]}
    exits.update(policy="fixed", threshold=1.0)  # every ramp answer is confident enough
    patient = {"heartbeatTimeoutMs": 600_000}  # a stopped peer is not a dead one here
    async with LocalPipeline("toy", [1], [1, 1], worlds=patient, early_exits=exits) as pipeline:
        x = [float(v) for v in np.arange(-8, 8)]
        last = pipeline.stage(1)[0]
        assert await metric(pipeline, 1, "worldmesh_stage_compute_seconds_count") == 0
        pipeline.freeze(last)  # the last stage cannot compute anything until thawed
        try:
            status, answer = await post(pipeline, body(x))
            # the answer is here, and the front has no final answer for it yet
            front = await pipeline.front.control.status()
        finally:
            pipeline.thaw(last)
        assert status == 200 and answer["parameters"] == {"exit": 0}, answer
        assert front["earlyExits"]["labelled"] == 0
        # the row ran on to the last stage, whose answer labelled the exit
        await wait_until(
            lambda: _labelled(pipeline, 1), 30, "the final answer labels the ramp's exit"
        )
        assert await metric(pipeline, 1, "worldmesh_stage_compute_seconds_count") == 1
        assert await metric(pipeline, 0, "worldmesh_early_exits_total") == 1

        status, answer = await post(pipeline, body(x, early_exit=False))
        assert status == 200 and answer["parameters"] == {"exit": "final"}
        y = next(o for o in answer["outputs"] if o["name"] == "y")["data"]
        assert y == toy.reference(np.array([x]))[0].tolist()

        status, answer = await post(pipeline, body(x, early_exit="yes"))
        assert status == 400 and "parameters.early_exit: expected a boolean" in answer["error"]


async def _labelled(pipeline: LocalPipeline, n: int) -> bool:
    return (await pipeline.front.control.status())["earlyExits"]["labelled"] >= n


async def test_online_early_exits_across_stages_label_every_ramp(ramps):
    exits = {"enabled": True, "rampsFile": str(ramps["toy"]), "accuracyBudget": 0.05}
    async with LocalPipeline("toy", [2], [1, 1], early_exits=exits) as pipeline:
        requests = [toy_request(i) for i in range(160)]
        for start in range(0, len(requests), 16):
            answers = await asyncio.gather(
                *(post(pipeline, b) for b, _ in requests[start : start + 16])
            )
            assert all(status == 200 for status, _ in answers), answers
            for (_, answer), (_, check) in zip(answers, requests[start : start + 16], strict=True):
                if answer["parameters"]["exit"] == "final":
                    assert check(answer), answer
        await wait_until(lambda: _labelled(pipeline, 160), 30, "every row labelled")
        ramps_state = await pipeline.front.control.call("GET", "/v1/ramps")
        by_ramp = {r["ramp"]: r for r in ramps_state["ramps"]}
        assert sorted(by_ramp) == [0, 1, 2] and ramps_state["policy"] == "online"
        # ramp 2 runs in stage 1: its answers came back to the front and were labelled
        assert all(by_ramp[r]["agreement"] is not None for r in (0, 1, 2)), by_ramp
        for name in ("worldmesh_ramp_threshold", "worldmesh_ramp_active"):
            text = await _metrics_text(pipeline)
            assert sum(f"{name}{{" in line and 'ramp="2"' in line for line in text) == 1
        active = sorted(r for r, s in by_ramp.items() if s["active"])

        async def stage1_runs_the_active_set() -> bool:
            # the front's CONTROL message with its active set may still be on its way
            state = await pipeline.stage(1)[0].control.call("GET", "/v1/ramps")
            return sorted(state["active"]) == active

        await wait_until(stage1_runs_the_active_set, 30, "stage 1 runs the front's ramps")
        # a ramp state to follow that is not one names what is wrong, and changes nothing
        for body, words in [
            ({"leader": "x", "ramps": [{"ramp": 0, "threshold": 0.1}]}, "ramps[0]: must be"),
            ({"leader": "x", "ramps": [{"ramp": 9, "threshold": 0.1, "active": True}]}, "[9]"),
            ({"leader": 3}, "leader: must be"),
            ({"leader": "x", "ramps": "all"}, "ramps: required"),
            ({"lead": None}, "lead: unknown field"),
        ]:
            with pytest.raises(ControlError, match=re.escape(words)) as caught:
                await pipeline.front.control.call("PUT", "/v1/ramps", body)
            assert caught.value.status == 400
        with pytest.raises(ControlError) as caught:
            await pipeline.stage(1)[0].control.call("PUT", "/v1/ramps", {"leader": None})
        assert caught.value.status == 404
        after = await pipeline.front.control.call("GET", "/v1/ramps")
        assert after["leader"] is None  # it follows no one: every bad state was refused
        assert (await pipeline.front.control.drain(wait=10))["drained"]


async def _metrics_text(pipeline: LocalPipeline) -> list[str]:
    async with pipeline.session.get(pipeline.front.http_url + "/metrics") as response:
        return (await response.text()).splitlines()


async def test_a_worker_refuses_a_ramps_file_of_another_model(ramps):
    exits = {"enabled": True, "rampsFile": str(ramps["toy"])}
    with pytest.raises(RuntimeError) as caught:
        async with LocalPipeline("toy-slow", [], [1], early_exits=exits):
            pass
    message = str(caught.value)
    assert "earlyExits.rampsFile:" in message
    assert "ramps for model 'toy' with 4 blocks do not match model 'toy-slow'" in message


BUDGET = 0.05


async def test_two_front_workers_keep_one_ramp_state(ramps, tmp_path):
    manifest = tmp_path / "exits.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "worldmesh.io/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "twofronts"},
                "spec": {
                    "model": {"name": "toy", "splitPoints": [2]},
                    "stages": [
                        {"name": "a", "replicas": {"min": 2, "max": 2}},
                        {"name": "b", "replicas": {"min": 1, "max": 1}},
                    ],
                    "earlyExits": {
                        "enabled": True,
                        "rampsFile": str(ramps["toy"]),
                        "accuracyBudget": BUDGET,
                    },
                },
            }
        )
    )
    deployment = LocalDeployment(manifest, tmp_path / "run", port=0)
    task = asyncio.create_task(deployment.run())
    try:
        await wait_until(deployment.ready, 60, "deployment ready")
        fronts = sorted(
            (
                w
                for w in deployment.observed.workers
                if w.stage == 0 and w.state is WorkerState.READY
            ),
            key=lambda w: w.created,
        )
        leader, follower = (deployment.runtime.workers[w.id] for w in fronts)
        (last,) = [w for w in deployment.runtime.workers.values() if w.stage == 1]
        url = deployment.runtime.endpoint
        assert url is not None

        seen: dict[str, list] = {"leader": [], "follower": [], "stage 1": []}
        answers: list[bool] = []  # each answer's label is the full model's

        async def sample() -> None:
            while True:
                for key, worker in (("leader", leader), ("follower", follower)):
                    state = await worker.handle.control.call("GET", "/v1/ramps")
                    seen[key].append(
                        (
                            state["leader"],
                            tuple(r["threshold"] for r in state["ramps"]),
                            tuple(r["ramp"] for r in state["ramps"] if r["active"]),
                        )
                    )
                state = await last.handle.control.call("GET", "/v1/ramps")
                seen["stage 1"].append(tuple(sorted(state["active"])))
                await asyncio.sleep(0.05)

        async def client(k: int, session: aiohttp.ClientSession, n: int) -> None:
            rng = np.random.default_rng(k)
            for _ in range(n):
                x = rng.integers(-10, 11, (1, 16)).astype(np.float32)
                body = {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [1, 16],
                            "data": x.ravel().tolist(),
                        }
                    ]
                }
                async with session.post(url, json=body) as response:
                    assert response.status == 200, await response.text()
                    answer = await response.json()
                label = next(o for o in answer["outputs"] if o["name"] == "label")["data"][0]
                answers.append(label == int(toy.reference(x).argmax()))

        sampler = asyncio.create_task(sample())
        try:
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(client(k, session, 250) for k in range(8)))
            # the follower catches up within a control-loop step of the leader's last change

            async def agreed() -> bool:
                return seen["follower"][-1][1:] == seen["leader"][-1][1:]

            await wait_until(agreed, 10, "the follower applies the leader's state")
        finally:
            sampler.cancel()
    finally:
        deployment.delete()
        await asyncio.wait_for(task, 60)

    lead_states = seen["leader"]
    assert all(s[0] is None for s in lead_states), "the oldest front worker leads"
    assert seen["follower"][-1][0] == leader.id
    tuned = {s[1] for s in lead_states}
    assert len(tuned) > 1, "the leader never tuned: the test shows nothing"

    def changes(states: list) -> int:
        return sum(a != b for a, b in itertools.pairwise(states))

    # one state: the later stage runs the leader's set, changing as often as it does
    leader_sets = [s[2] for s in lead_states]
    assert changes(seen["stage 1"]) <= changes(leader_sets) + 1, (seen["stage 1"], leader_sets)
    assert changes([s[2] for s in seen["follower"]]) <= changes(leader_sets) + 1
    loss = 1 - sum(answers) / len(answers)
    assert loss <= BUDGET, f"{loss:.3f} of {len(answers)} answers disagree with the full model"
