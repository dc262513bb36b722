"""``detect_abnormal``: flag the anomalous images of a folder with the deep-kNN detector or PatchCore.

The detector (``method="knn"`` or ``"patchcore"``) is fitted on a folder of normal images
(``image_dir``) and kept in a **database folder** (``db_dir``, default ``knn_db`` or
``patchcore_db`` in the current folder), reused by later runs as long as it still matches
the method, the backbone and the normal images:

``db_dir/knn_model.npz`` or ``db_dir/patchcore_model.npz``
    the fitted model, written by :meth:`KNNDetector.save <anomalib_study.methods.knn.KNNDetector.save>`
    (memory bank of image embeddings, faiss index, leave-one-out scores, threshold) or
    :meth:`PatchCore.save <anomalib_study.methods.patchcore.PatchCore.save>` (coreset memory
    bank of patch features, configuration, backbone identity, calibration scores, threshold).
``db_dir/database.json``
    format ``"anomalib_study.detect_database"``, version 2: the ``method``; backbone name,
    weights sha256, preprocessing, image size, embedding dimension; the method's settings
    and threshold (section ``"knn"`` or ``"patchcore"``); the model file's name and sha256;
    and every normal image (path relative to ``image_dir``, content sha256). It is written
    last, so a database folder without it is incomplete and simply rebuilt. Version-1 kNN
    databases (format ``"anomalib_study.knn_database"``) are still read.

Loading refuses (ModelFileError, with how to fix it) a database of another format or
version, built for the other method, whose two files do not belong together, whose
backbone weights, preprocessing or dimension differ from the backbone loaded now, or whose
normal images changed since it was built ("stale database").

Thresholds (higher score = more anomalous; an image is flagged when score > threshold):

* kNN: the ``thres_ratio`` quantile (default 0.92) of the leave-one-out scores of the
  normal images.
* PatchCore: the ``thres_ratio`` quantile (default 0.99) of the image scores of the
  **held-out calibration images**: ``calibration_fraction`` (default 0.1) of the normal
  images, chosen with ``seed``, are kept out of the memory bank and scored like test
  images. So about ``1 - thres_ratio`` of normal images are expected to be flagged.

Every run writes a new folder ``<result_dir>/<timestamp>/`` (never overwritten) with
``abnormal.result`` (the test images predicted anomalous, one path per line),
``scores.csv`` (path, score, predicted; higher score = more anomalous) and
``config.json`` (everything needed to reproduce the run, with timings). PatchCore runs also
write ``overlays/``: one small JPEG per test image flagged anomalous (the
``max_overlays`` highest-scoring ones if more are flagged), named after the image's path
relative to ``test_dir`` (``bad/red.png`` -> ``overlays/bad/red.jpg``; ``red_png.jpg``
when two images share a stem), showing the backbone's resized and centre-cropped input
with the anomaly map blended on one colour scale for the whole run (the minimum and maximum
of all the run's maps, recorded in ``config.json``), plus ``overlays/overlays.csv``
(path, score, overlay).
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
from anomalib_study.io import as_json, atomic_write, new_run_dir, sha256_file, write_json
from anomalib_study.methods.base import check_fraction, check_int
from anomalib_study.methods.knn import KNNDetector
from anomalib_study.search import available_cores

__all__ = [
    "detect_abnormal",
    "load_database",
    "save_database",
    "DetectDatabase",
    "KNNDatabase",
    "list_images",
    "resolve_device",
    "write_overlays",
    "DB_FORMAT",
    "DB_VERSION",
    "METHODS",
]

DB_FORMAT = "anomalib_study.detect_database"
DB_VERSION = 2
LEGACY_FORMAT, LEGACY_VERSION = "anomalib_study.knn_database", 1  # kNN-only databases, still read
DB_FILE = "database.json"
METHODS = ("knn", "patchcore")
MODEL_FILES = {"knn": "knn_model.npz", "patchcore": "patchcore_model.npz"}
DEFAULT_DB_DIRS = {"knn": "knn_db", "patchcore": "patchcore_db"}
DEFAULT_THRES_RATIO = {"knn": 0.92, "patchcore": 0.99}
MODEL_FILE = MODEL_FILES["knn"]
DEFAULT_DB_DIR = DEFAULT_DB_DIRS["knn"]


# ---------------------------------------------------------------------- the backbone layer
# Thin wrappers so that this module imports without torch models loaded, and so that
# tests can replace them (monkeypatch) by a tiny fake backbone and extractor.
def load_backbone(name: str, weights=None, device: str = "cpu", image_size: int | None = None,
                  resize_mode: str = "crop"):
    """:func:`anomalib_study.backbones.load_backbone` (imported on first use)."""
    from anomalib_study.backbones import load_backbone as _load_backbone

    return _load_backbone(name, weights=weights, device=device, image_size=image_size, resize_mode=resize_mode)


def extract_embeddings(backbone, paths, **options) -> np.ndarray:
    """:func:`anomalib_study.features.extract_embeddings` (imported on first use): (N, D) float32."""
    from anomalib_study.features import extract_embeddings as _extract

    return _extract(backbone, paths, **options)


def _load_backbone(name: str, weights, device: str, image_size: int | None, resize_mode: str = "crop"):
    # image_size and resize_mode only when given, so that simple replacements of load_backbone keep working
    options = {} if image_size is None else {"image_size": image_size}
    if resize_mode != "crop":
        options["resize_mode"] = resize_mode
    return load_backbone(name, weights=weights, device=device, **options)


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


def _method_of(model) -> str:
    from anomalib_study.methods.patchcore import PatchCore

    if isinstance(model, KNNDetector):
        return "knn"
    if isinstance(model, PatchCore):
        return "patchcore"
    raise ParameterError(f"detect databases hold a KNNDetector or a PatchCore, not a {type(model).__name__}")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ParameterError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method


# ---------------------------------------------------------------------- the database
@dataclass
class DetectDatabase:
    """A loaded detect database: the method, its fitted model and the ``database.json`` metadata.

    ``detector`` is a :class:`~anomalib_study.methods.knn.KNNDetector` (``method == "knn"``)
    or a :class:`~anomalib_study.methods.patchcore.PatchCore` (``method == "patchcore"``).
    """

    path: Path
    detector: Any
    metadata: dict = field(repr=False)

    @property
    def method(self) -> str:
        return self.metadata.get("method", "knn")

    @property
    def backbone_name(self) -> str:
        return self.metadata["backbone"]["name"]

    @property
    def image_size(self) -> int | None:
        return self.metadata["backbone"].get("image_size")

    @property
    def resize_mode(self) -> str:
        return (self.metadata["backbone"].get("preprocessing") or {}).get("resize_mode", "crop")

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
        if as_json(backbone.preprocessing) != stored["preprocessing"]:
            raise ModelFileError(
                f"database {self.path} was built with preprocessing {stored['preprocessing']}, "
                f"but backbone {backbone.name} now uses {as_json(backbone.preprocessing)}: {fix}"
            )
        if stored.get("embedding_dim") is not None and int(backbone.embedding_dim) != int(stored["embedding_dim"]):
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


KNNDatabase = DetectDatabase  # the name of version 1


def _knn_section(detector: KNNDetector) -> dict:
    return {
        "k": int(detector.k),
        "k_used": int(detector.k_),
        "thres_ratio": float(detector.thres_ratio),
        "threshold": float(detector.threshold_),
        "normalize": bool(detector.normalize),
        "index": detector.index,
        "index_describe": detector.index_.describe(),
    }


def _patchcore_section(model) -> dict:
    params = as_json({name: value for name, value in model.get_params().items() if name != "backbone"})
    keep = ("layers", "patch_size", "per_layer_dim", "target_dim", "sampler", "coreset_ratio", "projection_dim",
            "image_score", "num_neighbours", "sigma", "index", "thres_ratio", "calibration_fraction", "seed")
    identity = model.backbone_identity_ or {}
    return {
        **{name: params[name] for name in keep},
        "layers_used": identity.get("layers"),
        "threshold": float(model.threshold_),
        "threshold_rule": (f"{model.thres_ratio} quantile of the {model.image_score} image scores of the "
                           f"{model.calibration_scores_max_.size} calibration images held out of the memory bank"),
        "memory_bank_size": int(model.memory_bank_.shape[0]),
        "feature_dim": int(model.n_features_in_),
        "grid_shape": list(model.grid_shape_),
        "n_train_images": int(model.n_train_images_),
        "n_calibration": int(model.calibration_scores_max_.size),
        "n_train_patches": int(model.n_train_patches_),
        "index_describe": model.index_.describe(),
        "fit_timings": dict(model.timings_),
    }


def save_database(
    db_dir: str | os.PathLike,
    detector,
    backbone,
    image_dir: str | os.PathLike,
    image_hashes: dict[str, str],
) -> Path:
    """Save a fitted detector (KNNDetector or PatchCore) and its provenance as a database folder.

    ``image_hashes`` maps each normal image's path relative to ``image_dir`` to its content
    sha256 (for kNN in the order of the memory bank; for PatchCore every training image,
    calibration images included). ``database.json`` is written last and atomically, so an
    interrupted save leaves no database that looks valid.
    """
    db_dir = Path(db_dir)
    method = _method_of(detector)
    n_model = detector.memory_bank_.shape[0] if method == "knn" else detector.n_train_images_
    if len(image_hashes) != n_model:
        raise ParameterError(f"{len(image_hashes)} image hashes given for a {method} model fitted on {n_model} images")
    db_dir.mkdir(parents=True, exist_ok=True)
    model_path = detector.save(db_dir / MODEL_FILES[method])
    metadata = {
        "format": DB_FORMAT,
        "version": DB_VERSION,
        "method": method,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "anomalib_study_version": __version__,
        "backbone": {
            "name": backbone.name,
            "weights_sha256": backbone.weights_sha256,
            "preprocessing": as_json(backbone.preprocessing),
            "image_size": getattr(backbone, "image_size", None),
            "embedding_dim": int(backbone.embedding_dim) if method == "knn" else None,
        },
        method: _knn_section(detector) if method == "knn" else _patchcore_section(detector),
        "model_file": MODEL_FILES[method],
        "model_sha256": sha256_file(model_path),
        "image_dir": str(Path(image_dir).resolve()),
        "n_images": len(image_hashes),
        "images": [{"path": p, "sha256": h} for p, h in image_hashes.items()],
    }
    write_json(db_dir / DB_FILE, metadata)
    return db_dir


def load_database(db_dir: str | os.PathLike, device: str = "cpu", method: str | None = None) -> DetectDatabase:
    """Load a database folder written by :func:`save_database`.

    Checks the format, version and completeness of ``database.json``, that it was built for
    ``method`` (when given), that the model file is the file it describes (sha256), and that
    the model agrees with it (threshold, number of images, dimension). Anything wrong ->
    ModelFileError naming the folder. The backbone and the normal images are checked
    separately (:meth:`DetectDatabase.check_backbone`, :meth:`DetectDatabase.check_images`).
    """
    db_dir = Path(db_dir)
    meta_path = db_dir / DB_FILE
    fix = f"delete {db_dir} (or pass another db_dir) to rebuild it"
    if method is not None:
        _check_method(method)
    if not meta_path.is_file():
        raise ModelFileError(f"{db_dir} is not a detect database: {DB_FILE} is missing")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{meta_path} is corrupt ({error}): {fix}") from None
    found = metadata.get("format") if isinstance(metadata, dict) else None
    if found == LEGACY_FORMAT and metadata.get("version") == LEGACY_VERSION:
        metadata["method"] = "knn"
    elif found != DB_FORMAT:
        raise ModelFileError(f"{meta_path} holds format {found!r}, not {DB_FORMAT!r}: it is not a detect "
                             f"(kNN or PatchCore) database; {fix}")
    elif metadata.get("version") != DB_VERSION:
        raise ModelFileError(
            f"{meta_path} is database version {metadata.get('version')!r}; this code reads version {DB_VERSION}: {fix}"
        )
    stored_method = metadata.get("method")
    if stored_method not in METHODS:
        raise ModelFileError(f"{meta_path} names an unknown method {stored_method!r}: {fix}")
    if method is not None and stored_method != method:
        raise ModelFileError(
            f"database {db_dir} was built for method {stored_method!r}, not {method!r}: pass another db_dir "
            f"for {method} (or delete {db_dir} to rebuild it with {method})"
        )
    try:
        backbone = metadata["backbone"]
        for key in ("name", "weights_sha256", "preprocessing"):
            backbone[key]
        section = metadata[stored_method]
        threshold = float(section["threshold"])
        if stored_method == "knn":
            k_used = int(section["k_used"])
            for key in ("k", "thres_ratio", "index"):
                section[key]
            int(backbone["embedding_dim"])
        else:
            bank_size, feature_dim = int(section["memory_bank_size"]), int(section["feature_dim"])
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
    if stored_method == "knn":
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
    else:
        from anomalib_study.methods.patchcore import PatchCore

        detector = PatchCore.load(model_path, device=device)
        if (
            not np.isclose(detector.threshold_, threshold, equal_nan=True)
            or detector.memory_bank_.shape != (bank_size, feature_dim)
            or detector.n_train_images_ != n_images
        ):
            raise ModelFileError(
                f"{db_dir} is inconsistent: the model (threshold={detector.threshold_:.6g}, bank "
                f"{detector.memory_bank_.shape[0]} x {detector.n_features_in_}, {detector.n_train_images_} images) "
                f"does not match {DB_FILE} (threshold={threshold:.6g}, bank {bank_size} x {feature_dim}, "
                f"{n_images} images): {fix}"
            )
    return DetectDatabase(path=db_dir, detector=detector, metadata=metadata)


# ---------------------------------------------------------------------- overlays
def _overlay_names(relatives: list[Path]) -> list[Path]:
    """``bad/red.png`` -> ``bad/red.jpg``; ``bad/red_png.jpg`` for every image whose stem is
    shared with another one in the same folder (then ``_2``... if still taken)."""
    def key(path: Path) -> tuple[str, str]:
        return path.parent.as_posix(), path.stem.lower()  # case-insensitive file systems

    counts: dict[tuple[str, str], int] = {}
    for relative in relatives:
        counts[key(relative)] = counts.get(key(relative), 0) + 1
    used: set[str] = set()
    names = []
    for relative in relatives:
        ext = relative.suffix.lstrip(".")
        name = relative.with_suffix(".jpg") if counts[key(relative)] == 1 else relative.with_name(f"{relative.stem}_{ext}.jpg")
        number = 2
        while name.as_posix().lower() in used:
            name = relative.with_name(f"{relative.stem}_{ext}_{number}.jpg")
            number += 1
        used.add(name.as_posix().lower())
        names.append(name)
    return names


def write_overlays(
    out_dir: str | os.PathLike,
    paths: list[Path],
    root: str | os.PathLike,
    maps: np.ndarray,
    scores: np.ndarray,
    preprocessing: dict,
    vmin: float,
    vmax: float,
    names: list[Path] | None = None,
    quality: int = 80,
    progress: bool = True,
) -> list[Path]:
    """Write one JPEG overlay per image into ``out_dir`` (see the module doc for the names).

    Args:
        paths: the n images, each under ``root`` (names mirror their path relative to it).
        maps: (n, H, W) anomaly maps, higher = more anomalous, on the backbone's resized and
            centre-cropped input (``preprocessing``, see :func:`anomalib_study.plots.crop_like_input`).
        scores: (n,) image scores, written with the names to ``out_dir/overlays.csv``.
        vmin, vmax: one colour scale for every overlay.
        names: the overlay file names relative to ``out_dir`` (default: made from ``paths``
            relative to ``root``; pass names made from every image of the run so that a
            name does not depend on which images were selected).

    Returns:
        The n overlay paths, in the order of ``paths``.
    """
    from anomalib_study.plots import crop_like_input, overlay_image

    out_dir, root = Path(out_dir), Path(root)
    if names is None:
        names = _overlay_names([Path(path).relative_to(root) for path in paths])
    written = []
    bar = tqdm(list(zip(paths, maps, names)), desc="overlays", unit="img", disable=not progress, leave=False)
    for path, amap, name in bar:
        target = out_dir / name
        picture = overlay_image(crop_like_input(path, preprocessing), amap, None, vmin, vmax)
        with atomic_write(target, "wb") as handle:
            picture.save(handle, format="JPEG", quality=quality)
        written.append(target)
    if written:
        table = pd.DataFrame({"path": [str(p) for p in paths], "score": np.asarray(scores, dtype=float),
                              "overlay": [p.relative_to(out_dir).as_posix() for p in written]})
        with atomic_write(out_dir / "overlays.csv", "w") as handle:
            table.to_csv(handle, index=False, lineterminator="\n")
    return written


# ---------------------------------------------------------------------- the command
def detect_abnormal(
    test_dir: str | os.PathLike,
    db_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike = "images",
    model_name: str = "efficientnet_lite0",
    k: int = 100,
    thres_ratio: float | None = None,
    gpu: bool | int | str = False,
    batch_size: int = 128,
    num_workers: int = 8,
    result_dir: str | os.PathLike = "result",
    weights: str | os.PathLike | None = None,
    index: str = "Flat",
    progress: bool = True,
    cache: Any = "default",
    method: str = "knn",
    coreset_ratio: float = 0.1,
    image_size: int | None = None,
    resize_mode: str = "crop",
    patch_size: int = 3,
    image_score: str = "reweighted",
    sigma: float = 4.0,
    calibration_fraction: float = 0.1,
    seed: int = 0,
    max_overlays: int = 100,
) -> Path:
    """Flag the anomalous images of ``test_dir`` with the kNN detector or PatchCore; return the run folder.

    Args:
        test_dir: folder of images to check (searched recursively).
        db_dir: database folder (default ``"knn_db"`` or ``"patchcore_db"`` in the current
            folder). If it holds a database, that database is used (its backbone and
            settings win over the arguments, with a warning where they differ) after
            checking it was built for ``method`` and is not stale; otherwise the database
            is built from ``image_dir`` and saved there.
        image_dir: folder of normal images (searched recursively) the database is built
            from, and checked against when a database is reused.
        model_name: backbone name (see ``anomalib_study.backbones.BACKBONES``).
        k: (kNN) number of nearest normal images (clamped to n_normal - 1 with a warning).
        thres_ratio: quantile used as threshold, in (0, 1); None = 0.92 for kNN (of the
            leave-one-out normal scores), 0.99 for PatchCore (of the held-out calibration
            images' scores; see the module doc).
        gpu: False (cpu), True (cuda) or a GPU number; CUDA unavailable -> ParameterError.
        batch_size: images per forward pass.
        num_workers: image-loading processes (clamped to the cores available).
        result_dir: runs are written to ``<result_dir>/<timestamp>/``.
        weights: explicit weight file for the backbone.
        index: faiss factory string of the search index (``"Flat"`` = exact).
        progress: show progress bars.
        cache: (kNN) the feature cache: ``"default"`` (``$ANOMALIB_STUDY_CACHE``), a
            :class:`~anomalib_study.features.FeatureCache`, or ``None`` to neither read nor write it.
        method: ``"knn"`` (one embedding per image) or ``"patchcore"`` (patch memory bank).
        coreset_ratio: (PatchCore) share of the training patches kept in the memory bank, in (0, 1].
        image_size: backbone input side (None = the backbone's default).
        resize_mode: ``"crop"`` (shorter side resized, centre crop; default) or ``"squash"``
            (the whole image resized to the square input, nothing cut off).
        patch_size, image_score, sigma, seed: (PatchCore) see :class:`~anomalib_study.methods.patchcore.PatchCore`.
        calibration_fraction: (PatchCore) share of the normal images held out of the bank
            to set the threshold, in (0, 1) (detect needs a threshold, so not 0).
        max_overlays: (PatchCore) at most this many overlays (the highest-scoring flagged
            images) are written; 0 = none.

    Returns:
        The new run folder, holding ``abnormal.result``, ``scores.csv``, ``config.json`` and,
        for PatchCore, ``overlays/``.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    method = _check_method(method)
    k = check_int("k", k, minimum=1)
    if thres_ratio is not None:
        thres_ratio = check_fraction("thres_ratio", thres_ratio)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    num_workers = check_int("num_workers", num_workers, minimum=0)
    max_overlays = check_int("max_overlays", max_overlays, minimum=0)
    if image_size is not None:
        image_size = check_int("image_size", image_size, minimum=1)
    from anomalib_study.backbones import RESIZE_MODES

    if resize_mode not in RESIZE_MODES:
        raise ParameterError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    if method == "patchcore":
        calibration_fraction = check_fraction("calibration_fraction", calibration_fraction)
    device = resolve_device(gpu)
    workers = min(num_workers, available_cores())
    db_dir = Path(db_dir) if db_dir is not None else Path(DEFAULT_DB_DIRS[method])
    image_dir, test_dir = Path(image_dir), Path(test_dir)
    test_paths = list_images(test_dir, "test_dir")
    extract_options = dict(batch_size=batch_size, num_workers=workers, device=device, progress=progress, cache=cache)
    run_options = dict(batch_size=batch_size, num_workers=workers, progress=progress)
    maps = None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = time.perf_counter()
        built = not (db_dir / DB_FILE).is_file()
        if not built:
            database = load_database(db_dir, device=device, method=method)
            detector, stored = database.detector, database.metadata
            section = stored[method]
            compared = [("model_name", model_name, stored["backbone"]["name"]), ("thres_ratio", thres_ratio, section["thres_ratio"]),
                        ("index", index, section["index"]), ("image_size", image_size, database.image_size),
                        ("resize_mode", None if resize_mode == "crop" else resize_mode, database.resize_mode)]
            if method == "knn":
                compared.append(("k", k, section["k"]))
            else:
                compared += [("coreset_ratio", coreset_ratio, section["coreset_ratio"]),
                             ("patch_size", patch_size, section["patch_size"]),
                             ("image_score", image_score, section["image_score"]), ("sigma", sigma, section["sigma"]),
                             ("calibration_fraction", calibration_fraction, section["calibration_fraction"]),
                             ("seed", seed, section["seed"])]
            for name, passed, used in compared:
                if passed is not None and passed != used:
                    warnings.warn(
                        f"{name}={passed!r} ignored: the database {db_dir} was built with {name}={used!r}, "
                        f"which is used (delete {db_dir} or pass another db_dir to rebuild)",
                        stacklevel=2,
                    )
            backbone = _load_backbone(database.backbone_name, weights, device, database.image_size,
                                      database.resize_mode)
            database.check_backbone(backbone)
            if method == "patchcore":
                detector.set_params(backbone=backbone, **run_options)
                detector.get_backbone()  # the model's own identity check (layers, image size)
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
            ratio = DEFAULT_THRES_RATIO[method] if thres_ratio is None else thres_ratio
            normal_paths = list_images(image_dir, "image_dir")
            backbone = _load_backbone(model_name, weights, device, image_size, resize_mode)
            hashes = _manifest(image_dir, normal_paths, progress=progress)
            if method == "knn":
                bank = extract_embeddings(backbone, normal_paths, desc="normal images", **extract_options)
                _check_embeddings(bank, len(normal_paths), backbone, image_dir)
                detector = KNNDetector(k=k, thres_ratio=ratio, normalize=True, index=index, device=device).fit(bank)
            else:
                from anomalib_study.methods.patchcore import PatchCore

                if len(normal_paths) < 2:
                    raise DataError(f"image_dir {image_dir} holds {len(normal_paths)} image: PatchCore needs at "
                                    "least 2 normal images (some are held out to set the threshold)")
                detector = PatchCore(backbone=backbone, weights=weights, coreset_ratio=coreset_ratio,
                                     patch_size=patch_size, image_score=image_score, sigma=sigma, index=index,
                                     thres_ratio=ratio, calibration_fraction=calibration_fraction, seed=seed,
                                     device=device, **run_options).fit_paths(normal_paths)
            save_database(db_dir, detector, backbone, image_dir, hashes)
            stored = json.loads((db_dir / DB_FILE).read_text(encoding="utf-8"))
            timings["build_database_s"] = time.perf_counter() - step

        step = time.perf_counter()
        if method == "knn":
            test_x = extract_embeddings(backbone, test_paths, desc="test images", **extract_options)
            _check_embeddings(test_x, len(test_paths), backbone, test_dir)
            timings["extract_test_s"] = time.perf_counter() - step
            step = time.perf_counter()
            scores = detector.score(test_x)
        else:
            result = detector.score_paths(test_paths)
            scores, maps = result["image_scores"], result["anomaly_maps"]
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
    config = {
        "anomalib_study_version": __version__,
        "method": method,
        "test_dir": str(test_dir.resolve()),
        "image_dir": str(image_dir.resolve()),
        "db_dir": str(db_dir.resolve()),
        "database_built": built,
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": as_json(backbone.preprocessing),
        "image_size": getattr(backbone, "image_size", None),
    }
    if method == "knn":
        config.update({
            "embedding_dim": int(backbone.embedding_dim),
            "k": int(detector.k),
            "k_used": int(detector.k_),
            "thres_ratio": float(detector.thres_ratio),
            "threshold": float(detector.threshold_),
            "normalize": bool(detector.normalize),
            "index": detector.index_.describe(),
            "n_bank": int(detector.memory_bank_.shape[0]),
        })
    else:
        section = _patchcore_section(detector)
        section["index"] = section.pop("index_describe")
        step = time.perf_counter()
        order = [i for i in np.argsort(-scores, kind="stable") if predicted[i]][:max_overlays]
        vmin, vmax = float(maps.min()), float(maps.max())
        names = _overlay_names([p.relative_to(test_dir) for p in test_paths])  # stable whatever is selected
        written = write_overlays(run_dir / "overlays", [test_paths[i] for i in order], test_dir, maps[order],
                                 scores[order], backbone.preprocessing, vmin, vmax, names=[names[i] for i in order],
                                 progress=progress)
        timings["overlays_s"] = time.perf_counter() - step
        config.update({
            **section,
            "n_bank": section["memory_bank_size"],
            "overlays": {"folder": "overlays", "count": len(written), "max_overlays": max_overlays,
                         "n_flagged": len(flagged), "vmin": vmin, "vmax": vmax,
                         "what": "flagged images, highest scores first, on the backbone's cropped input; "
                                 "one colour scale (vmin, vmax = min, max of all the run's anomaly maps)"},
        })
    timings["total_s"] = time.perf_counter() - started
    config.update({
        "n_test": len(test_paths),
        "n_abnormal": len(flagged),
        "device": device,
        "batch_size": batch_size,
        "num_workers": workers,
        "database_created": stored.get("created"),
        "warnings": [str(w.message) for w in caught],
        "timings": timings,
    })
    write_json(run_dir / "config.json", config)
    return run_dir


def _check_embeddings(x: np.ndarray, n: int, backbone, folder: Path) -> None:
    x = np.asarray(x)
    if x.shape != (n, int(backbone.embedding_dim)):
        raise StudyError(
            f"backbone {backbone.name} gave embeddings of shape {x.shape} for the {n} images of {folder}, "
            f"expected ({n}, {backbone.embedding_dim})"
        )
