"""The clustering step of anomaly clustering on embeddings whose groups are known."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from anomalib_study.errors import ParameterError
from anomalib_study.hardware import native_bf16
from anomalib_study.methods.clustering import LINKAGES, choose_n_clusters, cluster_embeddings
from anomalib_study.metrics import clustering_metrics


def _blobs(sizes=(12, 9, 15), dim=8, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[: len(sizes)] * 5.0
    X = np.concatenate([c + rng.normal(0, spread, (k, dim)) for c, k in zip(centres, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order]


@pytest.mark.parametrize("linkage", LINKAGES)
def test_well_separated_groups_are_recovered(linkage):
    X, y = _blobs()
    labels = cluster_embeddings(X, 3, linkage=linkage)
    assert labels.shape == (36,) and set(labels) == {0, 1, 2} and labels[0] == 0  # numbered by first appearance
    scores = clustering_metrics(y, labels)
    assert scores["f1"] == 1.0 and scores["nmi"] == pytest.approx(1.0)


def test_same_input_same_labels_and_one_cluster():
    X, _ = _blobs()
    assert np.array_equal(cluster_embeddings(X, 3, "kmeans", seed=1), cluster_embeddings(X, 3, "kmeans", seed=1))
    assert not cluster_embeddings(X, 1).any()


def test_choose_n_clusters_finds_the_groups():
    X, _ = _blobs(sizes=(10, 10, 10, 10))
    best, scores = choose_n_clusters(X)
    assert best == 4 and sorted(scores) == list(range(2, 11))
    assert scores[4] == max(scores.values())


def test_bad_parameters_are_named():
    X, _ = _blobs()
    with pytest.raises(ParameterError, match="linkage must be one of"):
        cluster_embeddings(X, 3, linkage="median")
    with pytest.raises(ParameterError, match="more than the 36 images"):
        cluster_embeddings(X, 40)
    with pytest.raises(ParameterError, match="n_clusters must be >= 1"):
        cluster_embeddings(X, 0)
    with pytest.raises(ParameterError, match="at least 3 images"):
        choose_n_clusters(X[:2])
    with pytest.raises(ParameterError, match="no candidate"):
        choose_n_clusters(X, candidates=[1, 50])


# ------------------------------------------------------------------ patch scores, weights, estimator
from anomalib_study.methods import clustering as clu  # noqa: E402
from anomalib_study.methods import clustering_steps  # noqa: E402


def _brute_unsupervised(Z):
    n = Z.shape[0]
    out = np.zeros(Z.shape[:2])
    for i in range(n):
        for j in range(n):
            if i != j:
                d = np.sqrt(((Z[i][:, None, :].astype(np.float64) - Z[j][None]) ** 2).sum(-1))
                out[i] += d.min(axis=1)
    return out / (n - 1)


def _bags(n=12, P=9, D=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, P, D)).astype(np.float32)


@pytest.mark.parametrize("n", [12, 11])  # blocks that divide the images, and a ragged last block
@pytest.mark.parametrize("block_rows", [8192, 9 * 3, 9])  # one block; several blocks (off-diagonal pairs); 1 image
def test_unsupervised_scores_equal_the_definition(monkeypatch, block_rows, n):
    Z = _bags(n=n) + 40.0  # far from the origin, like ReLU features: centring keeps the expansion exact
    monkeypatch.setattr(clustering_steps, "_BLOCK_ROWS", block_rows)
    np.testing.assert_allclose(clu.unsupervised_patch_scores(Z), _brute_unsupervised(Z), rtol=1e-4, atol=1e-4)


def test_reference_subset_leaves_the_image_itself_out(monkeypatch):
    Z = _bags(n=11)
    rng = np.random.default_rng(4)
    refs = np.sort(rng.choice(11, size=4, replace=False))
    expected = np.zeros(Z.shape[:2])
    for i in range(11):
        others = [j for j in refs if j != i]
        for j in others:
            d = np.sqrt(((Z[i][:, None, :].astype(np.float64) - Z[j][None]) ** 2).sum(-1))
            expected[i] += d.min(axis=1) / len(others)
    monkeypatch.setattr(clustering_steps, "_BLOCK_ROWS", 27)  # blocks of 3 images: ragged on both sides
    np.testing.assert_allclose(clu.unsupervised_patch_scores(Z, n_references=4, seed=4), expected, atol=1e-5)
    exact = clu.unsupervised_patch_scores(Z)
    # at least half the images as references costs as much as exact: exact is computed
    assert not clu.unsupervised_is_exact(11, 5) and clu.unsupervised_is_exact(11, 6)
    np.testing.assert_allclose(clu.unsupervised_patch_scores(Z, n_references=6), exact, atol=1e-6)


def test_projection_and_bf16_approximate_the_exact_scores():
    Z = np.abs(_bags(n=8, P=16, D=64)) * 3 + 2  # positive, off-centre features (as after a ReLU)
    exact = clu.unsupervised_patch_scores(Z)
    projected = clu.unsupervised_patch_scores(Z, distance_dim=32)
    assert projected.shape == exact.shape and not np.allclose(projected, exact)
    assert np.corrcoef(projected.ravel(), exact.ravel())[0, 1] > 0.5
    with pytest.warns(UserWarning, match="emulated") if not native_bf16() else contextlib.nullcontext():
        bf16 = clu.unsupervised_patch_scores(Z, precision="bf16")
    np.testing.assert_allclose(bf16, exact, rtol=0.02)


def test_semi_supervised_scores_are_nearest_bank_distances():
    Z, bank = _bags(n=4), _bags(n=6, seed=1).reshape(-1, 5)
    scores = clu.semi_supervised_patch_scores(Z, bank)
    d = np.sqrt(((Z.reshape(-1, 1, 5).astype(np.float64) - bank[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(scores.ravel(), d, rtol=1e-4, atol=1e-4)
    with pytest.raises(ParameterError, match="features per patch"):
        clu.semi_supervised_patch_scores(Z, bank[:, :3])


def test_semi_supervised_refuses_patches_without_a_neighbour():
    from anomalib_study.search import NearestNeighbourIndex

    class Empty(NearestNeighbourIndex):  # an approximate index that finds nothing
        def search(self, queries, k):
            return np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1)

    index = Empty().fit(_bags(n=2).reshape(-1, 5))
    with pytest.raises(ParameterError, match="found no neighbour"):
        clu.semi_supervised_patch_scores(_bags(n=2), index)


def test_weights_softmax_top_patch_ties_and_uniform():
    s = np.array([[0.0, 1.0, 1.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
    top = clu.patch_weights(s, 0)
    np.testing.assert_allclose(top, [[0, 0.5, 0.5, 0], [1, 0, 0, 0]])
    soft = clu.patch_weights(s, 1.0)
    np.testing.assert_allclose(soft[1], np.exp([3, 0, 0, 0]) / np.exp([3, 0, 0, 0]).sum())
    np.testing.assert_allclose(clu.patch_weights(s, float("inf")), 0.25)
    assert np.allclose(clu.patch_weights(s * 1000, 1.0).sum(axis=1), 1)  # no overflow
    with pytest.raises(ParameterError, match="tau must be"):
        clu.patch_weights(s, -1)


def test_multi_tau_embeddings_concatenate_the_taus_around_the_rule():
    s = np.random.default_rng(0).gamma(2.0, size=(30, 100))
    Z = np.random.default_rng(1).normal(size=(30, 100, 4)).astype(np.float32)
    X, taus = clu.multi_tau_embeddings(Z, s, 0.1)
    assert X.shape == (30, 20) and taus == sorted(taus) and len(taus) == len(clu.MULTI_TAU_FACTORS)
    assert taus[2] == pytest.approx(clu.label_free_tau(s, 0.1), rel=1e-9)  # the middle one is the single rule's
    for block, tau in zip(np.split(X, 5, axis=1), taus):  # each block: that tau's embeddings, unit mean norm
        single = clu.weighted_embeddings(Z, clu.patch_weights(s, tau))
        assert np.allclose(block * np.linalg.norm(single, axis=1).mean(), single, atol=1e-5)
    model = clu.AnomalyClustering(n_clusters=3, tau_rule="multi", progress=False).fit()
    model.fit_predict(Z)
    expected, model_taus = clu.multi_tau_embeddings(Z, model.patch_scores_, 0.1)
    assert model.taus_ == pytest.approx(model_taus) and "multi-tau" in model.tau_rule_
    assert np.array_equal(model.embeddings_, expected) and model.tau_ == pytest.approx(model_taus[2])
    model.recluster(tau=model_taus[0])  # a given tau is one tau
    assert model.taus_ is None and model.embeddings_.shape == (30, 4)
    single = clu.AnomalyClustering(n_clusters=3, progress=False).fit()  # the default: one tau
    single.fit_predict(Z)
    assert single.embeddings_.shape == (30, 4) and single.tau_ == pytest.approx(model_taus[2])


def test_label_free_tau_hits_the_share_and_scales_with_the_scores():
    s = np.random.default_rng(0).gamma(2.0, size=(30, 100))
    tau = clu.label_free_tau(s, 0.2)
    assert np.median(clu.effective_share(clu.patch_weights(s, tau))) == pytest.approx(0.2, abs=1e-6)
    assert clu.label_free_tau(s * 7, 0.2) == pytest.approx(7 * tau, rel=1e-6)
    assert clu.label_free_tau(np.ones((3, 5))) == 0.0
    mostly_flat = np.vstack([np.ones((20, 100)), s[:5]])  # constant images do not choose tau
    assert clu.label_free_tau(mostly_flat, 0.2) == pytest.approx(clu.label_free_tau(s[:5], 0.2), rel=1e-6)
    with pytest.raises(ParameterError, match="weight_share"):
        clu.label_free_tau(s, 1.5)


def _defect_bags(seed=0, n_per=10, P=64, D=12, nuisance=1.0):
    """Three defect types, each a few patches shifted along its own axis, under a strong
    per-image nuisance shared by all its patches: the average embedding follows the nuisance,
    a patch-weighted one the defect."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per)
    Z = rng.normal(0, 0.2, (y.size, P, D)).astype(np.float32)
    Z += rng.normal(0, nuisance, (y.size, 1, D)).astype(np.float32) * (np.arange(D) >= 3)
    for i, kind in enumerate(y):
        Z[i, rng.choice(P, 3, replace=False), kind] += 6.0
    normal = rng.normal(0, 0.2, (15, P, D)).astype(np.float32)
    normal += rng.normal(0, nuisance, (15, 1, D)).astype(np.float32) * (np.arange(D) >= 3)
    return Z, y, normal


