"""``worldmesh run <manifest>``: one deployment as local processes, reconciled until Ctrl-C.

The control step is the operator's (``loop.ControlLoop``), with a local runtime: every
``interval`` it reads the manifest again if it changed (a bad edit is reported and the
running spec kept), and runs one step: the built-in autoscaler, when enabled, moves the
workers per stage within min..max from the workers' own ``/metrics`` once a second; the
workers are observed, the reconciler plans, the runtime applies. A live table shows
stages, workers, worlds, requests/s, p50/p99 and queue depth. Ctrl-C (SIGINT) or SIGTERM marks the deployment deleted: every worker is drained,
then stopped, and no process is left behind.

With ``--prometheus URL`` the same autoscaler reads its signals from that Prometheus
instead, which scrapes the workers through the file-SD targets file the runtime keeps
(``--targets-file``; printed at start). ``--metrics-port`` serves the control loop's own
metrics (``worldmesh_stage_*``, ``worldmesh_autoscaler_*``) on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .loop import ControlLoop, Step
from .metrics import ControlMetrics, bound_port
from .metrics_source import DirectScrape, MetricsSource, PrometheusSource
from .reconciler import Observed, WorkerState
from .runtime.front import FrontService
from .runtime.local import LocalRuntime
from .spec import DeploymentSpec, SpecError, parse_spec
from .status import StatusBoard


def read_manifest(path: Path) -> DeploymentSpec:
    """Parse the first ModelDeployment in ``path``; SpecError/OSError/YAMLError on failure."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if not documents:
        raise SpecError([])
    return parse_spec(documents[0])


class LocalDeployment:
    """``ControlLoop`` over a LocalRuntime; ``run()`` returns once everything has stopped."""

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
        grpc_port: int | None = None,
    ) -> None:
        """``prometheus``: read the autoscaler's signals there (it should scrape
        ``targets_path``, every ``scrape_interval_s``) rather than from the workers.
        ``port``: serve one stable endpoint there (0: any free port) in front of whatever
        front workers run (``runtime/front.py``); None: the first front worker's own.
        ``grpc_port``: with ``port``, its gRPC side there too (0: any free port)."""
        self.manifest = manifest
        spec = read_manifest(manifest)
        self._mtime = manifest.stat().st_mtime
        self.interval = interval
        self.runtime = LocalRuntime(
            spec.name,
            lambda i: self.spec.stage_config(i),
            workdir,
            env=env,
            targets_path=targets_path,
        )
        source: MetricsSource = (
            PrometheusSource(
                prometheus,
                spec.name,
                rate_window_s=max(4 * scrape_interval_s, 2.0),
                stale_after_s=3 * scrape_interval_s + 1.0,
            )
            if prometheus
            else DirectScrape(self.runtime.targets)
        )
        self.loop = ControlLoop(spec, self.runtime, source, ControlMetrics())
        self.deleted = False
        self.errors: list[str] = []
        self.board = StatusBoard(out)
        self.front = FrontService(port=port, grpc_port=grpc_port) if port is not None else None

    @property
    def spec(self) -> DeploymentSpec:
        return self.loop.spec

    @property
    def wishes(self) -> dict[int, int]:
        """The autoscaler's worker count per stage."""
        return self.loop.scaling.wishes

    @property
    def observed(self) -> Observed:
        return self.loop.last.observed if self.loop.last else Observed()

    @property
    def control_metrics(self) -> ControlMetrics:
        return self.loop.metrics

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
            self.loop.spec = spec

    async def step(self) -> Step:
        step = await self.loop.step(self.deleted)
        for scaled in step.scaled:
            self.board.note(f"autoscaler: stage {scaled.decision.stage}: {scaled.decision.reason}")
        for action in step.actions:
            self.board.event(action)
        self.errors = step.errors
        if self.front is not None:  # after apply: a worker told to drain is left out now
            self.front.set_backends(self.runtime.fronts())
        return step

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
            while True:
                self.reload()
                step = await self.step()
                await self.board.render(self.runtime, step.summary)
                if self.deleted and not self.runtime.live():
                    return
                await asyncio.sleep(self.interval)

    def ready(self) -> bool:
        """An endpoint, some READY worker, and the last step's phase Ready."""
        step = self.loop.last
        return (
            step is not None
            and bool(self.runtime.endpoint)
            and step.summary["phase"] == "Ready"
            and any(w.state is WorkerState.READY for w in step.observed.workers)
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
    parser.add_argument(
        "--grpc-port",
        type=int,
        help="serve its gRPC side on this port (default: the manifest's spec.grpcPort, 8001 "
        "unless set; 0: any free port)",
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
            grpc_port=0 if args.grpc_port is None else args.grpc_port,
        )
        assert deployment.front is not None
        if args.port is None:  # the ports the front Service has on Kubernetes
            deployment.front.port = deployment.spec.ports.http
        if args.grpc_port is None:
            deployment.front.grpc_port = deployment.spec.ports.grpc
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
        print(f"worldmesh run: {exc} (choose another with --port or --grpc-port)", file=sys.stderr)
        return 2
    print(
        f"worldmesh run: endpoint {deployment.front.url}/v2/models/{deployment.spec.name}/infer"
        f", gRPC {deployment.front.grpc_target} (they stay while front workers come and go)",
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
