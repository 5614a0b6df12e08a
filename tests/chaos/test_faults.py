"""The fault suite's short seeded form (``faults.py``; ``make chaos`` runs the long one):
a 3-stage ``toy-slow`` deployment with two workers in every stage, six clients through its
one endpoint, a CPU hog beside it, and one round of each fault (SIGKILL, SIGSTOP,
two kills at once, a kill during a scale-up and during a scale-down, a kill of a worker
whose worlds are still opening) drawn in a seeded order. Every round: no request lost
(except with a front worker faulted, counted apart), no live worker judged dead, the stage
back to its count, and at most one replacement per fault."""

from __future__ import annotations

from pathlib import Path

from worldmesh_worker.loadgen import toy_request

from .faults import KINDS, Suite, draw, summary

SEED = 20261205
MANIFEST = {
    "apiVersion": "worldmesh.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "chaos"},
    "spec": {
        "model": {"name": "toy-slow", "splitPoints": [1, 3]},
        "stages": [{"name": "a"}, {"name": "b"}, {"name": "c"}],
    },
}


async def test_every_fault_once_on_a_busy_machine(tmp_path: Path) -> None:
    kinds = [k for k in draw(SEED, len(KINDS)) if k != "none"]
    suite = Suite(
        MANIFEST,
        tmp_path,
        toy_request,
        hog=1,
        seed=SEED,
        max_stop_s=3.0,
        window_s=1.0,
        env={"WORLDMESH_TOY_BLOCK_DELAY_S": "0.005"},
    )
    rounds = await suite.run(kinds)
    result = summary(rounds)
    rows = "\n".join(str(row) for row in result["rows"])
    assert result["lost"] == 0, rows
    assert result["false_detections"] == 0, rows
    assert result["extra_replacements"] == 0, rows
    assert all(r.recovered_s is not None for r in rounds), rows
    assert all(r.detected_s is not None for r in rounds), rows
