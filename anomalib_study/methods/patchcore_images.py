"""PatchCore on image files: backbone -> patch features -> the array estimator.

:class:`PatchCoreImages` is the part of :class:`~anomalib_study.methods.patchcore.PatchCore`
that reads images: it loads the backbone from the model's ``backbone`` parameter (and
checks it against the fitted model's identity), streams patch features through
:func:`anomalib_study.patches.iter_patch_features`, and hands arrays to the estimator's
array methods (``_fit_arrays``, ``_fit_rows``, ``_score_arrays``). The estimator itself
(:mod:`anomalib_study.methods.patchcore`) works on arrays.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

import numpy as np

from anomalib_study.checks import check_is_fitted
from anomalib_study.errors import ModelFileError, ParameterError
from anomalib_study.io import as_json
from anomalib_study.methods.patch_images import PatchImages
from anomalib_study.methods.patch_maps import anomaly_maps, place_rows

__all__ = ["PatchCoreImages", "MEMMAP_BYTES"]

MEMMAP_BYTES = 2 * 1024**3  # training features larger than this go to a temporary memory-mapped file


class PatchCoreImages(PatchImages):
    """Fitting and scoring image files (mixed into PatchCore; see the module docstring)."""

    def _identity(self, backbone) -> dict:
        return {
            "name": backbone.name,
            "weights_sha256": backbone.weights_sha256,
            "image_size": backbone.image_size,
            "preprocessing": backbone.preprocessing,
            "layers": self._patch_maker().resolve_layers(backbone),
        }

    def _check_identity(self, backbone) -> None:
        expected = getattr(self, "backbone_identity_", None)
        if not expected:
            return
        found = self._identity(backbone)
        for key in ("name", "weights_sha256", "image_size", "layers", "preprocessing"):
            if key in expected and as_json(expected.get(key)) != as_json(found.get(key)):
                raise ModelFileError(
                    f"this PatchCore model was fitted with backbone {expected.get('name')!r} "
                    f"(weights sha256 {str(expected.get('weights_sha256'))[:12]}..., image_size "
                    f"{expected.get('image_size')}, layers {expected.get('layers')}) but is used with "
                    f"{found.get('name')!r} ({key} differs: {found.get(key)!r}): use the same backbone and weights, "
                    "or fit a new model"
                )

    def _iter_patch_batches(self, paths, desc: str, errors: dict[int, str] | None = None):
        from anomalib_study.patches import iter_patch_features

        precision = getattr(self, "precision_used_", None) or self._resolve_precision()
        return iter_patch_features(
            self.get_backbone(),
            paths,
            self._patch_maker(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=self.device,
            progress=self.progress,
            desc=desc,
            errors=errors,
            precision=precision,
            record=self._patch_cache_record(desc),
        )

    def extract_patches(
        self, paths: Sequence[str | os.PathLike], desc: str = "patch features"
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """Patch features of image files: ``(features (n, h*w, D) float32, (h, w))``.

        For studies that fit several models on the same features (e.g. a coreset ablation)
        with :meth:`fit` / :meth:`score_patches`; :meth:`fit_paths` avoids holding them twice.
        """
        self._validate_params()
        return self.collect_patches(paths, desc, precision=self._resolve_precision())

    def fit_paths(self, paths: Sequence[str | os.PathLike]) -> "PatchCoreImages":
        """Fit on normal image files: backbone -> patch features -> coreset -> index. Returns self.

        Features are written batch by batch into one preallocated float32 array (a
        temporary memory-mapped file above 2 GiB); calibration images into a second small one.
        """
        self._validate_params()
        paths = list(paths)
        if not paths:
            raise ParameterError("fit_paths needs at least one normal image")
        self._backbone_module = None
        for name in ("backbone_identity_", "precision_used_"):
            self.__dict__.pop(name, None)
        backbone = self.get_backbone()
        self.precision_used_ = precision = self._resolve_precision()
        held = self.calibration_images(len(paths))
        slot = np.full(len(paths), -1, dtype=np.int64)  # row in the bank array, or -(1 + row) in calibration
        keep = np.setdiff1d(np.arange(len(paths)), held)
        slot[keep] = np.arange(keep.size)
        slot[held] = -1 - np.arange(held.size)
        if backbone.preprocessing.get("resize_mode") == "keep":
            return self._fit_paths_keep(paths, backbone, slot, keep.size, held.size)
        bank_part = calibration = grid = None
        temp = None
        started = time.perf_counter()
        try:
            for positions, features, grid_here, _ in self._iter_patch_batches(paths, "PatchCore train features"):
                if bank_part is None:
                    grid = grid_here
                    _, p, d = features.shape
                    nbytes = keep.size * p * d * 4
                    if nbytes > MEMMAP_BYTES:
                        from anomalib_study.io import cache_root

                        cache_root().mkdir(parents=True, exist_ok=True)
                        temp = tempfile.TemporaryFile(dir=cache_root())
                        bank_part = np.memmap(temp, dtype=np.float32, mode="w+", shape=(keep.size, p, d))
                    else:
                        bank_part = np.empty((keep.size, p, d), dtype=np.float32)
                    calibration = np.empty((held.size, p, d), dtype=np.float32)
                for position, row in zip(positions, features):
                    where = slot[position]
                    if where >= 0:
                        bank_part[where] = row
                    else:
                        calibration[-1 - where] = row
            extract_s = time.perf_counter() - started
            self._fit_arrays(bank_part, calibration, grid, self._identity(backbone), extract_s, precision)
        finally:
            del bank_part
            if temp is not None:
                temp.close()
        return self

    def _fit_paths_keep(self, paths: list, backbone, slot: np.ndarray, n_bank: int, n_held: int) -> "PatchCoreImages":
        """fit_paths under resize_mode="keep": images of different shapes have different
        patch counts, so the bank images' patches go into one (N, D) row buffer, grown in
        place (``ndarray.resize``: no second copy where the allocator can extend it), sized
        from the first batch; the held-out images are kept per image and scored per image."""
        rows: np.ndarray | None = None
        used = 0
        held: dict[int, np.ndarray] = {}
        started = time.perf_counter()
        for positions, features, _, _ in self._iter_patch_batches(paths, "PatchCore train features"):
            _, p, d = features.shape
            if rows is None:
                rows = np.empty((max(1, int(1.25 * n_bank * p)), d), dtype=np.float32)
            for position, row in zip(positions, features):
                where = int(slot[position])
                if where < 0:
                    held[-1 - where] = np.array(row)[None]
                    continue
                if used + p > rows.shape[0]:
                    rows.resize((max(used + p, int(1.5 * rows.shape[0])), d), refcheck=False)
                rows[used : used + p] = row
                used += p
        extract_s = time.perf_counter() - started
        calibration = [held[i] for i in range(n_held)]
        self._fit_rows(
            rows[:used], n_bank, calibration, None, self._identity(backbone), extract_s, self.precision_used_
        )
        return self

    def score_paths(
        self,
        paths: Sequence[str | os.PathLike],
        size: tuple[int, int] | None = None,
        keep_patch_scores: bool = False,
        errors: dict[int, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Score image files.

        Returns a dict: ``image_scores`` (n,) of the kind ``image_score``,
        ``image_scores_max`` and ``image_scores_reweighted`` (n,) float64,
        ``anomaly_maps`` (n, H, W) float32 at ``size`` (default: the backbone's
        preprocessed input, image_size x image_size; the map covers that resized and
        centre-cropped input, not the original file), and with ``keep_patch_scores``
        ``patch_scores`` (n, h, w) float32. Higher = more anomalous everywhere.
        Under ``resize_mode="keep"`` without ``size``, ``anomaly_maps`` (and
        ``patch_scores``) are 1-D object arrays of n float32 arrays, each at its own
        image's preprocessed input size (H_i, W_i) (:func:`anomalib_study.backbones.input_size`;
        the whole image, aspect ratio kept), None for a skipped image.

        An image that cannot be decoded raises DataError naming it; with ``errors`` (an
        empty dict) it is skipped instead: position -> reason is recorded there and its
        scores and map are NaN.
        """
        check_is_fitted(self, self._FITTED, fit_call="fit_paths(paths)")
        paths = list(paths)
        backbone = self.get_backbone()
        per_image = self.grid_shape_ is None  # fitted under resize_mode="keep": a grid per image shape
        if size is None and not per_image:
            size = (backbone.image_size, backbone.image_size)
        n = len(paths)
        out = {
            "image_scores_max": np.full(n, np.nan, dtype=np.float64),
            "image_scores_reweighted": np.full(n, np.nan, dtype=np.float64),
            "anomaly_maps": (
                np.full(n, None, dtype=object)
                if size is None
                else np.full((n, int(size[0]), int(size[1])), np.nan, dtype=np.float32)
            ),
        }
        if keep_patch_scores:
            out["patch_scores"] = (
                np.full(n, None, dtype=object)
                if per_image
                else np.full((n, *self.grid_shape_), np.nan, dtype=np.float32)
            )
        for positions, features, grid, input_hw in self._iter_patch_batches(paths, "PatchCore scoring", errors):
            if (not per_image and tuple(grid) != tuple(self.grid_shape_)) or features.shape[2] != self.n_features_in_:
                raise ParameterError(
                    f"features of grid {grid} x D={features.shape[2]} do not match the fitted "
                    f"{self.grid_shape_} x D={self.n_features_in_}: use the same backbone and image size"
                )
            patch, image_max, image_rw = self._score_arrays(features)
            grid_scores = patch.reshape(len(positions), *grid)
            out["image_scores_max"][positions] = image_max
            out["image_scores_reweighted"][positions] = image_rw
            maps = anomaly_maps(
                grid_scores, input_hw if size is None else size, float(self.sigma), self._torch_device()
            )
            place_rows(out["anomaly_maps"], positions, maps)
            if keep_patch_scores:
                place_rows(out["patch_scores"], positions, grid_scores)
        out["image_scores"] = out["image_scores_reweighted" if self.image_score == "reweighted" else "image_scores_max"]
        return out

    def predict_paths(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """(n,) int: 1 = anomalous (image score > threshold_) for image files."""
        check_is_fitted(self, self._FITTED, fit_call="fit_paths(paths)")
        self._check_threshold()
        scores = self.score_paths(paths)["image_scores"]
        return (scores > self.threshold_).astype(int)
