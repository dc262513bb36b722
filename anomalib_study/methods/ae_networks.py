"""The autoencoders' networks: (B, 3, S, S) images in [0, 1] -> reconstructions of the same shape.

* :class:`ConvAutoEncoder` (``model="conv"``): five Conv(4x4, stride 2)-BatchNorm-ReLU
  blocks down (channels 3 -> 64 -> 128 -> 256 -> 512 -> 512; at 128 px the bottleneck is
  512 x 4 x 4), five ConvTranspose(4x4, stride 2) blocks up (BatchNorm-ReLU except the
  last), then a sigmoid. ``image_size`` must be divisible by 32. All weights are trained
  from a seeded start.
* :class:`PretrainedAutoEncoder` (``model="pretrained"``): the encoder is a CNN from the
  backbone registry (:func:`anomalib_study.backbones.load_backbone`: EfficientNet-Lite or a
  torchvision ResNet, no ViT) cut into its four stages (:func:`cnn_stages`; strides
  4/8/16/32, read from the model). The stem and the first :data:`FROZEN_STAGES` stages keep
  their pretrained weights and BatchNorm statistics (frozen), the others are fine-tuned; a
  transposed-convolution decoder (one stride-2 block per halving) returns to the input
  size. The network normalises its [0, 1] input with the backbone's own mean/std before
  the encoder.

The estimator that trains them: :class:`anomalib_study.methods.autoencoder.AutoEncoder`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from anomalib_study.errors import ParameterError

__all__ = ["ConvAutoEncoder", "PretrainedAutoEncoder", "cnn_stages", "FROZEN_STAGES"]

FROZEN_STAGES = 2  # stem + stages 1-2 (strides 4 and 8) keep their pretrained weights


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


def cnn_stages(backbone) -> list[nn.Module]:
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

    ``stages``: the backbone's four stages (:func:`cnn_stages`); the first ``frozen`` keep
    their weights and BatchNorm statistics (they stay in eval mode even in ``train()``),
    the others are fine-tuned. ``channels`` / ``stride``: of the last stage's map, read from
    the backbone's ``feature_info``. The input is normalised with ``mean`` / ``std``.
    """

    def __init__(self, stages: Sequence[nn.Module], channels: int, stride: int, mean, std, frozen: int = FROZEN_STAGES):
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
