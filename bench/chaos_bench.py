"""The fault suite on the fashion example (``make chaos``; also part of ``make bench``).

``examples/efficientnet-fashion.yaml`` with every stage pinned at two workers (autoscaling
off; early exits as shipped when their ramps are trained, else off), served by
``worldmesh run``'s loop with its one endpoint, eight closed-loop clients sending real
Fashion-MNIST test images, and ``ROUNDS`` seeded rounds of faults (``tests/chaos/faults.py``:
SIGKILL, SIGSTOP for 2-20 s, two at once, during a scale-up or scale-down, while a worker's
worlds are still opening, and fault-free rounds), once beside a CPU hog (two spinning
processes on this 2-core machine) and once without, in the same run.

Goals (per run): 0 requests lost (rounds that fault a front worker counted apart), no more
requests over 1 s in faulted rounds than in the fault-free ones, 0 false detections, every
stage back to full capacity within 3 s of detection, no replacement started more than once
per fault.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import Figure, fashion_requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos.faults import Suite, draw, summary  # noqa: E402
from worldmesh_worker.exits.ramps import ramps_path  # noqa: E402

EXAMPLE = ROOT / "examples" / "efficientnet-fashion.yaml"
ROUNDS = 20
SEED = 7


async def one(hog: int, rounds: int) -> dict[str, Any]:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    exits = manifest["spec"].get("earlyExits", {})
    if exits.get("enabled") and not ramps_path(manifest["spec"]["model"]["name"]).exists():
        exits["enabled"] = False
    with tempfile.TemporaryDirectory(prefix="worldmesh-chaos-") as tmp:
        suite = Suite(manifest, Path(tmp), fashion_requests(), clients=8, hog=hog, seed=SEED)
        return summary(await suite.run(draw(SEED, rounds)))


def figures(name: str, result: dict[str, Any]) -> list[Figure]:
    back = result["back_after_detection_s"]
    detect = result["detection_s"]
    return [
        Figure(
            f"{name}: requests lost",
            result["lost"],
            "requests",
            "== 0",
            f"{result['lost_with_a_front_worker_faulted']} more in rounds that faulted a "
            "front worker (counted apart)",
            detail=result,
        ),
        Figure(
            f"{name}: requests over 1 s per faulted round",
            result["over_1s_faulted_per_round"],
            "requests",
            f"<= {result['over_1s_fault_free_per_round']:g}",
            f"fault-free rounds: {result['over_1s_fault_free_per_round']:.1f} per round",
        ),
        Figure(f"{name}: false detections", result["false_detections"], "workers", "== 0"),
        Figure(
            f"{name}: detection, median",
            statistics.median(detect) if detect else float("nan"),
            "s",
            "",
            f"worst {max(detect, default=float('nan')):.2f} s",
            samples=detect,
        ),
        Figure(
            f"{name}: full capacity back after detection, worst",
            max(back, default=float("nan")),
            "s",
            "<= 3",
            f"median {statistics.median(back) if back else float('nan'):.2f} s",
            samples=back,
        ),
        Figure(
            f"{name}: replacements beyond one per fault",
            result["extra_replacements"],
            "workers",
            "== 0",
        ),
    ]


async def run(quick: bool = False) -> list[Figure]:
    rounds = 7 if quick else ROUNDS
    out = []
    for hog, name in ((2, "with a CPU hog"), (0, "quiet")):
        out += figures(name, await one(hog, rounds))
    return out
