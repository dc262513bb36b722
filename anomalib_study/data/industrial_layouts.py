"""Readers of the other industrial layouts: Magnetic-tile, KolektorSDD, NEU-DET, a generic
folder tree, and the out-of-distribution set built on Magnetic-tile.

KolektorSDD, Magnetic-tile without its split file and generic folders split their normal
images by the seeded rule of :func:`~anomalib_study.data.layout_common.seeded_split`.
Reached through :func:`anomalib_study.data.readers.load_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from anomalib_study.errors import DataError, ParameterError

from .layout_common import (
    check_split_options,
    folder_images,
    require_dir,
    require_images,
    seeded_split,
    split_note,
    subdirs,
)
from .records import ANOMALOUS, GOOD, NORMAL, Dataset, ImageRecord

__all__ = ["read_magnetic_tile", "read_kolektorsdd", "read_neu_det", "read_folder", "read_ood"]

# --------------------------------------------------------------------------- Magnetic-tile


def read_magnetic_tile(
    root: Path, category: str | None = None, *, seed: int = 0, train_fraction: float = 0.8
) -> Dataset:
    """Magnetic-tile: ``MT_<Class>/Imgs/<name>.jpg`` with its mask ``<name>.png`` beside it.

    Masks are binarised ``> 127`` (their edges hold values 1..254). If
    ``mtd_train_filenames.txt`` exists, training = the MT_Free images it lists and test =
    the other MT_Free images plus every defect image (the DifferNet / PatchCore split);
    otherwise MT_Free is split by the seeded rule (``seed``, ``train_fraction``).
    ``category`` (e.g. ``"Blowhole"``) keeps only that defect class in the test set.
    """
    free_dir = root / "MT_Free" / "Imgs"
    free = [p for p in require_images(free_dir) if p.suffix.lower() != ".png"]
    if not free:
        raise DataError(f"magnetic_tile: expected <name>.jpg images in {free_dir}, found only masks")
    notes: list[str] = []
    split_file = root / "mtd_train_filenames.txt"
    if split_file.is_file():
        listed = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        by_name = {p.name: p for p in free}
        unknown = [n for n in listed if Path(n).name not in by_name]
        if unknown:
            raise DataError(f"{split_file} lists {len(unknown)} images not in {free_dir}, e.g. {unknown[0]!r}")
        train_set = {Path(n).name for n in listed}
        train_paths = [p for p in free if p.name in train_set]
        test_normals = [p for p in free if p.name not in train_set]
        notes.append(
            f"split from {split_file.name}: {len(train_paths)} MT_Free train images (DifferNet/PatchCore split)"
        )
    else:
        train_paths, test_normals = seeded_split(free, seed, train_fraction)
        notes.append(split_note("MT_Free images", seed, train_fraction))

    def mask_of(path: Path) -> Path | None:
        mask = path.with_suffix(".png")
        return mask if mask.is_file() and mask != path else None

    train = [ImageRecord(p, "train", NORMAL, GOOD, mask_of(p)) for p in train_paths]
    test = [ImageRecord(p, "test", NORMAL, GOOD, mask_of(p)) for p in test_normals]
    class_dirs = [d for d in subdirs(root) if d.name.startswith("MT_") and d.name != "MT_Free"]
    if category is not None:
        wanted = category if category.startswith("MT_") else f"MT_{category}"
        class_dirs = [d for d in class_dirs if d.name.lower() == wanted.lower()]
        if not class_dirs:
            raise DataError(f"magnetic_tile: no defect class folder {root / wanted}")
    for class_dir in class_dirs:
        kind = class_dir.name[3:].lower()
        for path in folder_images(class_dir / "Imgs"):
            if path.suffix.lower() == ".png":
                continue  # masks sit beside the .jpg images
            test.append(ImageRecord(path, "test", ANOMALOUS, kind, mask_of(path)))
    if not any(r.label == ANOMALOUS for r in test):
        raise DataError(f"magnetic_tile: expected defect folders {root}/MT_<Class>/Imgs (e.g. MT_Blowhole), found none")
    name = "magnetic_tile" if category is None else f"magnetic_tile/{category}"
    return Dataset(name, "magnetic_tile", root, train, test, notes)


# --------------------------------------------------------------------------- KolektorSDD

_KOLEKTOR_DUPLICATES = {"kos26": "kos01", "kos34": "kos27"}  # known repeats in the original


def read_kolektorsdd(root: Path, category: str | None = None, *, seed: int = 0, train_fraction: float = 0.8) -> Dataset:
    """KolektorSDD: ``kosNN/PartN.jpg`` with ``PartN_label.bmp``; an image is anomalous iff
    its label has a pixel > 0 (masks use threshold 0).

    Normal images are split by the seeded rule applied to the **part folders** (``kosNN``),
    so no part has images in both splits; the known duplicate parts (kos26 = kos01,
    kos34 = kos27) are kept together as one unit. Anomalous images are all test.
    """
    if category is not None:
        raise ParameterError("kolektorsdd has no categories: leave category=None")
    check_split_options(seed, train_fraction)
    parts = [d for d in subdirs(root) if d.name.lower().startswith("kos")]
    if not parts:
        raise DataError(f"kolektorsdd: expected part folders {root}/kos01, {root}/kos02, ..., found none")
    per_part: dict[str, list[tuple[Path, Path, bool]]] = {}
    for part in parts:
        items = []
        for image in folder_images(part):
            if image.stem.endswith("_label"):
                continue
            label = None
            for candidate in folder_images(part):
                if candidate.stem == f"{image.stem}_label":
                    label = candidate
                    break
            if label is None:
                raise DataError(f"kolektorsdd: image {image} has no label {part / (image.stem + '_label.bmp')}")
            values = np.asarray(_open_label(label))
            items.append((image, label, bool((values > 0).any())))
        if not items:
            raise DataError(f"kolektorsdd: part folder {part} holds no PartN.jpg image")
        per_part[part.name] = items
    units: dict[str, list[str]] = {}
    for name in per_part:
        unit = _KOLEKTOR_DUPLICATES.get(name, name)
        unit = unit if unit in per_part else name
        units.setdefault(unit, []).append(name)
    train_units, _ = seeded_split(list(units), seed, train_fraction)
    train_parts = {p for u in train_units for p in units[u]}
    train, test = [], []
    for part_name in sorted(per_part):
        for image, label, defective in per_part[part_name]:
            if defective:
                test.append(ImageRecord(image, "test", ANOMALOUS, "defect", label, mask_threshold=0))
            elif part_name in train_parts:
                train.append(ImageRecord(image, "train", NORMAL, GOOD, label, mask_threshold=0))
            else:
                test.append(ImageRecord(image, "test", NORMAL, GOOD, label, mask_threshold=0))
    notes = [
        split_note("part folders (kosNN)", seed, train_fraction),
        "known duplicates of the original: kos26 repeats kos01 and kos34 repeats kos27; each pair is "
        "kept in the same split",
    ]
    return Dataset("kolektorsdd", "kolektorsdd", root, train, test, notes)


def _open_label(path: Path) -> Image.Image:
    image = None
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:
        if image is not None:
            image.close()
        raise DataError(f"label image {path} cannot be decoded ({exc or type(exc).__name__})") from None
    return image.convert("L") if image.mode not in ("L", "1") else image


# --------------------------------------------------------------------------- NEU-DET


def read_neu_det(root: Path, category: str | None = None) -> Dataset:
    """NEU-DET: ``IMAGES/<class>_<i>.jpg``; defect images only.

    Every image is anomalous with ``defect_type`` = its class; the training split is
    empty (no normal class). Used to cluster defect types and as out-of-distribution data.
    ``category`` keeps one class.
    """
    folder = root / "IMAGES"
    images = require_images(folder)
    test = []
    for path in images:
        kind, sep, index = path.stem.rpartition("_")
        if not sep or not index.isdigit():
            raise DataError(f"neu_det: image name {path.name!r} is not <class>_<number>.jpg")
        if category is None or kind == category:
            test.append(ImageRecord(path, "test", ANOMALOUS, kind))
    if not test:
        raise DataError(f"neu_det: no image of class {category!r} in {folder}")
    notes = ["defect images only, no normal class: the training split is empty (clustering / OOD use)"]
    name = "neu_det" if category is None else f"neu_det/{category}"
    return Dataset(name, "neu_det", root, [], test, notes)


# --------------------------------------------------------------------------- generic folder


def read_folder(
    root: Path,
    category: str | None = None,
    *,
    normal: str | Sequence[str] = ("good",),
    anomalous: str = "anomalous",
    seed: int = 0,
    train_fraction: float = 0.8,
) -> Dataset:
    """A generic tree: ``root/<normal>/...`` and ``root/<anomalous>/<defect_type>/...``.

    ``normal`` is one folder name or several; their images (recursively) are split by the
    seeded rule. Each subfolder of ``root/<anomalous>`` is a defect type (images lying
    directly in it get ``"defect"``); all anomalous images are test. ``category`` reads
    ``root/<category>`` instead of ``root``.
    """
    base = root / category if category is not None else root
    require_dir(base)
    normal_names = [normal] if isinstance(normal, str) else list(normal)
    if not normal_names:
        raise ParameterError("normal must name at least one folder, e.g. normal=('good',)")
    normal_paths: list[Path] = []
    for name in normal_names:
        folder = base / name
        if folder.is_dir():
            normal_paths += folder_images(folder, recursive=True)
    if not normal_paths:
        raise DataError(
            f"folder: expected normal images in {' or '.join(str(base / n) for n in normal_names)}, found none: "
            "name the folder of normal images (--normal NAME on the command line, normal= in Python)"
        )
    check_split_options(seed, train_fraction)
    train_paths, test_paths = seeded_split(normal_paths, seed, train_fraction)
    train = [ImageRecord(p, "train", NORMAL) for p in train_paths]
    test = [ImageRecord(p, "test", NORMAL) for p in test_paths]
    notes = [split_note("images", seed, train_fraction)]
    anomalous_dir = base / anomalous
    if anomalous_dir.is_dir():
        test += [ImageRecord(p, "test", ANOMALOUS, "defect") for p in folder_images(anomalous_dir)]
        for type_dir in subdirs(anomalous_dir):
            test += [ImageRecord(p, "test", ANOMALOUS, type_dir.name) for p in folder_images(type_dir, recursive=True)]
    if not any(r.label == ANOMALOUS for r in test):
        notes.append(f"no anomalous images ({anomalous_dir} is missing or empty)")
    name = f"folder/{category}" if category is not None else f"folder/{root.name}"
    return Dataset(name, "folder", root, train, test, notes)


# --------------------------------------------------------------------------- out-of-distribution

_OOD_SOURCES = ("neu_det", "kolektorsdd", "mvtec_ad")


def _ood_source_images(source: str, folder: Path) -> list[Path]:
    if source == "neu_det":
        return folder_images(folder / "IMAGES")
    if source == "kolektorsdd":
        return [p for d in subdirs(folder) for p in folder_images(d) if not p.stem.endswith("_label")]
    if source == "mvtec_ad":
        paths = []
        for category in subdirs(folder):
            paths += folder_images(category / "train" / "good")
            paths += [p for d in subdirs(category / "test") for p in folder_images(d)]
        return paths
    raise ParameterError(f"unknown OOD source {source!r}: choose from {', '.join(_OOD_SOURCES)}")


def read_ood(
    root: Path,
    category: str | None = None,
    *,
    max_per_source: int = 100,
    seed: int = 0,
    sources: Sequence[str] = _OOD_SOURCES,
) -> Dataset:
    """Out-of-distribution set on a data folder holding ``magnetic_tile/`` and OOD sources.

    Normal train = the Magnetic-tile training normals, normal test = its held-out MT_Free
    images; anomalous = images of other data sets (``neu_det``, ``kolektorsdd``,
    ``mvtec_ad``: every image, any split or category), ``defect_type`` = the source name.
    At most ``max_per_source`` per source, chosen by ``default_rng(seed).choice`` without
    replacement from the sorted list.
    """
    if category is not None:
        raise ParameterError("the ood layout has no categories: leave category=None")
    if not isinstance(max_per_source, (int, np.integer)) or max_per_source < 1:
        raise ParameterError(f"max_per_source must be a positive integer, got {max_per_source!r}")
    check_split_options(seed, 0.5)
    base = read_magnetic_tile(require_dir(root / "magnetic_tile", " (the in-distribution data)"), seed=seed)
    train = list(base.train)
    test = [r for r in base.test if r.label == NORMAL]
    notes = ["in-distribution: Magnetic-tile MT_Free (" + base.notes[0] + ")"]
    used = []
    for source in sources:
        folder = root / source
        if not folder.is_dir():
            notes.append(f"OOD source {source} missing ({folder})")
            continue
        paths = sorted(_ood_source_images(source, folder))
        if not paths:
            notes.append(f"OOD source {source} holds no image")
            continue
        rng = np.random.default_rng(int(seed))
        chosen = sorted(paths[i] for i in rng.choice(len(paths), size=min(max_per_source, len(paths)), replace=False))
        test += [ImageRecord(p, "test", ANOMALOUS, source) for p in chosen]
        used.append(f"{source} ({len(chosen)} of {len(paths)})")
    if not used:
        raise DataError(f"ood: expected at least one OOD source folder in {root} ({', '.join(sources)}), found none")
    notes.append(
        f"out-of-distribution images, at most {max_per_source} per source by default_rng({seed}): " + ", ".join(used)
    )
    return Dataset("ood/magnetic_tile", "ood", root, train, test, notes)
