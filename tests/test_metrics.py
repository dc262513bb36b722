"""Tests of the metric functions: hand-computed cases, perfect / inverted / random scores."""

from __future__ import annotations

import numpy as np
import pytest

from anomalib_study.errors import ParameterError
from anomalib_study.metrics import (
    UndefinedMetricWarning,
    accuracy,
    classification_summary,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
    pro_score,
    roc_curve_points,
)

LABELS = np.array([0, 0, 1, 1])


def test_image_auroc_perfect_inverted_hand():
    assert image_auroc(LABELS, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(LABELS, [0.9, 0.8, 0.2, 0.1]) == 0.0
    # pairs (anomalous, normal): (0.3 vs 0.1, 0.2) wins both, (0.15 vs 0.1) wins, (0.15 vs 0.2) loses -> 3/4
    assert image_auroc(LABELS, [0.1, 0.2, 0.15, 0.3]) == pytest.approx(0.75)
    assert image_auroc(LABELS, [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)  # ties count one half


def test_image_auroc_random_is_near_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    assert abs(image_auroc(labels, rng.random(4000)) - 0.5) < 0.05


def test_image_auroc_one_class_is_nan_with_reason():
    with pytest.warns(UndefinedMetricWarning, match="all 3 labels are 0"):
        assert np.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))


def test_bad_inputs():
    with pytest.raises(ParameterError, match="only 0 \\(normal\\) and 1"):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ParameterError, match="shape \\(2,\\)"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ParameterError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ParameterError, match="same|shape"):
        pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))


def test_roc_curve_points():
    points = roc_curve_points(LABELS, [0.1, 0.2, 0.8, 0.9])
    assert set(points) == {"fpr", "tpr", "thresholds"}
    assert points["fpr"][0] == 0 and points["tpr"][-1] == 1
    np.testing.assert_allclose(np.trapezoid(points["tpr"], points["fpr"]), 1.0)
    with pytest.raises(ParameterError, match="both"):
        roc_curve_points([1, 1], [0.1, 0.2])


def test_accuracy_and_summary_by_hand():
    labels = [0, 0, 0, 1, 1]
    predictions = [0, 1, 0, 1, 0]
    assert accuracy(labels, predictions) == pytest.approx(3 / 5)
    summary = classification_summary(labels, predictions)
    assert summary["normal"]["precision"] == pytest.approx(2 / 3)  # 2 of the 3 predicted normal
    assert summary["normal"]["recall"] == pytest.approx(2 / 3)
    assert summary["anomalous"]["precision"] == pytest.approx(1 / 2)
    assert summary["anomalous"]["recall"] == pytest.approx(1 / 2)
    assert summary["anomalous"]["support"] == 2
    assert summary["accuracy"] == pytest.approx(0.6)
    assert summary["macro avg"]["recall"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert summary["weighted avg"]["recall"] == pytest.approx(0.6)


def test_summary_with_one_class_absent():
    summary = classification_summary([0, 0, 0], [0, 0, 0])
    assert summary["accuracy"] == 1.0
    assert summary["anomalous"]["support"] == 0
    assert "micro avg" not in summary
    custom = classification_summary([0, 1], [0, 1], target_names=("good", "defect"))
    assert custom["defect"]["f1-score"] == 1.0


def test_f1_max_by_hand():
    # thresholds 0.35 -> flag {0.35, 0.4, 0.8}: tp 2, fp 1 -> p 2/3, r 1, f1 0.8
    #            0.4  -> flag {0.4, 0.8}: tp 1 -> p 1/2, r 1/2; 0.8 -> p 1, r 1/2, f1 2/3
    f1, threshold = f1_max([0, 1, 0, 1], [0.1, 0.35, 0.4, 0.8])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    assert f1_max(LABELS, [0.1, 0.2, 0.8, 0.9]) == (pytest.approx(1.0), pytest.approx(0.8))
    with pytest.warns(UndefinedMetricWarning):
        f1, threshold = f1_max([0, 0], [0.1, 0.2])
    assert np.isnan(f1) and np.isnan(threshold)


def _square_masks():
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True  # region A, 4 pixels
    masks[1, 3:6, 3:6] = True  # region B, 9 pixels
    return masks


def test_pixel_auroc_and_f1():
    masks = _square_masks()
    assert pixel_auroc(masks, masks.astype(float)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks) == 0.0
    rng = np.random.default_rng(1)
    assert abs(pixel_auroc(rng.random((4, 64, 64)) > 0.7, rng.random((4, 64, 64))) - 0.5) < 0.02
    f1, threshold = pixel_f1_max(masks, masks * 0.9 + 0.05)
    assert f1 == 1.0 and threshold == pytest.approx(0.95)
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(pixel_auroc(np.zeros((1, 3, 3)), np.zeros((1, 3, 3))))


def test_pro_perfect_inverted():
    masks = _square_masks()
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0)
    assert pro_score(masks, 1.0 - masks) == pytest.approx(0.0)


