"""Wall time of one study grid run here (``--jobs 1``) and through a Dask cluster of 2 workers.

    python benchmarks/bench_dask_grid.py [--quick] [--scheduler ADDRESS] [--out reports/benchmarks/dask_grid.json]

The grid: notebook 01 (deep kNN) on the synthetic DAGM-layout set, one cell per ``k`` of
:data:`FULL` (a variants study written to a temporary folder, like any study file). The
same grid runs twice with :func:`anomalib_study.runner.run_study`, each into a fresh
temporary reports folder (the real ``reports/`` is not touched) and from an empty embedding
cache (the second run must not read what the first stored): ``jobs=1`` and
``scheduler=<a LocalCluster of 2 worker processes x 1 thread on loopback>`` (or the cluster
at ``--scheduler``). The JSON has both wall times, their ratio, the cells' own durations,
the cluster's start-up time (apart: an existing cluster does not pay it) and the headline
metrics of both runs with their largest difference (kernels get other thread counts on the
cluster, so the last bits of a float sum may differ).

``--quick`` runs a 1-cell grid of a tiny generated notebook instead of notebook 01 (seconds
per cell; for the smoke test). Times are wall-clock seconds (``time.perf_counter``), one
run each: a grid run is minutes, not a micro-benchmark.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

from anomalib_study import __version__, runner  # noqa: E402
from anomalib_study.io import cache_root, write_json  # noqa: E402

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "dask_grid.json"
NOTEBOOK = REPO / "notebooks" / "01_knn_detection.ipynb"
FULL = {
    "notebook": "notebooks/01_knn_detection.ipynb",
    "ks": (1, 5, 20, 100),
    "workers": 2,
    "threads_per_worker": 1,
    "parameters": {"backbone": "efficientnet_lite0", "thres_ratio": 0.92, "k_sweep": [1, 5]},
}
QUICK = {"notebook": "tiny.ipynb", "ks": (5,), "workers": 2, "threads_per_worker": 1, "parameters": {}}
HEADLINE = ("image_auroc", "accuracy")  # compared between the two runs (timings and thread counts differ)

TINY_PARAMETERS = """dataset = "dagm"   # layout
root = ""          # data folder
k = 1              # neighbours
metrics_out = ""   # metrics JSON
report_name = ""   # report title
"""
TINY_BODY = """import json
from pathlib import Path
images = sorted(Path(root).rglob("*.PNG"))
with open(metrics_out, "w") as handle:
    json.dump({"n_images": len(images), "k": k, "image_auroc": 1 / (1 + k),
               "accuracy": len(images) / (len(images) + k)}, handle)
"""


def write_study(folder: Path, settings: dict[str, Any]) -> Path:
    """A variants study of ``settings["ks"]`` on the synthetic set, in ``folder``."""
    import nbformat
    import yaml

    if settings["notebook"] == "tiny.ipynb":  # --quick: a generated notebook of one cell
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(TINY_PARAMETERS)
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(TINY_BODY)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / "tiny.ipynb")
        notebook = str(folder / "tiny.ipynb")
    else:
        notebook = str(REPO / settings["notebook"])
    study = {
        "notebook": notebook,
        "title": "Dask grid benchmark (synthetic set)",
        "headline": list(HEADLINE),
        "parameters": dict(settings["parameters"]),
        "variants": {f"k{k}": {"k": k} for k in settings["ks"]},
        "datasets": {"synthetic_dagm": {"dataset": "dagm", "root": "{synthetic}"}},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def timed_run(study: Path, reports: Path, **options: Any) -> dict[str, Any]:
    """One ``run_study`` into ``reports``: wall time, per-cell durations and the metrics."""
    start = time.perf_counter()
    results = runner.run_study(
        study, reports_dir=reports, force=True, log=lambda line: print(line, flush=True), **options
    )
    wall = time.perf_counter() - start
    failed = [r.name for r in results if r.status != "ok"]
    if failed:
        raise SystemExit(f"bench_dask_grid: cells {', '.join(failed)} did not run ok (see {reports})")
    metrics = {r.name: {key: r.metrics.get(key) for key in HEADLINE} for r in results}
    return {"wall_s": round(wall, 2), "cell_durations_s": {r.name: r.duration_s for r in results}, "metrics": metrics}


def _empty_embedding_cache() -> None:
    """Each timed run starts from an empty embedding cache on this machine (within a run, the grid's
    first cell computes the embeddings and the others read them; a cluster at ``--scheduler`` on
    other hosts keeps its own caches)."""
    shutil.rmtree(cache_root() / "features", ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1-cell grid of a tiny notebook (smoke test)")
    parser.add_argument("--scheduler", default=None, help="use this Dask cluster instead of starting a LocalCluster")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON report (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL

    with tempfile.TemporaryDirectory(prefix="bench-dask-grid-") as folder:
        work = Path(folder)
        study = write_study(work, settings)
        runner.synthetic_root()  # generated once, before either timing (the workers then find it)
        _empty_embedding_cache()
        local = timed_run(study, work / "local", jobs=1)
        cluster_start_s = None
        _empty_embedding_cache()  # else the cluster's cells would read what the local run stored
        if args.scheduler:
            on_cluster = timed_run(study, work / "cluster", scheduler=args.scheduler)
        else:
            from distributed import LocalCluster

            start = time.perf_counter()
            with LocalCluster(
                n_workers=settings["workers"],
                threads_per_worker=settings["threads_per_worker"],
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster:
                cluster_start_s = round(time.perf_counter() - start, 2)
                on_cluster = timed_run(study, work / "cluster", scheduler=cluster.scheduler_address)

    report = {
        "benchmark": "dask_grid",
        "package_version": __version__,
        "quick": args.quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average_1_5_15_min": list(os.getloadavg()),
        },
        "settings": {
            **{k: v for k, v in settings.items() if k != "ks"},
            "ks": list(settings["ks"]),
            "cells": len(settings["ks"]),
            "scheduler": args.scheduler or "LocalCluster (loopback)",
            "data": "synthetic DAGM-layout set (generated, not DAGM)",
        },
        "jobs_1": {k: v for k, v in local.items() if k != "metrics"},
        "cluster": {**{k: v for k, v in on_cluster.items() if k != "metrics"}, "start_s": cluster_start_s},
        "speedup_jobs_1_over_cluster": round(local["wall_s"] / on_cluster["wall_s"], 3),
        "headline_metrics": {"jobs_1": local["metrics"], "cluster": on_cluster["metrics"]},
        "headline_max_abs_difference": max(
            abs(value - on_cluster["metrics"][cell][key])
            for cell, values in local["metrics"].items()
            for key, value in values.items()
        ),
    }
    write_json(args.out, report)
    print(
        f"jobs 1: {local['wall_s']:.1f} s; cluster: {on_cluster['wall_s']:.1f} s "
        f"(speed-up {report['speedup_jobs_1_over_cluster']:.2f}x, headline metrics differ by at most "
        f"{report['headline_max_abs_difference']:.2g}); {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
