"""Group the images of a folder into anomaly types: the function behind ``anomalib-study cluster``.

``cluster_folder(folder, out, normal_dir=None, n_clusters=None, ...)`` lists the images of
``folder`` (recursively, by the package's one listing rule), computes their patch-weighted
embeddings (:class:`~anomalib_study.methods.clustering.AnomalyClustering`: the
``semi_supervised`` mode when ``normal_dir`` gives normal images, else ``unsupervised``)
and groups them. Without ``n_clusters`` the number is chosen without labels: the highest
silhouette over 2..``max_clusters`` (``config.json`` records every candidate's score).

Each run writes a new folder ``<out>/<timestamp>/`` (never overwritten; built hidden and
renamed when complete, as ``detect`` does) holding:

- ``clusters.csv``: path, cluster, and a summary of the image's patch weights (the largest
  weight, the share of patches the weights spread over, the grid cell of the top patch);
- ``cluster_<k>.jpg``: a thumbnail sheet of each cluster;
- ``skipped.csv``: unreadable images (path, reason; header only when none), left out;
- ``config.json``: settings, tau and how it was chosen, the number of clusters and how,
  cluster sizes, timings.

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

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import as_json, atomic_write, check_output_folder, run_dir_in_progress, write_json

__all__ = ["cluster_folder"]


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
    max_thumbnails: int = 24,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Cluster the images of ``folder``; returns the run folder ``<out>/<timestamp>/``.

    ``options``: other :class:`~anomalib_study.methods.clustering.AnomalyClustering`
    parameters (tau, weight_share, linkage, layers, n_references, ...). ``max_thumbnails``:
    images shown per cluster sheet. ``batch_size``: images per forward pass (None: the
    method's declared default).
    """
    import matplotlib.pyplot as plt

    from anomalib_study.data.decode import content_hash, find_unreadable, list_images, unreadable_message
    from anomalib_study.methods.clustering import AnomalyClustering
    from anomalib_study.plots import cluster_thumbnail_sheet

    folder = Path(folder)
    check_output_folder(out)  # before any image is read: a file named like it fails now, not at the end
    paths = list_images(folder, "folder")
    if n_clusters is not None and (isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2):
        raise ParameterError(
            f"n_clusters must be an integer >= 2 (or None: chosen by the silhouette), got {n_clusters!r}"
        )
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
    grid = model.grid_shape_
    summary = _weight_summary(model.weights_, grid)
    description = model.describe()

    with run_dir_in_progress(out) as run:
        table = pd.DataFrame(
            [{"path": str(path), "cluster": int(label), **row} for path, label, row in zip(readable, labels, summary)]
        )
        with atomic_write(run.path / "clusters.csv", "w") as handle:
            table.to_csv(handle, index=False, lineterminator="\n")
        skipped = pd.DataFrame(
            {"path": [str(p) for p in bad], "reason": list(bad.values())}, columns=["path", "reason"]
        )
        with atomic_write(run.path / "skipped.csv", "w") as handle:
            skipped.to_csv(handle, index=False, lineterminator="\n")
        sizes = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
        for k in sorted(sizes):
            members = [readable[i] for i in np.flatnonzero(labels == k)]
            figure = cluster_thumbnail_sheet({k: members}, max_per_cluster=max_thumbnails)
            with atomic_write(run.path / f"cluster_{k}.jpg", "wb") as handle:
                figure.savefig(handle, format="jpg", dpi=80, pil_kwargs={"quality": 70})
            plt.close(figure)
        write_json(
            run.path / "config.json",
            as_json(
                {
                    "folder": str(folder.resolve()),
                    "normal_dir": None if normal_dir is None else str(Path(normal_dir).resolve()),
                    "n_images": len(paths),
                    "n_clustered": len(readable),
                    "n_skipped": len(bad),
                    "n_normal_images": len(normal_paths),
                    "backbone": backbone,
                    "cluster_sizes": {str(k): v for k, v in sizes.items()},
                    **description,
                    "timings": {"check_s": check_s, **description["timings"]},
                }
            ),
        )
    return run.final
