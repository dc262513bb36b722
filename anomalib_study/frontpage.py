"""The front page ``reports/index.html``: what the study found, then every report.

It opens with the findings (:mod:`anomalib_study.findings_html`: the findings in a few
sentences, detection at a glance, each seed work's table beside its published figures, the
plots, the ablations; where ``benchmarks/ae_reproducibility.json`` exists, the spread an
autoencoder's figures carry from training alone is one of the findings), then lists every
report, one collapsed section per notebook. Numbers
come from the metrics files through :mod:`anomalib_study.comparison` (never from a rendered
notebook); the plots are PNGs embedded in the page, nothing is loaded from the network. The
page is deterministic: the same files give the same bytes.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from anomalib_study import comparison, findings, findings_html, io

COMPARISON_NOTEBOOK = "05_comparison"
_STUDY = (
    "This study compares image anomaly detection methods on industrial inspection images, on a CPU: "
    "deep nearest-neighbour detection (DN2: the mean distance of an image's embedding to its k nearest "
    "normal embeddings), PatchCore (a coreset memory bank of patch features, with anomaly maps), "
    "reconstruction autoencoders (convolutional from scratch, or with a pretrained encoder) and anomaly "
    "clustering (grouping the anomalous images into defect types). Each numbered notebook runs once per "
    "data set and setting from a study file; every figure on this page is read from the metrics files "
    "those runs wrote, and each seed work's own table is reproduced beside its published figures."
)
_NAV = (
    ("found", "what the study found"),
    ("glance", "detection at a glance"),
    ("seed", "the seed works' tables"),
    ("plots", "methods x data sets"),
    ("ablations", "ablations"),
    ("reports", "every report"),
)


def write_index(
    reports_dir: str | os.PathLike = "reports",
    *,
    skipped: Mapping[tuple[str, str], str] | None = None,
    sources_hash: str | None = None,
    notebooks_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``reports_dir/index.html`` and return its path.

    The page opens with what the study found (:mod:`anomalib_study.findings_html`: the findings
    in a few sentences, detection at a glance, each seed work's table beside its published
    figures, the method x data set heatmap and AUROC against speed, the ablations); then every
    report under ``reports_dir/*/``, one collapsed section per notebook (its status counts in one
    line at the top), grouped by data set, with its headline figures, status (ok / stale / failed
    with its error / skipped) and links; then the ``reports_dir/benchmarks/*.json`` files.

    Args:
        skipped: ``(notebook stem, cell name) -> reason`` of cells skipped by the last run.
        sources_hash, notebooks_dir: what staleness is judged against
            (:func:`anomalib_study.comparison.collect_reports`).
    """
    reports = Path(reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    table = comparison.collect_reports(reports, notebooks_dir=notebooks_dir, sources_hash=sources_hash)
    found = {(r.notebook, r.cell): r for r in comparison.read_reports(reports)}
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>anomalib_study: what the study found</title>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<style>{findings_html.CSS}</style></head><body>",
        "<h1>Image anomaly detection on industrial images: what the study found</h1>",
        f"<p>{html.escape(_STUDY)}</p>",
    ]
    if not len(table) and not skipped:
        parts.append("<p>No reports yet: run <code>anomalib-study run studies/default.yaml</code>.</p>")
    else:
        method_reports = table[table["task"] != ""] if len(table) else table
        finding = repeatability_finding(reports)
        extra = [finding] if finding else []
        found_parts = findings_html.findings_parts(method_reports, extra_findings=extra) if len(method_reports) else []
        shown = {anchor for anchor, _ in _NAV if f"id='{anchor}'" in "".join(found_parts)} | {"reports"}
        parts.append(
            "<nav>"
            + "".join(f"<a href='#{a}'>{html.escape(label)}</a>" for a, label in _NAV if a in shown)
            + _comparison_link(reports)
            + "</nav>"
        )
        parts += found_parts
        parts.append("<h2 id='reports'>Every report</h2>")
        parts.append(_status_line(table))
        parts += _reports_section(reports, table, found, dict(skipped or {}))
    benchmarks = sorted((reports / "benchmarks").glob("*.json")) if (reports / "benchmarks").is_dir() else []
    if benchmarks:
        parts.append("<h2 id='benchmarks'>Benchmarks</h2><ul>")
        parts += [f"<li><a href='benchmarks/{html.escape(p.name)}'>{html.escape(p.name)}</a></li>" for p in benchmarks]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    index = reports / "index.html"
    with io.atomic_write(index, "w") as handle:
        handle.write("\n".join(parts))
    return index


