"""The comparison across the executed reports, read back from their metrics files.

Every number comes from ``reports/<notebook>/<cell>.metrics.json`` (the cell's last good
run) or ``<cell>.failed.json`` (its last run failed), never from a rendered notebook, and
the published figures from :mod:`anomalib_study.published`::

    reports = collect_reports("reports")      # one row per report
    detection_table(reports)                  # image / pixel AUROC, PRO, accuracy, times
    clustering_table(reports)                 # NMI / ARI / F1 per mode, tau and how it was chosen
    published_table(reports)                  # the published figures beside ours
    fusion_table(reports)                     # PatchCore's two backbones' image scores combined

A report's ``status`` is ``"ok"``, ``"failed"`` (its last run raised; the numbers, if any,
are the last good run's) or ``"stale"`` (its notebook or package code its kernel loaded
changed since it ran: :func:`freshness`). ``freshness`` says ``"current"``, ``"stale"`` or
``"unknown"`` (a report written before the runner recorded ``notebook_sha256`` and the code
it ran, or whose notebook is not found).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from anomalib_study import freshness as code_freshness
from anomalib_study import io, methods, schema

#: method name -> how the tables name it (the registry's labels)
METHOD_LABELS: Mapping[str, str] = methods.RegistryView(methods.method_label)
#: the published comparison of each method that declares one (this run's row first, then the published figures)
COMPARISONS: Mapping[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = methods.RegistryView(
    methods.published_comparison, keep=lambda entry: entry.published is not None
)


def detection_methods() -> list[str]:
    """The registered detection methods, in registry order (the order the tables list them)."""
    return [name for name, entry in methods.REGISTRY.items() if entry.task == "detection"]


#: column headings for display
LABELS = {
    "dataset": "data set",
    "method": "method",
    "config": "backbone / variant",
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "pro": "PRO",
    "accuracy": "accuracy",
    "fit_s": "fit (s)",
    "predict_images_per_s": "predict (images/s)",
    "status": "status",
    "note": "note",
    "mode": "mode",
    "nmi": "NMI",
    "ari": "ARI",
    "f1": "F1",
    "tau": "tau",
    "tau_rule": "tau chosen by",
    "backbone": "backbone",
    "image_size": "input (px)",
    "resize_mode": "resize",
    "coreset": "coreset",
    "peak_rss_mb": "peak memory (MB)",
    "configs": "backbones combined",
    "image_aurocs": "image AUROC each",
    "best_single": "better alone",
    "best_single_auroc": "its image AUROC",
    "fused_auroc": "combined image AUROC",
    "gain": "gain",
    "n_test": "test images",
}
REPORT_COLUMNS = (
    "notebook",
    "cell",
    "dataset",
    "data",
    "method",
    "task",
    "backbone",
    "variant",
    "config",
    "status",
    "freshness",
    "note",
    "image_auroc",
    "pixel_auroc",
    "pro",
    "accuracy",
    "fit_s",
    "predict_images_per_s",
    "synthetic",
    "duration_s",
    "metrics",
)
DETECTION_COLUMNS = (
    "dataset",
    "method",
    "config",
    "image_auroc",
    "pixel_auroc",
    "pro",
    "accuracy",
    "fit_s",
    "predict_images_per_s",
    "status",
    "note",
    "synthetic",
    "notebook",
    "cell",
)
FUSION_COLUMNS = (
    "dataset",
    "method",
    "configs",
    "image_aurocs",
    "best_single",
    "best_single_auroc",
    "fused_auroc",
    "gain",
    "n_test",
)
SETTINGS_COLUMNS = (
    "dataset",
    "backbone",
    "image_size",
    "resize_mode",
    "coreset",
    "image_auroc",
    "pixel_auroc",
    "pro",
    "fit_s",
    "predict_images_per_s",
    "peak_rss_mb",
    "cell",
    "status",
)
CLUSTERING_COLUMNS = (
    "dataset",
    "config",
    "mode",
    "nmi",
    "ari",
    "f1",
    "tau",
    "tau_rule",
    "status",
    "note",
    "synthetic",
    "notebook",
    "cell",
)
_SKIPPED_FOLDERS = ("benchmarks",)


@dataclass(frozen=True)
class Report:
    """One grid cell's files under ``reports/<notebook>/``.

    Attributes:
        notebook: the notebook folder's name (the notebook's stem).
        cell: the cell name (``<dataset key>-<backbone or variant>``).
        folder: the notebook folder.
        metrics: the last good run's metrics (with ``_run``), None if it never succeeded.
        failed: ``{"_run": ...}`` of the last run if it failed, else None.
    """

    notebook: str
    cell: str
    folder: Path
    metrics: dict[str, Any] | None
    failed: dict[str, Any] | None

    @property
    def run(self) -> dict[str, Any]:
        """The ``_run`` record of the last run (the failed one if it failed)."""
        return (self.failed or self.metrics or {}).get("_run") or {}

    @property
    def html(self) -> Path | None:
        """The last good report's HTML, if it exists."""
        path = self.folder / f"{self.cell}.html"
        return path if self.metrics is not None and path.is_file() else None

    @property
    def failed_html(self) -> Path | None:
        """The failed run's HTML, if the last run failed and it exists."""
        path = self.folder / f"{self.cell}.failed.html"
        return path if self.failed is not None and path.is_file() else None

    @property
    def error(self) -> str:
        """``"<exception name>: <first line of its message>"`` of a failed run, else ""."""
        if self.failed is None:
            return ""
        error = self.run.get("error") or {}
        lines = str(error.get("evalue", "")).strip().splitlines()
        return f"{error.get('ename', 'error')}: {lines[0] if lines else ''}".rstrip(": ")


