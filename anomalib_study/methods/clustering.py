"""Anomaly clustering (Sohn et al., "Anomaly Clustering: Grouping Images into Coherent Clusters
of Anomaly Types", WACV 2023): group anomalous images into defect types.

This module holds, so far, the last step of the method: clustering the image embeddings
(:func:`cluster_embeddings`) and choosing the number of clusters without labels for a folder
that has none (:func:`choose_n_clusters`). Both are pure functions of their arguments. The
patch-weighted image embeddings (unsupervised, semi-supervised and average modes) and the
estimator come next (issue 12); :func:`anomalib_study.metrics.clustering_metrics` scores a
clustering against defect types.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from anomalib_study.checks import check_int
from anomalib_study.errors import ParameterError
from anomalib_study.methods.base import check_embeddings

__all__ = ["LINKAGES", "cluster_embeddings", "choose_n_clusters"]

#: clustering algorithms: agglomerative linkages (the reproduction uses ward), k-means, spectral
LINKAGES = ("ward", "average", "complete", "single", "kmeans", "spectral")


def cluster_embeddings(X, n_clusters: int, linkage: str = "ward", seed: int = 0) -> np.ndarray:
    """Cluster labels (n,) int in 0..n_clusters-1 of the image embeddings ``X`` (n, d).

    ``linkage``: ``"ward"`` (agglomerative, the reproduction's choice), ``"average"``,
    ``"complete"``, ``"single"`` (agglomerative, Euclidean), ``"kmeans"`` (10 seeded
    restarts) or ``"spectral"`` (nearest-neighbour affinity, seeded). Labels are renumbered
    by first appearance, so the same partition always gets the same labels.
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering

    X = check_embeddings(X, name="X (image embeddings)")
    n = X.shape[0]
    n_clusters = check_int("n_clusters", n_clusters, minimum=1)
    if n_clusters > n:
        raise ParameterError(f"n_clusters={n_clusters} is more than the {n} images to cluster")
    if linkage not in LINKAGES:
        raise ParameterError(f"linkage must be one of {', '.join(LINKAGES)}, got {linkage!r}")
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    if linkage == "kmeans":
        labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(X)
    elif linkage == "spectral":
        neighbours = max(2, min(10, n - 1))
        labels = SpectralClustering(n_clusters=n_clusters, affinity="nearest_neighbors", n_neighbors=neighbours,
                                    random_state=seed, assign_labels="cluster_qr").fit_predict(X)
    else:
        labels = AgglomerativeClustering(n_clusters=n_clusters, linkage=linkage).fit_predict(X)
    _, first = np.unique(labels, return_index=True)
    order = {int(labels[i]): rank for rank, i in enumerate(sorted(first))}
    return np.array([order[int(v)] for v in labels], dtype=np.int64)


def choose_n_clusters(X, candidates: Iterable[int] | None = None, linkage: str = "ward",
                      seed: int = 0) -> tuple[int, dict[int, float]]:
    """The number of clusters with the highest silhouette score, and every candidate's score.

    For a folder without labels. ``candidates``: the numbers tried (default 2 to
    min(10, n - 1)); each is clustered with :func:`cluster_embeddings` and scored with
    ``sklearn.metrics.silhouette_score`` (Euclidean, in [-1, 1], higher = tighter and better
    separated clusters). Ties go to the smaller number.
    """
    from sklearn.metrics import silhouette_score

    X = check_embeddings(X, name="X (image embeddings)")
    n = X.shape[0]
    if n < 3:
        raise ParameterError(f"choosing the number of clusters needs at least 3 images, got {n}: pass n_clusters")
    values = sorted({int(k) for k in (candidates if candidates is not None else range(2, min(10, n - 1) + 1))})
    usable = [k for k in values if 2 <= k <= n - 1]
    if not usable:
        raise ParameterError(f"no candidate number of clusters in 2..{n - 1} (n - 1) among {values}")
    scores = {k: float(silhouette_score(X, cluster_embeddings(X, k, linkage, seed))) for k in usable}
    best = max(usable, key=lambda k: (scores[k], -k))
    return best, scores
