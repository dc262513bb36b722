"""The physical floor of bench_patchcore.py: FLOP counts of the backbone forward and the bank
search, the measured matrix-product throughput, the time that work takes at it (``limit_ratio`` =
measured / floor), the re-rank hit rate and the coreset-precision check.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from patchcore_bench_data import CORESET_RATIO, HIT_RATE_QUERIES, MATMUL_SHAPE, SEED


# --------------------------------------------------------------------------------------
# The physical floor: FLOPs and the measured matrix-product throughput
# --------------------------------------------------------------------------------------
def matmul_throughput(
    shape: Sequence[int] = MATMUL_SHAPE, repeats: int = 3, seed: int = SEED, budget_s: float = 1.0
) -> dict:
    """Measured ``torch.mm`` throughput in GFLOP/s, float32 and bfloat16, with this process's threads.

    One untimed warm-up product per type, then the median of up to ``repeats`` timed ones of
    an (m, k) x (k, n) product (2 m k n FLOPs), stopping early once ``budget_s`` seconds are
    spent (at least one; emulated bf16 is slow).
    """
    import statistics

    import torch

    m, k, n = (int(v) for v in shape)
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    out: dict[str, Any] = {"shape_mkn": [m, k, n], "repeats": repeats, "torch_threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)
        times: list[float] = []
        while len(times) < repeats and (not times or sum(times) < budget_s):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        out[f"{name}_timed_products"] = len(times)
        out[f"{name}_gflops"] = 2.0 * m * k * n / statistics.median(times) / 1e9
    return out


def forward_flops_per_image(module, layers: Sequence[str]) -> int:
    """FLOPs of one image through ``module`` up to ``layers`` (torch's FlopCounterMode; the
    same count in fp32 and under bf16 autocast)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = int(module.image_size)
    x = torch.zeros(1, 3, side, side, device=module.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x, layers=list(layers), embedding=False)
    return int(counter.get_total_flops())


def search_flops(n_queries: int, bank_rows: int, dim: int, rerank: int = 0, candidate_dim: int | None = None) -> dict:
    """FLOPs of an exhaustive search: ``products`` = 2 q N d' (the distance products, d' = ``candidate_dim``
    or d), ``projection`` = 2 q d d' (the queries onto d' < d principal components, else 0),
    ``rerank`` = 3 q r d (exact float32 distances of r candidates: subtract, square, add)."""
    width = int(dim) if candidate_dim is None else min(int(candidate_dim), int(dim))
    return {
        "products": 2 * int(n_queries) * int(bank_rows) * width,
        "projection": 2 * int(n_queries) * int(dim) * width if width < int(dim) else 0,
        "rerank": 3 * int(n_queries) * int(rerank) * int(dim),
    }


def physical_floor(n_images: int, forward_flops: int, searched: dict, throughput: dict, precision: str) -> dict:
    """Seconds the forward's and the search's floating-point work take at the measured throughput.

    ``precision`` "fp32": everything at the fp32 rate; "bf16": the forward and the search
    products at the bf16 rate, the query projection and the re-ranking at the fp32 rate.
    """
    rate = throughput[f"{precision}_gflops"] * 1e9
    forward_s = n_images * forward_flops / rate
    fp32_work = searched["rerank"] + searched.get("projection", 0)
    search_s = searched["products"] / rate + fp32_work / (throughput["fp32_gflops"] * 1e9)
    return {
        "precision": precision,
        "forward_gflop": n_images * forward_flops / 1e9,
        "search_gflop": (searched["products"] + fp32_work) / 1e9,
        "throughput_gflops": throughput[f"{precision}_gflops"],
        "forward_floor_s": forward_s,
        "search_floor_s": search_s,
        "floor_s": forward_s + search_s,
    }


def floor_of_predict(model, module, layers, n_images: int, predict_s: float, throughput: dict) -> dict:
    """The floor of one predict run of ``model`` (fitted) on ``n_images`` images, and limit_ratio."""
    per_image = model.grid_shape_[0] * model.grid_shape_[1]
    width = model.index_.candidate_dim_used_  # None: faiss's own exact search, nothing re-ranked
    rerank = 0 if width is None else min(model.index_.ntotal, max(1, model.index_.rerank))
    # every patch searched with k = 1, then each image's m* with k = num_neighbours (a k-search costs the same)
    searched = search_flops(n_images * (per_image + 1), model.index_.ntotal, model.n_features_in_, rerank, width)
    floor = physical_floor(
        n_images, forward_flops_per_image(module, layers), searched, throughput, model.precision_used_
    )
    floor["predict_s"] = predict_s
    floor["limit_ratio"] = predict_s / floor["floor_s"] if floor["floor_s"] > 0 else None
    return floor


def rerank_hit_rate_of(model, patches, seed: int = SEED, n_queries: int = HIT_RATE_QUERIES) -> dict:
    """The bf16 re-rank hit rate of ``model``'s bank on a seeded sample of ``patches`` (n, p, D)."""
    import numpy as np

    rows = patches.reshape(-1, patches.shape[-1])
    pick = np.sort(np.random.default_rng(seed).choice(rows.shape[0], size=min(n_queries, rows.shape[0]), replace=False))
    return model.index_.rerank_hit_rate(rows[pick])


def coreset_precision_check(
    features,
    ratio: float = CORESET_RATIO,
    projection_dim: int = 128,
    seed: int = SEED,
    precisions: Sequence[str] = ("fp32", "bf16", "fp16"),
) -> dict:
    """The greedy coreset of ``features`` (N, D) with each distance-update precision: seconds,
    share of the fp32 selection chosen too, and covering radius (largest distance of a row to
    its nearest centre, in the projected space, exact faiss search) relative to fp32's."""

    from anomalib_study.methods.coreset import GreedyCoresetSampler, selection_overlap
    from anomalib_study.search import NearestNeighbourIndex

    out: dict[str, Any] = {
        "n_rows": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "ratio": ratio,
        "projection_dim": projection_dim,
    }
    projected = GreedyCoresetSampler(ratio=ratio, projection_dim=projection_dim, seed=seed).project(features).numpy()
    reference = None
    for precision in precisions:
        sampler = GreedyCoresetSampler(ratio=ratio, projection_dim=projection_dim, seed=seed, precision=precision)
        start = time.perf_counter()
        chosen = sampler.run(features)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = chosen
        index = NearestNeighbourIndex().fit(projected[chosen])
        radius = float(index.search(projected, 1)[0].max())
        out[precision] = {
            "seconds": seconds,
            "n_centres": int(len(chosen)),
            "overlap_with_fp32": selection_overlap(chosen, reference),
            "covering_radius": radius,
        }
    for precision in precisions:
        out[precision]["covering_radius_vs_fp32"] = (
            out[precision]["covering_radius"] / out[precisions[0]]["covering_radius"]
        )
        out[precision]["speedup_vs_fp32"] = out[precisions[0]]["seconds"] / out[precision]["seconds"]
    return out
