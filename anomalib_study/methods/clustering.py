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
number of clusters is given, or chosen without labels by ``n_clusters_criterion``
(:mod:`anomalib_study.methods.n_clusters` compares the criteria).

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
from typing import Sequence

import numpy as np
import torch

from anomalib_study.checks import check_int, check_is_fitted, fraction_up_to_one, odd_positive_int, positive_int
from anomalib_study.errors import ParameterError
from anomalib_study.hardware import PRECISIONS
from anomalib_study.methods.base import BaseDetector, Method, MethodParam, Param
from anomalib_study.methods.clustering_steps import (
    LINKAGES,
    MODES,
    MULTI_TAU_FACTORS,
    as_bags,
    cluster_embeddings,
    effective_share,
    label_free_tau,
    multi_tau_embeddings,
    patch_weights,
    semi_supervised_patch_scores,
    unsupervised_is_exact,
    unsupervised_patch_scores,
    weighted_embeddings,
)
from anomalib_study.methods.n_clusters import CRITERIA, DEFAULT_CRITERION, candidates_for, choose_n_clusters
from anomalib_study.methods.patch_images import PatchImages

__all__ = [
    "AnomalyClustering",
    "LINKAGES",
    "MODES",
    "choose_n_clusters",
    "cluster_embeddings",
    "TAU_FACTORS",
    "effective_share",
    "label_free_tau",
    "MULTI_TAU_FACTORS",
    "multi_tau_embeddings",
    "patch_weights",
    "TAU_RULES",
    "unsupervised_is_exact",
    "semi_supervised_patch_scores",
    "unsupervised_patch_scores",
    "weighted_embeddings",
]


#: the label-free rules for tau (see :class:`AnomalyClustering`'s ``tau_rule``)
TAU_RULES = ("single", "multi")


