"""``worldmesh load`` as a user runs it, against small HTTP servers on loopback:

- every request failing (503): the command exits 1 and says how many failed, against the
  ``--max-error-rate`` it names; with ``--max-error-rate 1`` it exits 0;
- a server that never answers: the command still stops at ``--duration`` (the requests in
  flight are cut off and counted apart) and exits 1 (nothing answered);
- ``--dataset auto`` (the default) picks the samples from the model's metadata: a real toy
  worker is driven with toy rows, every answer right; a server without metadata gets a
  clear error (exit 2) that says to choose ``--dataset``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from worldmesh_operator import load
from worldmesh_worker.local import LocalPipeline

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def unavailable(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"error": "draining"}, status=503)


async def silent(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    return web.json_response({})


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v2/models/m/infer", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v2/models/m/infer"

    yield start
    for runner in runners:
        await runner.cleanup()


def args(endpoint: str, *extra: str) -> object:
    parser = __import__("argparse").ArgumentParser()
    load.add_arguments(parser)
    return parser.parse_args([endpoint, "--concurrency", "2", *extra])


def fashion(endpoint: str, *extra: str) -> object:
    return args(endpoint, "--dataset", "fashion-mnist", *extra)


@pytest.mark.models
async def test_failed_requests_make_it_exit_1_unless_allowed(
    serve: Callable[[Handler], Awaitable[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url = await serve(unavailable)
    assert await load.main(fashion(url, "--duration", "1")) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "requests failed (100.00%), above --max-error-rate 0" in err
    code = await load.main(fashion(url, "--duration", "1", "--max-error-rate", "1"))  # type: ignore[arg-type]
    assert code == 1  # allowed, but nothing was answered at all
    assert "no request was answered" in capsys.readouterr().err


@pytest.mark.models
async def test_it_stops_at_the_deadline_even_when_nothing_answers(
    serve: Callable[[Handler], Awaitable[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url = await serve(silent)
    started = time.monotonic()
    code = await load.main(fashion(url, "--duration", "1.5"))  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert code == 1
    assert took < 1.5 + 1.0, f"ran {took:.1f} s for --duration 1.5"
    out = capsys.readouterr().out
    assert "2 in flight at the deadline, cut off" in out, out


async def test_it_drives_the_toy_model_chosen_from_its_metadata(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with LocalPipeline("toy", [2], [1, 1], deployment="toys") as pipeline:
        url = f"{pipeline.front.http_url}/v2/models/toys/infer"
        assert await load.dataset_of(url) == "toy"
        assert await load.main(args(url, "--duration", "1")) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    answered, of = out.split("accuracy ")[1].split(" =")[0].split("/")
    assert int(answered) > 0 and answered == of, out  # every toy answer is exact


async def test_auto_without_metadata_says_to_choose(
    serve: Callable[[Handler], Awaitable[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url = await serve(unavailable)
    assert await load.main(args(url, "--duration", "1")) == 2  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "cannot read the model's metadata" in err and "choose one with --dataset" in err
