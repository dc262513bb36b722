"""Metric functions: arrays in, numbers or dicts out. No I/O, no state.

Conventions: ``labels`` / ``masks`` use 1 = anomalous (defective pixel), 0 = normal;
pixel metrics take masks and maps as (n, h, w) arrays, or as sequences of n (h_i, w_i)
arrays when images have their own shapes (``resize_mode="keep"``): mask i and map i must
then match, and every pixel of every image counts once, as in the array form;
``scores`` / ``maps`` point the same way as every method's ``score``: higher = more
anomalous. Where a metric is undefined (e.g. only one class present), the function
returns ``float("nan")`` and emits a :class:`UndefinedMetricWarning` saying why, so that a
study over many data sets never stops on one degenerate split.
"""

from __future__ import annotations

import warnings
from bisect import bisect_right
from typing import Sequence

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

from anomalib_study.errors import ParameterError

__all__ = [
    "UndefinedMetricWarning",
    "image_auroc",
    "roc_curve_points",
    "accuracy",
    "classification_summary",
    "f1_max",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
    "pro_score",
    "clustering_metrics",
]


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. only one class) and NaN is returned."""


# ---------------------------------------------------------------------- checks
def _labels(values, name: str = "labels") -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ParameterError(f"{name} must be 1-D (n_images,), got shape {array.shape}")
    if array.size == 0:
        raise ParameterError(f"{name} is empty")
    if not np.isin(array, (0, 1)).all():
        bad = np.unique(array[~np.isin(array, (0, 1))])[:5]
        raise ParameterError(f"{name} must hold only 0 (normal) and 1 (anomalous), found {bad.tolist()}")
    return array.astype(int)


def _scores(values, n: int, name: str = "scores") -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be numbers: {error}") from None
    if array.ndim != 1 or array.shape[0] != n:
        raise ParameterError(f"{name} must have shape ({n},) like the labels, got {array.shape}")
    if not np.isfinite(array).all():
        raise ParameterError(
            f"{name} contain NaN or infinite values at {np.flatnonzero(~np.isfinite(array))[:5].tolist()}"
        )
    return array


def _is_ragged(values) -> bool:
    """True for a list / tuple / 1-D object array of 2-D arrays (images of their own shapes)."""
    if isinstance(values, np.ndarray):
        return values.dtype == object
    return isinstance(values, (list, tuple)) and len(values) > 0 and len({np.shape(v) for v in values}) > 1


def _ragged_masks_and_maps(masks, maps) -> tuple[list[np.ndarray], list[np.ndarray]]:
    masks = [np.asarray(m) for m in masks]
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    if len(masks) != len(maps):
        raise ParameterError(f"got {len(masks)} masks but {len(maps)} anomaly maps: give one of each per image")
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ParameterError(
                f"mask {i} has shape {mask.shape} but its anomaly map {amap.shape}: each pair must "
                "be one (height, width); resize the maps to the mask size first"
            )
    if sum(m.size for m in masks) == 0:
        raise ParameterError("masks and maps are empty")
    if not all(np.isfinite(m).all() for m in maps):
        raise ParameterError("anomaly maps contain NaN or infinite values")
    return [m.astype(bool) for m in masks], maps


def _flat(values) -> np.ndarray:
    """All pixels of (n, h, w) or of a list of (h_i, w_i) arrays, image after image."""
    return values.ravel() if isinstance(values, np.ndarray) else np.concatenate([v.ravel() for v in values])


def _masks_and_maps(masks, maps) -> tuple[np.ndarray | list, np.ndarray | list]:
    """Checked (n, h, w) arrays, or lists of (h_i, w_i) arrays for images of their own shapes."""
    if _is_ragged(masks) or _is_ragged(maps):
        return _ragged_masks_and_maps(masks, maps)
    masks = np.asarray(masks)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ParameterError(
            f"masks and maps must both have shape (n_images, height, width), got {masks.shape} and {maps.shape}: "
            "resize the anomaly maps to the mask size first"
        )
    if masks.size == 0:
        raise ParameterError("masks and maps are empty")
    if not np.isfinite(maps).all():
        raise ParameterError("anomaly maps contain NaN or infinite values")
    return masks.astype(bool), maps


def _undefined(reason: str) -> float:
    warnings.warn(reason, UndefinedMetricWarning, stacklevel=3)
    return float("nan")


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < labels.sum() < labels.size


# ---------------------------------------------------------------------- image level
def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: (n,) 0 normal / 1 anomalous.
        scores: (n,) higher = more anomalous.

    Returns:
        AUROC in [0, 1] (1 perfect, 0.5 chance, 0 inverted); ``nan`` (with an
        UndefinedMetricWarning) if ``labels`` hold only one class.
    """
    labels = _labels(labels)
    scores = _scores(scores, labels.size)
    if not _both_classes(labels):
        return _undefined(
            f"image AUROC is undefined: all {labels.size} labels are {int(labels[0])} (need both classes)"
        )
    return float(skm.roc_auc_score(labels, scores))


