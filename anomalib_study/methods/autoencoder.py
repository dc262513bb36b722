"""Reconstruction autoencoders: an image is anomalous where the network cannot redraw it.

An autoencoder is trained on normal images only, to reproduce its input through a narrow
bottleneck; at test time a defect, never seen in training, is reconstructed badly, so the
residual between the image and its reconstruction is large there. Inputs to the network
are RGB images in [0, 1] of side ``image_size`` (the whole image squashed to a square, no
crop); the output is a sigmoid, also in [0, 1].

Two networks (``model=``):

* ``"conv"``: five Conv(4x4, stride 2)-BatchNorm-ReLU blocks down (channels
  3 -> 64 -> 128 -> 256 -> 512 -> 512; at 128 px the bottleneck is 512 x 4 x 4), five
  ConvTranspose(4x4, stride 2) blocks up (BatchNorm-ReLU except the last), then a sigmoid.
  ``image_size`` must be divisible by 32. All weights are trained from a seeded start.
* ``"pretrained"``: the encoder is a CNN from the backbone registry
  (:func:`anomalib_study.backbones.load_backbone`: EfficientNet-Lite or a torchvision
  ResNet, no ViT) cut into its four stages (strides 4/8/16/32, read from the model). The
  stem and the first two stages keep their pretrained weights and BatchNorm statistics
  (frozen), the last two are fine-tuned; a transposed-convolution decoder (one stride-2
  block per halving) returns to the input size. The network normalises its [0, 1] input
  with the backbone's own mean/std before the encoder.

Loss (``loss=``): ``"mse"``, or ``"mse_ssim"`` = (1 - a) * MSE + a * (1 - SSIM) with
a = ``ssim_weight`` and SSIM from :func:`pytorch_msssim.ssim` (data_range 1, 11 px Gaussian
window, mean over the batch).

Scores, all higher = more anomalous, always computed together in one pass:

* residual map: per pixel the squared error averaged over the three channels, smoothed by
  a Gaussian of sigma 4 px (kernel side 33, reflect padding, as PatchCore's maps):
  ``anomaly_maps`` (n, S, S).
* ``image_score="mse"``: the per-image mean squared reconstruction error (the usual
  autoencoder baseline score);
* ``image_score="residual"`` (default, our change): the mean of the top 1 % values of the
  smoothed residual map. A small defect barely moves the mean over the whole image but
  dominates its own neighbourhood; smoothing first keeps isolated noisy pixels (edges,
  texture the network blurs everywhere) from deciding the score.

Training: a seeded ``val_fraction`` of the normal images (at least one) is held out. It
drives ReduceLROnPlateau (factor 0.5, patience ``patience // 2``) and early stopping (stop
after ``patience`` epochs without a lower validation loss; the best epoch's weights are
restored), and afterwards it calibrates the decision threshold: ``threshold_`` is the
``thres_ratio`` quantile of the held-out images' scores of the kind ``image_score``
(so about ``1 - thres_ratio`` of normal images are flagged). Images are decoded once per
fit (:func:`decode_images`) and kept as one uint8 tensor; shuffling uses a seeded
``torch.Generator``, so the same seed gives identical weights and scores on the CPU.

Checkpoints (``checkpoint_dir=``): after every epoch ``<checkpoint_dir>/checkpoint.pt`` is
replaced atomically with the model, optimizer, scheduler and early-stopping state (the best
weights included), the RNG states (shuffling generator and global torch RNG) and the
history. A later fit with the same parameters and the same decoded images resumes from
it, and an interrupted run that is resumed ends with bit-identical weights and scores to
an uninterrupted one (CPU, same thread count). ``epochs``, ``progress``, ``num_workers``,
``checkpoint_dir``, ``image_score`` and ``thres_ratio`` may differ on resume (they do not
change the training trajectory: more epochs extend a run); any other parameter, or other
images, and the checkpoint is refused with ModelFileError (delete the folder or pass
another ``checkpoint_dir``). The checkpoint is kept after the fit.

Precision (``precision=``): ``"fp32"``; ``"bf16"`` (bfloat16 autocast for the network,
losses and scores in float32); ``"auto"`` = bf16 where the hardware has native bfloat16
(CPU flags ``avx512_bf16`` / ``amx_bf16`` / ARM ``bf16``; CUDA
``torch.cuda.is_bf16_supported()``), else fp32. Scoring uses the precision of training
(``precision_used_``).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anomalib_study.checks import open_fraction, positive_int
from anomalib_study.errors import DataError, ModelFileError, ParameterError, StudyError
from anomalib_study.features import ImageFiles, collate_images
from anomalib_study.hardware import PRECISIONS, native_bf16, resolve_precision
from anomalib_study.io import as_json, atomic_write
from anomalib_study.methods.base import (
    BaseDetector,
    MethodSpec,
    Param,
    RunOptions,
    check_bool,
    check_fraction,
    check_int,
    check_is_fitted,
    gaussian_kernel_size,
    load_model_file,
    save_model_file,
)

__all__ = [
    "AutoEncoder",
    "ConvAutoEncoder",
    "PretrainedAutoEncoder",
    "decode_images",
    "split_validation",
    "reconstruction_loss",
    "residual_maps",
    "reconstruction_scores",
    "native_bf16",
    "resolve_precision",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODELS",
    "LOSSES",
    "IMAGE_SCORES",
    "PRECISIONS",
    "SPEC",
]

FORMAT_NAME = "anomalib_study.autoencoder"
FORMAT_VERSION = 1
MODELS = ("conv", "pretrained")
LOSSES = ("mse", "mse_ssim")
IMAGE_SCORES = ("mse", "residual")
RESIDUAL_SIGMA = 4.0  # Gaussian sigma (px) of the residual maps
RESIDUAL_TOP_FRACTION = 0.01  # the "residual" image score averages this share of the map's highest pixels
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
LR_FACTOR = 0.5  # ReduceLROnPlateau factor
_CNN_FAMILIES = ("efficientnet", "torchvision_resnet")  # registry families the encoder can be cut from
_FROZEN_STAGES = 2  # stem + stages 1-2 (strides 4 and 8) keep their pretrained weights
_SIZE_MULTIPLE = 32  # five stride-2 steps
# parameters that may change between an interrupted fit and its resume: they do not touch the trajectory
_RESUME_FREE = ("epochs", "progress", "num_workers", "checkpoint_dir", "image_score", "thres_ratio")
_FITTED = ["network_", "threshold_", "calibration_scores_", "precision_used_", "history_"]
_FIT_CALL = "fit(images) or fit_paths(paths)"


# ---------------------------------------------------------------------------------- networks
class ConvAutoEncoder(nn.Module):
    """The plain convolutional autoencoder: (B, 3, S, S) in [0, 1] -> (B, 3, S, S) in (0, 1).

    Five Conv(4x4, stride 2, padding 1)-BatchNorm-ReLU blocks halve the side each
    (3 -> 64 -> 128 -> 256 -> 512 -> 512 channels, S -> S / 32), five mirrored
    ConvTranspose(4x4, stride 2, padding 1) blocks double it again (BatchNorm-ReLU except
    the last, which gives 3 channels), then a sigmoid. S must be divisible by 32.
    """

    channels = (3, 64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        c = self.channels
        self.encoder = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(c[i], c[i + 1], 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(c[i + 1]),
                    nn.ReLU(inplace=True),
                )
                for i in range(len(c) - 1)
            ]
        )
        up = list(reversed(c))
        blocks = []
        for i in range(len(up) - 1):
            last = i == len(up) - 2
            conv = nn.ConvTranspose2d(up[i], up[i + 1], 4, stride=2, padding=1, bias=last)
            blocks.append(conv if last else nn.Sequential(conv, nn.BatchNorm2d(up[i + 1]), nn.ReLU(inplace=True)))
        self.decoder = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))


def _decoder(in_channels: int, n_up: int) -> nn.Sequential:
    """``n_up`` ConvTranspose(4x4, stride 2) blocks: in_channels -> 256 -> 128 -> ... (>= 16) -> 3."""
    widths = [max(16, 256 >> i) for i in range(n_up - 1)] + [3]
    blocks, previous = [], in_channels
    for i, width in enumerate(widths):
        last = i == len(widths) - 1
        conv = nn.ConvTranspose2d(previous, width, 4, stride=2, padding=1, bias=last)
        blocks.append(conv if last else nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
        previous = width
    return nn.Sequential(*blocks)


def _cnn_stages(backbone) -> list[nn.Module]:
    """A registry CNN cut into its four stages (stem included in the first), as trainable modules.

    EfficientNet-Lite: the stage ends are the blocks named by timm's ``feature_info``
    entries 1..4 (the same ones the registry's ``stage1``..``stage4`` maps come from).
    ResNet: stem + layer1, layer2, layer3, layer4.
    """
    model = backbone.model
    if hasattr(model, "blocks") and hasattr(model, "conv_stem"):  # timm EfficientNet
        ends = [int(model.feature_info[i]["module"].split(".")[1]) for i in range(1, 5)]
        stages, start = [], 0
        for k, end in enumerate(ends):
            blocks = list(model.blocks[start : end + 1])
            stages.append(nn.Sequential(model.conv_stem, model.bn1, *blocks) if k == 0 else nn.Sequential(*blocks))
            start = end + 1
        return stages
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # torchvision ResNet (BatchNorm folded)
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
        return [stem, model.layer2, model.layer3, model.layer4]
    raise ParameterError(f"backbone {backbone.name!r}: cannot cut its network into stages (only CNN backbones)")


class PretrainedAutoEncoder(nn.Module):
    """A registry CNN as encoder, a transposed-convolution decoder: (B, 3, S, S) in [0, 1] -> same shape.

    ``stages``: the backbone's four stages (:func:`_cnn_stages`); the first ``frozen`` keep
    their weights and BatchNorm statistics (they stay in eval mode even in ``train()``),
    the others are fine-tuned. ``channels`` / ``stride``: of the last stage's map, read from
    the backbone's ``feature_info``. The input is normalised with ``mean`` / ``std``.
    """

    def __init__(
        self, stages: Sequence[nn.Module], channels: int, stride: int, mean, std, frozen: int = _FROZEN_STAGES
    ):
        super().__init__()
        n_up = int(round(math.log2(stride)))
        if 2**n_up != stride:
            raise ParameterError(f"the encoder's stride {stride} is not a power of two")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.frozen = nn.Sequential(*stages[:frozen]).requires_grad_(False)
        self.tuned = nn.Sequential(*stages[frozen:]).requires_grad_(True)
        self.decoder = _decoder(channels, n_up)

    def train(self, mode: bool = True) -> "PretrainedAutoEncoder":
        super().train(mode)
        self.frozen.eval()  # pretrained BatchNorm statistics must not drift towards the few normal images
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the last stage's map (B, C, S / stride, S / stride)."""
        with torch.no_grad():  # no gradient flows into the frozen stages: keep no activations for it
            h = self.frozen((x - self.mean) / self.std)
        return self.tuned(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encode(x)))


