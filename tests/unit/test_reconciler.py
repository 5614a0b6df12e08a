"""The reconciler (``reconciler.py``): desired + observed -> actions, as tables and simulations.

Covers:
- a fresh deployment starts every worker; a steady one (or one whose STARTING workers and
  OPENING worlds already reflect the last plan) gets no action;
- a dead worker is stopped, its worlds closed and a new one started; a worker gone from
  the observation has its worlds closed; a STOPPING worker only loses its worlds;
- a frozen worker (READY, all its worlds broken, its peers otherwise healthy) is stopped
  and replaced; a broken world between healthy workers is closed and re-opened, as is the
  only world of two workers that cannot be told apart;
- a READY worker gets a world with every READY neighbour; STARTING and DRAINING workers
  get none; worlds between non-neighbours, to unknown workers or across layouts close;
  both ends reporting one world count once, the worst state winning;
- scale up starts; scale down drains surplus workers (not-yet-serving first, then the
  newest), stops them once DRAINED, and never drains the last worker of a stage;
- a changed config_hash rolls: surge one, drain an old worker only once its replacement
  is READY and wired, never fewer serving workers than desired; a split change (new
  layout, fewer stages) rolls every stage and drains the dropped stage at the end;
- deleted drains all, stops the drained and dead, starts and opens nothing;
- determinism (same observation, same plan; sorted actions), no repeat of an action
  once reflected, and convergence to [] from random observations, with random deaths;
- ``summarize``: counts and phases (Pending, Progressing, Ready, Degraded, Deleting);
- bounded fan-out (``fan_out`` k): converged deployments give every worker its share of
  worlds to each neighbouring stage, balanced within one (random sizes and failures too);
  a join opens about ``k`` worlds per neighbouring stage and closes none; a worker whose
  whole subset to a stage died gets new peers in the same plan.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import pytest

from worldmesh_operator.desired import Desired, DesiredStage
from worldmesh_operator.reconciler import (
    Action,
    CloseWorld,
    DrainWorker,
    Observed,
    ObservedWorker,
    ObservedWorld,
    OpenWorld,
    StartWorker,
    StopWorker,
    WorkerState,
    WorldState,
    plan,
    summarize,
)

S = WorkerState
R, OP, B = WorldState.READY, WorldState.OPENING, WorldState.BROKEN


def W(
    id: str, stage: int, state: WorkerState = S.READY, h: str = "h", layout: str = "", t: float = 0
) -> ObservedWorker:
    return ObservedWorker(id, stage, state, h, layout, t)


def L(a: str, b: str, state: WorldState = R) -> ObservedWorld:
    return ObservedWorld(a, b, state)


def want(*counts: int, h: str = "h", deleted: bool = False, fan_out: int | None = None) -> Desired:
    stages = tuple(DesiredStage(i, n, h) for i, n in enumerate(counts))
    return Desired("d", stages, deleted, fan_out)


def obs(*items: ObservedWorker | ObservedWorld) -> Observed:
    return Observed(
        tuple(i for i in items if isinstance(i, ObservedWorker)),
        tuple(i for i in items if isinstance(i, ObservedWorld)),
    )


def namer(prefix: str = "n") -> Callable[[int], str]:
    counter = itertools.count()
    return lambda stage: f"{prefix}{stage}-{next(counter)}"


# A steady three-stage pipeline: x | y1 y2 | z, every neighbour pair wired.
STEADY = (W("x", 0), W("y1", 1), W("y2", 1), W("z", 2))
STEADY_WORLDS = (L("x", "y1"), L("x", "y2"), L("y1", "z"), L("y2", "z"))

CASES: list[tuple[str, Desired, Observed, list[Action]]] = [
    (
        "fresh",
        want(1, 2),
        obs(),
        [StartWorker(0, "n0-0"), StartWorker(1, "n1-1"), StartWorker(1, "n1-2")],
    ),
    ("steady", want(1, 2, 1), obs(*STEADY, *STEADY_WORLDS), []),
    ("starting-reflected", want(1, 1), obs(W("a", 0, S.STARTING), W("b", 1, S.STARTING)), []),
    ("opening-reflected", want(1, 1), obs(W("a", 0), W("b", 1), L("a", "b", OP)), []),
    (
        "ready-gets-worlds",
        want(1, 2),
        obs(W("a", 0), W("b", 1), W("c", 1)),
        [OpenWorld("a", "b"), OpenWorld("a", "c")],
    ),
    (
        "starting-gets-no-world",
        want(1, 2),
        obs(W("a", 0), W("b", 1), W("c", 1, S.STARTING), L("a", "b")),
        [],
    ),
    (
        "worker-died",
        want(1, 2, 1),
        obs(
            *STEADY[:2],
            W("y2", 1, S.DEAD),
            STEADY[3],
            L("x", "y1"),
            L("x", "y2", B),
            L("y1", "z"),
            L("y2", "z", B),
        ),
        [CloseWorld("x", "y2"), CloseWorld("y2", "z"), StopWorker("y2"), StartWorker(1, "n1-0")],
    ),
    (
        "worker-vanished",
        want(1, 2, 1),
        obs(*STEADY[:3], W("z2", 2), L("x", "y1"), L("x", "y2"), L("y1", "z", B), L("y2", "z", B)),
        [
            CloseWorld("y1", "z"),
            CloseWorld("y2", "z"),
            OpenWorld("y1", "z2"),
            OpenWorld("y2", "z2"),
        ],
    ),
    (
        "worker-frozen",
        want(1, 2, 1),
        obs(*STEADY, L("x", "y1", B), L("x", "y2"), L("y1", "z", B), L("y2", "z")),
        [CloseWorld("x", "y1"), CloseWorld("y1", "z"), StopWorker("y1"), StartWorker(1, "n1-0")],
    ),
    (
        "one-broken-world",
        want(1, 2, 1),
        obs(*STEADY, L("x", "y1", B), L("x", "y2"), L("y1", "z"), L("y2", "z")),
        [CloseWorld("x", "y1"), OpenWorld("x", "y1")],
    ),
    (
        "lone-pair-broken",
        want(1, 1),
        obs(W("a", 0), W("b", 1), L("a", "b", B)),
        [CloseWorld("a", "b"), OpenWorld("a", "b")],
    ),
    (
        "worst-report-wins",
        want(1, 1),
        obs(W("a", 0), W("b", 1), L("a", "b"), L("b", "a", B)),
        [CloseWorld("a", "b"), OpenWorld("a", "b")],
    ),
    (
        "scale-up",
        want(1, 3),
        obs(W("a", 0), W("b", 1), L("a", "b")),
        [StartWorker(1, "n1-0"), StartWorker(1, "n1-1")],
    ),
    (
        "scale-down-newest",
        want(1, 1),
        obs(
            W("a", 0),
            W("b", 1, t=1),
            W("c", 1, t=3),
            W("e", 1, t=2),
            L("a", "b"),
            L("a", "c"),
            L("a", "e"),
        ),
        [DrainWorker("c"), DrainWorker("e")],
    ),
    (
        "scale-down-starting-first",
        want(1, 1),
        obs(
            W("a", 0),
            W("b", 1, t=1),
            W("c", 1, t=0),
            W("e", 1, S.STARTING),
            L("a", "b"),
            L("a", "c"),
        ),
        [DrainWorker("b"), DrainWorker("e")],
    ),
    (
        "drained-stopped",
        want(1, 1),
        obs(W("a", 0), W("b", 1), W("c", 1, S.DRAINED), L("a", "b"), L("a", "c")),
        [CloseWorld("a", "c"), StopWorker("c")],
    ),
    (
        "draining-keeps-worlds",
        want(1, 1),
        obs(W("a", 0), W("b", 1), W("c", 1, S.DRAINING), L("a", "b"), L("a", "c")),
        [],
    ),
    (
        "draining-gets-no-world",
        want(1, 1),
        obs(W("a", 0, S.DRAINING), W("a2", 0), W("b", 1), L("a2", "b")),
        [],
    ),
    (
        "stopping-loses-worlds",
        want(1, 1),
        obs(W("a", 0), W("b", 1), W("c", 1, S.STOPPING), L("a", "b"), L("a", "c")),
        [CloseWorld("a", "c")],
    ),
    ("last-worker-kept", want(1, 0), obs(W("a", 0), W("b", 1), L("a", "b")), []),
    ("last-worker-kept-unwired", want(1, 0), obs(W("a", 0), W("b", 1, S.STARTING)), []),
    (
        "strange-worlds-closed",
        want(2, 1),
        obs(
            W("a", 0),
            W("a2", 0),
            W("b", 1),
            L("a", "b"),
            L("a2", "b"),
            L("a", "a2"),
            L("b", "ghost"),
        ),
        [CloseWorld("a", "a2"), CloseWorld("b", "ghost")],
    ),
    (
        "layouts-do-not-mix",
        want(1, 2),
        obs(
            W("a", 0, layout="L1"),
            W("b", 1, layout="L1"),
            W("c", 1, layout="L2", h="old"),
            L("a", "b"),
            L("a", "c"),
        ),
        # c cannot serve without a world, so draining it costs nothing.
        [CloseWorld("a", "c"), StartWorker(1, "n1-0"), DrainWorker("c")],
    ),
    (
        "deleted",
        want(1, 2, deleted=True),
        obs(
            W("a", 0),
            W("b", 1, S.DEAD),
            W("c", 1, S.DRAINED),
            W("e", 1, S.STARTING),
            L("a", "b", B),
            L("a", "c"),
        ),
        [
            CloseWorld("a", "b"),
            CloseWorld("a", "c"),
            StopWorker("b"),
            StopWorker("c"),
            DrainWorker("a"),
            DrainWorker("e"),
        ],
    ),
    ("deleted-draining", want(1, deleted=True), obs(W("a", 0, S.DRAINING)), []),
    ("deleted-done", want(1, 2, deleted=True), obs(), []),
    (
        "rolling-surge-one",
        want(1, 2, h="new"),
        obs(W("a", 0, h="new"), W("b", 1, h="old"), W("c", 1, h="old"), L("a", "b"), L("a", "c")),
        [StartWorker(1, "n1-0")],
    ),
    (
        "rolling-waits-for-wiring",
        want(1, 2, h="new"),
        obs(
            W("a", 0, h="new"),
            W("b", 1, h="old"),
            W("c", 1, h="old"),
            W("n", 1, h="new"),
            L("a", "b"),
            L("a", "c"),
        ),
        [OpenWorld("a", "n")],
    ),
    (
        "rolling-drains-once-wired",
        want(1, 2, h="new"),
        obs(
            W("a", 0, h="new"),
            W("b", 1, h="old"),
            W("c", 1, h="old"),
            W("n", 1, h="new"),
            L("a", "b"),
            L("a", "c"),
            L("a", "n"),
        ),
        [StartWorker(1, "n1-0"), DrainWorker("b")],
    ),
]


@pytest.mark.parametrize(
    ("desired", "observed", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(desired: Desired, observed: Observed, expected: list[Action]) -> None:
    assert plan(desired, observed, namer()) == expected
    assert plan(desired, observed, namer()) == expected  # the same observation, the same plan


def test_stage_numbering_checked() -> None:
    with pytest.raises(ValueError, match=r"0\.\.n-1"):
        plan(Desired("d", (DesiredStage(1, 1, "h"),)), obs(), namer())


# --- a tiny simulator of the runtime and the workers -------------------------------------


@dataclass
class Sim:
    """Applies actions at once (start -> STARTING, open -> OPENING, drain -> DRAINING, stop
    and close -> removed); ``tick`` moves STARTING/OPENING to READY and DRAINING to
    DRAINED, and STOPPING workers away. ``layout`` is given to every started worker."""

    desired: Desired
    workers: dict[str, ObservedWorker] = field(default_factory=dict)
    worlds: dict[tuple[str, str], WorldState] = field(default_factory=dict)
    layout: str = ""
    clock: float = 100.0
    exact: bool = True  #: fan-out: every stage pair at exactly its share (see below)

    @classmethod
    def of(cls, desired: Desired, observed: Observed, layout: str = "") -> Sim:
        worlds = {(min(w.a, w.b), max(w.a, w.b)): w.state for w in observed.worlds}
        return cls(desired, {w.id: w for w in observed.workers}, worlds, layout)

    def observe(self) -> Observed:
        return Observed(
            tuple(self.workers.values()),
            tuple(ObservedWorld(a, b, s) for (a, b), s in sorted(self.worlds.items())),
        )

    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            match action:
                case StartWorker(stage, worker):
                    assert worker not in self.workers
                    h = self.desired.stages[stage].config_hash
                    self.clock += 1
                    self.workers[worker] = W(worker, stage, S.STARTING, h, self.layout, self.clock)
                case DrainWorker(worker):
                    self.set(worker, S.DRAINING)
                case StopWorker(worker):
                    self.workers.pop(worker)
                case OpenWorld(a, b):
                    assert a < b and (a, b) not in self.worlds
                    self.worlds[a, b] = OP
                case CloseWorld(a, b):
                    del self.worlds[a, b]

    def tick(self) -> None:
        for w in list(self.workers.values()):
            if w.state is S.STOPPING:
                del self.workers[w.id]
            elif w.state in (S.STARTING, S.DRAINING):
                self.set(w.id, S.READY if w.state is S.STARTING else S.DRAINED)
        for pair, state in self.worlds.items():
            if state is OP:
                self.worlds[pair] = R

    def set(self, worker: str, state: WorkerState) -> None:
        self.workers[worker] = replace(self.workers[worker], state=state)

    def kill(self, worker: str) -> None:
        self.set(worker, S.DEAD)
        for pair in self.worlds:
            if worker in pair:
                self.worlds[pair] = B

    def serving(self, stage: int) -> int:
        """READY workers of ``stage`` with a READY world to a READY worker of each neighbour."""
        count = 0
        for w in self.workers.values():
            if w.stage != stage or w.state is not S.READY:
                continue
            reached = {
                self.workers[p].stage
                for pair, s in self.worlds.items()
                if w.id in pair and s is R
                for p in pair
                if p != w.id and p in self.workers and self.workers[p].state is S.READY
            }
            count += all(
                n in reached for n in (stage - 1, stage + 1) if 0 <= n < len(self.desired.stages)
            )
        return count

    def has_path(self, layout: str, stages: int) -> bool:
        """A chain of READY workers of ``layout``, joined by READY worlds, through all stages."""
        reached = {i for i, w in self.workers.items() if w.stage == 0 and w.state is S.READY}
        reached = {i for i in reached if self.workers[i].layout == layout}
        for stage in range(1, stages):
            reached = {
                y
                for (a, b), state in self.worlds.items()
                if state is R
                for x, y in ((a, b), (b, a))
                if x in reached
                and self.workers[y].stage == stage
                and self.workers[y].state is S.READY
            }
        return bool(reached)

    def assert_converged(self) -> None:
        for s in self.desired.stages:
            mine = [w for w in self.workers.values() if w.stage == s.index]
            assert len(mine) == max(s.workers, 1), mine
            assert all(w.state is S.READY and w.config_hash == s.config_hash for w in mine), mine
        assert all(w.stage < len(self.desired.stages) for w in self.workers.values())
        if self.desired.fan_out is not None:
            assert set(self.worlds.values()) <= {R}
            assert_fanned_out(self, self.desired.fan_out, exact=self.exact)
            return
        expected = {
            (min(x, y), max(x, y))
            for x, y in itertools.permutations(self.workers, 2)
            if self.workers[x].stage + 1 == self.workers[y].stage
        }
        assert self.worlds == dict.fromkeys(expected, R)


def run(
    sim: Sim, new_id: Callable[[int], str], steps: int, check: Callable[[], None] = lambda: None
) -> int:
    """Plan, apply, tick until the plan is empty and ticks change nothing; the steps it took."""
    for step in range(steps):
        actions = plan(sim.desired, sim.observe(), new_id)
        if not actions:
            before = sim.observe()
            sim.tick()
            if sim.observe() == before:
                return step
            continue
        sim.apply(actions)
        # Reflected: asking again asks for none of the same things and starts nothing more.
        again = plan(sim.desired, sim.observe(), new_id)
        assert not set(again) & set(actions), again
        started = {a.stage for a in actions if isinstance(a, StartWorker)}
        assert not [a for a in again if isinstance(a, StartWorker) and a.stage in started]
        sim.tick()
        check()
    raise AssertionError(f"no convergence in {steps} steps: {sim.observe()}")


def converged_sim(desired: Desired, layout: str = "") -> Sim:
    sim = Sim(desired, layout=layout)
    run(sim, namer("v"), 10)
    sim.assert_converged()
    return sim


@pytest.mark.parametrize(
    ("old", "new"),
    [((1, 1, 1), (1, 1, 1)), ((2, 3), (2, 3)), ((1, 3), (2, 1))],
    ids=["1-1-1", "2-3", "resized"],
)
def test_rolling_update_keeps_serving(old: tuple[int, ...], new: tuple[int, ...]) -> None:
    """Batching changed (same layout): never fewer serving workers per stage than desired."""
    sim = converged_sim(want(*old, h="v1"))
    sim.desired = want(*new, h="v2")

    def check() -> None:
        for s in sim.desired.stages:
            live = [
                w
                for w in sim.workers.values()
                if w.stage == s.index and w.state in (S.STARTING, S.READY)
            ]
            assert sim.serving(s.index) >= min(s.workers, old[s.index]), sim.observe()
            assert len(live) <= max(s.workers, old[s.index]) + 1

    steps = run(sim, namer(), 40, check)
    sim.assert_converged()
    assert steps > 3  # it went step by step


def test_split_change_rolls_every_stage_and_drops_one() -> None:
    """Three stages become two with a new layout: no world joins old and new workers, the
    old pipeline serves until the new one is wired, then the old third stage drains."""
    sim = converged_sim(want(1, 2, 1, h="v1"), layout="L1")
    sim.desired, sim.layout = want(1, 1, h="v2"), "L2"

    def check() -> None:
        for a, b in sim.worlds:
            assert sim.workers[a].layout == sim.workers[b].layout
        assert sim.has_path("L1", 3) or sim.has_path("L2", 2), sim.observe()

    run(sim, namer(), 40, check)
    sim.assert_converged()
    assert {w.layout for w in sim.workers.values()} == {"L2"}


def test_scale_down_then_stop() -> None:
    sim = converged_sim(want(1, 3))
    sim.desired = want(1, 1)
    first = plan(sim.desired, sim.observe(), namer())
    assert [type(a) for a in first] == [DrainWorker, DrainWorker]
    sim.apply(first)
    sim.tick()
    second = plan(sim.desired, sim.observe(), namer())
    drained = sorted(a.worker_id for a in first if isinstance(a, DrainWorker))
    assert [a for a in second if isinstance(a, StopWorker)] == [StopWorker(w) for w in drained]
    assert all(
        isinstance(a, CloseWorld) and {a.a, a.b} & set(drained)
        for a in second
        if not isinstance(a, StopWorker)
    )
    run(sim, namer(), 5)
    sim.assert_converged()


STATES = list(WorkerState)
WORLD_STATES = list(WorldState)


def random_scenario(rng: random.Random) -> tuple[Sim, int]:
    """A random desired state, a random (often absurd) observation, and a number of kills.

    Old workers have hash h0 (layout L0) or h1/h2; the desired hash is h1 or h2, and h2 may
    or may not share h1's layout (a batching change, or a split change)."""
    h = rng.choice(["h1", "h2"])
    counts = [rng.randint(1, 3) for _ in range(rng.randint(1, 3))]
    desired = replace(want(*counts, h=h), deleted=rng.random() < 0.1)
    layouts = {"h1": "L1", "h2": rng.choice(["L1", "L2"]), "h0": "L0"}
    workers = []
    for stage in range(rng.randint(0, 4)):
        for k in range(rng.randint(0, 4)):
            old = rng.choice(["h0", "h1", "h2"])
            state = rng.choice(STATES)
            workers.append(W(f"w{stage}{k}", stage, state, old, layouts[old], rng.random()))
    ids = [w.id for w in workers] + ["ghost"]
    worlds = [
        L(a, b, rng.choice(WORLD_STATES))
        for a, b in itertools.combinations(sorted(ids), 2)
        if rng.random() < 0.4
    ]
    return Sim.of(desired, Observed(tuple(workers), tuple(worlds)), layouts[h]), rng.randint(0, 3)


