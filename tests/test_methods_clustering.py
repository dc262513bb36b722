"""The clustering step of anomaly clustering on embeddings whose groups are known."""

from __future__ import annotations

import numpy as np
import pytest

from anomalib_study.errors import ParameterError
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
