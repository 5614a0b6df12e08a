"""A live worldmesh and a real Prometheus scraping it, shared by the observability tests.

``live`` (one per package) starts:
- a real two-stage ``toy`` pipeline (two worker processes and their Gloo world) and sends it
  requests, good and bad, so the request, latency, batch and world series have samples;
- the control plane's real ``ControlMetrics`` server, fed the sizes and decisions of the
  two stages through its own API as the control loop does, on an event loop of its own
  thread (the fixture's loop is idle while a plain test runs, and a scrape must not wait);
- the ``prometheus`` binary on 127.0.0.1 (free port, temporary storage), scraping both
  every second as jobs ``worldmesh-workers`` and ``worldmesh-operator``, with the chart's
  rules file loaded and evaluated every second.
It yields once every target is up and the recording rules have produced series, and stops
everything afterwards. ``exported`` is the set of series names the live ``/metrics``
endpoints declare (``# TYPE`` lines, histograms expanded), checked against every query.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
import yaml

from worldmesh_operator.metrics import ControlMetrics, bound_port
from worldmesh_operator.scaling import Decision
from worldmesh_worker.control import wait_until
from worldmesh_worker.local import LocalPipeline

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "worldmesh" / "rules" / "worldmesh.rules.yaml"
DEPLOYMENT = "obs"


@dataclass
class Live:
    prometheus: str  # base URL
    exported: set[str]  # series names declared on the live /metrics endpoints
    pipeline: LocalPipeline

    def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` of ``expr``: the whole answer (status, data or error)."""
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            return json.load(e)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.prometheus}{path}", timeout=30) as response:
            return json.load(response)["data"]


def series_names(exposition: str) -> set[str]:
    """The series names an exposition declares: a histogram is its _bucket, _sum, _count."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            suffixes = {
                "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"),
            }
            names.update(name + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_config(workers: list[str], operator: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "worldmesh-workers", "static_configs": [{"targets": workers}]},
            {"job_name": "worldmesh-operator", "static_configs": [{"targets": [operator]}]},
        ],
    }


async def _traffic(pipeline: LocalPipeline) -> None:
    url = f"{pipeline.front.http_url}/v2/models/{DEPLOYMENT}/infer"
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 16], "data": [1.0] * 32}]}
    for _ in range(20):
        async with pipeline.session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
    async with pipeline.session.post(url, data=b"{") as response:
        assert response.status == 400


def _feed(control: ControlMetrics) -> None:
    """What the control loop reports for this 1-1 pipeline, with one scale-up decision."""
    for stage in (0, 1):
        control.stage(DEPLOYMENT, stage, desired=1, ready=1, low=1, high=3)
        control.decision(DEPLOYMENT, Decision(stage, 1, "steady"), signal=0.5, current=1)
    control.decision(DEPLOYMENT, Decision(1, 2, "queue above target"), signal=3.0, current=1)


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200, url
        return await response.text()


def serve_in_thread(control: ControlMetrics) -> tuple[str, Callable[[], None]]:
    """``control.serve()`` on a loop in a thread of its own; its address and a stop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="control-metrics", daemon=True)
    thread.start()
    runner = asyncio.run_coroutine_threadsafe(control.serve("127.0.0.1", 0), loop).result(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    return f"127.0.0.1:{bound_port(runner)}", stop


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def live() -> AsyncIterator[Live]:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: run `make setup` (Debian package)"
    control = ControlMetrics()
    async with LocalPipeline("toy", [2], [1, 1], deployment=DEPLOYMENT) as pipeline:
        operator, stop_control = serve_in_thread(control)
        storage = tempfile.TemporaryDirectory(prefix="worldmesh-prometheus-")
        log_path = Path(storage.name) / "prometheus.log"
        process: subprocess.Popen[bytes] | None = None
        try:
            _feed(control)
            await _traffic(pipeline)
            workers = [f"127.0.0.1:{w.http_port}" for w in pipeline.workers]
            exported: set[str] = set()
            for url in [f"http://{t}/metrics" for t in [*workers, operator]]:
                exported |= series_names(await _scrape(pipeline.session, url))
            config = Path(storage.name) / "prometheus.yml"
            config.write_text(yaml.safe_dump(prometheus_config(workers, operator)))
            port = free_port()
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [
                        binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={storage.name}/data",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            stack = Live(f"http://127.0.0.1:{port}", exported, pipeline)

            async def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(f"prometheus exited:\n{log_path.read_text()[-3000:]}")
                try:
                    async with pipeline.session.get(stack.prometheus + "/-/ready") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(ready, 60, "prometheus ready", interval=0.2)

            async def scraped_and_recorded() -> bool:
                await _traffic(pipeline)  # rates need samples on both sides of a window
                up = await asyncio.to_thread(stack.query, "min(up)")
                recorded = await asyncio.to_thread(
                    stack.query, "deployment_stage:worldmesh_batch_size:mean_rate5m"
                )
                # The control metrics are fed once, before the first scrape: their rates
                # exist once two scrapes of them are in (a CI run queried after one).
                decided = await asyncio.to_thread(
                    stack.query, "increase(worldmesh_autoscaler_decisions_total[1m])"
                )
                return bool(
                    up["data"]["result"]
                    and up["data"]["result"][0]["value"][1] == "1"
                    and len(recorded["data"]["result"]) == 2
                    and decided["data"]["result"]
                )

            await wait_until(scraped_and_recorded, 90, "targets up and rules recorded", 1.0)
            yield stack
        finally:
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
            stop_control()
            storage.cleanup()
