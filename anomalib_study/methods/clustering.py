"""Anomaly clustering (Sohn et al., "Anomaly Clustering: Grouping Images into Coherent Clusters
of Anomaly Types", WACV 2023, and its public DINO ViT reproduction): group anomalous images
into defect types.

Each image i is a bag of patch embeddings Z_i (P, D): the locally aware patch features
PatchCore uses (:class:`~anomalib_study.patches.PatchFeatures`: two mid-level stages of a
CNN, or the patch tokens of two ViT blocks). Each patch p gets a score s_ip
(:data:`MODES`):

- ``"unsupervised"``: the mean, over every *other* image j, of the distance from p to its
  nearest patch in j (:func:`unsupervised_patch_scores`; an image never matches itself);
- ``"semi_supervised"``: the distance from p to its nearest patch among the normal
  training images (a memory bank, optionally coreset-reduced with PatchCore's greedy
  sampler, searched with :class:`~anomalib_study.search.NearestNeighbourIndex`);
- ``"average"``: no score, uniform weights.

The weights alpha_i = softmax(s_i / tau) over the patches of image i (tau = 0: all weight
on the highest-scoring patch, ties shared: :func:`patch_weights`), the image embedding
x_i = sum_p alpha_ip Z_ip (:func:`weighted_embeddings`), and the images are clustered on
the x_i (:func:`cluster_embeddings`: agglomerative Ward by default, as the reproduction).

tau is chosen without labels by :func:`label_free_tau`: the one tau of a data set at which
the weights of the median image are spread over ``weight_share`` of its patches (their
effective number 1 / sum alpha^2 = weight_share * P; default 10 %): a rule fixed in
advance, scale-free (distances of any backbone), and blind to the defect types. The
number of clusters is given, or chosen by the silhouette (:func:`choose_n_clusters`).

Cost: the unsupervised score is N^2 x P^2 distance evaluations. They are computed in
blocks through BLAS (a block of images against a block of images, never a full
patch-by-patch matrix in memory), each block once for both directions (the row minima
give i's patches against j, the column minima j's against i). Cheaper options, each
measured against the exact result in ``benchmarks/bench_clustering.py``: a seeded random
subset of ``n_references`` reference images, a random projection of the patch features
to ``distance_dim`` dimensions for the distances only, and bf16 matrix products
(``precision``; ``"auto"`` uses them only where the CPU or GPU has native bf16).

:class:`AnomalyClustering` is the estimator: ``fit`` on normal images (the memory bank of
the semi-supervised mode; nothing to learn for the others), ``fit_predict`` on the images
to group, with ``patch_scores_``, ``weights_``, ``embeddings_``, ``tau_`` and
``n_clusters_`` after it; ``*_paths`` variants take image files. Everything here is
label-free: :func:`anomalib_study.metrics.clustering_metrics` scores a clustering
against defect types, and ``evaluate`` applies the evaluation protocol.
"""

from __future__ import annotations

import math
import os
import time
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from anomalib_study.checks import check_int, check_is_fitted, fraction_up_to_one, odd_positive_int, positive_int
from anomalib_study.errors import ParameterError
from anomalib_study.hardware import PRECISIONS
from anomalib_study.methods.base import BaseDetector, Param, check_embeddings, check_patches

__all__ = [
    "AnomalyClustering",
    "LINKAGES",
    "MODES",
    "choose_n_clusters",
    "cluster_embeddings",
    "TAU_FACTORS",
    "effective_share",
    "label_free_tau",
    "patch_weights",
    "unsupervised_is_exact",
    "semi_supervised_patch_scores",
    "unsupervised_patch_scores",
    "weighted_embeddings",
]

#: patch-score modes: the paper's two, and uniform weights
MODES = ("unsupervised", "semi_supervised", "average")
#: rows of one side of a distance block: (rows x rows) float32 = 256 MiB at 8192
_BLOCK_ROWS = 8192

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
        labels = SpectralClustering(
            n_clusters=n_clusters,
            affinity="nearest_neighbors",
            n_neighbors=neighbours,
            random_state=seed,
            assign_labels="cluster_qr",
        ).fit_predict(X)
    else:
        labels = AgglomerativeClustering(n_clusters=n_clusters, linkage=linkage).fit_predict(X)
    _, first = np.unique(labels, return_index=True)
    order = {int(labels[i]): rank for rank, i in enumerate(sorted(first))}
    return np.array([order[int(v)] for v in labels], dtype=np.int64)


def choose_n_clusters(
    X, candidates: Iterable[int] | None = None, linkage: str = "ward", seed: int = 0
) -> tuple[int, dict[int, float]]:
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


