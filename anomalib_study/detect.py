"""``detect_abnormal``: flag the anomalous images of a folder with any registered method.

The method (``method="knn"``, ``"patchcore"``, ...: :data:`anomalib_study.methods.DETECTORS`)
is fitted on a folder of normal images (``image_dir``) and kept in a **database folder**
(``db_dir``, default ``<method>_db`` in the current folder), reused by later runs as long as
it still matches the method, the backbone and the normal images. Everything
method-specific (how it is fitted on files, scores them, describes itself, its default
threshold rule) comes from the method's own declaration
(:class:`~anomalib_study.methods.base.MethodSpec`); this module holds none of it.

``db_dir/<method>_model.npz``
    the fitted model, written by the estimator's ``save`` (kNN: memory bank of image
    embeddings, faiss index, leave-one-out scores, threshold; PatchCore: coreset memory
    bank of patch features, configuration, backbone identity, calibration scores, threshold).
``db_dir/database.json``
    format ``"anomalib_study.detect_database"``, version 2: the ``method``; backbone name,
    weights sha256, preprocessing, image size, embedding dimension; the method's settings
    and threshold (a section named after the method: its ``describe``); the model file's
    name and sha256; every normal image (path relative to ``image_dir``, content sha256);
    and the unreadable normal images that were skipped (``skipped_images``, only with
    ``skip_unreadable_normal``). It is written last, so a database folder without it (a
    build that was interrupted) is not a database, and the next call rebuilds it. Version-1
    kNN databases (format ``"anomalib_study.knn_database"``) are still read.

Loading refuses (ModelFileError, with how to fix it) a database of another format or
version, built for another method, whose two files do not belong together, whose
backbone weights, preprocessing or dimension differ from the backbone loaded now, or whose
normal images changed since it was built ("stale database").

Thresholds (higher score = more anomalous; an image is flagged when score > threshold):
each method's own rule, recorded as ``threshold_rule`` in ``config.json``:

* kNN: the ``thres_ratio`` quantile (default 0.92) of the leave-one-out scores of the
  normal images.
* PatchCore: the ``thres_ratio`` quantile (default 0.99) of the image scores of the
  **held-out calibration images**: ``calibration_fraction`` (default 0.1) of the normal
  images, chosen with ``seed``, are kept out of the memory bank and scored like test
  images. So about ``1 - thres_ratio`` of normal images are expected to be flagged.

Image files: every image under a folder, recursively, by the package's one listing rule
(:func:`~anomalib_study.data.decode.image_files`): images behind symbolic links are read,
hidden files and folders and files that are not images (by suffix) are passed over
silently. **Unreadable test images** (empty, truncated, not an image, over the
decompression-bomb limit, a dangling link) are skipped: every readable image is scored,
each skipped file is listed with its reason in ``skipped.csv``, counted in ``config.json``
and summed up in one warning. ``strict=True`` refuses them instead, before any work, naming
every one. Unreadable **normal** images are always refused before any work (a database is
never built silently from fewer images than given), unless ``skip_unreadable_normal=True``,
which leaves them out and records them in the database.

Test images are scored in a stream of chunks, so memory does not grow with the folder
beyond the scores themselves (the maps kept for the overlays are bounded by
``max_overlays``); they are not put in the feature cache (``cache`` serves the normal images).

Every run writes a new folder ``<result_dir>/<timestamp>/`` (never overwritten), built in a
hidden ``<result_dir>/.<timestamp>.<random>.partial/`` folder and renamed when complete, so
an interrupted run (Ctrl-C removes its partial folder; a killed process leaves it hidden)
never leaves a folder that looks like a result. It holds ``abnormal.result`` (the test
images predicted anomalous, one path per line), ``scores.csv`` (path, score, predicted;
higher score = more anomalous), ``skipped.csv`` (path, reason; header only when nothing was
skipped) and ``config.json`` (everything needed to reproduce the run, with timings).
Methods that give anomaly maps (PatchCore) also write ``overlays/``: one small JPEG per
test image flagged anomalous (the ``max_overlays`` highest-scoring ones if more are
flagged), named after the image's path relative to ``test_dir`` (``bad/red.png`` ->
``overlays/bad/red.jpg``; ``red_png.jpg`` when two images share a stem), showing the
backbone's resized and centre-cropped input with the anomaly map blended on one colour
scale for the whole run (the minimum and maximum of all the run's maps, recorded in
``config.json``), plus ``overlays/overlays.csv`` (path, score, overlay).
"""

