"""The cost of one control tick's planning, on synthetic observations (no processes).

One tick plans and summarizes from one view of the observation (``reconciler.reconcile``),
as ``loop.ControlLoop.step`` does. Three stages of N workers (N = 10, 100, 1,000, 10,000),
with bounded fan-out k = 2, in three states: converged (the plan is empty), one worker
dead (stop, replace, re-wire its peers), and the middle stage grown by one (a start, and
then its worlds). Baseline, in the same run: full fan-out ("all") at the sizes where it
fits (N <= 300: 2 N^2 worlds). Goal: <= 50 ms per tick at 1,000 workers per stage; the
growth from 1,000 to 10,000 is reported beside linear (10x) and n log n (13.3x).
"""

from __future__ import annotations

import time
from dataclasses import replace

from common import Figure, median

from worldmesh_operator.desired import Desired, DesiredStage
from worldmesh_operator.reconciler import (
    Observed,
    ObservedWorker,
    ObservedWorld,
    OpenWorld,
    WorkerState,
    WorldState,
    plan,
    reconcile,
)

SIZES = (10, 100, 1000, 10000)
FULL_SIZES = (10, 100, 300)
STAGES = 3


def converged(n: int, fan_out: int | None) -> tuple[Desired, Observed]:
    """Three stages of ``n`` READY workers, wired as the reconciler wires them."""
    desired = Desired(
        "bench", tuple(DesiredStage(i, n, "h") for i in range(STAGES)), fan_out=fan_out
    )
    workers = tuple(
        ObservedWorker(f"w{s}-{i:05d}", s, WorkerState.READY, "h", "", float(i))
        for s in range(STAGES)
        for i in range(n)
    )
    actions = plan(desired, Observed(workers, ()), lambda s: "unused")
    worlds = tuple(
        ObservedWorld(a.a, a.b, WorldState.READY) for a in actions if isinstance(a, OpenWorld)
    )
    return desired, Observed(workers, worlds)


def tick(desired: Desired, observed: Observed) -> float:
    """Seconds of one tick's planning."""
    started = time.perf_counter()
    reconcile(desired, observed, lambda s: f"new-s{s}")
    return time.perf_counter() - started


def states(n: int, fan_out: int | None) -> dict[str, tuple[Desired, Observed]]:
    desired, observed = converged(n, fan_out)
    victim = observed.workers[n + n // 2]  # a middle-stage worker
    dead = replace(victim, state=WorkerState.DEAD)
    died = Observed(
        tuple(dead if w is victim else w for w in observed.workers),
        tuple(
            replace(w, state=WorldState.BROKEN) if victim.id in (w.a, w.b) else w
            for w in observed.worlds
        ),
    )
    grown = replace(
        desired,
        stages=tuple(replace(s, workers=n + 1) if s.index == 1 else s for s in desired.stages),
    )
    newcomer = ObservedWorker("w1-new", 1, WorkerState.READY, "h", "", float(n))
    joined = Observed((*observed.workers, newcomer), observed.worlds)
    return {"converged": (desired, observed), "one dead": (desired, died), "grown": (grown, joined)}


def measure(n: int, fan_out: int | None, repeats: int) -> dict[str, float]:
    return {
        name: median([tick(d, o) for _ in range(repeats)])
        for name, (d, o) in states(n, fan_out).items()
    }


async def run(quick: bool = False) -> list[Figure]:
    sizes = SIZES[:3] if quick else SIZES
    bounded = {n: measure(n, 2, 3 if n >= 10000 else 5) for n in sizes}
    full = {n: measure(n, None, 3) for n in FULL_SIZES}
    figures = []
    for state in ("converged", "one dead", "grown"):
        per_size = {n: bounded[n][state] for n in sizes}
        baseline = ", ".join(f"N={n}: {full[n][state] * 1e3:.1f} ms" for n in FULL_SIZES)
        figures.append(
            Figure(
                f"plan + summary per tick, 3 stages x 1,000 workers, fan-out 2, {state}",
                per_size[1000] * 1e3,
                "ms",
                "<= 50",
                f"full fan-out (2 N^2 worlds): {baseline}",
                detail={"ms_by_workers_per_stage": {n: v * 1e3 for n, v in per_size.items()}},
            )
        )
        if 10000 in per_size:
            figures.append(
                Figure(
                    f"growth 1,000 -> 10,000 workers per stage, {state}",
                    per_size[10000] / per_size[1000],
                    "x",
                    "",
                    "linear growth is 10x, n log n 13.3x",
                )
            )
    return figures
