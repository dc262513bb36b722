"""Overlays: the flagged images of a detect run drawn with their anomaly maps.

Methods that give anomaly maps (PatchCore) make
:func:`~anomalib_study.detect.detect_abnormal` write ``overlays/``: one small JPEG per test
image flagged anomalous (the ``max_overlays`` highest-scoring ones if more are flagged),
named after the image's path relative to ``test_dir`` (``bad/red.png`` ->
``overlays/bad/red.jpg``; ``red_png.jpg`` when two images share a stem: :func:`overlay_names`),
showing the backbone's resized and centre-cropped input with the anomaly map blended on one
colour scale for the whole run (the minimum and maximum of all the run's maps, recorded in
``config.json``), plus ``overlays/overlays.csv`` (path, score, overlay): :func:`write_overlays`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomalib_study.io import atomic_write

__all__ = ["write_overlays", "overlay_names"]


def overlay_names(relatives: list[Path]) -> list[Path]:
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
        names = overlay_names([Path(path).relative_to(root) for path in paths])
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