def roc_curve_points(labels, scores) -> dict[str, np.ndarray]:
    """ROC curve of image scores: ``{"fpr": (m,), "tpr": (m,), "thresholds": (m,)}``.

    A score >= threshold counts as anomalous; the first threshold is ``inf`` (nothing
    flagged). Only one class in ``labels`` -> ParameterError (no curve exists).
    """
    labels = _labels(labels)
    scores = _scores(scores, labels.size)
    if not _both_classes(labels):
        raise ParameterError("a ROC curve needs both normal (0) and anomalous (1) labels")
    fpr, tpr, thresholds = skm.roc_curve(labels, scores)
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def accuracy(labels, predictions) -> float:
    """Fraction of ``predictions`` (n,) 0/1 equal to ``labels`` (n,) 0/1."""
    labels = _labels(labels)
    predictions = _labels(predictions, "predictions")
    if predictions.size != labels.size:
        raise ParameterError(f"predictions has {predictions.size} entries but labels has {labels.size}")
    return float(skm.accuracy_score(labels, predictions))


def classification_summary(labels, predictions, target_names: Sequence[str] = ("normal", "anomalous")) -> dict:
    """scikit-learn's ``classification_report(output_dict=True)`` for labels/predictions (n,) 0/1.

    Returns ``{"normal": {"precision", "recall", "f1-score", "support"}, "anomalous": {...},
    "accuracy": float, "macro avg": {...}, "weighted avg": {...}}``; both classes are always
    reported (a class absent from both arrays has support 0 and scores 0).
    """
    labels = _labels(labels)
    predictions = _labels(predictions, "predictions")
    if predictions.size != labels.size:
        raise ParameterError(f"predictions has {predictions.size} entries but labels has {labels.size}")
    if len(target_names) != 2:
        raise ParameterError(f"target_names must name the 2 classes (normal, anomalous), got {list(target_names)}")
    report = skm.classification_report(
        labels, predictions, labels=[0, 1], target_names=list(target_names), output_dict=True, zero_division=0
    )
    if "accuracy" not in report:  # sklearn reports "micro avg" instead when a class is absent
        report["accuracy"] = float(skm.accuracy_score(labels, predictions))
        report.pop("micro avg", None)
    return report


def f1_max(labels, scores) -> tuple[float, float]:
    """The best F1 over all thresholds of ``scores``: ``(f1, threshold)``.

    Args:
        labels: (n,) 0/1. scores: (n,) higher = more anomalous.

    Returns:
        The maximum F1 of the anomalous class and the threshold reaching it (a score
        >= threshold counts as anomalous); ``(nan, nan)`` with a warning if there is no
        anomalous label.
    """
    labels = _labels(labels)
    scores = _scores(scores, labels.size)
    return _f1_max(labels, scores)


def _f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if labels.sum() == 0:
        return _undefined("F1-max is undefined without any anomalous label"), float("nan")
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# ---------------------------------------------------------------------- pixel level
def pixel_auroc(masks, maps) -> float:
    """AUROC over all pixels of all images.

    Args:
        masks: (n, h, w) bool/0-1 ground truth, True = defective pixel.
        maps: (n, h, w) anomaly maps at the mask resolution, higher = more anomalous.

    Returns:
        AUROC in [0, 1]; ``nan`` with a warning if no pixel (or every pixel) is defective.
    """
    masks, maps = _masks_and_maps(masks, maps)
    flat = _flat(masks)
    if flat.all() or not flat.any():
        return _undefined("pixel AUROC is undefined: the masks need both defective and defect-free pixels")
    return float(skm.roc_auc_score(flat, _flat(maps)))