def test_weighted_modes_recover_types_that_the_average_misses():
    Z, y, normal = _defect_bags()
    nmi = {}
    for mode in clu.MODES:
        model = clu.AnomalyClustering(mode=mode, n_clusters=3, coreset_ratio=1.0, progress=False).fit(normal)
        labels = model.fit_predict(Z)
        nmi[mode] = clustering_metrics(y, labels)["nmi"]
        assert model.weights_.shape == Z.shape[:2] and np.allclose(model.weights_.sum(axis=1), 1)
        assert model.embeddings_.shape == (30, 12)
    assert nmi["semi_supervised"] > 0.9 and nmi["unsupervised"] > 0.9
    assert nmi["average"] < 0.5


def test_estimator_chooses_clusters_and_reclusters():
    Z, y, _ = _defect_bags()
    model = clu.AnomalyClustering(progress=False).fit()
    labels = model.fit_predict(Z)
    assert model.n_clusters_ == 3 and model.n_clusters_criterion in model.n_clusters_rule_
    assert clustering_metrics(y, labels)["f1"] > 0.9
    described = model.describe()
    assert described["tau"] == pytest.approx(model.tau_) and "label-free" in described["tau_rule"]
    scores = described["n_clusters_scores"]  # the criterion's score per candidate (what cluster's page plots)
    assert isinstance(described["n_clusters_criterion"], str) and described["n_clusters_criterion"]
    assert 3 in scores and all(isinstance(k, int) and isinstance(v, float) for k, v in scores.items())
    again = model.recluster(tau=0.0, n_clusters=2)
    assert set(again) == {0, 1} and model.tau_ == 0.0 and model.describe()["n_clusters_scores"] is None


