"""Blocking calls on threads of their own, so that no shared pool can be exhausted by them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[[], T], name: str) -> T:
    """Run a blocking call on a new daemon thread; the caller's deadline bounds the wait."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def run() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)
        # An error's traceback holds this frame, and this frame the error: a cycle that
        # only the cyclic collector frees, with whatever the call held (a world's store:
        # its thread and sockets). Break it.
        del result, error

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
