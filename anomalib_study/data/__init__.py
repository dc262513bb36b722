"""The data layer: records, robust decoding, one reader per layout, synthetic data, downloads."""

from .decode import content_hash, find_unreadable, image_files, load_image, load_mask
from .download import download
from .readers import LAYOUTS, load_dataset
from .records import ANOMALOUS, GOOD, NORMAL, Dataset, ImageRecord
from .synthetic import make_synthetic_dagm

__all__ = [
    "ANOMALOUS",
    "GOOD",
    "NORMAL",
    "Dataset",
    "ImageRecord",
    "LAYOUTS",
    "content_hash",
    "download",
    "find_unreadable",
    "image_files",
    "load_dataset",
    "load_image",
    "load_mask",
    "make_synthetic_dagm",
]
