"""The worker's two HTTP servers: the Open Inference Protocol port and the control port.

Inference port (unauthenticated, like any model server; every stage serves it):
``GET /v2`` (or ``/v2/``), ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{name}[/versions/{v}]``, ``.../ready``, ``POST .../infer`` (front stage only)
and ``GET /metrics``. Health and readiness answer 200 for true and 400 for false, as the
protocol says (a model not served here is not ready: 400, with ``{"error": ...}``).

Control port (bearer token, compared in constant time; 401 without it):
``GET /v1/status``, ``GET /v1/worlds``, ``POST /v1/worlds`` (open), ``DELETE /v1/worlds/{name}``,
``POST /v1/drain[?wait=S]``, ``GET /v1/drain``, ``PUT /v1/ramps`` (follow the deployment's
leading front worker's ramp state, or lead) and ``GET /v1/ramps`` (early exits: each
ramp's state, threshold, exit rate and agreement at the front; the active set elsewhere).

With early exits on, an answer carries ``parameters.exit`` (the block index of the ramp
that answered, or ``"final"``), and a request with ``parameters.early_exit: false`` gets
the full model's answer only.

Errors are ``{"error": "..."}`` with the status of their type (``errors.py``); a client's
mistake is never a 500, and no request can crash the worker.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .errors import (
    InternalError,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    PeerFailed,
    Unauthorized,
    WorldmeshError,
    WorldNotFound,
    error_body,
)
from .offload import Offload
from .protocol import decode_infer_request, encode_infer_response, model_metadata, server_metadata
from .stage import Stage
from .worlds import WorldBroken

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MODEL_VERSION = "1"


def _error(exc: WorldmeshError) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return web.json_response(error_body(exc), status=exc.status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except WorldmeshError as exc:
        return _error(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(PayloadTooLarge(f"body: {exc.text or 'request body too large'}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own answers (an unknown route, a wrong method with its Allow header):
        # their status and headers are aiohttp's; only the body is made ours
        headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=headers)
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return _error(InternalError("internal error (logged by the worker)"))


class InferenceApp:
    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.name = stage.config.deployment
        # JSON work on a large body would hold up every other request: off the loop, by
        # its measured cost per byte.
        self._decode = Offload(None)
        self._encode = Offload(None)
        self.app = web.Application(
            middlewares=[_errors], client_max_size=stage.config.limits.max_request_bytes
        )
        r = self.app.router
        r.add_get("/v2", self.server)
        r.add_get("/v2/", self.server)  # the same resource, as clients that add a slash ask
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            r.add_get(prefix, self.metadata)
            r.add_get(prefix + "/ready", self.model_ready)
            r.add_post(prefix + "/infer", self.infer)
        r.add_get("/metrics", self.metrics)

    def _check_model(self, request: web.Request) -> None:
        name = request.match_info["name"]
        version = request.match_info.get("version")
        if name != self.name:
            raise ModelNotFound(f"model {name!r} is not served here (this serves {self.name!r})")
        if version is not None and version != MODEL_VERSION:
            raise ModelNotFound(f"model {name!r} has no version {version!r} (only {MODEL_VERSION})")

    async def server(self, request: web.Request) -> web.Response:
        return web.json_response(server_metadata("worldmesh", __version__, ["binary_tensor_data"]))

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    def _ready(self) -> str | None:
        if self.stage.draining:
            return "draining"
        if not self.stage.accepting:
            return f"stage {self.stage.config.stage + 1} has no live worker"
        return None

    async def ready(self, request: web.Request) -> web.Response:
        why = self._ready()
        if why:
            return web.json_response({"ready": False, "error": f"not ready: {why}"}, status=400)
        return web.json_response({"ready": True})

    async def metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        model = self.stage.model
        return web.json_response(
            model_metadata(self.name, [MODEL_VERSION], "pytorch", model.inputs, model.outputs)
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request)
        except ModelNotFound as exc:
            # Readiness is 200 or 400 in the protocol, whatever the reason it is not ready.
            return web.json_response(error_body(exc), status=400)
        return await self.ready(request)

    async def infer(self, request: web.Request) -> web.Response:
        start = time.perf_counter()
        code = 500
        try:
            self._check_model(request)
            front = self.stage.front
            if front is None:
                raise ModelNotFound(
                    f"this worker runs stage {self.stage.config.stage}; send requests to stage 0"
                )
            body = await request.read()
            model = self.stage.model
            req = await self._decode.run(
                len(body), decode_infer_request, body, request.headers, model.inputs, model.outputs
            )
            outputs, params = await front.serve(req)
            size = sum(np.asarray(v).nbytes for v in outputs.values())
            payload, headers = await self._encode.run(
                size, encode_infer_response, self.name, MODEL_VERSION, req, outputs, params
            )
            content_type = headers.pop("Content-Type", "application/json")
            code = 200
            return web.Response(body=payload, headers=headers, content_type=content_type)
        except WorldmeshError as exc:
            code = exc.status
            raise
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            self.stage.metrics.request(code)
            if code == 200:
                self.stage.metrics.request_duration.observe(time.perf_counter() - start)

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.stage.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class ControlApp:
    def __init__(self, stage: Stage, token: str) -> None:
        if not token:
            raise ValueError("token: the control API needs a token (WORLDMESH_TOKEN or tokenFile)")
        self.stage = stage
        self._expected = f"Bearer {token}".encode()
        self.app = web.Application(middlewares=[_errors, self._auth], client_max_size=64 * 1024)
        r = self.app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/worlds", self.worlds)
        r.add_post("/v1/worlds", self.open_world)
        r.add_delete("/v1/worlds/{name}", self.close_world)
        r.add_post("/v1/drain", self.drain)
        r.add_get("/v1/drain", self.drain_state)
        r.add_get("/v1/ramps", self.ramps)
        r.add_put("/v1/ramps", self.follow_ramps)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, self._expected):
            raise Unauthorized("missing or wrong bearer token")
        return await handler(request)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.stage.status())

    async def ramps(self, request: web.Request) -> web.Response:
        return web.json_response(self.stage.exits.status())

    async def follow_ramps(self, request: web.Request) -> web.Response:
        """The deployment's one ramp state: ``{"leader": WORKER, "ramps": [{"ramp", "threshold",
        "active"}, ...]}`` follows that front worker's; ``{"leader": null}`` tunes here."""
        controller = self.stage.exits.controller
        if controller is None:
            raise ModelNotFound("this worker tunes no ramps (not a front worker, or exits off)")
        body = await _json_object(request)
        unknown = set(body) - {"leader", "ramps"}
        if unknown:
            raise InvalidInput(f"{sorted(unknown)[0]}: unknown field")
        leader = body.get("leader")
        if leader is None:
            controller.lead()
            return web.json_response(controller.status())
        if not isinstance(leader, str) or not leader:
            raise InvalidInput("leader: must be a worker's name, or null")
        ramps = body.get("ramps")
        if not isinstance(ramps, list):
            raise InvalidInput("ramps: required, a list of {ramp, threshold, active}")
        thresholds: dict[int, float] = {}
        active = []
        for i, ramp in enumerate(ramps):
            if not isinstance(ramp, dict) or set(ramp) != {"ramp", "threshold", "active"}:
                raise InvalidInput(f"ramps[{i}]: must be an object of ramp, threshold, active")
            site, threshold, on = ramp["ramp"], ramp["threshold"], ramp["active"]
            if type(site) is not int or site in thresholds:
                raise InvalidInput(f"ramps[{i}].ramp: {site!r} is not a new block index")
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise InvalidInput(f"ramps[{i}].threshold: must be a number")
            if not isinstance(on, bool):
                raise InvalidInput(f"ramps[{i}].active: must be a boolean")
            thresholds[site] = float(threshold)
            if on:
                active.append(site)
        try:
            controller.follow(leader, thresholds, active)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return web.json_response(controller.status())

    async def worlds(self, request: web.Request) -> web.Response:
        return web.json_response({"worlds": self.stage.status()["worlds"]})

    async def open_world(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        peer = _field(body, "peer", str)
        peer_stage = _field(body, "peerStage", int)
        kwargs: dict[str, Any] = {}
        for key, arg in (
            ("heartbeat", "heartbeat"),
            ("backend", "backend"),
            ("peerDevice", "peer_device"),
        ):
            if key in body:
                kwargs[arg] = _field(body, key, str)
        unknown = set(body) - {"peer", "peerStage", "heartbeat", "backend", "peerDevice"}
        if unknown:
            raise InvalidInput(f"{sorted(unknown)[0]}: unknown field")
        try:
            info = await self.stage.peers.open_world(peer, peer_stage, **kwargs)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        except WorldBroken as exc:
            raise PeerFailed(str(exc)) from None
        return web.json_response(info)

    async def close_world(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not await self.stage.peers.close_world(name):
            raise WorldNotFound(f"no world {name!r}")
        return web.json_response({"closed": name})

    async def drain(self, request: web.Request) -> web.Response:
        wait = request.query.get("wait", "0")
        try:
            seconds = float(wait)
        except ValueError:
            raise InvalidInput(f"wait: {wait!r} is not a number of seconds") from None
        self.stage.drain()
        deadline = time.monotonic() + min(max(seconds, 0.0), 600.0)
        while not self.stage.drained and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await self.drain_state(request)

    async def drain_state(self, request: web.Request) -> web.Response:
        return web.json_response({"draining": self.stage.draining, "drained": self.stage.drained})


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"body: not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object")
    return body


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    if key not in body:
        raise InvalidInput(f"{key}: required")
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidInput(f"{key}: must be {'an integer' if kind is int else 'a string'}")
    return value
