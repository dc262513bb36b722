"""Evaluate a method on a data set: the function behind ``anomalib-study evaluate`` and the notebooks.

``evaluate`` reads the data set, extracts features with the chosen backbone (through the
feature cache), fits the method on the training (normal) images, scores the test images
and returns the metrics as one JSON-able dict; with ``out`` it also writes
``<out>/metrics.json``. Every method takes the same path: its declaration
(:class:`~anomalib_study.methods.base.MethodSpec`, in its own module) says how it is fitted
and scored, so no method is named here.

Each task's evaluation path (:data:`EVALUATORS`) lives in a module of its own:
:mod:`anomalib_study.evaluate_detection` (with :func:`masks_like_input` and
:func:`patchcore_coreset_ablation`) and :mod:`anomalib_study.evaluate_clustering` (with
:data:`CLUSTERING_PROTOCOLS`); their public names are importable from here as before.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import types
from typing import Any

from anomalib_study import __version__
from anomalib_study.errors import StudyError
from anomalib_study.evaluate_clustering import CLUSTERING_PROTOCOLS as CLUSTERING_PROTOCOLS
from anomalib_study.evaluate_clustering import evaluate_clustering
from anomalib_study.evaluate_detection import evaluate_detection
from anomalib_study.evaluate_detection import masks_like_input as masks_like_input
from anomalib_study.evaluate_detection import patchcore_coreset_ablation as patchcore_coreset_ablation
from anomalib_study.hardware import native_bf16
from anomalib_study.io import check_output_folder, write_json
from anomalib_study.methods.base import MethodSpec, RunOptions
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
        "native_bf16": native_bf16(device),
        "weights_sha256": (backbone.weights_sha256 or "none") if uses_weights else "none",
    }
    if "seed" in params:
        environment["seed"] = params["seed"]
    if run is not None:
        environment["run_options"] = {"batch_size": int(run.batch_size), "num_workers": int(run.num_workers)}
    return environment


#: task -> its evaluation path (a method's declaration names its task)
EVALUATORS = {"detection": evaluate_detection, "clustering": evaluate_clustering}


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
    metrics_path = check_output_folder(out) / "metrics.json" if out is not None else None
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
