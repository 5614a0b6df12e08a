"""How fast the online exit controller reacts to an input-mix shift, over many seeds.

The live benchmark (``exits_bench``) runs one shift per run, and its figure swings: a
window of 100 answers holds 2 disagreements 19% of the time at a steady 0.8% loss. Here
the controller is replayed, in this process, on the real ramps' recorded answers to rows
made as there (the full model's label for each, every ramp's error and label), over
``SEEDS`` seeded orders: ``WARM`` clean rows, then the shifted rows (vision: noisy
images, a seeded sample of them; text: only "rotten" sentences, then only "fresh").
Each seed runs twice on the same rows: with the controller's every shift test, and
without the exit-count test (``rate_alpha=0``, the baseline). Per seed: the requests
after the shift until every later 100-request window is within budget, and the loss
over the shifted rows; on ``LONG`` clean rows per seed, how often either controller took
clean rows for a shift, and the loss (against the 1% budget) after the first ``WARM``.
Requests are one row each, labelled before the next starts. The text split has 2,550
rows, so its clean rows repeat (in a new order each pass); the text shift is the same
300 rows in the same order for every seed, which varies only what came before.

A replayed ramp answers at the request's start plus ``ANSWER_AT[stage]`` (the latency
saved per exit is measured from there to the final answer, at 25 ms): about what the
live benchmark measures per stage, it only weighs the tuner's choice among ramps.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

import numpy as np
import torch
from common import Figure
from exits_bench import (
    TEXT,
    VISION,
    Workload,
    _inputs,
    _ramps,
    _recorded,
    _recovery,
    _stage,
)
from prometheus_client import CollectorRegistry

from worldmesh_worker.data import news_and_debates
from worldmesh_worker.exits.controller import ExitController
from worldmesh_worker.metrics import WorkerMetrics
from worldmesh_worker.models import load_model

SEEDS = 16
WARM = 3000  # clean rows before the shift
LONG = 9000  # clean rows per seed: false shifts, and the loss once learnt
FINAL_AT = 0.025
ANSWER_AT = {"vision": (0.010, 0.019, 0.024), "text": (0.013, 0.023)}


def _answers(w: Workload, quick: bool) -> dict[str, Any]:
    """The ramps' (errors, labels) and the full model's labels on the clean and shifted
    rows of ``exits_bench``."""
    model = load_model(w.model)
    ramps = _ramps(model)
    sites = sorted(ramps.ramps)
    clean, shifted = _inputs(w, 2000 if quick else None, w.shift_rows * (5 if w is VISION else 1))
    out: dict[str, Any] = {"sites": sites}
    for part, rows in (("clean", clean), ("shift", shifted)):
        ((name,),) = {tuple(rows[0])}
        out[part] = _recorded(model, ramps, [r[name][0] for r in rows], part)
    return out


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _controller(sites: list[int], rate_test: bool) -> tuple[ExitController, _Clock]:
    clock = _Clock()
    metrics = WorkerMetrics(CollectorRegistry(), "replay", 0, "replay")
    kwargs = {} if rate_test else {"rate_alpha": 0.0}
    controller = ExitController(sites, dict.fromkeys(sites, 0.0), metrics, clock=clock, **kwargs)
    return controller, clock


def _replay(
    w: Workload,
    answers: dict[str, Any],
    controller: ExitController,
    clock: _Clock,
    part: str,
    order: Any,
) -> list[tuple[int | None, bool]]:
    """Feed rows ``order`` of ``part``; per row (the stage that released it or None, wrong)."""
    errs, labels, final = answers[part]
    out = []
    for i in order:
        row = controller.requests
        start = float(row)
        clock.now = start
        controller.start_request([row], True)
        released = None
        for j, site in enumerate(controller.sites):
            if site not in controller.active:
                continue
            clock.now = start + ANSWER_AT[w.name][_stage(w, site)]
            controller.on_cost(site, 1e-4)
            # True once per row at most: a one-row request is released by its first answer
            if controller.on_ramp(row, site, 1.0 - errs[i, j], int(labels[i, j])):
                released = j
                controller.on_release(site)
        clock.now = start + FINAL_AT
        controller.on_final(row, int(final[i]))
        wrong = released is not None and labels[i, released] != final[i]
        stage = None if released is None else _stage(w, controller.sites[released])
        out.append((stage, bool(wrong)))
    return out


def _order(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """``rows`` row indices: seeded permutations of the ``n`` rows, one after another."""
    return np.concatenate([rng.permutation(n) for _ in range(-(-rows // n))])[:rows]


def _workload(w: Workload, quick: bool) -> list[Figure]:
    answers = _answers(w, quick)
    seeds, long = (4, WARM + 1500) if quick else (SEEDS, LONG)
    n_clean, n_shift = len(answers["clean"][2]), len(answers["shift"][2])
    runs: dict[bool, dict[str, list[Any]]] = {}
    for rate_test in (True, False):
        run: dict[str, list[Any]] = {
            "recovered": [],
            "loss": [],
            "first": [],
            "cuts": [],
            "steady_loss": [],
            "steady_first": [],
            "wrong_at": [],  # per seed: the shifted requests answered wrongly
        }
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            controller, clock = _controller(answers["sites"], rate_test)
            warm = _replay(w, answers, controller, clock, "clean", _order(rng, n_clean, WARM))
            run["first"].append(np.mean([s == 0 for s, _ in warm[-1500:]]))
            # vision: a sample of the noisy images; text, as live: rotten, then fresh
            sample = rng.permutation(n_shift)[: w.shift_rows]
            order = sample if w is VISION else np.arange(n_shift)
            wrong = [bad for _, bad in _replay(w, answers, controller, clock, "shift", order)]
            recovered, _ = _recovery(wrong)
            run["recovered"].append(recovered)
            run["loss"].append(float(np.mean(wrong)))
            run["wrong_at"].append([k for k, bad in enumerate(wrong) if bad])
            clean, clock = _controller(answers["sites"], rate_test)
            steady = _replay(w, answers, clean, clock, "clean", _order(rng, n_clean, long))
            run["cuts"].append(clean.cuts)
            run["steady_loss"].append(float(np.mean([bad for _, bad in steady[WARM:]])))
            run["steady_first"].append(float(np.mean([s == 0 for s, _ in steady[WARM:]])))
        runs[rate_test] = run

    def held(run: dict[str, list[Any]]) -> float:
        """The median over seeds; -1 when half of them or more never held."""
        median = statistics.median(math.inf if r is None else r for r in run["recovered"])
        return -1.0 if median == math.inf else float(median)

    def never(run: dict[str, list[Any]]) -> int:
        return sum(r is None for r in run["recovered"])

    def early(run: dict[str, list[Any]]) -> float:
        """The share of the shifted rows' wrong answers given in the first 60 requests."""
        wrong = [k for seed in run["wrong_at"] for k in seed]
        return sum(k < 60 for k in wrong) / max(1, len(wrong))

    new, old = runs[True], runs[False]
    detail = {
        "seeds": seeds,
        "warm_rows": WARM,
        "shift_rows": w.shift_rows,
        "long_rows": long,
        "runs": {"every test": new, "without the exit-count test": old},
    }
    return [
        Figure(
            f"{w.name} shift replay: median requests until every later 100-window holds",
            held(new),
            "requests",
            "",
            f"without the exit-count test {held(old):g}; never held {never(new)} / "
            f"{never(old)} of {seeds} seeds; loss over the shifted rows "
            f"{np.mean(new['loss']):.4f} / {np.mean(old['loss']):.4f}, of it in the first 60 "
            f"requests {early(new):.2f} / {early(old):.2f}; first stage, last "
            f"1,500 clean rows {np.mean(new['first']):.3f} / {np.mean(old['first']):.3f}",
            samples=[-1.0 if r is None else float(r) for r in new["recovered"]],
            detail=detail,
        ),
        Figure(
            f"{w.name} shift replay: clean stretches taken for a shift, {seeds} x {long} rows",
            float(sum(new["cuts"])),
            "cuts",
            "",
            f"without the exit-count test {sum(old['cuts'])}",
            samples=[float(c) for c in new["cuts"]],
        ),
        Figure(
            f"{w.name} replay: loss over clean rows after the first {WARM:,}, {seeds} seeds",
            float(np.mean(new["steady_loss"])),
            "fraction",
            "<= 0.01",
            f"{np.mean(new['steady_first']):.3f} of them left the first stage; without the "
            f"exit-count test {np.mean(old['steady_loss']):.4f} "
            f"({np.mean(old['steady_first']):.3f})",
            samples=new["steady_loss"],
        ),
    ]


