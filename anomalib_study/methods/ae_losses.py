"""The autoencoders' training loss and reconstruction scores (pure functions of tensors).

Loss (:func:`reconstruction_loss`, ``loss=``): ``"mse"``, or ``"mse_ssim"`` =
(1 - a) * MSE + a * (1 - SSIM) with a = ``ssim_weight`` and SSIM from
:func:`pytorch_msssim.ssim` (data_range 1, 11 px Gaussian window, mean over the batch).

Scores (:func:`reconstruction_scores`), all higher = more anomalous, always computed
together in one pass:

* residual map (:func:`residual_maps`): per pixel the squared error averaged over the three
  channels, smoothed by a Gaussian of sigma 4 px (kernel side 33, reflect padding, as
  PatchCore's maps): ``anomaly_maps`` (n, S, S).
* ``"mse"``: the per-image mean squared reconstruction error (the usual autoencoder
  baseline score);
* ``"residual"`` (the default ``image_score``, our change): the mean of the top 1 % values
  of the smoothed residual map. A small defect barely moves the mean over the whole image
  but dominates its own neighbourhood; smoothing first keeps isolated noisy pixels (edges,
  texture the network blurs everywhere) from deciding the score.
"""

from __future__ import annotations

import math

import torch

from anomalib_study.errors import ParameterError
from anomalib_study.methods.base import gaussian_kernel_size

__all__ = [
    "reconstruction_loss",
    "residual_maps",
    "reconstruction_scores",
    "LOSSES",
    "RESIDUAL_SIGMA",
    "RESIDUAL_TOP_FRACTION",
]

LOSSES = ("mse", "mse_ssim")
RESIDUAL_SIGMA = 4.0  # Gaussian sigma (px) of the residual maps
RESIDUAL_TOP_FRACTION = 0.01  # the "residual" image score averages this share of the map's highest pixels


def reconstruction_loss(
    reconstructions: torch.Tensor, images: torch.Tensor, loss: str = "mse_ssim", ssim_weight: float = 0.5
) -> torch.Tensor:
    """Scalar training loss of (B, 3, S, S) reconstructions against images, both in [0, 1].

    ``"mse"``: mean squared error; ``"mse_ssim"``: (1 - a) * MSE + a * (1 - SSIM),
    a = ``ssim_weight``, SSIM = :func:`pytorch_msssim.ssim` (data_range=1, batch mean).
    Computed in float32 whatever the autocast dtype of the network.
    """
    reconstructions, images = reconstructions.float(), images.float()
    mse = torch.mean((reconstructions - images) ** 2)
    if loss == "mse":
        return mse
    if loss != "mse_ssim":
        raise ParameterError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    from pytorch_msssim import ssim

    similarity = ssim(reconstructions, images, data_range=1.0, size_average=True)
    return (1.0 - ssim_weight) * mse + ssim_weight * (1.0 - similarity)


def residual_maps(images: torch.Tensor, reconstructions: torch.Tensor, sigma: float = RESIDUAL_SIGMA) -> torch.Tensor:
    """(n, 3, S, S) images and reconstructions in [0, 1] -> (n, S, S) float32 smoothed residual maps.

    Per pixel the squared error averaged over the channels, then a Gaussian blur of
    ``sigma`` px (side :func:`~anomalib_study.methods.base.gaussian_kernel_size`,
    reflect padding; 0 = none). Higher = more anomalous.
    """
    from torchvision.transforms.functional import gaussian_blur

    residual = ((reconstructions.float() - images.float()) ** 2).mean(dim=1, keepdim=True)
    if sigma > 0:
        side = gaussian_kernel_size(sigma)
        if side // 2 >= min(residual.shape[-2:]):  # reflect padding needs pad < size
            raise ParameterError(f"sigma={sigma} is too large for {tuple(residual.shape[-2:])} maps (kernel {side} px)")
        residual = gaussian_blur(residual, kernel_size=[side, side], sigma=[float(sigma), float(sigma)])
    return residual[:, 0]


def reconstruction_scores(images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both image scores and the maps of one batch (n, 3, S, S), higher = more anomalous.

    Returns ``{"mse": (n,), "residual": (n,), "maps": (n, S, S)}`` float32 tensors:
    mean squared error over the image, mean of the top :data:`RESIDUAL_TOP_FRACTION` of
    the :func:`residual_maps` values (at least one pixel), and those maps.
    """
    images, reconstructions = images.float(), reconstructions.float()
    mse = ((reconstructions - images) ** 2).mean(dim=(1, 2, 3))
    maps = residual_maps(images, reconstructions)
    flat = maps.flatten(1)
    k = max(1, math.ceil(RESIDUAL_TOP_FRACTION * flat.shape[1]))
    return {"mse": mse, "residual": flat.topk(k, dim=1).values.mean(dim=1), "maps": maps}
