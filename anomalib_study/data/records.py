"""The one record type every image of every data set becomes, and the data set that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NORMAL = 0
ANOMALOUS = 1
GOOD = "good"  # the defect type of every normal image


@dataclass(frozen=True)
class ImageRecord:
    """One image of a data set.

    Attributes:
        path: the image file.
        split: ``"train"`` (normal images a method may fit on) or ``"test"``.
        label: ``0`` normal, ``1`` anomalous (defective or out-of-distribution).
        defect_type: ``"good"`` for normal images, else the defect (or source) name.
        mask_path: the ground-truth mask: a file, or a folder of per-defect masks
            (MVTec LOCO's official form) whose union is the mask; ``None`` where the data
            set has no mask for this image (a normal image's mask is all zeros).
        mask_threshold: a mask pixel counts as defective where its value is above this.
    """

    path: Path
    split: str
    label: int
    defect_type: str = GOOD
    mask_path: Path | None = None
    mask_threshold: int = 127

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r} for {self.path}")
        if self.label not in (NORMAL, ANOMALOUS):
            raise ValueError(f"label must be 0 (normal) or 1 (anomalous), got {self.label!r} for {self.path}")
        if self.split == "train" and self.label != NORMAL:
            raise ValueError(f"an anomalous image may never be in the training split: {self.path}")


@dataclass
class Dataset:
    """A data set read from disk: its training (normal) and test records.

    Attributes:
        name: short name used in reports, e.g. ``"mvtec_ad/bottle"``.
        layout: the reader that made it, e.g. ``"mvtec_ad"``.
        root: the folder it was read from.
        train, test: the records of each split.
        notes: what a reader of a report must know (partial data, synthetic, split rule).
        synthetic: True for generated data; every report says so.
    """

    name: str
    layout: str
    root: Path
    train: list[ImageRecord]
    test: list[ImageRecord]
    notes: list[str] = field(default_factory=list)
    synthetic: bool = False

    @property
    def has_masks(self) -> bool:
        """True if every anomalous test image has a mask (pixel metrics are possible)."""
        anomalous = [r for r in self.test if r.label == ANOMALOUS]
        return bool(anomalous) and all(r.mask_path is not None for r in anomalous)

    @property
    def defect_types(self) -> list[str]:
        return sorted({r.defect_type for r in self.test if r.label == ANOMALOUS})

    def summary(self) -> dict:
        """Counts per split and defect type, for reports."""
        counts: dict[str, int] = {}
        for r in self.test:
            counts[r.defect_type] = counts.get(r.defect_type, 0) + 1
        return {
            "name": self.name,
            "layout": self.layout,
            "root": str(self.root),
            "n_train": len(self.train),
            "n_test": len(self.test),
            "n_test_anomalous": sum(r.label for r in self.test),
            "test_counts": counts,
            "has_masks": self.has_masks,
            "synthetic": self.synthetic,
            "notes": list(self.notes),
        }
