"""The detection path of :func:`anomalib_study.evaluate.evaluate` (task ``"detection"``).

A method is fitted on the normal training images and scores the test images: image AUROC
(each score kind), F1-max, accuracy and the classification report where the method has a
threshold, its sweep parameter's other values, and pixel AUROC, PRO and F1-max where it
gives anomaly maps and the data set has masks (:func:`masks_like_input` puts the masks
through the backbone's geometry). Also PatchCore's coreset ablation
(:func:`patchcore_coreset_ablation`), which scores several coreset ratios on the same
patch features.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

import numpy as np

from anomalib_study.errors import StudyError
from anomalib_study.io import as_json
from anomalib_study.methods.base import MethodSpec, RunOptions
from anomalib_study.profiling import peak_rss_mb as _peak_rss_mb


def _evaluate_method(
    spec: MethodSpec,
    dataset,
    backbone,
    params: dict,
    run: RunOptions,
    sweep_values: Sequence = (),
    return_maps: bool = False,
) -> dict[str, Any]:
    """Fit ``spec``'s method on the training images, score the test images, every metric.

    The same path for every method: its declaration says how it is fitted and scores
    files, which extra image scores it gives, whether it gives anomaly maps (then pixel
    AUROC, PRO and F1-max where the data set has masks) and how it describes itself.
    """
    from anomalib_study.metrics import (
        accuracy,
        classification_summary,
        f1_max,
        image_auroc,
        pixel_auroc,
        pixel_f1_max,
        pro_score,
    )

    timings: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        model = spec.fit_paths(backbone, [r.path for r in dataset.train], params, run)
        timings["fit_s"] = time.perf_counter() - started
        timings.update({f"fit_{k}": v for k, v in getattr(model, "timings_", {}).items()})
        rss_after_fit = _peak_rss_mb()
        started = time.perf_counter()
        scored = spec.score_paths(model, backbone, [r.path for r in dataset.test], run)
        timings["predict_s"] = time.perf_counter() - started
        timings["predict_images_per_s"] = len(dataset.test) / max(timings["predict_s"], 1e-9)
    for warning in caught:  # surface them once (the k clamp, ...), and keep them in the metrics
        warnings.warn(warning.message, stacklevel=3)

    described = as_json(spec.describe(model))
    labels = np.array([r.label for r in dataset.test], dtype=int)
    scores = np.asarray(scored["image_scores"], dtype=np.float64)
    threshold = described.get("threshold")
    f1, f1_threshold = f1_max(labels, scores)
    result: dict[str, Any] = {
        "params": {**params, **{name: described[name] for name in params if name in described}},
        **{name: value for name, value in described.items() if name not in params and name != "index_describe"},
        "index": described.get("index_describe"),
        "embedding_dim": int(getattr(model, "n_features_in_", backbone.embedding_dim)),
        "warnings": [str(w.message) for w in caught],
        "score_kinds": list(spec.score_kinds),
        "image_auroc": image_auroc(labels, scores),
        **{f"image_auroc_{kind}": image_auroc(labels, scored[f"image_scores_{kind}"]) for kind in spec.score_kinds},
        "image_f1_max": f1,
        "image_f1_threshold": f1_threshold,
        "threshold": threshold,
        "accuracy": None,
        "classification_report": None,
    }
    predictions = None
    if threshold is not None:
        predictions = (scores > threshold).astype(int)
        result["accuracy"] = accuracy(labels, predictions)
        result["classification_report"] = classification_summary(labels, predictions)
    if spec.calibration_scores is not None:
        calibration = np.asarray(spec.calibration_scores(model), dtype=np.float64)
        result["train_scores"] = [float(s) for s in calibration]
        result["n_calibration_images"] = int(calibration.size)
    if spec.sweep is not None and len(sweep_values):
        result[f"{spec.sweep_param}_sweep"] = [
            {
                spec.sweep_param: value,
                "image_auroc": image_auroc(labels, other),
                "accuracy": accuracy(labels, (other > other_threshold).astype(int)),
                "threshold": other_threshold,
            }
            for value, other, other_threshold in spec.sweep(model, scored, params, sweep_values)
        ]

    maps = scored.get("anomaly_maps") if spec.produces_maps else None
    masks = None
    if maps is not None:
        started = time.perf_counter()
        side = backbone.image_size
        pre = backbone.preprocessing
        mode = pre.get("resize_mode", "crop")
        geometry = {
            "squash": f"{side} x {side}: the whole image resized to {side} x {side}, aspect ratio not kept",
            "keep": (
                f"shorter side {side}, aspect ratio kept: the whole image, the longer side scaled alike (at most "
                f"{pre.get('max_aspect')} x, rounded to the stride {pre.get('stride')}), each image at its own size"
            ),
        }.get(mode, f"{side} x {side}: shorter side resized to {pre['resize']}, centre crop {pre['crop']}")
        if dataset.has_masks:
            masks = masks_like_input(dataset.test, backbone.preprocessing)
            pixel_f1, pixel_threshold = pixel_f1_max(masks, maps)
            result.update(
                {
                    "pixel_auroc": pixel_auroc(masks, maps),
                    "pro": pro_score(masks, maps, fpr_limit=0.3),
                    "pixel_f1_max": pixel_f1,
                    "pixel_f1_threshold": pixel_threshold,
                    "pixel_metrics_note": (
                        f"pixel metrics on the backbone's preprocessed input ({geometry}); masks put through the same "
                        f"resize (nearest neighbour){'' if mode == 'keep' else ' and crop'}; anomaly maps "
                        f"{described.get('map_rule', '')}"
                    ).rstrip(),
                }
            )
        else:
            result.update(
                {
                    "pixel_auroc": None,
                    "pro": None,
                    "pixel_f1_max": None,
                    "pixel_f1_threshold": None,
                    "pixel_metrics_note": f"no pixel metrics: {dataset.name} has no ground-truth masks for "
                    "every anomalous test image",
                }
            )
        timings["pixel_metrics_s"] = time.perf_counter() - started
    result["timings"] = timings
    result["peak_memory"] = {
        "peak_rss_mb_after_fit": rss_after_fit,
        "peak_rss_mb": _peak_rss_mb(),
        "how": "resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak resident memory since it started "
        "(includes the backbone and anything run before in the same process)",
    }
    bank = getattr(model, "memory_bank_", None)
    if bank is not None:
        result["peak_memory"]["memory_bank_mb"] = bank.nbytes / 2**20
    rows = []
    for i, record in enumerate(dataset.test):
        row = {
            "path": str(record.path),
            "label": int(record.label),
            "defect_type": record.defect_type,
            "score": float(scores[i]),
        }
        row.update({f"score_{kind}": float(scored[f"image_scores_{kind}"][i]) for kind in spec.score_kinds})
        if predictions is not None:
            row["predicted"] = int(predictions[i])
        if maps is not None:
            row["map_max"] = float(maps[i].max())
        rows.append(row)
    result["per_image"] = rows
    if return_maps:
        result.update({"anomaly_maps": maps, "masks": masks, "model": model})
    return result


def masks_like_input(records, preprocessing: dict) -> np.ndarray:
    """Ground-truth masks (n, crop, crop) bool, put through the backbone's geometric
    preprocessing (resized to ``preprocessing["resize"]`` with nearest neighbour: the
    shorter side, or the whole image for ``"squash"``, then centre-cropped to
    ``preprocessing["crop"]``), so that they line up
    with anomaly maps of the preprocessed input. Records without a mask give all-False.

    Under ``"keep"`` the masks, not the maps, are resized: each mask to its image's
    preprocessed input size (:func:`anomalib_study.backbones.input_size` of the mask's
    own size, nearest neighbour, nothing cut off), which is where PatchCore's maps are;
    the result is then a 1-D object array of n (H_i, W_i) bool arrays."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import center_crop, resize

    from anomalib_study.backbones import input_size, resize_argument
    from anomalib_study.data.decode import load_mask

    if preprocessing.get("resize_mode") == "keep":
        kept = np.empty(len(records), dtype=object)
        for i, record in enumerate(records):
            mask = load_mask(record)  # without a mask file: all False, the image's size
            size = list(input_size(preprocessing, *mask.shape))
            mask = resize(torch.from_numpy(mask.astype(np.uint8))[None], size, interpolation=InterpolationMode.NEAREST)
            kept[i] = mask[0].numpy() > 0
        return kept
    crop = int(preprocessing["crop"])
    out = np.zeros((len(records), crop, crop), dtype=bool)
    for i, record in enumerate(records):
        if record.mask_path is None:
            continue
        mask = torch.from_numpy(load_mask(record).astype(np.uint8))[None]
        mask = resize(mask, resize_argument(preprocessing), interpolation=InterpolationMode.NEAREST)
        out[i] = center_crop(mask, [crop, crop])[0].numpy() > 0
    return out


