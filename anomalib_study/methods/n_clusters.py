"""Choosing the number of clusters without labels: the criteria anomaly clustering compares.

Each criterion takes the image embeddings ``X`` (n, d) and the candidate numbers, and
returns ``(chosen, scores)``: the number it picks and its score at every candidate (for the
curve a report or the ``cluster`` page draws). None of them looks at a label.

- ``silhouette``: the highest silhouette of the Ward partition (Euclidean);
- ``silhouette_cosine``: the same on cosine distances (embeddings L2-normalised first);
- ``calinski_harabasz``: the highest between / within dispersion ratio;
- ``davies_bouldin``: the lowest Davies-Bouldin index (scored as its negative);
- ``ward_gap``: the largest relative jump of the Ward merge heights (where the dendrogram
  is cut with the most room);
- ``gap``: Tibshirani's gap statistic against uniform references in the data's principal
  box (the smallest k with gap(k) >= gap(k+1) - s(k+1));
- ``eigengap``: the largest gap between successive eigenvalues of the normalised Laplacian
  of a symmetric nearest-neighbour graph;
- ``stability``: the mean adjusted Rand index between the full partition and partitions of
  seeded 80 % subsamples (the highest; ties to the larger k, since k = 2 is often stable
  only because it is coarse).

:data:`DEFAULT_CRITERION` is the one the study chose after comparing them on every data
set with labels (notebook 04 shows the table; the comparison is in
``benchmarks/bench_n_clusters.py``).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from anomalib_study.errors import ParameterError
from anomalib_study.methods.base import check_embeddings

__all__ = ["CRITERIA", "DEFAULT_CRITERION", "candidates_for", "choose_n_clusters", "criteria_table"]

#: the criterion anomaly clustering uses when the number of clusters is not given
DEFAULT_CRITERION = "silhouette_cosine"


def _ward_labels(X: np.ndarray, k: int, linkage: str, seed: int) -> np.ndarray:
    from anomalib_study.methods.clustering_steps import cluster_embeddings

    return cluster_embeddings(X, k, linkage, seed)


def _normalised(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def _silhouette(X, ks, linkage, seed):
    from sklearn.metrics import silhouette_score

    scores = {k: float(silhouette_score(X, _ward_labels(X, k, linkage, seed))) for k in ks}
    return max(ks, key=lambda k: (scores[k], -k)), scores


def _silhouette_cosine(X, ks, linkage, seed):
    from sklearn.metrics import silhouette_score

    U = _normalised(X)
    scores = {k: float(silhouette_score(U, _ward_labels(U, k, linkage, seed), metric="cosine")) for k in ks}
    return max(ks, key=lambda k: (scores[k], -k)), scores


def _calinski_harabasz(X, ks, linkage, seed):
    from sklearn.metrics import calinski_harabasz_score

    scores = {k: float(calinski_harabasz_score(X, _ward_labels(X, k, linkage, seed))) for k in ks}
    return max(ks, key=lambda k: (scores[k], -k)), scores


def _davies_bouldin(X, ks, linkage, seed):
    from sklearn.metrics import davies_bouldin_score

    scores = {k: -float(davies_bouldin_score(X, _ward_labels(X, k, linkage, seed))) for k in ks}
    return max(ks, key=lambda k: (scores[k], -k)), scores


def _ward_gap(X, ks, linkage, seed):
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    heights = np.sort(scipy_linkage(X.astype(np.float64), method="ward")[:, 2])  # n - 1 merges, ascending
    n = X.shape[0]
    # k clusters are what is left before the last k - 1 merges: the merge that makes k - 1
    # of them has height heights[n - k], the one that makes k has heights[n - k - 1]
    scores = {}
    for k in ks:
        upper, lower = heights[n - k], heights[n - k - 1]
        scores[k] = float(upper / lower) if lower > 0 else float("inf")
    return max(ks, key=lambda k: (scores[k], -k)), scores


def _dispersion(X: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(labels):
        members = X[labels == c]
        total += float(((members - members.mean(axis=0)) ** 2).sum())
    return total


def _gap(X, ks, linkage, seed, references: int = 10):
    rng = np.random.default_rng(seed)
    centred = X - X.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    rotated = centred @ vt.T
    low, high = rotated.min(axis=0), rotated.max(axis=0)
    samples = [rng.uniform(low, high, size=rotated.shape) @ vt for _ in range(references)]
    gaps, spreads = {}, {}
    for k in ks:
        observed = np.log(max(_dispersion(X, _ward_labels(X, k, linkage, seed)), 1e-300))
        expected = np.array([np.log(max(_dispersion(R, _ward_labels(R, k, linkage, seed)), 1e-300)) for R in samples])
        gaps[k] = float(expected.mean() - observed)
        spreads[k] = float(expected.std() * np.sqrt(1 + 1 / references))
    ordered = sorted(ks)
    chosen = next((k for k, nxt in zip(ordered, ordered[1:]) if gaps[k] >= gaps[nxt] - spreads[nxt]), ordered[-1])
    return chosen, gaps


def _eigengap(X, ks, linkage, seed):
    from scipy.sparse.csgraph import laplacian
    from sklearn.neighbors import kneighbors_graph

    n = X.shape[0]
    neighbours = max(2, min(10, n - 1))
    graph = kneighbors_graph(X, neighbours, mode="connectivity", include_self=False)
    affinity = 0.5 * (graph + graph.T).toarray()
    values = np.sort(np.linalg.eigvalsh(laplacian(affinity, normed=True)))
    scores = {k: float(values[k] - values[k - 1]) for k in ks if k < n}
    return max(scores, key=lambda k: (scores[k], -k)), scores


def _stability(X, ks, linkage, seed, rounds: int = 10, share: float = 0.8):
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    n = X.shape[0]
    subsets = [np.sort(rng.choice(n, size=max(3, int(share * n)), replace=False)) for _ in range(rounds)]
    scores = {}
    for k in ks:
        full = _ward_labels(X, k, linkage, seed)
        values = [
            adjusted_rand_score(full[idx], _ward_labels(X[idx], k, linkage, seed))
            for idx in subsets
            if k <= len(idx) - 1
        ]
        scores[k] = float(np.mean(values)) if values else float("nan")
    return max(ks, key=lambda k: (scores[k], k)), scores


#: criterion name -> function (X, candidates, linkage, seed) -> (chosen, {k: score})
CRITERIA: dict[str, Callable] = {
    "silhouette": _silhouette,
    "silhouette_cosine": _silhouette_cosine,
    "calinski_harabasz": _calinski_harabasz,
    "davies_bouldin": _davies_bouldin,
    "ward_gap": _ward_gap,
    "gap": _gap,
    "eigengap": _eigengap,
    "stability": _stability,
}


def candidates_for(n_images: int, max_clusters: int = 10) -> list[int]:
    """The numbers of clusters tried for ``n_images``: 2 .. min(max_clusters, n - 1)."""
    return list(range(2, min(int(max_clusters), n_images - 1) + 1))


def choose_n_clusters(
    X,
    candidates: Iterable[int] | None = None,
    linkage: str = "ward",
    seed: int = 0,
    criterion: str = DEFAULT_CRITERION,
) -> tuple[int, dict[int, float]]:
    """The number of clusters ``criterion`` picks among ``candidates`` (default 2 to
    min(10, n - 1)), and its score at each candidate. Uses no label."""
    X = check_embeddings(X, name="X (image embeddings)").astype(np.float64)
    n = X.shape[0]
    if n < 3:
        raise ParameterError(f"choosing the number of clusters needs at least 3 images, got {n}: pass n_clusters")
    if criterion not in CRITERIA:
        raise ParameterError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    values = sorted({int(k) for k in (candidates if candidates is not None else candidates_for(n))})
    usable = [k for k in values if 2 <= k <= n - 1]
    if not usable:
        raise ParameterError(f"no candidate number of clusters in 2..{n - 1} (n - 1) among {values}")
    chosen, scores = CRITERIA[criterion](X, usable, linkage, seed)
    return int(chosen), {int(k): float(v) for k, v in scores.items()}


def criteria_table(X, candidates: Iterable[int] | None = None, linkage: str = "ward", seed: int = 0) -> dict[str, dict]:
    """Every criterion's choice and curve: ``{name: {"chosen": k, "scores": {k: score}}}``."""
    table = {}
    for name in CRITERIA:
        chosen, scores = choose_n_clusters(X, candidates, linkage, seed, criterion=name)
        table[name] = {"chosen": chosen, "scores": scores}
    return table
