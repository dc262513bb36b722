"""``detect_abnormal``: flag the anomalous images of a folder with the deep-kNN detector.

The detector is fitted on a folder of normal images (``image_dir``) and kept in a
**database folder** (``db_dir``, default ``knn_db`` in the current folder), reused by later
runs as long as it still matches the backbone and the normal images:

``db_dir/knn_model.npz``
    the fitted :class:`~anomalib_study.methods.knn.KNNDetector` (memory bank, faiss index,
    leave-one-out training scores, threshold), written by ``KNNDetector.save``.
``db_dir/database.json``
    format ``"anomalib_study.knn_database"``, version 1: backbone name, weights sha256,
    preprocessing, embedding dimension; k, k used, thres_ratio, threshold, index factory;
    the sha256 of ``knn_model.npz``; and every normal image (path relative to
    ``image_dir``, content sha256). It is written last, so a database folder without it
    is incomplete and simply rebuilt.

Loading refuses (ModelFileError, with how to fix it) a database of another format or
version, whose two files do not belong together, whose backbone weights, preprocessing or
dimension differ from the backbone loaded now, or whose normal images changed since it was
built ("stale database").

Every run writes a new folder ``<result_dir>/<timestamp>/`` (never overwritten) with
``abnormal.result`` (the test images predicted anomalous, one path per line),
``scores.csv`` (path, score, predicted; higher score = more anomalous) and
``config.json`` (everything needed to reproduce the run, with timings).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomalib_study import __version__
from anomalib_study.data.decode import content_hash, is_image_file
from anomalib_study.errors import DataError, ModelFileError, ParameterError, StudyError
from anomalib_study.io import atomic_write, sha256_file, new_run_dir, write_json
from anomalib_study.methods.base import check_fraction, check_int
from anomalib_study.methods.knn import KNNDetector
from anomalib_study.search import available_cores

__all__ = [
    "detect_abnormal",
    "load_database",
    "save_database",
    "KNNDatabase",
    "list_images",
    "resolve_device",
    "DB_FORMAT",
    "DB_VERSION",
]

DB_FORMAT = "anomalib_study.knn_database"
DB_VERSION = 1
DB_FILE = "database.json"
MODEL_FILE = "knn_model.npz"
DEFAULT_DB_DIR = "knn_db"


# ---------------------------------------------------------------------- the backbone layer
# Thin wrappers so that this module imports without torch models loaded, and so that
# tests can replace them (monkeypatch) by a tiny fake backbone and extractor.
def load_backbone(name: str, weights=None, device: str = "cpu"):
    """:func:`anomalib_study.backbones.load_backbone` (imported on first use)."""
    from anomalib_study.backbones import load_backbone as _load_backbone

    return _load_backbone(name, weights=weights, device=device)


def extract_embeddings(backbone, paths, **options) -> np.ndarray:
    """:func:`anomalib_study.features.extract_embeddings` (imported on first use): (N, D) float32."""
    from anomalib_study.features import extract_embeddings as _extract

    return _extract(backbone, paths, **options)


# ---------------------------------------------------------------------- helpers
def resolve_device(gpu: bool | int | str) -> str:
    """``False`` -> ``"cpu"``, ``True`` -> ``"cuda"``, ``N`` -> ``"cuda:N"`` (a device string passes through).

    Raises ParameterError if CUDA is asked for but not available.
    """
    if isinstance(gpu, (bool, np.bool_)):
        device = "cuda" if gpu else "cpu"
    elif isinstance(gpu, (int, np.integer)):
        if gpu < 0:
            raise ParameterError(f"gpu must be False, True or a GPU number >= 0, got {gpu}")
        device = f"cuda:{int(gpu)}"
    elif isinstance(gpu, str) and (gpu == "cpu" or gpu.startswith("cuda")):
        device = gpu
    else:
        raise ParameterError(f"gpu must be False, True, a GPU number or a device string, got {gpu!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ParameterError(f"gpu={gpu!r} asks for CUDA, but no CUDA device is available: pass gpu=False")
        if ":" in device and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
            raise ParameterError(f"gpu={gpu!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


def list_images(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted; DataError naming ``what`` if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist or is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise DataError(f"{what} {folder} holds no image files (.png, .jpg, .bmp, .tif): nothing to do")
    return paths


def _manifest(image_dir: Path, paths: list[Path], progress: bool = True) -> dict[str, str]:
    """relative posix path -> content sha256, for every image."""
    bar = tqdm(paths, desc=f"hashing {image_dir}", unit="img", disable=not progress, leave=False)
    return {p.relative_to(image_dir).as_posix(): content_hash(p) for p in bar}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


# ---------------------------------------------------------------------- the database
@dataclass
class KNNDatabase:
    """A loaded kNN database: the fitted detector and its ``database.json`` metadata."""

    path: Path
    detector: KNNDetector
    metadata: dict = field(repr=False)

    @property
    def backbone_name(self) -> str:
        return self.metadata["backbone"]["name"]

    def check_backbone(self, backbone) -> None:
        """ModelFileError unless ``backbone`` has the name, weights, preprocessing and
        dimension the database was built with."""
        stored = self.metadata["backbone"]
        fix = f"delete {self.path} or pass another db_dir to rebuild the database with this backbone"
        if backbone.name != stored["name"]:
            raise ModelFileError(f"database {self.path} was built with backbone {stored['name']!r}, not {backbone.name!r}: {fix}")
        if backbone.weights_sha256 != stored["weights_sha256"]:
            raise ModelFileError(
                f"database {self.path} was built with {stored['name']} weights sha256 {stored['weights_sha256'][:12]}..., "
                f"but the weights loaded now have sha256 {str(backbone.weights_sha256)[:12]}...: {fix}"
            )
        if _jsonable(backbone.preprocessing) != stored["preprocessing"]:
            raise ModelFileError(
                f"database {self.path} was built with preprocessing {stored['preprocessing']}, "
                f"but backbone {backbone.name} now uses {_jsonable(backbone.preprocessing)}: {fix}"
            )
        if int(backbone.embedding_dim) != int(stored["embedding_dim"]):
            raise ModelFileError(
                f"database {self.path} holds {stored['embedding_dim']}-dimensional embeddings, "
                f"but backbone {backbone.name} gives {backbone.embedding_dim}: {fix}"
            )

    def check_images(self, image_dir: str | os.PathLike, progress: bool = True) -> None:
        """ModelFileError ("stale database") if the images in ``image_dir`` are not exactly
        those (same relative paths, same contents) the database was built from."""
        image_dir = Path(image_dir)
        paths = sorted(p for p in image_dir.rglob("*") if p.is_file() and is_image_file(p)) if image_dir.is_dir() else []
        now = _manifest(image_dir, paths, progress=progress)
        stored = {entry["path"]: entry["sha256"] for entry in self.metadata["images"]}
        added = sorted(set(now) - set(stored))
        removed = sorted(set(stored) - set(now))
        changed = sorted(p for p in set(now) & set(stored) if now[p] != stored[p])
        if added or removed or changed:
            examples = (added + removed + changed)[:3]
            raise ModelFileError(
                f"stale database: {len(added)} image(s) added, {len(removed)} removed, {len(changed)} changed "
                f"in {image_dir} since {self.path} was built (e.g. {', '.join(examples)}); "
                f"delete {self.path} or pass another db_dir to rebuild"
            )


def save_database(
    db_dir: str | os.PathLike,
    detector: KNNDetector,
    backbone,
    image_dir: str | os.PathLike,
    image_hashes: dict[str, str],
) -> Path:
    """Save a fitted detector and its provenance as a database folder (see the module doc).

    ``image_hashes`` maps each normal image's path relative to ``image_dir`` to its content
    sha256, in the order of the detector's memory bank. ``database.json`` is written last
    and atomically, so an interrupted save leaves no database that looks valid.
    """
    db_dir = Path(db_dir)
    if len(image_hashes) != detector.memory_bank_.shape[0]:
        raise ParameterError(
            f"{len(image_hashes)} image hashes given for a memory bank of {detector.memory_bank_.shape[0]} rows"
        )
    db_dir.mkdir(parents=True, exist_ok=True)
    model_path = detector.save(db_dir / MODEL_FILE)
    metadata = {
        "format": DB_FORMAT,
        "version": DB_VERSION,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "anomalib_study_version": __version__,
        "backbone": {
            "name": backbone.name,
            "weights_sha256": backbone.weights_sha256,
            "preprocessing": _jsonable(backbone.preprocessing),
            "embedding_dim": int(backbone.embedding_dim),
        },
        "knn": {
            "k": int(detector.k),
            "k_used": int(detector.k_),
            "thres_ratio": float(detector.thres_ratio),
            "threshold": float(detector.threshold_),
            "normalize": bool(detector.normalize),
            "index": detector.index,
            "index_describe": detector.index_.describe(),
        },
        "model_file": MODEL_FILE,
        "model_sha256": sha256_file(model_path),
        "image_dir": str(Path(image_dir).resolve()),
        "n_images": len(image_hashes),
        "images": [{"path": p, "sha256": h} for p, h in image_hashes.items()],
    }
    write_json(db_dir / DB_FILE, metadata)
    return db_dir


def load_database(db_dir: str | os.PathLike, device: str = "cpu") -> KNNDatabase:
    """Load a database folder written by :func:`save_database`.

    Checks the format, version and completeness of ``database.json``, that
    ``knn_model.npz`` is the file it describes (sha256), and that the detector agrees with
    it (k, threshold, number of images, dimension). Anything wrong -> ModelFileError
    naming the folder. The backbone and the normal images are checked separately
    (:meth:`KNNDatabase.check_backbone`, :meth:`KNNDatabase.check_images`).
    """
    db_dir = Path(db_dir)
    meta_path = db_dir / DB_FILE
    fix = f"delete {db_dir} (or pass another db_dir) to rebuild it"
    if not meta_path.is_file():
        raise ModelFileError(f"{db_dir} is not a kNN database: {DB_FILE} is missing")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{meta_path} is corrupt ({error}): {fix}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != DB_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ModelFileError(f"{meta_path} holds format {found!r}, not {DB_FORMAT!r}: it is not a kNN database; {fix}")
    if metadata.get("version") != DB_VERSION:
        raise ModelFileError(
            f"{meta_path} is database version {metadata.get('version')!r}; this code reads version {DB_VERSION}: {fix}"
        )
    try:
        backbone = metadata["backbone"]
        for key in ("name", "weights_sha256", "preprocessing", "embedding_dim"):
            backbone[key]
        knn = metadata["knn"]
        k_used, threshold = int(knn["k_used"]), float(knn["threshold"])
        for key in ("k", "thres_ratio", "index"):
            knn[key]
        images = metadata["images"]
        n_images = len(images)
        for entry in images:
            entry["path"], entry["sha256"]
        model_file, model_sha = metadata["model_file"], metadata["model_sha256"]
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{meta_path} is incomplete or corrupt (field {error} missing or wrong): {fix}") from None
    model_path = db_dir / model_file
    if not model_path.is_file():
        raise ModelFileError(f"{db_dir} is incomplete: {model_file} is missing; {fix}")
    if sha256_file(model_path) != model_sha:
        raise ModelFileError(f"{model_path} is not the model {meta_path} describes (sha256 differs): {fix}")
    detector = KNNDetector.load(model_path, device=device)
    if (
        detector.k_ != k_used
        or not np.isclose(detector.threshold_, threshold)
        or detector.memory_bank_.shape[0] != n_images
        or detector.n_features_in_ != int(backbone["embedding_dim"])
    ):
        raise ModelFileError(
            f"{db_dir} is inconsistent: the model (k={detector.k_}, threshold={detector.threshold_:.6g}, "
            f"{detector.memory_bank_.shape[0]} x {detector.n_features_in_}) does not match {DB_FILE} "
            f"(k={k_used}, threshold={threshold:.6g}, {n_images} images x {backbone['embedding_dim']}): {fix}"
        )
    return KNNDatabase(path=db_dir, detector=detector, metadata=metadata)


# ---------------------------------------------------------------------- the command
def detect_abnormal(
    test_dir: str | os.PathLike,
    db_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike = "images",
    model_name: str = "efficientnet_lite0",
    k: int = 100,
    thres_ratio: float = 0.92,
    gpu: bool | int | str = False,
    batch_size: int = 128,
    num_workers: int = 8,
    result_dir: str | os.PathLike = "result",
    weights: str | os.PathLike | None = None,
    index: str = "Flat",
    progress: bool = True,
    cache: Any = "default",
) -> Path:
    """Flag the anomalous images of ``test_dir`` with the deep-kNN detector; return the run folder.

    Args:
        test_dir: folder of images to check (searched recursively).
        db_dir: database folder (default ``"knn_db"`` in the current folder). If it holds
            a database, that database is used (its backbone, k and threshold win over the
            arguments, with a warning where they differ) after checking it is not stale;
            otherwise the database is built from ``image_dir`` and saved there.
        image_dir: folder of normal images (searched recursively) the database is built
            from, and checked against when a database is reused.
        model_name: backbone name (see ``anomalib_study.backbones.BACKBONES``).
        k: number of nearest normal images (clamped to n_normal - 1 with a warning).
        thres_ratio: quantile of the leave-one-out normal scores used as threshold, in (0, 1).
        gpu: False (cpu), True (cuda) or a GPU number; CUDA unavailable -> ParameterError.
        batch_size: images per forward pass.
        num_workers: image-loading processes (clamped to the cores available).
        result_dir: runs are written to ``<result_dir>/<timestamp>/``.
        weights: explicit weight file for the backbone.
        index: faiss factory string of the search index (``"Flat"`` = exact).
        progress: show progress bars.
        cache: the feature cache: ``"default"`` (``$ANOMALIB_STUDY_CACHE``), a
            :class:`~anomalib_study.features.FeatureCache`, or ``None`` to neither read nor write it.

    Returns:
        The new run folder, holding ``abnormal.result``, ``scores.csv`` and ``config.json``.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    k = check_int("k", k, minimum=1)
    thres_ratio = check_fraction("thres_ratio", thres_ratio)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    num_workers = check_int("num_workers", num_workers, minimum=0)
    device = resolve_device(gpu)
    workers = min(num_workers, available_cores())
    db_dir = Path(db_dir) if db_dir is not None else Path(DEFAULT_DB_DIR)
    image_dir, test_dir = Path(image_dir), Path(test_dir)
    test_paths = list_images(test_dir, "test_dir")
    extract_options = dict(batch_size=batch_size, num_workers=workers, device=device, progress=progress, cache=cache)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = time.perf_counter()
        built = not (db_dir / DB_FILE).is_file()
        if not built:
            database = load_database(db_dir, device=device)
            detector, stored = database.detector, database.metadata
            for name, passed, used in (
                ("model_name", model_name, stored["backbone"]["name"]),
                ("k", k, stored["knn"]["k"]),
                ("thres_ratio", thres_ratio, stored["knn"]["thres_ratio"]),
                ("index", index, stored["knn"]["index"]),
            ):
                if passed != used:
                    warnings.warn(
                        f"{name}={passed!r} ignored: the database {db_dir} was built with {name}={used!r}, "
                        f"which is used (delete {db_dir} or pass another db_dir to rebuild)",
                        stacklevel=2,
                    )
            backbone = load_backbone(database.backbone_name, weights=weights, device=device)
            database.check_backbone(backbone)
            if image_dir.is_dir():
                database.check_images(image_dir, progress=progress)
            else:
                warnings.warn(
                    f"image_dir {image_dir} does not exist: the database {db_dir} is used without checking "
                    "that its normal images are still current",
                    stacklevel=2,
                )
            timings["load_database_s"] = time.perf_counter() - step
        else:
            normal_paths = list_images(image_dir, "image_dir")
            backbone = load_backbone(model_name, weights=weights, device=device)
            hashes = _manifest(image_dir, normal_paths, progress=progress)
            bank = extract_embeddings(backbone, normal_paths, desc="normal images", **extract_options)
            _check_embeddings(bank, len(normal_paths), backbone, image_dir)
            detector = KNNDetector(k=k, thres_ratio=thres_ratio, normalize=True, index=index, device=device).fit(bank)
            save_database(db_dir, detector, backbone, image_dir, hashes)
            stored = json.loads((db_dir / DB_FILE).read_text(encoding="utf-8"))
            timings["build_database_s"] = time.perf_counter() - step

        step = time.perf_counter()
        test_x = extract_embeddings(backbone, test_paths, desc="test images", **extract_options)
        _check_embeddings(test_x, len(test_paths), backbone, test_dir)
        timings["extract_test_s"] = time.perf_counter() - step
        step = time.perf_counter()
        scores = detector.score(test_x)
        predicted = (scores > detector.threshold_).astype(int)
        timings["score_s"] = time.perf_counter() - step
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)

    run_dir = new_run_dir(result_dir)
    flagged = [str(p) for p, flag in zip(test_paths, predicted) if flag]
    with atomic_write(run_dir / "abnormal.result", "w") as handle:
        handle.write("".join(f"{p}\n" for p in flagged))
    table = pd.DataFrame({"path": [str(p) for p in test_paths], "score": scores, "predicted": predicted})
    with atomic_write(run_dir / "scores.csv", "w") as handle:
        table.to_csv(handle, index=False, lineterminator="\n")
    timings["total_s"] = time.perf_counter() - started
    config = {
        "anomalib_study_version": __version__,
        "test_dir": str(test_dir.resolve()),
        "image_dir": str(image_dir.resolve()),
        "db_dir": str(db_dir.resolve()),
        "database_built": built,
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": _jsonable(backbone.preprocessing),
        "embedding_dim": int(backbone.embedding_dim),
        "k": int(detector.k),
        "k_used": int(detector.k_),
        "thres_ratio": float(detector.thres_ratio),
        "threshold": float(detector.threshold_),
        "normalize": bool(detector.normalize),
        "index": detector.index_.describe(),
        "n_bank": int(detector.memory_bank_.shape[0]),
        "n_test": len(test_paths),
        "n_abnormal": len(flagged),
        "device": device,
        "batch_size": batch_size,
        "num_workers": workers,
        "database_created": stored.get("created"),
        "warnings": [str(w.message) for w in caught],
        "timings": timings,
    }
    write_json(run_dir / "config.json", config)
    return run_dir


def _check_embeddings(x: np.ndarray, n: int, backbone, folder: Path) -> None:
    x = np.asarray(x)
    if x.shape != (n, int(backbone.embedding_dim)):
        raise StudyError(
            f"backbone {backbone.name} gave embeddings of shape {x.shape} for the {n} images of {folder}, "
            f"expected ({n}, {backbone.embedding_dim})"
        )