def test_estimator_refuses_impossible_use():
    with pytest.raises(ParameterError, match="mode must be one of"):
        clu.AnomalyClustering(mode="supervised").fit()
    with pytest.raises(ParameterError, match="needs normal images"):
        clu.AnomalyClustering(mode="semi_supervised").fit()
    with pytest.raises(ParameterError, match="at least 2 images"):
        clu.unsupervised_patch_scores(_bags(n=1))
    model = clu.AnomalyClustering(mode="semi_supervised", coreset_ratio=1.0, progress=False).fit(_bags(n=3))
    with pytest.raises(ParameterError, match="features per patch"):
        model.fit_predict(_bags(n=4, D=7))
    with pytest.raises(ParameterError, match="NaN"):
        clu.AnomalyClustering(progress=False).fit().fit_predict(np.full((3, 2, 2), np.nan))
    with pytest.raises(ParameterError, match="more than the 4 images"):  # before the patch scores
        clu.AnomalyClustering(n_clusters=5, progress=False).fit().fit_predict(_bags(n=4))


def test_method_declarations_name_what_they_lack():
    from anomalib_study.methods.base import MethodSpec

    with pytest.raises(ValueError, match="task must be one of"):
        MethodSpec("x", "X", object, "", (), task="segmentation")
    with pytest.raises(ValueError, match="must declare cluster_images"):
        MethodSpec("x", "X", object, "", (), task="clustering")
    with pytest.raises(ValueError, match="must declare fit_paths, score_paths"):
        MethodSpec("x", "X", object, "", ())