def read_reports(reports_dir: str | os.PathLike) -> list[Report]:
    """Every report under ``reports_dir/*/`` (``benchmarks/`` and hidden files left out),
    sorted by notebook folder and cell name. Unreadable JSON files are passed over."""
    reports_dir = Path(reports_dir)
    if not reports_dir.is_dir():
        return []
    found: list[Report] = []
    for folder in sorted(
        p for p in reports_dir.iterdir() if p.is_dir() and p.name not in _SKIPPED_FOLDERS and not p.name.startswith(".")
    ):
        cells: dict[str, dict[str, Any]] = {}
        for path in sorted(folder.glob("*.json")):
            if path.name.startswith("."):
                continue
            for suffix, kind in ((".failed.json", "failed"), (".metrics.json", "metrics")):
                if path.name.endswith(suffix):
                    data = io.read_json_object(path)
                    if data is not None:
                        cells.setdefault(path.name[: -len(suffix)], {})[kind] = data
                    break
        found += [
            Report(folder.name, name, folder, entry.get("metrics"), entry.get("failed"))
            for name, entry in sorted(cells.items())
        ]
    return found


def freshness(report: Report, notebook_sha256: str | None, sources_hash: str) -> tuple[str, str]:
    """``(freshness, why)`` of a report's last good run: ``"current"``, ``"stale"`` (its
    notebook's bytes, ``notebook_sha256`` now, differ from the recorded ones, or a package
    module its kernel loaded changed: :func:`anomalib_study.freshness.changed_modules`) or
    ``"unknown"`` (nothing recorded, or the notebook not found: None). A report from before
    the per-module record is judged on ``sources_hash``: any change to the package counts."""
    run = (report.metrics or {}).get("_run") or {}
    recorded_notebook = run.get("notebook_sha256")
    if "code" in run:
        changed_code = code_freshness.changed_modules(run.get("code"))
        if changed_code is None:
            return "unknown", "the code its kernel loaded was not recorded"
    elif not run.get("sources_hash"):
        return "unknown", "run before the notebook and sources hashes were recorded"
    else:
        changed_code = [] if sources_hash == run["sources_hash"] else None
    if not recorded_notebook:
        return "unknown", "run before the notebook hash was recorded"
    if notebook_sha256 is None:
        return "unknown", f"notebook {report.notebook}.ipynb not found"
    changed = []
    if notebook_sha256 != recorded_notebook:
        changed.append(f"{report.notebook}.ipynb changed")
    if changed_code is None:
        changed.append("the package sources changed")
    elif changed_code:
        changed.append(code_freshness.describe_changes(changed_code))
    return ("stale", " and ".join(changed) + " since it ran") if changed else ("current", "")


