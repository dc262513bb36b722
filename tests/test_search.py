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
        "factory": "Flat",
        "metric": "l2",
        "kmeans_reduce": None,
        "ntotal": 20,
        "dim": 4,
        "nprobe": None,
        "seed": 0,
        "precision": "fp32",
        "precision_used": "fp32",
        "rerank": 8,
        "candidate_dim": None,
        "candidate_dim_used": None,
        "reranked_queries": None,
        "exact_fallbacks": None,
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


# ---------------------------------------------------------------------------------- precision
@pytest.fixture
def bf16_quietly():
    """bf16 asked for on a CPU without it warns (emulated, slow): expected in these tests."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="precision='bf16'")
        yield


def _near_ties(n_queries=100, d=16, seed=0):
    """Queries with two bank rows each at distances 10 and 10.001 (bf16 cannot tell them apart),
    the exact nearest neighbour of query i being row i."""
    rng = np.random.default_rng(seed)
    queries = rng.normal(scale=100.0, size=(n_queries, d))
    u = rng.normal(size=(2, n_queries, d))
    u /= np.linalg.norm(u, axis=2, keepdims=True)
    bank = np.concatenate([queries + 10.0 * u[0], queries + 10.0 * (1 + 1e-4) * u[1]])
    return bank.astype(np.float32), queries.astype(np.float32)


def test_fp32_default_is_faiss_bit_for_bit():
    rng = np.random.default_rng(11)
    bank, queries = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    index = NearestNeighbourIndex().fit(bank)
    assert index.precision_used_ == "fp32"
    import faiss

    flat = faiss.IndexFlatL2(16)
    flat.add(bank)
    squared, ids = flat.search(queries, 5)
    distances, indices = index.search(queries, 5)
    np.testing.assert_array_equal(indices, ids)
    np.testing.assert_array_equal(distances, np.sqrt(np.clip(squared, 0, None)))


def test_bf16_reranked_search_equals_exact_search(bf16_quietly):
    rng = np.random.default_rng(12)
    bank = (rng.normal(size=(400, 24)) + 30.0).astype(np.float32)  # far from the origin: centring matters
    queries = (bank[rng.integers(0, 400, 60)] + rng.normal(scale=0.3, size=(60, 24))).astype(np.float32)
    exact = NearestNeighbourIndex().fit(bank)
    low = NearestNeighbourIndex(precision="bf16", rerank=16).fit(bank)
    assert low.precision_used_ == "bf16" and low.describe()["precision_used"] == "bf16"
    for k in (1, 5):
        (d_exact, i_exact), (d_low, i_low) = exact.search(queries, k), low.search(queries, k)
        np.testing.assert_array_equal(i_low, i_exact)
        np.testing.assert_allclose(d_low, d_exact, rtol=1e-5, atol=1e-5)
        assert d_low.dtype == np.float32 and i_low.dtype == np.int64
    expected_d, expected_i = _brute_force(bank.astype(np.float64), queries.astype(np.float64), 3)
    d_low, i_low = low.search(queries, 3)
    np.testing.assert_array_equal(i_low, expected_i)
    np.testing.assert_allclose(d_low, expected_d, rtol=1e-5)
    # k above rerank: k candidates are taken, the nearest among them found
    d_many, i_many = NearestNeighbourIndex(precision="bf16", rerank=2).fit(bank).search(queries, 6)
    assert i_many.shape == (60, 6) and (np.diff(d_many, axis=1) >= 0).all()
    np.testing.assert_array_equal(i_many[:, 0], exact.search(queries, 1)[1][:, 0])
    assert low.rerank_hit_rate(queries)["hit_rate"] == 1.0


def test_bf16_candidates_are_rounded_relative_to_the_distance(bf16_quietly):
    """Clusters far from the bank's mean: |q|^2 is much larger than the distances that decide the neighbour.
    The candidate product gives the squared distance itself (norms inside it, split in two bf16 parts), so its
    bf16 rounding is relative to the distance: 2 candidates hold the exact neighbour for >= 99 % of the
    queries (norms added after a bf16 -2 q.b product: 94 %), 1 candidate for >= 95 % (80 %)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3.0, size=(6, 64)) + 20.0
    bank = (centres[rng.integers(0, 6, 3000)] + rng.normal(size=(3000, 64))).astype(np.float32)
    queries = (centres[rng.integers(0, 6, 500)] + rng.normal(size=(500, 64))).astype(np.float32)
    assert NearestNeighbourIndex(precision="bf16", rerank=1).fit(bank).rerank_hit_rate(queries)["hit_rate"] >= 0.95
    assert NearestNeighbourIndex(precision="bf16", rerank=2).fit(bank).rerank_hit_rate(queries)["hit_rate"] >= 0.99
    # with the certificate, the search itself returns the exact neighbours whatever the candidates held
    exact = NearestNeighbourIndex().fit(bank).search(queries, 1)[1]
    np.testing.assert_array_equal(
        NearestNeighbourIndex(precision="bf16", rerank=1).fit(bank).search(queries, 1)[1], exact
    )


