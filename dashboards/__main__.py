"""``python -m dashboards [--check]``: write (or only compare) helm/worldmesh/dashboards/*.json."""

from __future__ import annotations

import argparse
import sys

from . import OUT, render


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if a committed file differs; write nothing"
    )
    args = parser.parse_args()
    files = render()
    stale = sorted(
        name
        for name, text in files.items()
        if not (OUT / name).is_file() or (OUT / name).read_text() != text
    )
    extra = sorted(p.name for p in OUT.glob("*.json") if p.name not in files)
    if args.check:
        for name in stale:
            print(f"{OUT / name}: differs from what dashboards/ builds", file=sys.stderr)
        for name in extra:
            print(f"{OUT / name}: no dashboard builds it", file=sys.stderr)
        return 1 if stale or extra else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name in extra:
        (OUT / name).unlink()
    for name in stale:
        (OUT / name).write_text(files[name])
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
