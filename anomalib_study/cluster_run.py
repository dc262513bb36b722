"""What a cluster run keeps so that it can be regrouped and redrawn: ``embeddings.npz``.

``anomalib-study cluster FOLDER`` writes, beside its CSV, page and config, the file
``embeddings.npz`` (:data:`EMBEDDINGS_FILE`, written atomically; ``numpy.load`` reads it
without pickle):

- ``embeddings`` (n, D) float32: the patch-weighted image embeddings that were grouped;
- ``weights`` (n, P) float32: each image's patch weights (where the method looked), on the
  patch grid ``grid`` (h, w), P = h * w;
- ``labels`` (n,) int64: the clusters of this run;
- ``paths`` (n,) str: the images, relative to the grouped folder;
- ``thumbnails`` / ``thumbnail_offsets``: one small JPEG per image (:data:`THUMBNAIL` px,
  the backbone's input geometry, so that the weights line up), concatenated, with the
  n + 1 offsets of their bytes: a regroup redraws the page without reading the images;
- ``meta``: JSON text: the format (:data:`RUN_FORMAT`, :data:`RUN_VERSION`), the folder,
  the method's ``describe()`` of this grouping and the run's facts (backbone,
  preprocessing, normal folder, skipped images, ...).

:class:`ClusterRun` is that content in memory; :func:`save_run` writes it and
:func:`load_run` reads a run folder back, refusing with a :class:`DataError` that names the
folder and the fix a folder that is missing, unfinished, of an older format or damaged.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalib_study.errors import DataError
from anomalib_study.io import as_json, atomic_write

__all__ = [
    "EMBEDDINGS_FILE",
    "RUN_FORMAT",
    "RUN_VERSION",
    "THUMBNAIL",
    "ClusterRun",
    "centre_distances",
    "load_run",
    "save_run",
]

EMBEDDINGS_FILE = "embeddings.npz"
RUN_FORMAT = "anomalib_study.cluster_run"
#: 1: the first format with embeddings.npz (runs written before it have none)
RUN_VERSION = 1
#: side of the stored thumbnails, pixels
THUMBNAIL = 128
_ARRAYS = ("embeddings", "weights", "labels", "paths", "grid", "thumbnails", "thumbnail_offsets", "meta")
_REDO = "run `anomalib-study cluster` on the folder again to write a run that --from can regroup"


@dataclass
class ClusterRun:
    """One grouping of a folder's images, with everything its page and a regroup need.

    ``folder``: the grouped folder (absolute); ``relatives``: the n images relative to it;
    ``embeddings`` (n, D), ``weights`` (n, P) on ``grid`` (h, w), ``labels`` (n,);
    ``thumbnails``: n JPEG byte strings; ``description``: the method's ``describe()`` of
    this grouping; ``info``: the run's facts (``backbone``, ``preprocessing``,
    ``normal_dir``, ``n_normal_images``, ``n_listed``, ``n_distinct``, ``skipped`` {path:
    reason}, ``from_run``: the run regrouped, or None; ``criterion_of_source``: for a regroup
    into a given number, the criterion and scores of the run regrouped, which the page plots).
    """

    folder: str
    relatives: list[str]
    embeddings: np.ndarray
    weights: np.ndarray
    grid: tuple[int, int]
    labels: np.ndarray
    thumbnails: list[bytes]
    description: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """The images' paths (the folder joined with each relative path)."""
        return [Path(self.folder) / relative for relative in self.relatives]


