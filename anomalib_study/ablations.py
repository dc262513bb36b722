"""The study's ablations, each a small table (and, for the input, a line plot), read from the
reports' metrics files: the input resolution and resize mode, the coreset ratio, kNN's k, the
autoencoders' loss, anomaly clustering's tau, and two backbones' scores combined.

Each is found by what the metrics hold, not by a method's name: reports of one family,
backbone and data set that differ only in their input (resolution), or only in one parameter
(coreset ratio, epochs, ...); a report's own sweeps (``ablation`` rows of coreset ratios,
``k_sweep``, ``loss_ablation``, a clustering mode's ``tau_curve``)::

    runs = findings.annotate(reports)
    for ablation in ablations(runs, reports):
        ablation.title, ablation.text, ablation.table, ablation.curves
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from anomalib_study import comparison, findings


@dataclass
class Ablation:
    """One ablation: ``table`` (rows to show; a first column of repeated values is one group),
    optionally ``curves`` (columns ``panel``, ``line``, ``x``, ``y``: a line plot, ``xlabel``)."""

    key: str
    title: str
    text: str
    table: pd.DataFrame
    curves: pd.DataFrame | None = None
    xlabel: str = ""


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _row_label(row: Any) -> str:
    return row.family if row.backbone == findings.NO_BACKBONE else f"{row.family} · {row.backbone_label}"


def resolution(runs: pd.DataFrame) -> Ablation | None:
    """Image AUROC per input side and resize mode, where one family and backbone ran one data set
    with several inputs and the same other settings."""
    detection = runs[(runs["task"] == "detection") & runs["image_auroc"].notna()]
    rows, curves = [], []
    keys = ["data_set", "family", "backbone", "params_setting"]
    for _, group in detection.groupby(keys, sort=False):
        if group[["image_size", "resize_mode"]].drop_duplicates().shape[0] < 2:
            continue
        first = group.iloc[0]
        line = _row_label(first) + (f" · {first.params_setting}" if first.params_setting else "")
        for (size, mode), same in group.groupby(["image_size", "resize_mode"], sort=True):
            best = findings.best_run(same)
            rows.append(
                {
                    "data set": first.data_set,
                    "method · backbone · setting": line,
                    "resize": mode,
                    "input (px)": int(size),
                    "image AUROC": best.image_auroc,
                }
            )
            name = f"{first.backbone_label} · {mode}" + (f", {first.params_setting}" if first.params_setting else "")
            curves.append({"panel": first.data_set, "line": name, "x": size, "y": best.image_auroc})
    if not rows:
        return None
    long = pd.DataFrame(rows)
    table = long.pivot_table(
        index=["data set", "method · backbone · setting", "resize"], columns="input (px)", values="image AUROC"
    )
    table.columns = [f"{int(c)} px" for c in table.columns]
    return Ablation(
        "resolution",
        "Input resolution and resize mode",
        "Image AUROC by the input's side (px) and how the image is fitted to it: crop (shorter side resized, "
        "centre cut out), squash (the whole image resized to a square, aspect ratio lost), keep (shorter side "
        "resized, aspect ratio kept, nothing cut off). One line per backbone and mode, other settings equal.",
        table.reset_index(),
        pd.DataFrame(curves),
        "input side (px)",
    )


def one_parameter(runs: pd.DataFrame) -> Ablation | None:
    """Full runs of one family, backbone, input and data set that differ in one parameter only
    (e.g. PatchCore's coreset ratio on the whole training set, the autoencoders' epochs)."""
    detection = runs[(runs["task"] == "detection") & runs["image_auroc"].notna()]
    varying = findings.varying_params(detection)
    rows = []
    for method, group in detection.groupby("method", sort=False):
        for param in varying.get(method, []):
            other = [p for p in varying[method] if p != param]

            def key(metrics: dict, names=tuple(other)) -> str:
                return " · ".join(findings.param_text(n, (metrics.get("params") or {}).get(n)) for n in names)

            keyed = group.assign(_other=[key(m) for m in group["metrics"]])
            keyed = keyed.assign(_value=[(m.get("params") or {}).get(param) for m in keyed["metrics"]])
            for _, same in keyed.groupby(["data_set", "family", "backbone", "image_size", "resize_mode", "_other"]):
                if same["_value"].astype(str).nunique() < 2:
                    continue
                for value, runs_with in same.groupby(same["_value"].astype(str), sort=False):
                    best = findings.best_run(runs_with)
                    where = f"{_row_label(best)} · {best.image_size:g} px {best.resize_mode}"
                    rows.append(
                        {
                            "data set": best.data_set,
                            "method · backbone · input": where,
                            "parameter": findings.param_text(param, best.metrics["params"].get(param)),
                            "image AUROC": best.image_auroc,
                            "pixel AUROC": best.pixel_auroc,
                            "PRO": best.pro,
                            "fit": findings.seconds_text(best.fit_s),
                            "_sort": _nan(best.metrics["params"].get(param)),
                        }
                    )
    if not rows:
        return None
    table = pd.DataFrame(rows).sort_values(["data set", "method · backbone · input", "_sort"]).drop(columns="_sort")
    return Ablation(
        "one_parameter",
        "Coreset ratio and other single settings on the whole training set",
        "Reports of one method, backbone, input and data set that differ in one parameter only "
        "(PatchCore's coreset: the share of training patches kept in the memory bank).",
        table.reset_index(drop=True),
    )


def coreset_sweep(runs: pd.DataFrame) -> Ablation | None:
    """The coreset-ratio sweep a report ran on a subset of its training images (``ablation`` rows)."""
    rows = []
    for run in runs[runs["task"] == "detection"].itertuples():
        sweep = run.metrics.get("ablation") if isinstance(run.metrics.get("ablation"), dict) else {}
        if not sweep.get("rows") or "coreset_ratio" not in sweep["rows"][0]:
            continue
        score = (run.metrics.get("params") or {}).get("image_score", "max")
        row = {
            "data set": run.data_set,
            "method · backbone": _row_label(run),
            "train images": sweep.get("n_train_images"),
        }
        for entry in sweep["rows"]:
            value = entry.get(f"image_auroc_{score}", entry.get("image_auroc_max", entry.get("image_auroc")))
            row[f"{100 * entry['coreset_ratio']:g} %"] = _nan(value)
        rows.append(row)
    if not rows:
        return None
    table = pd.DataFrame(rows).drop_duplicates(subset=["data set", "method · backbone"])
    return Ablation(
        "coreset_sweep",
        "Coreset ratio (sweep on a subset of the training images)",
        "Image AUROC with the memory bank cut to each share of the training patches by the greedy coreset, "
        "fitted on the first training images only (count given), the same test images.",
        table.sort_values(["data set", "method · backbone"]).reset_index(drop=True),
    )


def k_sweep(runs: pd.DataFrame) -> Ablation | None:
    """Image AUROC for each number of neighbours k a report swept (``k_sweep``)."""
    rows = []
    for run in runs.itertuples():
        sweep = run.metrics.get("k_sweep")
        if not sweep:
            continue
        row = {"data set": run.data_set, "method · backbone": _row_label(run)}
        row.update({f"k = {entry['k']}": _nan(entry.get("image_auroc")) for entry in sweep})
        rows.append(row)
    if not rows:
        return None
    table = pd.DataFrame(rows).drop_duplicates(subset=["data set", "method · backbone"])
    return Ablation(
        "k",
        "Number of neighbours k",
        "Image AUROC of the mean distance to the k nearest normal training embeddings, for each k "
        "(k above the training set's size is cut to it).",
        table.reset_index(drop=True),
    )


def loss(runs: pd.DataFrame) -> Ablation | None:
    """Each loss a report trained with (``loss_ablation``): image AUROC, pixel AUROC, PRO, training time."""
    rows = []
    for run in runs.itertuples():
        for entry in run.metrics.get("loss_ablation") or []:
            score = (run.metrics.get("params") or {}).get("image_score", "residual")
            minutes = _nan(entry.get("train_minutes"))
            rows.append(
                {
                    "data set": run.data_set,
                    "method · backbone": _row_label(run),
                    "loss": entry.get("loss"),
                    "image AUROC": _nan(entry.get(f"image_auroc_{score}", entry.get("image_auroc"))),
                    "pixel AUROC": _nan(entry.get("pixel_auroc")),
                    "PRO": _nan(entry.get("pro")),
                    "epochs": entry.get("epochs_run"),
                    "training": findings.seconds_text(60 * minutes),
                }
            )
    if not rows:
        return None
    return Ablation(
        "loss",
        "Reconstruction loss",
        "The same autoencoder trained with each loss (mse: mean squared error; mse_ssim: (1 - a) MSE + "
        "a (1 - SSIM)), scored by its residual maps.",
        pd.DataFrame(rows),
    )


def tau(runs: pd.DataFrame) -> Ablation | None:
    """Anomaly clustering's NMI at the label-free tau beside tau = 0 and the best tau on its curve
    (picked with the labels: an upper bound, never a result)."""
    rows = []
    for run in runs[runs["task"] == "clustering"].itertuples():
        for mode, result in (run.metrics.get("modes") or {}).items():
            curve = result.get("tau_curve") or []
            if not curve:
                continue
            zero = next((p for p in curve if p.get("relative") == 0), curve[0])
            oracle = result.get("oracle") or {}
            rows.append(
                {
                    "data set": run.data_set,
                    "backbone": run.backbone_label,
                    "setting": run.setting,
                    "mode": mode.replace("_", "-"),
                    "tau = 0": _nan(zero.get("nmi")),
                    "label-free tau": _nan(result.get("nmi")),
                    "best tau (labels used)": _nan(oracle.get("nmi")),
                }
            )
    if not rows:
        return None
    long = pd.DataFrame(rows).drop_duplicates(subset=["data set", "setting", "mode"])
    modes = list(dict.fromkeys(long["mode"]))
    table = long.pivot_table(
        index=["data set", "backbone", "setting"],
        columns="mode",
        values=["tau = 0", "label-free tau", "best tau (labels used)"],
        sort=False,
    )
    table = table.swaplevel(axis=1).reindex(
        columns=[(m, v) for m in modes for v in ("tau = 0", "label-free tau", "best tau (labels used)")]
    )
    table = table.reset_index().drop(columns=[("setting", "")])
    table.columns = [(a, b) if b else (a, "") for a, b in table.columns]
    return Ablation(
        "tau",
        "Anomaly clustering's tau",
        "NMI of the clusters with the patch weights' temperature tau at 0 (all weight on each image's most "
        "anomalous patch), at the label-free rule's tau (the result), and at the best tau of the sweep, which "
        "is chosen by looking at the labels: an upper bound, never a result.",
        table,
    )


def fusion(runs: pd.DataFrame, reports: pd.DataFrame) -> Ablation | None:
    """Two backbones' image scores combined (:func:`anomalib_study.comparison.fusion_table`), for
    every registered detection method."""
    frames = []
    names = {(r.method, r.dataset): r.data for r in reports.itertuples() if r.data}
    for method in comparison.detection_methods():
        table = comparison.fusion_table(reports, method)
        if len(table):
            table.insert(0, "data set", [names.get((method, key), key) for key in table["dataset"]])
            frames.append(table.drop(columns=["dataset"]))
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True).rename(columns=comparison.LABELS)
    return Ablation(
        "fusion",
        "Two backbones combined",
        "Per data set, each backbone's image scores divided by its own calibrated threshold, summed; the sum's "
        "image AUROC beside each backbone's own. No labels choose anything; a negative gain means the "
        "combination is worse than the better backbone alone.",
        table,
    )


def ablations(runs: pd.DataFrame, reports: pd.DataFrame) -> list[Ablation]:
    """Every ablation the reports hold, in the order the front page shows them."""
    found = [
        resolution(runs),
        one_parameter(runs),
        coreset_sweep(runs),
        k_sweep(runs),
        loss(runs),
        tau(runs),
        fusion(runs, reports),
    ]
    return [ablation for ablation in found if ablation is not None]
