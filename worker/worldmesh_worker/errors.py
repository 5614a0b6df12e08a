"""Errors the worker's HTTP servers answer, each mapped to one HTTP status here and nowhere else.

Behaviours:
- every error carries a message that names what is wrong (``InvalidInput`` names the
  field path, e.g. ``inputs[0].shape[1]: expected 3, got 4``);
- ``status`` is a class attribute, so the transport maps an error with ``exc.status``;
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


class Unauthorized(WorldmeshError):
    """The request lacks valid credentials."""

    status = 401


class ModelNotFound(WorldmeshError):
    """No model (or model version) of that name is served here."""

    status = 404


class WorldNotFound(WorldmeshError):
    """The control API names a world this worker does not have."""

    status = 404


class PayloadTooLarge(WorldmeshError):
    """The request body exceeds the configured limit."""

    status = 413


class Overloaded(WorldmeshError):
    """The queue is full; retry after ``retry_after`` seconds."""

    status = 429


class ServiceUnavailable(WorldmeshError):
    """The worker cannot serve now (draining, no live next stage); retry later."""

    status = 503


class ModelNotReady(WorldmeshError):
    """The model is known but not loaded or not wired to its peers yet."""

    status = 503


class InternalError(WorldmeshError):
    """A bug: an unexpected exception, logged by the worker; the message says no more."""

    status = 500


class PeerFailed(WorldmeshError):
    """Opening a world to a peer worker failed (unreachable, timed out, or refused)."""

    status = 502


def error_body(exc: WorldmeshError) -> dict[str, str]:
    """The OIP error response body for ``exc``."""
    return {"error": exc.message}
