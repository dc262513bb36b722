"""What every layout reader shares: folder listing, layout errors, the seeded split.

The readers (:mod:`.mvtec_layouts`, :mod:`.dagm_layout`, :mod:`.industrial_layouts`) and
:mod:`.readers` (the ``LAYOUTS`` registry, ``load_dataset``) import these; this module
imports none of them.

Seeded splits: the units to split are sorted, permuted with
``numpy.random.default_rng(seed).permutation``, and the first ``round(train_fraction * n)``
go to training; the rest are test (:func:`seeded_split`, described by :func:`split_note`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from anomalib_study.errors import DataError, ParameterError

from .decode import image_files

__all__ = [
    "folder_images",
    "subdirs",
    "require_dir",
    "require_images",
    "check_split_options",
    "seeded_split",
    "split_note",
    "category_root",
]


def folder_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (case-insensitive suffixes), sorted by path."""
    return image_files(folder, recursive=recursive)


def subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def require_dir(folder: Path, hint: str = "") -> Path:
    if not folder.is_dir():
        raise DataError(
            f"expected the folder {folder}{hint}, but it does not exist: is this the right layout and root?"
        )
    return folder


def require_images(folder: Path, recursive: bool = False) -> list[Path]:
    require_dir(folder)
    found = folder_images(folder, recursive)
    if not found:
        raise DataError(
            f"{folder} holds no image ({', '.join(e for e in ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff'))})"
        )
    return found


def check_split_options(seed: int, train_fraction: float) -> None:
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
    check_split_options(seed, train_fraction)
    ordered = sorted(items)
    order = np.random.default_rng(int(seed)).permutation(len(ordered))
    n_train = int(round(float(train_fraction) * len(ordered)))
    train = sorted(ordered[i] for i in order[:n_train])
    test = sorted(ordered[i] for i in order[n_train:])
    return train, test


def split_note(unit: str, seed: int, train_fraction: float) -> str:
    return (
        f"seeded split of the normal {unit}: sorted, numpy default_rng({seed}).permutation, first "
        f"round({train_fraction} * n) train, rest test; anomalous images are all test"
    )


def category_root(root: Path, category: str | None, layout: str, marker: str) -> tuple[Path, str]:
    """The folder of one category: ``root/category``, or ``root`` itself if it holds ``marker``."""
    if category is not None:
        folder = root / category
        if not folder.is_dir():
            found = [p.name for p in subdirs(root) if (p / marker).is_dir()]
            raise DataError(
                f"{layout}: category folder {folder} does not exist"
                + (f"; categories found in {root}: {', '.join(found)}" if found else "")
            )
        return folder, category
    if (root / marker).is_dir():
        return root, root.name
    found = [p.name for p in subdirs(root) if (p / marker).is_dir()]
    if found:
        raise DataError(f"{layout}: {root} holds several categories ({', '.join(found)}): pass category=<one of them>")
    example = f", e.g. {subdirs(root)[0] / marker}" if subdirs(root) else ""
    raise DataError(
        f"{layout}: expected {root}/<category>/{marker}{example} (or {root}/{marker} for a single category), "
        "found neither"
    )
