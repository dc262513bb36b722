"""Reconstruction autoencoders: an image is anomalous where the network cannot redraw it.

An autoencoder is trained on normal images only, to reproduce its input through a narrow
bottleneck; at test time a defect, never seen in training, is reconstructed badly, so the
residual between the image and its reconstruction is large there. Inputs to the network
are RGB images in [0, 1] of side ``image_size`` (the whole image squashed to a square, no
crop); the output is a sigmoid, also in [0, 1].

Two networks (``model=``, :mod:`anomalib_study.methods.ae_networks`): ``"conv"``, a
convolutional autoencoder trained from a seeded start (``image_size`` divisible by 32), and
``"pretrained"``, a registry CNN (EfficientNet-Lite or a torchvision ResNet) as encoder, its
stem and first two stages frozen, the rest fine-tuned, with a transposed-convolution decoder.

Loss (``loss=``): ``"mse"``, or ``"mse_ssim"`` = (1 - a) * MSE + a * (1 - SSIM) with
a = ``ssim_weight``. Scores, all higher = more anomalous, computed together in one pass: the
smoothed residual map (``anomaly_maps``), the per-image mean squared error
(``image_score="mse"``) and the mean of the top 1 % of the residual map
(``image_score="residual"``, the default). Both: :mod:`anomalib_study.methods.ae_losses`.

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

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from anomalib_study.checks import open_fraction, positive_int
from anomalib_study.errors import ModelFileError, ParameterError, StudyError
from anomalib_study.hardware import PRECISIONS, native_bf16, resolve_precision
from anomalib_study.io import as_json
from anomalib_study.methods.ae_decode import check_paths, decode_images, iter_decoded
from anomalib_study.methods.ae_losses import (
    LOSSES,
    RESIDUAL_SIGMA,
    RESIDUAL_TOP_FRACTION,  # noqa: F401 (re-exported: importable from here as before)
    reconstruction_loss,
    reconstruction_scores,
    residual_maps,
)
from anomalib_study.methods.ae_networks import FROZEN_STAGES, ConvAutoEncoder, PretrainedAutoEncoder, cnn_stages
from anomalib_study.methods.ae_training import (  # noqa: F401 (re-exported)
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    LR_FACTOR,
    AutoEncoderTraining,
)
from anomalib_study.methods.base import (
    BaseDetector,
    Method,
    Param,
    RunOptions,
    check_bool,
    check_fraction,
    check_int,
    check_is_fitted,
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
IMAGE_SCORES = ("mse", "residual")
_CNN_FAMILIES = ("efficientnet", "torchvision_resnet")  # registry families the encoder can be cut from
_SIZE_MULTIPLE = 32  # five stride-2 steps
_FITTED = ["network_", "threshold_", "calibration_scores_", "precision_used_", "history_"]
_FIT_CALL = "fit(images) or fit_paths(paths)"


# ---------------------------------------------------------------------------------- the held-out split
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


# ---------------------------------------------------------------------------------- estimator
class AutoEncoder(AutoEncoderTraining, BaseDetector):
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
    seed = Param(
        0, "seed of the split, the initial weights and the shuffling", cli=int, flag="--model-seed", metavar="SEED"
    )
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
        """``value`` as a float in the interval low..high (open or closed ends); else ParameterError
        naming ``name``."""
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
            cnn_stages(backbone), channels, stride, backbone.preprocessing["mean"], backbone.preprocessing["std"]
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
        paths = check_paths(paths)
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
        paths = check_paths(paths)
        out = self._empty_scores(len(paths))
        for positions, batch in iter_decoded(
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


class AutoEncoderMethod(Method):
    """The reconstruction autoencoders as the study runs them: the backbone gives the encoder
    and the input size; the run its batch size, workers, device and progress bars."""

    name = "autoencoder"
    label = "Autoencoder"
    estimator = AutoEncoder
    description = "reconstruction autoencoder (convolutional, or with a pretrained encoder), MSE or MSE + SSIM loss"
    quick_params = {"epochs": 2, "val_fraction": 0.25}
    score_kinds = IMAGE_SCORES
    produces_maps = True
    min_images = 3
    resize_mode = "squash"
    image_size = 128

    def fit_paths(self, backbone, paths, params: dict, run: RunOptions) -> AutoEncoder:
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

    def score_paths(self, model: AutoEncoder, backbone, paths, run: RunOptions, errors: dict | None = None) -> dict:
        model.set_params(batch_size=run.batch_size, num_workers=run.num_workers, progress=run.progress)
        return model.score_paths(list(paths), errors=errors)

    def describe(self, model: AutoEncoder) -> dict:
        identity = model.backbone_identity_
        encoder = (
            f"{identity['name']} (stem and stages 1-{FROZEN_STAGES} frozen, the rest fine-tuned)"
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

    def check_loaded(self, model: AutoEncoder, section: dict, n_images: int) -> str | None:
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

    def n_images(self, model):
        return int(model.n_train_images_ + model.n_val_images_)

    def calibration_scores(self, model):
        return model.calibration_scores_[model.image_score]

    def uses_backbone_weights(self, params):
        return params["model"] == "pretrained"


SPEC = AutoEncoderMethod()