#: the autoencoder repeatability benchmark's report (``benchmarks/bench_ae_reproducibility.py``), under reports/
REPEATABILITY = Path("benchmarks") / "ae_reproducibility.json"


def repeatability_finding(reports: Path) -> str | None:
    """One finding, as HTML: how far an autoencoder's figures move from training alone (seeds and
    thread counts, one cell, one CPU), read from :data:`REPEATABILITY`; None where that file is
    absent, unreadable or a ``--quick`` smoke run."""
    try:
        bench = json.loads((reports / REPEATABILITY).read_text(encoding="utf-8"))
        runs, auroc = bench["runs"], bench["all_runs"]["image_auroc"]
        seeds = sorted({int(r["seed"]) for r in runs})
        threads = sorted({int(r["threads"]) for r in runs})
        text = (
            f"Autoencoder figures carry a spread from training alone: {bench['cell']} trained {len(runs)} times "
            f"(seeds {', '.join(map(str, seeds))} x {' and '.join(map(str, threads))} thread(s), "
            f"{bench['machine']['cpu']}) gave image AUROC {float(auroc['min']):.3f}-{float(auroc['max']):.3f}; "
            "a difference between autoencoder figures smaller than that is not a finding "
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if bench.get("quick") or not runs:
        return None
    link = f"<a href='{html.escape(REPEATABILITY.as_posix())}'>{html.escape(REPEATABILITY.as_posix())}</a>"
    return f"{html.escape(text)}({link})."


def _comparison_link(reports: Path) -> str:
    folder = reports / COMPARISON_NOTEBOOK
    full = sorted(p for p in folder.glob("*.html") if not p.name.endswith(".failed.html")) if folder.is_dir() else []
    if not full:
        return ""
    return f"<a href='{COMPARISON_NOTEBOOK}/{html.escape(full[0].name)}'>the comparison report (more detail)</a>"


def _status_line(table: pd.DataFrame) -> str:
    """``"95 reports: 67 ok, 28 stale; the freshness of 46 is unknown (...)"``, in one line."""
    if not len(table):
        return ""
    counts = comparison.status_counts(table)
    text = f"{len(table)} report(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())
    unknown = int(((table["freshness"] == "unknown") & table["metrics"].notna()).sum())
    if unknown:
        text += (
            f"; the freshness of {unknown} is unknown (they ran before the runner recorded their notebook "
            "and sources hashes)"
        )
    return (
        f"<p>{html.escape(text)}. Stale: the report's notebook or the package code it ran changed since; "
        "its figures are those of its last run. Each notebook's reports below are grouped by data set "
        "(click to open).</p>"
    )


def _data_names(table: pd.DataFrame) -> dict[str, str]:
    """Each study's data set key -> the data set its reports' metrics name (a cell that never
    succeeded takes the name its key's other reports give)."""
    names: dict[str, str] = {}
    for row in table.itertuples():
        if row.data and row.dataset not in names:
            names[row.dataset] = row.data
    return names


def _reports_section(reports: Path, table: pd.DataFrame, found: dict, skipped: dict[tuple[str, str], str]) -> list[str]:
    esc = html.escape
    rows = {(r.notebook, r.cell): r for r in table.itertuples()}
    names = _data_names(table)
    settings = {}
    if len(table):
        runs = findings.annotate(table)
        settings = {(r.notebook, r.cell): r.setting for r in runs.itertuples()}
    folders = sorted({folder for folder, _ in rows} | {folder for folder, _ in skipped})
    parts = []
    for folder in folders:

        def data_set(cell: str, folder: str = folder) -> str:
            row = rows.get((folder, cell))
            if row is None:
                return cell
            return str(row.data or names.get(row.dataset) or row.dataset)

        cells = sorted(
            {cell for f, cell in rows if f == folder} | {cell for f, cell in skipped if f == folder},
            key=lambda cell: (data_set(cell), cell),
        )
        runs_here = [found[(folder, c)].run for c in cells if (folder, c) in found]
        titles = sorted({r.get("title") for r in runs_here if r.get("title")})
        headline: list[str] = []
        for run in runs_here:
            headline += [k for k in run.get("headline", []) if k not in headline]
        with_variant = [bool(r.get("variant")) for r in runs_here]
        column = (
            "variant"
            if with_variant and all(with_variant)
            else "backbone / variant"
            if any(with_variant)
            else "backbone"
        )
        has_setting = any((folder, c) in settings for c in cells)
        statuses = [rows[(folder, c)].status if (folder, c) in rows else "skipped" for c in cells]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("ok", "stale", "failed", "skipped") if s in statuses)
        parts.append(
            f"<details id='{esc(folder)}'><summary><span class='folder'>{esc(folder)}</span>"
            + (f": {esc(' / '.join(titles))}" if titles else "")
            + f" <span class='sub'>({len(cells)} report(s): {esc(counts)})</span></summary>"
        )
        parts.append(
            f"<table><tr><th>data set</th><th>{column}</th>"
            + ("<th>setting (from its metrics)</th>" if has_setting else "")
            + "".join(f"<th>{esc(k)}</th>" for k in headline)
            + "<th>status</th><th>duration (s)</th><th>report</th><th>note</th></tr>"
        )
        datasets = [data_set(c) for c in cells]
        for i, cell in enumerate(cells):  # sorted by data set: a data set's name spans its cells
            dataset_cell = ""
            if i == 0 or datasets[i] != datasets[i - 1]:
                span = 1
                while i + span < len(cells) and datasets[i + span] == datasets[i]:
                    span += 1
                dataset_cell = (
                    f"<td rowspan='{span}'>{esc(datasets[i])}</td>" if span > 1 else f"<td>{esc(datasets[i])}</td>"
                )
            setting = f"<td>{esc(settings.get((folder, cell), ''))}</td>" if has_setting else ""
            parts.append(
                _report_row(
                    folder,
                    cell,
                    rows.get((folder, cell)),
                    found.get((folder, cell)),
                    skipped.get((folder, cell)),
                    headline,
                    dataset_cell,
                    setting,
                )
            )
        parts.append("</table></details>")
    return parts


