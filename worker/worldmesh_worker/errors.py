"""Errors the worker's servers answer, each mapped to one HTTP status and one gRPC status code
here and nowhere else.

Behaviours:
- every error carries a message that names what is wrong (``InvalidInput`` names the
  field path, e.g. ``inputs[0].shape[1]: expected 3, got 4``);
- ``status`` and ``grpc_code`` (a ``grpc.StatusCode`` name) are class attributes, so each
  transport maps an error with one lookup, with the same message on both;
- ``retry_after`` (seconds) is ``None`` unless given, and is meant for ``Overloaded`` (429)
  and ``ServiceUnavailable`` (503): the transport turns it into a ``Retry-After`` header;
- ``error_body`` builds the Open Inference Protocol error object ``{"error": "..."}``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "InternalError",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "Overloaded",
    "PayloadTooLarge",
    "PeerFailed",
    "ServiceUnavailable",
    "Unauthorized",
    "WorldNotFound",
    "WorldmeshError",
    "error_body",
]


class WorldmeshError(Exception):
    """Base of every error that reaches a client; unexpected ones map to 500."""

    status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        if retry_after is not None and retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {retry_after}")
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class InvalidInput(WorldmeshError):
    """The request is malformed; the message starts with the offending field path."""

    status = 400
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(WorldmeshError):
    """The request lacks valid credentials."""

    status = 401
    grpc_code = "UNAUTHENTICATED"


class ModelNotFound(WorldmeshError):
    """No model (or model version) of that name is served here."""

    status = 404
    grpc_code = "NOT_FOUND"


class WorldNotFound(WorldmeshError):
    """The control API names a world this worker does not have."""

    status = 404
    grpc_code = "NOT_FOUND"


class PayloadTooLarge(WorldmeshError):
    """The request body exceeds the configured limit."""

    status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class Overloaded(WorldmeshError):
    """The queue is full; retry after ``retry_after`` seconds."""

    status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class ServiceUnavailable(WorldmeshError):
    """The worker cannot serve now (draining, no live next stage); retry later."""

    status = 503
    grpc_code = "UNAVAILABLE"


class ModelNotReady(WorldmeshError):
    """The model is known but not loaded or not wired to its peers yet."""

    status = 503
    grpc_code = "UNAVAILABLE"


class InternalError(WorldmeshError):
    """A bug: an unexpected exception, logged by the worker; the message says no more."""

    status = 500
    grpc_code = "INTERNAL"


class PeerFailed(WorldmeshError):
    """Opening a world to a peer worker failed (unreachable, timed out, or refused)."""

    status = 502
    grpc_code = "UNAVAILABLE"


def error_body(exc: WorldmeshError) -> dict[str, str]:
    """The OIP error response body for ``exc``."""
    return {"error": exc.message}
