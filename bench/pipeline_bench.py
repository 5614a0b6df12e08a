"""Data-plane figures of whole pipelines: real worker processes on loopback, real worlds.

Every figure is measured against its baseline in the same run; ratios are taken within one
repetition, then the median over the repetitions (run one after the other, so the
baselines and what they measure interleave). Each figure carries the load average read
right after its last measurement; per-repetition numbers are in ``samples`` and ``detail``.

Covers:
- **new worker serving, after its process is ready**: a 3-stage ``toy-slow`` pipeline under
  a 6-client closed loop; a new stage-1 worker is started (``start_worker``: its READY
  line), then wired; the figure is the time from READY to its first computed batch (its
  ``worldmesh_batch_size_count``, polled every 5 ms while ``wire`` runs); the wire call
  alone is in ``detail``.
- **requests lost, a worker killed under load**: ``toy-slow`` with two stage-1 workers under
  a 6-client closed loop; one is SIGKILLed while it holds rows; the load goes on; lost
  requests summed over repetitions, with answers, the front's retries and the p99 latency of
  the second before and after the kill.
- **EfficientNet-Lite0 throughput**: the unsplit model at batch 1 in this process
  (``torch.set_num_threads(1)``, preprocessed Fashion-MNIST test images) against a 3-stage
  pipeline ([6, 12], one worker each, batches up to 8) over HTTP, driven by closed loops of N
  clients (best N reported); every answer's label is checked against the unsplit model's.
  A second figure puts the same pipeline against a one-stage worker of the unsplit model
  over HTTP (the HTTP cost seen apart).
- **latency at a fixed rate**: open-loop Poisson arrivals at half the in-process batch-1
  capacity, one task per request, the same schedule against the 3-stage pipeline and the
  one-stage worker; p50 and p99 ratios.

The machine has few cores and the client shares them: read the load average beside each
figure before comparing runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import torch
from common import Figure, cpu_seconds, median, percentile

from worldmesh_worker.control import wait_until
from worldmesh_worker.data import fashion_mnist
from worldmesh_worker.loadgen import ClosedLoop, toy_request
from worldmesh_worker.local import LocalPipeline, WorkerProcess
from worldmesh_worker.models import load_model

JOIN = "new worker serving, after its process is ready"
KILL = "requests lost, a worker killed under load"
THROUGHPUT = (
    "3-stage EfficientNet-Lite0 over HTTP (112 px), throughput ÷ unsplit model at batch 1 in "
    "one process"
)
THROUGHPUT_HTTP = (
    "3-stage EfficientNet-Lite0 over HTTP (112 px), throughput ÷ one-stage unsplit worker over HTTP"
)
P50 = "p50 latency at a fixed rate, pipeline ÷ unsplit model in one process"
P99 = "p99 latency at a fixed rate, pipeline ÷ unsplit model in one process"

TOY_SLOW = {"WORLDMESH_TOY_BLOCK_DELAY_S": "0.005"}
BATCHING = {"maxBatchSize": 8, "maxQueueDelayMs": 2}
DEPLOYMENT = "fashion"
SPLIT = [6, 12]


@dataclass(frozen=True)
class Settings:
    repetitions: int
    steady_s: float  # closed-loop load before a worker joins or dies
    after_kill_s: float  # load kept after the kill
    pool: int  # distinct test images sent (cycled)
    baseline_s: float
    warmup_s: float
    closed_s: float  # per concurrency
    concurrencies: tuple[int, ...]  # more clients than one batch, or no stage overlaps another
    open_s: float
    rate_fraction: float = 0.5


QUICK = Settings(1, 1.0, 1.5, 256, 4.0, 1.5, 4.0, (16,), 4.0)
FULL = Settings(3, 1.5, 2.0, 512, 6.0, 2.0, 5.0, (4, 8, 16), 8.0)


# -- small helpers --------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


async def scrape(session: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, float]:
    """A worker's /metrics, each series name summed over its labels."""
    async with session.get(worker.http_url + "/metrics") as response:
        text = await response.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = _NAME.match(line)
            if name:
                out[name.group(0)] = out.get(name.group(0), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def infer_url(pipeline: LocalPipeline) -> str:
    return f"{pipeline.front.http_url}/v2/models/{pipeline.deployment}/infer"


async def timed(start: float, call: Awaitable[Any]) -> float:
    await call
    return time.perf_counter() - start


# -- 1. a worker joins under load -------------------------------------------------------------


async def join_once(s: Settings) -> dict[str, Any]:
    async with LocalPipeline("toy-slow", [1, 3], [1, 1, 1], env=TOY_SLOW) as pipeline:
        async with ClosedLoop(infer_url(pipeline), toy_request, 6) as load:
            await load.answered(30)
            await asyncio.sleep(s.steady_s)
            started = time.perf_counter()
            worker = await pipeline.start_worker(1)
            t0 = time.perf_counter()  # its process is ready
            wiring = asyncio.create_task(timed(t0, pipeline.wire(worker)))

            async def first_batch() -> bool:
                metrics = await scrape(pipeline.session, worker)
                return metrics.get("worldmesh_batch_size_count", 0.0) > 0

            try:
                await wait_until(first_batch, 30, "a first batch at the new worker", 0.005)
                serving = time.perf_counter() - t0
            finally:
                wire = await wiring
            await load.answered(30)
        return {
            "serving_s": serving,
            "wire_s": wire,
            "process_start_s": t0 - started,
            "answered": load.result.ok,
            "lost": load.result.lost,
        }


# -- 2. a worker dies under load ------------------------------------------------------------


async def rows_inside(worker: WorkerProcess) -> bool:
    status = await worker.control.status()
    return status["queueRows"] + status["inFlightRows"] > 0


async def kill_once(s: Settings) -> dict[str, Any]:
    async with LocalPipeline("toy-slow", [1, 3], [1, 2, 1], env=TOY_SLOW) as pipeline:
        victim = pipeline.stage(1)[0]
        marks: list[tuple[float, int]] = []  # (time, answers so far): latencies by window

        async with ClosedLoop(infer_url(pipeline), toy_request, 6) as load:

            async def sample() -> None:
                while True:
                    marks.append((time.perf_counter(), len(load.result.latencies)))
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            try:
                await load.answered(30)
                await asyncio.sleep(max(1.0, s.steady_s))
                await wait_until(lambda: rows_inside(victim), 10, "rows inside the victim", 0.005)
                killed = time.perf_counter()
                pipeline.kill(victim)
                await asyncio.sleep(s.after_kill_s)
                await load.answered(30)
            finally:
                sampler.cancel()
        async with pipeline.session.get(pipeline.front.http_url + "/metrics") as response:
            text = await response.text()
        retries = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("worldmesh_retries_total{")
        )

    def answered_by(t: float) -> int:
        return max((n for when, n in marks if when <= t), default=0)

    lat = load.result.latencies
    before = lat[answered_by(killed - 1.0) : answered_by(killed)]
    after = lat[answered_by(killed) : answered_by(killed + 1.0)]
    return {
        "lost": load.result.lost,
        "answered": load.result.ok,
        "retries": retries,
        "p99_before_ms": ms(percentile(before, 99)),
        "p99_after_ms": ms(percentile(after, 99)),
        "answers_before": len(before),
        "answers_after": len(after),
        "messages": load.result.messages[:3],
    }


