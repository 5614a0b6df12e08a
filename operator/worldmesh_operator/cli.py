"""The ``worldmesh`` command, the top of the operator's layers (nothing imports it).

- ``run MANIFEST``: serve a ModelDeployment as local processes until Ctrl-C;
- ``validate MANIFEST...``: check manifests against the CRD, every error with its field path;
- ``load ENDPOINT``: drive an endpoint with real samples and summarize;
- ``worker --config FILE``: run one stage worker (what a pod runs);
- ``ramps train MANIFEST|MODEL``: train a model's early-exit ramps (``worldmesh_worker.exits.train``;
  a manifest is read here, and its model, ramps, ramps file and budget passed on);
- ``demo``: a three-stage EfficientNet-Lite0 pipeline answering real Fashion-MNIST images.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "worker":
        from worldmesh_worker.main import main as worker_main

        return worker_main(rest)
    if command == "ramps":
        from worldmesh_worker.exits.train import main as ramps_main

        try:
            return ramps_main(_ramps_arguments(rest))
        except (OSError, yaml.YAMLError, ValueError, RuntimeError) as exc:  # RuntimeError: CRD
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if command == "validate":
        return validate(rest)
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


def _ramps_arguments(argv: list[str]) -> list[str]:
    """``ramps train MANIFEST ...`` as the worker's trainer takes it: the manifest's model,
    with its ramps, ramps file and accuracy budget as options (the worker never reads a
    manifest). A model name, or any other command, passes through unchanged."""
    if len(argv) < 2 or argv[0] != "train":
        return argv
    target = argv[1]
    if not (target.endswith((".yaml", ".yml", ".json")) or Path(target).is_file()):
        return argv
    from .spec import parse_spec

    spec = parse_spec(yaml.safe_load(Path(target).read_text()))
    exits = spec.early_exits
    options = ["--budget", str(exits.accuracy_budget)]
    if exits.ramps:
        options += ["--sites", ",".join(str(s) for s in exits.ramps)]
    if exits.ramps_file and "--out" not in argv:
        options += ["--out", exits.ramps_file]
    return ["train", spec.model, *options, *argv[2:]]


def validate(argv: Sequence[str]) -> int:
    """``worldmesh validate FILE...``: 0 when every document is valid, 1 when one is not,
    2 when a file cannot be read or parsed as YAML."""
    from .schema import CrdError, SpecError
    from .spec import parse_spec

    parser = argparse.ArgumentParser(prog="worldmesh validate", description=validate.__doc__)
    parser.add_argument(
        "manifests", nargs="+", type=Path, help="YAML files, one or more documents each"
    )
    args = parser.parse_args(argv)
    status = 0
    for file in args.manifests:
        try:
            documents = [d for d in yaml.safe_load_all(file.read_text()) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            print(f"{file}: cannot read: {exc}", file=sys.stderr)
            status = 2
            continue
        if not documents:
            print(f"{file}: no document", file=sys.stderr)
            status = max(status, 1)
        for n, document in enumerate(documents, 1):
            try:
                spec = parse_spec(document)
            except CrdError as exc:
                print(f"worldmesh validate: {exc}", file=sys.stderr)
                return 2
            except SpecError as exc:
                meta = document.get("metadata") if isinstance(document, dict) else None
                name = meta.get("name") if isinstance(meta, dict) else None
                label = f"{file}: {name}" if isinstance(name, str) else f"{file}: document {n}"
                for error in exc.errors:
                    print(f"{label}: {error}", file=sys.stderr)
                status = max(status, 1)
            else:
                print(f"ok: {spec.name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