def find_notebook(report: Report, notebooks_dir: Path | None = None) -> Path | None:
    """The notebook a report's folder is named after, as it is now: ``notebooks_dir/<folder>.ipynb``
    (default: ``notebooks/`` beside the reports folder), else the path its run recorded."""
    folder = notebooks_dir if notebooks_dir is not None else report.folder.parent.parent / "notebooks"
    candidates = [Path(folder) / f"{report.notebook}.ipynb"]
    if report.run.get("notebook"):
        candidates.append(Path(report.run["notebook"]))
    return next((c for c in candidates if c.is_file()), None)


def collect_reports(
    reports_dir: str | os.PathLike, *, notebooks_dir: str | os.PathLike | None = None, sources_hash: str | None = None
) -> pd.DataFrame:
    """One row per report under ``reports_dir`` (columns :data:`REPORT_COLUMNS`).

    Args:
        reports_dir: the reports folder (``reports/<notebook>/<cell>.metrics.json``).
        notebooks_dir: where the notebooks are now (default: ``notebooks/`` beside
            ``reports_dir``, else the path each run recorded); for ``freshness``.
        sources_hash: the package sources to compare with (default: this package's now).

    ``fit_s`` is the fitting time including the extraction of the training features,
    ``predict_images_per_s`` the test images scored per second (extraction included);
    ``metrics`` holds the whole metrics dict (None for a cell that never succeeded).
    """
    sources_hash = io.package_sources_hash() if sources_hash is None else sources_hash
    notebooks = None if notebooks_dir is None else Path(notebooks_dir)
    rows, hashes = [], {}
    for report in read_reports(reports_dir):
        rows.append(_report_row(report, *report_freshness(report, notebooks, sources_hash, hashes)))
    table = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    if len(table):  # a cell that never succeeded has no method: it is the one of its notebook's other cells
        known = table[table["method"] != ""].groupby("notebook")["method"].first().to_dict()
        table["method"] = [
            method or known.get(notebook, "") for method, notebook in zip(table["method"], table["notebook"])
        ]
        table["task"] = [task or _task(method) for task, method in zip(table["task"], table["method"])]
    return table


def report_freshness(
    report: Report,
    notebooks_dir: Path | None = None,
    sources_hash: str | None = None,
    notebook_hashes: dict[Path, str] | None = None,
) -> tuple[str, str]:
    """``(freshness, why)`` of a report as the front page and ``verify`` state it: :func:`freshness`
    against its notebook as it is now (:func:`find_notebook`; ``notebook_hashes`` caches their
    sha256 across reports), and never "current" for a metrics file of another layout."""
    if report.metrics is None:
        return "unknown", ""
    layout = schema.problems(report.metrics)
    if layout:  # read as far as it goes, never claimed current
        return "unknown", f"its metrics file does not hold the current layout: {layout[0]}"
    notebook = find_notebook(report, notebooks_dir)
    hashes = {} if notebook_hashes is None else notebook_hashes
    if notebook is not None and notebook not in hashes:
        hashes[notebook] = io.sha256_file(notebook)
    sources = io.package_sources_hash() if sources_hash is None else sources_hash
    return freshness(report, hashes.get(notebook), sources)


def _task(method: str) -> str:
    return methods.method_task(method)


def _report_row(report: Report, fresh: str, why: str) -> dict[str, Any]:
    metrics = report.metrics or {}
    run = report.run
    data = metrics.get("dataset") if isinstance(metrics.get("dataset"), dict) else {}
    method = str(metrics.get("method") or "")
    fit_s, images_per_s = _speed(metrics)
    variant = str(run.get("variant") or "")
    backbone = str(run.get("backbone") or "")
    status = "failed" if report.failed is not None else "stale" if fresh == "stale" else "ok"
    note = report.error or why
    if report.failed is not None and report.metrics is not None:
        note += " (numbers: the last good run)"
    return {
        "notebook": report.notebook,
        "cell": report.cell,
        "dataset": str(run.get("dataset") or report.cell),
        "data": str(data.get("name", "")),
        "method": method,
        "task": str(metrics.get("task") or _task(method)),
        "backbone": backbone,
        "variant": variant,
        "config": variant or backbone,
        "status": status,
        "freshness": fresh,
        "note": note,
        **{key: _number(metrics.get(key)) for key in ("image_auroc", "pixel_auroc", "pro", "accuracy")},
        "fit_s": fit_s,
        "predict_images_per_s": images_per_s,
        "synthetic": metrics.get("synthetic") is True,
        "duration_s": _number(run.get("duration_s")),
        "metrics": report.metrics,
    }


