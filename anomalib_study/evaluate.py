"""Evaluate a method on a data set: the function behind ``anomalib-study evaluate`` and the notebooks.

``evaluate`` reads the data set, extracts features with the chosen backbone (through the
feature cache), fits the method on the training (normal) images, scores the test images
and returns the metrics as one JSON-able dict; with ``out`` it also writes
``<out>/metrics.json``. Methods plug in through :data:`METHODS`.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from anomalib_study import __version__
from anomalib_study.errors import ParameterError, StudyError
from anomalib_study.io import write_json


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _backbone_record(backbone) -> dict[str, Any]:
    return {
        "name": backbone.name,
        "label": backbone.label,
        "weights_path": backbone.weights_path,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": backbone.preprocessing,
        "image_size": backbone.image_size,
        "embedding_dim": backbone.embedding_dim,
    }


def _evaluate_knn(
    dataset,
    backbone,
    *,
    k: int = 100,
    thres_ratio: float = 0.92,
    normalize: bool = True,
    index: str = "Flat",
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "cpu",
    cache: Any = "default",
    progress: bool = True,
    k_sweep: Sequence[int] = (),
) -> dict[str, Any]:
    from anomalib_study.features import extract_embeddings
    from anomalib_study.methods.knn import KNNDetector
    from anomalib_study.metrics import accuracy, classification_summary, image_auroc

    workers = _default_workers() if num_workers is None else num_workers
    timings: dict[str, float] = {}
    common = dict(batch_size=batch_size, num_workers=workers, device=device, cache=cache, progress=progress)

    started = time.perf_counter()
    train_x = extract_embeddings(backbone, [r.path for r in dataset.train], desc="train embeddings", **common)
    timings["extract_train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    test_x = extract_embeddings(backbone, [r.path for r in dataset.test], desc="test embeddings", **common)
    timings["extract_test_s"] = time.perf_counter() - started

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector = KNNDetector(k=k, thres_ratio=thres_ratio, normalize=normalize, index=index).fit(train_x)
    for warning in caught:  # surface the k clamp etc. once, and keep it in the metrics
        warnings.warn(warning.message, stacklevel=2)
    timings["fit_s"] = time.perf_counter() - started

    started = time.perf_counter()
    scores = detector.score(test_x)
    predictions = detector.predict(test_x)
    timings["score_s"] = time.perf_counter() - started

    labels = np.array([r.label for r in dataset.test], dtype=int)
    sweep = []
    for k_other in sorted({int(v) for v in k_sweep if 0 < int(v) < len(train_x)}):
        other = KNNDetector(k=k_other, thres_ratio=thres_ratio, normalize=normalize, index=index).fit(train_x)
        sweep.append({
            "k": k_other,
            "image_auroc": image_auroc(labels, other.score(test_x)),
            "accuracy": accuracy(labels, other.predict(test_x)),
            "threshold": float(other.threshold_),
        })
    return {
        "params": {"k": k, "thres_ratio": thres_ratio, "normalize": normalize, "index": index},
        "k_used": int(detector.k_),
        "index": detector.index_.describe(),
        "warnings": [str(w.message) for w in caught],
        "image_auroc": image_auroc(labels, scores),
        "accuracy": accuracy(labels, predictions),
        "threshold": float(detector.threshold_),
        "train_scores": [float(s) for s in detector.train_scores_],
        "classification_report": classification_summary(labels, predictions),
        "timings": timings,
        "k_sweep": sweep,
        "per_image": [
            {
                "path": str(r.path),
                "label": int(r.label),
                "defect_type": r.defect_type,
                "score": float(s),
                "predicted": int(p),
            }
            for r, s, p in zip(dataset.test, scores, predictions)
        ],
    }


def masks_like_input(records, preprocessing: dict) -> np.ndarray:
    """Ground-truth masks (n, crop, crop) bool, put through the backbone's geometric
    preprocessing (resized to ``preprocessing["resize"]`` with nearest neighbour: the
    shorter side, or the whole image for ``"squash"``, then centre-cropped to
    ``preprocessing["crop"]``), so that they line up
    with anomaly maps of the preprocessed input. Records without a mask give all-False."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, resize

    from anomalib_study.backbones import resize_argument
    from anomalib_study.data.decode import load_mask

    crop = int(preprocessing["crop"])
    out = np.zeros((len(records), crop, crop), dtype=bool)
    for i, record in enumerate(records):
        if record.mask_path is None:
            continue
        mask = torch.from_numpy(load_mask(record).astype(np.uint8))[None]
        mask = resize(mask, resize_argument(preprocessing), interpolation=InterpolationMode.NEAREST)
        out[i] = center_crop(mask, [crop, crop])[0].numpy() > 0
    return out


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _evaluate_patchcore(
    dataset,
    backbone,
    *,
    layers: Sequence[str] | None = None,
    patch_size: int = 3,
    per_layer_dim: int | None = None,
    target_dim: int | None = None,
    sampler: str = "greedy",
    coreset_ratio: float = 0.1,
    projection_dim: int | None = 128,
    image_score: str = "reweighted",
    num_neighbours: int = 9,
    sigma: float = 4.0,
    index: str = "Flat",
    thres_ratio: float = 0.99,
    calibration_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 8,
    num_workers: int | None = None,
    device: str = "cpu",
    cache: Any = None,
    progress: bool = True,
    return_maps: bool = False,
) -> dict[str, Any]:
    """PatchCore: fit on the training images, score the test images, image and pixel metrics.

    ``cache`` is accepted for a uniform call but unused (patch features are not cached).
    With ``return_maps`` the returned dict also holds ``anomaly_maps`` (n_test, S, S)
    float32 and ``masks`` (n_test, S, S) bool (S = the backbone's input side), which
    :func:`evaluate` never writes to ``metrics.json``; ``model`` (the fitted PatchCore) too.
    """
    from anomalib_study.methods.patchcore import PatchCore
    from anomalib_study.metrics import accuracy, f1_max, image_auroc, pixel_auroc, pixel_f1_max, pro_score

    workers = _default_workers() if num_workers is None else num_workers
    model = PatchCore(
        backbone=backbone, layers=layers, patch_size=patch_size, per_layer_dim=per_layer_dim, target_dim=target_dim,
        sampler=sampler, coreset_ratio=coreset_ratio, projection_dim=projection_dim, image_score=image_score,
        num_neighbours=num_neighbours, sigma=sigma, index=index, thres_ratio=thres_ratio,
        calibration_fraction=calibration_fraction, seed=seed, batch_size=batch_size, num_workers=workers,
        device=device, progress=progress,
    )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model.fit_paths([r.path for r in dataset.train])
    timings["fit_s"] = time.perf_counter() - started
    timings.update({f"fit_{k}": v for k, v in model.timings_.items()})
    rss_after_fit = _peak_rss_mb()

    started = time.perf_counter()
    scored = model.score_paths([r.path for r in dataset.test])
    timings["predict_s"] = time.perf_counter() - started
    timings["predict_images_per_s"] = len(dataset.test) / max(timings["predict_s"], 1e-9)

    labels = np.array([r.label for r in dataset.test], dtype=int)
    chosen = scored["image_scores"]
    f1, f1_threshold = f1_max(labels, chosen)
    result: dict[str, Any] = {
        "params": {
            "layers": list(model._patch_maker().resolve_layers(backbone)), "patch_size": patch_size,
            "per_layer_dim": per_layer_dim, "target_dim": target_dim, "sampler": sampler,
            "coreset_ratio": coreset_ratio, "projection_dim": projection_dim, "image_score": image_score,
            "num_neighbours": num_neighbours, "sigma": sigma, "index": index, "thres_ratio": thres_ratio,
            "calibration_fraction": calibration_fraction, "seed": seed,
        },
        "index": model.index_.describe(),
        "memory_bank_size": int(model.memory_bank_.shape[0]),
        "embedding_dim": int(model.n_features_in_),
        "grid_shape": list(model.grid_shape_),
        "n_train_patches": int(model.n_train_patches_),
        "n_calibration_images": int(model.calibration_scores_max_.size),
        "image_auroc": image_auroc(labels, chosen),
        "image_auroc_max": image_auroc(labels, scored["image_scores_max"]),
        "image_auroc_reweighted": image_auroc(labels, scored["image_scores_reweighted"]),
        "image_f1_max": f1,
        "image_f1_threshold": f1_threshold,
        "threshold": None if not np.isfinite(model.threshold_) else float(model.threshold_),
        "threshold_rule": (
            f"{thres_ratio} quantile of the {image_score} scores of {model.calibration_scores_max_.size} training "
            "images held out of the memory bank" if np.isfinite(model.threshold_)
            else "none: calibration_fraction=0 (every training image is in the memory bank)"
        ),
        "accuracy": None,
    }
    if np.isfinite(model.threshold_):
        result["accuracy"] = accuracy(labels, (chosen > model.threshold_).astype(int))

    started = time.perf_counter()
    masks = None
    side = backbone.image_size
    geometry = (
        f"the whole image resized to {side} x {side}, aspect ratio not kept"
        if backbone.preprocessing.get("resize_mode") == "squash"
        else f"shorter side resized to {backbone.preprocessing['resize']}, centre crop {backbone.preprocessing['crop']}"
    )
    pixel_note = (
        f"pixel metrics on the backbone's preprocessed input ({side} x {side}: {geometry}); masks put through the "
        "same resize (nearest neighbour) and crop; anomaly maps bilinearly upsampled from the patch grid, "
        f"Gaussian sigma {sigma}"
    )
    if dataset.has_masks:
        masks = masks_like_input(dataset.test, backbone.preprocessing)
        maps = scored["anomaly_maps"]
        pixel_f1, pixel_threshold = pixel_f1_max(masks, maps)
        result.update({
            "pixel_auroc": pixel_auroc(masks, maps),
            "pro": pro_score(masks, maps, fpr_limit=0.3),
            "pixel_f1_max": pixel_f1,
            "pixel_f1_threshold": pixel_threshold,
            "pixel_metrics_note": pixel_note,
        })
    else:
        reason = f"no pixel metrics: {dataset.name} has no ground-truth masks for every anomalous test image"
        result.update({"pixel_auroc": None, "pro": None, "pixel_f1_max": None, "pixel_f1_threshold": None,
                       "pixel_metrics_note": reason})
    timings["pixel_metrics_s"] = time.perf_counter() - started
    result["timings"] = timings
    result["peak_memory"] = {
        "peak_rss_mb_after_fit": rss_after_fit,
        "peak_rss_mb": _peak_rss_mb(),
        "how": "resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak resident memory since it started "
               "(includes the backbone and anything run before in the same process)",
        "memory_bank_mb": model.memory_bank_.nbytes / 2**20,
    }
    result["per_image"] = [
        {
            "path": str(r.path),
            "label": int(r.label),
            "defect_type": r.defect_type,
            "score": float(s),
            "score_max": float(a),
            "score_reweighted": float(b),
            "map_max": float(m.max()),
        }
        for r, s, a, b, m in zip(dataset.test, chosen, scored["image_scores_max"], scored["image_scores_reweighted"],
                                 scored["anomaly_maps"])
    ]
    if return_maps:
        result["anomaly_maps"] = scored["anomaly_maps"]
        result["masks"] = masks
        result["model"] = model
    return result


