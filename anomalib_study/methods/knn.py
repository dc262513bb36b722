"""Deep nearest-neighbour anomaly detection (DN2).

Bergman, Cohen and Hoshen, "Deep Nearest Neighbor Anomaly Detection" (2020): an image's
anomaly score is the mean Euclidean distance from its (L2-normalised) embedding to the
embeddings of its k nearest normal training images. Higher = more anomalous.

The decision threshold is calibrated on the training images themselves, leave-one-out:
each training image is scored against the *other* training images, and the threshold is
the ``thres_ratio`` quantile of those scores (so about ``1 - thres_ratio`` of normal
images are flagged).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.preprocessing import normalize

from anomalib_study.checks import int_at_least, open_fraction, positive_int
from anomalib_study.errors import ModelFileError, ParameterError, StudyError
from anomalib_study.features import extract_embeddings
from anomalib_study.methods.base import (
    BaseDetector,
    Method,
    Param,
    RunOptions,
    check_bool,
    check_embeddings,
    check_fraction,
    check_is_fitted,
    load_model_file,
    save_model_file,
)
from anomalib_study.search import NearestNeighbourIndex

__all__ = ["KNNDetector", "FORMAT_NAME", "FORMAT_VERSION", "SPEC"]

FORMAT_NAME = "anomalib_study.knn"
FORMAT_VERSION = 1


def _l2_normalise(X: np.ndarray) -> np.ndarray:
    # sklearn leaves an all-zero row at zero instead of making it NaN
    return np.ascontiguousarray(normalize(X, norm="l2", axis=1), dtype=np.float32)


def _factory_string(name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"{name} must be a faiss factory string such as 'Flat', got {value!r}")


class KNNDetector(BaseDetector):
    """Deep kNN anomaly detector on image embeddings.

    ``k`` is clamped to n_train - 1 with a warning; ``device`` (``"cuda[:N]"``) only helps
    with faiss-gpu.

    Attributes (after :meth:`fit`):
        memory_bank_: (n_train, d) float32 normal embeddings (normalised if ``normalize``).
        index_: the :class:`~anomalib_study.search.NearestNeighbourIndex` over the bank.
        k_: the k actually used (``min(k, n_train - 1)``).
        train_scores_: (n_train,) leave-one-out scores of the training images.
        threshold_: ``np.quantile(train_scores_, thres_ratio)``.
        n_features_in_: d.
    """

    k = Param(100, "neighbours averaged (clamped to the normal images - 1)", cli=positive_int, check=int_at_least(1))
    thres_ratio = Param(
        0.92,
        "share of normal images the threshold keeps normal (quantile of their leave-one-out scores)",
        cli=open_fraction,
        check=check_fraction,
    )
    normalize = Param(True, "L2-normalise the embeddings", cli=bool, check=check_bool)
    index = Param(
        "Flat", "faiss factory string of the search (Flat = exact)", cli=str, check=_factory_string, metavar="FACTORY"
    )
    device = Param("cpu", "where the search runs (cpu; cuda[:N] with faiss-gpu)", kind="run")

    def _prepare(self, X, name: str, n_features: int | None = None, min_samples: int = 1) -> np.ndarray:
        X = check_embeddings(X, name=name, n_features=n_features, min_samples=min_samples)
        return _l2_normalise(X) if self.normalize else X

    def fit(self, X) -> "KNNDetector":
        """Fit on normal embeddings ``X`` (n_train, d); n_train >= 2. Returns self."""
        self._validate_params()
        X = check_embeddings(X, name="X (normal embeddings)")
        n = X.shape[0]
        if n < 2:
            raise ParameterError(
                f"KNNDetector needs at least 2 normal images to fit (leave-one-out threshold), got {n}"
            )
        if self.normalize:
            X = _l2_normalise(X)
        k_used = int(self.k)
        if k_used >= n:
            k_used = n - 1
            warnings.warn(
                f"k={self.k} is not smaller than the {n} normal images: using k={k_used} (n - 1)",
                stacklevel=2,
            )
        index = NearestNeighbourIndex(factory=self.index, metric="l2", device=self.device).fit(X)

        # Leave-one-out: ask for one neighbour more and drop each image's own entry by
        # index (not by distance, so an exact duplicate of another image still counts).
        search_k = k_used + 1
        distances, indices = index.search(X, search_k)
        own = indices == np.arange(n)[:, None]
        # If the image did not find itself (ties among > k duplicates, approximate index),
        # drop its farthest neighbour instead so that every row keeps k_used entries.
        own[~own.any(axis=1), -1] = True
        loo = distances[~own].reshape(n, search_k - 1)
        self._check_found(loo, "the training images")

        self.memory_bank_ = X
        self.index_ = index
        self.k_ = k_used
        self.n_features_in_ = X.shape[1]
        self.train_scores_ = loo.mean(axis=1).astype(np.float64)
        self.threshold_ = float(np.quantile(self.train_scores_, self.thres_ratio))
        return self

    def _check_found(self, distances: np.ndarray, what: str) -> None:
        if not np.isfinite(distances).all():
            rows = int((~np.isfinite(distances).all(axis=1)).sum())
            raise ParameterError(
                f"index {self.index!r} returned fewer than k={self.k_ if hasattr(self, 'k_') else self.k} neighbours "
                f"for {rows} of {what}: use index='Flat' or an IVF index with more points per list"
            )

    def score(self, X) -> np.ndarray:
        """Anomaly scores (n,) float64 of embeddings ``X`` (n, d): the mean Euclidean
        distance to the k_ nearest normal embeddings. Higher = more anomalous."""
        check_is_fitted(self, ["memory_bank_", "index_", "threshold_"])
        X = self._prepare(X, "X", n_features=self.n_features_in_)
        distances, _ = self.index_.search(X, self.k_)
        self._check_found(distances, "the images")
        return distances.mean(axis=1).astype(np.float64)

    def predict(self, X) -> np.ndarray:
        """(n,) int: 1 = anomalous (score > threshold_), 0 = normal."""
        return (self.score(X) > self.threshold_).astype(int)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike) -> Path:
        """Save the fitted detector to one versioned ``.npz`` file, atomically. Returns the path."""
        check_is_fitted(self, ["memory_bank_", "index_", "threshold_"])
        metadata = {
            "params": self.get_params(),
            "k_": self.k_,
            "threshold_": self.threshold_,
            "index_describe": self.index_.describe(),
        }
        arrays = {
            "memory_bank_": self.memory_bank_,
            "train_scores_": self.train_scores_,
            "index_bytes": np.frombuffer(self.index_.to_bytes(), dtype=np.uint8),
        }
        return save_model_file(path, FORMAT_NAME, FORMAT_VERSION, metadata, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "KNNDetector":
        """Load a detector written by :meth:`save`; a foreign, old or corrupt file -> ModelFileError."""
        header, arrays = load_model_file(
            path, FORMAT_NAME, FORMAT_VERSION, required=("memory_bank_", "train_scores_", "index_bytes")
        )
        try:
            params = dict(header["params"])
            params["device"] = device
            detector = cls(**params)
            detector._validate_params()
            k_used = int(header["k_"])
            threshold = float(header["threshold_"])
        except (KeyError, TypeError, ValueError, StudyError) as error:
            raise ModelFileError(f"{path} has corrupt KNNDetector metadata: {error}") from None
        try:
            index = NearestNeighbourIndex.from_bytes(arrays["index_bytes"].tobytes(), device=device)
        except ModelFileError as error:
            raise ModelFileError(f"{path}: {error}") from None
        bank = np.ascontiguousarray(arrays["memory_bank_"], dtype=np.float32)
        train_scores = np.asarray(arrays["train_scores_"], dtype=np.float64)
        if bank.ndim != 2 or index.ntotal != bank.shape[0] or index.dim_ != bank.shape[1]:
            raise ModelFileError(
                f"{path} is inconsistent: memory bank shape {bank.shape} vs index of {index.ntotal} x {index.dim_}"
            )
        if train_scores.shape != (bank.shape[0],) or not 1 <= k_used < bank.shape[0]:
            raise ModelFileError(
                f"{path} is inconsistent: {train_scores.shape[0]} train scores, k_={k_used}, bank {bank.shape}"
            )
        detector.memory_bank_ = bank
        detector.index_ = index
        detector.k_ = k_used
        detector.n_features_in_ = bank.shape[1]
        detector.train_scores_ = train_scores
        detector.threshold_ = threshold
        return detector


# ---------------------------------------------------------------------- the method's declaration
def _check_shape(x: np.ndarray, n: int, backbone, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.shape != (n, int(backbone.embedding_dim)):
        raise StudyError(
            f"backbone {backbone.name} gave embeddings of shape {x.shape} for {n} {what}, "
            f"expected ({n}, {backbone.embedding_dim})"
        )
    return x


class KNNMethod(Method):
    """Deep nearest-neighbour detection as the study runs it: embeddings of image files, then :class:`KNNDetector`."""

    name = "knn"
    label = "kNN"
    estimator = KNNDetector
    description = "deep nearest-neighbour detection (DN2): mean distance to the k nearest normal image embeddings"
    quick_params = {"k": 3}
    uses_embedding = True
    sweep_param = "k"

    def fit_paths(self, backbone, paths, params: dict, run: RunOptions) -> KNNDetector:
        """Embeddings of the normal images (through the feature cache ``run.cache``), then fit."""
        started = time.perf_counter()
        cache_record: dict = {}
        bank = extract_embeddings(
            backbone,
            list(paths),
            batch_size=run.batch_size,
            num_workers=run.num_workers,
            device=run.device,
            cache=run.cache,
            progress=run.progress,
            desc="normal images",
            record=cache_record,
        )
        bank = _check_shape(bank, len(paths), backbone, "normal images")
        extract_s = time.perf_counter() - started
        started = time.perf_counter()
        detector = KNNDetector(
            k=params["k"],
            thres_ratio=params["thres_ratio"],
            normalize=params["normalize"],
            index=params["index"],
            device=run.device,
        ).fit(bank)
        detector.timings_ = {"extract_s": extract_s, "index_s": time.perf_counter() - started}
        detector.feature_cache_ = {"normal images": cache_record.get("feature_cache")}
        return detector

    def score_paths(self, detector: KNNDetector, backbone, paths, run: RunOptions, errors: dict | None = None) -> dict:
        """``image_scores`` (n,) and the test ``embeddings`` (n, D) (for :func:`_sweep`)."""
        paths = list(paths)
        cache_record: dict = {}
        x = extract_embeddings(
            backbone,
            paths,
            batch_size=run.batch_size,
            num_workers=run.num_workers,
            device=run.device,
            cache=run.cache,
            progress=run.progress,
            desc="test images",
            record=cache_record,
            **({} if errors is None else {"errors": errors}),
        )
        if hasattr(detector, "feature_cache_"):
            detector.feature_cache_["test images"] = cache_record.get("feature_cache")
        x = _check_shape(x, len(paths), backbone, "test images")
        scores = np.full(len(paths), np.nan)
        readable = np.isfinite(x).all(axis=1) if errors else np.ones(len(paths), dtype=bool)
        if readable.any():
            scores[readable] = detector.score(x[readable])
        return {"image_scores": scores, "embeddings": x}

    def describe(self, detector: KNNDetector) -> dict:
        return {
            "k": int(detector.k),
            "k_used": int(detector.k_),
            "thres_ratio": float(detector.thres_ratio),
            "threshold": float(detector.threshold_),
            "threshold_rule": (
                f"{detector.thres_ratio} quantile of the leave-one-out scores of the "
                f"{detector.memory_bank_.shape[0]} normal images"
            ),
            "normalize": bool(detector.normalize),
            "index": detector.index,
            "index_describe": detector.index_.describe(),
            "n_bank": int(detector.memory_bank_.shape[0]),
            # what the embedding cache did: read or computed, per image set (not compared by verify)
            "feature_cache": dict(getattr(detector, "feature_cache_", {})),
        }

    def check_loaded(self, detector: KNNDetector, section: dict, n_images: int) -> str | None:
        if (
            detector.k_ != int(section["k_used"])
            or not np.isclose(detector.threshold_, float(section["threshold"]))
            or detector.memory_bank_.shape[0] != n_images
        ):
            return (
                f"the model (k={detector.k_}, threshold={detector.threshold_:.6g}, {detector.memory_bank_.shape[0]} "
                f"images) does not match its description (k={section['k_used']}, threshold="
                f"{float(section['threshold']):.6g}, {n_images} images)"
            )
        return None

    def n_images(self, detector):
        return int(detector.memory_bank_.shape[0])

    def calibration_scores(self, detector):
        return detector.train_scores_

    def sweep(self, detector: KNNDetector, scored: dict, params: dict, values) -> list[tuple[int, np.ndarray, float]]:
        """The same embeddings scored with every other k of ``values`` (those below the bank size)."""
        bank = detector.memory_bank_  # already normalised when params["normalize"]
        test = scored["embeddings"]
        if params["normalize"]:
            test = _l2_normalise(test)
        out = []
        for k in sorted({int(v) for v in values if 0 < int(v) < bank.shape[0]}):
            other = KNNDetector(k=k, thres_ratio=params["thres_ratio"], normalize=False, index=params["index"]).fit(
                bank
            )
            out.append((k, other.score(test), float(other.threshold_)))
        return out


SPEC = KNNMethod()