def test_rerank_hit_rate_on_near_ties(bf16_quietly):
    bank, queries = _near_ties()
    one = NearestNeighbourIndex(precision="bf16", rerank=1).fit(bank)
    report = one.rerank_hit_rate(queries)
    _, _, candidates, certified = one._reranked_search(queries, 1, certify=False)
    right = candidates[:, 0] == np.arange(len(queries))  # the exact neighbour of query i is row i
    assert 0 < report["hit_rate"] < 1  # bf16 picks the wrong one of the two rows about half the time
    assert report["n_hits"] == int(right.sum()) and report["n_queries"] == len(queries)
    assert report["hit_rate"] == pytest.approx(right.mean())
    assert report["rerank"] == 1 and report["max_distance_excess"] == pytest.approx(1e-3, rel=0.05)
    # the certificate never vouches for a wrong candidate; the search itself falls back to the exact one
    assert not certified[~right].any()
    _, found = one.search(queries, 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(len(queries)))
    assert one.describe()["exact_fallbacks"] >= int((~right).sum())
    # with both rows among the candidates, the float32 re-ranking always finds the exact one
    two = NearestNeighbourIndex(precision="bf16", rerank=2).fit(bank)
    assert two.rerank_hit_rate(queries) == {
        "hit_rate": 1.0,
        "n_queries": len(queries),
        "n_hits": len(queries),
        "rerank": 2,
        "max_distance_excess": 0.0,
    }
    np.testing.assert_array_equal(two.search(queries, 1)[1][:, 0], np.arange(len(queries)))
    # the fp32 index measures what its bf16 search would do, without using it
    assert NearestNeighbourIndex(rerank=1).fit(bank).rerank_hit_rate(queries)["hit_rate"] == report["hit_rate"]


def test_auto_precision_follows_the_hardware(monkeypatch, bf16_quietly):
    import anomalib_study.hardware as hardware

    bank = np.random.default_rng(13).normal(size=(50, 8)).astype(np.float32)
    expected = "bf16" if hardware.native_bf16("cpu") else "fp32"
    assert NearestNeighbourIndex(precision="auto").fit(bank).precision_used_ == expected
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    assert NearestNeighbourIndex(precision="auto").fit(bank).precision_used_ == "bf16"
    # approximate indexes keep faiss's float32 search under "auto"
    assert NearestNeighbourIndex("HNSW8", precision="auto").fit(bank).precision_used_ == "fp32"
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    assert NearestNeighbourIndex(precision="auto").fit(bank).precision_used_ == "fp32"


def test_bf16_refusals_and_bad_values(bf16_quietly):
    bank = np.zeros((10, 4), np.float32)
    with pytest.raises(ParameterError, match="precision must be one of fp32, bf16, auto, got 'fp16'"):
        NearestNeighbourIndex(precision="fp16").fit(bank)
    with pytest.raises(ParameterError, match="precision='bf16'.*'Flat'.*'l2'"):
        NearestNeighbourIndex("HNSW8", precision="bf16").fit(bank)
    with pytest.raises(ParameterError, match="precision='bf16'.*metric 'ip'"):
        NearestNeighbourIndex(metric="ip", precision="bf16").fit(bank)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ParameterError, match="rerank must be an integer >= 1"):
            NearestNeighbourIndex(precision="bf16", rerank=bad).fit(bank)
    with pytest.raises(ParameterError, match="rerank_hit_rate.*'Flat'"):
        NearestNeighbourIndex("HNSW8").fit(np.random.default_rng(0).normal(size=(10, 4))).rerank_hit_rate(bank)


def test_precision_survives_bytes(bf16_quietly):
    bank, queries = _near_ties(20)
    index = NearestNeighbourIndex(precision="bf16", rerank=3).fit(bank)
    again = NearestNeighbourIndex.from_bytes(index.to_bytes())
    assert again.describe() == index.describe() and again.rerank == 3 and again.precision_used_ == "bf16"
    for a, b in zip(index.search(queries, 2), again.search(queries, 2)):
        np.testing.assert_array_equal(a, b)
    assert "precision='bf16', rerank=3" in repr(again)


