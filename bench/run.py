"""``make bench``: every data-plane figure of the issue, each with its baseline from the same run.

Writes ``bench/results/<name>.json`` per benchmark and prints one table. ``--quick`` runs
fewer repetitions (a smoke run, not for the record).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import autoscale_bench
import chaos_bench
import cluster_bench
import common
import control_bench
import exits_bench
import growth_bench
import pipeline_bench
import plan_bench
import protocol_bench
import shift_bench
import worlds_bench

BENCHMARKS = {
    "worlds": worlds_bench.run,
    "pipeline": pipeline_bench.run,
    "control": control_bench.run,
    "plan": plan_bench.run,
    "protocol": protocol_bench.run,
    "growth": growth_bench.run,
    "exits": exits_bench.run,
    "shift": shift_bench.run,
    "autoscale": autoscale_bench.run,
    "cluster": cluster_bench.run,
    "chaos": chaos_bench.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    everything = []
    for name in args.names:
        started = time.time()
        figures = asyncio.run(BENCHMARKS[name](quick=args.quick))
        path = common.write(name, figures, started)
        print(f"\n{name}: {path}\n{common.table(figures)}", flush=True)
        everything += figures
    missed = [f.name for f in everything if f.met is False]
    print(f"\n{len(everything)} figures, goals missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
