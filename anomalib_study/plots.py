"""Figures for the notebooks: pure functions, arrays in, a matplotlib Figure (or HTML) out.

Reports embed every figure, so the functions keep them small: modest sizes and DPI, and
image thumbnails as small JPEGs rather than full-resolution PNGs.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from anomalib_study.data.decode import load_image
from anomalib_study.study_plots import plot_auroc_heatmap as plot_auroc_heatmap  # the study's figures, moved
from anomalib_study.study_plots import plot_auroc_vs_speed as plot_auroc_vs_speed

_FIGSIZE = (5.0, 3.6)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC") -> Figure:
    """ROC curves, one per entry.

    Args:
        curves: ``name -> (labels (n,) in {0, 1}, scores (n,), higher = more anomalous)``.
    """
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    for name, (labels, scores) in curves.items():
        labels = np.asarray(labels)
        if len(np.unique(labels)) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def score_histogram(
    scores: np.ndarray,
    groups: Sequence[str],
    threshold: float | None = None,
    title: str = "Anomaly scores",
    bins: int = 30,
) -> Figure:
    """Histogram of scores per group (e.g. defect type or normal/anomalous), with the threshold.

    Args:
        scores: (n,) anomaly scores, higher = more anomalous.
        groups: (n,) group name of each score.
        threshold: drawn as a vertical line if given.
    """
    import seaborn as sns

    scores = np.asarray(scores, dtype=float)
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    sns.histplot(x=scores, hue=list(groups), bins=bins, element="step", stat="count", common_bins=True, ax=ax)
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3g}")
        ax.text(threshold, ax.get_ylim()[1] * 0.95, " threshold", fontsize=8, va="top")
    ax.set(xlabel="anomaly score (higher = more anomalous)", ylabel="images", title=title)
    fig.tight_layout()
    return fig


def thumbnail(path, size: int = 112, quality: int = 70) -> str:
    """A small JPEG of an image as a ``data:`` URI (longest side ``size`` pixels)."""
    image = load_image(path)
    image.thumbnail((size, size))
    return _to_data_uri(image, quality)


def thumbnails_html(paths: Sequence, captions: Sequence[str], size: int = 112, quality: int = 70) -> str:
    """A row of small JPEG thumbnails with captions, as HTML (a few KB per image)."""
    cells = []
    for path, caption in zip(paths, captions):
        cells.append(
            '<figure style="display:inline-block;margin:4px;text-align:center;width:%dpx">'
            '<img src="%s" style="max-width:%dpx;max-height:%dpx"/>'
            '<figcaption style="font-size:10px;word-wrap:break-word">%s</figcaption></figure>'
            % (size + 8, thumbnail(path, size, quality), size, size, html.escape(caption))
        )
    return "<div>" + "".join(cells) + "</div>"


def _to_data_uri(image, quality: int = 70) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_image(
    image,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.45,
    cmap: str = "jet",
):
    """The image with its anomaly map blended on top and the ground-truth outline in white.

    Args:
        image: PIL image already cropped to the map's geometry (see :func:`crop_like_input`).
        anomaly_map: (H, W) scores, higher = more anomalous; scaled to [vmin, vmax]
            (default: the map's own range) so that several overlays can share one scale.
        mask: (H, W) bool ground truth, or None.
    Returns:
        A PIL RGB image of the map's size.
    """
    from PIL import Image
    from scipy import ndimage

    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    lo = float(anomaly_map.min()) if vmin is None else vmin
    hi = float(anomaly_map.max()) if vmax is None else vmax
    scaled = np.clip((anomaly_map - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = (plt.get_cmap(cmap)(scaled)[..., :3] * 255).astype(np.float32)
    base = np.asarray(image.convert("RGB").resize(anomaly_map.shape[::-1]), dtype=np.float32)
    blended = (1 - alpha) * base + alpha * heat
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        blended[edge] = 255.0
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


def crop_like_input(path, preprocessing: dict):
    """The image at ``path`` resized and centre-cropped as a backbone's preprocessing does
    (``preprocessing["resize"]``: shorter side, or the whole image for ``"squash"``; then
    ``preprocessing["crop"]`` square), unnormalised. Under ``"keep"``: the whole image
    resized to its preprocessed input size (:func:`anomalib_study.backbones.input_size`),
    no crop, so that it lines up with that image's anomaly map."""
    from torchvision.transforms.functional import center_crop, resize

    from anomalib_study.backbones import input_size, resize_argument

    image = load_image(path)
    if preprocessing.get("resize_mode") == "keep":
        return resize(image, list(input_size(preprocessing, image.height, image.width)))
    image = resize(image, resize_argument(preprocessing))
    return center_crop(image, [int(preprocessing["crop"])] * 2)


def overlays_html(
    paths: Sequence,
    maps: np.ndarray,
    masks: Sequence | None,
    captions: Sequence[str],
    preprocessing: dict,
    vmin: float | None = None,
    vmax: float | None = None,
    size: int = 150,
    quality: int = 70,
) -> str:
    """A row of anomaly-map overlays (small JPEGs) with captions, as HTML."""
    cells = []
    masks = [None] * len(paths) if masks is None else masks
    for path, amap, mask, caption in zip(paths, maps, masks, captions):
        picture = overlay_image(crop_like_input(path, preprocessing), amap, mask, vmin, vmax)
        picture.thumbnail((size, size))
        original = crop_like_input(path, preprocessing)
        original.thumbnail((size, size))
        cells.append(
            '<figure style="display:inline-block;margin:4px;text-align:center;width:%dpx">'
            '<img src="%s" style="width:%dpx"/><img src="%s" style="width:%dpx"/>'
            '<figcaption style="font-size:10px;word-wrap:break-word">%s</figcaption></figure>'
            % (
                size + 8,
                _to_data_uri(original, quality),
                size,
                _to_data_uri(picture, quality),
                size,
                html.escape(caption),
            )
        )
    return "<div>" + "".join(cells) + "</div>"


def figure_jpeg(fig: Figure, quality: int = 70) -> bytes:
    """The figure as JPEG bytes (at the figure's DPI, white background, cropped to what is
    drawn as the notebooks' inline PNGs are): for figures that are mostly photographs
    (thumbnail sheets, weight maps), several times smaller than a PNG. Display with
    ``IPython.display.Image(data, format="jpeg")``."""
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format="jpeg",
        dpi=fig.dpi,
        facecolor="white",
        bbox_inches="tight",
        pad_inches=0.05,
        pil_kwargs={"quality": quality, "optimize": True},
    )
    return buffer.getvalue()


