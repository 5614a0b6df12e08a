"""``python -m worldmesh_worker.models prepare [--force] [--cache DIR] NAME...``.

Trains and caches the linear heads of the named models (all that have one if
no name is given) and prints, per model, the test-split accuracy and the time
taken. Exit status 2 on a bad argument or an unknown model name.
"""

from __future__ import annotations

import argparse
import sys
import time

from worldmesh_worker.models.heads import head_path
from worldmesh_worker.models.registry import PREPARED_MODELS, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worldmesh_worker.models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="train and cache the heads of the named models")
    p.add_argument("names", nargs="*", help=f"default: {' '.join(PREPARED_MODELS)}")
    p.add_argument("--force", action="store_true", help="retrain even if a valid head is cached")
    p.add_argument("--cache", default=None, help="cache dir (default $WORLDMESH_CACHE)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    names = args.names or list(PREPARED_MODELS)
    start = time.perf_counter()
    try:
        results = prepare(names, cache=args.cache, force=args.force)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        if r.info is None:
            print(f"{r.name}: nothing to prepare")
            continue
        how = "trained" if r.trained else "cached"
        print(
            f"{r.name}: {how}, test accuracy {r.info.test_accuracy:.4f} on "
            f"{r.info.test_rows} test rows (head trained on {r.info.train_rows} train rows, "
            f"l2={r.info.l2:g}, {r.info.seconds:.1f} s) -> {head_path(r.name, args.cache)}"
        )
    print(f"prepare took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
