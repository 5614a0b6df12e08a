"""The ``worldmesh`` command.

- ``run MANIFEST``: serve a ModelDeployment as local processes until Ctrl-C;
- ``validate MANIFEST...``: check manifests against the CRD, every error with its field path;
- ``load ENDPOINT``: drive an endpoint with real samples and summarize;
- ``worker --config FILE``: run one stage worker (what a pod runs);
- ``ramps train MANIFEST|MODEL``: train a model's early-exit ramps (``worldmesh_worker.exits.train``);
- ``demo``: a three-stage EfficientNet-Lite0 pipeline answering real Fashion-MNIST images.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "worker":
        from worldmesh_worker.main import main as worker_main

        return worker_main(rest)
    if command == "ramps":
        from worldmesh_worker.exits.train import main as ramps_main

        return ramps_main(rest)
    if command == "validate":
        from .validate import main as validate_main

        return validate_main(rest)
    if command == "run":
        from . import run

        return asyncio.run(run.main(rest))
    parser = argparse.ArgumentParser(
        prog="worldmesh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "validate", "worker", "ramps"):
        commands.add_parser(name, help=f"see worldmesh {name} --help")
    from . import demo, load

    load.add_arguments(commands.add_parser("load", help="drive an endpoint with real samples"))
    demo.add_arguments(commands.add_parser("demo", help="EfficientNet-Lite0 on Fashion-MNIST"))
    args = parser.parse_args(argv)
    if args.command == "load":
        return asyncio.run(load.main(args))
    return asyncio.run(demo.run(args))


if __name__ == "__main__":
    sys.exit(main())
