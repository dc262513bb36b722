"""PatchCore: a memory bank of locally aware patch features, subsampled by a greedy coreset.

Roth, Pemula, Zepeda, Schölkopf, Brox and Gehler, "Towards Total Recall in Industrial
Anomaly Detection" (CVPR 2022); reference code amazon-science/patchcore-inspection and
anomalib's ``PatchcoreModel``.

* Training: patch features (:mod:`anomalib_study.patches`) of the normal images; the
  memory bank ``memory_bank_`` is a greedy k-centre coreset of them
  (:mod:`anomalib_study.methods.coreset`), searched through the shared faiss layer.
* Patch score: Euclidean distance of a test patch to its nearest memory-bank patch.
  Higher = more anomalous.
* Image score, both always computed in one pass:
  ``"max"``: the largest patch score s* = ||m_test* - m*||;
  ``"reweighted"`` (paper Eq. 7): s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*,
  where N_b(m*) are the b = ``num_neighbours`` memory-bank patches nearest to m* (m* included),
  computed as ``-expm1(d* - logsumexp(d))`` (no overflow for huge distances). As in anomalib,
  b = 9 by default; b = 1 (or a bank of one patch) makes it equal to "max".
* Anomaly map: the patch scores on the (h, w) grid, upsampled bilinearly to the output size
  (default the backbone's preprocessed input, e.g. 224 x 224) and smoothed with a Gaussian
  of ``sigma`` (kernel side 2 * int(4 * sigma + 0.5) + 1, reflect padding).
* ``resize_mode="keep"`` (aspect ratio kept, :func:`anomalib_study.backbones.keep_size`):
  each image has the patch grid of its own input shape. The memory bank is a set of
  patches, so grids may differ while fitting; ``grid_shape_`` is None, and each anomaly
  map comes back at its own image's preprocessed input size (a 1-D object array of
  (H_i, W_i) maps instead of one (n, H, W) array).
* Precision (``precision=``): ``"fp32"`` (default); ``"bf16"``: the backbone forward under
  ``torch.autocast(dtype=torch.bfloat16)`` (patch features, coreset and maps in float32)
  and, with the exact index ``"Flat"``, the bank search's candidate distances in bfloat16,
  re-ranked in float32 (:mod:`anomalib_study.search`: the reported nearest patch and its
  distance are the exact float32 ones wherever the candidates hold it); ``"auto"`` = bf16
  where the CPU or GPU computes it natively, else fp32. Resolved once at fit
  (``precision_used_``); scoring uses the precision of training. Approximate indexes
  (IVF, HNSW...) search as faiss does whatever the precision.
* Fewer search dimensions (``search_dim=``, exact ``"Flat"`` index only; not in the paper):
  the bank search's candidates come from the memory bank's first ``search_dim`` principal
  components (and the norm of what they leave out), and the best 8 of each patch are
  re-ranked on every feature in float32. A candidate distance is a lower bound of the exact
  one, so each patch's result is *certified* exact when its 8th candidate's bound is no
  nearer than the nearest re-ranked patch; the few patches without that certificate are
  searched again exhaustively. The scores are therefore those of the exact search (up to
  float rounding: distances are summed from the differences), whatever the candidates held;
  ``index_describe`` records how many patches needed the exhaustive search
  (``exact_fallbacks`` of ``reranked_queries``). Default 256 (MVTec AD bottle, DINOv2
  ViT-S/14, 768 dims: 0 of 2,816 test patches fell back, the search 7x faster than faiss's
  exhaustive one); features of at most 256 dims are searched exhaustively by faiss, and
  approximate indexes (IVF, HNSW...) search as faiss does. None: faiss's exhaustive search.
* Threshold (not in the paper, which only ranks): ``calibration_fraction`` of the training
  images (seeded choice) is held out of the memory bank and scored like test images;
  ``threshold_`` is the ``thres_ratio`` quantile of their image scores (so about
  ``1 - thres_ratio`` of normal images are flagged). ``calibration_fraction=0`` puts every
  training image in the bank (as the paper does); ``threshold_`` is then NaN and
  :meth:`predict` refuses to run.

Split: :meth:`PatchCore.fit` / :meth:`PatchCore.score_patches` work on patch features
(n_images, h*w, D) with no I/O; :meth:`PatchCore.fit_paths` / :meth:`PatchCore.score_paths`
run the backbone over image files batch by batch (training features go straight into one
preallocated float32 array; never a list of tensors plus a concatenation).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalib_study.checks import fraction_up_to_one, non_negative_float, odd_positive_int, open_fraction, positive_int
from anomalib_study.errors import ModelFileError, ParameterError, StudyError
from anomalib_study.hardware import PRECISIONS, resolve_precision
from anomalib_study.io import as_json
from anomalib_study.methods.base import (
    BaseDetector,
    Method,
    Param,
    RunOptions,
    check_int,
    check_is_fitted,
    check_patches,
    gaussian_kernel_size,
    load_model_file,
    save_model_file,
)
from anomalib_study.methods.coreset import COVERAGE_PRECISIONS, SAMPLERS
from anomalib_study.methods.patch_maps import anomaly_maps
from anomalib_study.methods.patchcore_images import PatchCoreImages
from anomalib_study.search import NearestNeighbourIndex

__all__ = [
    "PatchCore",
    "reweighted_image_scores",
    "anomaly_maps",
    "gaussian_kernel_size",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_SCORES",
    "SPEC",
]

FORMAT_NAME = "anomalib_study.patchcore"
FORMAT_VERSION = 1
IMAGE_SCORES = ("max", "reweighted")
_FITTED = ["memory_bank_", "index_", "grid_shape_", "threshold_", "precision_used_"]


# ---------------------------------------------------------------------------------- pure parts
def reweighted_image_scores(support_distances) -> np.ndarray:
    """Paper Eq. 7 from distances: (n, b) -> (n,) float64.

    ``support_distances[i, 0]`` is s* = ||m_test* - m*|| (the image's largest patch score)
    and ``support_distances[i, 1:]`` the distances from the same test patch to the other
    b - 1 memory-bank neighbours of m*. Returns ``(1 - softmax(row)[0]) * row[0]``,
    computed as ``-expm1(row[0] - logsumexp(row)) * row[0]``: finite for any finite
    distances (no exp overflow). Higher = more anomalous. b = 1 returns s* unchanged.
    """
    d = np.asarray(support_distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ParameterError(f"support_distances must be (n, b) with b >= 1, got shape {d.shape}")
    if d.shape[1] == 1:
        return d[:, 0].copy()
    top = d.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(d - top).sum(axis=1))
    weight = -np.expm1(d[:, 0] - lse)
    return weight * d[:, 0]


# ---------------------------------------------------------------------------------- estimator
class PatchCore(PatchCoreImages, BaseDetector):
    """PatchCore anomaly detector (see the module docstring for the method).

    Attributes (after fit): ``memory_bank_`` (M, D) float32, ``index_``
    (NearestNeighbourIndex), ``grid_shape_`` (h, w) (None under ``resize_mode="keep"``:
    each image has its own grid), ``n_features_in_`` (D),
    ``n_train_images_``, ``n_train_patches_`` (patches the coreset chose from),
    ``calibration_scores_max_`` / ``calibration_scores_reweighted_`` (n_cal,),
    ``threshold_`` (float, NaN without calibration), ``backbone_identity_`` (dict or None),
    ``timings_`` (seconds: extract_s, coreset_s, index_s, calibration_s), ``precision_used_``
    (``"fp32"`` or ``"bf16"``: what ``precision`` resolved to at fit).
    """

    _FITTED = _FITTED  # what check_is_fitted looks for (the image pipeline reads it too)

    backbone = Param(
        "efficientnet_lite0",
        "registered backbone name, or a loaded Backbone (only fit_paths / score_paths use it)",
        kind="input",
    )
    weights = Param(None, "explicit weight file for a backbone given by name", kind="input")
    image_size = Param(None, "input side for a backbone given by name (None = its default)", kind="input")
    resize_mode = Param(
        "crop",
        "crop (shorter side resized, centre crop), squash (the whole image to the square "
        "input) or keep (aspect ratio kept: per-image grids and maps)",
        kind="input",
    )
    layers = Param(None, "backbone stages of the patch features (None: two mid-level stages)")
    patch_size = Param(3, "neighbourhood side of the patch features", cli=odd_positive_int)
    per_layer_dim = Param(None, "channels each stage is pooled to (None: the paper's default)")
    target_dim = Param(None, "dimension of the patch embedding (None: the paper's default)")
    sampler = Param("greedy", "coreset sampler (random: the ablation)", cli=str, choices=tuple(sorted(SAMPLERS)))
    coreset_ratio = Param(0.1, "share of training patches kept in the memory bank", cli=fraction_up_to_one)
    projection_dim = Param(128, "random projection of the greedy coreset's distances (paper: 128)")
    coreset_precision = Param(
        "fp32",
        "type of the projected features the greedy coreset reads: fp32, bf16 or fp16 "
        "(half the bytes; the selection may differ a little)",
        cli=str,
        choices=COVERAGE_PRECISIONS,
    )
    image_score = Param(
        "reweighted",
        "image score: max patch score or the paper's Eq. 7 reweighting",
        cli=str,
        choices=IMAGE_SCORES,
        flag="--score",
    )
    num_neighbours = Param(
        9, "b of Eq. 7: bank neighbours of the nearest patch used by the reweighting", cli=positive_int
    )
    sigma = Param(4.0, "Gaussian sigma of the anomaly maps, in pixels (paper: 4)", cli=non_negative_float)
    index = Param("Flat", "faiss factory string of the bank search (Flat = exact)", cli=str, metavar="FACTORY")
    precision = Param(
        "fp32",
        "fp32, bf16 (backbone autocast; Flat search in bf16 re-ranked in fp32) or auto (bf16 "
        "where the CPU/GPU has it natively)",
        cli=str,
        choices=PRECISIONS,
    )
    search_dim = Param(
        256,
        "principal components of the bank the Flat search's candidates use, re-ranked exactly "
        "on every feature and certified (uncertified patches searched exhaustively; None: faiss's "
        "exhaustive search)",
        cli=positive_int,
    )
    thres_ratio = Param(0.99, "share of held-out normal images the threshold keeps normal", cli=open_fraction)
    calibration_fraction = Param(
        0.1,
        "share of training images held out of the bank to set the threshold (0 = none, the paper's setting)",
        cli=float,
    )
    seed = Param(0, "seed of the coreset and of the held-out choice", cli=int, flag="--model-seed", metavar="SEED")
    batch_size = Param(8, "images per forward pass of the backbone", kind="run")
    num_workers = Param(0, "image-decoding worker processes", kind="run")
    device = Param("cpu", "cpu or cuda[:N]: backbone, patch features, coreset, maps", kind="run")
    progress = Param(True, "progress bars", kind="run")

    # ------------------------------------------------------------------ checks
    def _validate_params(self) -> None:
        from anomalib_study.backbones import RESIZE_MODES

        self._check_declared()
        if self.resize_mode not in RESIZE_MODES:
            raise ParameterError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.sampler not in SAMPLERS:
            raise ParameterError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ParameterError(f"image_score must be 'max' or 'reweighted', got {self.image_score!r}")
        check_int("num_neighbours", self.num_neighbours, minimum=1)
        check_int("seed", self.seed)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("num_workers", self.num_workers, minimum=0)
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or self.sigma < 0:
            raise ParameterError(f"sigma must be a number >= 0 (0 = no smoothing), got {self.sigma!r}")
        for name in ("thres_ratio",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ParameterError(f"{name} must be in (0, 1], got {value!r}")
        value = self.calibration_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ParameterError(f"calibration_fraction must be in [0, 1) (0 = no threshold), got {value!r}")
        if not isinstance(self.index, str) or not self.index.strip():
            raise ParameterError(f"index must be a faiss factory string such as 'Flat', got {self.index!r}")
        if self.precision not in PRECISIONS:
            raise ParameterError(
                f"precision must be one of {', '.join(PRECISIONS)} (bf16: backbone forward and "
                f"bank search in bfloat16, re-ranked in float32), got {self.precision!r}"
            )
        if self.search_dim is not None:  # the exact "Flat" search only: approximate indexes search as faiss does
            check_int("search_dim", self.search_dim, minimum=1)
        from anomalib_study.patches import patch_features

        patch_features([torch.zeros(1, 1, 1, 1)], self.patch_size, self.per_layer_dim, self.target_dim)
        self._make_sampler().run(np.zeros((1, 1), np.float32))

    def _make_sampler(self):
        if self.sampler == "greedy":
            return SAMPLERS["greedy"](
                ratio=self.coreset_ratio,
                projection_dim=self.projection_dim,
                seed=self.seed,
                device=self.device,
                progress=self.progress,
                precision=self.coreset_precision,
            )
        if self.coreset_precision not in COVERAGE_PRECISIONS:  # checked here too: the random sampler ignores it
            raise ParameterError(
                f"coreset_precision must be one of {', '.join(COVERAGE_PRECISIONS)}, got {self.coreset_precision!r}"
            )
        return SAMPLERS[self.sampler](ratio=self.coreset_ratio, seed=self.seed)

    def calibration_images(self, n_images: int) -> np.ndarray:
        """Indices (sorted) of the training images held out to set ``threshold_`` (seeded)."""
        if self.calibration_fraction == 0 or n_images < 2:
            return np.zeros(0, dtype=np.int64)
        count = min(n_images - 1, max(1, int(round(self.calibration_fraction * n_images))))
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(n_images, size=count, replace=False)).astype(np.int64)

    _as_patches = staticmethod(check_patches)

    # ------------------------------------------------------------------ fit
    def fit(self, X, grid_shape: tuple[int, int] | None = None) -> "PatchCore":
        """Fit on the patch features ``X`` (n_images, h*w, D) of normal images. Returns self.

        ``grid_shape`` (h, w) defaults to a square grid. The calibration images (see
        ``calibration_fraction``) are taken out of ``X`` (one copy of the rest is made; use
        :meth:`fit_paths` to avoid it).
        """
        self._validate_params()
        X = self._as_patches(X, "X (normal patch features)")
        n, p, _ = X.shape
        held = self.calibration_images(n)
        keep = np.setdiff1d(np.arange(n), held)
        bank_part = X if held.size == 0 else X[keep]
        self._fit_arrays(
            bank_part,
            X[held],
            self._grid(grid_shape, p),
            backbone_identity=None,
            extract_s=0.0,
            precision=self._resolve_precision(),
        )
        return self

    def _resolve_precision(self) -> str:
        """``precision`` -> ``"fp32"`` / ``"bf16"`` on this model's device."""
        return resolve_precision(self.precision, self._torch_device())

    def _new_index(self, precision: str, device: str) -> NearestNeighbourIndex:
        """The bank's (unfitted) search index: ``index``'s factory, the search precision of
        ``precision``, and ``search_dim``'s candidate dimensions."""
        return NearestNeighbourIndex(
            factory=self.index,
            metric="l2",
            seed=int(self.seed),
            device=device,
            precision=self._search_precision(precision),
            candidate_dim=self.search_dim if self.index.strip() == "Flat" else None,
        )

    def _search_precision(self, precision: str) -> str:
        # the bf16 re-ranked search exists for the exact index only; approximate ones stay faiss's
        return precision if self.index.strip() == "Flat" else "fp32"

    @staticmethod
    def _grid(grid_shape, n_patches: int) -> tuple[int, int]:
        if grid_shape is None:
            side = int(round(math.sqrt(n_patches)))
            if side * side != n_patches:
                raise ParameterError(f"{n_patches} patches per image is not a square grid: pass grid_shape=(h, w)")
            return side, side
        h, w = (int(v) for v in grid_shape)
        if h * w != n_patches:
            raise ParameterError(f"grid_shape {grid_shape} does not hold {n_patches} patches per image")
        return h, w

    def _fit_arrays(
        self,
        bank_part: np.ndarray,
        calibration: np.ndarray,
        grid: tuple[int, int],
        backbone_identity: dict | None,
        extract_s: float,
        precision: str,
    ) -> None:
        n_bank, p, d = bank_part.shape
        self._fit_rows(
            bank_part.reshape(n_bank * p, d), n_bank, [calibration], grid, backbone_identity, extract_s, precision
        )

    def _fit_rows(
        self,
        rows: np.ndarray,
        n_bank: int,
        calibration: list[np.ndarray],
        grid: tuple[int, int] | None,
        backbone_identity: dict | None,
        extract_s: float,
        precision: str,
    ) -> None:
        """Fit on the bank images' patches ``rows`` (N, D); ``calibration``: the held-out
        images as a list of (n_i, p_i, D) arrays (one per patch count, in held-out order)."""
        d = rows.shape[1]
        for start in range(0, rows.shape[0], 65536):  # chunked: no boolean copy of the whole array
            if not np.isfinite(rows[start : start + 65536]).all():
                raise ParameterError("the training patch features contain NaN or infinite values")
        started = time.perf_counter()
        chosen = self._make_sampler().run(rows)
        coreset_s = time.perf_counter() - started
        bank = np.ascontiguousarray(rows[np.sort(chosen)], dtype=np.float32)
        started = time.perf_counter()
        index = self._new_index(precision, self.device).fit(bank)
        index_s = time.perf_counter() - started

        self.precision_used_ = precision
        self.memory_bank_ = bank
        self.index_ = index
        self.grid_shape_ = None if grid is None else tuple(grid)
        self.n_features_in_ = int(d)
        self.n_train_images_ = int(n_bank + sum(part.shape[0] for part in calibration))
        self.n_train_patches_ = int(rows.shape[0])
        self.backbone_identity_ = backbone_identity
        started = time.perf_counter()
        scored = [self._score_arrays(part)[1:] for part in calibration if part.shape[0]]
        if scored:
            scores_max = np.concatenate([part[0] for part in scored])
            scores_rw = np.concatenate([part[1] for part in scored])
        else:
            scores_max = scores_rw = np.zeros(0, dtype=np.float64)
        self.calibration_scores_max_ = scores_max
        self.calibration_scores_reweighted_ = scores_rw
        self.threshold_ = self._threshold()
        self.timings_ = {
            "extract_s": float(extract_s),
            "coreset_s": coreset_s,
            "index_s": index_s,
            "calibration_s": time.perf_counter() - started,
        }

    def _threshold(self) -> float:
        scores = (
            self.calibration_scores_reweighted_ if self.image_score == "reweighted" else self.calibration_scores_max_
        )
        return float(np.quantile(scores, self.thres_ratio)) if scores.size else float("nan")

    # ------------------------------------------------------------------ scoring (features)
    def _score_arrays(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n, p, d = X.shape
        distances, indices = self.index_.search(X.reshape(n * p, d), 1)
        if not np.isfinite(distances).all():
            raise ParameterError(
                f"index {self.index!r} found no neighbour for some patches: use index='Flat' "
                "or an IVF index with more points per list"
            )
        patch_scores = distances[:, 0].reshape(n, p)
        best = np.argmax(patch_scores, axis=1)
        image_max = patch_scores[np.arange(n), best].astype(np.float64)
        b = min(int(self.num_neighbours), self.index_.ntotal)
        if b < 2:
            return patch_scores, image_max, image_max.copy()
        nearest_bank = indices[:, 0].reshape(n, p)[np.arange(n), best]  # m* of each image
        test_patch = X[np.arange(n), best]  # (n, d)
        # N_b(m*): m* itself first, then its b - 1 nearest other bank patches
        _, support = self.index_.search(self.memory_bank_[nearest_bank], b)
        ordered = np.empty((n, b), dtype=np.int64)
        for i in range(n):
            others = [j for j in support[i] if j != nearest_bank[i] and j >= 0][: b - 1]
            while len(others) < b - 1:  # approximate index returned too few: repeat m* (weight only shrinks)
                others.append(nearest_bank[i])
            ordered[i] = [nearest_bank[i], *others]
        gathered = self.memory_bank_[ordered]  # (n, b, d)
        support_distances = np.sqrt(((gathered.astype(np.float64) - test_patch[:, None, :]) ** 2).sum(axis=2))
        support_distances[:, 0] = image_max  # s* as searched (same value up to rounding)
        return patch_scores, image_max, reweighted_image_scores(support_distances)

    def score_patches(self, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score patch features ``X`` (n, h*w, D) of test images.

        Returns ``(patch_scores, image_scores_max, image_scores_reweighted)``:
        (n, h*w) float32 distances to the nearest memory-bank patch (grid row-major,
        reshape to ``(n, *grid_shape_)``), and the two image scores (n,) float64.
        Higher = more anomalous everywhere.
        """
        check_is_fitted(self, _FITTED, fit_call="fit(patch_features) or fit_paths(paths)")
        grid = self.grid_shape_
        X = self._as_patches(
            X, "X", n_features=self.n_features_in_, n_patches=None if grid is None else grid[0] * grid[1]
        )
        return self._score_arrays(X)

    def score(self, X) -> np.ndarray:
        """Image anomaly scores (n,) float64 of patch features ``X`` (n, h*w, D), of the kind
        ``image_score``. Higher = more anomalous."""
        _, image_max, image_rw = self.score_patches(X)
        return image_rw if self.image_score == "reweighted" else image_max

    def predict(self, X) -> np.ndarray:
        """(n,) int: 1 = anomalous (score > threshold_), 0 = normal. Needs calibration_fraction > 0."""
        scores = self.score(X)
        self._check_threshold()
        return (scores > self.threshold_).astype(int)

    def _check_threshold(self) -> None:
        if not np.isfinite(self.threshold_):
            raise ParameterError(
                "this PatchCore has no threshold (fitted with calibration_fraction=0): "
                "refit with calibration_fraction > 0, or rank images by score()"
            )

    def anomaly_maps(self, patch_scores, size: tuple[int, int] | None = None) -> np.ndarray:
        """(n, h*w) or (n, h, w) patch scores -> (n, H, W) float32 smoothed maps (see :func:`anomaly_maps`).

        ``size`` (H, W) defaults to the backbone's input side, else 8 x the grid.
        """
        check_is_fitted(self, _FITTED, fit_call="fit(patch_features) or fit_paths(paths)")
        scores = np.asarray(patch_scores, dtype=np.float32)
        if self.grid_shape_ is None and (scores.ndim == 2 or size is None):
            raise ParameterError(
                "this PatchCore was fitted under resize_mode='keep' (a patch grid per image shape): "
                "give (n, h, w) patch scores of one shape and size=(H, W)"
            )
        if scores.ndim == 2:
            scores = scores.reshape(scores.shape[0], *self.grid_shape_)
        if size is None:
            side = (self.backbone_identity_ or {}).get("image_size")
            size = (side, side) if side else (8 * self.grid_shape_[0], 8 * self.grid_shape_[1])
        return anomaly_maps(scores, size, sigma=float(self.sigma), device=self._torch_device())

    # ------------------------------------------------------------------ images
    def _torch_device(self) -> torch.device:
        from anomalib_study.backbones import resolve_device

        return resolve_device(self.device)

    # ------------------------------------------------------------------ save / load
    def __repr__(self) -> str:
        params = self.get_params()
        if not isinstance(params["backbone"], str):  # not the whole nn.Module tree
            params["backbone"] = f"<Backbone {getattr(params['backbone'], 'name', '?')}>"
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"

    def _params_for_file(self) -> dict:
        params = self.get_params()
        if not isinstance(params["backbone"], str):  # a loaded Backbone: store how to load it again
            module = params["backbone"]
            params["backbone"] = getattr(module, "name", str(module))
            params["image_size"] = getattr(module, "image_size", params["image_size"])
            params["resize_mode"] = getattr(module, "preprocessing", {}).get("resize_mode", "crop")
            params["weights"] = params["weights"] or getattr(module, "weights_path", None)
        params["weights"] = None if params["weights"] is None else str(params["weights"])
        params["layers"] = None if params["layers"] is None else list(params["layers"])
        return params

    def save(self, path: str | os.PathLike) -> Path:
        """Save the fitted model (memory bank, configuration, backbone identity, threshold)
        to one versioned ``.npz``, atomically. Returns the path."""
        check_is_fitted(self, _FITTED, fit_call="fit(patch_features) or fit_paths(paths)")
        metadata = {
            "params": self._params_for_file(),
            "grid_shape_": None if self.grid_shape_ is None else list(self.grid_shape_),
            "threshold_": None if not np.isfinite(self.threshold_) else self.threshold_,
            "n_train_images_": self.n_train_images_,
            "n_train_patches_": self.n_train_patches_,
            "backbone_identity_": self.backbone_identity_,
            "timings_": self.timings_,
            "precision_used_": self.precision_used_,
            "index_describe": self.index_.describe(),
        }
        arrays = {
            "memory_bank_": self.memory_bank_,
            "calibration_scores_max_": self.calibration_scores_max_,
            "calibration_scores_reweighted_": self.calibration_scores_reweighted_,
        }
        if self.index.strip() != "Flat":  # a trained index is kept; Flat is rebuilt from the bank
            arrays["index_bytes"] = np.frombuffer(self.index_.to_bytes(), dtype=np.uint8)
        return save_model_file(path, FORMAT_NAME, FORMAT_VERSION, metadata, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, backbone: Any = None, device: str = "cpu") -> "PatchCore":
        """Load a model written by :meth:`save`.

        ``backbone``: None (loaded by name when images are scored), or a loaded Backbone,
        which must be the one the model was fitted with (same name, weights sha256, image
        size and layers), else ModelFileError. A foreign, old or corrupt file -> ModelFileError.
        """
        header, arrays = load_model_file(
            path,
            FORMAT_NAME,
            FORMAT_VERSION,
            required=("memory_bank_", "calibration_scores_max_", "calibration_scores_reweighted_"),
        )
        try:
            params = dict(header["params"])
            params["device"] = device
            if backbone is not None:
                params["backbone"] = backbone
            model = cls(**params)
            model._validate_params()
            grid = None if header["grid_shape_"] is None else tuple(int(v) for v in header["grid_shape_"])
            threshold = header["threshold_"]
            threshold = float("nan") if threshold is None else float(threshold)
            identity = header["backbone_identity_"]
            precision_used = str(header.get("precision_used_", "fp32"))  # files before precision: fp32
            if precision_used not in ("fp32", "bf16"):
                raise ValueError(f"precision_used_ {precision_used!r} is not fp32 or bf16")
        except (KeyError, TypeError, ValueError, StudyError) as error:
            raise ModelFileError(f"{path} has corrupt PatchCore metadata: {error}") from None
        bank = np.ascontiguousarray(arrays["memory_bank_"], dtype=np.float32)
        if bank.ndim != 2 or bank.shape[0] < 1:
            raise ModelFileError(f"{path} is inconsistent: memory bank of shape {bank.shape}")
        try:
            if "index_bytes" in arrays:
                index = NearestNeighbourIndex.from_bytes(arrays["index_bytes"].tobytes(), device=device)
            else:
                index = model._new_index(precision_used, device).fit(bank)
        except ModelFileError as error:
            raise ModelFileError(f"{path}: {error}") from None
        if index.ntotal != bank.shape[0] or index.dim_ != bank.shape[1]:
            raise ModelFileError(f"{path} is inconsistent: bank {bank.shape} vs index {index.ntotal} x {index.dim_}")
        model.precision_used_ = precision_used
        model.memory_bank_ = bank
        model.index_ = index
        model.grid_shape_ = grid
        model.n_features_in_ = int(bank.shape[1])
        model.n_train_images_ = int(header.get("n_train_images_", 0))
        model.n_train_patches_ = int(header.get("n_train_patches_", 0))
        model.backbone_identity_ = identity
        model.calibration_scores_max_ = np.asarray(arrays["calibration_scores_max_"], dtype=np.float64)
        model.calibration_scores_reweighted_ = np.asarray(arrays["calibration_scores_reweighted_"], dtype=np.float64)
        model.threshold_ = threshold
        model.timings_ = dict(header.get("timings_") or {})
        if backbone is not None:
            model.get_backbone()  # checks the identity now, not at the first image
        return model


# ---------------------------------------------------------------------- the method's declaration


class PatchCoreMethod(Method):
    """PatchCore as the study runs it: image files through :class:`PatchCore`'s image pipeline,
    its description for the reports."""

    name = "patchcore"
    label = "PatchCore"
    estimator = PatchCore
    description = "PatchCore (Roth et al., CVPR 2022): coreset memory bank of patch features, anomaly maps"
    quick_params = {"calibration_fraction": 0.25}
    score_kinds = IMAGE_SCORES
    produces_maps = True

    def fit_paths(self, backbone, paths, params: dict, run: RunOptions) -> PatchCore:
        return PatchCore(
            backbone=backbone,
            **params,
            batch_size=run.batch_size,
            num_workers=run.num_workers,
            device=run.device,
            progress=run.progress,
        ).fit_paths(list(paths))

    def score_paths(self, model: PatchCore, backbone, paths, run: RunOptions, errors: dict | None = None) -> dict:
        if model.backbone is not backbone:  # a loaded model: score with the backbone loaded now (identity checked)
            model.set_params(backbone=backbone)
            model._backbone_module = None
        model.set_params(batch_size=run.batch_size, num_workers=run.num_workers, progress=run.progress)
        model.get_backbone()
        return model.score_paths(list(paths), errors=errors)

    def describe(self, model: PatchCore) -> dict:
        params = as_json(model.model_params())
        identity = model.backbone_identity_ or {}
        n_calibration = int(model.calibration_scores_max_.size)
        has_threshold = bool(np.isfinite(model.threshold_))
        return {
            **params,
            "layers": identity.get("layers", as_json(model.layers)),
            "threshold": float(model.threshold_) if has_threshold else None,
            "threshold_rule": (
                f"{model.thres_ratio} quantile of the {model.image_score} image scores of the {n_calibration} training "
                "images held out of the memory bank"
                if has_threshold
                else "none: calibration_fraction=0 (every training image is in the memory bank)"
            ),
            "memory_bank_size": int(model.memory_bank_.shape[0]),
            "n_bank": int(model.memory_bank_.shape[0]),
            "feature_dim": int(model.n_features_in_),
            "grid_shape": None if model.grid_shape_ is None else list(model.grid_shape_),
            "n_train_images": int(model.n_train_images_),
            "n_calibration": n_calibration,
            "n_train_patches": int(model.n_train_patches_),
            "index_describe": model.index_.describe(),
            "precision_used": model.precision_used_,
            "fit_timings": dict(model.timings_),
            "patch_cache": model.patch_cache_used(),
            "map_rule": f"bilinearly upsampled from the patch grid, Gaussian sigma {model.sigma}"
            + (" (a patch grid and a map per image shape: resize_mode 'keep')" if model.grid_shape_ is None else ""),
        }

    def check_loaded(self, model: PatchCore, section: dict, n_images: int) -> str | None:
        threshold = section["threshold"]
        threshold = float("nan") if threshold is None else float(threshold)
        bank = (int(section["memory_bank_size"]), int(section["feature_dim"]))
        if (
            not np.isclose(model.threshold_, threshold, equal_nan=True)
            or model.memory_bank_.shape != bank
            or model.n_train_images_ != n_images
        ):
            return (
                f"the model (threshold={model.threshold_:.6g}, bank {model.memory_bank_.shape[0]} x "
                f"{model.n_features_in_}, {model.n_train_images_} images) does not match its description "
                f"(threshold={threshold:.6g}, bank {bank[0]} x {bank[1]}, {n_images} images)"
            )
        return None

    def n_images(self, model):
        return int(model.n_train_images_)

    def threshold_problem(self, params: dict) -> str | None:
        if params["calibration_fraction"] == 0:
            return (
                "calibration_fraction=0 holds no normal image out of the memory bank, so the model has no "
                "threshold: give calibration_fraction in (0, 1), e.g. 0.1"
            )
        return None

    def calibration_scores(self, model):
        return (
            model.calibration_scores_reweighted_ if model.image_score == "reweighted" else model.calibration_scores_max_
        )


SPEC = PatchCoreMethod()
