"""Readers of the MVTec family of layouts: MVTec AD, MVTec LOCO AD, MVTec 3D-AD (RGB only).

Each takes ``(root, category=None)`` and returns a :class:`Dataset`; ``root`` is the
folder of the categories or of one category. Reached through
:func:`anomalib_study.data.readers.load_dataset`.
"""

from __future__ import annotations

from pathlib import Path

from anomalib_study.errors import DataError

from .layout_common import category_root, folder_images, require_dir, require_images, subdirs
from .records import ANOMALOUS, GOOD, NORMAL, Dataset, ImageRecord

__all__ = ["read_mvtec_ad", "read_mvtec_loco", "read_mvtec_3d"]

# --------------------------------------------------------------------------- MVTec AD


def read_mvtec_ad(root: Path, category: str | None = None) -> Dataset:
    """MVTec AD: ``<category>/train/good``, ``test/<type>``, ``ground_truth/<type>/<nnn>_mask.png``.

    ``ground_truth/`` may be absent (image-level evaluation only; said in the notes).
    Masks are 0/255: binarised ``> 127``.
    """
    folder, name = category_root(root, category, "mvtec_ad", "train/good")
    train_dir = require_dir(folder / "train" / "good")
    test_dir = require_dir(folder / "test")
    train = [ImageRecord(p, "train", NORMAL) for p in require_images(train_dir)]
    gt_dir = folder / "ground_truth"
    notes: list[str] = []
    test: list[ImageRecord] = []
    missing = 0
    for type_dir in subdirs(test_dir):
        for path in folder_images(type_dir):
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
    for candidate in folder_images(gt_dir / defect_type):
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
    folder, name = category_root(root, category, "mvtec_loco", "train/good")
    train = [ImageRecord(p, "train", NORMAL) for p in require_images(folder / "train" / "good")]
    test_dir = require_dir(folder / "test")
    gt_dir = folder / "ground_truth"
    notes: list[str] = []
    test: list[ImageRecord] = []
    if (test_dir / GOOD).is_dir():
        normals = folder_images(test_dir / GOOD)
    else:
        validation = folder / "validation" / "good"
        if not validation.is_dir():
            raise DataError(f"mvtec_loco: expected {test_dir}/good or {validation} for the normal test images")
        normals = folder_images(validation)
        notes.append(
            f"partial: test/good is missing, so the {len(normals)} validation/good images are the normal test images"
        )
    test += [ImageRecord(p, "test", NORMAL) for p in normals]
    types = [d.name for d in subdirs(test_dir) if d.name != GOOD]
    for defect_type in types:
        for path in folder_images(test_dir / defect_type):
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
    folder, name = category_root(root, category, "mvtec_3d", "train/good/rgb")
    train = [ImageRecord(p, "train", NORMAL) for p in require_images(folder / "train" / "good" / "rgb")]
    test_dir = require_dir(folder / "test")
    notes: list[str] = ["RGB images only: the xyz point clouds are not used"]
    test: list[ImageRecord] = []
    if not (test_dir / GOOD).is_dir():
        validation = folder / "validation" / "good" / "rgb"
        if not validation.is_dir():
            raise DataError(f"mvtec_3d: expected {test_dir}/good/rgb or {validation} for the normal test images")
        test += [ImageRecord(p, "test", NORMAL) for p in folder_images(validation)]
        notes.append("partial: test/good is missing, so validation/good is the normal test set")
    for type_dir in subdirs(test_dir):
        rgb = type_dir / "rgb"
        if not rgb.is_dir():
            raise DataError(f"mvtec_3d: expected {rgb} (RGB images of test type {type_dir.name!r})")
        for path in folder_images(rgb):
            mask = type_dir / "gt" / f"{path.stem}.png"
            mask = mask if mask.is_file() else None
            if type_dir.name == GOOD:
                test.append(ImageRecord(path, "test", NORMAL, GOOD, mask))
            else:
                test.append(ImageRecord(path, "test", ANOMALOUS, type_dir.name, mask))
    if not test:
        raise DataError(f"mvtec_3d: expected images in {test_dir}/<type>/rgb, found none")
    return Dataset(f"mvtec_3d/{name}", "mvtec_3d", root, train, test, notes)
