"""Our side of bench_patchcore.py, in the measuring process (``python benchmarks/bench_patchcore.py
--our-side ...``): our PatchCore's fit + predict, the predict-only timing against a random bank, and the
coreset-precision check on real patches; and the ``--quick`` smoke run, all of it in one process.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from patchcore_bench_data import (
    BACKBONE,
    CORESET_RATIO,
    LAYERS,
    MATMUL_SHAPE,
    PRECISIONS,
    QUICK_MATMUL_SHAPE,
    SEED,
    cpu_seconds,
    load_average,
    log,
    magnetic_tile_lists,
    make_tiny_magnetic_tile,
    parse_setting,
    peak_rss_mb,
    random_wide_resnet_weights,
    search_kwargs,
)
from patchcore_bench_floor import coreset_precision_check, floor_of_predict, matmul_throughput, rerank_hit_rate_of
from patchcore_bench_report import machine_info


# --------------------------------------------------------------------------------------
# Our side (subprocess: `python benchmarks/bench_patchcore.py --our-side ...`)
# --------------------------------------------------------------------------------------
def coreset_check_on_images(
    train_paths: Sequence[Path],
    backbone: str = BACKBONE,
    weights: Path | None = None,
    layers: Sequence[str] | None = LAYERS,
    image_size: int | None = None,
    ratio: float = CORESET_RATIO,
) -> dict:
    """:func:`coreset_precision_check` on the patch features of ``train_paths`` (fp32 forward)."""
    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import PatchCore

    module = load_backbone(backbone, weights=weights, image_size=image_size)
    model = PatchCore(backbone=module, layers=None if layers is None else list(layers), progress=False)
    patches, _ = model.extract_patches(list(train_paths))
    check = coreset_precision_check(patches.reshape(-1, patches.shape[-1]), ratio=ratio)
    check["n_images"] = len(train_paths)
    return check


def our_side(
    train_paths: Sequence[Path],
    test_paths: Sequence[Path],
    backbone: str = BACKBONE,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] | None = LAYERS,
    coreset_ratio: float = CORESET_RATIO,
    image_size: int | None = None,
    batch_size: int = 8,
    threads: int = 0,
    device: str = "cpu",
    progress: bool = False,
    precision: str = "fp32",
    matmul_shape: Sequence[int] = MATMUL_SHAPE,
) -> dict:
    """Our PatchCore timed like anomalib_side.py: fit_paths on ``train_paths`` then score_paths on ``test_paths``.

    The backbone is loaded BEFORE the clocks start (anomalib's model is also built before
    its fit). Every training image goes into the bank (``calibration_fraction=0``, as in
    anomalib and the paper); ``num_neighbours=9`` as anomalib. ``fit_s`` is the wall time of
    ``fit_paths`` (decode + backbone + patch features + coreset + exact faiss index);
    ``predict_*`` cover ``score_paths`` (decode + backbone + search + both image scores +
    smoothed anomaly maps). Peak memory is this process's ru_maxrss (MiB). ``precision`` is
    PatchCore's; after the timed predict (untimed): the matrix-product throughput, the
    predict's physical floor and ``limit_ratio``, and the re-rank hit rate on the real bank.
    """
    import torch

    from anomalib_study import __version__
    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import PatchCore

    precision, search_dim = parse_setting(precision)
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "side": "anomalib_study",
        "anomalib_study": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "load_average_start": load_average(),
        "rss_after_imports_mb": peak_rss_mb(),
    }
    module = load_backbone(backbone, weights=weights, device=device, image_size=image_size)
    result["rss_after_model_mb"] = peak_rss_mb()
    model = PatchCore(
        backbone=module,
        layers=None if layers is None else list(layers),
        coreset_ratio=coreset_ratio,
        calibration_fraction=0.0,
        num_neighbours=9,
        batch_size=batch_size,
        device=device,
        progress=progress,
        precision=precision,
        **search_kwargs(search_dim),
    )
    result["parameters"] = {k: v for k, v in model.get_params().items() if k != "backbone"}
    result["parameters"].update(
        backbone=backbone,
        weights=None if weights is None else str(weights),
        layers=model._patch_maker().resolve_layers(module),
        preprocessing=module.preprocessing,
    )
    cpu_start, start = cpu_seconds(), time.perf_counter()
    model.fit_paths(train_paths)
    fit_s = time.perf_counter() - start
    timings = dict(model.timings_)
    result.update(
        {
            "fit_s": fit_s,
            "fit_cpu_s": cpu_seconds() - cpu_start,
            "fit_extract_s": timings.get("extract_s"),
            "fit_coreset_s": timings.get("coreset_s"),
            "fit_index_s": timings.get("index_s"),
            "bank_rows": int(model.n_train_patches_),
            "bank_dim": int(model.n_features_in_),
            "bank_mb": model.n_train_patches_ * model.n_features_in_ * 4 / 2**20,
            "coreset_rows": int(model.memory_bank_.shape[0]),
            "coreset_s_per_train_image": (timings.get("coreset_s") or 0.0) / max(len(train_paths), 1),
            "peak_rss_after_fit_mb": peak_rss_mb(),
            "load_average_after_fit": load_average(),
        }
    )
    if test_paths:
        cpu_start, start = cpu_seconds(), time.perf_counter()
        scored = model.score_paths(test_paths)
        predict_s = time.perf_counter() - start
        result.update(
            {
                "predict_cpu_s": cpu_seconds() - cpu_start,
                "predict_s": predict_s,
                "predict_images_per_s": len(test_paths) / predict_s,
                "image_scores": [float(v) for v in scored["image_scores"]],
                "anomaly_map_shape": list(scored["anomaly_maps"].shape[1:]),
                "load_average_after_predict": load_average(),
            }
        )
    result["peak_rss_mb"] = peak_rss_mb()  # before the untimed extras below
    result["precision_used"] = model.precision_used_
    if test_paths:
        layers_used = model._patch_maker().resolve_layers(module)
        result["matmul_throughput"] = matmul_throughput(matmul_shape)
        result["floor"] = floor_of_predict(
            model, module, layers_used, len(test_paths), result["predict_s"], result["matmul_throughput"]
        )
        result["limit_ratio"] = result["floor"]["limit_ratio"]
        sample, _ = model.extract_patches(test_paths[:batch_size])
        result["rerank_hit_rate"] = rerank_hit_rate_of(model, sample)
    result["peak_memory_note"] = "ru_maxrss of this process (resident-set high-water mark, MiB)"
    return result


def our_predict_only(
    test_paths: Sequence[Path],
    bank_rows: int,
    backbone: str = BACKBONE,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] | None = LAYERS,
    batch_size: int = 8,
    threads: int = 0,
    device: str = "cpu",
    seed: int = SEED,
    precision: str = "fp32",
    image_size: int | None = None,
    matmul_shape: Sequence[int] = MATMUL_SHAPE,
    train_paths: Sequence[Path] | None = None,
) -> dict:
    """Our predict timing only, as anomalib_side.py's ``--bank-rows``: a memory bank of
    ``bank_rows`` rows, one untimed warm-up batch, then ``score_paths`` on every test image, in
    ``precision``. With ``train_paths``, the bank is a seeded random 10 % of their real patches (the
    coreset's shape and the patches' own distribution, without the greedy selection's cost: the
    certified search's cost depends on the data, not only on the shape); without, ``bank_rows``
    seeded random normal rows (the exhaustive search's cost depends on the shape only).
    Then (untimed) the matrix-product throughput of this process, the floor and ``limit_ratio``,
    and the re-rank hit rate against this random bank (``rerank_hit_rate_random_bank``: not
    representative of real banks; the fit runs measure it on a real one)."""
    import numpy as np
    import torch

    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import PatchCore

    setting = precision
    precision, search_dim = parse_setting(setting)
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "side": "anomalib_study",
        "mode": "predict only (random bank of the coreset's shape)",
        "torch_threads": torch.get_num_threads(),
        "n_test": len(test_paths),
        "load_average_start": load_average(),
        "rss_after_imports_mb": peak_rss_mb(),
    }
    module = load_backbone(backbone, weights=weights, device=device, image_size=image_size)
    model = PatchCore(
        backbone=module,
        layers=None if layers is None else list(layers),
        coreset_ratio=1.0,
        calibration_fraction=0.0,
        num_neighbours=9,
        batch_size=batch_size,
        device=device,
        progress=False,
        precision=precision,
        **search_kwargs(search_dim),
    )
    warm, grid = model.extract_patches(test_paths[:batch_size])  # warm-up batch; gives the grid and dimension
    if train_paths:
        model.set_params(sampler="random", coreset_ratio=CORESET_RATIO)
        model.fit_paths(list(train_paths))
        result["mode"] = "predict only (a random 10 % of the training images' patches: the coreset's shape)"
    else:
        per_image = grid[0] * grid[1]
        n_images = -(-bank_rows // per_image)
        bank = np.random.default_rng(seed).standard_normal((n_images, per_image, warm.shape[2]), dtype=np.float32)
        model.fit(bank, grid_shape=grid)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    model.score_paths(test_paths)
    predict_s = time.perf_counter() - start
    result.update(
        {
            "bank_rows": int(model.memory_bank_.shape[0]),
            "bank_dim": int(model.n_features_in_),
            "predict_cpu_s": cpu_seconds() - cpu_start,
            "predict_s": predict_s,
            "predict_images_per_s": len(test_paths) / predict_s,
            "load_average_after_predict": load_average(),
            "peak_rss_mb": peak_rss_mb(),
            "precision": setting,
            "precision_used": model.precision_used_,
            "search_dim_used": model.index_.candidate_dim_used_,
        }
    )
    result["matmul_throughput"] = matmul_throughput(matmul_shape)
    result["floor"] = floor_of_predict(
        model,
        module,
        model._patch_maker().resolve_layers(module),
        len(test_paths),
        predict_s,
        result["matmul_throughput"],
    )
    result["limit_ratio"] = result["floor"]["limit_ratio"]
    result["exact_fallbacks"] = model.index_.describe().get("exact_fallbacks")
    if model.index_.candidate_dim_used_ is not None and not train_paths:  # re-ranked: how often exact (random bank)
        result["rerank_hit_rate_random_bank"] = rerank_hit_rate_of(model, warm)
    elif model.index_.candidate_dim_used_ is not None:
        result["rerank_hit_rate"] = rerank_hit_rate_of(model, warm)
    return result


# --------------------------------------------------------------------------------------
# The --quick smoke run
# --------------------------------------------------------------------------------------
def quick(work: Path, out: Path | None = None, precisions: Sequence[str] = PRECISIONS) -> dict:
    """The ``--quick`` smoke run: our side only, in this process, on a tiny generated Magnetic-tile
    tree (6 training, 4 test tiles), a random ResNet-18 at 64 px; every figure of the full run
    (fit, predict, floor, limit_ratio, re-rank hit rate, coreset precision), none meaningful
    as a speed measurement. Writes ``out`` when given."""
    import warnings

    from anomalib_study.io import write_json

    data = make_tiny_magnetic_tile(work / "tiny_data")
    train, test = magnetic_tile_lists(data, n_train=6, n_test=4)
    weights = random_wide_resnet_weights(work, arch="resnet18")
    options = {"backbone": "resnet18", "weights": weights, "layers": ("layer2", "layer3"), "image_size": 64}
    report: dict[str, Any] = {
        "benchmark": "bench_patchcore --quick (smoke run, not a measurement)",
        "quick": True,
        "machine": machine_info(),
        "precisions": list(precisions),
        "ours_by_precision": {},
        "predict_only_by_precision": {},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="precision='bf16'")  # emulated bf16 on this CPU: expected
        for precision in precisions:
            log(f"quick: our fit + predict, {precision} ...")
            fitted = our_side(
                train, test, coreset_ratio=0.5, precision=precision, matmul_shape=QUICK_MATMUL_SHAPE, **options
            )
            report["ours_by_precision"][precision] = {k: v for k, v in fitted.items() if k != "image_scores"}
            log(f"quick: our predict only, {precision} ...")
            report["predict_only_by_precision"][precision] = our_predict_only(
                test, 100, precision=precision, matmul_shape=QUICK_MATMUL_SHAPE, **options
            )
    log("quick: coreset precision check ...")
    report["coreset_precision"] = coreset_check_on_images(train, ratio=0.5, **options)
    report["limit_ratio"] = {p: r["limit_ratio"] for p, r in report["ours_by_precision"].items()}
    report["rerank_hit_rate"] = {p: r["rerank_hit_rate"]["hit_rate"] for p, r in report["ours_by_precision"].items()}
    if out is not None:
        write_json(out, report)
    for precision, r in report["ours_by_precision"].items():
        floor = r["floor"]
        print(
            f"{precision}: fit {r['fit_s']:.2f} s, predict {r['predict_s']:.2f} s (floor {floor['floor_s']:.4f} s: "
            f"forward {floor['forward_floor_s']:.4f} + search {floor['search_floor_s']:.4f}), limit_ratio "
            f"{r['limit_ratio']:.1f}, re-rank hit rate {r['rerank_hit_rate']['hit_rate']:.3f}"
        )
    return report