def centre_distances(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) the Euclidean distance of each embedding to the mean of its cluster."""
    X = np.asarray(embeddings, dtype=np.float64)
    out = np.empty(len(X))
    for k in np.unique(labels):
        members = labels == k
        out[members] = np.linalg.norm(X[members] - X[members].mean(axis=0), axis=1)
    return out


def save_run(path: str | os.PathLike, run: ClusterRun) -> Path:
    """Write ``run`` to ``path`` (``<run folder>/embeddings.npz``) atomically."""
    blobs = [bytes(b) for b in run.thumbnails]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    meta = {
        "format": RUN_FORMAT,
        "version": RUN_VERSION,
        "folder": run.folder,
        "description": run.description,
        "info": run.info,
    }
    arrays = {
        "embeddings": np.asarray(run.embeddings, dtype=np.float32),
        "weights": np.asarray(run.weights, dtype=np.float32),
        "labels": np.asarray(run.labels, dtype=np.int64),
        "paths": np.array(run.relatives, dtype=str),
        "grid": np.array(run.grid, dtype=np.int64),
        "thumbnails": np.frombuffer(b"".join(blobs), dtype=np.uint8),
        "thumbnail_offsets": offsets,
        "meta": np.array(json.dumps(as_json(meta))),
    }
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def _not_a_run(run_dir: Path) -> DataError:
    """The error for a folder without embeddings.npz, saying what it holds instead."""
    if (run_dir / "config.json").is_file() and (run_dir / "clusters.csv").is_file():
        folder = ""
        try:
            folder = " " + str(json.loads((run_dir / "config.json").read_text())["folder"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return DataError(
            f"--from {run_dir}: this cluster run is of an older format (it has no {EMBEDDINGS_FILE}, which "
            f"cluster writes since format {RUN_VERSION}): run `anomalib-study cluster{folder or ' FOLDER'}` again "
            "and regroup that run"
        )
    runs = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / EMBEDDINGS_FILE).is_file())
    if runs:
        return DataError(
            f"--from {run_dir}: this folder holds {len(runs)} cluster run(s), it is not one: pass one of them, "
            f"e.g. --from {runs[-1]} (the latest)"
        )
    return DataError(
        f"--from {run_dir}: not a cluster run folder (no {EMBEDDINGS_FILE}): pass a folder that "
        "`anomalib-study cluster` wrote, <out>/<timestamp>/"
    )


def load_run(run_dir: str | os.PathLike) -> ClusterRun:
    """The :class:`ClusterRun` a run folder holds; DataError naming the folder and the fix
    when it is missing, unfinished, not a cluster run, of an older or newer format, or damaged."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(
            f"--from {run_dir}: no such folder: pass a run folder that `anomalib-study cluster` wrote, "
            "<out>/<timestamp>/"
        )
    if not run_dir.is_dir():
        raise DataError(f"--from {run_dir}: a file, not a run folder: pass <out>/<timestamp>/ of a cluster run")
    if run_dir.name.endswith(".partial"):
        raise DataError(
            f"--from {run_dir}: an unfinished run (its process stopped before the run was complete): pass a "
            "finished run folder (one without .partial)"
        )
    file = run_dir / EMBEDDINGS_FILE
    if not file.is_file():
        raise _not_a_run(run_dir)
    damaged = f"--from {run_dir}: {EMBEDDINGS_FILE} is incomplete or damaged"
    try:
        with np.load(file, allow_pickle=False) as data:
            missing = [name for name in _ARRAYS if name not in data.files]
            if missing:
                raise DataError(f"{damaged} (it lacks {', '.join(missing)}): {_REDO}")
            arrays = {name: data[name] for name in _ARRAYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{damaged} ({type(error).__name__}: {error}): {_REDO}") from None
    try:
        meta = json.loads(str(arrays["meta"]))
        kind, version = meta.get("format"), meta.get("version")
    except (ValueError, AttributeError):
        raise DataError(f"{damaged} (its meta record is not JSON): {_REDO}") from None
    if kind != RUN_FORMAT:
        raise DataError(f"--from {run_dir}: {EMBEDDINGS_FILE} is not a cluster run's (format {kind!r}): {_REDO}")
    if not isinstance(version, int) or version > RUN_VERSION:
        raise DataError(
            f"--from {run_dir}: written by a newer anomalib_study (run format {version}; this one reads up to "
            f"{RUN_VERSION}): upgrade anomalib_study, or {_REDO}"
        )
    if version < RUN_VERSION:
        raise DataError(f"--from {run_dir}: a run of an older format ({version}; now {RUN_VERSION}): {_REDO}")
    embeddings, weights, labels, paths = (arrays[k] for k in ("embeddings", "weights", "labels", "paths"))
    grid = tuple(int(v) for v in arrays["grid"])
    offsets = arrays["thumbnail_offsets"]
    n = len(paths)
    problems = []
    if embeddings.ndim != 2 or len(embeddings) != n:
        problems.append(f"embeddings of shape {embeddings.shape} for {n} images")
    if weights.ndim != 2 or len(weights) != n or len(grid) != 2 or weights.shape[1] != grid[0] * grid[1]:
        problems.append(f"weights of shape {weights.shape} for {n} images on a grid {grid}")
    if labels.shape != (n,):
        problems.append(f"labels of shape {labels.shape} for {n} images")
    if offsets.shape != (n + 1,) or offsets[-1] != arrays["thumbnails"].size or np.any(np.diff(offsets) < 0):
        problems.append("thumbnail offsets that do not match the thumbnails")
    if not all(isinstance(meta.get(key), dict) for key in ("description", "info")) or "folder" not in meta:
        problems.append("a meta record without description, info or folder")
    if problems:
        raise DataError(f"{damaged}: {'; '.join(problems)}: {_REDO}")
    blob = arrays["thumbnails"].tobytes()
    return ClusterRun(
        folder=str(meta["folder"]),
        relatives=[str(p) for p in paths],
        embeddings=embeddings.astype(np.float32, copy=False),
        weights=weights.astype(np.float32, copy=False),
        grid=grid,
        labels=labels.astype(np.int64, copy=False),
        thumbnails=[blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])],
        description=meta["description"],
        info=meta["info"],
    )


def jpeg_bytes(image, quality: int = 80) -> bytes:
    """A PIL image as JPEG bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