from __future__ import annotations

import datetime as _dt
import heapq
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
from anomalib_study.checks import check_bool, check_int
from anomalib_study.data.decode import content_hash, find_unreadable, image_files
from anomalib_study.errors import DataError, ModelFileError, ParameterError
from anomalib_study.io import as_json, atomic_write, run_dir_in_progress, sha256_file, write_json
from anomalib_study.methods import DETECTORS, get_detector
from anomalib_study.methods.base import MethodSpec, RunOptions
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
METHODS = tuple(DETECTORS)
#: test images scored per chunk: bounds the memory a run needs whatever the folder's size
CHUNK_IMAGES = 512


# ---------------------------------------------------------------------- the backbone layer
# Thin wrappers so that this module imports without torch models loaded, and so that
# tests can replace them (monkeypatch) by a tiny fake backbone and extractor.
def load_backbone(
    name: str, weights=None, device: str = "cpu", image_size: int | None = None, resize_mode: str = "crop"
):
    """:func:`anomalib_study.backbones.load_backbone` (imported on first use)."""
    from anomalib_study.backbones import load_backbone as _load_backbone

    return _load_backbone(name, weights=weights, device=device, image_size=image_size, resize_mode=resize_mode)


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
    """Every image file under ``folder`` (recursively, by the package's one listing rule:
    :func:`~anomalib_study.data.decode.image_files`), sorted; DataError naming ``what`` if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist or is not a folder")
    paths = image_files(folder)
    if not paths:
        raise DataError(f"{what} {folder} holds no image files (.png, .jpg, .bmp, .tif): nothing to do")
    return paths


def unreadable_message(bad: dict[Path, str], what: str, folder: Path, fix: str) -> str:
    """One message naming every unreadable image of ``bad`` (path -> reason)."""
    lines = "\n".join(f"  {path}: {reason}" for path, reason in bad.items())
    return f"{len(bad)} image(s) in {what} {folder} cannot be read, {fix}:\n{lines}"


def _manifest(image_dir: Path, paths: list[Path], progress: bool = True) -> dict[str, str | None]:
    """relative posix path -> content sha256 (None for a link whose target is missing), for every image."""
    bar = tqdm(paths, desc=f"hashing {image_dir}", unit="img", disable=not progress, leave=False)
    return {p.relative_to(image_dir).as_posix(): content_hash(p) if p.exists() else None for p in bar}


# ---------------------------------------------------------------------- the database
@dataclass
class DetectDatabase:
    """A loaded detect database: the method, its fitted model and the ``database.json`` metadata.

    ``detector`` is the fitted estimator of the method named in ``metadata["method"]``, as its
    declaration (:class:`~anomalib_study.methods.base.MethodSpec`) loads it.
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
            raise ModelFileError(
                f"database {self.path} was built with backbone {stored['name']!r}, not {backbone.name!r}: {fix}"
            )
        if backbone.weights_sha256 != stored["weights_sha256"]:
            raise ModelFileError(
                f"database {self.path} was built with {stored['name']} weights sha256 "
                f"{stored['weights_sha256'][:12]}..., "
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
        now = _manifest(image_dir, image_files(image_dir), progress=progress)
        stored = {entry["path"]: entry["sha256"] for entry in self.metadata["images"]}
        # unreadable images skipped when the database was built count as they were then
        stored.update({entry["path"]: entry.get("sha256") for entry in self.metadata.get("skipped_images", [])})
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


def save_database(
    db_dir: str | os.PathLike,
    detector,
    backbone,
    image_dir: str | os.PathLike,
    image_hashes: dict[str, str],
    skipped: list[dict] = (),
    method: str | None = None,
) -> Path:
    """Save a fitted model and its provenance as a database folder.

    ``method``: the method's name (default: the registered method whose estimator
    ``detector`` is). ``image_hashes`` maps each normal image's path relative to
    ``image_dir`` to its content sha256 (every image the model was fitted on, held-out
    calibration images included). ``skipped``: the unreadable normal images left out
    (``{"path", "sha256", "reason"}`` each), recorded under ``skipped_images``.
    ``database.json`` is written last and atomically, so an interrupted save leaves no
    database that looks valid (and the next call rebuilds it).
    """
    db_dir = Path(db_dir)
    spec = get_detector(method) if method is not None else _spec_of(detector)
    n_model = spec.n_images(detector)
    if len(image_hashes) != n_model:
        raise ParameterError(
            f"{len(image_hashes)} image hashes given for a {spec.name} model fitted on {n_model} images"
        )
    db_dir.mkdir(parents=True, exist_ok=True)
    model_path = detector.save(db_dir / spec.model_file)
    metadata = {
        "format": DB_FORMAT,
        "version": DB_VERSION,
        "method": spec.name,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "anomalib_study_version": __version__,
        "backbone": {
            "name": backbone.name,
            "weights_sha256": backbone.weights_sha256,
            "preprocessing": as_json(backbone.preprocessing),
            "image_size": getattr(backbone, "image_size", None),
            "embedding_dim": int(backbone.embedding_dim) if spec.uses_embedding else None,
        },
        spec.name: as_json(spec.describe(detector)),
        "model_file": spec.model_file,
        "model_sha256": sha256_file(model_path),
        "image_dir": str(Path(image_dir).resolve()),
        "n_images": len(image_hashes),
        "images": [{"path": p, "sha256": h} for p, h in image_hashes.items()],
        "n_skipped_images": len(skipped),
        "skipped_images": list(skipped),
    }
    write_json(db_dir / DB_FILE, metadata)
    return db_dir


def _either(names) -> str:
    """ "a", "a or b", "a, b or c"."""
    names = list(names)
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _spec_of(model) -> MethodSpec:
    for spec in DETECTORS.values():
        if type(model) is spec.estimator:
            return spec
    raise ParameterError(
        f"detect databases hold a model of a registered method ({', '.join(DETECTORS)}), not a {type(model).__name__}"
    )


def load_database(db_dir: str | os.PathLike, device: str = "cpu", method: str | None = None) -> DetectDatabase:
    """Load a database folder written by :func:`save_database`.

    Checks the format, version and completeness of ``database.json``, that it was built for
    ``method`` (when given), that the model file is the file it describes (sha256), and that
    the model agrees with it (the method's own ``check_loaded``). Anything wrong ->
    ModelFileError naming the folder. The backbone and the normal images are checked
    separately (:meth:`DetectDatabase.check_backbone`, :meth:`DetectDatabase.check_images`).
    """
    db_dir = Path(db_dir)
    meta_path = db_dir / DB_FILE
    fix = f"delete {db_dir} (or pass another db_dir) to rebuild it"
    if method is not None:
        get_detector(method)
    if not meta_path.is_file():
        raise ModelFileError(f"{db_dir} is not a detect database: {DB_FILE} is missing")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{meta_path} is corrupt ({error}): {fix}") from None
    found = metadata.get("format") if isinstance(metadata, dict) else None
    if found == LEGACY_FORMAT and metadata.get("version") == LEGACY_VERSION:
        metadata["method"] = "knn"
        metadata.setdefault("model_file", "knn_model.npz")
    elif found != DB_FORMAT:
        raise ModelFileError(
            f"{meta_path} holds format {found!r}, not {DB_FORMAT!r}: it is not a detect "
            f"({_either(spec.label for spec in DETECTORS.values())}) database; {fix}"
        )
    elif metadata.get("version") != DB_VERSION:
        raise ModelFileError(
            f"{meta_path} is database version {metadata.get('version')!r}; this code reads version {DB_VERSION}: {fix}"
        )
    stored_method = metadata.get("method")
    if stored_method not in DETECTORS:
        raise ModelFileError(f"{meta_path} names an unknown method {stored_method!r}: {fix}")
    if method is not None and stored_method != method:
        raise ModelFileError(
            f"database {db_dir} was built for method {stored_method!r}, not {method!r}: pass another db_dir "
            f"for {method} (or delete {db_dir} to rebuild it with {method})"
        )
    spec = DETECTORS[stored_method]
    try:
        backbone = metadata["backbone"]
        for key in ("name", "weights_sha256", "preprocessing"):
            backbone[key]
        if spec.uses_embedding:
            int(backbone["embedding_dim"])
        section = metadata[stored_method]
        section["threshold"]
        images = metadata["images"]
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
    detector = spec.load(model_path, device=device)
    try:
        problem = spec.check_loaded(detector, section, len(images))
    except (KeyError, TypeError, ValueError) as error:
        problem = f"its description lacks or garbles field {error}"
    if (
        problem is None
        and spec.uses_embedding
        and getattr(detector, "n_features_in_", None) not in (None, int(backbone["embedding_dim"]))
    ):
        problem = (
            f"the model holds {detector.n_features_in_}-dimensional embeddings, {DB_FILE} says "
            f"{backbone['embedding_dim']}"
        )
    if problem is not None:
        raise ModelFileError(f"{db_dir} is inconsistent: {problem}: {fix}")
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
        name = (
            relative.with_suffix(".jpg")
            if counts[key(relative)] == 1
            else relative.with_name(f"{relative.stem}_{ext}.jpg")
        )
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
        maps: (n, H, W) anomaly maps, or a sequence of n (H_i, W_i) maps (``"keep"``),
            higher = more anomalous, on the backbone's preprocessed input (``preprocessing``,
            see :func:`anomalib_study.plots.crop_like_input`: resized and centre-cropped, or
            under ``"keep"`` the whole image at its own aspect ratio).
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
        table = pd.DataFrame(
            {
                "path": [str(p) for p in paths],
                "score": np.asarray(scores, dtype=float),
                "overlay": [p.relative_to(out_dir).as_posix() for p in written],
            }
        )
        with atomic_write(out_dir / "overlays.csv", "w") as handle:
            table.to_csv(handle, index=False, lineterminator="\n")
    return written


