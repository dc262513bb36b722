"""Anomaly maps from patch scores, shared by the methods that score patches.

:func:`anomaly_maps` turns patch scores on their grid into smoothed maps at an image size
(bilinear upsampling, then a Gaussian blur as in PatchCore: sigma 4 px, kernel side
:func:`~anomalib_study.methods.base.gaussian_kernel_size`); :func:`place_rows` writes rows
of results into a preallocated array (or a 1-D object array of per-image arrays).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from anomalib_study.errors import ParameterError
from anomalib_study.methods.base import gaussian_kernel_size

__all__ = ["anomaly_maps", "place_rows"]


def anomaly_maps(
    patch_scores, size: tuple[int, int], sigma: float = 4.0, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Patch scores on their grid -> smoothed anomaly maps at ``size``.

    Args:
        patch_scores: (n, h, w) patch scores (higher = more anomalous).
        size: output (H, W), e.g. the backbone's preprocessed input side.
        sigma: Gaussian sigma in output pixels (0 = no smoothing).
        device: where the upsampling and blur run.

    Returns:
        (n, H, W) float32 maps, bilinear upsampling (align_corners=False) then a Gaussian
        blur of side :func:`gaussian_kernel_size` with reflect padding. Higher = more anomalous.
    """
    from torchvision.transforms.functional import gaussian_blur

    scores = torch.as_tensor(np.asarray(patch_scores, dtype=np.float32), device=device)
    if scores.ndim != 3:
        raise ParameterError(f"patch_scores must be (n, h, w), got shape {tuple(scores.shape)}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma < 0:
        raise ParameterError(f"sigma must be a number >= 0, got {sigma!r}")
    height, width = int(size[0]), int(size[1])
    maps = F.interpolate(scores[:, None], size=(height, width), mode="bilinear", align_corners=False)
    if sigma > 0:
        side = gaussian_kernel_size(sigma)
        if side // 2 >= min(height, width):  # reflect padding needs pad < size
            raise ParameterError(f"sigma={sigma} is too large for {height}x{width} maps (kernel {side} px)")
        maps = gaussian_blur(maps, kernel_size=[side, side], sigma=[float(sigma), float(sigma)])
    return maps[:, 0].cpu().numpy()


def place_rows(target: np.ndarray, positions: list[int], values: np.ndarray) -> None:
    """``target[positions] = values``; for a 1-D object array (per-image shapes), one array per slot."""
    if target.dtype == object:
        for position, value in zip(positions, values):
            target[position] = value
    else:
        target[positions] = values
