"""A real Prometheus for the tests: Debian's ``prometheus`` binary on 127.0.0.1.

``running_prometheus(tmp_path, targets_file)`` writes a config whose one scrape job reads
``targets_file`` through file-based service discovery, starts the binary on a free port
with its storage under ``tmp_path``, waits (bounded) for ``/-/ready``, yields its URL and
stops it (SIGTERM, then SIGKILL) on exit. A missing binary fails the test, naming the
package that provides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml

from worldmesh_worker.control import wait_until

SCRAPE_INTERVAL_S = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running_prometheus(
    tmp_path: Path, targets_file: Path, scrape_interval_s: float = SCRAPE_INTERVAL_S
) -> AsyncIterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is missing: `make setup` installs the Debian package"
    if not targets_file.exists():
        targets_file.write_text("[]")
    every = f"{round(scrape_interval_s * 1000)}ms"  # Prometheus takes no fractional seconds
    config = {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "scrape_configs": [
            {
                "job_name": "worldmesh",
                "honor_labels": True,  # the workers' own deployment/stage/worker labels
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:

            async def ready() -> bool:
                assert process.poll() is None, f"prometheus exited; see {tmp_path}/prometheus.log"
                try:
                    async with session.get(f"{url}/-/ready") as response:
                        return response.status == 200
                except (aiohttp.ClientError, TimeoutError, OSError):
                    return False

            await wait_until(ready, 30, "prometheus ready", interval=0.1)
        yield url
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def query(url: str, promql: str) -> list[dict[str, object]]:
    """An instant query's result vector."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/api/v1/query", params={"query": promql}) as response,
    ):
        body = await response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])
