"""A closed-loop Open Inference Protocol load: N clients, each sending its next request as
soon as the previous one is answered, every answer checked. Used by tests and benchmarks.

Nothing is retried: a request that does not get a 200 with the right answer counts as
lost, which is exactly what the zero-loss tests assert on.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

#: builds request ``i``: (JSON body, check(response JSON) -> True when the answer is right)
RequestFactory = Callable[[int], tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]]


@dataclass
class LoadResult:
    ok: int = 0
    wrong: int = 0
    errors: Counter[int] = field(default_factory=Counter)  # HTTP status (0: no response)
    messages: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  #: monotonic, beside latencies
    failed_at: list[float] = field(default_factory=list)  #: monotonic, one per lost request

    @property
    def lost(self) -> int:
        return self.wrong + sum(self.errors.values())

    @property
    def sent(self) -> int:
        return self.ok + self.lost


class ClosedLoop:
    """``async with ClosedLoop(url, factory, 6) as load: ...``; stops and joins on exit."""

    def __init__(
        self, url: str, factory: RequestFactory, concurrency: int, timeout: float = 60.0
    ) -> None:
        self.url = url
        self.factory = factory
        self.concurrency = concurrency
        self.timeout = timeout
        self.result = LoadResult()
        self._stop = asyncio.Event()
        self._ids = itertools.count()

    async def __aenter__(self) -> ClosedLoop:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._session.close()

    async def answered(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` more requests were answered correctly."""
        target = self.result.ok + n
        deadline = time.monotonic() + timeout
        while self.result.ok < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} answers not within {timeout:g} s: {self.result}")
            await asyncio.sleep(0.005)

    async def _client(self) -> None:
        while not self._stop.is_set():
            i = next(self._ids)
            body, check = self.factory(i)
            start = time.perf_counter()
            try:
                async with self._session.post(self.url, json=body) as response:
                    answer = await response.json(content_type=None)
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.result.errors[0] += 1
                self.result.messages.append(f"request {i}: {type(exc).__name__}: {exc}")
                self.result.failed_at.append(time.monotonic())
                continue
            if status != 200:
                self.result.errors[status] += 1
                self.result.messages.append(f"request {i}: {status} {answer}")
                self.result.failed_at.append(time.monotonic())
            elif not check(answer):
                self.result.wrong += 1
                self.result.messages.append(f"request {i}: wrong answer {answer}")
                self.result.failed_at.append(time.monotonic())
            else:
                self.result.ok += 1
                self.result.latencies.append(time.perf_counter() - start)
                self.result.answered_at.append(time.monotonic())


def toy_request(i: int, rows: int = 1) -> tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]:
    """Request ``i`` for the ``toy`` model: small integer inputs, so the answer is exact."""
    from .models.toy import reference

    x = (np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) * (i + 1) % 7) - 3
    expected = reference(x)

    def check(answer: dict[str, Any]) -> bool:
        outputs = {o["name"]: o for o in answer.get("outputs", [])}
        y = np.asarray(outputs.get("y", {}).get("data", []), dtype=np.float64)
        return (
            answer.get("id") == str(i)
            and y.shape == (rows * 4,)
            and np.array_equal(y, expected.ravel())
        )

    body = {
        "id": str(i),
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [rows, 16], "data": x.ravel().tolist()}
        ],
    }
    return body, check
