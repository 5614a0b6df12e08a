"""The ``worldmesh`` command: ``worker`` runs one stage worker; ``demo`` serves a real model locally."""

from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        from worldmesh_worker.main import main as worker_main

        return worker_main(argv[1:])
    parser = argparse.ArgumentParser(prog="worldmesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="run one stage worker (worldmesh worker --config FILE)")
    demo = commands.add_parser("demo", help="three-stage EfficientNet-Lite0 on Fashion-MNIST")
    from . import demo as demo_module

    demo_module.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return asyncio.run(demo_module.run(args))
    return 2


if __name__ == "__main__":
    sys.exit(main())
