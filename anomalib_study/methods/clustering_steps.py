"""The steps of anomaly clustering as functions of arrays (see
:mod:`anomalib_study.methods.clustering` for the method): patch scores (unsupervised in
BLAS blocks, semi-supervised through the search layer), patch weights and the label-free
tau, weighted image embeddings, and the clustering (the number of clusters is chosen in
:mod:`anomalib_study.methods.n_clusters`).
:class:`~anomalib_study.methods.clustering.AnomalyClustering` chains them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from anomalib_study.checks import check_int
from anomalib_study.errors import ParameterError
from anomalib_study.methods.base import check_embeddings, check_patches

__all__ = [
    "LINKAGES",
    "MODES",
    "as_bags",
    "cluster_embeddings",
    "effective_share",
    "label_free_tau",
    "multi_tau_embeddings",
    "MULTI_TAU_FACTORS",
    "patch_weights",
    "semi_supervised_patch_scores",
    "unsupervised_is_exact",
    "unsupervised_patch_scores",
    "weighted_embeddings",
]

#: the multi-tau rule's effective shares, as multiples of ``weight_share`` (0.03 .. 0.3 at 0.1):
#: a grid fixed in advance around the single-tau rule, half a decade either side
MULTI_TAU_FACTORS = (0.3, 0.5, 1.0, 2.0, 3.0)
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


# ------------------------------------------------------------------------------ patch scores
def as_bags(Z, name: str = "Z") -> torch.Tensor:
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

    Z = as_bags(Z)
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

    Z = as_bags(Z)
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
    Z = as_bags(Z)
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != tuple(Z.shape[:2]):
        raise ParameterError(f"weights of shape {w.shape} do not match Z's (n_images, n_patches) {tuple(Z.shape[:2])}")
    return torch.einsum("np,npd->nd", torch.from_numpy(np.ascontiguousarray(w)), Z).numpy()


def multi_tau_embeddings(
    Z, scores, weight_share: float = 0.1, factors=MULTI_TAU_FACTORS
) -> tuple[np.ndarray, list[float]]:
    """The multi-tau image embeddings: the weighted embeddings at several label-free taus,
    concatenated, ``(n, len(factors) * D)`` float32, and those taus.

    The taus are those at which the median image's weights spread over ``weight_share * f``
    of its patches for each f of ``factors`` (capped below 1): no single temperature has to
    be right, the clustering sees the image at a sharper and at a broader focus at once.
    Each block is divided by its mean row norm, so each temperature counts alike.
    """
    taus = [label_free_tau(scores, min(float(weight_share) * float(f), 0.95)) for f in factors]
    blocks = []
    for tau in taus:
        X = weighted_embeddings(Z, patch_weights(scores, tau))
        scale = float(np.linalg.norm(X, axis=1).mean())
        blocks.append(X / scale if scale > 0 else X)
    return np.concatenate(blocks, axis=1).astype(np.float32), taus
