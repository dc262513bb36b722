"""The study's findings as HTML: what the front page (``reports/index.html``) and notebook 05
open with, in the same order (what was found, detection at a glance, each seed work's table,
the plots, the ablations). Figures are PNGs embedded in the page; the output is
deterministic (the same metrics files give the same bytes) and needs nothing from the network::

    runs = findings.annotate(reports)
    headline, seeds = findings.headline_table(runs), findings.seed_tables(runs)
    html = "".join(found_html(headline, seeds) + glance_html(headline, runs) + seed_html(seeds)
                   + plots_html(runs) + ablations_html(runs, reports))
"""

from __future__ import annotations

import base64
import html
import io as _io
import math
from typing import Any, Sequence

import pandas as pd

from anomalib_study import ablations, findings

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2em 2em; color: #222;
       max-width: 1320px; line-height: 1.4; }
h1 { margin: 0.2em 0; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.15em; margin-top: 1.4em; }
h3 { margin: 1.1em 0 0.3em; }
nav { margin: 0.3em 0 0.8em; } nav a { margin-right: 1.1em; }
table { border-collapse: collapse; margin: 0.3em 0 0.9em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.22em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.published td { background: #eaf2fb; }
tr.published td:first-child, td.group { background: #fff; }
tr.failed td { background: #fde8e8; } tr.stale td { background: #fff6dc; } tr.skipped td { color: #777; }
table.glance { font-size: 0.9em; width: 100%; table-layout: fixed; }
table.glance th:first-child { width: 13%; }
table.glance .auroc { font-size: 1.3em; font-weight: 650; }
table.glance td.best .auroc { color: #0a6b2a; }
.sub { color: #555; font-size: 0.86em; } .sub .part { white-space: nowrap; }
.mark { color: #8a5a00; font-size: 0.8em; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 0 1.4em; align-items: flex-start; }
.grid > div { flex: 1 1 30em; min-width: 0; overflow-x: auto; }
.grid table { font-size: 0.8em; } .grid th, .grid td { padding: 0.15em 0.35em; } .grid th { white-space: nowrap; }
.grid td.group { max-width: 9.5em; }
table.wide { width: 100%; } td.nw { white-space: nowrap; }
td.long { min-width: 22em; font-size: 0.95em; } td.group { min-width: 7em; }
table.glance a { text-decoration: none; color: inherit; }
.caption { font-weight: 600; margin: 0.3em 0 0; font-size: 0.92em; }
ul.notes { font-size: 0.86em; color: #444; margin-top: 0; }
ul.findings li { margin-bottom: 0.25em; }
details { margin: 0.3em 0; } summary { cursor: pointer; font-weight: 600; font-size: 1.05em; padding: 0.2em 0; }
.note { color: #8a5a00; } .error { color: #a00; font-family: monospace; font-size: 0.9em; }
img { max-width: 100%; margin: 0.4em 1em 0.8em 0; vertical-align: top; }
"""
_esc = html.escape


def scoped_css(scope: str = ".findings") -> str:
    """:data:`CSS` for HTML shown inside another page (notebook 05's report): every rule limited
    to elements under ``scope``, the page-wide ``body`` rule left out."""
    rules = []
    for block in CSS.split("}"):
        if "{" not in block:
            continue
        selectors, body = block.split("{", 1)
        chosen = [s.strip() for s in selectors.split(",") if s.strip() and s.strip() != "body"]
        if chosen:
            rules.append(", ".join(f"{scope} {s}" for s in chosen) + " {" + body + "}")
    return "\n".join(rules)


def format_cell(value: Any) -> str:
    """A table cell: floats to 3 decimals, whole numbers as they are, none / NaN as "-"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:.3f}"
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table_html(frame: pd.DataFrame, css_class: str = "", group_first: bool = True) -> str:
    """A table: tuple column names give a two-level heading; a first column's repeated values
    span their rows (``group_first``); a row whose ``source`` starts with "published" is styled
    as published; numbers right-aligned (:func:`format_cell`)."""
    columns = list(frame.columns)
    two_level = any(isinstance(c, tuple) and len(c) == 2 and c[1] for c in columns)
    names = [c if isinstance(c, tuple) else (c, "") for c in columns]
    values = frame.to_numpy(dtype=object).tolist()
    long = [any(isinstance(row[c], str) and len(row[c]) > 80 for row in values) for c in range(len(columns))]
    # beside a column of long text, a column of middling text keeps to one line (the long one wraps)
    short = [
        any(long) and not long[c] and 30 < max(len(format_cell(row[c])) for row in values) <= 60
        for c in range(len(columns))
    ]

    def heading(text: Any, c: int | None = None, extra: str = "") -> str:
        label = _esc(str(text)).replace("/", "/<wbr>").replace("_", "_<wbr>")
        return f"<th{extra}>{label}</th>"

    head = []
    if two_level:
        top, i = [], 0
        while i < len(names):
            group, sub = names[i]
            if not sub:
                top.append(heading(group, i, " rowspan='2'"))
                i += 1
                continue
            span = 1
            while i + span < len(names) and names[i + span][0] == group and names[i + span][1]:
                span += 1
            top.append(heading(group, None, f" colspan='{span}'"))
            i += span
        head.append("<tr>" + "".join(top) + "</tr>")
        head.append("<tr>" + "".join(heading(sub, c) for c, (_, sub) in enumerate(names) if sub) + "</tr>")
    else:
        head.append("<tr>" + "".join(heading(n[0], c) for c, n in enumerate(names)) + "</tr>")
    source = next((c for c in columns if (c[0] if isinstance(c, tuple) else c) == "source"), None)
    numeric = [any(_numeric(row[c]) for row in values) for c in range(len(columns))]
    body = []
    for r, row in enumerate(values):
        kind = ""
        if source is not None and str(row[columns.index(source)]).startswith("published"):
            kind = " class='published'"
        cells = []
        for c, value in enumerate(row):
            if c == 0 and group_first:
                if r > 0 and values[r - 1][0] == value:
                    continue
                span = 1
                while r + span < len(values) and values[r + span][0] == value:
                    span += 1
                group = "group nw" if short[c] else "group"
                attributes = f" rowspan='{span}' class='{group}'" if span > 1 else f" class='{group}'"
                cells.append(f"<td{attributes}>{_esc(format_cell(value))}</td>")
                continue
            attributes = " class='num'" if _numeric(value) or (numeric[c] and format_cell(value) == "-") else ""
            attributes = attributes or (" class='nw'" if short[c] else " class='long'" if long[c] else "")
            cells.append(f"<td{attributes}>{_esc(format_cell(value))}</td>")
        body.append(f"<tr{kind}>" + "".join(cells) + "</tr>")
    attribute = f" class='{css_class}'" if css_class else ""
    return f"<table{attribute}>" + "".join(head) + "".join(body) + "</table>"


def figure_img(fig, alt: str, dpi: int = 100) -> str:
    """The figure as an embedded PNG (no software stamp: the same figure, the same bytes)."""
    import matplotlib.pyplot as plt

    buffer = _io.BytesIO()
    fig.savefig(
        buffer,
        format="png",
        dpi=dpi,
        facecolor="white",
        bbox_inches="tight",
        pad_inches=0.05,
        metadata={"Software": None},
    )
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{data}'>"


# --------------------------------------------------------------------------- sections
def found_html(headline: pd.DataFrame, seeds: Sequence[Any], extra: Sequence[str] = ()) -> list[str]:
    """What the study found, in a few sentences (:func:`anomalib_study.findings.key_findings`), then
    ``extra`` findings given as HTML (read from elsewhere than the reports, e.g. a benchmark)."""
    lines = findings.key_findings(headline, list(seeds))
    if not lines:
        return []
    return (
        ["<h2 id='found'>What the study found</h2>", "<ul class='findings'>"]
        + [f"<li>{_esc(line)}</li>" for line in lines]
        + [f"<li>{item}</li>" for item in extra]
        + ["</ul>"]
    )


def _glance_cell(row: Any, best: bool, link_prefix: str) -> str:
    mark = "" if row.status == "ok" else f" <span class='mark'>{_esc(row.status)}</span>"
    auroc = f"<span class='auroc'>{row.image_auroc:.3f}</span>"
    if link_prefix is not None:
        auroc = f"<a href='{_esc(link_prefix)}{_esc(row.notebook)}/{_esc(row.cell)}.html'>{auroc}</a>"
    setting = " · ".join(f"<span class='part'>{_esc(part)}</span>" for part in row.setting.split(" · "))
    lines = [auroc + mark, f"<div class='sub'>{setting}</div>"]
    if not (math.isnan(row.pixel_auroc) and math.isnan(row.pro)):
        lines.append(f"<div class='sub'>pixel AUROC {format_cell(row.pixel_auroc)} · PRO {format_cell(row.pro)}</div>")
    cost = f"fit {findings.seconds_text(row.fit_s)} · {findings.speed_text(row.predict_images_per_s)}"
    if row.n_settings > 1:
        cost += f" · best of {row.n_settings}"
    lines.append(f"<div class='sub'>{_esc(cost)}</div>")
    return ("<td class='best'>" if best else "<td>") + "".join(lines) + "</td>"


def glance_html(headline: pd.DataFrame, runs: pd.DataFrame, link_prefix: str | None = "") -> list[str]:
    """Detection at a glance: one row per data set, one column per family (the registry's), the
    best image AUROC with its setting, pixel AUROC / PRO and cost; the row's best in green."""
    if not len(headline):
        return []
    order = findings.families(headline)
    parts = [
        "<h2 id='glance'>Detection at a glance</h2>",
        "<p>Per data set and method family: the best image AUROC among the reports run (how many: <i>best "
        "of n</i>, chosen on the test set), the setting that gave it (read from the report's metrics), its pixel "
        "AUROC and PRO where the data set has masks, and its cost on this machine's CPU (fit time with the "
        "training features; test images scored per second; kNN may read cached embeddings). <i>stale</i>: the "
        "report's code changed since it ran. Each figure links to its report; the best of a row is green.</p>",
        "<table class='glance'><tr><th>data set</th>" + "".join(f"<th>{_esc(f)}</th>" for f in order) + "</tr>",
    ]
    for data_set, group in headline.groupby("data_set", sort=False):
        runs_here = runs[runs["data_set"] == data_set]
        first = runs_here.iloc[0]
        about = [f"{first.metrics.get('n_test', '?')} test images"]
        about.append("masks" if first.has_masks else "no masks")
        if first.synthetic:
            about.insert(0, "synthetic (generated), not DAGM")
        name = _esc(data_set).replace("/", "/<wbr>")
        cells = [f"<td><b>{name}</b><div class='sub'>{_esc(' · '.join(about))}</div></td>"]
        top = group["image_auroc"].max()
        for family in order:
            rows = list(group[group["family"] == family].itertuples())
            cells.append(_glance_cell(rows[0], rows[0].image_auroc == top, link_prefix) if rows else "<td>-</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return parts


def seed_table_html(seed: Any) -> list[str]:
    """One seed work's table (:class:`anomalib_study.seed_tables.SeedTable`)."""
    parts = [f"<h3 id='seed-{_esc(seed.method)}'>{_esc(seed.title)}</h3>", f"<p>{_esc(seed.intro)}</p>"]
    several = len(seed.tables) > 1
    parts.append("<div class='grid'>" if several else "<div>")
    for caption, frame in seed.tables:
        parts.append("<div>" + (f"<p class='caption'>{_esc(caption)}</p>" if caption else ""))
        parts.append(table_html(frame, "" if several else "wide"))
        parts.append("</div>")
    parts.append("</div>")
    if seed.notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{_esc(note)}</li>" for note in seed.notes) + "</ul>")
    return parts


def seed_html(seeds: Sequence[Any]) -> list[str]:
    """Each seed work's table, in registry order, under one heading."""
    if not seeds:
        return []
    parts = [
        "<h2 id='seed'>The seed works' tables, reproduced</h2>",
        "<p>Each seed work's own table in its own form, our figures beside the published ones (rows shaded "
        "blue, marked <i>published</i>; from <code>anomalib_study.published</code>, each with its source), "
        "and what differs between them.</p>",
    ]
    for seed in seeds:
        parts += seed_table_html(seed)
    return parts


def plots_html(runs: pd.DataFrame) -> list[str]:
    """The heatmap (family · backbone x data set) and image AUROC against speed."""
    from anomalib_study import study_plots

    best = findings.best_per_backbone(runs)
    if not len(best):
        return []
    parts = [
        "<h2 id='plots'>Methods and data sets</h2>",
        "<p>The best image AUROC of each method family and backbone on each data set (the settings are "
        "folded in: the ablations below show each), and the same reports' image AUROC against their speed; "
        "the best point of each data set is labelled.</p>",
    ]
    matrix = findings.heatmap_matrix(runs)
    fig = study_plots.plot_auroc_heatmap(
        matrix.to_numpy(),
        list(matrix.index),
        list(matrix.columns),
        title="Best image AUROC per method family, backbone and data set",
        ylabel="method · backbone",
    )
    parts.append(figure_img(fig, "best image AUROC per method family, backbone and data set"))
    timed = best[best["predict_images_per_s"].notna() & (best["predict_images_per_s"] > 0)]
    top = timed.groupby("data_set")["image_auroc"].transform("max")
    firsts = ~timed.assign(_top=timed["image_auroc"] == top).duplicated(subset=["data_set", "_top"])
    labels = [d if (a == t and f) else "" for d, a, t, f in zip(timed["data_set"], timed["image_auroc"], top, firsts)]
    backbones = ["none (from scratch)" if b == findings.NO_BACKBONE else b for b in timed["backbone_label"]]
    fig = study_plots.plot_auroc_vs_speed(
        timed["image_auroc"], timed["predict_images_per_s"], timed["family"], backbones, labels=labels
    )
    parts.append(figure_img(fig, "image AUROC against test images per second"))
    return parts


def ablation_html(ablation: ablations.Ablation) -> list[str]:
    """One ablation: its heading, what it varies, its plot (if any) and its table."""
    parts = [f"<h3 id='ablation-{_esc(ablation.key)}'>{_esc(ablation.title)}</h3>", f"<p>{_esc(ablation.text)}</p>"]
    if ablation.curves is not None and len(ablation.curves):
        from anomalib_study import study_plots

        curves = ablation.curves
        several = curves.groupby(["panel", "line"])["x"].transform("size") > 1
        curves = curves[several]
        if len(curves):
            fig = study_plots.plot_setting_curves(
                list(curves["panel"]), list(curves["line"]), curves["x"], curves["y"], ablation.xlabel
            )
            parts.append(figure_img(fig, ablation.title))
    parts.append(table_html(ablation.table))
    return parts


def ablations_html(runs: pd.DataFrame, reports: pd.DataFrame) -> list[str]:
    """Every ablation the reports hold (:func:`anomalib_study.ablations.ablations`)."""
    found = ablations.ablations(runs, reports)
    if not found:
        return []
    parts = [
        "<h2 id='ablations'>Ablations</h2>",
        "<p>One setting varied at a time, the others as in the main study: "
        + ", ".join(f"<a href='#ablation-{_esc(a.key)}'>{_esc(a.title.lower())}</a>" for a in found)
        + ".</p>",
    ]
    for ablation in found:
        parts += ablation_html(ablation)
    return parts


def findings_parts(
    reports: pd.DataFrame, link_prefix: str | None = "", extra_findings: Sequence[str] = ()
) -> list[str]:
    """Every findings section in page order, from :func:`anomalib_study.comparison.collect_reports`'s table
    (``extra_findings``: see :func:`found_html`)."""
    runs = findings.annotate(reports)
    headline = findings.headline_table(runs)
    seeds = findings.seed_tables(runs)
    return (
        found_html(headline, seeds, extra_findings)
        + glance_html(headline, runs, link_prefix)
        + seed_html(seeds)
        + plots_html(runs)
        + ablations_html(runs, reports)
    )
