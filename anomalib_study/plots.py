"""Figures for the notebooks: pure functions, arrays in, a matplotlib Figure (or HTML) out.

Reports embed every figure, so the functions keep them small: modest sizes and DPI, and
image thumbnails as small JPEGs rather than full-resolution PNGs.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from anomalib_study.data.decode import load_image

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


def overlay_image(image, anomaly_map: np.ndarray, mask: np.ndarray | None = None, vmin: float | None = None,
                  vmax: float | None = None, alpha: float = 0.45, cmap: str = "jet"):
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
    ``preprocessing["crop"]`` square), unnormalised."""
    from torchvision.transforms.functional import center_crop, resize

    from anomalib_study.backbones import resize_argument

    image = load_image(path)
    image = resize(image, resize_argument(preprocessing))
    return center_crop(image, [int(preprocessing["crop"])] * 2)


def overlays_html(paths: Sequence, maps: np.ndarray, masks: Sequence | None, captions: Sequence[str],
                  preprocessing: dict, vmin: float | None = None, vmax: float | None = None, size: int = 150,
                  quality: int = 70) -> str:
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
            % (size + 8, _to_data_uri(original, quality), size, _to_data_uri(picture, quality), size,
               html.escape(caption))
        )
    return "<div>" + "".join(cells) + "</div>"