# ------------------------------------------------------------------------------ the estimator
class AnomalyClustering(PatchImages, BaseDetector):
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
    ``tau_rule_`` (a sentence), ``n_clusters_``, ``n_clusters_rule_``, ``n_clusters_scores_``
    ({k: the criterion's score} when chosen, else None), ``grid_shape_``, ``timings_`` (seconds per stage).
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
    tau_rule = Param(
        "single",
        "label-free tau when tau is not given: 'single' = the one tau at which the median image's weights "
        "spread over weight_share of its patches; 'multi' = the embeddings at five taus around it "
        "(weight_share x 0.3 .. x 3) concatenated",
        cli=str,
        choices=TAU_RULES,
        metavar="RULE",
    )
    weight_share = Param(
        0.1, "label-free tau: share of its patches the median image's weights spread over, in (0, 1)", cli=float
    )
    linkage = Param("ward", "clustering algorithm", cli=str, choices=LINKAGES)
    n_clusters = Param(
        None,
        "number of clusters (None: evaluate uses as many as the protocol's classes; cluster "
        "chooses it with n_clusters_criterion over 2..max_clusters)",
        cli=positive_int,
        metavar="K",
    )
    n_clusters_criterion = Param(
        DEFAULT_CRITERION,
        "label-free criterion that chooses the number of clusters when it is not given",
        cli=str,
        choices=tuple(CRITERIA),
        metavar="NAME",
    )
    max_clusters = Param(10, "largest number of clusters tried when choosing it", cli=positive_int, metavar="K")
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
    index = Param(
        "Flat", "faiss factory string of the semi-supervised search (Flat = exact)", cli=str, metavar="FACTORY"
    )
    seed = Param(
        0, "seed of the references, projection, coreset and clustering", cli=int, flag="--model-seed", metavar="SEED"
    )
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

    def extract(
        self, paths: Sequence[str | os.PathLike], desc: str = "patch features", errors: dict[int, str] | None = None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch embeddings of image files: ``(Z (n, P, D) float32, grid (h, w))``; with
        ``errors`` unreadable images are skipped (NaN rows, position -> reason recorded)."""
        self._validate_params()
        return self.collect_patches(paths, desc, errors=errors)

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
            Z_normal = as_bags(Z_normal, name="Z_normal")
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
        Z = as_bags(Z)
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
        self.taus_ = None
        if self.patch_scores_ is not None and tau is None and self.tau_rule == "multi":
            self.embeddings_, self.taus_ = multi_tau_embeddings(self._Z, self.patch_scores_, self.weight_share)
            self.tau_rule_ = (
                f"label-free multi-tau rule: the embeddings at the {len(self.taus_)} taus at which the median "
                f"image's weights spread over "
                + ", ".join(f"{self.weight_share * f:.0%}" for f in MULTI_TAU_FACTORS)
                + f" of its patches, concatenated (taus {', '.join(f'{t:.3g}' for t in self.taus_)}); "
                f"weights shown at the middle one, tau = {self.tau_:.4g}"
            )
        else:
            self.embeddings_ = weighted_embeddings(self._Z, self.weights_)
        self.timings_["weights_s"] = time.perf_counter() - started
        started = time.perf_counter()
        self.n_clusters_scores_ = None
        if n_clusters is None:
            candidates = candidates_for(self.embeddings_.shape[0], self.max_clusters)
            chosen, self.n_clusters_scores_ = choose_n_clusters(
                self.embeddings_, candidates, linkage=linkage, seed=self.seed, criterion=self.n_clusters_criterion
            )
            self.n_clusters_ = int(chosen)
            self.n_clusters_rule_ = (
                f"chosen without labels: {self.n_clusters_criterion} over {candidates[0]}..{candidates[-1]} "
                f"clusters ({self.n_clusters_scores_[chosen]:.3g} at {chosen})"
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
                "tau_rule",
                "weight_share",
                "linkage",
                "n_clusters",
                "n_clusters_criterion",
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
            "taus": None if self.taus_ is None else [float(t) for t in self.taus_],
            "tau_rule": self.tau_rule_,
            "n_clusters": int(self.n_clusters_),
            "n_clusters_rule": self.n_clusters_rule_,
            # the criterion that chose the number of clusters, and its score per candidate (None: given)
            "n_clusters_criterion": self.n_clusters_criterion,
            "n_clusters_scores": None
            if self.n_clusters_scores_ is None
            else {int(k): float(v) for k, v in self.n_clusters_scores_.items()},
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
            "patch_cache": self.patch_cache_used(),
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


def _comma_list(text: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ParameterError(f"expected a comma-separated list, got {text!r}")
    return items


class AnomalyClusteringMethod(Method):
    """Anomaly clustering as the study runs it: every mode of ``modes`` on the same patch
    features, with the labels at other values of tau."""

    name = "clustering"
    label = "Anomaly clustering"
    estimator = AnomalyClustering
    description = (
        "anomaly clustering (Sohn et al., WACV 2023): patch-weighted image embeddings grouped into anomaly types"
    )
    task = "clustering"
    extra_params = (
        MethodParam(
            "modes",
            None,
            "patch-score modes compared (comma-separated; default all the data allows: "
            "unsupervised, semi_supervised when there are normal images, average)",
            _comma_list,
        ),
    )

    def cluster_images(self, backbone, paths, normal_paths, params: dict, run, n_clusters: int | None) -> dict:
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
        extractor = make(modes[0])
        Z, grid = extractor.extract(paths, desc="anomaly clustering: patch features")
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
            # every mode clusters the patch features extracted above: their cache use is each mode's too
            description["patch_cache"] = {**extractor.patch_cache_used(), **description["patch_cache"]}
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
                            "labels": model.recluster(tau=value).copy(),  # one tau each, the multi-tau rule's too
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

    def needs_normal_images(self, params):
        return "semi_supervised" in (params.get("modes") or ())

    def validate(self, params: dict) -> None:
        _modes(params, True)
        if params.get("n_clusters") is not None:
            check_int("n_clusters", params["n_clusters"], minimum=1)
        AnomalyClustering(**{k: params[k] for k in _ESTIMATOR_PARAMS})._validate_params()


SPEC = AnomalyClusteringMethod()