# -- 3 and 4. EfficientNet-Lite0 ------------------------------------------------------------


@dataclass
class Images:
    """The test images sent, their request bodies, true labels and the unsplit model's labels."""

    raw: np.ndarray
    truth: np.ndarray
    tensors: list[tuple[torch.Tensor, ...]]
    bodies: list[bytes]
    reference: np.ndarray  # -1 until the unsplit model has labelled it

    @classmethod
    def load(cls, model: Any, n: int) -> Images:
        images, labels = fashion_mnist("test")
        chosen = np.random.default_rng(0).permutation(len(images))[:n]
        raw, truth = images[chosen], labels[chosen]
        tensors = [model.preprocess({"image": raw[i : i + 1]}) for i in range(n)]
        bodies = [
            json.dumps(
                {
                    "id": str(i),
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "UINT8",
                            "shape": [1, 28, 28],
                            "data": raw[i].ravel().tolist(),
                        }
                    ],
                    "outputs": [{"name": "label"}],
                }
            ).encode()
            for i in range(n)
        ]
        return cls(raw, truth, tensors, bodies, np.full(n, -1, dtype=np.int64))


def baseline_loop(full: Any, images: Images, seconds: float) -> dict[str, Any]:
    """The unsplit model at batch 1 in this process for ``seconds``: images/s."""
    drift = 0
    latencies = []
    with torch.inference_mode():
        for x in images.tensors[:3]:
            full(*x)  # warm-up (first calls build the kernels)
        n = 0
        start = time.perf_counter()
        end = start + seconds
        while (t := time.perf_counter()) < end:
            i = n % len(images.tensors)
            (logits,) = full(*images.tensors[i])
            label = int(logits.argmax(1))
            latencies.append(time.perf_counter() - t)
            if images.reference[i] < 0:
                images.reference[i] = label
            elif images.reference[i] != label:
                drift += 1
            n += 1
        elapsed = time.perf_counter() - start
        for i in np.flatnonzero(images.reference < 0):  # label the rest, untimed
            (logits,) = full(*images.tensors[i])
            images.reference[i] = int(logits.argmax(1))
    return {
        "images_per_s": n / elapsed,
        "images": n,
        "p50_ms": ms(median(latencies)),
        "p99_ms": ms(percentile(latencies, 99)),
        "nondeterministic_labels": drift,
    }


