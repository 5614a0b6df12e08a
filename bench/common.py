"""What every benchmark shares: a result row, the load average beside it, the table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


@dataclass
class Figure:
    """One measured figure with its baseline from the same run, and the goal it is held to."""

    name: str
    value: float
    unit: str
    goal: str = ""  # e.g. ">= 0.99", "<= 0.1", "== 0", or "" (report only)
    baseline: str = ""  # what ``value`` was measured against, with its own numbers
    samples: list[float] = field(default_factory=list)  # per repetition
    loadavg: tuple[float, float, float] = field(default_factory=lambda: os.getloadavg())
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if not self.goal:
            return None
        op, bound = self.goal.split()
        return {
            ">=": self.value >= float(bound),
            "<=": self.value <= float(bound),
            "==": self.value == float(bound),
        }[op]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def write(name: str, figures: list[Figure], started: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": "cpu",
        },
        "figures": [dict(asdict(f), met=f.met) for f in figures],
    }
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "goal", "met", "baseline (same run)", "load avg 1m")]
    for f in figures:
        met = {None: "report", True: "yes", False: "NO"}[f.met]
        rows.append(
            (
                f.name,
                f"{f.value:.4g} {f.unit}".strip(),
                f.goal or "-",
                met,
                f.baseline,
                f"{f.loadavg[0]:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def fashion_requests() -> Any:
    """A request factory for ``ClosedLoop``: Fashion-MNIST test images in turn, asking for
    the label; an answer counts when it echoes the id and carries outputs."""
    from worldmesh_operator.load import samples

    inputs, _ = samples("fashion-mnist")

    def request(i: int) -> tuple[dict[str, Any], Any]:
        body = {"id": str(i), "inputs": inputs[i % len(inputs)], "outputs": [{"name": "label"}]}

        def check(answer: dict[str, Any]) -> bool:
            return answer.get("id") == str(i) and bool(answer.get("outputs"))

        return body, check

    return request