def converges_through_failures(sim: Sim, rng: random.Random, kills: int) -> None:
    """A few failures while it reconciles, then it converges (or, deleted, empties)."""
    new_id = namer()
    for _ in range(kills):
        for _ in range(rng.randint(1, 3)):
            sim.apply(plan(sim.desired, sim.observe(), new_id))
            sim.tick()
        live = sorted(w for w, o in sim.workers.items() if o.state is S.READY)
        if live:
            sim.kill(rng.choice(live))
    run(sim, new_id, 40)
    if sim.desired.deleted:
        assert sim.workers == {} and sim.worlds == {}
    else:
        sim.assert_converged()
    assert plan(sim.desired, sim.observe(), new_id) == []


@pytest.mark.parametrize("seed", range(300))
def test_random_scenarios_converge(seed: int) -> None:
    rng = random.Random(seed)
    sim, kills = random_scenario(rng)
    converges_through_failures(sim, rng, kills)


# --- summarize ----------------------------------------------------------------------------

PHASES = [
    ("pending", want(1, 1), obs(W("a", 0, S.STARTING), W("b", 1)), "Pending"),
    ("progressing-worlds", want(1, 1), obs(W("a", 0), W("b", 1), L("a", "b", OP)), "Progressing"),
    ("progressing-count", want(1, 2), obs(W("a", 0), W("b", 1), L("a", "b")), "Progressing"),
    (
        "progressing-draining",
        want(1, 1),
        obs(W("a", 0), W("b", 1), W("c", 1, S.DRAINING), L("a", "b")),
        "Progressing",
    ),
    ("ready", want(1, 2, 1), obs(*STEADY, *STEADY_WORLDS), "Ready"),
    ("degraded-dead", want(1, 1), obs(W("a", 0), W("b", 1, S.DEAD)), "Degraded"),
    (
        "degraded-frozen",
        want(1, 2, 1),
        obs(*STEADY, L("x", "y1", B), L("x", "y2"), L("y1", "z", B), L("y2", "z")),
        "Degraded",
    ),
    ("deleting", want(1, deleted=True), obs(W("a", 0, S.DRAINING)), "Deleting"),
]


