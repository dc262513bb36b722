"""What the whole study costs: seconds per cell and per stage, per notebook and in total, before and after.

    python benchmarks/bench_study.py [--study studies/everything.yaml] [--reports reports]
                                     [--before REV] [--out reports/benchmarks/study.json]

The study is the suite that regenerates every committed report (``studies/everything.yaml``);
it is run with ``anomalib-study run studies/everything.yaml --data ../shared/data`` (resumable:
current cells are skipped). This script does not run it again: every report records what its
run cost (``_run.duration_s``: the notebook executed and rendered, in the runner's kernel;
``timings``: the stages the notebook timed itself), so it reads them, side by side with the same
reports as committed at ``--before`` (default: none), and writes one JSON:

* ``cells``: per cell of the suite, its notebook, seconds, stages, when it ran, the machine
  (CPU model and native bf16, as its report recorded them) and whether its report is current
  (run at the code and notebook there are now: :func:`anomalib_study.comparison.freshness`);
* ``stages``: a cell's timed keys summed into ``extraction``, ``coreset``, ``training``,
  ``fit`` (the rest of fitting: index, calibration), ``predict`` (scoring, maps and pixel
  metrics), ``clustering`` and ``other``; ``rendering`` is what the run took beyond the
  notebook's own total (kernel start, imports, plots, nbconvert);
* ``totals``: per notebook and in all, the ten slowest cells, for ``after`` (the reports now)
  and ``before``; the 4-hour goal is judged on ``after`` only when every cell is current and
  says so otherwise;
* ``caches``: what the current cells read from the patch and embedding caches (each report
  records it: ``patch_cache``, ``feature_cache``), and whether every read is of an entry an
  earlier cell of the same regeneration wrote: only then is the total what a clean clone with
  an empty cache would take (:func:`cache_check`);
* ``machine``: this machine now (CPU, native bf16, load average), since the cells' machines
  and loads are those of their runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STUDY = REPO / "studies" / "everything.yaml"
DEFAULT_OUT = REPO / "reports" / "benchmarks" / "study.json"
GOAL_S = 4 * 3600

#: stage -> substrings of a timing key (first match wins); totals and rates are left out
STAGES = (
    ("extraction", ("extract",)),
    ("coreset", ("coreset",)),
    ("training", ("train_s", "decode")),
    ("clustering", ("cluster_s", "weights_s")),
    ("predict", ("predict_s", "score", "pixel_metrics")),
    ("fit", ("fit_index", "fit_calibration", "_index_s")),
    ("other", ("load_s",)),
)
_SKIPPED = ("total_s", "per_s", "per_epoch", "images_per")


def stage_seconds(timings: dict[str, Any], duration_s: float | None) -> dict[str, float]:
    """A report's ``timings`` summed into :data:`STAGES` (leaf keys only: a key that other keys
    refine, e.g. ``fit_s`` beside ``fit_extract_s``, or a mode's total beside its parts, is left out),
    and ``rendering`` = ``duration_s`` less the notebook's own ``total_s`` (when both are known)."""
    numbers = {
        k: float(v) for k, v in (timings or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    keys = [k for k in numbers if not any(s in k for s in _SKIPPED)]
    leaves = [k for k in keys if not any(o != k and o.startswith(k[: -len("_s")] + "_") for o in keys)]
    out: dict[str, float] = {}
    for key in leaves:
        stage = next((name for name, parts in STAGES if any(p in key for p in parts)), "other")
        out[stage] = out.get(stage, 0.0) + numbers[key]
    if duration_s is not None and "total_s" in numbers:
        out["rendering"] = max(0.0, float(duration_s) - numbers["total_s"])
    return {k: round(v, 2) for k, v in sorted(out.items())}


def suite_cells(study: Path) -> list[tuple[str, str]]:
    """(notebook stem, cell name) of every cell the suite runs, in its order."""
    from anomalib_study import studies

    cells = []
    for part in studies.read_studies(study):
        grid = studies.expand_grid(part)
        if getattr(part, "only", None):
            grid = studies.select_cells(grid, part.only)
        cells += [(Path(part.notebook).stem, cell.name) for cell in grid]
    return cells


def _git_json(rev: str, path: str) -> dict | None:
    try:
        text = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    except subprocess.CalledProcessError:
        return None
    return json.loads(text)


def cell_record(notebook: str, cell: str, metrics: dict | None, fresh: str | None = None) -> dict[str, Any]:
    """One cell's cost from its metrics (None: no report)."""
    if metrics is None:
        return {"notebook": notebook, "cell": cell, "seconds": None, "report": "missing"}
    run = metrics.get("_run") or {}
    environment = metrics.get("environment") or {}
    duration = run.get("duration_s")
    return {
        "notebook": notebook,
        "cell": cell,
        "seconds": duration,
        "stages": stage_seconds(metrics.get("timings") or {}, duration),
        "started_at": run.get("started_at"),
        "cpu": environment.get("cpu_model"),
        "native_bf16": environment.get("native_bf16"),
        "freshness": fresh,
        "caches": cache_uses(metrics),
    }


def cache_uses(metrics: Any) -> list[dict[str, Any]]:
    """Every use of the patch or embedding cache a report records, anywhere in it:
    ``{"cache": "patch" | "feature", "read": bool, "key": ...}`` (a cache turned off: none)."""
    found: list[dict[str, Any]] = []
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            if key == "_run":
                continue
            if isinstance(value, dict) and value.get("patch_cache") in ("hit", "extracted"):
                found.append({"cache": "patch", "read": value["patch_cache"] == "hit", "key": value.get("key")})
            elif key == "feature_cache" and isinstance(value, dict):
                for use in value.values():  # the embedding cache: its model key and a digest of the images
                    if isinstance(use, dict) and "read" in use:
                        for read, images in ((True, use.get("read_images")), (False, use.get("computed_images"))):
                            if images:
                                found.append({"cache": "feature", "read": read, "key": f"{use['key']}:{images}"})
            else:
                found += cache_uses(value)
    elif isinstance(metrics, list):
        for value in metrics:
            found += cache_uses(value)
    return found


def _entry_file(use: dict[str, Any], root: Path) -> Path:
    """The file written when a cache entry was created: a patch entry's ``entry.json``, an
    embedding model folder's ``key.json`` (its images are added later, never before it)."""
    if use["cache"] == "patch":
        return root / "patches" / use["key"] / "entry.json"
    return root / "features" / use["key"].split(":", 1)[0] / "key.json"


def cache_check(cells: list[dict[str, Any]], root: Path | None = None) -> dict[str, Any]:
    """The cache reads of the current cells, in the order they ran. A read is sharing within
    this regeneration when an earlier current cell wrote the same entry (the same images), or
    when the entry it came from was created after the first current cell started (its file
    in the cache folder ``root`` on this machine: an embedding read of images another cell
    computed among others); any other read came from a cache filled before the regeneration,
    so the total is then less than an empty cache's."""
    written: set[tuple[str, str]] = set()
    shared, earlier = 0, []
    ran = sorted((c for c in cells if c.get("freshness") == "current"), key=lambda c: c.get("started_at") or "")
    try:  # when the regeneration's first current cell started (None: unknown)
        first = _dt.datetime.fromisoformat(ran[0]["started_at"]).timestamp() if ran else None
    except (KeyError, TypeError, ValueError):
        first = None
    for cell in ran:
        for use in cell.get("caches") or []:
            if not use["read"]:
                continue
            entry = _entry_file(use, root) if root is not None else None
            created_since = (
                first is not None and entry is not None and entry.is_file() and entry.stat().st_mtime >= first
            )
            if (use["cache"], use["key"]) in written or created_since:
                shared += 1
            else:
                earlier.append(f"{cell['notebook']}/{cell['cell']} ({use['cache']} cache)")
        written.update((use["cache"], use["key"]) for use in cell.get("caches") or [] if not use["read"])
    return {
        "reads_shared_within_the_regeneration": shared,
        "reads_from_before_it": len(earlier),
        "cells_reading_from_before_it": sorted(set(earlier)),
        "as_from_an_empty_cache": not earlier,
    }


def totals(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per notebook and in all, stage sums, the ten slowest cells, the cells without a time."""
    timed = [c for c in cells if c.get("seconds") is not None]
    per_notebook: dict[str, float] = {}
    stages: dict[str, float] = {}
    for c in timed:
        per_notebook[c["notebook"]] = per_notebook.get(c["notebook"], 0.0) + c["seconds"]
        for stage, seconds in (c.get("stages") or {}).items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    slowest = sorted(timed, key=lambda c: -c["seconds"])[:10]
    total = sum(per_notebook.values())
    return {
        "total_s": round(total, 1),
        "total_h": round(total / 3600, 2),
        "per_notebook_s": {k: round(v, 1) for k, v in sorted(per_notebook.items())},
        "per_stage_s": {k: round(v, 1) for k, v in sorted(stages.items(), key=lambda kv: -kv[1])},
        "slowest": [{"cell": f"{c['notebook']}/{c['cell']}", "seconds": c["seconds"]} for c in slowest],
        "n_cells": len(cells),
        "n_timed": len(timed),
        "untimed": [f"{c['notebook']}/{c['cell']}" for c in cells if c.get("seconds") is None],
    }


def machine_now() -> dict[str, Any]:
    from anomalib_study.hardware import native_bf16
    from anomalib_study.provenance import cpu_model

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "native_bf16": native_bf16(),
        "platform": platform.platform(),
        "load_average_1_5_15_min": load,
    }


def goal(after: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The 4-hour goal, judged only when every cell is current (else: what is missing)."""
    current = sum(1 for c in cells if c.get("freshness") == "current")
    verdict: dict[str, Any] = {"goal_s": GOAL_S, "cells_current": current, "cells": len(cells)}
    if current < len(cells) or after["untimed"]:
        verdict["met"] = None
        verdict["why"] = (
            f"not judged: {len(cells) - current} of {len(cells)} cells are not current (their times are "
            "those of older code), so the total is not one regeneration's"
        )
    else:
        verdict["met"] = after["total_s"] <= GOAL_S
        verdict["why"] = f"{after['total_h']} h of cell time against {GOAL_S / 3600:.0f} h"
    return verdict


def run(study: Path, reports: Path, before: str | None) -> dict[str, Any]:
    from anomalib_study import comparison, io

    sources = io.package_sources_hash()
    cells = []
    for notebook, cell in suite_cells(study):
        path = reports / notebook / f"{cell}.metrics.json"
        metrics = json.loads(path.read_text()) if path.is_file() else None
        fresh = None
        if metrics is not None:
            report = comparison.Report(notebook, cell, path.parent, metrics, None)
            nb = comparison.find_notebook(report, REPO / "notebooks")
            fresh, _ = comparison.freshness(report, io.sha256_file(nb) if nb else None, sources)
        cells.append(cell_record(notebook, cell, metrics, fresh))
    result: dict[str, Any] = {
        "benchmark": "study",
        "study": str(study.relative_to(REPO)) if study.is_relative_to(REPO) else str(study),
        "machine": machine_now(),
        "after": totals(cells),
        "cells": cells,
    }
    result["caches"] = cache_check(cells, io.cache_root())
    result["goal"] = goal(result["after"], cells)
    if result["goal"]["met"] is not None and not result["caches"]["as_from_an_empty_cache"]:
        result["goal"]["met"] = None  # not what a clean clone with an empty cache would take
        result["goal"]["why"] = (
            f"not judged: {result['caches']['reads_from_before_it']} cache read(s) came from before this "
            f"regeneration, so its total is less than an empty cache's ({result['goal']['why']})"
        )
    if before:
        old = []
        for notebook, cell in suite_cells(study):
            rel = (reports / notebook / f"{cell}.metrics.json").resolve().relative_to(REPO)
            old.append(cell_record(notebook, cell, _git_json(before, str(rel))))
        result["before_rev"] = before
        result["before"] = totals(old)
        result["before_cells"] = old
        result["rerun"] = rerun_comparison(old, cells)
    return result


def rerun_comparison(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """The cells run again since ``before`` (another ``started_at``), like for like: their seconds
    then and now, per notebook and in all."""
    per_notebook: dict[str, list[float]] = {}
    for old, new in zip(before, after):
        if old.get("seconds") is None or new.get("seconds") is None or old.get("started_at") == new.get("started_at"):
            continue
        sums = per_notebook.setdefault(new["notebook"], [0.0, 0.0, 0])
        sums[0] += old["seconds"]
        sums[1] += new["seconds"]
        sums[2] += 1
    rows = {
        notebook: {
            "cells": n,
            "before_s": round(b, 1),
            "after_s": round(a, 1),
            "speedup": round(b / a, 2) if a else None,
        }
        for notebook, (b, a, n) in sorted(per_notebook.items())
    }
    b, a = sum(r["before_s"] for r in rows.values()), sum(r["after_s"] for r in rows.values())
    return {
        "per_notebook": rows,
        "cells": sum(r["cells"] for r in rows.values()),
        "before_s": round(b, 1),
        "after_s": round(a, 1),
        "speedup": round(b / a, 2) if a else None,
    }


def _print(result: dict[str, Any]) -> None:
    for side in ("before", "after"):
        if side not in result:
            continue
        t = result[side]
        print(
            f"{side}: {t['total_h']} h over {t['n_timed']} of {t['n_cells']} cells; per notebook (h): "
            + ", ".join(f"{k} {v / 3600:.2f}" for k, v in t["per_notebook_s"].items())
        )
        print("  slowest: " + ", ".join(f"{c['cell']} {c['seconds'] / 60:.0f} min" for c in t["slowest"][:5]))
    if result.get("rerun", {}).get("cells"):
        r = result["rerun"]
        print(
            f"run again since {result['before_rev']}: {r['cells']} cells, {r['before_s'] / 3600:.2f} h -> "
            f"{r['after_s'] / 3600:.2f} h ({r['speedup']}x); "
            + ", ".join(f"{k} {v['speedup']}x ({v['cells']})" for k, v in r["per_notebook"].items())
        )
    if "before" in result and result["after"]["total_s"]:
        print(f"ratio before / after: {result['before']['total_s'] / result['after']['total_s']:.2f}")
    caches = result["caches"]
    print(
        f"caches: {caches['reads_shared_within_the_regeneration']} read(s) of entries written by an earlier cell, "
        f"{caches['reads_from_before_it']} of entries from before the regeneration"
    )
    print(f"goal: {result['goal']['why']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(DEFAULT_STUDY), help="the suite (default studies/everything.yaml)")
    parser.add_argument("--reports", default=str(REPO / "reports"), help="the reports folder")
    parser.add_argument("--before", default=None, help="a git revision whose committed reports are 'before'")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON written")
    args = parser.parse_args(argv)
    from anomalib_study.errors import StudyError
    from anomalib_study.io import write_json

    try:
        result = run(Path(args.study).resolve(), Path(args.reports).resolve(), args.before)
    except (StudyError, OSError) as error:
        print(f"bench_study: {error}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    _print(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
