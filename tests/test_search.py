"""Tests of the faiss search layer: exact search against numpy, IVF-PQ recall, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from anomalib_study.errors import ModelFileError, ParameterError, StudyError
from anomalib_study.search import NearestNeighbourIndex, training_points_needed


def _brute_force(bank, queries, k):
    distances = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), order


def test_hand_checkable_1d():
    bank = np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    index = NearestNeighbourIndex().fit(bank)
    distances, indices = index.search(np.array([[2.6]]), 2)
    np.testing.assert_allclose(distances, [[0.4, 1.6]], rtol=1e-5)
    np.testing.assert_array_equal(indices, [[2, 1]])
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    assert index.ntotal == 4


def test_euclidean_not_squared_and_clipped():
    bank = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    distances, _ = NearestNeighbourIndex().fit(bank).search(bank, 2)
    np.testing.assert_allclose(distances, [[0.0, 5.0], [0.0, 5.0]], atol=1e-6)
    assert (distances >= 0).all()


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    distances, indices = NearestNeighbourIndex("Flat").fit(bank).search(queries, 7)
    expected_d, expected_i = _brute_force(bank.astype(np.float64), queries.astype(np.float64), 7)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(indices, expected_i)


def test_input_not_modified_and_non_contiguous_accepted():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(20, 8))  # float64, converted to a float32 copy
    view = bank[:, ::2]  # non-contiguous
    before = view.copy()
    index = NearestNeighbourIndex().fit(view)
    np.testing.assert_array_equal(view, before)
    assert index.describe() == {
        "factory": "Flat", "metric": "l2", "kmeans_reduce": None, "ntotal": 20, "dim": 4, "nprobe": None, "seed": 0,
    }


def test_ivf_pq_recall_on_clustered_data():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=10.0, size=(8, 16))
    bank = (centres[rng.integers(0, 8, 700)] + rng.normal(size=(700, 16))).astype(np.float32)
    queries = (centres[rng.integers(0, 8, 50)] + rng.normal(size=(50, 16))).astype(np.float32)
    approx = NearestNeighbourIndex("IVF8,PQ4x4", nprobe=4).fit(bank)  # 700 >= 39 * 16: no warning
    _, approx_i = approx.search(queries, 10)
    _, exact_i = NearestNeighbourIndex("Flat").fit(bank).search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_i, exact_i)])
    assert recall > 0.3, recall  # 4 codes of 4 bits: coarse, but far above chance (10 / 700)
    assert approx.describe()["factory"] == "IVF8,PQ4x4"
    assert approx.describe()["nprobe"] == 4


def test_few_training_points_warns():
    bank = np.random.default_rng(7).normal(size=(50, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match="recommends at least 156"):
        NearestNeighbourIndex("IVF4,Flat").fit(bank)


def test_hnsw_and_inner_product():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(100, 8)).astype(np.float32)
    _, indices = NearestNeighbourIndex("HNSW16").fit(bank).search(bank[:5], 1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(5))
    ip_d, ip_i = NearestNeighbourIndex(metric="ip").fit(bank).search(bank[:3], 100)
    np.testing.assert_allclose(ip_d[0, 0], (bank @ bank[0]).max(), rtol=1e-5)
    assert (np.diff(ip_d, axis=1) <= 1e-6).all()  # larger = nearer, sorted


def test_kmeans_reduce():
    rng = np.random.default_rng(4)
    bank = np.concatenate([rng.normal(0, 0.01, (50, 2)), rng.normal(5, 0.01, (50, 2))]).astype(np.float32)
    index = NearestNeighbourIndex(kmeans_reduce=2, seed=0).fit(bank)
    assert index.ntotal == 2 and index.describe()["kmeans_reduce"] == 2
    distances, _ = index.search(np.array([[0.0, 0.0], [5.0, 5.0]]), 1)
    assert distances.max() < 0.1
    with pytest.raises(ParameterError, match="kmeans_reduce=500"):
        NearestNeighbourIndex(kmeans_reduce=500).fit(bank)


def test_bytes_roundtrip():
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(50, 4)).astype(np.float32)
    index = NearestNeighbourIndex("Flat").fit(bank)
    again = NearestNeighbourIndex.from_bytes(index.to_bytes())
    assert again.describe() == index.describe()
    for a, b in zip(index.search(bank, 3), again.search(bank, 3)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ModelFileError, match="not an anomalib_study index"):
        NearestNeighbourIndex.from_bytes(b"garbage bytes here")
    data = index.to_bytes()
    with pytest.raises(ModelFileError):
        NearestNeighbourIndex.from_bytes(data[: len(data) // 2])


def test_training_points_needed():
    assert training_points_needed("Flat") == (0, 0)
    assert training_points_needed("IVF1024,PQ16") == (1024, 39 * 1024)
    assert training_points_needed("PQ16") == (256, 39 * 256)
    assert training_points_needed("PQ8x4") == (16, 39 * 16)


@pytest.mark.parametrize(
    ("factory", "needed"), [("IVF64,Flat", "at least 64"), ("PQ4", "at least 256"), ("IVF16,PQ4", "at least 256")]
)
def test_too_small_bank_for_training(factory, needed):
    bank = np.random.default_rng(6).normal(size=(30, 8)).astype(np.float32)
    with pytest.raises(ParameterError, match=needed) as info:
        NearestNeighbourIndex(factory).fit(bank)
    assert "has 30" in str(info.value) and '"Flat"' in str(info.value)


def test_errors_are_clear():
    bank = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(ParameterError, match="'Nonsense42'.*HNSW32"):
        NearestNeighbourIndex("Nonsense42").fit(bank)
    index = NearestNeighbourIndex().fit(bank)
    with pytest.raises(ParameterError, match="k=6 is larger than the 5"):
        index.search(bank, 6)
    with pytest.raises(ParameterError, match="3 features per row but the index was built on 4"):
        index.search(np.zeros((2, 3)), 1)
    with pytest.raises(ParameterError, match="NaN"):
        index.search(np.full((1, 4), np.nan), 1)
    with pytest.raises(ParameterError, match="2-D"):
        NearestNeighbourIndex().fit(np.zeros(4))
    with pytest.raises(ParameterError, match="metric"):
        NearestNeighbourIndex(metric="cosine").fit(bank)
    with pytest.raises(ParameterError, match="nprobe applies to IVF"):
        NearestNeighbourIndex("Flat", nprobe=3).fit(bank)
    with pytest.raises(StudyError, match="not fitted yet: call fit\\(bank\\)"):
        NearestNeighbourIndex().search(bank, 1)
