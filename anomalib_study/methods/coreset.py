"""Memory-bank subsampling for PatchCore: small classes with one verb, ``run(features) -> indices``.

:class:`GreedyCoresetSampler` is the approximate greedy k-centre coreset of Roth et al.,
"Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022), Alg. 1, as in
amazon-science/patchcore-inspection (``sampler.py``): the features are first reduced by a
random (Johnson-Lindenstrauss) projection, then centres are picked one at a time, each
time the point farthest from the centres already chosen.

Memory stays O(N * projection_dim): it keeps the projected features, one (N,) vector of
every point's distance to its nearest centre and one (N,) vector of which centre that is;
never an N x N (or N x M) distance matrix, the failure reported for several public
implementations. Distances to a new centre are only computed for the points it can
possibly be closer to (triangle inequality: a point whose nearest centre ``a`` satisfies
``||c_new - c_a|| >= 2 * d(x, c_a)`` cannot get closer), in chunks of ``chunk_size`` rows;
the result is the same as the plain greedy algorithm (up to floating-point ties).
Where that pruning does not pay (real patch features), each pass over the features computes
the distances to the 64 points of largest distance at once (one matrix product costs about
what one matrix-vector product does: the pass is memory-bound), and the greedy steps run on
them while the farthest point is among those 64 (:meth:`GreedyCoresetSampler._greedy_batched`):
3.4x less time. Its products come from a matrix-matrix kernel, equal to the matrix-vector
loop's up to float rounding, so a near-tie for the farthest point can go the other way and
the selection differ from then on: the same patches on MVTec AD bottle (EfficientNet-Lite0 at
320 px, 334,400 patches, 10 %: the same 33,440; near-tied pairs may come in the other order),
but on Magnetic-tile DINOv2 at 224 px (175,360 patches, 17,536 kept) step 479 chose
differently and 2 of the 17,536 differ (:func:`selection_overlap` 0.99989; the report's image
AUROC 0.93796 -> 0.93809), and on Magnetic-tile DINOv2 at 320 px squashed (331,540 patches,
1 %: 3,315 kept) step 666 did and 158 differ (overlap 0.952; image AUROC 0.91984 -> 0.92107,
pixel AUROC 0.75432 -> 0.75538; with the loop's selection the current code gives the earlier
figures within 2.6e-6). The loop's figures are no steadier across machines: the same loop code
gave image AUROC 0.93407 on an AMD EPYC and 0.93626 on an Intel Xeon (KolektorSDD DINOv2 at
448 px aspect-kept, 1 %; where the features' last bits were amplified was not measurable here).

``precision="bf16"`` or ``"fp16"`` keeps the projected features in that type (half the
memory, and the one pass per centre reads half the bytes; faster where the matrix-vector
product is memory-bound): they are centred on their mean and scaled by a power of two first
(distances unchanged up to that scale; float16 cannot overflow), norms and minima stay
float32. The rounding changes which point is farthest now and then, so the selection can
differ from the float32 one: :func:`selection_overlap` measures how much.

:class:`RandomSampler` draws a uniform random subset (the ablation baseline).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anomalib_study.errors import ParameterError

_PRUNE_PATIENCE = 20  # consecutive steps of little pruning before switching to the plain update

__all__ = [
    "BaseSampler",
    "GreedyCoresetSampler",
    "RandomSampler",
    "SAMPLERS",
    "COVERAGE_PRECISIONS",
    "coreset_size",
    "selection_overlap",
]

#: values of GreedyCoresetSampler's ``precision``: the type the projected features are kept in
COVERAGE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
        raise ParameterError(f"coreset ratio must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < float(ratio) <= 1.0:
        raise ParameterError(f"coreset ratio must be in (0, 1] (e.g. 0.01, 0.1, 0.25, 1.0), got {ratio}")
    return float(ratio)


def coreset_size(n: int, ratio: float) -> int:
    """Number of points kept from ``n`` at ``ratio``: ``max(1, int(n * ratio))`` (all of them at 1.0)."""
    ratio = _check_ratio(ratio)
    return n if ratio >= 1.0 else max(1, min(n, int(n * ratio)))


def selection_overlap(selected, reference) -> float:
    """Share of the ``reference`` selection (e.g. the float32 coreset) also in ``selected``, in [0, 1]."""
    selected, reference = np.asarray(selected).ravel(), np.asarray(reference).ravel()
    if reference.size == 0:
        raise ParameterError("selection_overlap needs a non-empty reference selection")
    return float(np.isin(reference, selected).sum() / reference.size)


def _as_features(features: Any) -> torch.Tensor:
    """(N, D) float32 CPU/any-device tensor view or copy of ``features``; ParameterError if malformed."""
    if isinstance(features, torch.Tensor):
        tensor = features.detach()
    else:
        try:
            tensor = torch.from_numpy(np.asarray(features, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise ParameterError(f"features must be a 2-D array of numbers (N, D): {error}") from None
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ParameterError(f"features must be a non-empty 2-D array (N, D), got shape {tuple(tensor.shape)}")
    return tensor.float()


class BaseSampler:
    """A memory-bank sampler: ``run(features (N, D)) -> indices (M,)`` int64, sorted by selection order."""

    ratio: float

    def run(self, features) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({args})"


class RandomSampler(BaseSampler):
    """Uniform random subset of ``coreset_size(N, ratio)`` rows, without replacement, seeded."""

    def __init__(self, ratio: float = 0.1, seed: int = 0):
        self.ratio = ratio
        self.seed = seed

    def run(self, features) -> np.ndarray:
        """Indices (M,) int64 of the kept rows of ``features`` (N, D); ``ratio=1`` keeps all, in order."""
        n = _as_features(features).shape[0]
        m = coreset_size(n, self.ratio)
        if m == n:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng(self.seed).choice(n, size=m, replace=False).astype(np.int64)


class GreedyCoresetSampler(BaseSampler):
    """Approximate greedy k-centre coreset (PatchCore Alg. 1).

    Args:
        ratio: share of the rows kept, in (0, 1]; 1.0 returns every row (no work done).
        projection_dim: dimension of the random Gaussian projection the distances are
            computed in (128 in the paper); ``None``, or a value >= D, uses the features
            as they are (exact greedy k-centre).
        seed: seeds the projection and the random first centre.
        device: where the distances are computed (``"cpu"``, ``"cuda"``).
        chunk_size: rows per distance computation (bounds the temporary memory).
        progress: show a tqdm bar over the selected centres.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the type the projected
            features are kept in and the distance updates read (see the module docstring).
        batch_centres: distance rows computed per pass over the features once pruning stops
            paying (float32; :meth:`_greedy_batched`; at most half the projected dimension, so
            that they never take more than half the features' memory); 1: one matrix-vector
            pass per centre.

    ``run(features (N, D)) -> indices (M,)`` int64 in the order the centres were chosen
    (the first one is the random start). Deterministic for a seed.
    """

    def __init__(
        self,
        ratio: float = 0.1,
        projection_dim: int | None = 128,
        seed: int = 0,
        device: str = "cpu",
        chunk_size: int = 65536,
        progress: bool = False,
        precision: str = "fp32",
        batch_centres: int = 64,
    ):
        self.ratio = ratio
        self.batch_centres = batch_centres
        self.projection_dim = projection_dim
        self.seed = seed
        self.device = device
        self.chunk_size = chunk_size
        self.progress = progress
        self.precision = precision

    def _check(self) -> None:
        _check_ratio(self.ratio)
        if self.projection_dim is not None and (
            isinstance(self.projection_dim, bool)
            or not isinstance(self.projection_dim, (int, np.integer))
            or self.projection_dim < 1
        ):
            raise ParameterError(f"projection_dim must be None or an integer >= 1, got {self.projection_dim!r}")
        if (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, (int, np.integer))
            or self.chunk_size < 1
        ):
            raise ParameterError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ParameterError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.precision, str) or self.precision not in COVERAGE_PRECISIONS:
            raise ParameterError(
                f"coreset precision must be one of {', '.join(COVERAGE_PRECISIONS)}, got {self.precision!r}"
            )

    def project(self, features) -> torch.Tensor:
        """(N, D) -> (N, projection_dim) float32 on ``device``: ``features @ W``, W ~ N(0, 1/projection_dim).

        Returns the features unchanged (as float32) when ``projection_dim`` is None or >= D.
        The projection is applied in chunks so that no float64 or extra full copy is made.
        """
        from anomalib_study.backbones import resolve_device

        self._check()
        x = _as_features(features)
        device = resolve_device(self.device)
        n, d = x.shape
        if self.projection_dim is None or self.projection_dim >= d:
            return x.to(device, dtype=torch.float32).contiguous()
        generator = torch.Generator().manual_seed(int(self.seed))
        weights = torch.randn(d, int(self.projection_dim), generator=generator) / math.sqrt(self.projection_dim)
        weights = weights.to(device)
        out = torch.empty(n, int(self.projection_dim), dtype=torch.float32, device=device)
        for start in range(0, n, self.chunk_size):
            out[start : start + self.chunk_size] = x[start : start + self.chunk_size].to(device) @ weights
        return out

    def run(self, features) -> np.ndarray:
        """Indices (M,) int64 of the coreset rows of ``features`` (N, D), M = ``coreset_size(N, ratio)``."""
        self._check()
        n = _as_features(features).shape[0]
        m = coreset_size(n, self.ratio)
        if m == n:
            return np.arange(n, dtype=np.int64)
        with torch.inference_mode():
            x = self.project(features)
            if self.precision != "fp32":
                x = self._low_precision(x)
            threads = torch.get_num_threads()
            # on the CPU the one large pass per centre is numpy's BLAS (its own threads); the
            # rest are small vector ops, where torch's OpenMP threads only add synchronisation
            # and fight the BLAS threads for the cores (2.8x slower measured on 2 cores)
            if x.device.type == "cpu":
                torch.set_num_threads(1)
            try:
                return self._greedy(x, m)
            finally:
                torch.set_num_threads(threads)

    def _low_precision(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` centred, scaled by a power of two (largest norm in [1, 2)) and cast to ``precision``, in chunks."""
        mean = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for start in range(0, x.shape[0], self.chunk_size):
            mean += x[start : start + self.chunk_size].sum(dim=0, dtype=torch.float64)
        mean = (mean / x.shape[0]).float()
        largest = max(
            float((x[start : start + self.chunk_size] - mean).norm(dim=1).max())
            for start in range(0, x.shape[0], self.chunk_size)
        )
        scale = 2.0 ** -math.floor(math.log2(largest)) if largest > 0 else 1.0
        out = torch.empty(x.shape, dtype=COVERAGE_PRECISIONS[self.precision], device=x.device)
        for start in range(0, x.shape[0], self.chunk_size):
            out[start : start + self.chunk_size] = (x[start : start + self.chunk_size] - mean) * scale
        return out

    def _sq_dist_to(self, x: torch.Tensor, norms: torch.Tensor, rows: torch.Tensor | None, pick: int) -> torch.Tensor:
        """Squared distances of ``x[rows]`` (all rows if None) to ``x[pick]``: ``|x|^2 - 2 x.c + |c|^2``
        with precomputed ``norms`` (one matrix-vector product: one read of the rows, no
        (rows, D) temporary), clamped at 0; gathered rows are processed in chunks.

        On the CPU the product goes through numpy (OpenBLAS ``sgemv``), which reads a tall
        (N, 128) float32 matrix about 3x faster than ``torch.mv`` (MKL) on this kind of
        machine: 10 ms against 31 ms for 537,040 rows, and the greedy loop is one such pass
        per centre (``benchmarks/bench_patchcore.py`` measures the whole sampler).
        """
        centre = x[pick]
        if x.dtype != torch.float32:  # bf16 / fp16 rows: torch's product in that type, the rest in float32
            if rows is None:
                out = norms.clone().add_((x @ centre).float(), alpha=-2.0)
            else:
                out = norms[rows]
                for start in range(0, rows.shape[0], self.chunk_size):
                    chunk = rows[start : start + self.chunk_size]
                    out[start : start + self.chunk_size].add_((x[chunk] @ centre).float(), alpha=-2.0)
        elif x.device.type == "cpu":
            xn, cn = x.numpy(), centre.numpy()
            if rows is None:
                dots = torch.from_numpy(xn @ cn)
                out = norms.clone()
            else:
                rn = rows.numpy()
                dots = torch.empty(rn.shape[0], dtype=torch.float32)
                for start in range(0, rn.shape[0], self.chunk_size):
                    dots[start : start + self.chunk_size] = torch.from_numpy(
                        xn[rn[start : start + self.chunk_size]] @ cn
                    )
                out = norms[rows]
            out.add_(dots, alpha=-2.0)
        elif rows is None:
            out = torch.addmv(norms, x, centre, alpha=-2.0)
        else:
            out = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
            for start in range(0, rows.shape[0], self.chunk_size):
                chunk = rows[start : start + self.chunk_size]
                out[start : start + self.chunk_size] = torch.addmv(norms[chunk], x[chunk], centre, alpha=-2.0)
        return out.add_(norms[pick]).clamp_(min=0.0)

    def _greedy(self, x: torch.Tensor, m: int) -> np.ndarray:
        n = x.shape[0]
        start = int(np.random.default_rng(self.seed).integers(n))
        selected = torch.empty(m, dtype=torch.int64, device=x.device)
        selected[0] = start
        # min_sq[i]: squared distance of point i to its nearest centre; nearest[i]: which centre (0..m-1)
        if x.dtype != torch.float32:  # float32 norms of the rounded values
            norms = torch.cat(
                [(x[i : i + self.chunk_size].float() ** 2).sum(dim=1) for i in range(0, x.shape[0], self.chunk_size)]
            )
        else:
            norms = (
                (x * x).sum(dim=1)
                if x.shape[0] * x.shape[1] <= 4 * self.chunk_size * 128
                else torch.cat(
                    [(x[i : i + self.chunk_size] ** 2).sum(dim=1) for i in range(0, x.shape[0], self.chunk_size)]
                )
            )
        min_sq = self._sq_dist_to(x, norms, None, start)
        min_sq[start] = 0.0
        nearest = torch.zeros(n, dtype=torch.int32, device=x.device)
        centres = torch.empty(m, x.shape[1], dtype=torch.float32, device=x.device)
        centres[0] = x[start]
        bar = tqdm(total=m, initial=1, desc="greedy coreset", unit="centre", disable=not self.progress, leave=False)
        wide = 0  # recent steps where pruning could not skip most points
        try:
            for step in range(1, m):
                if wide >= _PRUNE_PATIENCE:
                    # pruning does not pay on these features (common for real patch features): finish
                    # with the plain update, one matrix-vector pass and an in-place minimum per centre
                    return self._greedy_plain(x, norms, min_sq, selected, step, m, bar)
                pick = int(torch.argmax(min_sq))
                selected[step] = pick
                centre = x[pick]
                centres[step] = centre
                # centre-to-centre squared distances, then the points the new centre can win:
                # ||c - c_a|| < 2 d(x, c_a)  <=>  ||c - c_a||^2 < 4 d^2
                cc_sq = ((centres[:step] - centre) ** 2).sum(dim=1)
                can_win = cc_sq[nearest] < 4.0 * min_sq
                n_candidates = int(can_win.sum())
                wide = wide + 1 if n_candidates > n // 4 else 0
                if n_candidates > n // 2:  # little to prune: one contiguous pass is cheaper than a gather
                    new_sq = self._sq_dist_to(x, norms, None, pick)
                    closer = new_sq < min_sq
                    torch.where(closer, new_sq, min_sq, out=min_sq)
                    nearest[closer] = step
                elif n_candidates:
                    candidates = torch.nonzero(can_win).squeeze(1)
                    new_sq = self._sq_dist_to(x, norms, candidates, pick)
                    closer = new_sq < min_sq[candidates]
                    won = candidates[closer]
                    min_sq[won] = new_sq[closer]
                    nearest[won] = step
                min_sq[pick] = 0.0  # exactly, whatever the rounding
                bar.update(1)
        finally:
            bar.close()
        return selected.cpu().numpy()

    def _greedy_plain(self, x, norms, min_sq, selected, first_step, m, bar) -> np.ndarray:
        """The rest of the greedy selection from ``first_step`` on, without pruning (same result):
        :meth:`_greedy_batched` for float32 rows, else one matrix-vector pass per centre."""
        if x.dtype == torch.float32 and self.batch_centres > 1:
            return self._greedy_batched(x, norms, min_sq, selected, first_step, m, bar)
        for step in range(first_step, m):
            pick = int(torch.argmax(min_sq))
            selected[step] = pick
            torch.minimum(min_sq, self._sq_dist_to(x, norms, None, pick), out=min_sq)
            min_sq[pick] = 0.0
            bar.update(1)
        return selected.cpu().numpy()

    def _greedy_batched(self, x, norms, min_sq, selected, first_step, m, bar) -> np.ndarray:
        """The plain greedy selection, ``batch_centres`` distance rows per pass over the features.

        The pass over the (N, p) features is memory-bound: distances to K points cost about what
        distances to one cost. So each pass computes the distances of every point to the K points
        of largest ``min_sq`` (one matrix product), and the greedy steps then run on them while
        each step's farthest point (``argmax``, as before) is one of those K; the first step
        whose farthest point is not starts the next pass. Every step updates ``min_sq`` as the
        plain loop does (``|x|^2 - 2 x.c + |c|^2``, clamped at 0), but with the products of a
        matrix-matrix instead of a matrix-vector kernel, equal up to float rounding: where two
        points are that near a tie for the farthest, the step can pick the other one (see the
        module docstring for where that was measured)."""
        step = first_step
        on_cpu = x.device.type == "cpu"
        rows = x.numpy() if on_cpu else x
        pick = int(torch.argmax(min_sq))
        while step < m:
            # K distance rows at most half the bytes of the features: memory stays O(N * p)
            k = min(int(self.batch_centres), max(1, x.shape[1] // 2), m - step, x.shape[0])
            top = torch.topk(min_sq, k).indices
            if not bool((top == pick).any()):  # ties at the top: keep argmax's choice among the K
                top[-1] = pick
            column = {int(t): j for j, t in enumerate(top.tolist())}
            if on_cpu:  # (K, N) products, numpy's BLAS (its own threads) reading the features once
                dots = torch.from_numpy(np.dot(rows[top.numpy()], rows.T))
            else:
                dots = x[top] @ x.T
            while step < m and pick in column:
                selected[step] = pick
                distances = norms.clone().add_(dots[column[pick]], alpha=-2.0).add_(norms[pick]).clamp_(min=0.0)
                torch.minimum(min_sq, distances, out=min_sq)
                min_sq[pick] = 0.0
                step += 1
                bar.update(1)
                pick = int(torch.argmax(min_sq))
        return selected.cpu().numpy()


#: sampler name -> class (the ``sampler`` parameter of PatchCore)
SAMPLERS = {"greedy": GreedyCoresetSampler, "random": RandomSampler}
