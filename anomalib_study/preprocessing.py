"""How an image becomes a backbone's input: the preprocessing dict, its transform, the resize modes.

A backbone's ``preprocessing`` is a JSON-able dict (part of feature cache keys) built by
:func:`make_preprocessing`; :func:`build_transform` turns it into the torchvision transform.
``resize_mode`` (:data:`RESIZE_MODES`) says how the image is brought to the input:
``"crop"``, ``"squash"`` (:func:`squash_preprocessing`) or ``"keep"``
(:func:`keep_preprocessing`, :func:`keep_size`, :class:`KeepResize`). :func:`input_size` gives
the input's shape for an image of a given size. torch is not imported here (torchvision
only inside the functions that build transforms).
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import ParameterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's own normalisation (clip/clip.py `_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------
# Resize modes and the "keep" geometry
# --------------------------------------------------------------------------------------
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


def check_keep_size(name: str, image_size: int, stride: int, layers: Sequence[str]) -> None:
    """Under "keep" the shorter side becomes ``image_size``: refuse one the feature grid does not tile."""
    if image_size % stride:
        lower = image_size - image_size % stride
        raise ParameterError(
            f"{name} with resize_mode='keep' needs image_size to be a multiple of {stride} (the stride of its patch "
            f"layers {', '.join(layers)}: the shorter side becomes image_size and the feature grid must tile it), got "
            f"{image_size}: use {lower} or {lower + stride}"
        )


# --------------------------------------------------------------------------------------
# The preprocessing dict and its transform
# --------------------------------------------------------------------------------------
def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[name]


def build_transform(preprocessing: dict):
    """The torchvision transform (PIL image -> normalised tensor) a ``preprocessing`` dict describes."""
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


def make_preprocessing(resize: int, crop: int, mean, std, interpolation: str) -> dict:
    """The JSON-able preprocessing dict of a backbone: resize the shorter side to ``resize``,
    centre-crop ``crop``, normalise with ``mean`` / ``std`` (part of feature cache keys)."""
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
