"""One reader per official data-set layout: folder tree -> :class:`Dataset` of records.

``load_dataset(layout, root, category=None, **options)`` is the single entry point;
``LAYOUTS`` maps each layout name to its reader. Readers only list files (and, for
KolektorSDD, read the small label images to know which parts are defective); they never
decode the images themselves. Every layout error raises :class:`DataError` saying which
folder was expected.

Seeded splits (KolektorSDD, Magnetic-tile without its split file, generic folders): the
units to split (image paths, or KolektorSDD part folders) are sorted, permuted with
``numpy.random.default_rng(seed).permutation``, and the first ``round(train_fraction * n)``
go to training; the rest are test. Anomalous images are always test. The rule is also
written into ``Dataset.notes`` so every report shows it.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import atomic_write, cache_root, sha256_bytes

from .decode import ellipse_mask, image_files, is_image_file
from .records import ANOMALOUS, GOOD, NORMAL, Dataset, ImageRecord
from .synthetic import SYNTHETIC_STAMP

# --------------------------------------------------------------------------- helpers


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (case-insensitive suffixes), sorted by path."""
    return image_files(folder, recursive=recursive)


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(folder: Path, hint: str = "") -> Path:
    if not folder.is_dir():
        raise DataError(
            f"expected the folder {folder}{hint}, but it does not exist: is this the right layout and root?"
        )
    return folder


def _require_images(folder: Path, recursive: bool = False) -> list[Path]:
    _require_dir(folder)
    found = _images(folder, recursive)
    if not found:
        raise DataError(
            f"{folder} holds no image ({', '.join(e for e in ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff'))})"
        )
    return found


def _check_split_options(seed: int, train_fraction: float) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ParameterError(f"seed must be an integer, got {seed!r}")
    if not 0.0 < float(train_fraction) < 1.0:
        raise ParameterError(f"train_fraction must be strictly between 0 and 1, got {train_fraction!r}")


def seeded_split(items: Sequence, seed: int, train_fraction: float) -> tuple[list, list]:
    """Split ``items`` into (train, test) by the documented rule.

    Items are sorted, permuted with ``numpy.random.default_rng(seed).permutation``; the
    first ``round(train_fraction * n)`` of the permutation are train. Both lists are
    returned sorted. The same seed always gives the same split.
    """
    _check_split_options(seed, train_fraction)
    ordered = sorted(items)
    order = np.random.default_rng(int(seed)).permutation(len(ordered))
    n_train = int(round(float(train_fraction) * len(ordered)))
    train = sorted(ordered[i] for i in order[:n_train])
    test = sorted(ordered[i] for i in order[n_train:])
    return train, test


def _split_note(unit: str, seed: int, train_fraction: float) -> str:
    return (
        f"seeded split of the normal {unit}: sorted, numpy default_rng({seed}).permutation, first "
        f"round({train_fraction} * n) train, rest test; anomalous images are all test"
    )


def _category_root(root: Path, category: str | None, layout: str, marker: str) -> tuple[Path, str]:
    """The folder of one category: ``root/category``, or ``root`` itself if it holds ``marker``."""
    if category is not None:
        folder = root / category
        if not folder.is_dir():
            found = [p.name for p in _subdirs(root) if (p / marker).is_dir()]
            raise DataError(
                f"{layout}: category folder {folder} does not exist"
                + (f"; categories found in {root}: {', '.join(found)}" if found else "")
            )
        return folder, category
    if (root / marker).is_dir():
        return root, root.name
    found = [p.name for p in _subdirs(root) if (p / marker).is_dir()]
    if found:
        raise DataError(f"{layout}: {root} holds several categories ({', '.join(found)}): pass category=<one of them>")
    example = f", e.g. {_subdirs(root)[0] / marker}" if _subdirs(root) else ""
    raise DataError(
        f"{layout}: expected {root}/<category>/{marker}{example} (or {root}/{marker} for a single category), "
        "found neither"
    )


# --------------------------------------------------------------------------- MVTec AD