# ---------------------------------------------------------------------------------- pure parts
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


def split_validation(n_images: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices), both sorted int64: a seeded ``val_fraction`` share,
    at least one image and at least one left for training. Needs ``n_images >= 2``."""
    if n_images < 2:
        raise ParameterError(
            f"the autoencoder needs at least 2 normal images (one is held out for early stopping and the "
            f"threshold), got {n_images}"
        )
    count = min(n_images - 1, max(1, int(round(val_fraction * n_images))))
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(n_images, size=count, replace=False)).astype(np.int64)
    return np.setdiff1d(np.arange(n_images, dtype=np.int64), held), held


# ---------------------------------------------------------------------------------- decoding
def _squash(image, image_size: int) -> torch.Tensor:
    """A decoded RGB image resized whole to (3, S, S) uint8 (bilinear, antialiased)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import pil_to_tensor, resize

    return pil_to_tensor(
        resize(image, [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    )


def _iter_decoded(
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
    paths = _check_paths(paths)
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    for positions, batch in _iter_decoded(paths, image_size, batch_size, num_workers, progress, "decoding images"):
        out[positions] = batch
    return out


def _check_paths(paths) -> list:
    if isinstance(paths, (str, os.PathLike)):
        raise ParameterError("paths must be a list of image paths, not a single path")
    paths = list(paths)
    if not paths:
        raise ParameterError("paths is empty: give at least one image file")
    return paths


def _tensor_sha256(images: torch.Tensor) -> str:
    array = np.ascontiguousarray(images.cpu().numpy())
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


# ---------------------------------------------------------------------------------- estimator
class AutoEncoder(BaseDetector):
    """Reconstruction autoencoder anomaly detector (see the module docstring for the method).

    Attributes (after fit): ``network_`` (the trained nn.Module, eval mode), ``history_``
    (per epoch: epoch, train_loss, val_loss, lr, seconds), ``epochs_run_``, ``best_epoch_``
    (1-based, its weights are the ones kept), ``stopped_early_``, ``resumed_from_epoch_``
    (epochs read from a checkpoint, 0 = fresh), ``validation_indices_`` (held-out images),
    ``calibration_scores_`` ({"mse", "residual"}: (n_val,) float64), ``threshold_``,
    ``timings_`` (decode_s, train_s, seconds_per_epoch, images_per_s), ``precision_used_``,
    ``backbone_identity_`` (name, weights path and sha256; None for "conv"),
    ``n_train_images_`` / ``n_val_images_``.
    """

    model = Param(
        "conv",
        "autoencoder: conv (trained from scratch) or pretrained (the backbone as encoder)",
        cli=str,
        choices=MODELS,
    )
    backbone = Param(
        "efficientnet_lite0", "registry name of the encoder (model=pretrained only; CNNs only)", kind="input"
    )
    weights = Param(None, "explicit weights file for that backbone (e.g. a ResNet-18 .pth)", kind="input")
    loss = Param("mse_ssim", "training loss: mse or mse_ssim = (1 - a) MSE + a (1 - SSIM)", cli=str, choices=LOSSES)
    ssim_weight = Param(0.5, "a, the SSIM share of the mse_ssim loss, in [0, 1]", cli=float)
    image_size = Param(128, "side S of the square network input (images are squashed); divisible by 32", kind="input")
    epochs = Param(30, "most epochs (early stopping on held-out normal images)", cli=positive_int)
    lr = Param(1e-3, "Adam learning rate", cli=float)
    batch_size = Param(16, "images per training step and per scoring batch", kind="run")
    val_fraction = Param(0.1, "share of normal images held out (early stopping and threshold)", cli=open_fraction)
    patience = Param(
        5,
        "epochs without a lower validation loss before stopping (the learning rate halves after patience // 2 + 1)",
        cli=positive_int,
    )
    image_score = Param(
        "residual",
        "image score: residual (top 1 % of the smoothed residual map) or mse (mean "
        "squared error); what image_scores and threshold_ use",
        cli=str,
        choices=IMAGE_SCORES,
        flag="--score",
    )
    thres_ratio = Param(0.99, "share of held-out normal images the threshold keeps normal, in (0, 1]", cli=float)
    seed = Param(0, "seed of the split, the initial weights and the shuffling", cli=int, flag="--model-seed")
    precision = Param(
        "fp32", "fp32, bf16 (autocast) or auto (bf16 where the CPU/GPU has it natively)", cli=str, choices=PRECISIONS
    )
    device = Param("cpu", "cpu or cuda[:N]", kind="run")
    checkpoint_dir = Param(None, "folder of the per-epoch checkpoint a stopped run resumes from (None: none)", cli=str)
    num_workers = Param(0, "DataLoader processes decoding images", kind="run")
    progress = Param(True, "progress bars", kind="run")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_number(
        name: str, value: Any, low: float, high: float | None, low_open: bool, high_open: bool = False
    ) -> float:
        """``value`` as a float in the interval low..high (open or closed ends); else ParameterError naming ``name``."""
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ParameterError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ParameterError(f"{name} must be a finite number, got {value!r}")
        value = float(value)
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            upper = "inf" if high is None else high
            raise ParameterError(f"{name} must be in {left}{low}, {upper}{right}, got {value}")
        return value

    def _validate_params(self) -> None:
        from anomalib_study.backbones import BACKBONES, resolve_device

        self._check_declared()
        if self.model not in MODELS:
            raise ParameterError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.model == "pretrained":
            if self.backbone not in BACKBONES:
                raise ParameterError(
                    f"backbone must be a registered backbone name, got {self.backbone!r}; "
                    f"registered: {', '.join(BACKBONES)}"
                )
            family = BACKBONES[self.backbone].family
            if family not in _CNN_FAMILIES:
                kind = "a Vision Transformer" if family in ("timm_vit", "dinov2_onnx", "clip") else "not splittable"
                cnns = [name for name, spec in BACKBONES.items() if spec.family in _CNN_FAMILIES]
                raise ParameterError(
                    f"backbone {self.backbone!r} is {kind}: model='pretrained' supports only CNN "
                    f"backbones ({', '.join(cnns)})"
                )
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise ParameterError(f"weights must be a file path or None, got {self.weights!r}")
        if self.loss not in LOSSES:
            raise ParameterError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self._check_number("ssim_weight", self.ssim_weight, 0.0, 1.0, low_open=False)
        size = check_int("image_size", self.image_size)
        if size < _SIZE_MULTIPLE or size % _SIZE_MULTIPLE:
            raise ParameterError(
                f"image_size must be a positive multiple of {_SIZE_MULTIPLE} (five stride-2 steps), "
                f"got {size}: use e.g. {max(_SIZE_MULTIPLE, size // _SIZE_MULTIPLE * _SIZE_MULTIPLE)}"
            )
        check_int("epochs", self.epochs, minimum=1)
        self._check_number("lr", self.lr, 0.0, None, low_open=True)
        check_int("batch_size", self.batch_size, minimum=1)
        check_fraction("val_fraction", self.val_fraction)
        check_int("patience", self.patience, minimum=1)
        if self.image_score not in IMAGE_SCORES:
            raise ParameterError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, got {self.image_score!r}")
        self._check_number("thres_ratio", self.thres_ratio, 0.0, 1.0, low_open=True)
        check_int("seed", self.seed)
        if self.precision not in PRECISIONS:
            raise ParameterError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        resolve_device(self.device)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise ParameterError(f"checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}")
        check_int("num_workers", self.num_workers, minimum=0)
        check_bool("progress", self.progress)

    def _torch_device(self) -> torch.device:
        from anomalib_study.backbones import resolve_device

        return resolve_device(self.device)

    def _as_images(self, images, name: str = "images") -> torch.Tensor:
        """A CPU (n, 3, S, S) tensor: uint8 kept as is, anything else float32 checked to lie in [0, 1]."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise ParameterError(f"{name} must be a (n, 3, S, S) tensor or array, got {type(images).__name__}")
        images = images.detach().cpu()
        side = int(self.image_size)
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (side, side) or images.shape[0] == 0:
            raise ParameterError(
                f"{name} must be a non-empty (n, 3, {side}, {side}) batch (image_size={side}), "
                f"got shape {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            return images.contiguous()
        if images.dtype == torch.bool or images.is_complex():
            raise ParameterError(f"{name} must be uint8 (0..255) or float (0..1), got {images.dtype}")
        images = images.to(torch.float32).contiguous()
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ParameterError(
                f"{name} holds float values outside [0, 1] (or NaN): give uint8 0..255 or floats scaled to 0..1"
            )
        return images

    @staticmethod
    def _unit(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        batch = batch.to(device)
        return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()

    def _autocast(self, device: torch.device, precision: str):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    # ------------------------------------------------------------------ network
    def _build_network(self, device: torch.device, weights=None) -> tuple[nn.Module, dict | None]:
        """(network, backbone identity or None); the randomly initialised parts are seeded."""
        if self.model == "conv":
            torch.manual_seed(int(self.seed))
            return ConvAutoEncoder().to(device), None
        from anomalib_study.backbones import load_backbone

        backbone = load_backbone(
            self.backbone, weights=self.weights if weights is None else weights, image_size=int(self.image_size)
        )
        last = list(backbone.feature_info)[-1]
        channels, stride = backbone.feature_info[last]["channels"], backbone.feature_info[last]["stride"]
        if self.image_size % stride:
            raise ParameterError(
                f"image_size must be divisible by {backbone.name}'s stride {stride}, got {self.image_size}"
            )
        torch.manual_seed(int(self.seed))
        network = PretrainedAutoEncoder(
            _cnn_stages(backbone), channels, stride, backbone.preprocessing["mean"], backbone.preprocessing["std"]
        )
        network = network.to(device)
        identity = {
            "name": backbone.name,
            "weights_path": backbone.weights_path,
            "weights_sha256": backbone.weights_sha256,
        }
        return network, identity

    def _check_batchnorm(self, network: nn.Module, n_train: int, device: torch.device) -> None:
        # BatchNorm in training mode cannot normalise a single value per channel: a 1x1
        # bottleneck (image_size 32) needs at least 2 images in every training batch
        with torch.no_grad():
            network.eval()
            probe = network.encode if isinstance(network, PretrainedAutoEncoder) else network.encoder
            side = probe(torch.zeros(1, 3, self.image_size, self.image_size, device=device)).shape[-1]
        if side == 1 and (self.batch_size < 2 or n_train < 2):
            raise ParameterError(
                f"at image_size={self.image_size} the bottleneck is 1x1 and BatchNorm needs >= 2 "
                f"images per training batch: use batch_size >= 2 (got {self.batch_size}), at least "
                f"2 training images (got {n_train}) or a larger image_size"
            )

    # ------------------------------------------------------------------ fit
    def fit(self, images) -> "AutoEncoder":
        """Fit on decoded normal images (n, 3, S, S) with S = image_size: uint8 (0..255) or
        float (0..1) tensor or array. Returns self."""
        self._validate_params()
        return self._fit_images(self._as_images(images), decode_s=0.0)

    def fit_paths(self, paths: Sequence[str | os.PathLike]) -> "AutoEncoder":
        """Fit on normal image files: each decoded once (:func:`decode_images`), kept as one
        uint8 tensor for all epochs. Returns self. An undecodable file raises DataError."""
        self._validate_params()
        paths = _check_paths(paths)
        started = time.perf_counter()
        images = decode_images(
            paths, int(self.image_size), int(self.batch_size), int(self.num_workers), progress=bool(self.progress)
        )
        return self._fit_images(images, decode_s=time.perf_counter() - started)

    def _fit_images(self, images: torch.Tensor, decode_s: float) -> "AutoEncoder":
        for name in list(self.__dict__):  # a failed refit must not leave the previous model half-replaced
            if name.endswith("_") and not name.startswith("_"):
                del self.__dict__[name]
        device = self._torch_device()
        precision = resolve_precision(self.precision, device)
        train_idx, val_idx = split_validation(images.shape[0], float(self.val_fraction), int(self.seed))
        network, identity = self._build_network(device)
        self._check_batchnorm(network, train_idx.size, device)
        fingerprint = self._fingerprint(images, identity, precision)
        started = time.perf_counter()
        state = self._train(network, images, train_idx, val_idx, fingerprint, device, precision)
        train_s = time.perf_counter() - started
        if state["best_weights"] is None:  # every validation loss was NaN
            raise ParameterError(
                f"training diverged (validation loss {state['history'][-1]['val_loss']}): lower lr (got {self.lr})"
            )
        network.load_state_dict(state["best_weights"])
        network.eval()

        history = state["history"]
        self.network_ = network
        self.precision_used_ = precision
        self.backbone_identity_ = identity
        self.history_ = history
        self.epochs_run_ = len(history)
        self.best_epoch_ = int(state["best_epoch"])
        self.stopped_early_ = bool(state["stopped_early"])
        self.resumed_from_epoch_ = int(state["resumed_from_epoch"])
        self.validation_indices_ = val_idx
        self.n_train_images_ = int(train_idx.size)
        self.n_val_images_ = int(val_idx.size)
        total_s = sum(row["seconds"] for row in history)
        self.timings_ = {
            "decode_s": float(decode_s),
            "train_s": train_s,
            "seconds_per_epoch": total_s / len(history),
            "images_per_s": train_idx.size * len(history) / total_s if total_s > 0 else float("nan"),
        }
        scores = self._score_tensor(images[torch.from_numpy(val_idx)])
        self.calibration_scores_ = {"mse": scores["image_scores_mse"], "residual": scores["image_scores_residual"]}
        self.threshold_ = self._threshold()
        return self

    def _threshold(self) -> float:
        return float(np.quantile(self.calibration_scores_[self.image_score], float(self.thres_ratio)))

    def _batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """``order`` cut into batches of ``batch_size``; a last batch of one image joins the one
        before (BatchNorm needs two values per channel at a 1x1 bottleneck)."""
        chunks = list(torch.split(order, int(self.batch_size)))
        if len(chunks) > 1 and chunks[-1].numel() == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        return chunks

    def _validation_loss(
        self, network: nn.Module, images: torch.Tensor, val_idx: np.ndarray, device, precision: str
    ) -> float:
        """Mean loss over the held-out images (eval mode: BatchNorm running statistics)."""
        network.eval()
        total = 0.0
        with torch.no_grad():
            for chunk in torch.split(torch.from_numpy(val_idx), int(self.batch_size)):
                x = self._unit(images[chunk], device)
                with self._autocast(device, precision):
                    reconstructions = network(x)
                total += float(reconstruction_loss(reconstructions, x, self.loss, float(self.ssim_weight))) * len(chunk)
        return total / val_idx.size

    def _train(
        self,
        network: nn.Module,
        images: torch.Tensor,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        fingerprint: dict,
        device: torch.device,
        precision: str,
    ) -> dict:
        """The epoch loop with early stopping and checkpoints; returns the early-stopping state
        (best_weights, best_epoch, stopped_early, history, resumed_from_epoch, ...)."""
        optimizer = torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=float(self.lr))
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=LR_FACTOR, patience=int(self.patience) // 2
        )
        generator = torch.Generator().manual_seed(int(self.seed))
        state = {
            "epoch": 0,
            "best_val": math.inf,
            "best_epoch": 0,
            "bad_epochs": 0,
            "stopped_early": False,
            "best_weights": None,
            "history": [],
        }
        path = Path(self.checkpoint_dir) / CHECKPOINT_NAME if self.checkpoint_dir is not None else None
        if path is not None and path.is_file():
            checkpoint = self._read_checkpoint(path, fingerprint)
            network.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            generator.set_state(checkpoint["rng"]["generator"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
            state = {
                **checkpoint["early_stopping"],
                "epoch": int(checkpoint["epoch"]),
                "history": list(checkpoint["history"]),
            }
            if state["best_weights"] is None and state["best_epoch"] == state["epoch"]:
                state["best_weights"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
        resumed_from = state["epoch"]
        train_positions = torch.from_numpy(train_idx)
        bar = tqdm(
            total=int(self.epochs),
            initial=resumed_from,
            desc=f"AutoEncoder ({self.model})",
            unit="epoch",
            disable=not self.progress,
        )
        try:
            for epoch in range(state["epoch"] + 1, int(self.epochs) + 1):
                if state["stopped_early"]:
                    break
                started = time.perf_counter()
                lr = float(optimizer.param_groups[0]["lr"])
                network.train()
                total = 0.0
                order = train_positions[torch.randperm(train_positions.numel(), generator=generator)]
                for chunk in tqdm(
                    self._batches(order), desc=f"epoch {epoch}", unit="batch", leave=False, disable=not self.progress
                ):
                    x = self._unit(images[chunk], device)
                    with self._autocast(device, precision):
                        reconstructions = network(x)
                    loss = reconstruction_loss(reconstructions, x, self.loss, float(self.ssim_weight))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(chunk)
                train_loss = total / train_idx.size
                val_loss = self._validation_loss(network, images, val_idx, device, precision)
                scheduler.step(val_loss)
                if val_loss < state["best_val"]:
                    state.update(
                        best_val=val_loss,
                        best_epoch=epoch,
                        bad_epochs=0,
                        best_weights={k: v.detach().clone() for k, v in network.state_dict().items()},
                    )
                else:
                    state["bad_epochs"] += 1
                    state["stopped_early"] = state["bad_epochs"] >= int(self.patience)
                state["epoch"] = epoch
                state["history"].append(
                    {
                        "epoch": epoch,
                        "train_loss": train_loss,
                        "val_loss": val_loss,
                        "lr": lr,
                        "seconds": time.perf_counter() - started,
                    }
                )
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", lr=f"{lr:.1e}")
                bar.update(1)
                if path is not None:
                    self._write_checkpoint(path, fingerprint, network, optimizer, scheduler, generator, state)
        finally:
            bar.close()
        state["resumed_from_epoch"] = resumed_from
        return state

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self, images: torch.Tensor, identity: dict | None, precision: str) -> dict:
        """What a checkpoint must match: the trajectory-relevant parameters, the backbone
        weights and the sha256 of the decoded training images."""
        params = {k: v for k, v in self.get_params().items() if k not in _RESUME_FREE}
        return as_json(
            {
                "params": params,
                "precision_used": precision,
                "backbone_weights_sha256": None if identity is None else identity["weights_sha256"],
                "images_shape": list(images.shape),
                "images_dtype": str(images.dtype),
                "images_sha256": _tensor_sha256(images),
            }
        )

    @staticmethod
    def _write_checkpoint(path: Path, fingerprint: dict, network, optimizer, scheduler, generator, state) -> None:
        early_stopping = {
            key: state[key] for key in ("best_val", "best_epoch", "bad_epochs", "stopped_early", "best_weights")
        }
        if state["best_epoch"] == state["epoch"]:  # the best weights are the model's: do not write them twice
            early_stopping["best_weights"] = None
        payload = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "epoch": state["epoch"],
            "model": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "early_stopping": early_stopping,
            "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state()},
            "history": state["history"],
        }
        with atomic_write(path, "wb") as handle:  # a crash mid-save keeps the previous epoch's checkpoint
            torch.save(payload, handle)

    def _read_checkpoint(self, path: Path, fingerprint: dict) -> dict:
        advice = f"delete the folder {path.parent} or pass another checkpoint_dir"
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds for a corrupt or foreign file
            raise ModelFileError(f"checkpoint {path} cannot be read ({error}): {advice}") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ModelFileError(f"{path} is not an AutoEncoder checkpoint of format {CHECKPOINT_FORMAT}: {advice}")
        stored = checkpoint.get("fingerprint") or {}
        if stored != fingerprint:
            stored_params, params = stored.get("params", {}), fingerprint["params"]
            changed = sorted(k for k in set(stored_params) | set(params) if stored_params.get(k) != params.get(k))
            changed += [k for k in fingerprint if k != "params" and stored.get(k) != fingerprint[k]]
            raise ModelFileError(
                f"checkpoint {path} was made by a fit with other parameters or images (differs in: "
                f"{', '.join(changed)}): {advice}"
            )
        if int(checkpoint["epoch"]) > int(self.epochs):
            raise ModelFileError(
                f"checkpoint {path} has already run {checkpoint['epoch']} epochs, more than "
                f"epochs={self.epochs}: pass epochs >= {checkpoint['epoch']}, or {advice}"
            )
        return checkpoint

    # ------------------------------------------------------------------ scoring
    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 3, S, S) uint8/float batch -> (images in [0, 1], reconstructions) float32 on the device."""
        device = self._torch_device()
        x = self._unit(batch, device)
        with torch.inference_mode(), self._autocast(device, self.precision_used_):
            reconstructions = self.network_(x)
        return x, reconstructions.float()

    def _empty_scores(self, n: int) -> dict[str, np.ndarray]:
        side = int(self.image_size)
        return {
            "image_scores_mse": np.full(n, np.nan, dtype=np.float64),
            "image_scores_residual": np.full(n, np.nan, dtype=np.float64),
            "anomaly_maps": np.full((n, side, side), np.nan, dtype=np.float32),
        }

    def _fill_scores(self, out: dict, positions, batch: torch.Tensor) -> None:
        scores = reconstruction_scores(*self._forward(batch))
        out["image_scores_mse"][positions] = scores["mse"].cpu().numpy()
        out["image_scores_residual"][positions] = scores["residual"].cpu().numpy()
        out["anomaly_maps"][positions] = scores["maps"].cpu().numpy()

    def _finish_scores(self, out: dict) -> dict:
        out["image_scores"] = out[f"image_scores_{self.image_score}"]
        return out

    def _score_tensor(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        out = self._empty_scores(images.shape[0])
        for start in range(0, images.shape[0], int(self.batch_size)):
            stop = min(start + int(self.batch_size), images.shape[0])
            self._fill_scores(out, slice(start, stop), images[start:stop])
        return self._finish_scores(out)

    def score_images(self, images) -> dict[str, np.ndarray]:
        """Score decoded images (n, 3, S, S) (uint8 0..255 or float 0..1), in batches.

        Returns a dict: ``image_scores`` (n,) of the kind ``image_score``,
        ``image_scores_mse`` and ``image_scores_residual`` (n,) float64, ``anomaly_maps``
        (n, S, S) float32 smoothed residual maps. Higher = more anomalous everywhere.
        """
        check_is_fitted(self, _FITTED, fit_call=_FIT_CALL)
        return self._score_tensor(self._as_images(images))

    def score_paths(
        self, paths: Sequence[str | os.PathLike], errors: dict[int, str] | None = None
    ) -> dict[str, np.ndarray]:
        """Score image files, decoded and squashed to S x S batch by batch (at most one batch of
        decoded images in memory). Same dict as :meth:`score_images`; the maps cover the
        squashed image (resize them to an original file's size to overlay them).

        An undecodable file raises DataError; with ``errors`` (an empty dict) it is skipped
        instead: position -> reason is recorded there and its scores and map are NaN."""
        check_is_fitted(self, _FITTED, fit_call=_FIT_CALL)
        paths = _check_paths(paths)
        out = self._empty_scores(len(paths))
        for positions, batch in _iter_decoded(
            paths,
            int(self.image_size),
            int(self.batch_size),
            int(self.num_workers),
            bool(self.progress),
            "AutoEncoder scoring",
            errors,
        ):
            self._fill_scores(out, positions, batch)
        return self._finish_scores(out)

    def reconstruct(self, images) -> np.ndarray:
        """Reconstructions (n, 3, S, S) float32 in [0, 1] of decoded images (uint8 or float 0..1)."""
        check_is_fitted(self, _FITTED, fit_call=_FIT_CALL)
        images = self._as_images(images)
        out = np.empty(tuple(images.shape), dtype=np.float32)
        for start in range(0, images.shape[0], int(self.batch_size)):
            stop = min(start + int(self.batch_size), images.shape[0])
            out[start:stop] = self._forward(images[start:stop])[1].cpu().numpy()
        return out

    def predict_paths(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """(n,) int for image files: 1 = anomalous (image score > threshold_), 0 = normal."""
        check_is_fitted(self, _FITTED, fit_call=_FIT_CALL)
        return (self.score_paths(paths)["image_scores"] > self.threshold_).astype(int)

    # ------------------------------------------------------------------ save / load
    def _params_for_file(self) -> dict:
        params = self.get_params()
        for name in ("weights", "checkpoint_dir"):
            params[name] = None if params[name] is None else str(params[name])
        return as_json(params)

    def save(self, path: str | os.PathLike) -> Path:
        """Save the fitted model (weights, parameters, history, threshold, calibration scores,
        backbone identity) to one versioned ``.npz``, atomically. Returns the path."""
        check_is_fitted(self, _FITTED, fit_call=_FIT_CALL)
        state = self.network_.state_dict()
        metadata = {
            "params": self._params_for_file(),
            "state_keys": list(state),
            "history_": self.history_,
            "epochs_run_": self.epochs_run_,
            "best_epoch_": self.best_epoch_,
            "stopped_early_": self.stopped_early_,
            "resumed_from_epoch_": self.resumed_from_epoch_,
            "threshold_": self.threshold_,
            "timings_": self.timings_,
            "precision_used_": self.precision_used_,
            "backbone_identity_": self.backbone_identity_,
            "n_train_images_": self.n_train_images_,
            "n_val_images_": self.n_val_images_,
        }
        arrays = {f"state.{key}": value.detach().cpu().numpy() for key, value in state.items()}
        arrays["calibration_scores_mse"] = self.calibration_scores_["mse"]
        arrays["calibration_scores_residual"] = self.calibration_scores_["residual"]
        arrays["validation_indices_"] = self.validation_indices_
        return save_model_file(path, FORMAT_NAME, FORMAT_VERSION, metadata, arrays)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "cpu", weights: str | os.PathLike | None = None
    ) -> "AutoEncoder":
        """Load a model written by :meth:`save` onto ``device``.

        For ``model="pretrained"`` the backbone is built from the registry (``weights``,
        else the stored weights path if it still exists, else the registry's lookup) and
        its weights' sha256 must equal the stored one. A foreign, old, corrupt or
        inconsistent file, or other backbone weights -> ModelFileError naming ``path``.
        """
        header, arrays = load_model_file(
            path, FORMAT_NAME, FORMAT_VERSION, required=("calibration_scores_mse", "calibration_scores_residual")
        )
        try:
            params = dict(header["params"])
            params["device"] = device
            model = cls(**params)
            model._validate_params()
            identity = header["backbone_identity_"]
            keys = list(header["state_keys"])
        except (KeyError, TypeError, ValueError, StudyError) as error:
            raise ModelFileError(f"{path} has corrupt AutoEncoder metadata: {error}") from None
        if weights is None and model.weights is not None and not Path(model.weights).is_file():
            model.weights = None  # the file moved: find the same weights through the registry, checked below
        with torch.random.fork_rng(devices=[]):  # the seeded initial weights are overwritten: keep the caller's RNG
            network, found = model._build_network(model._torch_device(), weights=weights)
        if identity is not None and (found is None or found["weights_sha256"] != identity.get("weights_sha256")):
            raise ModelFileError(
                f"{path} was fitted with backbone {identity.get('name')!r} weights of sha256 "
                f"{str(identity.get('weights_sha256'))[:12]}..., but the weights found "
                f"({found and found['weights_path']}) have sha256 {str(found and found['weights_sha256'])[:12]}...: "
                "pass the same weights file (weights=) or fit a new model"
            )
        missing = [key for key in keys if f"state.{key}" not in arrays]
        if missing:
            raise ModelFileError(f"{path} is incomplete: weights {missing[:3]} are missing")
        try:
            network.load_state_dict({key: torch.from_numpy(np.array(arrays[f"state.{key}"])) for key in keys})
        except RuntimeError as error:
            raise ModelFileError(f"{path} holds weights that do not fit the {model.model!r} network: {error}") from None
        network.eval()
        model.network_ = network
        model.backbone_identity_ = identity
        model.precision_used_ = str(header.get("precision_used_", "fp32"))
        model.history_ = list(header.get("history_", []))
        model.epochs_run_ = int(header.get("epochs_run_", len(model.history_)))
        model.best_epoch_ = int(header.get("best_epoch_", 0))
        model.stopped_early_ = bool(header.get("stopped_early_", False))
        model.resumed_from_epoch_ = int(header.get("resumed_from_epoch_", 0))
        model.n_train_images_ = int(header.get("n_train_images_", 0))
        model.n_val_images_ = int(header.get("n_val_images_", 0))
        model.timings_ = dict(header.get("timings_") or {})
        model.validation_indices_ = np.asarray(arrays.get("validation_indices_", np.zeros(0)), dtype=np.int64)
        model.calibration_scores_ = {
            "mse": np.asarray(arrays["calibration_scores_mse"], dtype=np.float64),
            "residual": np.asarray(arrays["calibration_scores_residual"], dtype=np.float64),
        }
        model.threshold_ = float(header["threshold_"]) if header.get("threshold_") is not None else model._threshold()
        return model


# ---------------------------------------------------------------------------------- the method's declaration
# The backbone evaluate / detect load gives the encoder (model="pretrained": its name and
# weights file) and the input geometry (its image_size, the whole image squashed); the
# batch size, workers, device and progress bars are the run's. Everything else is declared.
def _fit_paths(backbone, paths, params: dict, run: RunOptions) -> AutoEncoder:
    return AutoEncoder(
        backbone=backbone.name,
        weights=backbone.weights_path,
        image_size=int(backbone.image_size),
        batch_size=run.batch_size,
        num_workers=run.num_workers,
        device=run.device,
        progress=run.progress,
        **params,
    ).fit_paths(list(paths))


def _score_paths(model: AutoEncoder, backbone, paths, run: RunOptions, errors: dict | None = None) -> dict:
    model.set_params(batch_size=run.batch_size, num_workers=run.num_workers, progress=run.progress)
    return model.score_paths(list(paths), errors=errors)


def _describe(model: AutoEncoder) -> dict:
    identity = model.backbone_identity_
    encoder = (
        f"{identity['name']} (stem and stages 1-{_FROZEN_STAGES} frozen, the rest fine-tuned)"
        if identity
        else "none: convolutional autoencoder trained from scratch"
    )
    return {
        **as_json(model.model_params()),
        "checkpoint_dir": None if model.checkpoint_dir is None else str(model.checkpoint_dir),
        "encoder": encoder,
        "image_size": int(model.image_size),
        "threshold": float(model.threshold_),
        "threshold_rule": (
            f"{model.thres_ratio} quantile of the {model.image_score} scores of the "
            f"{model.n_val_images_} normal images held out of training"
        ),
        "map_rule": (
            f"per-pixel squared reconstruction error (mean over RGB) on the squashed input, Gaussian "
            f"sigma {RESIDUAL_SIGMA:g}"
        ),
        "epochs_run": int(model.epochs_run_),
        "best_epoch": int(model.best_epoch_),
        "stopped_early": bool(model.stopped_early_),
        "resumed_from_epoch": int(model.resumed_from_epoch_),
        "precision_used": model.precision_used_,
        "n_train_images": int(model.n_train_images_),
        "n_val_images": int(model.n_val_images_),
        "history": as_json(model.history_),
        "fit_timings": as_json(model.timings_),
    }


def _check_loaded(model: AutoEncoder, section: dict, n_images: int) -> str | None:
    if (
        not np.isclose(model.threshold_, float(section["threshold"]))
        or model.n_train_images_ + model.n_val_images_ != n_images
        or model.model != section["model"]
    ):
        return (
            f"the model ({model.model}, threshold={model.threshold_:.6g}, "
            f"{model.n_train_images_ + model.n_val_images_} images) does not match its description "
            f"({section['model']}, threshold={float(section['threshold']):.6g}, {n_images} images)"
        )
    return None


SPEC = MethodSpec(
    name="autoencoder",
    label="Autoencoder",
    estimator=AutoEncoder,
    description="reconstruction autoencoder (convolutional, or with a pretrained encoder), MSE or MSE + SSIM loss",
    quick_params={"epochs": 2, "val_fraction": 0.25},
    fit_paths=_fit_paths,
    score_paths=_score_paths,
    describe=_describe,
    check_loaded=_check_loaded,
    n_images=lambda model: int(model.n_train_images_ + model.n_val_images_),
    score_kinds=IMAGE_SCORES,
    produces_maps=True,
    min_images=3,
    resize_mode="squash",
    image_size=128,
    calibration_scores=lambda model: model.calibration_scores_[model.image_score],
    uses_backbone_weights=lambda params: params["model"] == "pretrained",
)
