"""Early exits (Apparate) on the two real workloads: latency, throughput and accuracy loss.

Workloads: EfficientNet-Lite0 on Fashion-MNIST (3 stages, split [6, 12]), MiniLM-L6 on
Rotten Tomatoes (2 stages, split [4]) and MPNet-base on Rotten Tomatoes (12 layers in 4
stages, split [4, 7, 10]); one worker per stage, real processes on loopback. Every figure
is measured ``REPEATS`` times, each time on fresh deployments, and reported as the median
(the goal is judged on it) with every value and the spread. Each workload runs three deployments, each its own pipeline, all started
together and driven in turn, on the same rows:

- **none**: no early exits (the baseline);
- **fixed**: every ramp on, one threshold tuned once offline (the ramps file's shared one);
- **online**: worldmesh's policy (per-ramp thresholds tuned online, ramp management).

In this order:

1. the **whole test split** (10,000 / 2,550 rows), every row once, sent by ``CLIENTS``
   closed-loop clients, to the two deployments with early exits in turn: the accuracy
   loss (answers whose label differs from the unsplit full model's, computed once per
   workload in this process on the same inputs). For the online policy this pass is also
   where it learns: its thresholds start closed, so its loss includes its warm-up. The
   baseline skips it: it answers with the full model (the pipeline's split is tested);
2. ``ROUNDS`` interleaved rounds, each deployment first in one of them (so that a drift
   in the machine's speed falls on all three alike): per round, each deployment gets a
   slice of a seeded sample of the split as Poisson arrivals at a fixed rate (the same
   schedule for the three; latency from each request's scheduled send time, median and
   p99 over all rounds, and the loss over these rows too), then a slice of the split
   sent closed loop (throughput: answers per second, the mean over the rounds; up to
   ``round_rows`` rows a round);
3. (online only) a **shift** in the input mix (vision: the same images with Gaussian
   noise, sigma 60 grey levels; text: only "rotten" sentences, then only "fresh"): how
   many requests after the shift until every later window of 100 answers has its
   disagreement within budget (0, said as such, when no window broke the budget).

Beside them, once per workload and in this process, the **ceiling**: per ramp, the most
rows it alone could release within the budget with its threshold set knowing every
answer of the split. The median moves only when more than half the rows are answered
early, so a first stage whose best ramp is far below half cannot give a large cut.

The ramps are trained first if missing (``worldmesh ramps train``, cached). ``--quick``
uses a sample of the split instead of all of it. The machine has 2 cores shared by every
worker and the client: read the load average beside each figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import torch
from common import Figure, median, percentile

from worldmesh_worker.data import fashion_mnist, rotten_tomatoes
from worldmesh_worker.exits.ramps import RampFileError, load_ramps, ramps_path
from worldmesh_worker.exits.train import errors_and_labels, features
from worldmesh_worker.local import LocalPipeline
from worldmesh_worker.models import load_model

BUDGET = 0.01
CLIENTS = 8
ROUNDS = 3  # interleaved latency and throughput rounds (as many as policies: each first once)


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    split: list[int]
    rate: float  # Poisson arrivals per second, the same for the three deployments
    latency_rows: int  # the latency run's sample of the test split
    shift_rows: int
    round_rows: int  # the most split rows a throughput round sends
    batching: dict[str, Any]


BATCH8 = {"maxBatchSize": 8}
VISION = Workload("vision", "efficientnet-lite0", [6, 12], 20.0, 1500, 400, 1500, BATCH8)
TEXT = Workload("text", "minilm-l6", [4], 12.0, 900, 300, 1500, BATCH8)
#: the 12-layer text model in four stages, as ``examples/mpnet-reviews.yaml`` cuts it; at
#: 9-13 answers/s a round of 300 rows takes half a minute
TEXT12 = Workload("text-mpnet", "mpnet-base", [4, 7, 10], 3.0, 300, 300, 300, BATCH8)
#: independent repetitions of every figure (fresh deployments each): a goal is met when
#: the median of them meets it
REPEATS = 3


def _ramps(model: Any) -> Any:
    try:
        return load_ramps(ramps_path(model.name), model)
    except RampFileError:
        from worldmesh_worker.exits.train import main as train

        assert train(["train", model.name]) == 0
        return load_ramps(ramps_path(model.name), model)


def _inputs(w: Workload, split_rows: int | None, shift_rows: int) -> tuple[list[Any], list[Any]]:
    """(test rows in a seeded order, ``split_rows`` of them or all; shifted rows), as
    single-row input dicts. The shifted rows are taken from the split too."""
    rng = np.random.default_rng(1)
    if w.model == "efficientnet-lite0":
        images, _ = fashion_mnist("test")
        pick = rng.permutation(len(images))
        clean = [images[i : i + 1] for i in pick[:split_rows]]
        noisy = []
        for i in pick[len(pick) - shift_rows :]:
            noise = rng.normal(0, 60, images[i].shape)
            noisy.append(np.clip(images[i] + noise, 0, 255).astype(np.uint8)[None])
        return [{"image": x} for x in clean], [{"image": x} for x in noisy]
    texts, labels = rotten_tomatoes("test")
    pick = rng.permutation(len(texts))
    clean = [texts[i] for i in pick[:split_rows]]
    rest = pick[::-1]
    rotten = [texts[i] for i in rest if labels[i] == 1][: shift_rows // 2]
    fresh = [texts[i] for i in rest if labels[i] == 0][: shift_rows - len(rotten)]
    as_input = lambda t: {"text": np.array([t.encode()], dtype=object)}  # noqa: E731
    return [as_input(t) for t in clean], [as_input(t) for t in rotten + fresh]


def _body(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    ((name, array),) = inputs.items()
    if array.dtype == object:
        spec = {"datatype": "BYTES", "data": [b.decode() for b in array.tolist()]}
    else:
        spec = {"datatype": "UINT8", "data": array.reshape(-1).tolist()}
    return {"inputs": [{"name": name, "shape": list(array.shape), **spec}]}


def _reference(model: Any, rows: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The unsplit full model's labels, in this process."""
    full = model.full()
    labels = []
    with torch.inference_mode():
        for i in range(0, len(rows), 32):
            chunk = rows[i : i + 32]
            (name,) = chunk[0]
            batch = {name: np.concatenate([r[name] for r in chunk])}
            labels.append(full(*model.preprocess(batch))[0].argmax(1).numpy())
    return np.concatenate(labels)


