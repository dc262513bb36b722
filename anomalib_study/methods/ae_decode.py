"""Image files decoded for the autoencoders: each image squashed whole to S x S, uint8.

:func:`decode_images` decodes a list of files into one (n, 3, S, S) uint8 tensor (a fit
keeps it for all its epochs); :func:`iter_decoded` yields them batch by batch (scoring
holds at most one batch of decoded images), optionally skipping the undecodable ones.
Decoding is the package's own (:func:`~anomalib_study.data.decode.load_image`), run in the
feature layer's DataLoader dataset (:class:`~anomalib_study.features.ImageFiles`).
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.features import ImageFiles, collate_images

__all__ = ["decode_images", "iter_decoded", "check_paths", "tensor_sha256"]


def _squash(image, image_size: int) -> torch.Tensor:
    """A decoded RGB image resized whole to (3, S, S) uint8 (bilinear, antialiased)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_to_tensor, resize

    return pil_to_tensor(
        resize(image, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    )


def iter_decoded(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
    errors: dict[int, str] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(positions, (b, 3, S, S) uint8 batch) for the images at ``paths``, in order, one batch at a time
    (with ``num_workers`` processes, at most one more batch per worker is being decoded).

    An undecodable image raises its DataError, or with ``errors`` (a dict) is left out of
    its batch and recorded there (position -> reason)."""
    # the feature layer's decoding dataset and collate: errors carried as messages, batches of the readable
    loader = DataLoader(
        ImageFiles([Path(p) for p in paths], partial(_squash, image_size=int(image_size))),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        prefetch_factor=1 if num_workers else None,
    )
    with tqdm(total=len(paths), desc=desc, unit="image", disable=not progress, leave=False) as bar:
        for positions, batch, failed in loader:
            if failed:
                if errors is None:
                    raise DataError(failed[0][1])
                errors.update(failed)
            bar.update(len(positions) + len(failed))
            if positions:
                yield positions, batch


def decode_images(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Decode image files (:func:`~anomalib_study.data.decode.load_image`) and squash each to
    ``image_size`` x ``image_size`` (torchvision bilinear resize of the PIL image, antialiased):
    one (n, 3, S, S) uint8 tensor, filled batch by batch (no list of tensors).

    Raises the DataError of :func:`load_image` for a missing or undecodable file.
    """
    paths = check_paths(paths)
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    for positions, batch in iter_decoded(paths, image_size, batch_size, num_workers, progress, "decoding images"):
        out[positions] = batch
    return out


def check_paths(paths) -> list:
    if isinstance(paths, (str, os.PathLike)):
        raise ParameterError("paths must be a list of image paths, not a single path")
    paths = list(paths)
    if not paths:
        raise ParameterError("paths is empty: give at least one image file")
    return paths


def tensor_sha256(images: torch.Tensor) -> str:
    array = np.ascontiguousarray(images.cpu().numpy())
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()