def evaluate_detection(
    spec: MethodSpec,
    dataset,
    backbone,
    params: dict,
    run: RunOptions,
    protocol: str | None = None,
    return_maps: bool = False,
    sweep_values: Sequence = (),
) -> dict[str, Any]:
    """The detection task's evaluation path (``EVALUATORS["detection"]``): one protocol, fit on
    the normal training images and score the test images (:func:`_evaluate_method`)."""
    if protocol is not None:
        raise StudyError(
            f"protocol={protocol!r}: detection methods have one protocol (fit on the normal training "
            "images, score the test images); leave protocol unset"
        )
    return _evaluate_method(spec, dataset, backbone, params, run, sweep_values, return_maps)


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
    from anomalib_study.errors import ParameterError
    from anomalib_study.methods.patchcore import PatchCore
    from anomalib_study.metrics import image_auroc, pixel_auroc, pro_score
    from anomalib_study.profiling import PeakMemory

    if backbone.preprocessing.get("resize_mode") == "keep":
        raise ParameterError(
            "the coreset ablation holds every patch feature in one (n, h*w, D) array, which needs one "
            "patch grid; resize_mode='keep' gives one per image shape: run the ablation with 'crop' or "
            "'squash' (or skip it)"
        )

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
        model = PatchCore(
            backbone=backbone,
            seed=seed,
            progress=progress,
            calibration_fraction=0.0,
            coreset_ratio=float(ratio),
            **params,
        )
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
    return {
        "n_train_images": len(train),
        "n_train_patches": int(train_x.shape[0] * train_x.shape[1]),
        "extract_s": extract_s,
        "rows": rows,
    }