@pytest.mark.parametrize(
    ("desired", "observed", "phase"), [p[1:] for p in PHASES], ids=[p[0] for p in PHASES]
)
def test_summarize_phase(desired: Desired, observed: Observed, phase: str) -> None:
    status = summarize(desired, observed)
    assert status["phase"] == phase, status
    assert status["reason"]


def test_summarize_counts() -> None:
    status = summarize(
        want(1, 2, 1, h="v2"),
        obs(
            W("x", 0, h="v2"),
            W("y1", 1),
            W("y2", 1, h="v2"),
            W("y3", 1, S.STARTING, h="v2"),
            W("z", 2, h="v2"),
            *STEADY_WORLDS[:3],
            L("y2", "z", B),
        ),
    )
    assert status["stages"][1] == {
        "stage": 1,
        "desired": 2,
        "ready": 2,
        "updated": 1,
        "starting": 1,
        "draining": 0,
    }
    assert status["worlds"] == {"opening": 0, "ready": 3, "broken": 1}
    assert status["phase"] == "Degraded" and "y2/z" in status["reason"]


# --- bounded fan-out --------------------------------------------------------------------


def degrees(sim: Sim, stage: int, toward: int) -> dict[str, int]:
    """Each worker of ``stage``: its worlds with workers of stage ``toward``."""
    mine = {w for w, o in sim.workers.items() if o.stage == stage}
    theirs = {w for w, o in sim.workers.items() if o.stage == toward}
    count = dict.fromkeys(mine, 0)
    for a, b in sim.worlds:
        for x, y in ((a, b), (b, a)):
            if x in mine and y in theirs:
                count[x] += 1
    return count


