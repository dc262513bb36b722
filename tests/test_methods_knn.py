"""Tests of the deep-kNN detector: hand-computed scores, leave-one-out threshold, save/load."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from anomalib_study.errors import ModelFileError, ParameterError
from anomalib_study.methods import METHODS, KNNDetector, NotFittedError
from anomalib_study.methods.base import save_model_file

LINE = np.array([[0.0], [1.0], [2.0], [10.0]])  # 1-D points: distances are differences


def test_leave_one_out_scores_and_threshold_by_hand():
    detector = KNNDetector(k=2, thres_ratio=0.5, normalize=False).fit(LINE)
    # 0 -> {1, 2}: 1.5;  1 -> {0, 2}: 1;  2 -> {1, 0}: 1.5;  10 -> {2, 1}: (8 + 9) / 2
    np.testing.assert_allclose(detector.train_scores_, [1.5, 1.0, 1.5, 8.5])
    assert detector.threshold_ == pytest.approx(1.5)  # median of [1, 1.5, 1.5, 8.5]
    assert detector.k_ == 2 and detector.memory_bank_.shape == (4, 1)
    assert detector.index_.describe()["factory"] == "Flat"


def test_score_by_hand_and_direction():
    detector = KNNDetector(k=2, normalize=False).fit(LINE)
    scores = detector.score([[1.5], [20.0], [-1.0]])
    # 1.5 -> {1, 2}: 0.5;  20 -> {10, 2}: (10 + 18) / 2;  -1 -> {0, 1}: (1 + 2) / 2
    np.testing.assert_allclose(scores, [0.5, 14.0, 1.5], rtol=1e-6)
    assert scores.shape == (3,)


def test_threshold_quantile_interpolates():
    detector = KNNDetector(k=2, thres_ratio=0.92, normalize=False).fit(LINE)
    # sorted [1, 1.5, 1.5, 8.5]: position 0.92 * 3 = 2.76 -> 1.5 + 0.76 * 7
    assert detector.threshold_ == pytest.approx(6.82)


def test_duplicates_of_other_images_still_count():
    bank = np.array([[0.0], [0.0], [5.0]])
    detector = KNNDetector(k=1, normalize=False).fit(bank)
    # each 0 has the other 0 as neighbour at distance 0 (removing "self" by distance would drop it)
    np.testing.assert_allclose(detector.train_scores_, [0.0, 0.0, 5.0])


def test_many_exact_duplicates():
    bank = np.zeros((6, 2))
    detector = KNNDetector(k=2, normalize=False).fit(bank)
    np.testing.assert_array_equal(detector.train_scores_, np.zeros(6))


def test_predict_finds_known_outliers():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=(200, 8)) * 0.05 + np.eye(8)[0]
    outliers = rng.normal(size=(5, 8)) * 0.05 + np.eye(8)[3]
    test = np.concatenate([normal[:20] + rng.normal(size=(20, 8)) * 0.01, outliers])
    detector = KNNDetector(k=10, thres_ratio=0.99).fit(normal)
    predicted = detector.predict(test)
    assert predicted.dtype.kind == "i"
    np.testing.assert_array_equal(predicted[20:], 1)
    assert predicted[:20].sum() <= 2
    scores = detector.score(test)
    assert scores[20:].min() > scores[:20].max()  # higher = more anomalous


def test_normalize_makes_scale_irrelevant():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(30, 4)) + 3
    queries = rng.normal(size=(5, 4))
    a = KNNDetector(k=3).fit(bank).score(queries)
    b = KNNDetector(k=3).fit(bank * 7.0).score(queries * 0.1)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_k_clamped_with_warning():
    with pytest.warns(UserWarning, match="k=100 is not smaller than the 4 normal images: using k=3"):
        detector = KNNDetector(k=100, normalize=False).fit(LINE)
    assert detector.k_ == 3
    # 0 -> {1, 2, 10}
    assert detector.train_scores_[0] == pytest.approx(13 / 3)


def test_no_warning_when_k_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KNNDetector(k=3, normalize=False).fit(LINE)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"k": 0}, "k must be >= 1"),
        ({"k": 2.5}, "k must be an integer"),
        ({"thres_ratio": 1.0}, "thres_ratio must be strictly between 0 and 1"),
        ({"thres_ratio": 0}, "thres_ratio"),
        ({"normalize": "yes"}, "normalize must be True or False"),
        ({"k": 2, "index": "Bogus"}, "invalid faiss index factory string 'Bogus'"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ParameterError, match=match):
        KNNDetector(**params).fit(LINE)


def test_bad_input():
    with pytest.raises(ParameterError, match="at least 2 normal images"):
        KNNDetector().fit([[1.0, 2.0]])
    with pytest.raises(ParameterError, match="NaN"):
        KNNDetector(k=1).fit([[1.0], [np.nan], [2.0]])
    with pytest.raises(ParameterError, match="2-D"):
        KNNDetector(k=1).fit([1.0, 2.0, 3.0])
    detector = KNNDetector(k=1).fit(np.eye(3))
    with pytest.raises(ParameterError, match="2 features but the model was fitted on 3"):
        detector.score(np.ones((1, 2)))
    with pytest.raises(ParameterError, match="NaN"):
        detector.predict([[np.nan, 0, 0]])


def test_not_fitted():
    with pytest.raises(NotFittedError, match="KNNDetector is not fitted yet: call fit\\(normal_embeddings\\) first"):
        KNNDetector().score(np.ones((1, 3)))


def test_get_params_and_registry():
    detector = KNNDetector(k=5, index="HNSW32")
    assert detector.get_params() == {"k": 5, "thres_ratio": 0.92, "normalize": True, "index": "HNSW32", "device": "cpu"}
    assert METHODS["knn"] is KNNDetector
    assert not hasattr(detector, "k_")  # __init__ only stores arguments


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    bank, queries = rng.normal(size=(40, 6)), rng.normal(size=(7, 6))
    detector = KNNDetector(k=4, thres_ratio=0.8).fit(bank)
    path = detector.save(tmp_path / "model.npz")
    assert path == tmp_path / "model.npz" and [p.name for p in tmp_path.iterdir()] == ["model.npz"]
    loaded = KNNDetector.load(path)
    assert loaded.get_params() == detector.get_params()
    assert loaded.k_ == 4 and loaded.threshold_ == detector.threshold_
    np.testing.assert_array_equal(loaded.memory_bank_, detector.memory_bank_)
    np.testing.assert_array_equal(loaded.train_scores_, detector.train_scores_)
    np.testing.assert_array_equal(loaded.score(queries), detector.score(queries))
    np.testing.assert_array_equal(loaded.predict(queries), detector.predict(queries))


def test_save_needs_fit(tmp_path):
    with pytest.raises(NotFittedError):
        KNNDetector().save(tmp_path / "m.npz")


def test_load_refuses_foreign_old_corrupt(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        KNNDetector.load(tmp_path / "missing.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.zeros(3))
    with pytest.raises(ModelFileError, match=r"foreign\.npz is not an anomalib_study model file"):
        KNNDetector.load(foreign)
    other = tmp_path / "other.npz"
    save_model_file(other, "anomalib_study.patchcore", 1, {}, {"x": np.zeros(1)})
    with pytest.raises(ModelFileError, match="holds format 'anomalib_study.patchcore', not 'anomalib_study.knn'"):
        KNNDetector.load(other)
    old = tmp_path / "old.npz"
    save_model_file(old, "anomalib_study.knn", 0, {}, {"x": np.zeros(1)})
    with pytest.raises(ModelFileError, match="version 0"):
        KNNDetector.load(old)
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(ModelFileError, match="text.npz cannot be read"):
        KNNDetector.load(text)
    good = KNNDetector(k=1).fit(np.eye(3)).save(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="truncated.npz"):
        KNNDetector.load(truncated)


def test_matches_sklearn_nearest_neighbors():
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import normalize

    rng = np.random.default_rng(3)
    bank, queries = rng.normal(size=(60, 10)), rng.normal(size=(15, 10))
    detector = KNNDetector(k=5).fit(bank)
    reference = NearestNeighbors(n_neighbors=5).fit(normalize(bank))
    distances, _ = reference.kneighbors(normalize(queries))
    np.testing.assert_allclose(detector.score(queries), distances.mean(axis=1), rtol=1e-5)
    loo, _ = reference.kneighbors()  # sklearn's kneighbors() without X leaves each point out
    np.testing.assert_allclose(detector.train_scores_, loo.mean(axis=1), rtol=1e-5)