def _report_row(
    folder: str,
    cell: str,
    row: Any,
    report: comparison.Report | None,
    skipped: str | None,
    headline: list[str],
    dataset_cell: str,
    setting: str = "",
) -> str:
    esc = html.escape
    metrics = (report.metrics if report is not None else None) or {}
    run = report.run if report is not None else {}
    status = row.status if row is not None else "skipped"
    links, notes = [], []
    if report is not None and report.html is not None:
        label = "last good report" if report.failed is not None else "report"
        links.append(f"<a href='{esc(folder)}/{esc(report.html.name)}'>{label}</a>")
    if report is not None and report.failed is not None:
        links.append(f"<a href='{esc(folder)}/{esc(cell)}.failed.html'>failed run</a>")
        notes.append(f"<span class='error'>{esc(report.error)}</span>")
    elif status == "stale":
        notes.append(f"<span class='note'>stale: {esc(row.note)}</span>")
    if skipped is not None:
        notes.append(f"<span class='note'>skipped in the last run: {esc(skipped)}</span>")
    if metrics.get("synthetic") is True:
        notes.append("<span class='note'>synthetic, not DAGM</span>")
    duration = run.get("duration_s")
    column = run.get("variant") or run.get("backbone", "")
    return (
        f"<tr class='{esc(status)}'>{dataset_cell}<td>{esc(str(column))}</td>{setting}"
        + "".join(f"<td class='num'>{esc(format_value(metrics.get(k)))}</td>" for k in headline)
        + f"<td>{esc(status)}</td>"
        f"<td class='num'>{'' if not isinstance(duration, (int, float)) else f'{float(duration):.1f}'}</td>"
        f"<td>{' | '.join(links)}</td><td>{' '.join(notes)}</td></tr>"
    )


def format_value(value: Any) -> str:
    """A metric as the index shows it: floats to 3 decimals, None as "-"."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