def assert_fanned_out(sim: Sim, k: int, exact: bool = True) -> None:
    """Every worker's worlds to each neighbouring stage: its share of ``max(n * min(k, m),
    m * min(k, n))``, within one of every other worker of its stage, and at least one.
    Not ``exact``: a world may be kept over the share (never the last READY world of a
    worker is closed, and after some failures no other can be)."""
    stages = len(sim.desired.stages)
    for stage in range(stages - 1):
        up, down = degrees(sim, stage, stage + 1), degrees(sim, stage + 1, stage)
        n, m = len(up), len(down)
        total = max(n * min(k, m), m * min(k, n))
        if exact:
            assert sum(up.values()) == total, (stage, up, down)
        else:
            assert total <= sum(up.values()) <= total + max(n, m), (stage, up, down)
        for side in (up, down):
            assert max(side.values()) - min(side.values()) <= 1, (stage, side)
            assert min(side.values()) >= 1


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("counts", [(1, 1), (4, 4, 4), (8, 8, 8), (2, 8, 3), (8, 2), (5, 7, 6)])
def test_fan_out_converges_balanced(counts: tuple[int, ...], k: int) -> None:
    sim = converged_sim(want(*counts, fan_out=k))
    assert plan(sim.desired, sim.observe(), namer()) == []


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("counts", [(8, 8, 8), (5, 7, 6), (2, 8, 3)])
@pytest.mark.parametrize("seed", range(20))
def test_fan_out_balanced_after_workers_and_worlds_come_up_in_any_order(
    counts: tuple[int, ...], k: int, seed: int
) -> None:
    """Workers become READY and worlds open a few at a time, in a random order (as they
    do): the end state is exactly each worker's share, no world over it (a worker with one
    world more than its stage's others takes 1.5x the rows at k = 2)."""
    rng = random.Random(seed)
    sim = Sim(want(*counts, fan_out=k))
    new_id = namer()
    for _ in range(30):
        sim.apply(plan(sim.desired, sim.observe(), new_id))
        for w in list(sim.workers.values()):
            if w.state is S.STARTING and rng.random() < 0.3:
                sim.set(w.id, S.READY)
        for pair, state in list(sim.worlds.items()):
            if state is OP and rng.random() < 0.5:
                sim.worlds[pair] = R
    run(sim, new_id, 40)
    sim.assert_converged()  # exact: every stage pair at its share
    assert plan(sim.desired, sim.observe(), new_id) == []


