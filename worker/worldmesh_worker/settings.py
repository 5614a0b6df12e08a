"""The worker's settings from its environment, read once when the worker starts.

Every variable the worker reads is named here and nowhere else; a bad value is an error
naming the variable. ``worldmesh worker`` reads them once and passes them down (the
config's token and address, the model cache, the toy model's delay). The tools that run
outside a worker (``models prepare``, ``ramps train``, the benchmarks) get the same
defaults through ``WorkerSettings.from_env()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TOKEN = "WORLDMESH_TOKEN"  #: the control API's bearer token (else the config's tokenFile)
POD_IP = "POD_IP"  #: the pod's address (downward API): the worker serves and is reached there
CACHE = "WORLDMESH_CACHE"  #: trained heads and ramps (default ~/.cache/worldmesh)
FASHION_MNIST_DIR = "WORLDMESH_FASHION_MNIST_DIR"  #: the data set's files
TOY_BLOCK_DELAY = "WORLDMESH_TOY_BLOCK_DELAY_S"  #: seconds per block of the toy-slow model

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_TOY_BLOCK_DELAY_S = 0.01


def _default_cache() -> Path:
    return Path.home() / ".cache" / "worldmesh"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    token: str = ""
    pod_ip: str | None = None
    cache: Path = field(default_factory=_default_cache)
    fashion_mnist_dir: Path = DEFAULT_FASHION_MNIST_DIR
    toy_block_delay_s: float = DEFAULT_TOY_BLOCK_DELAY_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        raw = env.get(TOY_BLOCK_DELAY) or ""
        try:
            delay = float(raw) if raw else DEFAULT_TOY_BLOCK_DELAY_S
        except ValueError:
            raise ValueError(f"{TOY_BLOCK_DELAY}={raw!r} is not a number of seconds") from None
        return cls(
            token=env.get(TOKEN, ""),
            pod_ip=env.get(POD_IP) or None,
            cache=Path(env[CACHE]) if env.get(CACHE) else _default_cache(),
            fashion_mnist_dir=Path(env.get(FASHION_MNIST_DIR) or DEFAULT_FASHION_MNIST_DIR),
            toy_block_delay_s=delay,
        )