# ------------------------------------------------------------------------------ anomaly clustering
def plot_confusion(counts, clusters: Sequence, classes: Sequence[str], title: str | None = None) -> Figure:
    """Heatmap of a clustering against the true types, counts written in the cells.

    Args:
        counts: (n_clusters, n_classes) image counts, row = cluster, column = type
            (the ``confusion`` of a clustering result).
        clusters: the row labels (cluster numbers).
        classes: the column labels (defect types).
    """
    import seaborn as sns

    counts = np.asarray(counts, dtype=int).reshape(len(clusters), len(classes))
    width = min(9.0, 1.6 + 0.62 * len(classes))
    height = min(7.0, 1.1 + 0.38 * len(clusters))
    fig, ax = plt.subplots(figsize=(width, height))
    sns.heatmap(
        counts,
        annot=True,
        fmt="d",
        cmap="Blues",
        cbar=False,
        linewidths=0.5,
        linecolor="white",
        xticklabels=[str(c) for c in classes],
        yticklabels=[f"cluster {c}" for c in clusters],
        annot_kws={"fontsize": 8},
        ax=ax,
    )
    ax.set(xlabel="true type", ylabel="")
    ax.tick_params(labelsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    plt.setp(ax.get_yticklabels(), rotation=0)
    ax.set_title(title or "Clusters x true types (images)", fontsize=10)
    fig.tight_layout()
    return fig


def _relative_tau(value) -> float:
    """A curve point's ``relative`` as a float: None and the string ``"inf"`` (how metrics
    files store it, JSON having no infinity) are infinite."""
    return np.inf if value is None else float(value)


def _tau_positions(relatives: Sequence[float]) -> tuple[list[float], float, float]:
    """x positions on a log axis for tau / label-free tau: 0 and inf get a place half a
    decade beyond the smallest and largest finite positive values."""
    finite = [r for r in relatives if r is not None and 0 < r < np.inf]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 1.0)
    zero, infinity = lo / 10**0.6, hi * 10**0.6

    def place(r):
        if r is None or np.isinf(r):
            return infinity
        return zero if r == 0 else float(r)

    return [place(r) for r in relatives], zero, infinity


