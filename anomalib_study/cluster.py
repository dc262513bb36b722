"""Group the images of a folder into anomaly types: the functions behind ``anomalib-study cluster``.

``cluster_folder(folder, out, normal_dir=None, n_clusters=None, ...)`` lists the images of
``folder`` (recursively, by the package's one listing rule), computes their patch-weighted
embeddings (:class:`~anomalib_study.methods.clustering.AnomalyClustering`: the
``semi_supervised`` mode when ``normal_dir`` gives normal images, else ``unsupervised``)
and groups them. Without ``n_clusters`` the number is chosen without labels, by the
method's criterion over 2..``max_clusters`` (``config.json`` records every candidate's score).

``regroup_run(run_dir, n_clusters=None, ...)`` (``cluster --from RUN``) groups the images
of an earlier run again from the embeddings it kept, in seconds: no backbone, no image read
(:func:`group_embeddings`); without ``n_clusters`` the criterion chooses again.

Each run writes a new folder ``<out>/<timestamp>/`` (never overwritten, a regroup's
included; built hidden and renamed when complete, as ``detect`` does) holding:

- ``index.html``: the page (:mod:`anomalib_study.cluster_page`): the run's facts, the
  criterion curve, a dendrogram, a 2-D map of the images, and per cluster its size, how
  tight it is and its thumbnails with their patch weights (where the method looked);
- ``clusters.csv``: path, cluster, distance to the cluster's centre, and a summary of the
  image's patch weights (the largest weight, the share of patches the weights spread over,
  the grid cell of the top patch);
- ``embeddings.npz``: what a regroup and the page need (:mod:`anomalib_study.cluster_run`);
- ``cluster_<k>.jpg``: the thumbnails the page shows for each cluster;
- ``skipped.csv``: unreadable images (path, reason; header only when none), left out;
- ``config.json`` (written last): settings, tau and how it was chosen, the number of
  clusters and how, cluster sizes, ``from_run`` (the run regrouped, or null), timings.

Unreadable images of ``folder`` are skipped and listed (``strict=True`` refuses them first,
naming all); an unreadable normal image is refused, naming all.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from anomalib_study.cluster_page import MAX_SHOWN, render_run
from anomalib_study.cluster_run import (
    EMBEDDINGS_FILE,
    THUMBNAIL,
    ClusterRun,
    centre_distances,
    jpeg_bytes,
    load_run,
    save_run,
)
from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import as_json, atomic_write, check_output_folder, run_dir_in_progress, write_json

__all__ = ["cluster_folder", "group_embeddings", "regroup_run"]


def _weight_summary(weights: np.ndarray, grid: tuple[int, int] | None) -> list[dict[str, Any]]:
    from anomalib_study.methods.clustering import effective_share

    share = effective_share(weights)
    rows = []
    for i, w in enumerate(weights):
        top = int(np.argmax(w))
        cell = f"{top // grid[1]},{top % grid[1]}" if grid else str(top)
        rows.append({"top_weight": float(w[top]), "weight_share": float(share[i]), "top_patch": cell})
    return rows


def cluster_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike = "clusters",
    *,
    normal_dir: str | os.PathLike | None = None,
    n_clusters: int | None = None,
    max_clusters: int = 10,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    resize_mode: str = "crop",
    device: str = "cpu",
    batch_size: int | None = None,
    num_workers: int = 0,
    strict: bool = False,
    max_thumbnails: int = MAX_SHOWN,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Cluster the images of ``folder``; returns the run folder ``<out>/<timestamp>/``.

    ``options``: other :class:`~anomalib_study.methods.clustering.AnomalyClustering`
    parameters (tau, weight_share, linkage, layers, n_references, ...). ``max_thumbnails``:
    images shown per cluster on the page (all are in clusters.csv). ``batch_size``: images
    per forward pass (None: the method's declared default).
    """
    from anomalib_study.data.decode import content_hash, find_unreadable, list_images, unreadable_message
    from anomalib_study.methods.clustering import AnomalyClustering

    begun = time.perf_counter()
    folder = Path(folder)
    check_output_folder(out)  # before any image is read: a file named like it fails now, not at the end
    paths = list_images(folder, "folder")
    _check_n_clusters(n_clusters)
    mode = "semi_supervised" if normal_dir is not None else "unsupervised"
    if "mode" in options:
        raise ParameterError("cluster picks the mode itself: semi_supervised with --normal-dir, else unsupervised")
    model = AnomalyClustering(
        backbone=backbone,
        weights=weights,
        image_size=image_size,
        resize_mode=resize_mode,
        mode=mode,
        n_clusters=n_clusters,
        max_clusters=max_clusters,
        device=device,
        num_workers=num_workers,
        progress=progress,
        **({} if batch_size is None else {"batch_size": batch_size}),
        **options,
    )
    model._validate_params()
    started = time.perf_counter()
    bad = find_unreadable(paths, progress=progress, desc="checking images")
    if bad and strict:
        raise DataError(unreadable_message(bad, "folder", folder, "and strict is set: fix or remove them"))
    readable = [p for p in paths if p not in bad]
    if bad:
        warnings.warn(
            f"{len(bad)} of {len(paths)} images could not be read and were left out: they are listed with "
            "the reason in skipped.csv",
            stacklevel=2,
        )
    if len(readable) < 3:
        raise DataError(f"folder {folder} holds {len(readable)} readable image(s): clustering needs at least 3")
    if n_clusters is not None and n_clusters > len(readable):
        raise ParameterError(f"n_clusters={n_clusters} is more than the {len(readable)} readable images of {folder}")
    distinct = len({content_hash(path) for path in readable})  # the same bytes: the same image
    if distinct < 2:
        raise DataError(
            f"the {len(readable)} readable images of {folder} are all the same image (identical files): there is "
            "nothing to group"
        )
    if n_clusters is not None and n_clusters > distinct:
        raise ParameterError(
            f"n_clusters={n_clusters} is more than the {distinct} distinct images of {folder} "
            f"({len(readable) - distinct} of its {len(readable)} images are copies of others): pass at most {distinct}"
        )
    if distinct < len(readable):
        warnings.warn(
            f"{len(readable) - distinct} of the {len(readable)} images of {folder} are byte-for-byte copies of others: "
            "copies always share a cluster",
            stacklevel=2,
        )
        if n_clusters is None and model.max_clusters > distinct:  # never more clusters than distinct images
            model.set_params(max_clusters=distinct)
    normal_paths: list[Path] = []
    if normal_dir is not None:
        normal_paths = list_images(normal_dir, "normal_dir")
        bad_normal = find_unreadable(normal_paths, progress=progress, desc="checking normal images")
        if bad_normal:
            raise DataError(unreadable_message(bad_normal, "normal_dir", Path(normal_dir), "fix or remove them"))
    check_s = time.perf_counter() - started

    model.fit_paths(normal_paths)
    labels = model.fit_predict_paths(readable)
    started = time.perf_counter()
    thumbnails = _thumbnails(readable, model.get_backbone().preprocessing, progress)
    thumbnails_s = time.perf_counter() - started
    description = model.describe()
    run = ClusterRun(
        folder=str(folder.resolve()),
        relatives=[Path(path).relative_to(folder).as_posix() for path in readable],
        embeddings=model.embeddings_,
        weights=model.weights_.astype(np.float32),
        grid=tuple(model.grid_shape_),
        labels=labels,
        thumbnails=thumbnails,
        description=description,
        info={
            "backbone": backbone,
            "preprocessing": model.get_backbone().preprocessing,
            "normal_dir": None if normal_dir is None else str(Path(normal_dir).resolve()),
            "n_normal_images": len(normal_paths),
            "n_listed": len(paths),
            "n_distinct": distinct,
            "skipped": {str(path): reason for path, reason in bad.items()},
            "from_run": None,
        },
    )
    timings = {"check_s": check_s, **description["timings"], "thumbnails_s": thumbnails_s}
    return _write_run(out, run, timings, max_thumbnails, started=begun)