# ---------------------------------------------------------------------- the command
def detect_abnormal(
    test_dir: str | os.PathLike,
    db_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike = "images",
    model_name: str = "efficientnet_lite0",
    k: int | None = None,
    thres_ratio: float | None = None,
    gpu: bool | int | str = False,
    batch_size: int | None = None,
    num_workers: int = 8,
    result_dir: str | os.PathLike = "result",
    weights: str | os.PathLike | None = None,
    index: str | None = None,
    progress: bool = True,
    cache: Any = "default",
    method: str = "knn",
    *,
    image_size: int | None = None,
    resize_mode: str | None = None,
    max_overlays: int = 100,
    strict: bool = False,
    skip_unreadable_normal: bool = False,
    **method_params: Any,
) -> Path:
    """Flag the anomalous images of ``test_dir`` with a registered method; return the run folder.

    Args:
        test_dir: folder of images to check (searched recursively; see the module doc for
            which files count and what happens to unreadable ones).
        db_dir: database folder (default ``"<method>_db"`` in the current folder). If it
            holds a database, that database is used (its backbone and settings win over the
            arguments, with a warning where they differ) after checking it was built for
            ``method`` and is not stale; otherwise the database is built from ``image_dir``
            and saved there.
        image_dir: folder of normal images (searched recursively) the database is built
            from, and checked against when a database is reused.
        model_name: backbone name (see ``anomalib_study.backbones.BACKBONES``).
        k, thres_ratio, index: method parameters, kept here by name and position for the
            seed's calls: (kNN) neighbours averaged; the quantile used as threshold, in
            (0, 1) (None = the method's default: 0.92 of the kNN leave-one-out normal
            scores, 0.99 of PatchCore's held-out calibration images' scores); the faiss
            factory string of the search (``"Flat"`` = exact). None = the method's default.
        gpu: False (cpu), True (cuda) or a GPU number; CUDA unavailable -> ParameterError.
        batch_size: images per forward pass (None: the method's, :attr:`MethodSpec.batch_size`).
        num_workers: image-loading processes (clamped to the cores available).
        result_dir: runs are written to ``<result_dir>/<timestamp>/``.
        weights: explicit weight file for the backbone.
        progress: show progress bars.
        cache: the feature cache for the normal images, for methods that cache embeddings
            (kNN): ``"default"`` (``$ANOMALIB_STUDY_CACHE``), a
            :class:`~anomalib_study.features.FeatureCache`, or ``None``.
        method: a registered method (``"knn"``: one embedding per image; ``"patchcore"``:
            patch memory bank and anomaly maps; ``anomalib_study.methods.DETECTORS`` lists them).
        image_size: input side (None = the method's, e.g. 128 for the autoencoder, else the
            backbone's default).
        resize_mode: ``"crop"`` (shorter side resized, centre crop), ``"squash"`` (the whole
            image resized to the square input, nothing cut off) or ``"keep"`` (shorter side
            resized, aspect ratio kept, nothing cut off; overlays at each image's own
            shape); None = the method's own (the autoencoder squashes), else ``"crop"``.
            The database records it (in the backbone's preprocessing).
        max_overlays: (methods with anomaly maps) at most this many overlays (the
            highest-scoring flagged images) are written; 0 = none.
        strict: refuse, before any work, a test folder holding unreadable images (every one
            named) instead of skipping them.
        skip_unreadable_normal: build the database without the unreadable normal images
            (recorded in it) instead of refusing them.
        **method_params: the method's other parameters by name (PatchCore: coreset_ratio,
            patch_size, image_score, sigma, calibration_fraction (in (0, 1): detect needs a
            threshold), seed, ...; see each method's ``SPEC.params``). An unknown name ->
            ParameterError listing the valid ones.

    Returns:
        The new run folder, holding ``abnormal.result``, ``scores.csv``, ``skipped.csv``,
        ``config.json`` and, for methods with anomaly maps, ``overlays/``.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    spec = get_detector(method)
    declared = {param.name for param in spec.params}
    given = {}
    for name, value in (("k", k), ("thres_ratio", thres_ratio), ("index", index)):
        if value is not None and name not in declared:
            warnings.warn(f"{name}={value!r} ignored: method {spec.name!r} has no parameter {name}", stacklevel=2)
        elif value is not None:
            given[name] = value
    given.update(method_params)
    params = spec.resolve_params(given)
    spec.check_params(params)
    problem = spec.threshold_problem(params) if spec.threshold_problem is not None else None
    if problem:
        raise ParameterError(f"detect needs a threshold: {problem}")
    batch_size = spec.batch_size if batch_size is None else check_int("batch_size", batch_size, minimum=1)
    num_workers = check_int("num_workers", num_workers, minimum=0)
    max_overlays = check_int("max_overlays", max_overlays, minimum=0)
    strict = check_bool("strict", strict)
    skip_unreadable_normal = check_bool("skip_unreadable_normal", skip_unreadable_normal)
    if image_size is not None:
        image_size = check_int("image_size", image_size, minimum=1)
    from anomalib_study.backbones import RESIZE_MODES

    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ParameterError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    given_geometry = {"image_size": image_size, "resize_mode": resize_mode}  # what the user passed
    resize_mode = spec.resolve_resize_mode(resize_mode)
    if image_size is None:
        image_size = spec.image_size
    device = resolve_device(gpu)
    workers = min(num_workers, available_cores())
    db_dir = Path(db_dir) if db_dir is not None else Path(spec.default_db_dir)
    image_dir, test_dir = Path(image_dir), Path(test_dir)
    test_paths = list_images(test_dir, "test_dir")
    if strict:
        bad = find_unreadable(test_paths, progress=progress, desc="checking test images")
        if bad:
            raise DataError(
                unreadable_message(
                    bad,
                    "test_dir",
                    test_dir,
                    "and strict=True (--strict) refuses them; nothing was done: remove or "
                    "replace them, or run without --strict to score the others and list these in skipped.csv",
                )
            )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = time.perf_counter()
        built = not (db_dir / DB_FILE).is_file()
        if built:
            detector, backbone = _build_database(
                spec,
                params,
                db_dir,
                image_dir,
                model_name,
                weights,
                image_size,
                resize_mode,
                skip_unreadable_normal,
                RunOptions(device=device, batch_size=batch_size, num_workers=workers, progress=progress, cache=cache),
            )
        else:
            detector, backbone = _reuse_database(
                spec, given, db_dir, image_dir, model_name, weights, given_geometry, device, progress
            )
        stored = json.loads((db_dir / DB_FILE).read_text(encoding="utf-8"))
        timings["build_database_s" if built else "load_database_s"] = time.perf_counter() - step

        step = time.perf_counter()
        run = RunOptions(device=device, batch_size=batch_size, num_workers=workers, progress=False, cache=None)
        with run_dir_in_progress(result_dir) as run_folder:
            stream = _score_stream(spec, detector, backbone, test_paths, run, max_overlays, progress)
            timings["score_s"] = time.perf_counter() - step
            if not np.isfinite(stream.scores).any():
                raise DataError(
                    unreadable_message(
                        {test_paths[i]: why for i, why in stream.skipped.items()},
                        "test_dir",
                        test_dir,
                        "and no other image is there: nothing was scored; replace them with readable images",
                    )
                )
            config = _write_run(
                run_folder.path, spec, detector, backbone, test_dir, test_paths, stream, max_overlays, progress, timings
            )
            config.update(
                {
                    "test_dir": str(test_dir.resolve()),
                    "image_dir": str(image_dir.resolve()),
                    "db_dir": str(db_dir.resolve()),
                    "database_built": built,
                    "database_created": stored.get("created"),
                    "device": device,
                    "batch_size": batch_size,
                    "num_workers": workers,
                    "strict": strict,
                    "warnings": [str(w.message) for w in caught],
                }
            )
            timings["total_s"] = time.perf_counter() - started
            config["timings"] = timings
            write_json(run_folder.path / "config.json", config)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if stream.skipped:
        warnings.warn(
            f"{len(stream.skipped)} of {len(test_paths)} test image(s) could not be read and were skipped "
            f"(not scored): listed with the reasons in {run_folder.final / 'skipped.csv'}",
            stacklevel=2,
        )
    return run_folder.final


def _build_database(
    spec: MethodSpec,
    params: dict,
    db_dir: Path,
    image_dir: Path,
    model_name: str,
    weights,
    image_size,
    resize_mode: str,
    skip_unreadable: bool,
    run: RunOptions,
):
    """Fit the method on ``image_dir`` and save the database; (model, backbone)."""
    normal_paths = list_images(image_dir, "image_dir")
    if len(normal_paths) < spec.min_images:
        raise DataError(
            f"image_dir {image_dir} holds {len(normal_paths)} image(s): {spec.name} needs at least "
            f"{spec.min_images} normal images"
        )
    bad = find_unreadable(normal_paths, progress=run.progress, desc="checking normal images")
    skipped = []
    if bad:
        if not skip_unreadable:
            raise DataError(
                unreadable_message(
                    bad,
                    "image_dir",
                    image_dir,
                    "so no database was built (it must not hold fewer images than given): "
                    "fix or remove them, or pass skip_unreadable_normal=True (--skip-unreadable-normal) to build "
                    "without them (they are then recorded in the database)",
                )
            )
        skipped = [
            {
                "path": path.relative_to(image_dir).as_posix(),
                "sha256": content_hash(path) if path.exists() else None,
                "reason": reason,
            }
            for path, reason in bad.items()
        ]
        normal_paths = [path for path in normal_paths if path not in bad]
        if len(normal_paths) < spec.min_images:
            raise DataError(
                unreadable_message(
                    bad,
                    "image_dir",
                    image_dir,
                    f"and fewer than {spec.min_images} readable ones are left: nothing to build a database from",
                )
            )
        warnings.warn(
            f"{len(bad)} unreadable normal image(s) of {image_dir} left out of the database "
            f"(recorded under skipped_images in {db_dir / DB_FILE})",
            stacklevel=3,
        )
    backbone = _load_backbone(model_name, weights, run.device, image_size, resize_mode)
    hashes = _manifest(image_dir, normal_paths, progress=run.progress)
    detector = spec.fit_paths(backbone, normal_paths, params, run)
    save_database(db_dir, detector, backbone, image_dir, hashes, skipped, method=spec.name)
    return detector, backbone


def _reuse_database(
    spec: MethodSpec,
    given: dict,
    db_dir: Path,
    image_dir: Path,
    model_name: str,
    weights,
    given_geometry: dict,
    device: str,
    progress: bool,
):
    """Load the database, warn where the arguments differ from it, check backbone and images."""
    database = load_database(db_dir, device=device, method=spec.name)
    section = database.metadata[spec.name]
    compared = [
        ("model_name", model_name, database.backbone_name),
        ("image_size", given_geometry["image_size"], database.image_size),
        ("resize_mode", given_geometry["resize_mode"], database.resize_mode),
    ]
    compared += [(name, value, section.get(name)) for name, value in given.items()]
    for name, passed, used in compared:
        if passed is not None and as_json(passed) != as_json(used):
            warnings.warn(
                f"{name}={passed!r} ignored: the database {db_dir} was built with {name}={used!r}, "
                f"which is used (delete {db_dir} or pass another db_dir to rebuild)",
                stacklevel=3,
            )
    backbone = _load_backbone(database.backbone_name, weights, device, database.image_size, database.resize_mode)
    database.check_backbone(backbone)
    if image_dir.is_dir():
        database.check_images(image_dir, progress=progress)
    else:
        warnings.warn(
            f"image_dir {image_dir} does not exist: the database {db_dir} is used without checking "
            "that its normal images are still current",
            stacklevel=3,
        )
    return database.detector, backbone


@dataclass
class _Scored:
    """What a streamed run keeps: every score, the skipped images, and the maps of the overlays."""

    scores: np.ndarray  # (n,) float64, NaN where skipped
    skipped: dict[int, str]  # position -> reason
    kept_maps: dict[int, np.ndarray] = field(default_factory=dict)  # the max_overlays best flagged images
    vmin: float = float("inf")
    vmax: float = float("-inf")


def _score_stream(
    spec: MethodSpec, detector, backbone, paths: list[Path], run: RunOptions, max_overlays: int, progress: bool
) -> _Scored:
    """Score ``paths`` chunk by chunk (:data:`CHUNK_IMAGES`); only the scores and at most
    ``max_overlays`` anomaly maps (of the highest-scoring flagged images) outlive a chunk."""
    threshold = float(detector.threshold_)
    out = _Scored(scores=np.full(len(paths), np.nan), skipped={})
    best: list[tuple[float, int]] = []  # min-heap of (score, position) of the kept maps
    bar = tqdm(
        total=len(paths), desc=f"{spec.name}: scoring {len(paths)} test images", unit="img", disable=not progress
    )
    try:
        for start in range(0, len(paths), CHUNK_IMAGES):
            chunk = paths[start : start + CHUNK_IMAGES]
            errors: dict[int, str] = {}
            result = spec.score_paths(detector, backbone, chunk, run, errors)
            out.skipped.update({start + i: why for i, why in errors.items()})
            scores = np.asarray(result["image_scores"], dtype=np.float64)
            out.scores[start : start + len(chunk)] = scores
            maps = result.get("anomaly_maps") if spec.produces_maps else None
            if maps is not None:
                readable = np.isfinite(scores)
                if readable.any():  # maps may be one (n, H, W) array or one array per image ("keep")
                    out.vmin = min(out.vmin, min(float(np.nanmin(maps[i])) for i in np.flatnonzero(readable)))
                    out.vmax = max(out.vmax, max(float(np.nanmax(maps[i])) for i in np.flatnonzero(readable)))
                for i in np.flatnonzero(readable & (scores > threshold)):
                    item = (float(scores[i]), -(start + int(i)))  # ties: the earlier image wins
                    if len(best) < max_overlays:
                        heapq.heappush(best, item)
                        out.kept_maps[start + int(i)] = np.array(maps[i])
                    elif best and item > best[0]:
                        dropped = heapq.heapreplace(best, item)
                        del out.kept_maps[-dropped[1]]
                        out.kept_maps[start + int(i)] = np.array(maps[i])
            del result, maps
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def _input_words(backbone) -> str:
    mode = (backbone.preprocessing or {}).get("resize_mode", "crop")
    return {"keep": "resized input (aspect ratio kept, each image at its own shape)", "squash": "squashed input"}.get(
        mode, "cropped input"
    )


def _write_run(
    run_dir: Path,
    spec: MethodSpec,
    detector,
    backbone,
    test_dir: Path,
    test_paths: list[Path],
    stream: _Scored,
    max_overlays: int,
    progress: bool,
    timings: dict,
) -> dict:
    """abnormal.result, scores.csv, skipped.csv and overlays/ into ``run_dir``; the config so far."""
    readable = np.isfinite(stream.scores)
    scored_paths = [p for p, ok in zip(test_paths, readable) if ok]
    scores = stream.scores[readable]
    predicted = (scores > detector.threshold_).astype(int)
    flagged = [str(p) for p, flag in zip(scored_paths, predicted) if flag]
    with atomic_write(run_dir / "abnormal.result", "w") as handle:
        handle.write("".join(f"{p}\n" for p in flagged))
    table = pd.DataFrame({"path": [str(p) for p in scored_paths], "score": scores, "predicted": predicted})
    with atomic_write(run_dir / "scores.csv", "w") as handle:
        table.to_csv(handle, index=False, lineterminator="\n")
    skipped = pd.DataFrame(
        {
            "path": [str(test_paths[i]) for i in sorted(stream.skipped)],
            "reason": [stream.skipped[i] for i in sorted(stream.skipped)],
        },
        columns=["path", "reason"],
    )
    with atomic_write(run_dir / "skipped.csv", "w") as handle:
        skipped.to_csv(handle, index=False, lineterminator="\n")
    section = as_json(spec.describe(detector))
    config = {
        "anomalib_study_version": __version__,
        "method": spec.name,
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": as_json(backbone.preprocessing),
        "image_size": getattr(backbone, "image_size", None),
        **({"embedding_dim": int(backbone.embedding_dim)} if spec.uses_embedding else {}),
        **section,
        "index": section.get("index_describe", section.get("index")),
        "n_found": len(test_paths),
        "n_test": len(scored_paths),
        "n_skipped": len(stream.skipped),
        "skipped_list": "skipped.csv",
        "n_abnormal": len(flagged),
    }
    if spec.produces_maps:
        step = time.perf_counter()
        order = sorted(stream.kept_maps, key=lambda i: (-stream.scores[i], i))[:max_overlays]
        names = _overlay_names([p.relative_to(test_dir) for p in test_paths])  # stable whatever is selected
        written = write_overlays(
            run_dir / "overlays",
            [test_paths[i] for i in order],
            test_dir,
            [stream.kept_maps[i] for i in order],
            stream.scores[order],
            backbone.preprocessing,
            stream.vmin,
            stream.vmax,
            names=[names[i] for i in order],
            progress=progress,
        )
        timings["overlays_s"] = time.perf_counter() - step
        config["overlays"] = {
            "folder": "overlays",
            "count": len(written),
            "max_overlays": max_overlays,
            "n_flagged": len(flagged),
            "vmin": stream.vmin,
            "vmax": stream.vmax,
            "what": f"flagged images, highest scores first, on the backbone's {_input_words(backbone)}; "
            "one colour scale "
            "(vmin, vmax = min, max of all the run's anomaly maps)",
        }
    return config