def _speed(metrics: dict[str, Any]) -> tuple[float, float]:
    """``(fit seconds, test images per second)``, NaN where the report has no timing."""
    timings = metrics.get("timings") or {}
    if "predict_images_per_s" in timings:
        return _number(timings.get("fit_s")), _number(timings["predict_images_per_s"])
    if "extract_train_s" in timings:  # the first kNN reports timed the extraction apart from fit and score
        fit = _number(timings["extract_train_s"]) + _number(timings.get("fit_s", 0.0))
        predict = _number(timings.get("extract_test_s", 0.0)) + _number(timings.get("score_s", 0.0))
        n_test = metrics.get("n_test")
        return fit, (n_test / predict if isinstance(n_test, (int, float)) and predict > 0 else math.nan)
    return _number(timings.get("fit_s")), math.nan


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def method_label(method: str, config: str) -> str:
    """``"PatchCore · efficientnet_lite0"``: a method and its backbone or variant."""
    label = METHOD_LABELS.get(method, method)
    return f"{label} · {config}" if config else label


def _method_order(table: pd.DataFrame) -> pd.Series:
    order = {m: i for i, m in enumerate(detection_methods())}
    return table["method"].map(lambda m: order.get(m, len(order)))


def detection_table(reports: pd.DataFrame) -> pd.DataFrame:
    """The detection reports (kNN, PatchCore, autoencoders), one row per report, sorted by
    data set, method and backbone / variant; columns :data:`DETECTION_COLUMNS` (``method``
    is the display label). NaN where a report has no such figure (e.g. kNN gives no maps)."""
    table = reports[reports["task"] == "detection"].copy()
    table = table.assign(_order=_method_order(table)).sort_values(["dataset", "_order", "config", "notebook"])
    table["method"] = [METHOD_LABELS.get(m, m) for m in table["method"]]
    return table[list(DETECTION_COLUMNS)].reset_index(drop=True)


def auroc_matrix(reports: pd.DataFrame, value: str = "image_auroc") -> pd.DataFrame:
    """``value`` (default image AUROC) of each detection report as a matrix: one row per
    method and backbone / variant (:func:`method_label`), one column per data set (the one
    its metrics name, ``data``; the study's data set key where a report names none)."""
    table = reports[(reports["task"] == "detection") & reports[value].notna()].copy()
    if not len(table):
        return pd.DataFrame(dtype=float)
    table = table.assign(
        _order=_method_order(table),
        row=[method_label(m, c) for m, c in zip(table["method"], table["config"])],
        dataset=[data or key for data, key in zip(table["data"], table["dataset"])],
    )
    rows = list(dict.fromkeys(table.sort_values(["_order", "config"])["row"]))
    matrix = table.pivot_table(index="row", columns="dataset", values=value, aggfunc="first")
    matrix = matrix.reindex(index=rows, columns=sorted(matrix.columns))
    matrix.index.name, matrix.columns.name = "method", "data set"
    return matrix


def speed_table(reports: pd.DataFrame) -> pd.DataFrame:
    """The detection reports with both an image AUROC and a prediction speed: columns
    ``method`` (label), ``config``, ``dataset``, ``image_auroc``, ``predict_images_per_s``."""
    table = detection_table(reports)
    table = table[table["image_auroc"].notna() & table["predict_images_per_s"].notna()]
    return table[["method", "config", "dataset", "image_auroc", "predict_images_per_s"]].reset_index(drop=True)