# ------------------------------------------------------------------------------ patch scores
def _as_bags(Z, name: str = "Z") -> torch.Tensor:
    """(n, P, D) float32 tensor of patch embeddings, checked (PatchCore's shape check, and finite)."""
    array = torch.from_numpy(np.ascontiguousarray(check_patches(Z, name)))
    if not torch.isfinite(array).all():
        bad = torch.nonzero(~torch.isfinite(array).reshape(array.shape[0], -1).all(dim=1)).flatten().tolist()
        raise ParameterError(
            f"{name} has NaN or infinite values in {len(bad)} image(s) (first: image {bad[0]}): "
            "leave unreadable images out"
        )
    return array.contiguous()


def _project(Z: torch.Tensor, distance_dim: int | None, seed: int) -> torch.Tensor:
    """Z @ W with W ~ N(0, 1/d) (D, d), seeded: distances kept in expectation (Johnson-Lindenstrauss)."""
    d = Z.shape[-1]
    if distance_dim is None or distance_dim >= d:
        return Z
    generator = torch.Generator().manual_seed(int(seed))
    weights = torch.randn(d, int(distance_dim), generator=generator) / math.sqrt(distance_dim)
    return Z @ weights


def _nearest_distances(
    A: torch.Tensor, a_norms: torch.Tensor, B: torch.Tensor, b_norms: torch.Tensor, P: int, bf16: bool, both: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks of images A (ca*P, d) and B (cb*P, d): for each patch of each A image its distance
    to the nearest patch of each B image, (ca, P, cb); with ``both`` also B's patches against
    each A image, (ca, cb, P). One matrix product, never more than (ca*P) x (cb*P) floats."""
    if bf16:
        products = (A.to(torch.bfloat16) @ B.to(torch.bfloat16).T).float()
        block = products.mul_(-2.0).add_(b_norms[None, :])
    else:
        block = torch.addmm(b_norms[None, :], A, B.T, alpha=-2.0)  # |b|^2 - 2ab
    ca, cb = A.shape[0] // P, B.shape[0] // P
    if not both:  # |a|^2 is constant along each row: added after the minimum, on (ca, P, cb) values only
        rows = block.view(ca, P, cb, P).amin(dim=3).add_(a_norms.view(ca, P, 1))
        return rows.clamp_(min=0).sqrt_(), None
    block.add_(a_norms[:, None])
    block = block.view(ca, P, cb, P)
    rows = block.amin(dim=3).clamp_(min=0).sqrt_()
    cols = block.amin(dim=1).clamp_(min=0).sqrt_()
    return rows, cols


def unsupervised_patch_scores(
    Z,
    *,
    n_references: int | None = None,
    distance_dim: int | None = None,
    precision: str = "fp32",
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """The unsupervised patch scores (n, P) float32 of the images' patch embeddings ``Z`` (n, P, D).

    Patch p of image i scores the mean, over the reference images j != i, of the Euclidean
    distance from p to its nearest patch of j (the paper's and the reproduction's
    definition). References: every image (exact; ``n_references`` None, or at least half the
    images, where a subset would cost as much as the exact computation, which does each
    pair of images once) or a seeded random subset of ``n_references`` images (i's own image
    is left out of its mean when it is one of them). :func:`unsupervised_is_exact` says which.
    ``distance_dim``: compute the distances after a seeded Gaussian random
    projection to that many dimensions (None = exact). ``precision``: ``"bf16"`` matrix
    products (norms and minima in float32), ``"auto"`` = bf16 where native.

    Blocks of ``8192 // P`` images against blocks of as many, each pair of blocks once (both
    directions from one product): memory O(block^2), never (nP)^2.
    """
    from anomalib_study.backbones import resolve_device
    from anomalib_study.hardware import resolve_precision

    Z = _as_bags(Z)
    n, P, _ = Z.shape
    if n < 2:
        raise ParameterError(
            f"the unsupervised patch score compares each image with the others: it needs at least 2 images, got {n}"
        )
    if n_references is not None:
        n_references = check_int("n_references", n_references, minimum=1)
    if distance_dim is not None:
        distance_dim = check_int("distance_dim", distance_dim, minimum=1)
    bf16 = resolve_precision(precision, device) == "bf16"
    torch_device = resolve_device(device)
    block = max(1, _BLOCK_ROWS // P)
    with torch.inference_mode():
        X = _project(Z, distance_dim, seed).to(torch_device)
        flat = X.reshape(n * P, -1)
        # distances do not change under a shift: centring keeps |a|^2 + |b|^2 - 2ab from cancelling
        # (ReLU features sit far from the origin), in float32 and above all in bf16
        flat = flat - flat.mean(dim=0, keepdim=True)
        if bf16:  # the norms of the values the bf16 products see
            flat = flat.to(torch.bfloat16).float()
        norms = (flat * flat).sum(dim=1)
        sums = torch.zeros(n, P, dtype=torch.float64, device=torch_device)
        counts = torch.zeros(n, dtype=torch.float64, device=torch_device)
        if n_references is None or 2 * n_references >= n + 1:  # a subset would cost as much as exact
            starts = list(range(0, n, block))
            pairs = [(a, b) for ai, a in enumerate(starts) for b in starts[ai:]]
            bar = tqdm(pairs, desc=f"unsupervised patch scores ({n} images, exact)", disable=not progress, unit="block")
            for a, b in bar:
                ia, ib = slice(a * P, min(n, a + block) * P), slice(b * P, min(n, b + block) * P)
                rows, cols = _nearest_distances(flat[ia], norms[ia], flat[ib], norms[ib], P, bf16, both=a != b)
                if a == b:  # the diagonal block holds (i, j) and (j, i): its row minima cover both
                    k = rows.shape[0]
                    rows[torch.arange(k), :, torch.arange(k)] = 0.0
                    sums[a : a + k] += rows.sum(dim=2, dtype=torch.float64)
                else:
                    sums[a : a + rows.shape[0]] += rows.sum(dim=2, dtype=torch.float64)
                    sums[b : b + cols.shape[1]] += cols.sum(dim=0, dtype=torch.float64)
            counts[:] = n - 1
        else:
            rng = np.random.default_rng(seed)
            refs = np.sort(rng.choice(n, size=n_references, replace=False))
            ref_rows = torch.from_numpy((refs[:, None] * P + np.arange(P)[None, :]).reshape(-1)).to(torch_device)
            R, R_norms = flat[ref_rows], norms[ref_rows]
            refs_t = torch.from_numpy(refs).to(torch_device)
            pairs = [(a, b) for a in range(0, n, block) for b in range(0, n_references, block)]
            bar = tqdm(
                pairs,
                desc=f"unsupervised patch scores ({n} images, {n_references} references)",
                disable=not progress,
                unit="block",
            )
            for a, b in bar:
                ia = slice(a * P, min(n, a + block) * P)
                ib = slice(b * P, min(n_references, b + block) * P)
                rows, _ = _nearest_distances(flat[ia], norms[ia], R[ib], R_norms[ib], P, bf16, both=False)
                own = (
                    torch.arange(a, a + rows.shape[0], device=torch_device)[:, None]
                    == refs_t[b : b + rows.shape[2]][None, :]
                )
                rows.masked_fill_(own[:, None, :], 0.0)
                sums[a : a + rows.shape[0]] += rows.sum(dim=2, dtype=torch.float64)
                counts[a : a + rows.shape[0]] += (~own).sum(dim=1).to(torch.float64)
        if bool((counts == 0).any()):
            raise ParameterError("n_references=1 leaves the reference image with no other image: use n_references >= 2")
        return (sums / counts[:, None]).float().cpu().numpy()


def unsupervised_is_exact(n_images: int, n_references: int | None) -> bool:
    """Whether :func:`unsupervised_patch_scores` compares every image with all the others."""
    return n_references is None or 2 * n_references >= n_images + 1


def semi_supervised_patch_scores(
    Z, bank, *, index: str = "Flat", device: str = "cpu", chunk_patches: int = 65536
) -> np.ndarray:
    """The semi-supervised patch scores (n, P) float32: the Euclidean distance from each patch
    of ``Z`` (n, P, D) to its nearest row of the normal patches ``bank``: an (M, D) array
    (searched with :class:`~anomalib_study.search.NearestNeighbourIndex` of factory
    ``index``, ``"Flat"`` = exact) or such an index already fitted."""
    from anomalib_study.search import NearestNeighbourIndex

    Z = _as_bags(Z)
    n, P, D = Z.shape
    if isinstance(bank, NearestNeighbourIndex):
        searcher = bank
    else:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or bank.shape[1] != D:
            raise ParameterError(
                f"the bank of normal patches has shape {bank.shape}, but Z has {D} features per "
                "patch: use the same backbone and patch settings"
            )
        searcher = NearestNeighbourIndex(factory=index, device=device).fit(bank)
    if searcher.dim_ != D:
        raise ParameterError(
            f"Z has {D} features per patch but the normal images had {searcher.dim_}: use the "
            "same backbone and patch settings"
        )
    flat = Z.reshape(n * P, D).numpy()
    out = np.empty(n * P, dtype=np.float32)
    for start in range(0, n * P, chunk_patches):
        out[start : start + chunk_patches] = searcher.search(flat[start : start + chunk_patches], 1)[0][:, 0]
    if not np.isfinite(out).all():
        raise ParameterError(
            f"index {searcher.factory!r} found no neighbour for some patches: use index='Flat' "
            "or an IVF index with more points per list"
        )
    return out.reshape(n, P)


# ------------------------------------------------------------------------- weights and tau
def patch_weights(scores, tau: float) -> np.ndarray:
    """alpha (n, P) float64: softmax(scores_i / tau) over the patches of each image i.

    ``tau = 0``: all weight on the highest-scoring patch (ties share it equally);
    ``tau = inf``: uniform weights. Each row sums to 1.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape:
        raise ParameterError(f"scores must be (n_images, n_patches), got shape {s.shape}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating)) or not tau >= 0:
        raise ParameterError(f"tau must be a number >= 0 (0 = the top patch only), got {tau!r}")
    if tau == 0:
        top = (s == s.max(axis=1, keepdims=True)).astype(np.float64)
        return top / top.sum(axis=1, keepdims=True)
    if math.isinf(tau):
        return np.full(s.shape, 1.0 / s.shape[1])
    z = (s - s.max(axis=1, keepdims=True)) / float(tau)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def effective_share(weights) -> np.ndarray:
    """(n,) the effective number of patches of each image's weights, 1 / sum alpha^2, as a
    share of its P patches (1 = uniform, 1/P = one patch)."""
    w = np.asarray(weights, dtype=np.float64)
    return 1.0 / (w * w).sum(axis=1) / w.shape[1]


def label_free_tau(scores, weight_share: float = 0.1) -> float:
    """The tau at which the median image's weights spread over ``weight_share`` of its patches.

    ``weight_share`` in (0, 1): the median over images of :func:`effective_share` of
    :func:`patch_weights` (scores, tau) equals it (found by bisection on log tau; it grows
    with tau). Scale-free: multiplying the scores by c multiplies tau by c. Uses no label.
    Images whose scores are constant are left out of the median (every tau gives them
    uniform weights). Returns 0.0 when every image's scores are constant.
    """
    s = np.asarray(scores, dtype=np.float64)
    if isinstance(weight_share, bool) or not isinstance(weight_share, (int, float)) or not 0 < weight_share < 1:
        raise ParameterError(
            f"weight_share must be in (0, 1) (e.g. 0.1 = a tenth of the patches), got {weight_share!r}"
        )
    if s.ndim != 2 or s.shape[1] == 1:
        return 0.0
    stds = s.std(axis=1)
    varied = stds > 0
    if not varied.any():  # every image's scores are constant: any tau gives uniform weights
        return 0.0
    s = s[varied]  # constant images get uniform weights at any tau: they do not choose it
    spread = float(np.median(stds[varied]))
    target = max(float(weight_share), 1.0 / s.shape[1])

    def share(log_tau: float) -> float:
        return float(np.median(effective_share(patch_weights(s, math.exp(log_tau)))))

    low, high = math.log(spread * 1e-4), math.log(spread * 1e4)
    for _ in range(60):
        middle = 0.5 * (low + high)
        if share(middle) < target:
            low = middle
        else:
            high = middle
    return float(math.exp(0.5 * (low + high)))


def weighted_embeddings(Z, weights) -> np.ndarray:
    """x_i = sum_p alpha_ip Z_ip: (n, D) float32 image embeddings from ``Z`` (n, P, D) and ``weights`` (n, P)."""
    Z = _as_bags(Z)
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != tuple(Z.shape[:2]):
        raise ParameterError(f"weights of shape {w.shape} do not match Z's (n_images, n_patches) {tuple(Z.shape[:2])}")
    return torch.einsum("np,npd->nd", torch.from_numpy(np.ascontiguousarray(w)), Z).numpy()


# ------------------------------------------------------------------------------ the estimator
class AnomalyClustering(BaseDetector):
    """Group images into anomaly types (see the module docstring for the method).

    ``n_references`` bounds the unsupervised cost: each image is compared with a seeded
    random subset of that many images (default 100: exact up to 101 images; None = every
    other image, exact at any size), so it grows as n x n_references instead of n^2 / 2
    (``benchmarks/bench_clustering.py`` measures both, and the NMI of each). The
    semi-supervised memory bank keeps every normal patch by default (exact, as the
    reproduction; on a few hundred images the exact search is faster than the greedy
    selection, which pays off on larger sets).

    Attributes after :meth:`fit`: ``index_`` (the semi-supervised memory bank, a
    :class:`~anomalib_study.search.NearestNeighbourIndex`; else None), ``bank_shape_`` (M, D),
    ``n_normal_images_``. After :meth:`fit_predict`: ``labels_`` (n,), ``patch_scores_``
    (n, P) (None for ``average``), ``weights_`` (n, P), ``embeddings_`` (n, D), ``tau_``,
    ``tau_rule_`` (a sentence), ``n_clusters_``, ``n_clusters_rule_``, ``silhouette_``
    ({k: score} when chosen), ``grid_shape_``, ``timings_`` (seconds per stage).
    """

    backbone = Param(
        "efficientnet_lite0",
        "registered backbone name, or a loaded Backbone (only the *_paths methods use it)",
        kind="input",
    )
    weights = Param(None, "explicit weight file for a backbone given by name", kind="input")
    image_size = Param(None, "input side for a backbone given by name (None = its default)", kind="input")
    resize_mode = Param("crop", "crop or squash (keep gives each image shape its own grid: refused)", kind="input")
    layers = Param(None, "backbone stages or ViT blocks of the patch embeddings (None: two mid-level)")
    patch_size = Param(3, "neighbourhood side of the patch embeddings", cli=odd_positive_int)
    per_layer_dim = Param(None, "channels each stage is pooled to (None: native)")
    target_dim = Param(None, "dimension of the patch embedding (None: the stages' sum)")
    mode = Param(
        "unsupervised",
        "unsupervised, semi_supervised (needs fit on normal images) or average",
        choices=MODES,
        offered=False,
    )
    tau = Param(
        None,
        "softmax temperature of the patch weights (0 = top patch only; None: the label-free rule with weight_share)",
        cli=float,
    )
    weight_share = Param(
        0.1, "label-free tau: share of its patches the median image's weights spread over, in (0, 1)", cli=float
    )
    linkage = Param("ward", "clustering algorithm", cli=str, choices=LINKAGES)
    n_clusters = Param(
        None,
        "number of clusters (None: evaluate uses as many as the protocol's classes; cluster "
        "chooses by the silhouette over 2..max_clusters)",
        cli=positive_int,
    )
    max_clusters = Param(10, "largest number of clusters tried when choosing it", cli=positive_int)
    n_references = Param(
        100, "unsupervised: reference images per image (None, or >= the images: all of them, exact)", cli=positive_int
    )
    distance_dim = Param(None, "unsupervised: random projection of the distances (None: exact)", cli=positive_int)
    precision = Param(
        "fp32", "unsupervised distance products: fp32, bf16 or auto (bf16 where native)", cli=str, choices=PRECISIONS
    )
    coreset_ratio = Param(
        1.0,
        "semi-supervised: share of normal patches kept in the memory bank (1 = all, exact, "
        "the reproduction's choice; < 1: PatchCore's greedy coreset)",
        cli=fraction_up_to_one,
    )
    projection_dim = Param(128, "semi-supervised: random projection of the greedy coreset")
    index = Param("Flat", "faiss factory string of the semi-supervised search (Flat = exact)", cli=str)
    seed = Param(0, "seed of the references, projection, coreset and clustering", cli=int, flag="--model-seed")
    batch_size = Param(16, "images per forward pass of the backbone", kind="run")
    num_workers = Param(0, "image-decoding worker processes", kind="run")
    device = Param("cpu", "cpu or cuda[:N]", kind="run")
    progress = Param(True, "progress bars", kind="run")

    # ------------------------------------------------------------------ checks
    def _validate_params(self) -> None:
        from anomalib_study.backbones import RESIZE_MODES
        from anomalib_study.methods.coreset import GreedyCoresetSampler
        from anomalib_study.patches import patch_features

        self._check_declared()
        if self.mode not in MODES:
            raise ParameterError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.linkage not in LINKAGES:
            raise ParameterError(f"linkage must be one of {', '.join(LINKAGES)}, got {self.linkage!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ParameterError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.resize_mode == "keep":  # the bags are one (n, P, D) array: P must be one number
            raise ParameterError(
                "resize_mode='keep' gives every image shape its own patch grid, and anomaly clustering "
                "needs one (n, P, D) array of patch bags: use resize_mode='squash' (nothing cut off) "
                "or 'crop'"
            )
        if self.precision not in PRECISIONS:
            raise ParameterError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.tau is not None:
            patch_weights(np.zeros((1, 1)), self.tau)
        label_free_tau(np.zeros((1, 2)), self.weight_share)
        if self.n_clusters is not None:
            check_int("n_clusters", self.n_clusters, minimum=1)
        check_int("max_clusters", self.max_clusters, minimum=2)
        for name in ("n_references", "distance_dim"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=2 if name == "n_references" else 1)
        check_int("seed", self.seed)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        if not isinstance(self.index, str) or not self.index.strip():
            raise ParameterError(f"index must be a faiss factory string such as 'Flat', got {self.index!r}")
        patch_features([torch.zeros(1, 1, 1, 1)], self.patch_size, self.per_layer_dim, self.target_dim)
        GreedyCoresetSampler(self.coreset_ratio, self.projection_dim, self.seed)._check()

    def _patch_maker(self):
        from anomalib_study.patches import PatchFeatures

        return PatchFeatures(self.layers, self.patch_size, self.per_layer_dim, self.target_dim)

    def get_backbone(self):
        """The backbone object (loaded from its name the first time)."""
        from anomalib_study.backbones import Backbone, load_backbone

        if getattr(self, "_backbone_module", None) is None:
            if isinstance(self.backbone, Backbone):
                self._backbone_module = self.backbone
            elif isinstance(self.backbone, str):
                self._backbone_module = load_backbone(
                    self.backbone,
                    weights=self.weights,
                    device=self.device,
                    image_size=self.image_size,
                    resize_mode=self.resize_mode,
                )
            else:
                raise ParameterError(f"backbone must be a registered name or a loaded Backbone, got {self.backbone!r}")
        return self._backbone_module

    def extract(
        self, paths: Sequence[str | os.PathLike], desc: str = "patch features", errors: dict[int, str] | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch embeddings of image files: ``(Z (n, P, D) float32, grid (h, w))``; with
        ``errors`` unreadable images are skipped (NaN rows, position -> reason recorded)."""
        from anomalib_study.patches import collect_patch_features

        self._validate_params()
        return collect_patch_features(
            self.get_backbone(),
            list(paths),
            self._patch_maker(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            progress=self.progress,
            desc=desc,
            errors=errors,
        )

    # ------------------------------------------------------------------ fitting
    def fit(self, Z_normal=None) -> "AnomalyClustering":
        """Learn from normal images' patch embeddings ``Z_normal`` (m, P, D): the memory bank of
        the semi-supervised mode (coreset-reduced when ``coreset_ratio`` < 1). The other modes
        learn nothing (``Z_normal`` may be None). Returns self."""
        from anomalib_study.methods.coreset import GreedyCoresetSampler

        self._validate_params()
        self.timings_ = {}
        self.bank_shape_ = None
        self.index_ = None
        self.n_normal_images_ = 0
        if Z_normal is not None:
            Z_normal = _as_bags(Z_normal, name="Z_normal")
            self.n_normal_images_ = int(Z_normal.shape[0])
        if self.mode == "semi_supervised":
            if Z_normal is None:
                raise ParameterError(
                    "mode='semi_supervised' needs normal images: call fit(Z_normal) (or "
                    "fit_paths(normal_paths)) first, or use mode='unsupervised'"
                )
            from anomalib_study.search import NearestNeighbourIndex

            started = time.perf_counter()
            bank = Z_normal.reshape(-1, Z_normal.shape[-1]).numpy()  # a view: no copy at coreset_ratio=1
            if self.coreset_ratio < 1:
                keep = GreedyCoresetSampler(
                    self.coreset_ratio, self.projection_dim, self.seed, device=self.device, progress=self.progress
                ).run(bank)
                bank = np.ascontiguousarray(bank[np.sort(keep)])
            self.timings_["coreset_s"] = time.perf_counter() - started
            started = time.perf_counter()
            self.index_ = NearestNeighbourIndex(factory=self.index, device=self.device).fit(bank)
            self.bank_shape_ = tuple(int(v) for v in bank.shape)  # the index holds the bank itself
            self.timings_["index_s"] = time.perf_counter() - started
        self.fitted_ = True
        return self

    def fit_paths(self, normal_paths: Sequence[str | os.PathLike] | None = None) -> "AnomalyClustering":
        """:meth:`fit` on normal image files (needed by the semi-supervised mode only)."""
        self._validate_params()
        if self.mode != "semi_supervised" or not normal_paths:
            return self.fit(None)
        started = time.perf_counter()
        Z, _ = self.extract(normal_paths, desc="anomaly clustering: normal patch features")
        extract_s = time.perf_counter() - started
        self.fit(Z)
        self.timings_["normal_extract_s"] = extract_s
        return self

    # ------------------------------------------------------------------ grouping
    def patch_scores(self, Z) -> np.ndarray | None:
        """The patch scores (n, P) of ``Z`` under ``mode`` (None for ``"average"``)."""
        check_is_fitted(self, "fitted_")
        if self.mode == "average":
            return None
        if self.mode == "semi_supervised":
            return semi_supervised_patch_scores(Z, self.index_, device=self.device)
        return unsupervised_patch_scores(
            Z,
            n_references=self.n_references,
            distance_dim=self.distance_dim,
            precision=self.precision,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
        )

    def _resolve_tau(self, scores: np.ndarray | None, tau: float | None) -> tuple[float, str]:
        if scores is None:
            return math.inf, "average mode: uniform weights (no tau)"
        if tau is not None:
            return float(tau), f"given: tau = {tau:g}"
        value = label_free_tau(scores, self.weight_share)
        return value, (
            f"label-free rule: the tau at which the median image's weights spread over "
            f"{self.weight_share:.0%} of its patches (effective number of patches); tau = {value:.4g}"
        )

    def fit_predict(self, Z, grid_shape: tuple[int, int] | None = None) -> np.ndarray:
        """Cluster labels (n,) of the images whose patch embeddings are ``Z`` (n, P, D)."""
        check_is_fitted(self, "fitted_")
        Z = _as_bags(Z)
        n = Z.shape[0]
        if n < 2:
            raise ParameterError(f"clustering needs at least 2 images, got {n}")
        if self.n_clusters is not None and self.n_clusters > n:
            raise ParameterError(f"n_clusters={self.n_clusters} is more than the {n} images to cluster")
        if self.n_clusters is None and n < 3:
            raise ParameterError(f"choosing the number of clusters needs at least 3 images, got {n}: pass n_clusters")
        if self.bank_shape_ is not None and self.bank_shape_[1] != Z.shape[2]:
            raise ParameterError(
                f"Z has {Z.shape[2]} features per patch but the normal images had "
                f"{self.bank_shape_[1]}: use the same backbone and patch settings"
            )
        started = time.perf_counter()
        self.patch_scores_ = self.patch_scores(Z)
        self.timings_["patch_scores_s"] = time.perf_counter() - started
        self._Z = Z
        self.grid_shape_ = tuple(grid_shape) if grid_shape is not None else None
        self.labels_ = self.recluster()
        return self.labels_

    def fit_predict_paths(self, paths: Sequence[str | os.PathLike], errors: dict[int, str] | None = None) -> np.ndarray:
        """:meth:`fit_predict` on image files. With ``errors`` (a dict) unreadable images are
        left out (position -> reason recorded there, label -1; ``positions_`` lists the
        others, the rows of ``weights_`` / ``embeddings_``); without, one raises DataError."""
        started = time.perf_counter()
        Z, grid = self.extract(paths, desc="anomaly clustering: patch features", errors=errors)
        extract_s = time.perf_counter() - started
        keep = np.setdiff1d(np.arange(len(Z)), np.fromiter(errors or (), dtype=np.int64))
        labels = np.full(len(Z), -1, dtype=np.int64)
        labels[keep] = self.fit_predict(Z[keep], grid)
        self.timings_["extract_s"] = extract_s
        self.positions_ = keep
        return labels

    def recluster(
        self, tau: float | None = None, n_clusters: int | None = None, linkage: str | None = None
    ) -> np.ndarray:
        """Labels of the last :meth:`fit_predict` images with another ``tau`` / ``n_clusters`` /
        ``linkage`` (None = the estimator's), reusing their patch scores; sets the fitted
        attributes to that result."""
        check_is_fitted(self, "patch_scores_")
        tau = self.tau if tau is None else tau
        n_clusters = self.n_clusters if n_clusters is None else n_clusters
        linkage = self.linkage if linkage is None else linkage
        started = time.perf_counter()
        self.tau_, self.tau_rule_ = self._resolve_tau(self.patch_scores_, tau)
        shape = tuple(self._Z.shape[:2])
        self.weights_ = (
            np.full(shape, 1.0 / shape[1])
            if self.patch_scores_ is None
            else patch_weights(self.patch_scores_, self.tau_)
        )
        self.embeddings_ = weighted_embeddings(self._Z, self.weights_)
        self.timings_["weights_s"] = time.perf_counter() - started
        started = time.perf_counter()
        self.silhouette_ = None
        if n_clusters is None:
            n = self.embeddings_.shape[0]
            chosen, self.silhouette_ = choose_n_clusters(
                self.embeddings_, range(2, min(self.max_clusters, n - 1) + 1), linkage=linkage, seed=self.seed
            )
            self.n_clusters_ = int(chosen)
            self.n_clusters_rule_ = (
                f"chosen without labels: the highest silhouette over 2..{max(self.silhouette_)} "
                f"clusters ({self.silhouette_[chosen]:.3f} at {chosen})"
            )
        else:
            self.n_clusters_ = int(n_clusters)
            self.n_clusters_rule_ = f"given: {n_clusters}"
        self.labels_ = cluster_embeddings(self.embeddings_, self.n_clusters_, linkage=linkage, seed=self.seed)
        self.timings_["cluster_s"] = time.perf_counter() - started
        return self.labels_

    def describe(self) -> dict:
        """The settings and what was chosen, JSON-able, for reports."""
        check_is_fitted(self, "labels_")
        settings = {
            name: getattr(self, name)
            for name in (
                "mode",
                "tau",
                "weight_share",
                "linkage",
                "n_clusters",
                "max_clusters",
                "n_references",
                "distance_dim",
                "precision",
                "coreset_ratio",
                "projection_dim",
                "index",
                "seed",
                "layers",
                "patch_size",
                "per_layer_dim",
                "target_dim",
            )
        }
        return {
            "settings": settings,
            "tau": None if math.isinf(self.tau_) else float(self.tau_),
            "tau_rule": self.tau_rule_,
            "n_clusters": int(self.n_clusters_),
            "n_clusters_rule": self.n_clusters_rule_,
            "silhouette": None if self.silhouette_ is None else {str(k): v for k, v in self.silhouette_.items()},
            "n_images": int(self.labels_.size),
            "n_patches": int(self._Z.shape[1]),
            "feature_dim": int(self._Z.shape[2]),
            "grid_shape": None if self.grid_shape_ is None else list(self.grid_shape_),
            "memory_bank_size": None if self.bank_shape_ is None else self.bank_shape_[0],
            "unsupervised_exact": (
                unsupervised_is_exact(int(self.labels_.size), self.n_references)
                if self.mode == "unsupervised"
                else None
            ),
            "n_normal_images": int(self.n_normal_images_),
            "median_weight_share": float(np.median(effective_share(self.weights_))),
            "timings": dict(self.timings_),
        }


# ---------------------------------------------------------------------- the method's declaration
#: the tau curve: multiples of the label-free tau, plus 0 (top patch only) and inf (uniform)
TAU_FACTORS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, math.inf)
#: the model parameters every mode shares (the mode and the number of clusters are set per run)
_ESTIMATOR_PARAMS = tuple(
    name for name in AnomalyClustering.declared_params("model") if name not in ("mode", "n_clusters")
)


def _modes(params: dict, has_normal: bool) -> list[str]:
    modes = params.get("modes")
    if modes is None:
        return [m for m in MODES if has_normal or m != "semi_supervised"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ParameterError(f"modes must be a non-empty list of {', '.join(MODES)}, got {params.get('modes')!r}")
    return modes


def _validate(params: dict) -> None:
    _modes(params, True)
    if params.get("n_clusters") is not None:
        check_int("n_clusters", params["n_clusters"], minimum=1)
    AnomalyClustering(**{k: params[k] for k in _ESTIMATOR_PARAMS})._validate_params()


def _cluster_images(backbone, paths, normal_paths, params: dict, run, n_clusters: int | None) -> dict:
    """Every mode of ``params['modes']`` on the same patch features (extracted once)."""
    modes = _modes(params, bool(normal_paths))
    if "semi_supervised" in modes and not normal_paths:
        raise ParameterError(
            "mode semi_supervised needs normal images, and there are none: leave it out of modes "
            "(unsupervised and average need none)"
        )
    options = {k: params[k] for k in _ESTIMATOR_PARAMS}

    def make(mode: str) -> AnomalyClustering:
        return AnomalyClustering(
            backbone=backbone,
            mode=mode,
            n_clusters=n_clusters,
            **options,
            batch_size=run.batch_size,
            num_workers=run.num_workers,
            device=run.device,
            progress=run.progress,
        )

    timings: dict[str, float] = {}
    started = time.perf_counter()
    Z, grid = make(modes[0]).extract(paths, desc="anomaly clustering: patch features")
    timings["extract_s"] = time.perf_counter() - started
    Z_normal = None
    runs = []
    for mode in modes:
        model = make(mode)
        if mode == "semi_supervised":
            if Z_normal is None:
                started = time.perf_counter()
                Z_normal, _ = model.extract(normal_paths, desc="anomaly clustering: normal patch features")
                timings["normal_extract_s"] = time.perf_counter() - started
            model.fit(Z_normal)
            Z_normal = None  # the index holds its own copy
        else:
            model.fit(None)
        started = time.perf_counter()
        labels = model.fit_predict(Z, grid)
        timings[f"{mode}_s"] = time.perf_counter() - started
        timings.update({f"{mode}_{key}": value for key, value in model.timings_.items()})
        description = model.describe()
        chosen = {"weights": model.weights_, "embeddings": model.embeddings_}
        curve = []
        if model.patch_scores_ is not None:
            free_tau = model.tau_  # the label-free (or given) tau of this run
            for factor in TAU_FACTORS:
                value = free_tau * factor if math.isfinite(factor) else math.inf
                curve.append(
                    {
                        "value": None if math.isinf(value) else float(value),
                        "relative": factor if math.isfinite(factor) else "inf",
                        "labels": labels.copy() if factor == 1.0 else model.recluster(tau=value).copy(),
                    }
                )
        runs.append(
            {
                "name": mode,
                "labels": labels,
                "description": description,
                "curve": curve,
                **chosen,
                "patch_scores": model.patch_scores_,
            }
        )
    return {"runs": runs, "timings": timings, "grid": list(grid)}


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ParameterError(f"expected a comma-separated list, got {text!r}")
    return items


def _build_spec():
    from anomalib_study.methods.base import MethodParam, MethodSpec

    return MethodSpec(
        name="clustering",
        label="Anomaly clustering",
        estimator=AnomalyClustering,
        description="anomaly clustering (Sohn et al., WACV 2023): patch-weighted image embeddings grouped into "
        "anomaly types",
        task="clustering",
        extra_params=(
            MethodParam(
                "modes",
                None,
                "patch-score modes compared (comma-separated; default all the data allows: "
                "unsupervised, semi_supervised when there are normal images, average)",
                _comma_list,
            ),
        ),
        cluster_images=_cluster_images,
        needs_normal_images=lambda params: "semi_supervised" in (params.get("modes") or ()),
        validate=_validate,
    )


SPEC = _build_spec()
