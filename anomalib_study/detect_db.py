"""The detect database: a method's fitted model and its provenance, kept in a folder.

:func:`~anomalib_study.detect.detect_abnormal` fits the method on a folder of normal images
once and keeps it in a **database folder** (``db_dir``), reused by later runs as long as it
still matches the method, the backbone and the normal images. This module writes
(:func:`save_database`), reads (:func:`load_database`) and checks
(:meth:`DetectDatabase.check_backbone`, :meth:`DetectDatabase.check_images`) that folder.

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
    build that was interrupted) is not a database, and the next call rebuilds it. A kNN
    database of the first layout (format ``"anomalib_study.knn_database"``) is refused,
    named, with the fix (rebuild it).

Loading refuses (ModelFileError, with how to fix it) a database of another format or
version, built for another method, whose two files do not belong together, whose
backbone weights, preprocessing or dimension differ from the backbone loaded now, or whose
normal images changed since it was built ("stale database").
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from anomalib_study import __version__
from anomalib_study.data.decode import content_hash, find_unreadable, image_files, list_images, unreadable_message
from anomalib_study.errors import DataError, ModelFileError, ParameterError
from anomalib_study.io import as_json, sha256_file, write_json
from anomalib_study.methods import DETECTORS, get_detector
from anomalib_study.methods.base import MethodSpec, RunOptions

__all__ = [
    "load_database",
    "save_database",
    "DetectDatabase",
    "KNNDatabase",
    "image_manifest",
    "build_database",
    "reuse_database",
    "DB_FORMAT",
    "DB_VERSION",
    "DB_FILE",
]

DB_FORMAT = "anomalib_study.detect_database"
DB_VERSION = 2
LEGACY_FORMAT, LEGACY_VERSION = "anomalib_study.knn_database", 1  # the first kNN-only databases: refused, named
DB_FILE = "database.json"


def image_manifest(image_dir: Path, paths: list[Path], progress: bool = True) -> dict[str, str | None]:
    """relative posix path -> content sha256 (None for a link whose target is missing), for every image."""
    bar = tqdm(paths, desc=f"hashing {image_dir}", unit="img", disable=not progress, leave=False)
    return {p.relative_to(image_dir).as_posix(): content_hash(p) if p.exists() else None for p in bar}


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
        now = image_manifest(image_dir, image_files(image_dir), progress=progress)
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
    if found == LEGACY_FORMAT:
        raise ModelFileError(
            f"{meta_path} is a kNN database of the first layout ({LEGACY_FORMAT} version "
            f"{metadata.get('version')!r}), which this version no longer reads: {fix}"
        )
    if found != DB_FORMAT:
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


# ---------------------------------------------------------------------- building or reusing it
def build_database(
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
    load_backbone: Callable,
):
    """Fit the method on ``image_dir`` and save the database; (model, backbone).

    ``load_backbone(name, weights, device, image_size, resize_mode)``: detect's backbone
    loader (replaceable in tests)."""
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
    backbone = load_backbone(model_name, weights, run.device, image_size, resize_mode)
    hashes = image_manifest(image_dir, normal_paths, progress=run.progress)
    detector = spec.fit_paths(backbone, normal_paths, params, run)
    save_database(db_dir, detector, backbone, image_dir, hashes, skipped, method=spec.name)
    return detector, backbone


def reuse_database(
    spec: MethodSpec,
    given: dict,
    db_dir: Path,
    image_dir: Path | None,
    model_name: str,
    weights,
    given_geometry: dict,
    device: str,
    progress: bool,
    load_backbone: Callable,
):
    """Load the database, warn where the arguments differ from it, check backbone and images;
    (model, backbone). ``load_backbone``: as for :func:`build_database`."""
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
    backbone = load_backbone(database.backbone_name, weights, device, database.image_size, database.resize_mode)
    database.check_backbone(backbone)
    if image_dir is None:
        warnings.warn(
            f"the database {db_dir} is used without checking that its normal images are still current: "
            "pass --image-dir (image_dir=) to check them",
            stacklevel=3,
        )
    elif image_dir.is_dir():
        database.check_images(image_dir, progress=progress)
    else:
        warnings.warn(
            f"image_dir {image_dir} does not exist: the database {db_dir} is used without checking "
            "that its normal images are still current",
            stacklevel=3,
        )
    return database.detector, backbone