def clustering_table(reports: pd.DataFrame) -> pd.DataFrame:
    """The anomaly-clustering reports, one row per data set x backbone x mode: NMI, ARI, F1,
    tau and how it was chosen (columns :data:`CLUSTERING_COLUMNS`)."""
    rows = []
    for report in reports[reports["task"] == "clustering"].sort_values(["dataset", "config"]).itertuples():
        modes = (report.metrics or {}).get("modes") or {}
        if not modes:  # never succeeded: one row saying so
            rows.append(
                {
                    "dataset": report.dataset,
                    "config": report.config,
                    "mode": "",
                    "status": report.status,
                    "note": report.note,
                    "synthetic": report.synthetic,
                    "notebook": report.notebook,
                    "cell": report.cell,
                }
            )
        for mode, result in modes.items():
            rows.append(
                {
                    "dataset": report.dataset,
                    "config": report.config,
                    "mode": mode,
                    **{key: _number(result.get(key)) for key in ("nmi", "ari", "f1", "tau")},
                    "tau_rule": str(result.get("tau_rule") or ""),
                    "status": report.status,
                    "note": report.note,
                    "synthetic": report.synthetic,
                    "notebook": report.notebook,
                    "cell": report.cell,
                }
            )
    return pd.DataFrame(rows, columns=list(CLUSTERING_COLUMNS))


def settings_table(reports: pd.DataFrame, method: str = "patchcore") -> pd.DataFrame:
    """One method's reports on the data sets it ran with more than one setting, each with its
    input setting read from its metrics (backbone, input side, resize mode, coreset share):
    image / pixel AUROC, PRO, fit seconds, test images/s and the run's peak resident memory
    (MB), sorted by data set, backbone, input side and mode (columns :data:`SETTINGS_COLUMNS`).
    For the resolution / resize-mode ablation (``studies/patchcore_resolution.yaml``) beside
    the main study's cells."""
    rows = []
    for report in reports[(reports["method"] == method) & reports["metrics"].notna()].itertuples():
        metrics = report.metrics
        net = metrics.get("backbone") or {}
        pre = net.get("preprocessing") or {}
        ratio = (metrics.get("params") or {}).get("coreset_ratio")
        rows.append(
            {
                "dataset": report.dataset,
                "backbone": str(net.get("name", report.backbone)),
                "image_size": _number(net.get("image_size")),
                "resize_mode": str(pre.get("resize_mode", "crop")),
                "coreset": f"{100 * ratio:g} %" if isinstance(ratio, (int, float)) else "",
                "image_auroc": report.image_auroc,
                "pixel_auroc": report.pixel_auroc,
                "pro": report.pro,
                "fit_s": report.fit_s,
                "predict_images_per_s": report.predict_images_per_s,
                "peak_rss_mb": _number((metrics.get("peak_memory") or {}).get("peak_rss_mb")),
                "cell": report.cell,
                "status": report.status,
            }
        )
    table = pd.DataFrame(rows, columns=list(SETTINGS_COLUMNS))
    several = table.groupby(["dataset", "backbone"])["cell"].transform("size") > 1
    table = table[several].sort_values(["dataset", "backbone", "image_size", "resize_mode", "coreset"])
    return table.reset_index(drop=True)


def _threshold_normalised(metrics: dict[str, Any]) -> tuple[list[str], Any] | None:
    """``(test paths, image scores / calibrated threshold)`` of a report, None if it lacks either."""
    import numpy as np

    rows, threshold = metrics.get("per_image"), metrics.get("threshold")
    if not rows or not isinstance(threshold, (int, float)) or not threshold > 0:
        return None
    try:
        paths = [str(row["path"]) for row in rows]
        scores = np.array([float(row["score"]) for row in rows]) / float(threshold)
    except (KeyError, TypeError, ValueError):
        return None
    return paths, scores