CROSS_SEEDS = 8
CROSS_SKIP = 1000  # rows to learn on before the goals count
CROSS_WINDOW = 1000
BUDGET = 0.01


def _cross_answers() -> dict[str, Any]:
    """MiniLM-L6's ramps (trained on Rotten Tomatoes) and the full model on the Guardian's
    headlines and the 2016 debates' paragraphs (``data.news_and_debates``)."""
    model = load_model(TEXT.model)
    ramps = _ramps(model)
    texts = [t.encode() for t in news_and_debates()]
    return {
        "sites": sorted(ramps.ramps),
        "cross": _recorded(model, ramps, texts, "news and debates"),
    }


def _reversals(history: list[float]) -> int:
    """How often a threshold turned back: a rise after a fall, or a fall after a rise."""
    steps = [np.sign(b - a) for a, b in itertools.pairwise(history) if b != a]
    return sum(a != b for a, b in itertools.pairwise(steps))


def _cross_domain(quick: bool) -> list[Figure]:
    """Ramps trained on movie-review snippets, served on news headlines and debate
    paragraphs: the online controller's loss, windows, speed and steadiness there."""
    answers = _cross_answers()
    n = len(answers["cross"][2])
    seeds = 2 if quick else CROSS_SEEDS
    per_seed: list[dict[str, Any]] = []
    for seed in range(seeds):
        rng = np.random.default_rng(100 + seed)
        controller, clock = _controller(answers["sites"], rate_test=True)
        order = rng.permutation(n)
        active_changes, last_active = 0, set(controller.active)
        history: dict[int, list[float]] = {s: [controller.threshold(s)] for s in controller.sites}
        rows: list[tuple[int | None, bool]] = []
        for k, i in enumerate(order):
            rows += _replay(TEXT, answers, controller, clock, "cross", [i])
            if k == CROSS_SKIP:  # from here on, the changes count
                active_changes = 0
                history = {s: [controller.threshold(s)] for s in controller.sites}
            if controller.active != last_active:
                active_changes, last_active = active_changes + 1, set(controller.active)
            for site in controller.sites:
                if controller.threshold(site) != history[site][-1]:
                    history[site].append(controller.threshold(site))
        later = rows[CROSS_SKIP:]
        windows = [
            float(np.mean([bad for _, bad in later[k : k + CROSS_WINDOW]]))
            for k in range(0, len(later) - CROSS_WINDOW + 1, CROSS_WINDOW)
        ]
        latency = [FINAL_AT if stage is None else ANSWER_AT["text"][stage] for stage, _ in later]
        per_1000 = 1000 / (n - CROSS_SKIP)
        per_seed.append(
            {
                "loss": float(np.mean([bad for _, bad in later])),
                "windows": windows,
                "early": float(np.mean([stage is not None for stage, _ in later])),
                "median_ratio": float(np.median(latency)) / FINAL_AT,
                "active_changes_per_1000": active_changes * per_1000,
                "reversals_per_1000": sum(_reversals(h) for h in history.values()) * per_1000,
                "threshold_changes_per_1000": sum(len(h) - 1 for h in history.values()) * per_1000,
            }
        )

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in per_seed))

    windows = [w for r in per_seed for w in r["windows"]]
    detail = {"rows": n, "seeds": seeds, "skip": CROSS_SKIP, "per_seed": per_seed}
    where = f"news and debates ({n:,} rows, {seeds} seeded orders, after the first {CROSS_SKIP:,})"
    return [
        Figure(
            f"text cross-domain replay: disagreement, {where}",
            med("loss"),
            "fraction",
            f"<= {BUDGET}",
            f"per seed {[round(r['loss'], 4) for r in per_seed]}; {med('early'):.3f} of rows "
            "answered early (median)",
            samples=[r["loss"] for r in per_seed],
            detail=detail,
        ),
        Figure(
            f"text cross-domain replay: worst {CROSS_WINDOW:,}-row window ÷ budget",
            max(windows) / BUDGET,
            "x",
            "<= 1.5",
            f"every window: {[round(w, 4) for w in windows]}",
            samples=windows,
        ),
        Figure(
            "text cross-domain replay: median latency ÷ the full model's (modelled per stage)",
            med("median_ratio"),
            "x",
            "<= 0.99",
            f"a ramp answers at {ANSWER_AT['text']} s, the full model at {FINAL_AT} s",
        ),
        Figure(
            "text cross-domain replay: active-set changes per 1,000 rows after the first 1,000",
            med("active_changes_per_1000"),
            "per 1,000",
            "",
            f"threshold reversals {med('reversals_per_1000'):.2f} and threshold changes "
            f"{med('threshold_changes_per_1000'):.2f} per 1,000 rows (medians)",
        ),
    ]


async def run(quick: bool = False) -> list[Figure]:
    torch.set_num_threads(1)
    return _workload(VISION, quick) + _workload(TEXT, quick) + _cross_domain(quick)