def read_mvtec_ad(root: Path, category: str | None = None) -> Dataset:
    """MVTec AD: ``<category>/train/good``, ``test/<type>``, ``ground_truth/<type>/<nnn>_mask.png``.

    ``ground_truth/`` may be absent (image-level evaluation only; said in the notes).
    Masks are 0/255: binarised ``> 127``.
    """
    folder, name = _category_root(root, category, "mvtec_ad", "train/good")
    train_dir = _require_dir(folder / "train" / "good")
    test_dir = _require_dir(folder / "test")
    train = [ImageRecord(p, "train", NORMAL) for p in _require_images(train_dir)]
    gt_dir = folder / "ground_truth"
    notes: list[str] = []
    test: list[ImageRecord] = []
    missing = 0
    for type_dir in _subdirs(test_dir):
        for path in _images(type_dir):
            if type_dir.name == GOOD:
                test.append(ImageRecord(path, "test", NORMAL))
                continue
            mask = gt_dir / type_dir.name / f"{path.stem}_mask.png"
            if not mask.is_file():
                missing += gt_dir.is_dir()
                mask = None
            test.append(ImageRecord(path, "test", ANOMALOUS, type_dir.name, mask))
    if not test:
        raise DataError(f"mvtec_ad: expected images in {test_dir}/<type>/ (e.g. {test_dir}/good), found none")
    if not gt_dir.is_dir():
        notes.append(f"no ground_truth/ folder in {folder}: no masks, image-level evaluation only")
    elif missing:
        notes.append(f"{missing} anomalous test images have no mask in {gt_dir}")
    return Dataset(f"mvtec_ad/{name}", "mvtec_ad", root, train, test, notes)


# --------------------------------------------------------------------------- MVTec LOCO AD


def _loco_mask(gt_dir: Path, defect_type: str, stem: str) -> Path | None:
    per_defect = gt_dir / defect_type / stem  # official form: one PNG per defect in a folder
    if per_defect.is_dir():
        return per_defect
    for candidate in _images(gt_dir / defect_type):
        if candidate.stem in (stem, f"{stem}_mask"):
            return candidate
    return None


def read_mvtec_loco(root: Path, category: str | None = None) -> Dataset:
    """MVTec LOCO AD: ``train/good``, ``test/good`` (or ``validation/good``), ``test/<type>``.

    Masks: the official folder per image (``ground_truth/<type>/<nnn>/*.png``, union of the
    per-defect masks) or one PNG per image (``ground_truth/<type>/<nnn>.png``). LOCO masks
    give each defect its own grey value, so any value > 0 is defective (threshold 0). If
    ``test/good`` is absent, the ``validation/good`` images are the normal test images and
    the notes say the data set is partial.
    """
    folder, name = _category_root(root, category, "mvtec_loco", "train/good")
    train = [ImageRecord(p, "train", NORMAL) for p in _require_images(folder / "train" / "good")]
    test_dir = _require_dir(folder / "test")
    gt_dir = folder / "ground_truth"
    notes: list[str] = []
    test: list[ImageRecord] = []
    if (test_dir / GOOD).is_dir():
        normals = _images(test_dir / GOOD)
    else:
        validation = folder / "validation" / "good"
        if not validation.is_dir():
            raise DataError(f"mvtec_loco: expected {test_dir}/good or {validation} for the normal test images")
        normals = _images(validation)
        notes.append(
            f"partial: test/good is missing, so the {len(normals)} validation/good images are the normal test images"
        )
    test += [ImageRecord(p, "test", NORMAL) for p in normals]
    types = [d.name for d in _subdirs(test_dir) if d.name != GOOD]
    for defect_type in types:
        for path in _images(test_dir / defect_type):
            mask = _loco_mask(gt_dir, defect_type, path.stem)
            test.append(ImageRecord(path, "test", ANOMALOUS, defect_type, mask, mask_threshold=0))
    for expected in ("logical_anomalies", "structural_anomalies"):
        if expected not in types:
            notes.append(f"partial: test/{expected} is missing")
    if not any(r.label == ANOMALOUS for r in test):
        raise DataError(
            f"mvtec_loco: expected anomalous images in {test_dir}/logical_anomalies or structural_anomalies"
        )
    return Dataset(f"mvtec_loco/{name}", "mvtec_loco", root, train, test, notes)