def patchcore_coreset_ablation(
    dataset,
    backbone,
    ratios: Sequence[float] = (0.01, 0.1, 0.25, 1.0),
    *,
    max_train_images: int | None = 100,
    seed: int = 0,
    progress: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """PatchCore fitted with each coreset ratio on the same patch features.

    The training and test patch features are extracted once; each ratio then fits a
    model (coreset + index, every training image in the bank) and scores the test set.
    At most ``max_train_images`` training images (a seeded random subset) are used, so
    that 100 % (no coreset) stays affordable on a CPU; the result says how many.

    Returns:
        ``{"n_train_images", "n_train_patches", "extract_s", "rows": [...]}`` where each row
        holds ``coreset_ratio``, ``memory_bank_size``, ``fit_s`` (coreset + index),
        ``predict_s``, ``peak_memory_added_mb`` (resident memory the fit and scoring needed on
        top of what the process held before, sampled), ``image_auroc`` (both kinds) and
        ``pixel_auroc`` / ``pro`` where masks exist.
    """
    from anomalib_study.methods.patchcore import PatchCore
    from anomalib_study.metrics import image_auroc, pixel_auroc, pro_score
    from anomalib_study.profiling import PeakMemory

    train = list(dataset.train)
    if max_train_images is not None and len(train) > max_train_images:
        chosen = np.sort(np.random.default_rng(seed).choice(len(train), max_train_images, replace=False))
        train = [train[i] for i in chosen]
    base = PatchCore(backbone=backbone, seed=seed, progress=progress, calibration_fraction=0.0, **params)
    started = time.perf_counter()
    train_x, grid = base.extract_patches([r.path for r in train], desc="ablation train patches")
    test_x, _ = base.extract_patches([r.path for r in dataset.test], desc="ablation test patches")
    extract_s = time.perf_counter() - started
    labels = np.array([r.label for r in dataset.test], dtype=int)
    masks = masks_like_input(dataset.test, backbone.preprocessing) if dataset.has_masks else None
    rows = []
    for ratio in ratios:
        model = PatchCore(backbone=backbone, seed=seed, progress=progress, calibration_fraction=0.0,
                          coreset_ratio=float(ratio), **params)
        with PeakMemory() as memory:
            started = time.perf_counter()
            model.fit(train_x, grid)
            fit_s = time.perf_counter() - started
            started = time.perf_counter()
            patch, image_max, image_rw = model.score_patches(test_x)
            side = (backbone.image_size, backbone.image_size)
            maps = model.anomaly_maps(patch.reshape(len(test_x), *grid), size=side) if masks is not None else None
            predict_s = time.perf_counter() - started
        row = {
            "coreset_ratio": float(ratio),
            "memory_bank_size": int(model.memory_bank_.shape[0]),
            "fit_s": fit_s,
            "coreset_s": model.timings_.get("coreset_s"),
            "predict_s": predict_s,
            "peak_memory_added_mb": memory.added_mb,
            "image_auroc_max": image_auroc(labels, image_max),
            "image_auroc_reweighted": image_auroc(labels, image_rw),
            "pixel_auroc": pixel_auroc(masks, maps) if masks is not None else None,
            "pro": pro_score(masks, maps, fpr_limit=0.3) if masks is not None else None,
        }
        rows.append(row)
        del model, maps
    return {"n_train_images": len(train), "n_train_patches": int(train_x.shape[0] * train_x.shape[1]),
            "extract_s": extract_s, "rows": rows}


#: keys of a method's result that are returned in memory but never written to metrics.json
IN_MEMORY_KEYS = ("anomaly_maps", "masks", "model")

#: method name -> function(dataset, backbone, **params) -> metrics dict
METHODS: dict[str, Callable[..., dict[str, Any]]] = {"knn": _evaluate_knn, "patchcore": _evaluate_patchcore}


def evaluate(
    method: str,
    dataset: str,
    root: str | os.PathLike,
    *,
    category: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    resize_mode: str = "crop",
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    dataset_options: dict[str, Any] | None = None,
    **method_params: Any,
) -> dict[str, Any]:
    """Run ``method`` on a data set and return its metrics (and write ``<out>/metrics.json``).

    Args:
        method: a key of :data:`METHODS` (``"knn"``, ``"patchcore"``).
        dataset: the layout name (``"mvtec_ad"``, ``"magnetic_tile"``, ``"dagm"``, ...).
        root: the data set's folder.
        category: the category inside ``root`` where the layout has them.
        backbone: a registered backbone name (``anomalib-study backbones`` lists them).
        weights: an explicit weight file for the backbone.
        image_size: overrides the backbone's default input size.
        resize_mode: ``"crop"`` (shorter side resized, centre crop: the backbone's own
            preprocessing) or ``"squash"`` (the whole image resized to the square input, for
            long narrow images whose defects a centre crop can cut off).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: folder for ``metrics.json``; an existing ``metrics.json`` there is never
            overwritten (pick another folder).
        dataset_options: extra options of the layout's reader (seed, train_fraction, ...).
        **method_params: the method's parameters (for knn: k, thres_ratio, normalize,
            index, batch_size, num_workers, cache, progress, and k_sweep: other k
            values whose AUROC / accuracy are computed on the same embeddings; for
            patchcore: see :func:`_evaluate_patchcore`, e.g. coreset_ratio, patch_size,
            image_score, sigma, index, return_maps).

    Returns:
        A dict with at least ``image_auroc``, ``accuracy``, ``threshold``, ``n_train``,
        ``n_test``, ``timings`` (seconds), ``per_image`` scores and the
        ``classification_report``.
    """
    from anomalib_study.backbones import load_backbone
    from anomalib_study.data import load_dataset

    if method not in METHODS:
        raise ParameterError(f"unknown method {method!r}: choose one of {', '.join(sorted(METHODS))}")
    metrics_path = Path(out) / "metrics.json" if out is not None else None
    if metrics_path is not None and metrics_path.exists():
        raise StudyError(f"{metrics_path} exists already: results are never overwritten; choose another --out")

    started = time.perf_counter()
    data = load_dataset(dataset, root, category=category, **(dataset_options or {}))
    if not data.train:
        raise StudyError(f"{data.name} ({root}) has no training images: {method} needs normal images to fit on")
    if not data.test:
        raise StudyError(f"{data.name} ({root}) has no test images to evaluate")
    net = load_backbone(backbone, weights=weights, device=device, image_size=image_size, resize_mode=resize_mode)
    load_s = time.perf_counter() - started

    result = METHODS[method](data, net, device=device, **method_params)
    in_memory = {key: result.pop(key) for key in IN_MEMORY_KEYS if key in result}
    result["timings"] = {"load_s": load_s, **result["timings"], "total_s": time.perf_counter() - started}
    metrics = {
        "method": method,
        "dataset": data.summary(),
        "synthetic": data.synthetic,
        "backbone": _backbone_record(net),
        "n_train": len(data.train),
        "n_test": len(data.test),
        **result,
        "environment": {
            "anomalib_study": __version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": device,
        },
    }
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    metrics.update(in_memory)
    return metrics