def pixel_f1_max(masks, maps) -> tuple[float, float]:
    """F1-max over all pixels: ``(f1, threshold)``; masks/maps (n, h, w) as in :func:`pixel_auroc`."""
    masks, maps = _masks_and_maps(masks, maps)
    return _f1_max(_flat(masks).astype(int), _flat(maps))


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve of the MVTec AD evaluation code.

    Every connected component (8-connectivity) of every ground-truth mask is a region.
    For a threshold t, PRO(t) is the mean over all regions of the fraction of the region's
    pixels with map >= t, and FPR(t) is the fraction of defect-free pixels (of all images)
    with map >= t. Thresholds sweep every distinct map value (ties merged).

    Args:
        masks: (n, h, w) bool ground truth. maps: (n, h, w) higher = more anomalous.

    Returns:
        fprs, pros: (m,) float64 each, fprs ascending from 0 to 1, pros from 0 to 1.
        Raises ParameterError if the masks hold no region or no defect-free pixel.
    """
    masks, maps = _masks_and_maps(masks, maps)
    structure = np.ones((3, 3), dtype=int)
    if isinstance(masks, np.ndarray):
        fp_change = np.zeros(masks.shape, dtype=np.float64)
        pro_change = np.zeros(masks.shape, dtype=np.float64)
    else:  # images of their own shapes
        fp_change = [np.zeros(m.shape, dtype=np.float64) for m in masks]
        pro_change = [np.zeros(m.shape, dtype=np.float64) for m in masks]
    n_regions = 0
    for i, mask in enumerate(masks):
        labelled, n_components = ndimage.label(mask, structure=structure)
        n_regions += n_components
        fp_change[i][labelled == 0] = 1.0
        if n_components:
            sizes = np.bincount(labelled.ravel())
            region = labelled > 0
            pro_change[i][region] = 1.0 / sizes[labelled[region]]
    fp_change, pro_change, flat_maps = _flat(fp_change), _flat(pro_change), _flat(maps)
    n_ok = fp_change.sum()
    if n_regions == 0:
        raise ParameterError("the PRO curve needs at least one defective region in the masks; they are all empty")
    if n_ok == 0:
        raise ParameterError("the PRO curve needs defect-free pixels; every mask pixel is defective")

    order = np.argsort(flat_maps, kind="stable")[::-1]
    sorted_scores = flat_maps[order]
    fprs = np.cumsum(fp_change[order]) / n_ok
    pros = np.cumsum(pro_change[order]) / n_regions
    # all pixels with one score cross the threshold together: keep the last point of each tie
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fprs = np.clip(fprs[keep], None, 1.0)
    pros = np.clip(pros[keep], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y) for x in [x[0], x_max]; y at x_max is interpolated
    linearly between its neighbours (as in the MVTec AD evaluation code). x ascending."""
    correction = 0.0
    if x_max not in x:
        ins = bisect_right(x.tolist(), x_max)
        if not 0 < ins < len(x):
            raise ParameterError(f"the integration limit {x_max} lies outside the curve's range [{x[0]}, {x[-1]}]")
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    return float(np.trapezoid(y[keep], x[keep]) + correction)


def pro_score(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to FPR ``fpr_limit``, divided by ``fpr_limit`` (AU-PRO).

    Follows the MVTec AD evaluation code (Bergmann et al.): see :func:`pro_curve` for the
    curve; the area is integrated with the trapezoidal rule up to ``fpr_limit`` (the PRO
    there interpolated linearly) and normalised to [0, 1] (1 = every region fully found
    before any false positive).

    Args:
        masks: (n, h, w) bool ground truth. maps: (n, h, w) higher = more anomalous.
        fpr_limit: integration limit in (0, 1].

    Returns:
        AU-PRO in [0, 1]; ``nan`` with a warning if the masks hold no defective region.
    """
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float)) or not 0 < fpr_limit <= 1:
        raise ParameterError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    masks_arr = _flat(_masks_and_maps(masks, maps)[0])
    if not masks_arr.any():
        return _undefined("PRO is undefined: the masks hold no defective region")
    if masks_arr.all():
        return _undefined("PRO is undefined: every pixel is defective (no false positive rate)")
    fprs, pros = pro_curve(masks, maps)
    return _area_up_to(fprs, pros, float(fpr_limit)) / float(fpr_limit)


# ---------------------------------------------------------------------- clustering
def clustering_metrics(y_true, y_pred) -> dict:
    """How well cluster labels ``y_pred`` (n,) recover classes ``y_true`` (n,); any hashable labels.

    Returns a dict: ``nmi`` (normalised mutual information, arithmetic normalisation,
    scikit-learn's default), ``ari`` (adjusted Rand index), ``f1`` (micro F1 after the
    Hungarian matching of clusters to classes: each class gets at most one cluster, the
    matching maximises the images they share, and every image of an unmatched cluster counts
    as wrong, so more clusters than classes work and are not rewarded; for single-label data
    this micro F1 equals the matched accuracy), ``n_classes``, ``n_clusters`` and
    ``matching`` (cluster label -> class label, as strings). Higher is better for all three;
    a single cluster gives NMI 0, ARI 0 and F1 = the largest class's share.
    """
    from scipy.optimize import linear_sum_assignment

    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if true.ndim != 1 or pred.ndim != 1 or true.shape != pred.shape:
        raise ParameterError(f"y_true and y_pred must be 1-D of the same length, got {true.shape} and {pred.shape}")
    if true.size == 0:
        raise ParameterError("clustering_metrics needs at least one image")
    classes, true_idx = np.unique(true, return_inverse=True)
    clusters, pred_idx = np.unique(pred, return_inverse=True)
    contingency = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(contingency, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    return {
        "nmi": float(skm.normalized_mutual_info_score(true_idx, pred_idx)),
        "ari": float(skm.adjusted_rand_score(true_idx, pred_idx)),
        "f1": float(contingency[rows, cols].sum() / true.size),
        "n_classes": int(classes.size),
        "n_clusters": int(clusters.size),
        "matching": {str(clusters[r]): str(classes[c]) for r, c in zip(rows, cols)},
    }
