"""The nearest-neighbour search layer every method uses: one faiss index, described by a factory string.

An index is described by a faiss factory string (``"Flat"`` exact search, ``"IVF1024,PQ16"``,
``"PQ16"``, ``"HNSW32"``; see the faiss wiki "The index factory"), which :meth:`describe`
returns together with the other settings so that it is recorded with every result.

Distances are **Euclidean** (the square root of faiss's squared L2, clipped at 0) for
``metric="l2"``, so smaller means nearer; for ``metric="ip"`` they are inner products, so
larger means nearer.

Precision (``precision=``, exact ``"Flat"`` L2 search only): ``"fp32"`` (the default) is
faiss's exhaustive float32 search. ``"bf16"`` is a re-ranked search: candidate squared distances
from one bfloat16 matrix product per block of queries (torch), then the ``rerank`` best
candidates of each query (at least k; faiss's k-selection on the CPU), their exact float32
distances (faiss's ``fvec_L2sqr_by_idx`` on the CPU: sums of squared differences) and the
k nearest among them. The product gives the squared distance itself, ``|q|^2 + |b|^2 - 2 q.b``: the
rows are extended by the norms (each split into a bfloat16 value and its bfloat16
remainder, so that they keep about 16 bits) and ones, and bank and queries are first
centred on the bank's mean. Its output is rounded to bfloat16 relative to the distance,
not to ``|q|^2``: without the norms inside the product (``-2 q.b`` rounded, norms added
after) a bank of 23,520 WideResNet patches held the exact neighbour among 8 candidates
for 94 % of the queries, with them for 100 %.
The neighbours and distances returned are therefore the exact float32 ones wherever the
candidates contain them; :meth:`NearestNeighbourIndex.rerank_hit_rate` measures how often
they do against faiss's exact search. ``"auto"`` = bf16 where the device computes it
natively (:func:`anomalib_study.hardware.native_bf16`) and the index is Flat L2, else fp32.

Fewer candidate dimensions (``candidate_dim=``, Flat L2 only): the candidate distances are
computed on the bank's first ``candidate_dim`` principal components (the eigenvectors of the
centred bank's covariance with the largest eigenvalues, found at :meth:`fit`) instead of all
d features, which costs about d / ``candidate_dim`` times less arithmetic; the re-ranking is
still exact, on all d features, in float32. Candidates are bf16 products with
``precision="bf16"``, float32 ones otherwise (then the search is re-ranked in fp32 too).
``None`` (the default), or a value of at least d, is faiss's exhaustive search. How often the
exact nearest neighbour survives the projection is measured the same way
(:meth:`NearestNeighbourIndex.rerank_hit_rate`); a larger ``rerank`` makes up for a smaller
``candidate_dim``. Each candidate vector ends with the norm of what the components leave out,
so that the candidate distance is a lower bound of the exact one.

The certificate (every re-ranked search): the r = k - 1 + ``rerank`` candidates of a query are
the rows of smallest candidate distance, so every other row's exact distance is at least the
lower bound computed from the r-th candidate distance (less allowances for the rounding of the
inputs to bf16 and of the float32 sums, :func:`_lower_bound`). When the k-th exact distance
among the candidates is within that bound, the candidates provably hold the exact k nearest;
the queries without that certificate are searched again by faiss's exhaustive search. The
results are therefore those of the exact search (distances summed from the differences, so
they can differ from faiss's ``|q|^2 + |b|^2 - 2 q.b`` by float rounding), and
:meth:`NearestNeighbourIndex.describe` records how many queries needed the exhaustive search
(``exact_fallbacks`` of ``reranked_queries``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings

import faiss
import numpy as np
import torch

from anomalib_study.checks import check_is_fitted
from anomalib_study.errors import ModelFileError, ParameterError
from anomalib_study.hardware import PRECISIONS, resolve_precision

__all__ = ["NearestNeighbourIndex", "METRICS", "DEFAULT_RERANK", "available_cores"]

#: candidates per query the re-ranked search takes to float32 (at least k). With the candidate distances
#: rounded relative to the distance itself (see the module docstring), 8 held the exact nearest neighbour
#: for every test patch of MVTec AD bottle (EfficientNet-Lite0, 152-d, and DINOv2 ViT-S/14, 768-d; 64 or
#: 128 principal components or every feature, fp32 or bf16) and of a 23,520-row WideResNet-50 bank
#: (1,536-d; 128 or 256 components or every feature, bf16)
DEFAULT_RERANK = 8
_SCORE_BLOCK = 2**23  # candidate scores per block of queries (bounds the temporary memory)
_GATHER_BLOCK = 2**22  # floats of gathered candidate rows per block of queries

#: metric name -> faiss metric type
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}

_FACTORY_EXAMPLES = (
    '"Flat" (exact), "IVF1024,PQ16np", "PQ16np", "HNSW32" ("np" skips the polysemous training that plain '
    "searches never use)"
)
_BYTES_MAGIC = b"ASNNIDX1"  # anomalib_study nearest-neighbour index, container version 1
_threads_set = False


def _principal_components(rows: torch.Tensor, mean: torch.Tensor, n_components: int, step: int) -> torch.Tensor:
    """(d, n_components) float32: the eigenvectors of the covariance of ``rows`` (n, d) about ``mean``
    with the largest eigenvalues, largest first (covariance summed in float64 over blocks of ``step`` rows)."""
    d = rows.shape[1]
    scatter = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
    for start in range(0, rows.shape[0], step):
        centred = rows[start : start + step] - mean
        scatter += (centred.T @ centred).double()
    _, vectors = torch.linalg.eigh(scatter)  # eigenvalues ascending
    return vectors[:, -n_components:].flip(1).float().contiguous()


_NORM_COLUMNS = 4  # columns the candidate rows gain: two ones and two parts of the squared norm


def _squared_norms(values: torch.Tensor) -> torch.Tensor:
    """(n,) float32 squared norms of the rows of ``values`` as they are stored (e.g. bfloat16)."""
    return (values.float() ** 2).sum(dim=1)


def _split(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 2) ``dtype``: float32 ``values`` as a value in ``dtype`` and the remainder, also in ``dtype``
    (their float32 sum keeps about twice the bits of one bfloat16; in float32 the remainder is 0)."""
    high = values.to(dtype)
    return torch.stack([high, (values - high.float()).to(dtype)], dim=1)