def fusion_table(reports: pd.DataFrame, method: str = "patchcore") -> pd.DataFrame:
    """The image scores of one method's backbones / variants combined, per data set.

    Each report's image scores are divided by its calibrated threshold (the 0.99 quantile of
    the scores of its held-out normal training images, so both are on the scale "1 = the
    edge of normal"), the normalised scores of every ok report of ``method`` on the data set
    are summed, and the sum's image AUROC is computed on the test labels. Only data sets
    with at least two such reports scored on the same test images in the same order; image
    level only (the anomaly maps are not stored). Reports of a variants grid (e.g. the
    resolution ablation) are left out: one report per backbone. Columns
    :data:`FUSION_COLUMNS`; ``gain`` = fused - best single report.
    """
    import numpy as np

    from anomalib_study.metrics import image_auroc

    rows = []
    selected = reports[
        (reports["method"] == method)
        & (reports["status"] == "ok")
        & reports["metrics"].notna()
        & (reports["variant"] == "")
    ]
    for dataset, group in selected.sort_values(["dataset", "config"]).groupby("dataset", sort=True):
        parts = []
        for report in group.itertuples():
            normalised = _threshold_normalised(report.metrics)
            if normalised is not None:
                parts.append((report.config, report.image_auroc, report.metrics["per_image"], *normalised))
        if len(parts) < 2 or any(part[3] != parts[0][3] for part in parts[1:]):
            continue
        labels = np.array([int(row["label"]) for row in parts[0][2]])
        fused = image_auroc(labels, np.sum([part[4] for part in parts], axis=0))
        best = max(parts, key=lambda part: part[1])
        rows.append(
            {
                "dataset": dataset,
                "method": METHOD_LABELS.get(method, method),
                "configs": " + ".join(part[0] for part in parts),
                "image_aurocs": ", ".join(f"{part[1]:.3f}" for part in parts),
                "best_single": best[0],
                "best_single_auroc": best[1],
                "fused_auroc": fused,
                "gain": fused - best[1],
                "n_test": int(labels.size),
            }
        )
    return pd.DataFrame(rows, columns=list(FUSION_COLUMNS))


def published_table(reports: pd.DataFrame, method: str | None = None) -> pd.DataFrame:
    """The published figures beside ours: for every report with metrics (of ``method``, or
    every method), the rows of its comparison in :mod:`anomalib_study.published` (this run
    first, then the published figures nearest to it, each saying what differs).

    Columns: ``method`` (label), ``dataset`` (the data set its metrics name), ``config``, ``kind`` (``"this run"`` or
    ``"published"``), then the comparison's own columns (``source``, ``data``, the figures,
    ``what differs``). A report whose metrics file is not of the current layout
    (:mod:`anomalib_study.schema`) is left out: the reports table names it.
    """
    frames = []
    current = reports["metrics"].map(lambda metrics: metrics is not None and not schema.problems(metrics))
    selected = reports[current & reports["method"].isin(list(COMPARISONS))]
    if method is not None:
        selected = selected[selected["method"] == method]
    selected = selected.assign(_order=selected["method"].map(list(COMPARISONS).index))
    for report in selected.sort_values(["_order", "dataset", "config"]).itertuples():
        rows = COMPARISONS[report.method](report.metrics)
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        kind = ["this run" if s == "this run" else "published" for s in frame.get("source", ["published"] * len(frame))]
        frame.insert(0, "kind", kind)
        frame.insert(0, "config", report.config)
        frame.insert(0, "dataset", report.data or report.dataset)
        frame.insert(0, "method", METHOD_LABELS.get(report.method, report.method))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["method", "dataset", "config", "kind", "source", "data", "what differs"])
    table = pd.concat(frames, ignore_index=True)
    return table[[c for c in table.columns if c != "what differs"] + ["what differs"]]


def status_counts(reports: pd.DataFrame) -> dict[str, int]:
    """Reports per status, e.g. ``{"ok": 40, "stale": 2, "failed": 1}`` (zeros left out)."""
    counts = reports["status"].value_counts() if len(reports) else pd.Series(dtype=int)
    return {status: int(counts[status]) for status in ("ok", "stale", "failed") if counts.get(status, 0)}


def records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """A table as JSON-ready rows (NaN -> None, the ``metrics`` column left out)."""
    kept = table.drop(columns=[c for c in ("metrics",) if c in table.columns])
    return json.loads(kept.to_json(orient="records", double_precision=15))


def summary(reports: pd.DataFrame) -> dict[str, Any]:
    """What notebook 05 writes as its metrics: status counts, the detection and clustering
    tables, and the image-AUROC matrix (method x data set)."""
    matrix = auroc_matrix(reports)
    return {
        "schema": schema.SCHEMA_VERSION,
        "method": "comparison",
        "task": "comparison",
        "n_reports": int(len(reports)),
        "status_counts": status_counts(reports),
        "detection": records(detection_table(reports)),
        "clustering": records(clustering_table(reports)),
        "patchcore_fusion": records(fusion_table(reports)),
        "image_auroc_matrix": {
            row: {col: (None if pd.isna(v) else float(v)) for col, v in values.items()}
            for row, values in matrix.to_dict(orient="index").items()
        },
    }
