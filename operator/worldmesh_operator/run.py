"""``worldmesh run <manifest>``: one deployment as local processes, reconciled until Ctrl-C.

The loop is the operator's, with a local runtime: every ``interval`` it reads the manifest
again if it changed (a bad edit is reported and the running spec kept), turns the spec into
the desired workers per stage (the built-in autoscaler, when enabled, moves them within
min..max from the workers' own ``/metrics`` once a second), observes the workers, plans
with the reconciler and applies the actions. A live table shows stages, workers, worlds, requests/s, p50/p99 and queue
depth. Ctrl-C (SIGINT) or SIGTERM marks the deployment deleted: every worker is drained,
then stopped, and no process is left behind.

With ``--prometheus URL`` the same autoscaler reads its signals from that Prometheus
instead, which scrapes the workers through the file-SD targets file the runtime keeps
(``--targets-file``; printed at start). ``--metrics-port`` serves the control loop's own
metrics (``worldmesh_stage_*``, ``worldmesh_autoscaler_*``) on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .desired import desired_of
from .metrics import ControlMetrics, bound_port
from .metrics_source import DirectScrape, MetricsSource, PrometheusSource, local_targets
from .reconciler import Observed, WorkerState, plan, summarize
from .runtime.front import FrontService
from .runtime.local import LocalRuntime
from .scaling import Autoscaler, stage_loads
from .spec import DeploymentSpec, SpecError, parse_spec
from .status import StatusBoard


def read_manifest(path: Path) -> DeploymentSpec:
    """Parse the first ModelDeployment in ``path``; SpecError/OSError/YAMLError on failure."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not documents:
        raise SpecError([])
    return parse_spec(documents[0])


class LocalDeployment:
    """The control loop over a LocalRuntime; ``run()`` returns once everything has stopped."""

    def __init__(
        self,
        manifest: Path,
        workdir: Path,
        *,
        interval: float = 0.25,
        env: dict[str, str] | None = None,
        out: Callable[[str], None] | None = None,
        prometheus: str | None = None,
        targets_path: Path | None = None,
        scrape_interval_s: float = 1.0,
        port: int | None = None,
    ) -> None:
        """``prometheus``: read the autoscaler's signals there (it should scrape
        ``targets_path``, every ``scrape_interval_s``) rather than from the workers.
        ``port``: serve one stable endpoint there (0: any free port) in front of whatever
        front workers run (``runtime/front.py``); None: the first front worker's own."""
        self.manifest = manifest
        self.spec = read_manifest(manifest)
        self._mtime = manifest.stat().st_mtime
        self.interval = interval
        self.runtime = LocalRuntime(
            self.spec.name,
            lambda i: self.spec.stage_config(i),
            workdir,
            env=env,
            targets_path=targets_path,
        )
        self.wishes: dict[int, int] = {}  # the autoscaler's worker count per stage
        self.autoscaler: Autoscaler | None = None
        self.metrics: MetricsSource = (
            PrometheusSource(
                prometheus,
                self.spec.name,
                rate_window_s=max(4 * scrape_interval_s, 2.0),
                stale_after_s=3 * scrape_interval_s + 1.0,
            )
            if prometheus
            else DirectScrape(lambda: local_targets(self.runtime))
        )
        self.control_metrics = ControlMetrics()
        self.scale_interval = 1.0
        self.deleted = False
        self.observed = Observed()
        self.errors: list[str] = []
        self.board = StatusBoard(out)
        self._suffix = itertools.count(1)
        self._stopped = asyncio.Event()
        self.front = FrontService(port=port) if port is not None else None

    def new_id(self, stage: int) -> str:
        return f"{self.spec.name}-s{stage}-{secrets.token_hex(2)}{next(self._suffix)}"

    def delete(self) -> None:
        self.deleted = True

    def reload(self) -> None:
        try:
            mtime = self.manifest.stat().st_mtime
            if mtime == self._mtime:
                return
            self._mtime = mtime
            spec = read_manifest(self.manifest)
        except (OSError, yaml.YAMLError, SpecError) as exc:
            self.board.note(f"manifest not applied, keeping the running spec: {exc}")
            return
        if spec.name != self.spec.name:
            self.board.note("manifest not applied: metadata.name cannot change while running")
            return
        if spec != self.spec:
            self.board.note("manifest changed: applying it")
            self.spec = spec

    async def step(self) -> list[str]:
        desired = desired_of(self.spec, self.wishes, self.deleted)
        self.observed = await self.runtime.observe()
        actions = plan(desired, self.observed, self.new_id)
        for action in actions:
            self.board.event(action)
        for stage in desired.stages:
            ready = [
                w
                for w in self.observed.workers
                if w.stage == stage.index and w.state is WorkerState.READY
            ]
            spec = self.spec.stages[stage.index]
            self.control_metrics.stage(
                self.spec.name,
                stage.index,
                desired=stage.workers,
                ready=len(ready),
                low=spec.min_replicas,
                high=spec.max_replicas,
            )
        errors = await self.runtime.apply(actions)
        if self.front is not None:  # after apply: a worker told to drain is left out now
            self.front.set_backends(self.runtime.front_urls())
        return errors

    async def autoscale(self, now: float) -> None:
        """One tick of the built-in autoscaler (stages pinned by ``spec.replicas`` excepted)."""
        policy = self.spec.autoscaling
        if not policy.enabled or self.deleted:
            return
        if self.autoscaler is None or self.autoscaler.spec != policy:
            self.autoscaler = Autoscaler(policy)
        signals = await self.metrics.stage_signals(policy.metric)
        loads = stage_loads(self.spec, self.wishes, signals, self.metrics.reporting)
        current = {load.stage: load.current for load in loads}
        for decision in self.autoscaler.decide(loads, now):
            if decision.workers != current[decision.stage]:
                self.board.note(f"autoscaler: stage {decision.stage}: {decision.reason}")
            self.control_metrics.decision(
                self.spec.name, decision, signals.get(decision.stage), current[decision.stage]
            )
            self.wishes[decision.stage] = decision.workers

    async def run(self) -> None:
        if self.front is not None:
            self.front.start()  # OSError (the port is taken) before any worker starts
            self.runtime.service_url = self.front.url
        try:
            await self._run()
        finally:
            if self.front is not None:
                self.front.close()

    async def _run(self) -> None:
        async with self.runtime:
            last_scale = 0.0
            while True:
                self.reload()
                if time.monotonic() - last_scale >= self.scale_interval:
                    last_scale = time.monotonic()
                    await self.autoscale(last_scale)
                self.errors = await self.step()
                await self.board.render(
                    self.runtime,
                    summarize(desired_of(self.spec, self.wishes, self.deleted), self.observed),
                )
                if self.deleted and not self.runtime.live():
                    return
                await asyncio.sleep(self.interval)

    def ready(self) -> bool:
        live = [w for w in self.observed.workers if w.state is WorkerState.READY]
        return (
            bool(self.runtime.endpoint)
            and summarize(desired_of(self.spec, self.wishes), self.observed)["phase"] == "Ready"
            and bool(live)
        )