# --------------------------------------------------------------------------- MVTec 3D-AD


def read_mvtec_3d(root: Path, category: str | None = None) -> Dataset:
    """MVTec 3D-AD, RGB only: ``train/good/rgb``, ``test/<type>/rgb`` with masks in ``test/<type>/gt``.

    ``validation/good`` is ignored unless ``test/good`` is absent (then it is the normal
    test set, said in the notes). The xyz point clouds are never read.
    """
    folder, name = _category_root(root, category, "mvtec_3d", "train/good/rgb")
    train = [ImageRecord(p, "train", NORMAL) for p in _require_images(folder / "train" / "good" / "rgb")]
    test_dir = _require_dir(folder / "test")
    notes: list[str] = ["RGB images only: the xyz point clouds are not used"]
    test: list[ImageRecord] = []
    if not (test_dir / GOOD).is_dir():
        validation = folder / "validation" / "good" / "rgb"
        if not validation.is_dir():
            raise DataError(f"mvtec_3d: expected {test_dir}/good/rgb or {validation} for the normal test images")
        test += [ImageRecord(p, "test", NORMAL) for p in _images(validation)]
        notes.append("partial: test/good is missing, so validation/good is the normal test set")
    for type_dir in _subdirs(test_dir):
        rgb = type_dir / "rgb"
        if not rgb.is_dir():
            raise DataError(f"mvtec_3d: expected {rgb} (RGB images of test type {type_dir.name!r})")
        for path in _images(rgb):
            mask = type_dir / "gt" / f"{path.stem}.png"
            mask = mask if mask.is_file() else None
            if type_dir.name == GOOD:
                test.append(ImageRecord(path, "test", NORMAL, GOOD, mask))
            else:
                test.append(ImageRecord(path, "test", ANOMALOUS, type_dir.name, mask))
    if not test:
        raise DataError(f"mvtec_3d: expected images in {test_dir}/<type>/rgb, found none")
    return Dataset(f"mvtec_3d/{name}", "mvtec_3d", root, train, test, notes)


# --------------------------------------------------------------------------- DAGM 2007

_CLASS_RE = re.compile(r"^Class(\d+)$", re.IGNORECASE)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_dagm_labels(
    labels: Path,
) -> tuple[dict[str, tuple[int, str | None]], dict[str, list[tuple]], dict[str, list[str]]]:
    """Read a DAGM ``Labels.txt`` in either form.

    * Later (HCI / Zenodo) form: an optional first line with a single number, then
      ``id<TAB>defective<TAB>file<TAB>0<TAB>labelfile`` (``labelfile`` is ``0`` if none).
    * 2007 competition form: one line per defect,
      ``image<TAB>semi_major<TAB>semi_minor<TAB>angle<TAB>x<TAB>y`` where ``image`` is the
      image number or file name (see :func:`~anomalib_study.data.decode.ellipse_mask`).

    Returns (file form: key -> (defective, label file)), (ellipse form: key -> ellipses),
    (key -> raw lines, for the mask cache key). Keys are lower-case file names or, for a
    numeric image id, ``"#<int>"``.
    """
    try:
        text = labels.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"cannot read the DAGM label file {labels}: {exc}") from None
    files: dict[str, tuple[int, str | None]] = {}
    ellipses: dict[str, list[tuple]] = {}
    raw: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or (len(fields) == 1 and fields[0].isdigit() and number == 1):
            continue  # blank line, or the header of the later form
        if len(fields) == 5 and is_image_file(fields[2]) and fields[1] in ("0", "1"):
            label_file = None if fields[4] == "0" else fields[4]
            files[fields[2].lower()] = (int(fields[1]), label_file)
        elif (
            len(fields) == 6
            and all(_is_number(f) for f in fields[1:])
            and (fields[0].isdigit() or is_image_file(fields[0]))
        ):
            key = f"#{int(fields[0])}" if fields[0].isdigit() else fields[0].lower()
            ellipses.setdefault(key, []).append(tuple(float(f) for f in fields[1:]))
            raw.setdefault(key, []).append("\t".join(fields[1:]))
        else:
            raise DataError(
                f"{labels}, line {number}: cannot read {line.strip()!r}; expected "
                "'id<TAB>0|1<TAB>file<TAB>0<TAB>labelfile' (DAGM label-image form) or "
                "'image<TAB>semi_major<TAB>semi_minor<TAB>angle<TAB>x<TAB>y' (DAGM 2007 ellipse form)"
            )
    if files and ellipses:
        raise DataError(f"{labels} mixes the label-image form and the ellipse form: use one form per file")
    return files, ellipses, raw


