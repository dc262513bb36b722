"""Migrate the metrics files of a reports folder to the current layout (:mod:`anomalib_study.schema`).

    python scripts/migrate_metrics.py reports            # migrate, print what changed
    python scripts/migrate_metrics.py reports --check    # say what would change, write nothing

Every ``<reports>/<notebook>/<cell>.metrics.json`` (and ``.failed.json``'s ``_run`` is left
as it is) of an older layout is rewritten atomically with the keys the migration adds;
the script then checks, file by file, that every value the old file held is still there
and unchanged (numbers included), and refuses to write a file where it is not. A file
already at the current layout is not touched. Exit status 1 when a file could not be
migrated (named, with why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from anomalib_study import io, schema


def _leaves(data, prefix=""):
    if isinstance(data, dict):
        for name, item in data.items():
            yield from _leaves(item, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            yield from _leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, data


def migrate_folder(reports: Path, check: bool = False) -> int:
    paths = sorted(p for p in reports.glob("*/*.metrics.json") if not p.name.startswith("."))
    if not paths:
        print(f"no metrics files under {reports}/<notebook>/", file=sys.stderr)
        return 1
    failed = migrated = 0
    for path in paths:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            print(f"{path}: not readable JSON ({error}): left as it is", file=sys.stderr)
            failed += 1
            continue
        new, changes = schema.migrate(old)
        if not changes:
            continue
        fresh = dict(_leaves(new))
        lost = [key for key, value in _leaves(old) if key not in fresh or fresh[key] != value]
        if lost:
            print(f"{path}: the migration would change {', '.join(lost[:5])}: left as it is", file=sys.stderr)
            failed += 1
            continue
        left = schema.problems(new)
        print(f"{path.relative_to(reports)}: {'; '.join(changes)}" + (f" (still: {'; '.join(left)})" if left else ""))
        if not check:
            io.write_json(path, new)
        migrated += 1
    verb = "would migrate" if check else "migrated"
    print(f"{verb} {migrated} of {len(paths)} metrics file(s); {failed} left as they were")
    return int(failed > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, help="the reports folder (reports/<notebook>/<cell>.metrics.json)")
    parser.add_argument("--check", action="store_true", help="say what would change, write nothing")
    args = parser.parse_args(argv)
    if not args.reports.is_dir():
        print(f"reports folder {args.reports} not found", file=sys.stderr)
        return 1
    return migrate_folder(args.reports, check=args.check)


if __name__ == "__main__":
    sys.exit(main())