@dataclass
class Answers:
    """Every answer a served deployment gave, checked against the unsplit model."""

    answered: int = 0
    mismatches: int = 0  # label differs from the unsplit model's
    correct: int = 0  # label equals the true label
    errors: int = 0
    messages: list[str] = field(default_factory=list)

    def check(self, i: int, status: int, body: bytes, images: Images) -> bool:
        if status != 200:
            self.errors += 1
            if len(self.messages) < 3:
                self.messages.append(f"{status}: {body[:200]!r}")
            return False
        label = int(json.loads(body)["outputs"][0]["data"][0])
        self.answered += 1
        self.correct += label == images.truth[i]
        if label != images.reference[i]:
            self.mismatches += 1
            if len(self.messages) < 3:
                self.messages.append(f"image {i}: {label}, unsplit model {images.reference[i]}")
        return True


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, f"{type(exc).__name__}: {exc}".encode()


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    images: Images,
    answers: Answers,
    clients: int,
    seconds: float,
) -> float:
    """``clients`` clients back to back for ``seconds``: answers per second in that window."""
    ids = itertools.count()
    done = 0
    end = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < end:
            i = next(ids) % len(images.bodies)
            status, body = await post(session, url, images.bodies[i])
            if answers.check(i, status, body, images) and time.perf_counter() <= end:
                done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (end - start)


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    images: Images,
    answers: Answers,
    rate: float,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s, one task each; latency counted from the scheduled time."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    lateness: list[float] = []
    tasks = []

    async def one(i: int, scheduled: float) -> None:
        lateness.append(time.perf_counter() - scheduled)
        status, body = await post(session, url, images.bodies[i])
        if answers.check(i, status, body, images):
            latencies.append(time.perf_counter() - scheduled)

    start = time.perf_counter()
    t = start
    for n in itertools.count():
        t += rng.exponential(1.0 / rate)
        if t - start > seconds:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n % len(images.bodies), t)))
    await asyncio.gather(*tasks)
    return {
        "requests": len(tasks),
        "p50_ms": ms(median(latencies)),
        "p99_ms": ms(percentile(latencies, 99)),
        "client_lateness_p99_ms": ms(percentile(lateness, 99)),
    }