def _thumbnails(paths: list[Path], preprocessing: dict, progress: bool) -> list[bytes]:
    """One small JPEG per image, in the backbone's input geometry (so that the patch weights line up)."""
    from tqdm.auto import tqdm

    from anomalib_study.plots import crop_like_input

    out = []
    for path in tqdm(paths, desc="thumbnails", unit="img", disable=not progress, leave=False):
        image = crop_like_input(path, preprocessing)
        out.append(jpeg_bytes(image.resize((THUMBNAIL, THUMBNAIL), Image.BICUBIC), quality=85))
    return out


#: what a regroup keeps from the run it regroups: how the embeddings were made
_FROM_PATCHES = (
    "settings",
    "tau",
    "tau_rule",
    "n_patches",
    "feature_dim",
    "grid_shape",
    "memory_bank_size",
    "unsupervised_exact",
    "n_normal_images",
    "median_weight_share",
    "timings",
)


def group_embeddings(
    embeddings: np.ndarray, n_clusters: int | None, max_clusters: int, linkage: str, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """Labels (n,) of image embeddings already weighted, and the method's ``describe()`` of that
    grouping: the number of clusters given, or chosen by the method's own criterion.

    The embeddings go through :class:`~anomalib_study.methods.clustering.AnomalyClustering` as
    bags of one patch in the ``average`` mode, whose weights are then all 1: its embeddings are
    these, and it groups them (and chooses their number) exactly as it grouped the run's.
    """
    from anomalib_study.methods.clustering import AnomalyClustering

    model = AnomalyClustering(
        mode="average", n_clusters=n_clusters, max_clusters=max_clusters, linkage=linkage, seed=seed, progress=False
    ).fit(None)
    labels = model.fit_predict(np.asarray(embeddings, dtype=np.float32)[:, None, :])
    return labels, model.describe()


def regroup_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    n_clusters: int | None = None,
    max_clusters: int | None = None,
    linkage: str | None = None,
    max_thumbnails: int = MAX_SHOWN,
) -> Path:
    """Group the images of an earlier cluster run again from its ``embeddings.npz``: no backbone,
    no image read. ``n_clusters`` None: chosen by the method's criterion over
    2..``max_clusters``; ``max_clusters`` and ``linkage`` None: the run's. Writes a new run
    folder under ``out`` (default: beside ``run_dir``), the same files as a first run, its
    config recording ``from_run``; returns it. DataError naming ``run_dir`` and the fix for
    a folder that is missing, unfinished, of an older format or damaged."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    source = load_run(run_dir)
    out = run_dir.resolve().parent if out is None else out
    check_output_folder(out)
    settings = dict(source.description.get("settings", {}))
    _check_n_clusters(n_clusters)
    max_clusters = settings.get("max_clusters", 10) if max_clusters is None else max_clusters
    linkage = settings.get("linkage", "ward") if linkage is None else linkage
    n = len(source.relatives)
    distinct = source.info.get("n_distinct") or len(np.unique(source.embeddings, axis=0))  # as the run counted
    if n_clusters is not None and n_clusters > distinct:
        kind = "images" if distinct == n else f"distinct images ({n - distinct} of its {n} are copies of others)"
        raise ParameterError(f"n_clusters={n_clusters} is more than the {distinct} {kind} of run {run_dir}")
    chosen_max = min(max_clusters, distinct) if n_clusters is None else max_clusters
    labels, grouped = group_embeddings(source.embeddings, n_clusters, chosen_max, linkage, settings.get("seed", 0))
    description = dict(source.description)
    description.update({key: value for key, value in grouped.items() if key not in _FROM_PATCHES})
    description["settings"] = {**settings, "n_clusters": n_clusters, "max_clusters": max_clusters, "linkage": linkage}
    info = {**source.info, "from_run": str(run_dir.resolve()), "criterion_of_source": None}
    own = source.description.get("n_clusters_scores")
    earlier = source.description if own else source.info.get("criterion_of_source")
    if (
        n_clusters is not None and earlier and settings.get("linkage") == linkage
    ):  # the curve the given number can be read against
        info["criterion_of_source"] = {
            "n_clusters_criterion": earlier.get("n_clusters_criterion"),
            "n_clusters_scores": earlier.get("n_clusters_scores"),
        }
    run = ClusterRun(
        folder=source.folder,
        relatives=source.relatives,
        embeddings=source.embeddings,
        weights=source.weights,
        grid=source.grid,
        labels=labels,
        thumbnails=source.thumbnails,
        description=description,
        info=info,
    )
    return _write_run(out, run, {"regroup_s": time.perf_counter() - started}, max_thumbnails, started=started)


def _check_n_clusters(n_clusters: int | None) -> None:
    if n_clusters is not None and (isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2):
        raise ParameterError(f"n_clusters must be an integer >= 2 (or None: chosen without labels), got {n_clusters!r}")


def _write_run(
    out: str | os.PathLike, run: ClusterRun, timings: dict[str, float], max_shown: int, started: float
) -> Path:
    """Write ``run``'s files into a new ``<out>/<timestamp>/`` (built hidden, renamed when
    complete; ``config.json`` last, its ``total_s`` counted from ``started``); returns it."""
    labels = np.asarray(run.labels)
    sizes = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    with run_dir_in_progress(out) as folder:
        page_started = time.perf_counter()
        files = render_run(run, max_shown)
        timings = {**timings, "page_s": time.perf_counter() - page_started}
        distances = centre_distances(run.embeddings, labels)
        table = pd.DataFrame(
            [
                {"path": str(path), "cluster": int(label), "distance_to_centre": float(distance), **row}
                for path, label, distance, row in zip(
                    run.paths, labels, distances, _weight_summary(run.weights, run.grid)
                )
            ]
        )
        with atomic_write(folder.path / "clusters.csv", "w") as handle:
            table.to_csv(handle, index=False, lineterminator="\n")
        skipped = run.info.get("skipped") or {}
        skipped = pd.DataFrame({"path": list(skipped), "reason": list(skipped.values())}, columns=["path", "reason"])
        with atomic_write(folder.path / "skipped.csv", "w") as handle:
            skipped.to_csv(handle, index=False, lineterminator="\n")
        save_run(folder.path / EMBEDDINGS_FILE, run)
        for name, data in files.items():
            with atomic_write(folder.path / name, "wb") as handle:
                handle.write(data)
        info = run.info
        write_json(
            folder.path / "config.json",
            as_json(
                {
                    "folder": run.folder,
                    "normal_dir": info.get("normal_dir"),
                    "from_run": info.get("from_run"),
                    "n_images": info.get("n_listed", len(labels)),
                    "n_clustered": int(labels.size),
                    "n_skipped": len(skipped),
                    "n_normal_images": info.get("n_normal_images", 0),
                    "backbone": info.get("backbone"),
                    "cluster_sizes": {str(k): v for k, v in sizes.items()},
                    **run.description,
                    "timings": {**timings, "total_s": time.perf_counter() - started},
                }
            ),
        )
    return folder.final
