"""The front page ``reports/index.html``: what the study is, the comparison, every report.

Numbers come from the metrics files through :mod:`anomalib_study.comparison` (never from a
rendered notebook); the two plots are small PNGs embedded in the page. The page is
deterministic: the same files give the same bytes.
"""

from __future__ import annotations

import base64
import html
import io as _io
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from anomalib_study import comparison, io

COMPARISON_NOTEBOOK = "05_comparison"
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }
table { border-collapse: collapse; margin-bottom: 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8e8; }
tr.stale td { background: #fff6dc; }
tr.skipped td { color: #777; }
.note { color: #8a5a00; }
.error { color: #a00; font-family: monospace; font-size: 0.9em; }
img { max-width: 100%; margin: 0.5em 1em 1em 0; vertical-align: top; }
"""
_STUDY = (
    "This study compares image anomaly detection methods on industrial inspection images, on a CPU: "
    "deep nearest-neighbour detection (DN2: the mean distance of an image's embedding to its k nearest "
    "normal embeddings), PatchCore (a coreset memory bank of patch features, with anomaly maps), "
    "reconstruction autoencoders (convolutional from scratch, or with a pretrained encoder) and anomaly "
    "clustering (grouping the anomalous images into defect types). Each numbered notebook runs once per "
    "data set and backbone (or variant) from a study file; every figure on this page is read from the "
    "metrics files those runs wrote, and the comparison notebook sets them beside the published figures "
    "of each seed work, saying what differs."
)
_DISPLAY = (
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
)


def write_index(
    reports_dir: str | os.PathLike = "reports",
    *,
    skipped: Mapping[tuple[str, str], str] | None = None,
    sources_hash: str | None = None,
    notebooks_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``reports_dir/index.html`` and return its path.

    The page: a paragraph on the study; the comparison (the detection table, the heatmap
    of image AUROC per method x data set, image AUROC against images/s, the clustering
    NMI per mode); then every report under ``reports_dir/*/``, grouped by notebook and
    data set, with its headline figures, status (ok / stale / failed with its error /
    skipped), links; then the ``reports_dir/benchmarks/*.json`` files.

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
        "<html><head><meta charset='utf-8'><title>anomalib_study reports</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>anomalib_study reports</h1>",
        f"<p>{html.escape(_STUDY)}</p>",
    ]
    if not len(table) and not skipped:
        parts.append("<p>No reports yet: run <code>anomalib-study run studies/default.yaml</code>.</p>")
    else:
        parts.append(_status_line(table))
        parts += _comparison_section(reports, table)
        parts += _reports_section(reports, table, found, dict(skipped or {}))
    benchmarks = sorted((reports / "benchmarks").glob("*.json")) if (reports / "benchmarks").is_dir() else []
    if benchmarks:
        parts.append("<h2>benchmarks</h2><ul>")
        parts += [f"<li><a href='benchmarks/{html.escape(p.name)}'>{html.escape(p.name)}</a></li>" for p in benchmarks]
        parts.append("</ul>")
    parts.append("</body></html>\n")
    index = reports / "index.html"
    with io.atomic_write(index, "w") as handle:
        handle.write("\n".join(parts))
    return index


def _status_line(table: pd.DataFrame) -> str:
    counts = comparison.status_counts(table)
    text = f"{len(table)} report(s): " + ", ".join(f"{n} {s}" for s, n in counts.items()) if len(table) else ""
    unknown = int(((table["freshness"] == "unknown") & table["metrics"].notna()).sum()) if len(table) else 0
    if unknown:
        text += (
            f". {unknown} of them ran before the runner recorded their notebook and sources hashes: "
            "whether those are stale is unknown"
        )
    return f"<p>{html.escape(text)}.</p>" if text else ""


def _comparison_section(reports: Path, table: pd.DataFrame) -> list[str]:
    detection = comparison.detection_table(table) if len(table) else pd.DataFrame()
    clustering = comparison.clustering_table(table) if len(table) else pd.DataFrame()
    if not len(detection) and not len(clustering):
        return []
    parts = ["<h2>comparison</h2>"]
    full = sorted((reports / COMPARISON_NOTEBOOK).glob("*.html")) if (reports / COMPARISON_NOTEBOOK).is_dir() else []
    full = [p for p in full if not p.name.endswith(".failed.html")]
    if full:
        parts.append(
            f"<p>With the published figures beside ours and what differs: "
            f"<a href='{COMPARISON_NOTEBOOK}/{html.escape(full[0].name)}'>the comparison report</a>.</p>"
        )
    if len(detection):
        parts.append(
            "<p>Detection: image AUROC, pixel AUROC, PRO and accuracy at each method's calibrated "
            "threshold; fit time includes extracting the training features, speed the test images "
            "scored per second with their extraction (kNN embeddings may come from the feature cache, "
            "which makes kNN look faster than it is on new images).</p>"
        )
        shown = detection[list(_DISPLAY)].rename(columns=comparison.LABELS)
        parts.append(_html_table(shown))
        matrix = comparison.auroc_matrix(table)
        if len(matrix):
            parts.append(_figure_img(_heatmap(matrix), "image AUROC per method and data set"))
        speed = comparison.speed_table(table)
        if len(speed):
            parts.append(_figure_img(_scatter(speed), "image AUROC against test images per second"))
    if len(clustering) and clustering["nmi"].notna().any():
        parts.append(
            "<p>Anomaly clustering: NMI against the true defect types per mode "
            "(tau chosen without labels; the clustering reports give ARI, F1 and the tau curve).</p>"
        )
        nmi = clustering.pivot_table(index=["dataset", "config"], columns="mode", values="nmi", aggfunc="first")
        nmi.columns.name = None  # the modes are the columns; no empty "mode" column on the page
        nmi = nmi.reset_index().rename(columns={"dataset": "data set", "config": "backbone"})
        parts.append(_html_table(nmi))
    return parts


def _heatmap(matrix: pd.DataFrame):
    from anomalib_study import plots

    return plots.plot_auroc_heatmap(matrix.to_numpy(), list(matrix.index), list(matrix.columns))


def _scatter(speed: pd.DataFrame):
    from anomalib_study import plots

    return plots.plot_auroc_vs_speed(
        speed["image_auroc"], speed["predict_images_per_s"], speed["method"], speed["config"]
    )


_DECIMALS = {comparison.LABELS["fit_s"]: 1, comparison.LABELS["predict_images_per_s"]: 2}


def _html_table(frame: pd.DataFrame) -> str:
    """pandas' HTML table: scores to 3 decimals, seconds to 1, images/s to 2, "-" for none."""
    formatters = {
        column: (lambda v, d=decimals: "-" if pd.isna(v) else f"{v:.{d}f}")
        for column, decimals in _DECIMALS.items()
        if column in frame.columns
    }
    return frame.to_html(
        index=False, na_rep="-", float_format=lambda v: f"{v:.3f}", formatters=formatters, border=0, escape=True
    )


def _figure_img(fig, alt: str) -> str:
    """The figure as an embedded PNG (85 dpi, no software stamp: the same figure, the same bytes)."""
    import matplotlib.pyplot as plt

    buffer = _io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=85,
        facecolor="white",
        bbox_inches="tight",
        pad_inches=0.05,
        metadata={"Software": None},
    )
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _reports_section(reports: Path, table: pd.DataFrame, found: dict, skipped: dict[tuple[str, str], str]) -> list[str]:
    esc = html.escape
    rows = {(r.notebook, r.cell): r for r in table.itertuples()}
    folders = sorted({folder for folder, _ in rows} | {folder for folder, _ in skipped})
    parts = []
    for folder in folders:
        cells = sorted(
            {cell for f, cell in rows if f == folder} | {cell for f, cell in skipped if f == folder},
            key=lambda cell: (str(rows[(folder, cell)].dataset) if (folder, cell) in rows else cell, cell),
        )
        runs = [found[(folder, c)].run for c in cells if (folder, c) in found]
        titles = sorted({r.get("title") for r in runs if r.get("title")})
        headline: list[str] = []
        for run in runs:
            headline += [k for k in run.get("headline", []) if k not in headline]
        with_variant = [bool(r.get("variant")) for r in runs]
        column = (
            "variant"
            if with_variant and all(with_variant)
            else "backbone / variant"
            if any(with_variant)
            else "backbone"
        )
        parts.append(f"<h2>{esc(folder)}</h2>")
        if titles:
            parts.append(f"<p>{esc(' / '.join(titles))}</p>")
        parts.append(
            f"<table><tr><th>dataset</th><th>{column}</th>"
            + "".join(f"<th>{esc(k)}</th>" for k in headline)
            + "<th>status</th><th>duration (s)</th><th>report</th><th>note</th></tr>"
        )
        datasets = [str(rows[(folder, c)].dataset) if (folder, c) in rows else c for c in cells]
        for i, cell in enumerate(cells):  # sorted by dataset: a dataset's name spans its cells
            dataset_cell = ""
            if i == 0 or datasets[i] != datasets[i - 1]:
                span = 1
                while i + span < len(cells) and datasets[i + span] == datasets[i]:
                    span += 1
                dataset_cell = (
                    f"<td rowspan='{span}'>{esc(datasets[i])}</td>" if span > 1 else f"<td>{esc(datasets[i])}</td>"
                )
            parts.append(
                _report_row(
                    folder,
                    cell,
                    rows.get((folder, cell)),
                    found.get((folder, cell)),
                    skipped.get((folder, cell)),
                    headline,
                    dataset_cell,
                )
            )
        parts.append("</table>")
    return parts


def _report_row(
    folder: str,
    cell: str,
    row: Any,
    report: comparison.Report | None,
    skipped: str | None,
    headline: list[str],
    dataset_cell: str,
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
        f"<tr class='{esc(status)}'>{dataset_cell}<td>{esc(str(column))}</td>"
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
