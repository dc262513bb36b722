"""The reader of the DAGM 2007 layout (and of the synthetic sets generated in it).

Both forms of ``Labels.txt`` are read: label images (the later HCI / Zenodo form) and
the 2007 competition's ellipses, rasterised once into mask PNGs under
``cache_root()/dagm_masks``. Reached through
:func:`anomalib_study.data.readers.load_dataset`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import atomic_write, cache_root, sha256_bytes

from .decode import ellipse_mask, is_image_file
from .layout_common import require_dir, require_images, subdirs
from .records import ANOMALOUS, NORMAL, Dataset, ImageRecord
from .synthetic import SYNTHETIC_STAMP

__all__ = ["read_dagm"]

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
    images = require_images(split_dir)
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
        class_dirs = [require_dir(root / category, " (a DAGM class folder)")]
    else:
        class_dirs = sorted(
            (p for p in subdirs(root) if _CLASS_RE.match(p.name)), key=lambda p: int(_CLASS_RE.match(p.name).group(1))
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
                alt = [p for p in subdirs(class_dir) if p.name.lower() == split.lower()]
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
