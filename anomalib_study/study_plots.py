"""The study's figures across reports (the front page and notebook 05): pure functions,
arrays in, a matplotlib Figure out, sized to be read at 100 dpi in a 1400 px wide window.

``plot_auroc_heatmap`` (method x data set), ``plot_auroc_vs_speed`` (colour = method, a
few marker shapes, the best point of each data set labelled) and ``plot_setting_curves``
(a figure against an input setting, one panel per data set).
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

#: what the study's figures are drawn at (a figure of W inches is W x 100 px on the page)
DPI = 100
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_STYLES = ("-", "--", ":", "-.")


def plot_auroc_heatmap(
    values,
    methods: Sequence[str],
    datasets: Sequence[str],
    title: str | None = None,
    label: str = "image AUROC",
    ylabel: str = "method · backbone / variant",
) -> Figure:
    """Heatmap of one figure per method x data set, the value written in each cell.

    Args:
        values: (n_methods, n_datasets) scores in [0, 1] (image AUROC), NaN where a method
            has no report on a data set (left blank). Colours run from 0.5 (chance) to 1;
            lower values take the colour of 0.5 and keep their number.
        methods: the row labels (a method and its backbone or variant).
        datasets: the column labels.
    """
    import seaborn as sns

    values = np.asarray(values, dtype=float).reshape(len(methods), len(datasets))
    width = min(13.0, 4.5 + 1.05 * len(datasets))
    height = min(9.0, 1.6 + 0.42 * len(methods))
    fig, ax = plt.subplots(figsize=(width, height))
    sns.heatmap(
        values,
        mask=np.isnan(values),
        annot=True,
        fmt=".3f",
        vmin=0.5,
        vmax=1.0,
        cmap="viridis",
        linewidths=0.6,
        linecolor="white",
        xticklabels=list(datasets),
        yticklabels=list(methods),
        annot_kws={"fontsize": 10},
        cbar_kws={"label": label, "shrink": 0.8},
        ax=ax,
    )
    ax.set(xlabel="data set", ylabel=ylabel)
    ax.tick_params(labelsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    plt.setp(ax.get_yticklabels(), rotation=0)
    ax.set_title(title or f"{label} per method and data set", fontsize=12)
    fig.tight_layout()
    return fig


def _place_labels(ax, fig, x: np.ndarray, y: np.ndarray, texts: Sequence[str]) -> None:
    """Write ``texts`` beside their points, each moved down a line until it overlaps no label
    placed before it (deterministic: the order given)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for xi, yi, text in zip(x, y, texts):
        for line in range(12):
            label = ax.annotate(
                text,
                (xi, yi),
                xytext=(6.0, 3.0 - 11.0 * line),
                textcoords="offset points",
                fontsize=9,
                color="#333",
                arrowprops={"arrowstyle": "-", "color": "#999", "linewidth": 0.6} if line else None,
            )
            box = label.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        placed.append(box)


def plot_auroc_vs_speed(
    auroc,
    images_per_s,
    methods: Sequence[str],
    configs: Sequence[str],
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Image AUROC against prediction speed, one point per report: colour = method, marker =
    backbone / variant (a few shapes), speed on a log axis; ``labels`` (n,) text written beside
    the points ("" for none), e.g. the data set at each data set's best point.

    Args:
        auroc: (n,) image AUROC of each report.
        images_per_s: (n,) test images scored per second (feature extraction included), > 0.
        methods, configs: (n,) the method and the backbone / variant of each point.
    """
    auroc = np.asarray(auroc, dtype=float)
    images_per_s = np.asarray(images_per_s, dtype=float)
    methods, configs = list(methods), list(configs)
    fig, ax = plt.subplots(figsize=(11.0, 5.2))
    if not len(auroc):
        ax.text(0.5, 0.5, "no report with both an image AUROC and a timing", ha="center", va="center", fontsize=11)
    else:
        colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(dict.fromkeys(methods))}
        markers = {c: _MARKERS[i % len(_MARKERS)] for i, c in enumerate(dict.fromkeys(configs))}
        for method in colours:
            for config in markers:
                chosen = [i for i, (m, c) in enumerate(zip(methods, configs)) if m == method and c == config]
                if chosen:
                    ax.scatter(
                        images_per_s[chosen],
                        auroc[chosen],
                        color=colours[method],
                        marker=markers[config],
                        s=60,
                        alpha=0.85,
                        edgecolor="white",
                        linewidth=0.6,
                    )
        ax.set_xscale("log")
        if labels is not None:
            marked = [i for i, text in enumerate(labels) if text]
            marked.sort(key=lambda i: (-auroc[i], images_per_s[i]))
            _place_labels(ax, fig, images_per_s[marked], auroc[marked], [labels[i] for i in marked])
        method_handles = [
            Line2D([], [], marker="o", linestyle="", color=c, markersize=8, label=m) for m, c in colours.items()
        ]
        config_handles = [
            Line2D([], [], marker=mk, linestyle="", color="#555", markersize=8, label=c) for c, mk in markers.items()
        ]
        ax.legend(
            handles=method_handles + config_handles,
            title="colour: method, marker: backbone",
            fontsize=10,
            title_fontsize=10,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
        )
    ax.set_xlabel("test images per second (log scale)", fontsize=11)
    ax.set_ylabel("image AUROC", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Image AUROC against prediction speed", fontsize=12)
    fig.tight_layout()
    return fig


def plot_setting_curves(
    panels: Sequence[str],
    lines: Sequence[str],
    x,
    y,
    xlabel: str,
    ylabel: str = "image AUROC",
    title: str | None = None,
) -> Figure:
    """One panel per ``panels`` value (a data set), one line per ``lines`` value within it
    (points sorted by x; a line's colour is the part of its name before " · ", its dash the rest).

    Args:
        panels, lines: (n,) the panel and the line of each point.
        x, y: (n,) the setting (e.g. the input side in px) and the figure (e.g. image AUROC).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    names = list(dict.fromkeys(panels))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(min(13.0, 1.0 + 5.0 * max(1, len(names))), 4.0))
    axes = np.atleast_1d(axes)
    heads = list(dict.fromkeys(line.split(" · ")[0] for line in lines))
    tails = list(dict.fromkeys(line.split(" · ", 1)[-1] for line in lines))
    colours = {h: plt.get_cmap("tab10")(i % 10) for i, h in enumerate(heads)}
    dashes = {t: _STYLES[i % len(_STYLES)] for i, t in enumerate(tails)}
    for ax, name in zip(axes, names):
        for line in dict.fromkeys(lines):
            chosen = [i for i, (p, li) in enumerate(zip(panels, lines)) if p == name and li == line]
            if not chosen:
                continue
            order = sorted(chosen, key=lambda i: x[i])
            head, tail = line.split(" · ")[0], line.split(" · ", 1)[-1]
            ax.plot(
                x[order], y[order], marker="o", color=colours[head], linestyle=dashes[tail], label=line, markersize=5
            )
        ax.set_title(name, fontsize=11)
        ax.set_xlabel(xlabel, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[0].set_ylabel(ylabel, fontsize=10)
    handles, seen = [], set()
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in seen:
                seen.add(label)
                handles.append(handle)
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(4, len(handles)),
            fontsize=9,
            frameon=False,
            bbox_to_anchor=(0.5, -0.02),
        )
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * math.ceil(len(handles) / 4), 1, 1))
    return fig
