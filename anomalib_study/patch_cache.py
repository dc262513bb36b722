"""Patch features stored once per image list and extraction setting, shared by every cell that needs them.

A PatchCore coreset or resolution ablation cell, or a second method on the same inputs,
reads the patch features another cell extracted instead of running the backbone again.
An entry is keyed by what determines the features bit for bit:

* the backbone (name, weights sha256, preprocessing: input size and resize mode), the
  layers, the patch parameters (``patch_size``, ``per_layer_dim``, ``target_dim``), the
  forward precision and the device type;
* the code that computes them (:data:`anomalib_study.patches.PATCH_CODE`: the modules
  :data:`anomalib_study.features.EXTRACTION_MODULES` and
  :data:`anomalib_study.patches.PATCH_MODULES`, and the versions of torch, torchvision,
  timm, Pillow and numpy, taken when the module is imported: an edit to decoding,
  preprocessing, a backbone or the patch maker, or an upgrade, makes every entry a miss,
  never a stale hit);
* the ordered sha256 of the image files' bytes (:meth:`FeatureCache.content_hashes`: a
  changed file is a miss) and the batch size, since a batch's composition is part of how
  the features were computed (float kernels may sum differently for another batch).

So a hit returns exactly the batches a fresh extraction would (same positions, grids,
input sizes, unreadable images), and figures are the same with or without the cache.

Layout (``<cache_root()>/patches/``)::

    <key>/entry.json        what the key stands for, the batches, the unreadable images
    <key>/batch_00000.npz   positions, features (B, h*w, D) float32, grid, input size

An entry is written into a temporary folder beside it and renamed when complete: a crash,
a full disk or a second process never leaves half an entry (a failed write is a warning;
the run goes on without storing). Entries beyond ``ANOMALIB_STUDY_PATCH_CACHE_GB``
(default 40; 0 turns the cache off) are removed, least recently used first.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from anomalib_study.io import cache_root, sha256_bytes, write_json

__all__ = ["PatchCache", "PatchBatch", "DEFAULT_LIMIT_GB"]

CACHE_FORMAT = 1
DEFAULT_LIMIT_GB = 40.0
_ENTRY = "entry.json"


class PatchBatch(NamedTuple):
    """One batch of patch features: positions in the path list, (B, h*w, D) float32 numpy
    features, the patch grid (h, w) and the input size (H, W)."""

    positions: list[int]
    features: np.ndarray
    grid: tuple[int, int]
    input_size: tuple[int, int]


def limit_bytes() -> int:
    """The cache's size limit from ``ANOMALIB_STUDY_PATCH_CACHE_GB`` (default 40 GB; 0: off)."""
    value = os.environ.get("ANOMALIB_STUDY_PATCH_CACHE_GB", "")
    try:
        gigabytes = float(value) if value.strip() else DEFAULT_LIMIT_GB
    except ValueError:
        warnings.warn(
            f"ANOMALIB_STUDY_PATCH_CACHE_GB={value!r} is not a number of gigabytes: using {DEFAULT_LIMIT_GB:g}",
            stacklevel=2,
        )
        gigabytes = DEFAULT_LIMIT_GB
    return max(0, int(gigabytes * 2**30))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


class PatchCache:
    """Patch features on disk, one entry per (image list, extraction setting): see the module docstring."""

    def __init__(self, root: str | os.PathLike | None = None, limit: int | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_root() / "patches"
        self.limit = limit_bytes() if limit is None else int(limit)

    def __repr__(self) -> str:
        return f"PatchCache(root={str(self.root)!r}, limit={self.limit})"

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    @staticmethod
    def key(fields: dict[str, Any], hashes: Sequence[str]) -> tuple[str, dict]:
        """(key, what it stands for) of an extraction ``fields`` over images with content ``hashes``."""
        described = {"format": CACHE_FORMAT, **fields, "images": len(hashes)}
        digest = sha256_bytes(json.dumps({**described, "hashes": list(hashes)}, sort_keys=True).encode())
        return digest, described

    def read(self, key: str, errors: dict[int, str] | None = None) -> Iterator[PatchBatch] | None:
        """The stored batches of ``key`` (None: no complete entry), recording its unreadable
        images into ``errors`` as a fresh extraction would."""
        folder = self.root / key
        try:
            entry = json.loads((folder / _ENTRY).read_text())
            os.utime(folder / _ENTRY)  # least recently used: this one was just used
        except (OSError, ValueError):
            return None
        if errors is not None:
            errors.update({int(k): v for k, v in entry.get("errors", {}).items()})
        return self._batches(folder, int(entry["batches"]))

    @staticmethod
    def _batches(folder: Path, count: int) -> Iterator[PatchBatch]:
        for i in range(count):
            with np.load(folder / f"batch_{i:05d}.npz") as stored:
                yield PatchBatch(
                    stored["positions"].tolist(),
                    stored["features"],
                    tuple(int(v) for v in stored["grid"]),
                    tuple(int(v) for v in stored["input_size"]),
                )

    def write_through(
        self, key: str, described: dict, batches: Iterable[PatchBatch], errors: dict[int, str] | None
    ) -> Iterator[PatchBatch]:
        """Yield ``batches`` unchanged while storing them; the entry appears when the last one
        has been stored (never if the iteration stops early or a write fails)."""
        temporary = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        stored = 0
        writing = True
        try:
            temporary.mkdir(parents=True)
        except OSError as error:
            writing = self._failed(error)
        complete = False
        try:
            for batch in batches:
                if writing:
                    try:
                        np.savez(
                            temporary / f"batch_{stored:05d}.npz",
                            positions=np.asarray(batch.positions, dtype=np.int64),
                            features=batch.features,
                            grid=np.asarray(batch.grid, dtype=np.int64),
                            input_size=np.asarray(batch.input_size, dtype=np.int64),
                        )
                        stored += 1
                    except OSError as error:
                        writing = self._failed(error)
                yield batch
            complete = True
        finally:
            if writing and complete:
                self._finish(temporary, key, described, stored, errors)
            shutil.rmtree(temporary, ignore_errors=True)

    def _finish(self, temporary: Path, key: str, described: dict, count: int, errors: dict[int, str] | None) -> None:
        try:
            write_json(temporary / _ENTRY, {**described, "batches": count, "errors": dict(errors or {})})
            os.rename(temporary, self.root / key)  # whole or not at all; a second process's entry wins
        except OSError as error:
            if not (self.root / key / _ENTRY).is_file():
                self._failed(error)
            return
        self.evict(keep=key)

    def _failed(self, error: OSError) -> bool:
        warnings.warn(
            f"patch-feature cache: could not write to {self.root} ({error}); the run goes on without storing "
            "these features (free some space there, set ANOMALIB_STUDY_CACHE to another folder, or "
            "ANOMALIB_STUDY_PATCH_CACHE_GB=0 to turn this cache off)",
            stacklevel=4,
        )
        return False

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used entries until the cache is within its limit; returns their keys."""
        try:
            entries = [f for f in self.root.iterdir() if f.is_dir() and (f / _ENTRY).is_file()]
        except OSError:
            return []
        sizes = {f: _folder_bytes(f) for f in entries}
        total = sum(sizes.values())
        removed = []
        for folder in sorted(entries, key=lambda f: (f / _ENTRY).stat().st_mtime):
            if total <= self.limit:
                break
            if folder.name == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
            removed.append(folder.name)
        return removed
