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


#: method name -> function(dataset, backbone, **params) -> metrics dict
METHODS: dict[str, Callable[..., dict[str, Any]]] = {"knn": _evaluate_knn}


def evaluate(
    method: str,
    dataset: str,
    root: str | os.PathLike,
    *,
    category: str | None = None,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    dataset_options: dict[str, Any] | None = None,
    **method_params: Any,
) -> dict[str, Any]:
    """Run ``method`` on a data set and return its metrics (and write ``<out>/metrics.json``).

    Args:
        method: a key of :data:`METHODS` (``"knn"``).
        dataset: the layout name (``"mvtec_ad"``, ``"magnetic_tile"``, ``"dagm"``, ...).
        root: the data set's folder.
        category: the category inside ``root`` where the layout has them.
        backbone: a registered backbone name (``anomalib-study backbones`` lists them).
        weights: an explicit weight file for the backbone.
        image_size: overrides the backbone's default input size.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        out: folder for ``metrics.json``; an existing ``metrics.json`` there is never
            overwritten (pick another folder).
        dataset_options: extra options of the layout's reader (seed, train_fraction, ...).
        **method_params: the method's parameters (for knn: k, thres_ratio, normalize,
            index, batch_size, num_workers, cache, progress, and k_sweep: other k
            values whose AUROC / accuracy are computed on the same embeddings).

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
    net = load_backbone(backbone, weights=weights, device=device, image_size=image_size)
    load_s = time.perf_counter() - started

    result = METHODS[method](data, net, device=device, **method_params)
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
    return metrics
