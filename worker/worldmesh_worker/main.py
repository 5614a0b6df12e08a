"""``worldmesh worker --config FILE``: run one stage worker until SIGTERM, then drain and exit.

On start it prints one line ``WORLDMESH_READY {"http": PORT, "control": PORT}`` on stdout
(ports may be 0 in the file: the line says which were bound), so a supervisor knows
when the worker serves and where.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

import torch
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import grpc_server
from .config import ConfigError, WorkerConfig, load_config
from .control import READY_PREFIX
from .metrics import WorkerMetrics
from .server import ControlApp, InferenceApp
from .settings import WorkerSettings
from .stage import Stage

log = logging.getLogger("worldmesh.worker")
DRAIN_TIMEOUT_S = 60.0


async def serve(config: WorkerConfig, settings: WorkerSettings) -> None:
    from .models import load_model

    torch.set_num_threads(config.threads)
    model = load_model(config.model, settings=settings)
    metrics = WorkerMetrics(CollectorRegistry(), config.deployment, config.stage, config.worker)
    stage = Stage(config, model, metrics)
    control = ControlApp(stage, config.token)
    await stage.start()
    runners = []
    ports = {}
    for key, app, port in (
        ("http", InferenceApp(stage).app, config.http_port),
        ("control", control.app, config.control_port),
    ):
        # A client that hangs up cancels its handler: its rows are dropped downstream.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=key == "http"
        )
        await runner.setup()
        site = web.TCPSite(runner, config.host, port, reuse_address=True)
        await site.start()
        runners.append(runner)
        ports[key] = runner.addresses[0][1]
    grpc, ports["grpc"] = await grpc_server.start(stage, config.host, config.grpc_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY_PREFIX + json.dumps(ports), flush=True)
    log.info(
        "worker %s (stage %d) serving on %s %s", config.worker, config.stage, config.host, ports
    )
    try:
        await stop.wait()
        log.info("signal received: draining")
        stage.drain()
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while not stage.drained:
                await asyncio.sleep(0.01)
        log.info("drained")
    except TimeoutError:
        log.warning("drain did not finish within %g s; stopping anyway", DRAIN_TIMEOUT_S)
    finally:
        await stage.stop()
        await grpc.stop(grace=None)
        for runner in runners:
            await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worldmesh worker", description=__doc__)
    parser.add_argument("--config", required=True, help="worker configuration (YAML or JSON)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = WorkerSettings.from_env()  # the environment, read once
        config = load_config(args.config, settings)
        if not config.token:
            raise ConfigError("token: set WORLDMESH_TOKEN or tokenFile (the control API needs one)")
    except (ConfigError, ValueError) as exc:
        print(f"worldmesh worker: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config, settings))
    except ConfigError as exc:  # found once the model is loaded (e.g. early-exit ramps)
        print(f"worldmesh worker: {exc}", file=sys.stderr)
        return 2
    # Drained and closed: exit now, without finalizing the interpreter. A world's receive
    # thread (a daemon) may still be inside gloo's C++ when Python finalizes, and a thread
    # unwound there aborts the process (SIGABRT, seen after a clean drain on Kubernetes).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