async def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="worldmesh run", description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument(
        "--workdir", type=Path, help="configs and worker logs (default: a temp dir)"
    )
    parser.add_argument(
        "--prometheus",
        metavar="URL",
        help="read the autoscaler's signals from this Prometheus (it scrapes --targets-file)",
    )
    parser.add_argument(
        "--targets-file",
        type=Path,
        help="Prometheus file-SD targets of the workers (default: WORKDIR/targets.json)",
    )
    parser.add_argument(
        "--scrape-interval", type=float, default=15.0, help="that Prometheus's, in seconds"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve the control loop's metrics on this port"
    )
    parser.add_argument(
        "--port",
        type=int,
        help="serve the deployment's one endpoint on this port, whatever front workers come "
        "and go (default: the manifest's spec.port, 8080 unless set; 0: any free port)",
    )
    args = parser.parse_args(argv)
    if args.prometheus and not args.prometheus.startswith(("http://", "https://")):
        parser.error(f"--prometheus must be an http:// or https:// URL, got {args.prometheus!r}")
    try:
        deployment_dir = args.workdir or Path(tempfile.mkdtemp(prefix="worldmesh-run-"))
        targets = args.targets_file or deployment_dir / "targets.json"
        deployment = LocalDeployment(
            args.manifest,
            deployment_dir,
            prometheus=args.prometheus,
            targets_path=targets,
            scrape_interval_s=args.scrape_interval,
            port=0 if args.port is None else args.port,
        )
        assert deployment.front is not None
        if args.port is None:  # the port the front Service has on Kubernetes
            deployment.front.port = deployment.spec.ports.http
    except (OSError, yaml.YAMLError) as exc:
        print(f"worldmesh run: cannot read {args.manifest}: {exc}", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(
            f"worldmesh run: {args.manifest} is not a valid ModelDeployment:\n{exc}",
            file=sys.stderr,
        )
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, deployment.delete)
    print(
        f"worldmesh run: {deployment.spec.name}: {len(deployment.spec.stages)} stages; "
        f"logs in {deployment_dir}; Prometheus file-SD targets in {targets}",
        flush=True,
    )
    server = None
    if args.metrics_port is not None:
        server = await deployment.control_metrics.serve("127.0.0.1", args.metrics_port)
        print(f"worldmesh run: metrics on http://127.0.0.1:{bound_port(server)}/metrics")
    started = time.monotonic()
    try:
        deployment.front.start()
    except OSError as exc:
        print(f"worldmesh run: {exc} (choose another with --port)", file=sys.stderr)
        return 2
    print(
        f"worldmesh run: endpoint {deployment.front.url}/v2/models/{deployment.spec.name}/infer"
        " (it stays while front workers come and go)",
        flush=True,
    )
    try:
        await deployment.run()
    finally:
        if server is not None:
            await server.cleanup()
    print(
        f"worldmesh run: stopped after {time.monotonic() - started:.0f} s; no worker left",
        flush=True,
    )
    return 0