async def where_time_goes(
    session: aiohttp.ClientSession, pipeline: LocalPipeline, run: Callable[[], Awaitable[float]]
) -> tuple[float, dict[str, Any]]:
    """Run ``run`` and report, per worker, CPU use, compute busy share and mean batch."""
    workers = list(pipeline.workers)
    before = [await scrape(session, w) for w in workers]
    cpu0 = [cpu_seconds(w.pid) for w in workers]
    client0 = time.process_time()
    t0 = time.perf_counter()
    rate = await run()
    wall = time.perf_counter() - t0
    client = time.process_time() - client0
    per: dict[str, Any] = {"client_cpu": round(client / wall, 2)}
    for w, m0, c0 in zip(workers, before, cpu0, strict=True):
        m1 = await scrape(session, w)
        batches = m1["worldmesh_batch_size_count"] - m0["worldmesh_batch_size_count"]
        compute = (
            m1["worldmesh_stage_compute_seconds_sum"] - m0["worldmesh_stage_compute_seconds_sum"]
        )
        rows = m1["worldmesh_batch_size_sum"] - m0["worldmesh_batch_size_sum"]
        per[f"stage{w.stage}"] = {
            "cpu": round((cpu_seconds(w.pid) - c0) / wall, 2),  # cores used
            "compute_busy": round(compute / wall, 2),
            "mean_batch": round(rows / batches, 2) if batches else 0.0,
            "compute_ms_per_batch": ms(compute / batches) if batches else 0.0,
        }
    return rate, per


async def serve(
    pipeline: LocalPipeline, s: Settings, images: Images, rate: float, seed: int
) -> dict[str, Any]:
    """Start a deployment (untimed), warm it up, then the closed loops and the open loop."""
    answers = Answers()
    out: dict[str, Any] = {"closed": {}, "stages": {}}
    started = time.perf_counter()
    async with pipeline:
        out["start_s"] = round(time.perf_counter() - started, 1)
        url = infer_url(pipeline)
        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await closed_loop(session, url, images, answers, max(s.concurrencies), s.warmup_s)
            for n in s.concurrencies:

                def run(n: int = n) -> Awaitable[float]:
                    return closed_loop(session, url, images, answers, n, s.closed_s)

                rate_n, stages = await where_time_goes(session, pipeline, run)
                out["closed"][n] = round(rate_n, 1)
                out["stages"][n] = stages
            out["open"] = await open_loop(session, url, images, answers, rate, s.open_s, seed)
    best = max(out["closed"], key=out["closed"].get)
    out["best"] = out["closed"][best]
    out["best_clients"] = best
    out["stages"] = out["stages"][best]  # where the time went at the best concurrency
    out["answered"] = answers.answered
    out["mismatches"] = answers.mismatches
    out["errors"] = answers.errors
    out["accuracy"] = round(answers.correct / answers.answered, 4) if answers.answered else None
    out["messages"] = answers.messages
    return out


async def efficientnet_once(
    s: Settings, full: Any, images: Images, rep: int
) -> tuple[dict[str, Any], tuple[float, float, float]]:
    base = baseline_loop(full, images, s.baseline_s)
    after_base = os.getloadavg()
    rate = s.rate_fraction * base["images_per_s"]
    three = await serve(
        LocalPipeline(
            "efficientnet-lite0", SPLIT, [1, 1, 1], deployment=DEPLOYMENT, batching=BATCHING
        ),
        s,
        images,
        rate,
        seed=rep,
    )
    one = await serve(
        LocalPipeline("efficientnet-lite0", [], [1], deployment=DEPLOYMENT, batching=BATCHING),
        s,
        images,
        rate,
        seed=rep,
    )
    return {"baseline": base, "rate": rate, "three": three, "one": one}, after_base


# -- the figures ----------------------------------------------------------------------------


async def run(quick: bool) -> list[Figure]:
    s = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return await _run(s)
    finally:
        torch.set_num_threads(threads)