def _dagm_ellipse_mask_file(image: Path, ellipses: list[tuple], raw_lines: list[str]) -> Path:
    """The rasterised ellipse mask of ``image``, written once under cache_root()/dagm_masks.

    The file is keyed by the sha256 of the image size and the label lines, so a changed
    label makes a new mask; it is written atomically (a PNG, 0/255).
    """
    try:
        with Image.open(image) as handle:
            width, height = handle.size
    except Exception as exc:
        raise DataError(f"DAGM image {image} cannot be read ({exc or type(exc).__name__})") from None
    key = sha256_bytes(f"{width}x{height}\n{chr(10).join(sorted(raw_lines))}".encode())[:32]
    target = cache_root() / "dagm_masks" / f"{key}.png"
    if not target.is_file():
        mask = ellipse_mask((height, width), ellipses)
        with atomic_write(target, "wb") as handle:
            Image.fromarray(mask.astype(np.uint8) * np.uint8(255), mode="L").save(handle, format="PNG")
    return target


def _dagm_split_records(split_dir: Path, split: str, defect_kinds: dict[str, str], root: Path) -> list[ImageRecord]:
    images = _require_images(split_dir)
    labels = split_dir / "Label" / "Labels.txt"
    if not labels.is_file():
        alternatives = [p for p in (split_dir / "Label").glob("*") if p.name.lower() == "labels.txt"]
        if not alternatives:
            raise DataError(
                f"dagm: expected the label file {labels} (DAGM 2007 layout ClassN/{split_dir.name}/Label/Labels.txt)"
            )
        labels = alternatives[0]
    files, ellipses, raw = _parse_dagm_labels(labels)
    by_name = {p.name.lower(): p for p in images}
    by_number = {}
    for p in images:
        if p.stem.isdigit():
            by_number[f"#{int(p.stem)}"] = p
    for key in list(files) + list(ellipses):
        if key not in by_name and key not in by_number:
            raise DataError(f"{labels} names image {key.lstrip('#')!r}, which is not in {split_dir}")
    records = []
    for path in images:
        keys = [path.name.lower()] + ([f"#{int(path.stem)}"] if path.stem.isdigit() else [])
        defective, mask = 0, None
        for key in keys:
            if key in files:
                defective, label_file = files[key]
                if defective and label_file is not None:
                    mask = split_dir / "Label" / label_file
                    if not mask.is_file():
                        raise DataError(f"{labels} names the label image {label_file!r}, which is not in {mask.parent}")
            elif key in ellipses:
                defective = 1
                mask = _dagm_ellipse_mask_file(path, ellipses[key], raw[key])
        if not defective:
            # DAGM's Train images without a defect are the normal training set
            records.append(ImageRecord(path, "train" if split == "train" else "test", NORMAL))
        else:
            kind = defect_kinds.get(path.relative_to(root).as_posix(), "defect")
            records.append(ImageRecord(path, "test", ANOMALOUS, kind, mask))
    return records