def plot_tau_curve(
    curves: dict[str, list[dict]],
    chosen: dict[str, float] | None = None,
    title: str | None = None,
    chosen_label: str = "chosen tau (label-free)",
    reference: str = "label-free tau",
    combined: dict[str, float] | None = None,
) -> Figure:
    """NMI, ARI and F1 against tau relative to the label-free tau, one panel per mode.

    Args:
        curves: ``mode -> [{tau, relative, nmi, ari, f1}, ...]`` (the ``tau_curve`` of each
            mode; modes with an empty curve, e.g. ``average``, are left out). ``relative``
            is tau / the label-free tau (None or the string ``"inf"`` for infinity, as metrics
            files store it); 0 (all weight on the top patch) and inf (uniform
            weights) are drawn at the two ends of the log axis, joined by dotted lines,
            with labelled ticks.
        chosen: ``mode -> relative tau that was used`` (1.0 for the label-free rule), marked
            by a vertical line. The best-NMI point is marked as "oracle (labels)": it is
            picked by looking at the labels, an upper bound rather than a result.
        chosen_label: legend of the chosen tau; reference: what ``relative`` divides by (x label),
            e.g. "given tau" when tau was set by hand.
        combined: ``mode -> NMI`` of a result that combines several taus (the multi-tau rule),
            drawn as a horizontal line.
    """
    chosen = chosen or {}
    modes = [m for m, curve in curves.items() if curve]
    if not modes:
        fig, ax = plt.subplots(figsize=_FIGSIZE)
        ax.text(0.5, 0.5, "no tau curve (no mode with patch scores)", ha="center", va="center", fontsize=9)
        ax.set_axis_off()
        return fig
    fig, axes = plt.subplots(1, len(modes), figsize=(min(4.2 * len(modes), 12.6), 3.4), sharey=True, squeeze=False)
    colours = {"nmi": "tab:blue", "ari": "tab:orange", "f1": "tab:green"}
    for ax, mode in zip(axes[0], modes):
        points = sorted(curves[mode], key=lambda p: _relative_tau(p["relative"]))
        relatives = [_relative_tau(p["relative"]) for p in points]
        xs, zero, infinity = _tau_positions(relatives)
        inner = [i for i, r in enumerate(relatives) if 0 < r < np.inf]
        for key, colour in colours.items():
            ys = [p[key] for p in points]
            ax.plot(
                [xs[i] for i in inner],
                [ys[i] for i in inner],
                marker="o",
                markersize=3.5,
                color=colour,
                label=key.upper(),
            )
            ends = [i for i in range(len(points)) if i not in inner]
            for i in ends:  # off-scale ends, dotted to their neighbour on the scale
                neighbour = min(inner, key=lambda j: abs(j - i)) if inner else i
                ax.plot([xs[neighbour], xs[i]], [ys[neighbour], ys[i]], linestyle=":", color=colour, linewidth=1)
                ax.plot(xs[i], ys[i], marker="s", markersize=3.5, color=colour)
        best = max(range(len(points)), key=lambda i: points[i]["nmi"])
        ax.plot(
            xs[best],
            points[best]["nmi"],
            marker="*",
            markersize=12,
            color="tab:red",
            linestyle="none",
            label=f"oracle (labels): NMI {points[best]['nmi']:.3f}",
        )
        if combined and combined.get(mode) is not None:
            ax.axhline(
                combined[mode],
                color="tab:purple",
                linestyle="-.",
                linewidth=1.2,
                label=f"multi-tau result: NMI {combined[mode]:.3f}",
            )
        if mode in chosen and chosen[mode] is not None:
            x_chosen = _tau_positions([_relative_tau(chosen[mode])] + relatives)[0][0]
            ax.axvline(x_chosen, color="black", linestyle="--", linewidth=1, label=chosen_label)
        ax.set_xscale("log")
        ticks = sorted(set(xs))
        ax.set_xticks(ticks)
        ax.set_xticklabels(
            ["0\n(top)" if t == zero else "inf\n(uniform)" if t == infinity else f"{t:g}" for t in ticks], fontsize=7
        )
        ax.minorticks_off()
        ax.set_xlabel(f"tau / {reference}", fontsize=8)
        ax.set_title(mode, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    axes[0, 0].set_ylabel("score against the true types", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _thumbnail_tile(path, thumb: int) -> tuple[np.ndarray, bool]:
    """(thumb, thumb, 3) uint8: the image shrunk to fit, centred on white; or, for a file
    that cannot be read, a grey placeholder with a red cross. Second value: readable."""
    from PIL import Image, ImageDraw

    from anomalib_study.errors import DataError

    tile = Image.new("RGB", (thumb, thumb), (255, 255, 255))
    try:
        image = load_image(path)
    except DataError:
        tile.paste((200, 200, 200), (0, 0, thumb, thumb))
        draw = ImageDraw.Draw(tile)
        draw.line((4, 4, thumb - 5, thumb - 5), fill=(200, 0, 0), width=3)
        draw.line((4, thumb - 5, thumb - 5, 4), fill=(200, 0, 0), width=3)
        return np.asarray(tile), False
    image.thumbnail((thumb, thumb))
    tile.paste(image, ((thumb - image.width) // 2, (thumb - image.height) // 2))
    return np.asarray(tile), True


def cluster_thumbnail_sheet(
    paths_by_cluster: dict[int, Sequence],
    max_per_cluster: int = 12,
    thumb: int = 96,
    titles: dict[int, Sequence[str]] | None = None,
) -> Figure:
    """One row per cluster, of small thumbnails of its first ``max_per_cluster`` images.

    Each row is one axes (its thumbnails pasted side by side), titled "cluster k (n images)".
    ``thumb``: side of a thumbnail in pixels at the figure's DPI. ``titles``: optional
    ``cluster -> captions`` (one per path, e.g. the true type), written under the thumbnails.
    An image that cannot be read (missing, corrupt) is not an error: it is drawn as a grey
    placeholder with a red cross, its caption says "unreadable", and the row title counts it.
    """
    clusters = list(paths_by_cluster)
    if not clusters:
        raise ValueError("paths_by_cluster is empty: no cluster to draw")
    columns = max(1, min(max_per_cluster, max(len(paths_by_cluster[c]) for c in clusters)))
    gap = max(2, thumb // 24)
    dpi = float(plt.rcParams["figure.dpi"])
    row_inches = (thumb + 34) / dpi
    fig, axes = plt.subplots(
        len(clusters), 1, squeeze=False, figsize=((columns * (thumb + gap) + 20) / dpi, row_inches * len(clusters))
    )
    for ax, cluster in zip(axes[:, 0], clusters):
        paths = list(paths_by_cluster[cluster])
        shown = paths[:max_per_cluster]
        captions = list((titles or {}).get(cluster, []))[: len(shown)]
        strip = np.full((thumb, columns * (thumb + gap) - gap, 3), 255, dtype=np.uint8)
        unreadable = 0
        for j, path in enumerate(shown):
            tile, ok = _thumbnail_tile(path, thumb)
            unreadable += not ok
            strip[:, j * (thumb + gap) : j * (thumb + gap) + thumb] = tile
            caption = (captions[j] if j < len(captions) else "") if ok else "unreadable"
            if caption:
                ax.text(
                    j * (thumb + gap) + thumb / 2,
                    thumb + 2,
                    caption,
                    ha="center",
                    va="top",
                    fontsize=6,
                    color="black" if ok else "tab:red",
                )
        ax.imshow(strip, interpolation="nearest")
        ax.set_axis_off()
        head = f"cluster {cluster} ({len(paths)} image{'s' if len(paths) != 1 else ''}"
        if len(shown) < len(paths):
            head += f", {len(shown)} shown"
        if unreadable:
            head += f", {unreadable} unreadable"
        ax.set_title(head + ")", fontsize=8, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.3 / (row_inches * len(clusters)), bottom=0.02, hspace=0.45)
    return fig


def plot_embedding_2d(embeddings, labels: Sequence, title: str | None = None) -> Figure:
    """The image embeddings (n, D) projected on their first two principal components
    (sklearn PCA, centred, not whitened), one colour per label (e.g. the true type)."""
    from sklearn.decomposition import PCA

    X = np.asarray(embeddings, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != len(labels):
        raise ValueError(f"embeddings must be (n, D) with one label per row, got {X.shape} and {len(labels)} labels")
    components = min(2, X.shape[0], X.shape[1])
    pca = PCA(n_components=components).fit(X)
    xy = np.zeros((X.shape[0], 2))
    xy[:, :components] = pca.transform(X)
    ratios = list(pca.explained_variance_ratio_) + [0.0] * (2 - components)
    labels = np.asarray([str(v) for v in labels])
    fig, ax = plt.subplots(figsize=_FIGSIZE)
    markers = "osD^vP*X<>"
    for i, label in enumerate(dict.fromkeys(labels)):
        chosen = labels == label
        ax.scatter(
            xy[chosen, 0],
            xy[chosen, 1],
            s=18,
            marker=markers[i % len(markers)],
            alpha=0.8,
            label=f"{label} ({int(chosen.sum())})",
        )
    ax.set(
        xlabel=f"PC 1 ({ratios[0]:.0%} of the variance)",
        ylabel=f"PC 2 ({ratios[1]:.0%})",
        title=title or "Image embeddings, PCA",
    )
    ax.legend(fontsize=7, loc="best", markerscale=0.9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_weight_maps(
    images: Sequence,
    weights,
    grid: Sequence[int],
    masks: Sequence | None = None,
    titles: Sequence[str] | None = None,
    columns: int = 6,
) -> Figure:
    """The patch weights alpha of each image drawn over it (the paper's "matrix alpha").

    Args:
        images: PIL images or (H, W[, 3]) arrays, in the geometry the weights were computed
            on (the backbone's preprocessed input: see :func:`crop_like_input`).
        weights: (n, h * w) weights per image (rows sum to 1), reshaped to ``grid`` = (h, w),
            upsampled bilinearly to the image and shown in ``inferno``, each on its own
            scale from 0 to its largest weight (written in the title).
        masks: per image a (H', W') bool ground truth or None; its outline is drawn in
            cyan (resized to the image, nearest neighbour, if its size differs).
        titles: per image a caption.
        columns: images per row.
    """
    from PIL import Image

    weights = np.asarray(weights, dtype=np.float64)
    h, w = (int(v) for v in grid)
    if weights.ndim != 2 or weights.shape[0] != len(images) or weights.shape[1] != h * w:
        raise ValueError(
            f"weights must be ({len(images)}, {h * w}) for {len(images)} images on a {h} x {w} grid, "
            f"got {weights.shape}"
        )
    n = len(images)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.75 * columns, 1.95 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            ax.remove()
            continue
        image = images[k]
        picture = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        H, W = picture.shape[:2]
        alpha = Image.fromarray(weights[k].reshape(h, w).astype(np.float32), mode="F")
        alpha = np.asarray(alpha.resize((W, H), Image.BILINEAR))
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        ax.imshow(alpha, cmap="inferno", alpha=0.55, vmin=0.0, vmax=max(float(weights[k].max()), 1e-12))
        mask = None if masks is None else masks[k]
        if mask is not None and np.asarray(mask).any():
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != (H, W):
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((W, H), Image.NEAREST)) > 127
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.9)
        caption = (titles[k] + "\n") if titles is not None else ""
        ax.set_title(f"{caption}max alpha {weights[k].max():.3f}", fontsize=7)
    fig.tight_layout(pad=0.3)
    return fig


# ------------------------------------------------------------------------------ comparison across reports
