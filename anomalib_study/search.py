"""The nearest-neighbour search layer every method uses: one faiss index, described by a factory string.

An index is described by a faiss factory string (``"Flat"`` exact search, ``"IVF1024,PQ16"``,
``"PQ16"``, ``"HNSW32"``; see the faiss wiki "The index factory"), which :meth:`describe`
returns together with the other settings so that it is recorded with every result.

Distances are **Euclidean** (the square root of faiss's squared L2, clipped at 0) for
``metric="l2"``, so smaller means nearer; for ``metric="ip"`` they are inner products, so
larger means nearer.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings

import faiss
import numpy as np

from anomalib_study.checks import check_is_fitted
from anomalib_study.errors import ModelFileError, ParameterError

__all__ = ["NearestNeighbourIndex", "METRICS", "available_cores"]

#: metric name -> faiss metric type
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}

_FACTORY_EXAMPLES = '"Flat" (exact), "IVF1024,PQ16np", "PQ16np", "HNSW32" ("np" skips the polysemous training that plain searches never use)'
_BYTES_MAGIC = b"ASNNIDX1"  # anomalib_study nearest-neighbour index, container version 1
_threads_set = False


def available_cores() -> int:
    """Number of CPU cores this process may use (respects CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _set_faiss_threads() -> None:
    # faiss's OpenMP default can exceed the cores we are allowed to use (containers, CI).
    global _threads_set
    if not _threads_set:
        faiss.omp_set_num_threads(available_cores())
        _threads_set = True


def _faiss_reason(error: Exception) -> str:
    """The human part of a faiss RuntimeError (after the C++ location)."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    for marker in ("failed: ", "Error: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = re.sub(r"^Error in .*? at \S+:\d+: ", "", text)
    return text


def training_points_needed(factory: str) -> tuple[int, int]:
    """(minimum, recommended) number of training points for a factory string.

    IVF<n> clusters the data into n lists with k-means: it needs at least n points and
    faiss recommends 39 * n. PQ<m>[x<bits>] (and OPQ) trains 2**bits centroids per
    sub-quantizer: it needs at least 2**bits points (256 for the default 8 bits).
    Indexes without training (Flat, HNSW) need 0.
    """
    minimum, recommended = 0, 0
    for part in factory.replace(" ", "").split(","):
        ivf = re.match(r"^IVF(\d+)", part)
        if ivf:
            nlist = int(ivf.group(1))
            minimum, recommended = max(minimum, nlist), max(recommended, 39 * nlist)
        for pq in re.finditer(r"(?:^|_|O)PQ(\d+)(?:x(\d+))?", part):
            bits = int(pq.group(2)) if pq.group(2) else 8
            minimum, recommended = max(minimum, 2**bits), max(recommended, 39 * 2**bits)
    return minimum, recommended


def _as_matrix(name: str, values, dim: int | None = None) -> np.ndarray:
    """A float32, C-contiguous (n, d) copy of ``values``, or a ParameterError saying what is wrong."""
    try:
        array = np.array(values, dtype=np.float32, order="C", copy=True)
    except (TypeError, ValueError) as error:
        raise ParameterError(f"{name} must be a 2-D array of numbers, got {type(values).__name__}: {error}") from None
    if array.ndim != 2:
        raise ParameterError(f"{name} must be 2-D (n_samples, n_features), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ParameterError(f"{name} is empty (shape {array.shape}): give at least one row of at least one feature")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array).all(axis=1)).sum())
        raise ParameterError(f"{name} contains NaN or infinite values in {bad} row(s); remove or fix those rows")
    if dim is not None and array.shape[1] != dim:
        raise ParameterError(
            f"{name} has {array.shape[1]} features per row but the index was built on {dim}: "
            "use embeddings from the same backbone as the memory bank"
        )
    return array


class NearestNeighbourIndex:
    """A faiss index over a memory bank, built from a factory string.

    Args:
        factory: faiss factory string: ``"Flat"`` (exact, the baseline), ``"IVF1024,PQ16"``,
            ``"PQ16"``, ``"HNSW32"``...
        metric: ``"l2"`` (Euclidean distances, smaller = nearer) or ``"ip"`` (inner
            products, larger = nearer).
        kmeans_reduce: if set, the bank is first replaced by this many k-means centroids
            (faiss.Kmeans); the search then returns distances to centroids and the
            indices are centroid numbers, not rows of the bank.
        seed: seed of the k-means reduction.
        nprobe: number of inverted lists visited per query for IVF indexes (faiss default 1).
        device: ``"cpu"`` or ``"cuda[:N]"``; CUDA is used only when faiss was built with
            GPU support (faiss-cpu is not: a warning says the CPU is used).

    Attributes (after :meth:`fit`):
        index_: the faiss index.
        dim_: feature dimension d.
    """

    def __init__(
        self,
        factory: str = "Flat",
        metric: str = "l2",
        kmeans_reduce: int | None = None,
        seed: int = 0,
        nprobe: int | None = None,
        device: str = "cpu",
    ):
        self.factory = factory
        self.metric = metric
        self.kmeans_reduce = kmeans_reduce
        self.seed = seed
        self.nprobe = nprobe
        self.device = device

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ParameterError(f"index factory must be a non-empty string such as {_FACTORY_EXAMPLES}, got {self.factory!r}")
        if self.metric not in METRICS:
            raise ParameterError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.kmeans_reduce is not None and (
            isinstance(self.kmeans_reduce, bool) or not isinstance(self.kmeans_reduce, (int, np.integer)) or self.kmeans_reduce < 1
        ):
            raise ParameterError(f"kmeans_reduce must be None or an integer >= 1, got {self.kmeans_reduce!r}")
        if self.nprobe is not None and (
            isinstance(self.nprobe, bool) or not isinstance(self.nprobe, (int, np.integer)) or self.nprobe < 1
        ):
            raise ParameterError(f"nprobe must be None or an integer >= 1, got {self.nprobe!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ParameterError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def _check_fitted(self) -> None:
        check_is_fitted(self, ["index_", "dim_"], fit_call="fit(bank)")

    # ------------------------------------------------------------------ build
    def fit(self, bank) -> "NearestNeighbourIndex":
        """Build the index on ``bank`` (n, d) float32 (copied; the input is not changed)."""
        self._check_params()
        bank = _as_matrix("bank", bank)
        n, d = bank.shape
        _set_faiss_threads()

        if self.kmeans_reduce is not None:
            if self.kmeans_reduce > n:
                raise ParameterError(
                    f"kmeans_reduce={self.kmeans_reduce} needs at least that many bank rows, got {n}: "
                    "lower kmeans_reduce or pass None to keep the whole bank"
                )
            if self.kmeans_reduce < n:
                kmeans = faiss.Kmeans(d, int(self.kmeans_reduce), niter=20, seed=int(self.seed), verbose=False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kmeans.train(bank)
                bank = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
                n = bank.shape[0]

        try:
            index = faiss.index_factory(d, self.factory, METRICS[self.metric])
        except RuntimeError as error:
            raise ParameterError(
                f"invalid faiss index factory string {self.factory!r} for dimension {d} "
                f"({_faiss_reason(error)}); valid examples: {_FACTORY_EXAMPLES}"
            ) from None

        if not index.is_trained:
            minimum, recommended = training_points_needed(self.factory)
            if n < minimum:
                raise ParameterError(
                    f"index {self.factory!r} needs at least {minimum} training points "
                    f"(faiss recommends {recommended}) but the bank has {n}: use \"Flat\" for small banks"
                )
            if n < recommended:
                warnings.warn(
                    f"index {self.factory!r} is trained on {n} points; faiss recommends at least "
                    f"{recommended}: results may be poor, consider \"Flat\"",
                    stacklevel=2,
                )
            try:
                index.train(bank)
            except RuntimeError as error:
                raise ParameterError(
                    f"could not train index {self.factory!r} on {n} points of dimension {d} "
                    f"({_faiss_reason(error)}); use \"Flat\" for small banks"
                ) from None
        assert index.is_trained, f"faiss index {self.factory!r} is not trained after train()"
        index.add(bank)
        self.index_ = index
        self.dim_ = d
        self._apply_search_params()
        self._search_index = self._to_device(index)
        return self

    def _apply_search_params(self) -> None:
        if self.nprobe is not None:
            try:
                faiss.ParameterSpace().set_index_parameter(self.index_, "nprobe", int(self.nprobe))
            except RuntimeError:
                raise ParameterError(
                    f"nprobe applies to IVF indexes only; index {self.factory!r} has no inverted lists: pass nprobe=None"
                ) from None

    def _to_device(self, index):
        if self.device == "cpu":
            return index
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if gpus == 0:
            warnings.warn(
                f"device={self.device!r} asked for, but the installed faiss has no GPU support: searching on the CPU",
                stacklevel=3,
            )
            return index
        gpu_id = int(self.device.split(":", 1)[1]) if ":" in self.device else 0
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, gpu_id, index)

    # ------------------------------------------------------------------ query
    @property
    def ntotal(self) -> int:
        """Number of vectors in the index (bank rows, or centroids with kmeans_reduce)."""
        self._check_fitted()
        return int(self.index_.ntotal)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest bank vectors of each query.

        Args:
            queries: (q, d) array.
            k: number of neighbours, 1 <= k <= ntotal.

        Returns:
            distances: (q, k) float32, nearest first. ``metric="l2"``: Euclidean distances
                (smaller = nearer); ``metric="ip"``: inner products (larger = nearer).
                Where an approximate index finds fewer than k neighbours, the missing
                entries are ``inf`` (l2) / ``-inf`` (ip) with index -1.
            indices: (q, k) int64 row numbers in the bank (-1 where missing).
        """
        self._check_fitted()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ParameterError(f"k must be an integer >= 1, got {k!r}")
        if k > self.ntotal:
            raise ParameterError(
                f"k={k} is larger than the {self.ntotal} vectors in the index: use k <= {self.ntotal}"
            )
        queries = _as_matrix("queries", queries, dim=self.dim_)
        _set_faiss_threads()
        distances, indices = self._search_index.search(queries, int(k))
        distances = np.asarray(distances, dtype=np.float32)
        indices = np.asarray(indices, dtype=np.int64)
        missing = indices < 0
        if self.metric == "l2":
            distances = np.sqrt(np.clip(distances, 0.0, None))
            distances[missing] = np.inf
        else:
            distances[missing] = -np.inf
        return distances, indices

    def describe(self) -> dict:
        """The settings to record with every result: factory, metric, kmeans_reduce, ntotal, dim (+ nprobe, seed)."""
        return {
            "factory": self.factory,
            "metric": self.metric,
            "kmeans_reduce": self.kmeans_reduce,
            "ntotal": self.ntotal if hasattr(self, "index_") else None,
            "dim": getattr(self, "dim_", None),
            "nprobe": self.nprobe,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ bytes
    def _params(self) -> dict:
        return {
            "factory": self.factory,
            "metric": self.metric,
            "kmeans_reduce": self.kmeans_reduce,
            "seed": self.seed,
            "nprobe": self.nprobe,
        }

    def to_bytes(self) -> bytes:
        """The fitted index and its settings as bytes (faiss.serialize_index + a JSON header)."""
        self._check_fitted()
        header = json.dumps({"params": self._params(), "dim": self.dim_}).encode("utf-8")
        body = faiss.serialize_index(self.index_).tobytes()
        return _BYTES_MAGIC + struct.pack("<Q", len(header)) + header + body

    @classmethod
    def from_bytes(cls, data: bytes, device: str = "cpu") -> "NearestNeighbourIndex":
        """Rebuild an index written by :meth:`to_bytes`; corrupt or foreign bytes -> ModelFileError."""
        data = bytes(data)
        if not data.startswith(_BYTES_MAGIC) or len(data) < len(_BYTES_MAGIC) + 8:
            raise ModelFileError("the saved nearest-neighbour index is not an anomalib_study index (bad header)")
        start = len(_BYTES_MAGIC) + 8
        (header_len,) = struct.unpack("<Q", data[len(_BYTES_MAGIC) : start])
        try:
            header = json.loads(data[start : start + header_len].decode("utf-8"))
            params, dim = header["params"], int(header["dim"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise ModelFileError(f"the saved nearest-neighbour index has a corrupt header ({error})") from None
        try:
            index = faiss.deserialize_index(np.frombuffer(data[start + header_len :], dtype=np.uint8).copy())
        except (RuntimeError, ValueError) as error:
            raise ModelFileError(f"the saved faiss index is corrupt ({_faiss_reason(error)})") from None
        if index.d != dim:
            raise ModelFileError(f"the saved faiss index has dimension {index.d} but its header says {dim}")
        try:
            self = cls(**params, device=device)
            self._check_params()
        except (TypeError, ParameterError) as error:
            raise ModelFileError(f"the saved nearest-neighbour index has invalid settings ({error})") from None
        self.index_ = index
        self.dim_ = dim
        self._apply_search_params()
        self._search_index = self._to_device(index)
        return self

    def __repr__(self) -> str:
        return (
            f"NearestNeighbourIndex(factory={self.factory!r}, metric={self.metric!r}, "
            f"kmeans_reduce={self.kmeans_reduce!r}, seed={self.seed!r}, nprobe={self.nprobe!r}, device={self.device!r})"
        )