def _recorded(model: Any, ramps: Any, rows: list[Any], desc: str) -> tuple[np.ndarray, ...]:
    """Every ramp's (error, label) on ``rows``, and the full model's label, per row."""
    sites = sorted(ramps.ramps)
    feats, logits = features(model, rows, sites, desc=desc)
    errs = np.zeros((len(rows), len(sites)))
    labels = np.zeros((len(rows), len(sites)), dtype=np.int64)
    with torch.inference_mode():
        for j, site in enumerate(sites):
            errs[:, j], labels[:, j] = errors_and_labels(
                ramps.ramps[site].linear(feats[site].float())
            )
    return errs, labels, logits.argmax(1).numpy()


def _ceiling(errs: np.ndarray, labels: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Per ramp, the largest share of the rows it alone could release within ``BUDGET``
    with its threshold set knowing every answer: no online policy does better with it."""
    n = len(final)
    shares = np.zeros(errs.shape[1])
    for j in range(errs.shape[1]):
        order = np.argsort(errs[:, j])  # most confident first
        wrong = np.cumsum(labels[order, j] != final[order])
        within = np.flatnonzero(wrong <= BUDGET * n)
        shares[j] = (within[-1] + 1) / n if len(within) else 0.0
    return shares


def _stage(w: Workload, site: int) -> int:
    """The pipeline stage (0-based) whose blocks include ramp site ``site``."""
    return sum(site >= first for first in w.split)


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        doc = await response.json(content_type=None)
    if response.status != 200:
        return None, response.status
    label = next(o for o in doc["outputs"] if o["name"] == "label")["data"][0]
    return label, doc.get("parameters", {}).get("exit", "final")


async def _open_loop(url: str, bodies: list[dict], rate: float, seed: int) -> list[Any]:
    """Poisson arrivals; per request (latency from its scheduled time, label, exit)."""
    rng = np.random.default_rng(seed)
    results: list[Any] = [None] * len(bodies)
    async with aiohttp.ClientSession() as session:

        async def one(i: int, scheduled: float) -> None:
            label, exit_ = await _post(session, url, bodies[i])
            results[i] = (time.perf_counter() - scheduled, label, exit_)

        tasks = []
        t = time.perf_counter()
        for i in range(len(bodies)):
            t += rng.exponential(1.0 / rate)
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, t)))
        await asyncio.gather(*tasks)
    return results


async def _closed_loop(url: str, bodies: list[dict]) -> tuple[list[Any], float]:
    """Every body once, ``CLIENTS`` clients sending back to back: (label per body, answers
    per second)."""
    labels: list[Any] = [None] * len(bodies)
    next_row = iter(range(len(bodies)))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for i in next_row:  # shared: each row goes to whichever client is free
                labels[i], _ = await _post(session, url, bodies[i])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - start
    return labels, sum(label is not None for label in labels) / elapsed


def _recovery(wrong: list[bool], span: int = 100) -> tuple[int | None, bool]:
    """``(k, broke)``: ``k`` is the number of requests after the shift from which every
    later window of ``span`` consecutive answers is within budget (None: the last window
    is still over it), and ``broke`` whether any window after the shift was over budget
    at all (``(0, False)``: the budget never broke)."""
    over = [
        start
        for start in range(len(wrong) - span + 1)
        if sum(wrong[start : start + span]) / span > BUDGET
    ]
    if not over:
        return 0, False
    last = over[-1]
    return (None if last == len(wrong) - span else last + 1), True


POLICIES = ("none", "fixed", "online")


async def _deployments(
    w: Workload, split: list[dict], sample: list[dict], shifted: list[dict], ramps: Any
) -> dict[str, dict[str, Any]]:
    """The three deployments, each its own pipeline, all up at once (see module docstring)."""
    runs: dict[str, dict[str, Any]] = {
        p: {"answers": [], "rounds": [], "round_labels": [], "round_errors": 0} for p in POLICIES
    }
    async with contextlib.AsyncExitStack() as stack:
        urls = {}
        for policy in POLICIES:
            exits: dict[str, Any] = {"enabled": policy != "none", "accuracyBudget": BUDGET}
            if policy == "fixed":
                exits.update(policy="fixed", threshold=ramps.threshold)
            pipeline = await stack.enter_async_context(
                LocalPipeline(
                    w.model,
                    w.split,
                    [1] * (len(w.split) + 1),
                    deployment=f"{w.name}-{policy}",
                    batching={**w.batching, "maxQueueDelayMs": 2},
                    early_exits=exits,
                )
            )
            urls[policy] = f"{pipeline.front.http_url}/v2/models/{w.name}-{policy}/infer"
            runs[policy]["control"] = pipeline.front.control
        for policy in POLICIES:
            await _open_loop(urls[policy], sample[:40], w.rate, seed=99)  # warm-up
        # the baseline skips the whole split: a closed-loop round's worth warms it alike
        await _closed_loop(urls["none"], split[: w.round_rows])
        for policy in POLICIES[1:]:  # the whole split: loss (online: while it learns)
            runs[policy]["split"], runs[policy]["throughput"] = await _closed_loop(
                urls[policy], split
            )
        for r in range(ROUNDS):  # then interleaved rounds, each policy first in turn
            first = r % len(POLICIES)
            order = POLICIES[first:] + POLICIES[:first]
            for policy in order:  # latency: the same Poisson schedule for the three
                runs[policy]["answers"] += await _open_loop(
                    urls[policy], sample[r::ROUNDS], w.rate, seed=7 + r
                )
            chunk = split[r::ROUNDS][: w.round_rows]
            for policy in order:
                labels, rate = await _closed_loop(urls[policy], chunk)
                runs[policy]["rounds"].append(rate)
                runs[policy]["round_labels"] += labels
                runs[policy]["round_errors"] += sum(label is None for label in labels)
        runs["online"]["shift"] = await _open_loop(urls["online"], shifted, w.rate, seed=8)
        status = await runs["online"]["control"].status()
        runs["online"]["earlyExits"] = status.get("earlyExits")
    return runs


def _loss(labels: list[Any], reference: np.ndarray) -> float:
    """Fraction of answers that are missing or differ from the full model's."""
    wrong = [
        label is None or label != int(ref) for label, ref in zip(labels, reference, strict=True)
    ]
    return float(sum(wrong) / max(1, len(wrong)))


@dataclass(frozen=True)
class _Rows:
    """A workload's request bodies and the unsplit model's labels for them, made once."""

    split: list[dict]
    sample: list[dict]  # the latency rows: the first of the split
    shifted: list[dict]
    split_reference: np.ndarray
    shifted_reference: np.ndarray
    ceiling: dict[int, float]  # per ramp site: ``_ceiling`` on the split


def _rows(w: Workload, model: Any, ramps: Any, quick: bool) -> _Rows:
    split_rows, shift_rows = (w.latency_rows, w.shift_rows // 2) if quick else (None, w.shift_rows)
    split, shifted = _inputs(w, split_rows, shift_rows)
    sample = w.latency_rows // 4 if quick else w.latency_rows
    bodies = [_body(r) for r in split]
    ((name,),) = {tuple(split[0])}
    shares = _ceiling(*_recorded(model, ramps, [r[name][0] for r in split], "ceiling"))
    return _Rows(
        bodies,
        bodies[:sample],
        [_body(r) for r in shifted],
        _reference(model, split),
        _reference(model, shifted),
        dict(zip(sorted(ramps.ramps), shares.tolist(), strict=True)),
    )


async def _workload(w: Workload, ramps: Any, rows: _Rows) -> list[Figure]:
    """One independent run of ``w``'s figures, on fresh deployments."""
    split, sample = rows.split, rows.sample
    split_reference = rows.split_reference
    runs = await _deployments(w, split, sample, rows.shifted, ramps)
    latency_rows = [row for r in range(ROUNDS) for row in range(len(sample))[r::ROUNDS]]
    round_rows = [
        row for r in range(ROUNDS) for row in range(len(split))[r::ROUNDS][: w.round_rows]
    ]
    stats = {}
    for policy, run in runs.items():
        answers = run["answers"]
        ok = [a for a in answers if a[1] is not None]
        latencies = [a[0] for a in ok]
        exits = [a[2] for a in ok]
        stats[policy] = {
            "p50_ms": 1e3 * median(latencies),
            "mean_ms": 1e3 * sum(latencies) / len(latencies),
            "p99_ms": 1e3 * percentile(latencies, 99),
            # the baseline skips the whole-split pass (None)
            "accuracy_loss_split": _loss(run["split"], split_reference) if "split" in run else None,
            "accuracy_loss_latency_run": _loss(
                [a[1] for a in answers], split_reference[latency_rows]
            ),
            # after the first pass (online: learnt): the latency and throughput rounds
            "accuracy_loss_after_first_pass": _loss(
                [a[1] for a in answers] + run["round_labels"],
                np.concatenate([split_reference[latency_rows], split_reference[round_rows]]),
            ),
            "early_fraction": sum(e != "final" for e in exits) / max(1, len(exits)),
            # the median moves only with exits in the first stage: where they left
            "early_fraction_by_stage": [
                sum(e != "final" and _stage(w, e) == stage for e in exits) / max(1, len(exits))
                for stage in range(len(w.split) + 1)
            ],
            "throughput_rps": sum(run["rounds"]) / ROUNDS,
            "throughput_rounds_rps": run["rounds"],
            "throughput_first_pass_rps": run.get("throughput"),
            "errors": len(answers)
            - len(ok)
            + sum(label is None for label in run.get("split", []))
            + run["round_errors"],
        }
    base = stats["none"]
    detail = {
        "split_rows": len(split),
        "latency_rows": len(sample),
        "rate_rps": w.rate,
        "budget": BUDGET,
        "stats": stats,
        "online_status": runs["online"]["earlyExits"],
    }
    figures = []
    for policy in ("fixed", "online"):
        s = stats[policy]
        goal = policy == "online"
        figures += [
            Figure(
                f"{w.name}: median latency, {policy} early exits vs none",
                s["p50_ms"] / base["p50_ms"] - 1,
                "ratio-1",
                ("<= -0.4" if w.name == "vision" else "<= -0.15") if goal else "",
                f"none: p50 {base['p50_ms']:.1f} ms, {policy}: {s['p50_ms']:.1f} ms "
                f"({100 * s['early_fraction']:.0f}% answered by a ramp, "
                f"{100 * s['early_fraction_by_stage'][0]:.0f}% in the first stage; "
                f"{len(sample)} requests at {w.rate:g}/s)",
                detail=detail if goal else {},
            ),
            Figure(  # what the controller maximises: the mean saving under the budget
                f"{w.name}: mean latency, {policy} early exits vs none",
                s["mean_ms"] / base["mean_ms"] - 1,
                "ratio-1",
                "",
                f"none: mean {base['mean_ms']:.1f} ms, {policy}: {s['mean_ms']:.1f} ms",
            ),
            Figure(
                f"{w.name}: p99 latency, {policy} early exits vs none",
                s["p99_ms"] / base["p99_ms"] - 1,
                "ratio-1",
                "",
                f"none: p99 {base['p99_ms']:.1f} ms, {policy}: {s['p99_ms']:.1f} ms",
            ),
            Figure(
                f"{w.name}: accuracy loss vs the full model, {policy} early exits, "
                "whole test split",
                s["accuracy_loss_split"],
                "fraction",
                f"<= {BUDGET}" if goal else "",
                f"none: {base['accuracy_loss_latency_run']:.4f} over the latency run (same "
                f"model, must be 0); {len(split)} test rows; {s['accuracy_loss_latency_run']:.4f} over the "
                f"latency run, {s['accuracy_loss_after_first_pass']:.4f} over every round "
                "after the first pass",
            ),
            Figure(
                f"{w.name}: throughput, {policy} early exits ÷ none "
                f"({ROUNDS} interleaved rounds, {CLIENTS} clients)",
                s["throughput_rps"] / base["throughput_rps"],
                "x",
                ">= 0.97" if goal else "",
                f"none: {base['throughput_rps']:.1f}/s, {policy}: {s['throughput_rps']:.1f}/s; "
                "by round "
                + ", ".join(
                    f"{a / b:.2f}x"
                    for a, b in zip(
                        s["throughput_rounds_rps"], base["throughput_rounds_rps"], strict=True
                    )
                )
                + f"; {s['throughput_first_pass_rps']:.1f}/s over the first whole-split pass",
            ),
        ]
    shift = runs["online"]["shift"]
    wrong = [
        bool(a[1] is None or a[1] != ref)
        for a, ref in zip(shift, rows.shifted_reference, strict=True)
    ]
    recovered, broke = _recovery(wrong)
    best = [
        max(share for site, share in rows.ceiling.items() if _stage(w, site) == stage)
        for stage in range(len(w.split) + 1)
    ]
    figures.append(
        Figure(
            f"{w.name}: the most rows one first-stage ramp could release within budget, "
            "its threshold set knowing every answer",
            best[0],
            "fraction",
            "",
            "best ramp by stage "
            + ", ".join(f"{b:.2f}" for b in best)
            + f"; per ramp {', '.join(f'{s}: {v:.2f}' for s, v in rows.ceiling.items())}"
            + f"; {len(split)} test rows",
        )
    )
    figures.append(
        Figure(
            f"{w.name}: after an input-mix shift, requests from which every later "
            "100-request window is within budget",
            -1.0 if recovered is None else recovered,  # -1: not within the shifted requests
            "requests",
            "",
            (
                f"every window of 100 answers from there on has disagreement <= {BUDGET}"
                if broke
                else f"the budget never broke: every window of 100 answers <= {BUDGET}"
            )
            + f"; {len(shift)} shifted requests, loss over them "
            f"{sum(wrong) / max(1, len(wrong)):.4f}",
        )
    )
    return figures


def _over_repeats(repeats: list[list[Figure]]) -> list[Figure]:
    """One figure per name: the median of its repetitions (goal judged on it), every value
    and the spread beside it, and the median repetition's own baseline text."""
    out = []
    for figures in zip(*repeats, strict=True):
        values = [f.value for f in figures]
        middle = figures[sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]]
        out.append(
            Figure(
                middle.name,
                median(values),
                middle.unit,
                middle.goal,
                f"median of {len(values)} independent runs "
                f"{', '.join(f'{v:.4g}' for v in values)} (spread {max(values) - min(values):.4g}); "
                f"the median run: {middle.baseline}",
                samples=values,
                detail={"runs": [f.detail for f in figures]} if middle.detail else {},
            )
        )
    return out


async def run(quick: bool = False) -> list[Figure]:
    torch.set_num_threads(1)
    figures = []
    for workload in (VISION, TEXT, TEXT12):
        model = load_model(workload.model)
        ramps = _ramps(model)
        rows = _rows(workload, model, ramps, quick)
        repeats = [await _workload(workload, ramps, rows) for _ in range(1 if quick else REPEATS)]
        figures += _over_repeats(repeats)
    return figures