# ---------------------------------------------------------------------------------- candidate dimensions
def _low_rank(n, rank=6, d=32, noise=0.01, seed=0):
    """Rows with ``rank`` strong directions in ``d`` features (plus a little noise), far from the origin."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, d))
    return (rng.normal(size=(n, rank)) * np.linspace(3.0, 1.0, rank)) @ basis + noise * rng.normal(size=(n, d)) + 20.0


def test_candidate_dim_projects_on_the_principal_components_and_reranks_exactly(bf16_quietly):
    """Candidates from the bank's leading principal components, re-ranked on every feature: on data whose
    variance lies in those components the result is faiss's exact search, distances in float32."""
    bank, queries = _low_rank(500).astype(np.float32), _low_rank(80, seed=1).astype(np.float32)
    exact = NearestNeighbourIndex().fit(bank)
    for precision in ("fp32", "bf16"):
        index = NearestNeighbourIndex(precision=precision, candidate_dim=6, rerank=16).fit(bank)
        assert index.candidate_dim_used_ == 6 and index.describe()["candidate_dim_used"] == 6
        assert index._low["components"].shape == (32, 6)
        (d_exact, i_exact), (d_proj, i_proj) = exact.search(queries, 3), index.search(queries, 3)
        np.testing.assert_array_equal(i_proj, i_exact)
        np.testing.assert_allclose(d_proj, d_exact, rtol=1e-4, atol=1e-4)
        assert index.rerank_hit_rate(queries)["hit_rate"] == 1.0
    # the components are those of the bank's covariance: orthonormal, largest variance first
    components = NearestNeighbourIndex(candidate_dim=6).fit(bank)._low["components"].numpy()
    np.testing.assert_allclose(components.T @ components, np.eye(6), atol=1e-5)
    variance = ((bank - bank.mean(0)) @ components).var(axis=0)
    assert (np.diff(variance) <= 1e-3).all()
    # as many dimensions as the features (or more): faiss's own exact search, no candidates
    assert NearestNeighbourIndex(candidate_dim=64).fit(bank).candidate_dim_used_ is None
    assert NearestNeighbourIndex().fit(bank).candidate_dim_used_ is None


def test_too_few_candidate_dimensions_miss_the_hit_rate_says_so_and_the_search_stays_exact():
    """Two dimensions of a six-dimensional cloud cannot rank its neighbours: the candidates often miss the exact
    nearest row, which rerank_hit_rate counts; the certificate catches every miss, so search() falls back to
    the exact search for those queries and returns the exact neighbours all the same."""
    bank, queries = _low_rank(500).astype(np.float32), _low_rank(200, seed=2).astype(np.float32)
    index = NearestNeighbourIndex(candidate_dim=2, rerank=2).fit(bank)
    report = index.rerank_hit_rate(queries)
    exact_d, exact_i = NearestNeighbourIndex().fit(bank).search(queries, 1)
    assert report["hit_rate"] < 0.9 and report["max_distance_excess"] > 0
    _, candidate_i, _, certified = index._reranked_search(queries, 1, certify=False)
    assert not certified[candidate_i[:, 0] != exact_i[:, 0]].any()
    found_d, found_i = index.search(queries, 1)
    np.testing.assert_array_equal(found_i, exact_i)
    np.testing.assert_allclose(found_d, exact_d, rtol=1e-5, atol=1e-4)
    assert index.describe()["exact_fallbacks"] == int((~certified).sum()) > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("candidate_dim", [None, 4, 12])
def test_candidate_distances_are_lower_bounds_within_the_certificates_allowance(bf16_quietly, precision, candidate_dim):
    """The certificate's premise, checked over every (query, bank row) pair: the bound computed from a row's
    candidate score is never above the row's exact distance (rows far from and near the query alike)."""
    import torch

    from anomalib_study.search import _NORM_COLUMNS, _lower_bound, _lower_vectors, _query_rows

    rng = np.random.default_rng(5)
    bank = (_low_rank(400, rank=10) + rng.normal(scale=0.5, size=(400, 32))).astype(np.float32)
    queries = np.concatenate([bank[:50] + 0.01 * rng.normal(size=(50, 32)), _low_rank(50, seed=7)]).astype(np.float32)
    index = NearestNeighbourIndex(precision=precision, candidate_dim=candidate_dim).fit(bank)
    low = index._low if index._low is not None else index._candidate_bank(torch.bfloat16)
    vectors = _lower_vectors(torch.from_numpy(queries), low["mean"], low["components"])
    scores = (_query_rows(vectors, low["low"].dtype) @ low["low"].T).float()
    columns = low["low"].shape[1] - _NORM_COLUMNS
    scale = (vectors.norm(dim=1) + low["max_norm"])[:, None].expand_as(scores)
    bound = _lower_bound(scores.reshape(-1), scale.reshape(-1), low["low"].dtype, columns, 32).reshape(scores.shape)
    exact = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(axis=2))
    assert (bound.numpy() <= exact).all()


def test_candidate_dim_refusals_and_bytes():
    bank = _low_rank(60).astype(np.float32)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ParameterError, match="candidate_dim must be None"):
            NearestNeighbourIndex(candidate_dim=bad).fit(bank)
    with pytest.raises(ParameterError, match="candidate_dim.*'Flat'.*'l2'"):
        NearestNeighbourIndex("HNSW8", candidate_dim=4).fit(bank)
    with pytest.raises(ParameterError, match="candidate_dim.*metric 'ip'"):
        NearestNeighbourIndex(metric="ip", candidate_dim=4).fit(bank)
    index = NearestNeighbourIndex(candidate_dim=4, rerank=8).fit(bank)
    again = NearestNeighbourIndex.from_bytes(index.to_bytes())
    assert again.describe() == index.describe() and again.candidate_dim == 4 and "candidate_dim=4" in repr(again)
    for a, b in zip(index.search(bank[:10], 2), again.search(bank[:10], 2)):
        np.testing.assert_array_equal(a, b)