def read_dagm(root: Path, category: str | None = None) -> Dataset:
    """DAGM 2007: ``ClassN/Train``, ``ClassN/Test``, images ``NNNN.PNG``, ``<split>/Label/Labels.txt``.

    Both label forms are read (see :func:`_parse_dagm_labels`). Label images of the later
    form are used as masks directly (0/255, threshold 127); the ellipses of the 2007 form
    are rasterised once into PNGs under ``cache_root()/dagm_masks`` and those files are the
    masks. Defective ``Train`` images are anomalous and go to the **test** split; normal
    ``Train`` images are the training set. ``category`` is ``"Class1"`` etc.; ``None`` reads
    every class. ``defect_type`` is the defect kind where a synthetic set records it, else
    ``"defect"``. A ``synthetic.json`` stamp in ``root`` marks a generated set
    (``Dataset.synthetic`` True, name ``synthetic_dagm``).
    """
    stamp_path = root / SYNTHETIC_STAMP
    synthetic = stamp_path.is_file()
    defect_kinds: dict[str, str] = {}
    if synthetic:
        try:
            defect_kinds = dict(json.loads(stamp_path.read_text()).get("defect_types", {}))
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"cannot read the synthetic-data stamp {stamp_path}: {exc}") from None
    if category is not None:
        if not _CLASS_RE.match(category):
            raise ParameterError(f"dagm category must look like 'Class1', got {category!r}")
        class_dirs = [_require_dir(root / category, " (a DAGM class folder)")]
    else:
        class_dirs = sorted(
            (p for p in _subdirs(root) if _CLASS_RE.match(p.name)), key=lambda p: int(_CLASS_RE.match(p.name).group(1))
        )
        if not class_dirs:
            raise DataError(
                f"dagm: expected class folders {root}/Class1, {root}/Class2, ... with Train/ and Test/, found none"
            )
    train: list[ImageRecord] = []
    test: list[ImageRecord] = []
    for class_dir in class_dirs:
        for split in ("Train", "Test"):
            split_dir = class_dir / split
            if not split_dir.is_dir():
                alt = [p for p in _subdirs(class_dir) if p.name.lower() == split.lower()]
                if not alt:
                    raise DataError(f"dagm: expected {split_dir} (DAGM 2007 layout ClassN/Train and ClassN/Test)")
                split_dir = alt[0]
            for record in _dagm_split_records(split_dir, split.lower(), defect_kinds, root):
                (train if record.split == "train" else test).append(record)
    base = "synthetic_dagm" if synthetic else "dagm"
    name = f"{base}/{category}" if category is not None else base
    notes = ["defective Train images are anomalous: they are in the test split, never in train"]
    if any(r.mask_path is not None and "dagm_masks" in Path(r.mask_path).parts for r in test):
        notes.append("masks rasterised from the DAGM 2007 ellipse labels (coarse weak labels)")
    if synthetic:
        notes.insert(0, f"synthetic: generated DAGM-layout data ({stamp_path.name}), not the real DAGM 2007")
    return Dataset(name, "dagm", root, train, test, notes, synthetic=synthetic)


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
    free = [p for p in _require_images(free_dir) if p.suffix.lower() != ".png"]
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
        notes.append(_split_note("MT_Free images", seed, train_fraction))

    def mask_of(path: Path) -> Path | None:
        mask = path.with_suffix(".png")
        return mask if mask.is_file() and mask != path else None

    train = [ImageRecord(p, "train", NORMAL, GOOD, mask_of(p)) for p in train_paths]
    test = [ImageRecord(p, "test", NORMAL, GOOD, mask_of(p)) for p in test_normals]
    class_dirs = [d for d in _subdirs(root) if d.name.startswith("MT_") and d.name != "MT_Free"]
    if category is not None:
        wanted = category if category.startswith("MT_") else f"MT_{category}"
        class_dirs = [d for d in class_dirs if d.name.lower() == wanted.lower()]
        if not class_dirs:
            raise DataError(f"magnetic_tile: no defect class folder {root / wanted}")
    for class_dir in class_dirs:
        kind = class_dir.name[3:].lower()
        for path in _images(class_dir / "Imgs"):
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
    _check_split_options(seed, train_fraction)
    parts = [d for d in _subdirs(root) if d.name.lower().startswith("kos")]
    if not parts:
        raise DataError(f"kolektorsdd: expected part folders {root}/kos01, {root}/kos02, ..., found none")
    per_part: dict[str, list[tuple[Path, Path, bool]]] = {}
    for part in parts:
        items = []
        for image in _images(part):
            if image.stem.endswith("_label"):
                continue
            label = None
            for candidate in _images(part):
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
        _split_note("part folders (kosNN)", seed, train_fraction),
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
    images = _require_images(folder)
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
    _require_dir(base)
    normal_names = [normal] if isinstance(normal, str) else list(normal)
    if not normal_names:
        raise ParameterError("normal must name at least one folder, e.g. normal=('good',)")
    normal_paths: list[Path] = []
    for name in normal_names:
        folder = base / name
        if folder.is_dir():
            normal_paths += _images(folder, recursive=True)
    if not normal_paths:
        raise DataError(
            f"folder: expected normal images in {' or '.join(str(base / n) for n in normal_names)}, found none "
            "(set normal=<folder name>)"
        )
    _check_split_options(seed, train_fraction)
    train_paths, test_paths = seeded_split(normal_paths, seed, train_fraction)
    train = [ImageRecord(p, "train", NORMAL) for p in train_paths]
    test = [ImageRecord(p, "test", NORMAL) for p in test_paths]
    notes = [_split_note("images", seed, train_fraction)]
    anomalous_dir = base / anomalous
    if anomalous_dir.is_dir():
        test += [ImageRecord(p, "test", ANOMALOUS, "defect") for p in _images(anomalous_dir)]
        for type_dir in _subdirs(anomalous_dir):
            test += [ImageRecord(p, "test", ANOMALOUS, type_dir.name) for p in _images(type_dir, recursive=True)]
    if not any(r.label == ANOMALOUS for r in test):
        notes.append(f"no anomalous images ({anomalous_dir} is missing or empty)")
    name = f"folder/{category}" if category is not None else f"folder/{root.name}"
    return Dataset(name, "folder", root, train, test, notes)


