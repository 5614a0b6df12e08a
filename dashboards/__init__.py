"""worldmesh's Grafana dashboards, built in code with grafana-foundation-sdk.

``DASHBOARDS`` maps a file name to its builder; ``python -m dashboards`` (``make
dashboards``) writes each as helm/worldmesh/dashboards/<name>.json, the JSON that the chart
ships as sidecar ConfigMaps and that a person can import by hand. A test keeps the
committed files equal to what the builders make, validates them against @grafana/schema and
runs every query on a real Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard

from . import overview, worlds
from .common import to_json

DASHBOARDS: dict[str, Callable[[], Dashboard]] = {
    "worldmesh-overview": overview.build,
    "worldmesh-worlds": worlds.build,
}
OUT = Path(__file__).resolve().parents[1] / "helm" / "worldmesh" / "dashboards"


def render() -> dict[str, str]:
    """File name -> JSON text, for every dashboard."""
    return {f"{name}.json": to_json(build()) for name, build in DASHBOARDS.items()}