def _query_rows(centred: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Query rows whose product with the candidate bank's rows ``[b, 1, 1, |b|^2 value, |b|^2 remainder]``
    is ``|q - b|^2`` of the rows as stored in ``dtype``: ``[-2 q, |q|^2 value, |q|^2 remainder, 1, 1]``."""
    rounded = centred.to(dtype)
    ones = torch.ones(centred.shape[0], 2, dtype=dtype, device=centred.device)
    return torch.cat([rounded * -2, _split(_squared_norms(rounded), dtype), ones], dim=1)


def _lower_vectors(rows: torch.Tensor, mean: torch.Tensor, components: torch.Tensor | None) -> torch.Tensor:
    """(b, w) float32 candidate vectors of ``rows`` (b, d): centred on ``mean``; with ``components`` (d, c),
    their coordinates on the components followed by the norm of what the components leave out (w = c + 1).

    The distance between two such vectors is never more than the distance between the rows
    (Pythagoras, then the reverse triangle inequality on the left-out parts), so a candidate
    distance is a lower bound of the exact one: the certificate of :meth:`NearestNeighbourIndex.search`."""
    centred = rows - mean
    if components is None:
        return centred
    coordinates = centred @ components
    residual = centred - coordinates @ components.T  # what the components leave out, computed directly
    return torch.cat([coordinates, residual.norm(dim=1, keepdim=True)], dim=1)


_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _exact_rounding(d: int) -> float:
    """Relative allowance for float32 rounding in a distance summed over ``d`` features (16 sqrt(d) units
    in the last place: rounding errors of a sum grow like its square root; 16 is the safety margin)."""
    return 16.0 * math.sqrt(d + 1) * _UNIT_ROUNDOFF[torch.float32]


def _lower_bound(score: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, columns: int, d: int) -> torch.Tensor:
    """(b,) a lower bound of the exact distance of every bank row whose candidate score (a squared
    distance between candidate vectors, :func:`_lower_vectors`, computed in ``dtype``) is at least
    ``score`` (b,), for queries whose candidate vector norm plus the bank's largest is ``scale`` (b,).

    Allowances, each relative to ``scale``: the inputs rounded to ``dtype`` (and float32 rounding of the
    projection: ``_exact_rounding``), the products' float32 accumulation over ``columns`` + 4 columns
    with the norms split in two, and the output rounded to ``dtype``. A candidate distance is a lower
    bound of the exact one (:func:`_lower_vectors`), so rows below this bound were not left out."""
    unit = _UNIT_ROUNDOFF.get(dtype, _UNIT_ROUNDOFF[torch.bfloat16])
    low_precision = dtype != torch.float32
    inputs = (unit if low_precision else 0.0) + _exact_rounding(d + columns)
    accumulation = 16.0 * math.sqrt(columns + _NORM_COLUMNS) * _UNIT_ROUNDOFF[torch.float32] + (
        2.0**-15 if low_precision else 0.0
    )
    output = unit if low_precision else 0.0
    squared = score.float() * (1.0 - output) - accumulation * scale.float() ** 2
    return squared.clamp(min=0).sqrt() - inputs * scale.float()


def _smallest(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, r) float32 values and int64 columns of the ``r`` smallest entries of each row of ``scores`` (b, n),
    in any order. On the CPU faiss's k-selection (a heap per row, rows in parallel): with 2 threads and r = 8
    about twice as fast as torch.topk over 23,520 columns, the conversion to float32 included."""
    if scores.device.type != "cpu":
        values, ids = scores.topk(r, dim=1, largest=False, sorted=False)
        return values.float(), ids
    values, ids = faiss.kmin(scores.float().numpy(), r)
    return torch.from_numpy(values), torch.from_numpy(ids)


def _exact_squared(rows: torch.Tensor, queries: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(b, r) float32 squared distances ``|queries[i] - rows[chosen[i, j]]|^2`` (rows (n, d), queries (b, d)),
    summed from the differences (no cancellation). On the CPU faiss's ``fvec_L2sqr_by_idx`` reads the rows in
    place; elsewhere one gathered block, the differences computed in it."""
    b, r = chosen.shape
    if rows.device.type != "cpu":
        gathered = torch.index_select(rows, 0, chosen.reshape(-1)).view(b, r, rows.shape[1])
        gathered.sub_(queries[:, None, :])
        return gathered.mul_(gathered).sum(dim=2)
    out = np.empty((b, r), dtype=np.float32)
    x = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    ids = np.ascontiguousarray(chosen.numpy(), dtype=np.int64)
    faiss.fvec_L2sqr_by_idx(
        faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(rows.numpy()), faiss.swig_ptr(ids), rows.shape[1], b, r
    )
    return torch.from_numpy(out)


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
        precision: ``"fp32"`` (faiss, exact), ``"bf16"`` (bfloat16 candidates re-ranked in
            float32; ``"Flat"`` with ``metric="l2"`` only) or ``"auto"`` (bf16 where the
            device has native bfloat16 and the index is Flat L2, else fp32). See the module
            docstring.
        rerank: candidates per query re-ranked in float32 by the bf16 search (at least k
            are taken); more candidates, more often the exact neighbour.
        candidate_dim: principal components of the bank the candidate distances are
            computed on (``"Flat"`` with ``metric="l2"`` only; None = every feature). See the
            module docstring.

    Attributes (after :meth:`fit`):
        index_: the faiss index.
        dim_: feature dimension d.
        precision_used_: ``"fp32"`` or ``"bf16"``, what ``precision`` resolved to.
        candidate_dim_used_: dimensions the candidate distances use (None: faiss's own
            exact search, no candidates).
    """

    def __init__(
        self,
        factory: str = "Flat",
        metric: str = "l2",
        kmeans_reduce: int | None = None,
        seed: int = 0,
        nprobe: int | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        rerank: int = DEFAULT_RERANK,
        candidate_dim: int | None = None,
    ):
        self.factory = factory
        self.metric = metric
        self.kmeans_reduce = kmeans_reduce
        self.seed = seed
        self.nprobe = nprobe
        self.device = device
        self.precision = precision
        self.rerank = rerank
        self.candidate_dim = candidate_dim

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if not isinstance(self.factory, str) or not self.factory.strip():
            raise ParameterError(
                f"index factory must be a non-empty string such as {_FACTORY_EXAMPLES}, got {self.factory!r}"
            )
        if self.metric not in METRICS:
            raise ParameterError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.kmeans_reduce is not None and (
            isinstance(self.kmeans_reduce, bool)
            or not isinstance(self.kmeans_reduce, (int, np.integer))
            or self.kmeans_reduce < 1
        ):
            raise ParameterError(f"kmeans_reduce must be None or an integer >= 1, got {self.kmeans_reduce!r}")
        if self.nprobe is not None and (
            isinstance(self.nprobe, bool) or not isinstance(self.nprobe, (int, np.integer)) or self.nprobe < 1
        ):
            raise ParameterError(f"nprobe must be None or an integer >= 1, got {self.nprobe!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ParameterError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ParameterError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision == "bf16" and not self._flat_l2():
            raise ParameterError(
                f"precision='bf16' re-ranks the exact search only: it needs factory 'Flat' and metric 'l2', got "
                f"factory {self.factory!r}, metric {self.metric!r}; use precision='fp32' (or 'auto') with this index"
            )
        if isinstance(self.rerank, bool) or not isinstance(self.rerank, (int, np.integer)) or self.rerank < 1:
            raise ParameterError(f"rerank must be an integer >= 1 (candidates per query, e.g. 8), got {self.rerank!r}")
        if self.candidate_dim is not None:
            if (
                isinstance(self.candidate_dim, bool)
                or not isinstance(self.candidate_dim, (int, np.integer))
                or self.candidate_dim < 1
            ):
                raise ParameterError(
                    f"candidate_dim must be None (every feature) or an integer >= 1, e.g. 256, "
                    f"got {self.candidate_dim!r}"
                )
            if not self._flat_l2():
                raise ParameterError(
                    f"candidate_dim re-ranks the exact search only: it needs factory 'Flat' and metric 'l2', got "
                    f"factory {self.factory!r}, metric {self.metric!r}; pass candidate_dim=None with this index"
                )

    def _flat_l2(self) -> bool:
        return isinstance(self.factory, str) and self.factory.strip() == "Flat" and self.metric == "l2"

    def _torch_device(self) -> torch.device:
        """Where the bf16 search runs: the CUDA device when asked for and present, else the CPU."""
        if self.device.startswith("cuda") and torch.cuda.is_available():
            return torch.device(self.device)
        return torch.device("cpu")

    def _resolve_precision(self) -> str:
        if self.precision == "fp32" or (self.precision == "auto" and not self._flat_l2()):
            return "fp32"
        return resolve_precision(self.precision, self._torch_device())

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
                    f'(faiss recommends {recommended}) but the bank has {n}: use "Flat" for small banks'
                )
            if n < recommended:
                warnings.warn(
                    f"index {self.factory!r} is trained on {n} points; faiss recommends at least "
                    f'{recommended}: results may be poor, consider "Flat"',
                    stacklevel=2,
                )
            try:
                index.train(bank)
            except RuntimeError as error:
                raise ParameterError(
                    f"could not train index {self.factory!r} on {n} points of dimension {d} "
                    f'({_faiss_reason(error)}); use "Flat" for small banks'
                ) from None
        assert index.is_trained, f"faiss index {self.factory!r} is not trained after train()"
        index.add(bank)
        self.index_ = index
        self.dim_ = d
        self._apply_search_params()
        self._search_index = self._to_device(index)
        self._set_precision()
        return self

    def _reranked(self) -> bool:
        """Whether :meth:`search` is the re-ranked search (bf16 candidates, or fewer candidate dimensions)."""
        fewer = self.candidate_dim is not None and int(self.candidate_dim) < int(getattr(self, "dim_", 0) or 0)
        return getattr(self, "precision_used_", "fp32") == "bf16" or fewer

    def _reranked_fitted(self) -> bool:
        return getattr(self, "_low", None) is not None

    def _set_precision(self) -> None:
        self.searched_queries_ = 0
        self.exact_fallbacks_ = 0
        self.precision_used_ = self._resolve_precision()
        self._low = self._candidate_bank() if self._reranked() else None
        self.candidate_dim_used_ = None if self._low is None else int(self._low["width"])

    def _candidate_bank(self, dtype: torch.dtype | None = None) -> dict:
        """The re-ranked search's view of the bank: the float32 rows (faiss's own storage, not a
        copy, on the CPU), their mean, the principal components the candidates use (None: every
        feature), their number ``width``, and ``low``: each row's candidate vector (:func:`_lower_vectors`)
        in the candidate type (``dtype``, default bf16 with ``precision_used_ == "bf16"``, else float32),
        followed by 1, 1 and its squared norm split in two (:func:`_query_rows`); ``max_norm``: the
        largest norm of a candidate vector (the certificate's rounding allowance scales with it)."""
        n, d = int(self.index_.ntotal), int(self.dim_)
        device = self._torch_device()
        if dtype is None:
            dtype = torch.bfloat16 if getattr(self, "precision_used_", "fp32") == "bf16" else torch.float32
        rows = torch.from_numpy(faiss.rev_swig_ptr(self.index_.get_xb(), n * d).reshape(n, d)).to(device)
        step = max(1, _GATHER_BLOCK // d)
        with torch.inference_mode():
            mean = rows.mean(dim=0, dtype=torch.float64).float()
            components = None
            if self.candidate_dim is not None and int(self.candidate_dim) < d:
                components = _principal_components(rows, mean, int(self.candidate_dim), step)
            width = d if components is None else components.shape[1]
            columns = width if components is None else width + 1
            low = torch.empty(n, columns + _NORM_COLUMNS, dtype=dtype, device=device)
            max_norm = 0.0
            for start in range(0, n, step):
                vectors = _lower_vectors(rows[start : start + step], mean, components)
                max_norm = max(max_norm, float(vectors.norm(dim=1).max()))
                low[start : start + step, :columns] = vectors
                # [b, 1, 1, |b|^2 (value), |b|^2 (remainder)]: see _query_rows
                low[start : start + step, columns : columns + 2] = 1.0
                low[start : start + step, columns + 2 :] = _split(
                    _squared_norms(low[start : start + step, :columns]), dtype
                )
        return {
            "rows": rows,
            "mean": mean,
            "components": components,
            "low": low,
            "width": width,
            "max_norm": max_norm,
        }

    def _apply_search_params(self) -> None:
        if self.nprobe is not None:
            try:
                faiss.ParameterSpace().set_index_parameter(self.index_, "nprobe", int(self.nprobe))
            except RuntimeError:
                raise ParameterError(
                    f"nprobe applies to IVF indexes only; index {self.factory!r} has no inverted lists: "
                    "pass nprobe=None"
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
            raise ParameterError(f"k={k} is larger than the {self.ntotal} vectors in the index: use k <= {self.ntotal}")
        queries = _as_matrix("queries", queries, dim=self.dim_)
        if self._reranked():
            distances, indices, _, certified = self._reranked_search(queries, int(k))
            self.searched_queries_ = getattr(self, "searched_queries_", 0) + int(certified.size)
            self.exact_fallbacks_ = getattr(self, "exact_fallbacks_", 0) + int((~certified).sum())
            return distances, indices
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

    def _reranked_search(
        self, queries: np.ndarray, k: int, certify: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The re-ranked search of checked float32 ``queries`` (q, d): (distances (q, k), indices (q, k),
        candidates (q, r), certified (q,) bool), r = min(ntotal, k - 1 + rerank); distances Euclidean,
        exact float32. Without a candidate bank of its own (faiss's fp32 search), bf16 candidates on every
        feature (or on ``candidate_dim`` components): what the bf16 search would give.

        ``certified[i]``: the candidates provably hold query i's exact k nearest (:func:`_lower_bound`).
        With ``certify``, the other queries are searched again by faiss's exact search (their distances
        recomputed the same way as the certified ones), so every result is the exact search's."""
        low = self._low if getattr(self, "_low", None) is not None else self._candidate_bank(torch.bfloat16)
        n = low["low"].shape[0]
        d = self.dim_
        r = min(n, int(k) - 1 + int(self.rerank))
        block = max(1, min(_SCORE_BLOCK // n, _GATHER_BLOCK // (r * d)))
        _set_faiss_threads()
        q_all = torch.from_numpy(queries).to(low["rows"].device)
        distances = np.empty((queries.shape[0], k), dtype=np.float32)
        indices = np.empty((queries.shape[0], k), dtype=np.int64)
        candidates = np.empty((queries.shape[0], r), dtype=np.int64)
        certified = np.ones(queries.shape[0], dtype=bool)
        dtype = low["low"].dtype
        columns = low["low"].shape[1] - _NORM_COLUMNS
        with torch.inference_mode():
            for start in range(0, queries.shape[0], block):
                q = q_all[start : start + block]
                vectors = _lower_vectors(q, low["mean"], low["components"])
                scores = _query_rows(vectors, dtype) @ low["low"].T  # squared distances, candidate type
                if r < n:
                    values, chosen = _smallest(scores, r)
                else:
                    values, chosen = None, torch.arange(n, device=q.device).expand(q.shape[0], n)
                del scores
                best, where = _exact_squared(low["rows"], q, chosen).topk(k, dim=1, largest=False, sorted=True)
                end = start + q.shape[0]
                distances[start:end] = best.sqrt().cpu().numpy()
                indices[start:end] = chosen.gather(1, where).cpu().numpy()
                candidates[start:end] = chosen.cpu().numpy()
                if values is not None:  # every other row scored at least the largest candidate score
                    bound = _lower_bound(
                        values.max(dim=1).values, vectors.norm(dim=1) + low["max_norm"], dtype, columns, d
                    )
                    kth = best[:, -1].clamp(min=0).sqrt() * (1 + _exact_rounding(d))
                    certified[start:end] = (kth <= bound).cpu().numpy()
        if certify and not certified.all():
            self._exact_again(queries, np.flatnonzero(~certified), k, low["rows"], distances, indices)
        return distances, indices, candidates, certified

    def _exact_again(self, queries, which, k, rows, distances, indices) -> None:
        """Search ``queries[which]`` with faiss's exact search; their distances recomputed as the re-ranked
        search computes them (sums of squared differences), written into ``distances`` / ``indices``."""
        _, exact_ids = self.index_.search(queries[which], int(k))
        exact_ids = torch.from_numpy(np.ascontiguousarray(exact_ids, dtype=np.int64))
        exact = _exact_squared(rows.cpu(), torch.from_numpy(queries[which]), exact_ids)
        order = torch.sort(exact, dim=1, stable=True).indices
        distances[which] = exact.gather(1, order).clamp(min=0).sqrt().numpy()
        indices[which] = exact_ids.gather(1, order).numpy()

    def rerank_hit_rate(self, queries) -> dict:
        """How often the re-ranked search's candidates contain the exact nearest neighbour, on ``queries`` (q, d).

        Runs the candidate search (this index's own where it has one; for faiss's fp32 search,
        bf16 candidates: what ``precision="bf16"`` would give) and faiss's exact
        float32 search, and compares. A query is a hit when faiss's nearest bank row is among
        its ``rerank`` candidates, or the re-ranked nearest distance is no larger than faiss's
        (a tie: another row at the same distance). Flat L2 indexes only.

        Returns ``{"hit_rate", "n_queries", "n_hits", "rerank", "max_distance_excess"}``,
        the last being the largest (re-ranked - exact) nearest distance over the misses (0 if none).
        """
        self._check_fitted()
        if not self._flat_l2():
            raise ParameterError(
                f"rerank_hit_rate compares the bf16 search with the exact one: it needs factory "
                f"'Flat' and metric 'l2', got {self.factory!r}, {self.metric!r}"
            )
        queries = _as_matrix("queries", queries, dim=self.dim_)
        reranked, _, candidates, _ = self._reranked_search(queries, 1, certify=False)
        _set_faiss_threads()
        exact_sq, exact_ids = self.index_.search(queries, 1)
        exact = np.sqrt(np.clip(exact_sq[:, 0], 0.0, None))
        contained = (candidates == exact_ids[:, :1]).any(axis=1)
        tie = reranked[:, 0] <= exact * (1 + 1e-6) + 1e-7
        hits = contained | tie
        excess = (reranked[:, 0] - exact)[~hits]
        return {
            "hit_rate": float(hits.mean()),
            "n_queries": int(hits.size),
            "n_hits": int(hits.sum()),
            "rerank": int(min(self.ntotal, self.rerank)),
            "max_distance_excess": float(excess.max()) if excess.size else 0.0,
        }

    def describe(self) -> dict:
        """The settings to record with every result: factory, metric, kmeans_reduce, ntotal, dim, nprobe, seed,
        precision, precision_used, rerank, candidate_dim, candidate_dim_used."""
        return {
            "factory": self.factory,
            "metric": self.metric,
            "kmeans_reduce": self.kmeans_reduce,
            "ntotal": self.ntotal if hasattr(self, "index_") else None,
            "dim": getattr(self, "dim_", None),
            "nprobe": self.nprobe,
            "seed": self.seed,
            "precision": self.precision,
            "precision_used": getattr(self, "precision_used_", None),
            "rerank": self.rerank,
            "candidate_dim": self.candidate_dim,
            "candidate_dim_used": getattr(self, "candidate_dim_used_", None),
            "reranked_queries": getattr(self, "searched_queries_", 0) if self._reranked_fitted() else None,
            "exact_fallbacks": getattr(self, "exact_fallbacks_", 0) if self._reranked_fitted() else None,
        }

    # ------------------------------------------------------------------ bytes
    def _params(self) -> dict:
        return {
            "factory": self.factory,
            "metric": self.metric,
            "kmeans_reduce": self.kmeans_reduce,
            "seed": self.seed,
            "nprobe": self.nprobe,
            "precision": self.precision,
            "rerank": self.rerank,
            "candidate_dim": self.candidate_dim,
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
        self._set_precision()
        return self

    def __repr__(self) -> str:
        return (
            f"NearestNeighbourIndex(factory={self.factory!r}, metric={self.metric!r}, "
            f"kmeans_reduce={self.kmeans_reduce!r}, seed={self.seed!r}, nprobe={self.nprobe!r}, "
            f"device={self.device!r}, "
            f"precision={self.precision!r}, rerank={self.rerank!r}, candidate_dim={self.candidate_dim!r})"
        )