def test_fan_out_all_is_every_pair() -> None:
    sim = converged_sim(want(3, 4))
    assert len(sim.worlds) == 12


def test_a_join_opens_k_worlds_per_neighbour_and_closes_none() -> None:
    sim = converged_sim(want(4, 4, 4, fan_out=2))
    sim.desired = want(4, 5, 4, fan_out=2)
    sim.apply(plan(sim.desired, sim.observe(), namer("j")))
    sim.tick()  # the new worker is READY
    actions = plan(sim.desired, sim.observe(), namer("j"))
    opens = [a for a in actions if isinstance(a, OpenWorld)]
    assert len(opens) == 4 and all("j1-0" in (a.a, a.b) for a in opens), actions
    assert not [a for a in actions if isinstance(a, CloseWorld)]
    sim.apply(actions)
    sim.tick()
    sim.assert_converged()


def test_a_worker_whose_whole_subset_died_gets_new_peers_at_once() -> None:
    sim = converged_sim(want(4, 4, 4, fan_out=2))
    y = sorted(w for w, o in sim.workers.items() if o.stage == 1)[0]
    peers = [p for pair in sim.worlds for p in pair if y in pair and sim.workers[p].stage == 2]
    assert len(peers) == 2
    for p in peers:
        sim.kill(p)
    actions = plan(sim.desired, sim.observe(), namer("r"))
    fresh = {
        p for a in actions if isinstance(a, OpenWorld) and y in (a.a, a.b) for p in (a.a, a.b)
    } - {y}
    assert fresh and not fresh & set(peers), actions  # the living ones, in this very plan
    assert all(sim.workers[p].state is S.READY for p in fresh)