async def _run(s: Settings) -> list[Figure]:
    model = load_model("efficientnet-lite0")
    full = model.full()
    images = Images.load(model, s.pool)
    joins: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    nets: list[dict[str, Any]] = []
    errors: dict[str, list[str]] = {"join": [], "kill": [], "efficientnet": []}
    load: dict[str, list[tuple[float, float, float]]] = {k: [] for k in errors}

    async def attempt(key: str, call: Callable[[], Awaitable[Any]], into: list[Any]) -> None:
        try:
            into.append(await call())
        except Exception as exc:  # one failed repetition must not lose the others
            errors[key].append(f"{type(exc).__name__}: {exc}"[:500])
        load[key].append(os.getloadavg())

    for rep in range(s.repetitions):
        await attempt("join", lambda: join_once(s), joins)
        await attempt("kill", lambda: kill_once(s), kills)
        await attempt("efficientnet", lambda rep=rep: efficientnet_once(s, full, images, rep), nets)

    def last_load(key: str) -> tuple[float, float, float]:
        return load[key][-1] if load[key] else os.getloadavg()

    def loads(key: str) -> list[float]:
        return [round(x[0], 2) for x in load[key]]

    figures = [
        Figure(
            JOIN,
            median([j["serving_s"] for j in joins]),
            "s",
            "<= 2",
            baseline=f"wire call alone: {median([j['wire_s'] for j in joins]):.3f} s (median)",
            samples=[round(j["serving_s"], 4) for j in joins],
            loadavg=last_load("join"),
            detail={
                "wire_s": [round(j["wire_s"], 4) for j in joins],
                "process_start_s": [round(j["process_start_s"], 2) for j in joins],
                "lost_during_join": [j["lost"] for j in joins],
                "answered": [j["answered"] for j in joins],
                "pipeline": "toy-slow [1, 3] x [1, 1, 1] + 1 stage-1 worker, 5 ms/block, 6 clients",
                "loadavg_1m_per_rep": loads("join"),
                "errors": errors["join"],
            },
        ),
        Figure(
            KILL,
            float(sum(k["lost"] for k in kills)) if kills else float("nan"),
            "requests",
            "== 0",
            baseline=(
                f"p99 before the kill {median([k['p99_before_ms'] for k in kills]):.1f} ms, "
                f"second after {median([k['p99_after_ms'] for k in kills]):.1f} ms"
            ),
            samples=[k["lost"] for k in kills],
            loadavg=last_load("kill"),
            detail={
                "answered": [k["answered"] for k in kills],
                "retries": [k["retries"] for k in kills],
                "p99_before_ms": [k["p99_before_ms"] for k in kills],
                "p99_second_after_ms": [k["p99_after_ms"] for k in kills],
                "answers_second_before": [k["answers_before"] for k in kills],
                "answers_second_after": [k["answers_after"] for k in kills],
                "pipeline": "toy-slow [1, 3] x [1, 2, 1], 5 ms/block, 6 clients, SIGKILL",
                "messages": [m for k in kills for m in k["messages"]],
                "loadavg_1m_per_rep": loads("kill"),
                "errors": errors["kill"],
            },
        ),
    ]
    figures += efficientnet_figures(
        s, images, nets, last_load("efficientnet"), loads("efficientnet")
    )
    for f in figures[2:]:
        f.detail["errors"] = errors["efficientnet"]
    return figures