# --------------------------------------------------------------------------- out-of-distribution

_OOD_SOURCES = ("neu_det", "kolektorsdd", "mvtec_ad")


def _ood_source_images(source: str, folder: Path) -> list[Path]:
    if source == "neu_det":
        return _images(folder / "IMAGES")
    if source == "kolektorsdd":
        return [p for d in _subdirs(folder) for p in _images(d) if not p.stem.endswith("_label")]
    if source == "mvtec_ad":
        paths = []
        for category in _subdirs(folder):
            paths += _images(category / "train" / "good")
            paths += [p for d in _subdirs(category / "test") for p in _images(d)]
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
    _check_split_options(seed, 0.5)
    base = read_magnetic_tile(_require_dir(root / "magnetic_tile", " (the in-distribution data)"), seed=seed)
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


# --------------------------------------------------------------------------- registry

LAYOUTS: dict[str, Callable[..., Dataset]] = {
    "mvtec_ad": read_mvtec_ad,
    "mvtec_loco": read_mvtec_loco,
    "mvtec_3d": read_mvtec_3d,
    "dagm": read_dagm,
    "magnetic_tile": read_magnetic_tile,
    "kolektorsdd": read_kolektorsdd,
    "neu_det": read_neu_det,
    "folder": read_folder,
    "ood": read_ood,
}


def load_dataset(layout: str, root: str | os.PathLike, category: str | None = None, **options) -> Dataset:
    """Read the data set at ``root`` with the reader of ``layout`` (a key of :data:`LAYOUTS`).

    ``options`` are the reader's keyword options (e.g. ``seed``, ``train_fraction``);
    an option the reader does not take raises :class:`ParameterError` naming the accepted
    ones. Records are sorted by path within each folder; anomalous images are never in
    the training split.

    Raises:
        DataError: unknown layout, missing root, empty folder, or a tree not of that layout.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}: known layouts are {', '.join(sorted(LAYOUTS))}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{layout}: data folder {root} does not exist (set the root or ANOMALIB_STUDY_DATA)")
    if not root.is_dir():
        raise DataError(f"{layout}: {root} is a file; the root must be a folder")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise DataError(f"{layout}: data folder {root} is empty")
    reader = LAYOUTS[layout]
    accepted = [n for n, p in inspect.signature(reader).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ParameterError(
            f"layout {layout!r} takes no option {', '.join(unknown)}; "
            + (f"its options are: {', '.join(accepted)}" if accepted else "it takes no options")
        )
    dataset = reader(root, category, **options)
    if not dataset.train and not dataset.test:
        raise DataError(f"{layout}: no image found under {root}")
    return dataset
