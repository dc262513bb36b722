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

The readers live in one module per family of layouts (:mod:`.mvtec_layouts`,
:mod:`.dagm_layout`, :mod:`.industrial_layouts`) and share :mod:`.layout_common`; this
module holds the registry and the entry point, and re-exports their public names.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

from anomalib_study.errors import DataError, ParameterError

from .dagm_layout import read_dagm
from .industrial_layouts import read_folder, read_kolektorsdd, read_magnetic_tile, read_neu_det, read_ood
from .layout_common import (
    category_root,
    check_split_options,
    folder_images,
    require_dir,
    require_images,
    seeded_split,
    split_note,
    subdirs,
)
from .mvtec_layouts import read_mvtec_3d, read_mvtec_ad, read_mvtec_loco
from .records import Dataset

__all__ = [
    "LAYOUTS",
    "load_dataset",
    "read_mvtec_ad",
    "read_mvtec_loco",
    "read_mvtec_3d",
    "read_dagm",
    "read_magnetic_tile",
    "read_kolektorsdd",
    "read_neu_det",
    "read_folder",
    "read_ood",
    "seeded_split",
    "check_split_options",
    "split_note",
    "category_root",
    "folder_images",
    "subdirs",
    "require_dir",
    "require_images",
]

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