def test_pro_counts_regions_not_pixels_by_hand():
    masks = _square_masks()
    maps = np.zeros(masks.shape)
    maps[0][masks[0]] = 1.0  # region A (4 px) found, region B (9 px) missed; no false positive
    fprs, pros = pro_curve(masks, maps)
    # threshold 1: fpr 0, pro (1 + 0) / 2; threshold 0: everything flagged
    np.testing.assert_allclose(fprs, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(pros, [0.0, 0.5, 1.0, 1.0])
    # area up to fpr 0.3: the segment (0, .5) -> (1, 1) interpolated at .3 gives .65; (.5 + .65) / 2 * .3 / .3
    assert pro_score(masks, maps) == pytest.approx(0.575)
    # every region counts the same: finding the 9-pixel region instead gives the same PRO,
    # while the pixel AUROC (4 vs 9 of 13 defective pixels) differs
    other = np.zeros(masks.shape)
    other[1][masks[1]] = 1.0
    assert pro_score(masks, other) == pytest.approx(0.575)
    assert pixel_auroc(masks, other) > pixel_auroc(masks, maps)


def test_pro_partial_overlap_and_limit():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :2] = True  # one region of 4 pixels, 12 defect-free pixels
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = maps[0, 0, 1] = 3.0  # half the region at the top score
    maps[0, 3, 3] = 2.0  # one false positive
    maps[0, 1, 0] = 1.0
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 1 / 12, 1 / 12, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.5, 0.5, 0.75, 1, 1])
    # integrate to 1: 0 + .5 * 1/12 + 0 + (.75 + 1) / 2 * 11/12 + 0
    assert pro_score(masks, maps, fpr_limit=1.0) == pytest.approx(0.5 / 12 + 1.75 / 2 * 11 / 12)
    with pytest.raises(ParameterError, match="fpr_limit"):
        pro_score(masks, maps, fpr_limit=0)


def test_pro_eight_connectivity():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    maps = np.zeros((1, 4, 4))
    maps[0, 0, 0] = 1.0
    _, pros = pro_curve(masks, maps)
    assert pros[1] == pytest.approx(0.5)  # half of one region, not one of two regions


def test_pro_no_region_is_nan():
    with pytest.warns(UndefinedMetricWarning, match="no defective region"):
        assert np.isnan(pro_score(np.zeros((2, 3, 3)), np.random.default_rng(0).random((2, 3, 3))))


# ---------------------------------------------------------------------- clustering
def test_clustering_metrics_perfect_and_permuted():
    from anomalib_study.metrics import clustering_metrics

    truth = ["good", "good", "crack", "crack", "hole", "hole"]
    perfect = clustering_metrics(truth, truth)
    assert (perfect["nmi"], perfect["ari"], perfect["f1"]) == (1.0, 1.0, 1.0)
    permuted = clustering_metrics(truth, [2, 2, 0, 0, 1, 1])  # the same partition, other names
    assert permuted["nmi"] == pytest.approx(1.0) and permuted["ari"] == pytest.approx(1.0) and permuted["f1"] == 1.0
    assert permuted["matching"] == {"2": "good", "0": "crack", "1": "hole"}


def test_clustering_metrics_known_values():
    from anomalib_study.metrics import clustering_metrics

    # independent partitions: no shared information, ARI of this 2 x 2 case is -0.5 (hand-computed:
    # index 0, expected index (2 * 2 / 6) = 2/3, max index 2 -> (0 - 2/3) / (2 - 2/3))
    out = clustering_metrics([0, 0, 1, 1], [0, 1, 0, 1])
    assert out["nmi"] == pytest.approx(0.0, abs=1e-12) and out["ari"] == pytest.approx(-0.5) and out["f1"] == 0.5
    # one cluster: nothing learnt, F1 = the largest class's share
    single = clustering_metrics([0, 0, 0, 1, 2], [7] * 5)
    assert single["nmi"] == pytest.approx(0.0, abs=1e-12) and single["ari"] == pytest.approx(0.0)
    assert single["f1"] == pytest.approx(3 / 5) and single["n_clusters"] == 1
    # more clusters than classes: the unmatched cluster's images count as wrong
    more = clustering_metrics([0, 0, 0, 1, 1, 1], [0, 0, 5, 1, 1, 1])
    assert more["f1"] == pytest.approx(5 / 6) and more["n_clusters"] == 3 and more["n_classes"] == 2
    assert len(more["matching"]) == 2


def test_clustering_metrics_bad_input():
    from anomalib_study.metrics import clustering_metrics

    with pytest.raises(ParameterError, match="same length"):
        clustering_metrics([0, 1], [0])
    with pytest.raises(ParameterError, match="at least one"):
        clustering_metrics([], [])