def efficientnet_figures(
    s: Settings,
    images: Images,
    nets: list[tuple[dict[str, Any], tuple[float, float, float]]],
    loadavg: tuple[float, float, float],
    loads: list[float],
) -> list[Figure]:
    reps = [r for r, _ in nets]
    base = [r["baseline"]["images_per_s"] for r in reps]
    three = [r["three"]["best"] for r in reps]
    one = [r["one"]["best"] for r in reps]
    vs_base = [t / b for t, b in zip(three, base, strict=True)]
    vs_one = [t / o for t, o in zip(three, one, strict=True)]
    common = {
        "repetitions": len(reps),
        "loadavg_1m_per_rep": loads,
        "loadavg_1m_after_baseline": [round(la[0], 2) for _, la in nets],
    }

    def served(key: str) -> dict[str, Any]:
        return {
            "images_per_s_by_clients": [r[key]["closed"] for r in reps],
            "best_clients": [r[key]["best_clients"] for r in reps],
            "answered": sum(r[key]["answered"] for r in reps),
            "mismatches_vs_unsplit": sum(r[key]["mismatches"] for r in reps),
            "http_errors": sum(r[key]["errors"] for r in reps),
            "accuracy_vs_true_labels": [r[key]["accuracy"] for r in reps],
            "where_time_goes_at_best": [r[key]["stages"] for r in reps],
            "start_s": [r[key]["start_s"] for r in reps],
            "messages": [m for r in reps for m in r[key]["messages"]],
        }

    labelled = images.reference >= 0
    pool_accuracy = (
        round(float((images.reference == images.truth)[labelled].mean()), 4)
        if labelled.any()
        else None
    )
    detail_base = {
        "baseline_images_per_s": [round(b, 1) for b in base],
        "baseline_p50_ms": [r["baseline"]["p50_ms"] for r in reps],
        "baseline_nondeterministic_labels": sum(
            r["baseline"]["nondeterministic_labels"] for r in reps
        ),
        "baseline": "unsplit model, batch 1, 1 thread, preprocessed images, in this process",
        "pipeline": f"split {SPLIT}, 1 worker per stage, batching {BATCHING}, JSON UINT8 [1,28,28]",
        "images": s.pool,
        "unsplit_accuracy_on_pool": pool_accuracy,
    }
    three_detail = served("three")
    one_detail = served("one")
    figures = [
        Figure(
            THROUGHPUT,
            median(vs_base),
            "x",
            ">= 0.8",
            baseline=(
                f"unsplit batch-1 loop: {median(base):.0f} img/s; "
                f"pipeline {median(three):.0f} img/s"
            ),
            samples=[round(x, 3) for x in vs_base],
            loadavg=loadavg,
            detail={**common, **detail_base, **three_detail},
        ),
        Figure(
            THROUGHPUT_HTTP,
            median(vs_one),
            "x",
            baseline=(
                f"one-stage HTTP worker: {median(one):.0f} img/s "
                f"({median([o / b for o, b in zip(one, base, strict=True)]):.2f}x the "
                "batch-1 loop)"
            ),
            samples=[round(x, 3) for x in vs_one],
            loadavg=loadavg,
            detail={**common, "one_stage": one_detail, "pipeline_images_per_s": three},
        ),
    ]
    rates = [round(r["rate"], 1) for r in reps]
    for name, key in ((P50, "p50_ms"), (P99, "p99_ms")):
        pipe = [r["three"]["open"][key] for r in reps]
        single = [r["one"]["open"][key] for r in reps]
        ratios = [p / o for p, o in zip(pipe, single, strict=True)]
        figures.append(
            Figure(
                name,
                median(ratios),
                "x",
                baseline=(
                    f"one-stage unsplit worker over HTTP at {median(rates):.0f} req/s: "
                    f"{key[:3]} {median(single):.1f} ms; pipeline {median(pipe):.1f} ms"
                ),
                samples=[round(x, 3) for x in ratios],
                loadavg=loadavg,
                detail={
                    **common,
                    "rate_req_per_s": rates,
                    "rate": f"{s.rate_fraction:.0%} of the in-process batch-1 capacity",
                    "seconds": s.open_s,
                    f"pipeline_{key}": pipe,
                    f"one_stage_{key}": single,
                    "in_process_batch1_compute_p50_ms": [r["baseline"]["p50_ms"] for r in reps],
                    "pipeline_open_loop": [r["three"]["open"] for r in reps],
                    "one_stage_open_loop": [r["one"]["open"] for r in reps],
                },
            )
        )
    return figures
