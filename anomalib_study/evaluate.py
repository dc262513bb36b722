"""Evaluate a method on a data set: the function behind ``anomalib-study evaluate`` and the notebooks.

``evaluate`` reads the data set, extracts features with the chosen backbone (through the
feature cache), fits the method on the training (normal) images, scores the test images
and returns the metrics as one JSON-able dict; with ``out`` it also writes
``<out>/metrics.json``. Every method takes the same path: its declaration
(:class:`~anomalib_study.methods.base.MethodSpec`, in its own module) says how it is fitted
and scored, so no method is named here.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomalib_study import __version__
from anomalib_study.errors import StudyError
from anomalib_study.io import as_json, write_json
from anomalib_study.methods.base import MethodSpec, RunOptions
from anomalib_study.profiling import peak_rss_mb as _peak_rss_mb
from anomalib_study.provenance import collect as collect_provenance
from anomalib_study.schema import SCHEMA_VERSION


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


def _environment(
    spec: MethodSpec, backbone, params: dict, device: str, run: RunOptions | None = None
) -> dict[str, Any]:
    """What produced the figures (the ``environment`` block of ``metrics.json``), recorded in the
    process that computed them: versions, machine, threads (this process's torch count), GPU,
    git commit (of the current folder's checkout), the sha256 of the backbone weights the
    model computed with (``"none"`` when it uses none, e.g. an autoencoder trained from
    scratch), the method's ``seed`` when it has one, and the run options it ran with
    (``run_options``: images per forward pass, decoding workers)."""
    uses_weights = spec.uses_backbone_weights is None or spec.uses_backbone_weights(params)
    recorded = collect_provenance()
    environment = {
        "anomalib_study": __version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        **{key: recorded[key] for key in ("cpu_model", "threads", "gpu", "torch", "git_commit", "git_dirty")},
        "weights_sha256": (backbone.weights_sha256 or "none") if uses_weights else "none",
    }
    if "seed" in params:
        environment["seed"] = params["seed"]
    if run is not None:
        environment["run_options"] = {"batch_size": int(run.batch_size), "num_workers": int(run.num_workers)}
    return environment


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


#: evaluation protocols of the clustering task: which test images are grouped, and into how many clusters
CLUSTERING_PROTOCOLS = {
    "reproduction": "the test images of the data set, 'combined' (several defects in one image) removed, the normal "
    "test images kept as one more class; as many clusters as classes (the anomaly-clustering "
    "reproduction's protocol, which produced its published table)",
    "anomalous_only": "the anomalous test images only ('combined' removed), as many clusters as defect types",
}


def _evaluate_clustering(
    spec: MethodSpec,
    dataset,
    backbone,
    params: dict,
    run: RunOptions,
    protocol: str | None = None,
    return_maps: bool = False,
) -> dict[str, Any]:
    """Group the protocol's test images with ``spec``'s method (label-free), then score each
    variant against the defect types: NMI, ARI, F1, the curve over the method's free
    parameter and its best point as an oracle (chosen with the labels: never the result)."""
    from anomalib_study.metrics import clustering_metrics

    protocol = "reproduction" if protocol is None else protocol
    if protocol not in CLUSTERING_PROTOCOLS:
        raise StudyError(f"protocol must be one of {', '.join(CLUSTERING_PROTOCOLS)}, got {protocol!r}")
    records = [r for r in dataset.test if r.defect_type != "combined"]
    if protocol == "anomalous_only":
        records = [r for r in records if r.label == 1]
    classes = np.array([r.defect_type for r in records])
    n_classes = int(np.unique(classes).size) if len(records) else 0
    if n_classes < 2:
        raise StudyError(
            f"{dataset.name}: protocol {protocol!r} leaves {len(records)} image(s) of {n_classes} "
            "type(s): clustering needs at least two types"
        )
    n_clusters = params.get("n_clusters") or n_classes
    if n_clusters > len(records):
        raise StudyError(f"n_clusters={n_clusters} is more than the {len(records)} images protocol {protocol!r} groups")
    normal_paths = [r.path for r in dataset.train]
    started = time.perf_counter()
    grouped = spec.cluster_images(backbone, [r.path for r in records], normal_paths, params, run, n_clusters)
    timings = {"cluster_total_s": time.perf_counter() - started, **grouped["timings"]}
    counts = {str(k): int(v) for k, v in zip(*np.unique(classes, return_counts=True))}
    result: dict[str, Any] = {
        "params": params,
        "protocol": {
            "name": protocol,
            "description": CLUSTERING_PROTOCOLS[protocol],
            "n_images": len(records),
            "class_counts": counts,
            "n_classes": n_classes,
            "n_clusters": int(n_clusters),
            "n_clusters_rule": ("given" if params.get("n_clusters") else "as many as classes (protocol)"),
            "n_normal_images_available": len(normal_paths),
            "n_normal_images": len(normal_paths)
            if "semi_supervised" in [variant["name"] for variant in grouped["runs"]]
            else 0,
        },
        "grid": grouped.get("grid"),
        "modes": {},
    }
    per_image = [{"path": str(r.path), "label": int(r.label), "defect_type": r.defect_type} for r in records]
    in_memory = {}
    for variant in grouped["runs"]:
        name = variant["name"]
        scores = clustering_metrics(classes, variant["labels"])
        curve = [
            {
                "tau": point["value"],
                "relative": point["relative"],
                **{k: v for k, v in clustering_metrics(classes, point["labels"]).items() if k in ("nmi", "ari", "f1")},
            }
            for point in variant["curve"]
        ]
        best = max(curve, key=lambda point: point["nmi"]) if curve else None
        clusters = np.unique(variant["labels"])
        kinds = sorted(counts)
        contingency = [[int(np.sum((variant["labels"] == c) & (classes == k))) for k in kinds] for c in clusters]
        result["modes"][name] = {
            **as_json(variant["description"]),  # settings and what the method chose; the scores below win
            **{k: scores[k] for k in ("nmi", "ari", "f1", "matching")},
            "n_clusters": scores["n_clusters"],  # clusters found (can be fewer than asked, e.g. one empty)
            "tau_curve": curve,
            "oracle": None
            if best is None
            else {
                **best,
                "note": "tau picked by looking at the labels (the best NMI on the curve): an upper bound, "
                "never our result",
            },
            "confusion": {"clusters": [int(c) for c in clusters], "classes": kinds, "counts": contingency},
        }
        for key in ("nmi", "ari", "f1"):
            result[f"{key}_{name}"] = scores[key]
        for row, label in zip(per_image, variant["labels"]):
            row[f"cluster_{name}"] = int(label)
        if return_maps:
            in_memory[name] = {k: variant.get(k) for k in ("labels", "weights", "embeddings", "patch_scores")}
    result["per_image"] = per_image
    result["timings"] = timings
    result["peak_memory"] = {
        "peak_rss_mb": _peak_rss_mb(),
        "how": "resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak resident memory",
    }
    if return_maps:
        result["clustering_runs"] = in_memory
        result["records"] = records
    return result


def _evaluate_detection(
    spec: MethodSpec,
    dataset,
    backbone,
    params: dict,
    run: RunOptions,
    protocol: str | None = None,
    return_maps: bool = False,
    sweep_values: Sequence = (),
) -> dict[str, Any]:
    if protocol is not None:
        raise StudyError(
            f"protocol={protocol!r}: detection methods have one protocol (fit on the normal training "
            "images, score the test images); leave protocol unset"
        )
    return _evaluate_method(spec, dataset, backbone, params, run, sweep_values, return_maps)


#: task -> its evaluation path (a method's declaration names its task)
EVALUATORS = {"detection": _evaluate_detection, "clustering": _evaluate_clustering}


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


#: keys of a method's result that are returned in memory but never written to metrics.json
IN_MEMORY_KEYS = ("anomaly_maps", "masks", "model", "clustering_runs", "records")


def evaluate(
    method: str,
    dataset: str,
    root: str | os.PathLike,
    *,
    category: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    resize_mode: str | None = None,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    dataset_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    cache: Any = "default",
    progress: bool = True,
    return_maps: bool = False,
    protocol: str | None = None,
    **method_params: Any,
) -> dict[str, Any]:
    """Run ``method`` on a data set and return its metrics (and write ``<out>/metrics.json``).

    Every method goes through the same path (its declaration in
    :data:`anomalib_study.methods.SPECS` says how it is fitted and scored).

    Args:
        method: a registered method (``"knn"``, ``"patchcore"``, ...).
        dataset: the layout name (``"mvtec_ad"``, ``"magnetic_tile"``, ``"dagm"``, ...).
        root: the data set's folder.
        category: the category inside ``root`` where the layout has them.
        backbone: a registered backbone name (``anomalib-study backbones`` lists them).
        weights: an explicit weight file for the backbone.
        image_size: the input side (None: the method's, e.g. 128 for the autoencoder, else
            the backbone's default).
        resize_mode: ``"crop"`` (shorter side resized, centre crop: the backbone's own
            preprocessing) or ``"squash"`` (the whole image resized to the square input, for
            long narrow images whose defects a centre crop can cut off) or ``"keep"`` (shorter
            side resized, aspect ratio kept, nothing cut off: each image at its own shape;
            pixel metrics then on each image's own geometry); None: the method's own (the
            autoencoder squashes), else ``"crop"``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: folder for ``metrics.json``; an existing ``metrics.json`` there is never
            overwritten (pick another folder).
        dataset_options: extra options of the layout's reader (seed, train_fraction, ...).
        batch_size: images per forward pass (None: the method's ``batch_size``).
        num_workers: image-loading processes (None: the cores less one, at most 4).
        cache: the feature cache for methods that cache embeddings (kNN): ``"default"``,
            a FeatureCache or None.
        progress: progress bars.
        return_maps: also return (never write) ``anomaly_maps`` (n_test, S, S), ``masks``
            and the fitted ``model``, for methods that give anomaly maps; for clustering
            methods ``clustering_runs`` (per variant: labels, patch weights, embeddings,
            patch scores) and the ``records`` grouped.
        protocol: clustering methods: which test images are grouped
            (:data:`CLUSTERING_PROTOCOLS`: ``"reproduction"`` by default, or
            ``"anomalous_only"``); detection methods have one protocol (leave None).
        **method_params: the method's parameters (its ``SPEC.params``: for knn k,
            thres_ratio, normalize, index; for patchcore coreset_ratio, patch_size,
            image_score, sigma, index, ...), and ``<p>_sweep``: other values of the
            method's sweep parameter scored on the same features (knn: ``k_sweep``).

    Returns:
        A dict with at least ``image_auroc``, ``accuracy`` and ``threshold`` (None where the
        method has no threshold), ``n_train``, ``n_test``, ``timings`` (seconds),
        ``per_image`` scores and the ``classification_report``.
    """
    from anomalib_study.backbones import load_backbone
    from anomalib_study.data import load_dataset
    from anomalib_study.methods import get_method

    spec = get_method(method)
    sweep_values = method_params.pop(f"{spec.sweep_param}_sweep", ()) if spec.sweep_param else ()
    params = spec.resolve_params(method_params)
    spec.check_params(params)
    resize_mode = spec.resolve_resize_mode(resize_mode)
    if image_size is None:
        image_size = spec.image_size
    metrics_path = Path(out) / "metrics.json" if out is not None else None
    if metrics_path is not None and metrics_path.exists():
        raise StudyError(f"{metrics_path} exists already: results are never overwritten; choose another --out")

    started = time.perf_counter()
    data = load_dataset(dataset, root, category=category, **(dataset_options or {}))
    needs_normal = spec.task == "detection" or (
        spec.needs_normal_images is not None and spec.needs_normal_images(params)
    )
    if not data.train and needs_normal:
        raise StudyError(f"{data.name} ({root}) has no training images: {method} needs normal images to fit on")
    if not data.test:
        raise StudyError(f"{data.name} ({root}) has no test images to evaluate")
    net = load_backbone(backbone, weights=weights, device=device, image_size=image_size, resize_mode=resize_mode)
    load_s = time.perf_counter() - started

    run = RunOptions(
        device=device,
        batch_size=spec.batch_size if batch_size is None else batch_size,
        num_workers=_default_workers() if num_workers is None else num_workers,
        progress=progress,
        cache=cache,
    )
    evaluator = EVALUATORS[spec.task]
    extra = {"sweep_values": sweep_values} if sweep_values else {}
    result = evaluator(spec, data, net, params, run, protocol=protocol, return_maps=return_maps, **extra)
    in_memory = {key: result.pop(key) for key in IN_MEMORY_KEYS if key in result}
    result["timings"] = {"load_s": load_s, **result["timings"], "total_s": time.perf_counter() - started}
    metrics = {
        "schema": SCHEMA_VERSION,
        "method": method,
        "task": spec.task,
        "dataset": data.summary(),
        "synthetic": data.synthetic,
        "backbone": _backbone_record(net),
        "n_train": len(data.train),
        "n_test": len(data.test),
        **result,
        "environment": _environment(spec, net, params, device, run),
    }
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    metrics.update(in_memory)
    return metrics


class _CallableModule(types.ModuleType):
    """``from anomalib_study import evaluate`` must give something callable, but once this
    module is imported, Python sets the package's attribute ``evaluate`` to the module
    itself (it shares the function's name): calling the module calls the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