@pytest.mark.parametrize("seed", range(60))
def test_random_scenarios_converge_with_fan_out(seed: int) -> None:
    rng = random.Random(seed)
    sim, kills = random_scenario(rng)
    sim.desired = replace(sim.desired, fan_out=rng.choice([1, 2, 3]))
    sim.exact = False  # from an absurd start, a world over the share may have to stay
    converges_through_failures(sim, rng, kills)


def stranded(sim: Sim) -> list[str]:
    """READY workers without a READY world to a serving (READY) worker of a neighbouring
    stage: they would answer "no live next stage"."""
    out = []
    stages = len(sim.desired.stages)
    for w in sim.workers.values():
        if w.state is not S.READY:
            continue
        for n in (w.stage - 1, w.stage + 1):
            if not 0 <= n < stages:
                continue
            if not any(
                s is R
                and w.id in pair
                and (p := pair[0] if pair[1] == w.id else pair[1]) in sim.workers
                and sim.workers[p].stage == n
                and sim.workers[p].state is S.READY
                for pair, s in sim.worlds.items()
            ):
                out.append(f"{w.id} -> stage {n}")
    return out


@pytest.mark.parametrize(
    ("old", "new", "k", "h"),
    [((6, 7), (6, 3), 2, "h"), ((3, 3), (3, 3), 1, "h2"), ((4, 4, 4), (2, 3, 4), 2, "h2")],
    ids=["scale-down-k2", "rollout-k1", "both-k2"],
)
def test_fan_out_never_strands_a_kept_worker(
    old: tuple[int, ...], new: tuple[int, ...], k: int, h: str
) -> None:
    """Drains and rebalancing wait until every kept worker has another READY world to the
    stage: at every moment of a scale-down or a roll, each READY worker reaches a READY
    worker of each neighbouring stage."""
    sim = converged_sim(want(*old, fan_out=k))
    sim.desired = want(*new, h=h, fan_out=k)
    new_id = namer("s")
    for _ in range(40):
        actions = plan(sim.desired, sim.observe(), new_id)
        if not actions:
            sim.tick()
            if not plan(sim.desired, sim.observe(), new_id):
                break
            continue
        before = set(stranded(sim))
        sim.apply(actions)  # drains and closes happen at once; opens are still OPENING
        # (a worker made READY by the last tick has only OPENING worlds: not serving yet)
        assert set(stranded(sim)) <= before, actions
        sim.tick()
    sim.assert_converged()
