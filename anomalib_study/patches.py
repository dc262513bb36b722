"""Locally aware patch features (PatchCore, Roth et al. 2022, Sec. 3.1), from backbone feature maps.

Each map (B, C_i, h_i, w_i) is averaged over a ``patch_size`` x ``patch_size``
neighbourhood (stride 1, zero padding ``patch_size // 2``, padded zeros counted as in
``torch.nn.Unfold`` + adaptive pooling of amazon-science/patchcore-inspection and
anomalib's ``AvgPool2d(3, 1, 1)``), the coarser maps are upsampled (bilinear) to the grid
of the finest one, each layer is optionally reduced to ``per_layer_dim`` channels by
adaptive average pooling over the channels, the layers are concatenated, and the result
is optionally pooled to ``target_dim`` channels.

The defaults (``per_layer_dim=None``, ``target_dim=None``) keep the native channels
(EfficientNet-Lite0 stage2 + stage3: 40 + 112 = 152): pooling small channel counts *up*
to the paper's 1024 only repeats values and inflates the memory bank.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.features import EXTRACTION_MODULES
from anomalib_study.freshness import code_version
from anomalib_study.patch_cache import PatchBatch as PatchBatch
from anomalib_study.patch_cache import PatchCache

__all__ = ["PatchFeatures", "PatchBatch", "patch_features", "iter_patch_features", "collect_patch_features"]

#: the modules beside :data:`anomalib_study.features.EXTRACTION_MODULES` whose code computes or
#: stores patch features: part of every patch cache key (a code edit makes the stored patches a miss)
PATCH_MODULES = ("patches.py", "patch_cache.py")
#: the code version of every module that computes or stores patch features, and of the feature
#: libraries, taken when this module is imported (see :data:`anomalib_study.features.EXTRACTION_CODE`)
PATCH_CODE = code_version(EXTRACTION_MODULES + PATCH_MODULES, libraries=True)


def _check_dim(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name} must be None (keep the native channels) or an integer >= 1, got {value!r}")
    return value


def _check_patch_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ParameterError(f"patch_size must be an odd integer >= 1 (1 = no neighbourhood averaging), got {value!r}")
    return value


def _pool_channels(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, dim, h, w) by adaptive average pooling over the channel axis."""
    b, c, h, w = x.shape
    if dim == c:
        return x
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
    return F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


def patch_features(
    maps: Sequence[torch.Tensor], patch_size: int = 3, per_layer_dim: int | None = None, target_dim: int | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embeddings from feature maps.

    Args:
        maps: the layers' maps, each (B, C_i, h_i, w_i), on any device; the first map with
            the largest grid sets the output grid.
        patch_size: odd neighbourhood side p (1 = no averaging).
        per_layer_dim: channels each layer is pooled to (None = native C_i).
        target_dim: channels of the final embedding (None = sum of the layers' channels).

    Returns:
        ``(features, (h, w))``: features (B, h * w, D) float32 on the maps' device, rows in
        row-major grid order (row ``i * w + j`` is grid cell (i, j)); D = target_dim, or
        the sum of the (pooled) layer channels.
    """
    patch_size = _check_patch_size(patch_size)
    per_layer_dim = _check_dim("per_layer_dim", per_layer_dim)
    target_dim = _check_dim("target_dim", target_dim)
    if isinstance(maps, torch.Tensor) or len(maps) == 0:
        raise ParameterError("maps must be a non-empty list of (B, C, h, w) tensors")
    for i, m in enumerate(maps):
        if not isinstance(m, torch.Tensor) or m.ndim != 4:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ParameterError(f"map {i} must be a (B, C, h, w) tensor, got {shape}")
        if m.shape[0] != maps[0].shape[0]:
            raise ParameterError(f"maps have different batch sizes: {[int(x.shape[0]) for x in maps]}")
    grid = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    layers = []
    for m in maps:
        # channels last: pooling, resizing and the final (h * w, D) rows without a transposing copy (~3x faster on CPU)
        m = m.float().contiguous(memory_format=torch.channels_last)
        if patch_size > 1:
            m = F.avg_pool2d(m, kernel_size=patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        if tuple(m.shape[-2:]) != grid:
            m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
        if per_layer_dim is not None:
            m = _pool_channels(m, per_layer_dim)
        layers.append(m)
    stacked = torch.cat(layers, dim=1) if len(layers) > 1 else layers[0]
    if target_dim is not None:
        stacked = _pool_channels(stacked, target_dim)
    b, d = stacked.shape[:2]
    features = stacked.permute(0, 2, 3, 1).reshape(b, grid[0] * grid[1], d).contiguous()
    return features, (int(grid[0]), int(grid[1]))


class PatchFeatures:
    """Callable form of :func:`patch_features` that also knows which backbone maps to take.

    Args:
        layers: map names of the backbone (None = ``backbone.patch_layers``, the two
            mid-level maps: stride 8 and 16 for CNNs, two blocks for ViTs).
        patch_size, per_layer_dim, target_dim: as in :func:`patch_features`.

    ``__call__(maps: dict name -> (B, C, h, w))`` -> ``(features (B, h*w, D), (h, w))``.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        patch_size: int = 3,
        per_layer_dim: int | None = None,
        target_dim: int | None = None,
    ):
        self.layers = layers
        self.patch_size = patch_size
        self.per_layer_dim = per_layer_dim
        self.target_dim = target_dim

    def resolve_layers(self, backbone) -> list[str]:
        """The map names to request from ``backbone`` (validated by the backbone)."""
        layers = list(backbone.patch_layers) if self.layers is None else self.layers
        return backbone.check_layers(layers)

    def output_dim(self, channels: Sequence[int]) -> int:
        """D for layers with ``channels`` each."""
        if self.target_dim is not None:
            return int(self.target_dim)
        if self.per_layer_dim is not None:
            return int(self.per_layer_dim) * len(channels)
        return int(sum(channels))

    def __call__(
        self, maps: dict[str, torch.Tensor], layers: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        names = list(layers if layers is not None else (self.layers or []))
        if not names:
            raise ParameterError("PatchFeatures needs the layer names: pass layers= or call resolve_layers(backbone)")
        missing = [name for name in names if name not in maps]
        if missing:
            raise ParameterError(f"feature maps {missing} are missing; got {sorted(maps)}")
        return patch_features([maps[name] for name in names], self.patch_size, self.per_layer_dim, self.target_dim)

    def __repr__(self) -> str:
        return (
            f"PatchFeatures(layers={self.layers!r}, patch_size={self.patch_size!r}, "
            f"per_layer_dim={self.per_layer_dim!r}, target_dim={self.target_dim!r})"
        )


def iter_patch_features(
    backbone,
    paths: Sequence[str | os.PathLike],
    maker: PatchFeatures,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device=None,
    progress: bool = True,
    desc: str | None = None,
    errors: dict[int, str] | None = None,
    precision: str = "fp32",
    cache: PatchCache | bool | None = True,
    record: dict | None = None,
) -> Iterator[PatchBatch]:
    """Yield one :class:`PatchBatch` ``(positions, features (B, h*w, D) float32 numpy, grid
    (h, w), input_size (H, W))`` per batch.

    The one loop from image files to patch features (PatchCore and anomaly clustering both
    use it): the backbone's maps of ``maker``'s layers, reduced by ``maker`` on the compute
    device. Under ``resize_mode="keep"`` each batch holds images of one input shape, and
    grid and input size change from batch to batch (the batches then do not come in path
    order: ``positions`` say where they belong). ``errors`` and ``precision`` (of the backbone
    forward, "fp32" or "bf16"; the patch features are float32) as in
    :func:`~anomalib_study.features.extract_feature_maps`.

    ``cache``: the :class:`~anomalib_study.patch_cache.PatchCache` the batches are read from
    when another run extracted the same images the same way, and stored into otherwise
    (True: the default one; False / None: none). ``record`` (a dict) receives what happened:
    ``{"patch_cache": "hit" | "extracted" | "off", "key": ...}`` (extracted: and stored, where the write succeeded).
    """
    from tqdm.auto import tqdm

    from anomalib_study.features import check_forward_precision, forward_maps, image_batches

    layers = maker.resolve_layers(backbone)
    check_forward_precision(precision)
    paths = paths if isinstance(paths, (str, os.PathLike)) else list(paths)  # a single path is refused below
    from anomalib_study.backbones import Backbone

    store = PatchCache() if cache is True else (cache or None)
    if store is not None and (
        not store.enabled or not isinstance(backbone, Backbone) or isinstance(paths, (str, os.PathLike)) or not paths
    ):
        store = None  # off, a backbone without a recorded identity, or an argument refused below
    key = described = None
    if store is not None:
        try:
            key, described = _cache_key(store, backbone, paths, maker, layers, batch_size, device, precision)
        except (DataError, OSError):  # a missing file: the extraction below records it (or raises) as usual
            store = None
    if store is not None:
        stored = store.read(key, errors)
        if stored is not None:
            if record is not None:
                record.update(patch_cache="hit", key=key)
            bar = tqdm(
                total=len(paths), desc=(desc or "patch features") + " (stored)", disable=not progress, unit="img"
            )
            try:
                for batch in stored:
                    bar.update(len(batch.positions))
                    yield batch
            finally:
                bar.close()
            return
    if record is not None:
        record.update(patch_cache="off" if store is None else "extracted", key=key)
    bar = tqdm(total=len(paths), desc=desc or f"{backbone.name} patch features", disable=not progress, unit="img")

    def extracted() -> Iterator[PatchBatch]:
        for positions, images in image_batches(
            backbone, paths, batch_size=batch_size, num_workers=num_workers, device=device, errors=errors
        ):
            with torch.inference_mode():  # not around the yield: grad mode would leak to the caller
                maps = forward_maps(backbone, images, layers, embedding=False, precision=precision, contiguous=False)
                features, grid = maker(maps, layers)
            bar.update(len(positions))
            yield PatchBatch(positions, features.cpu().numpy(), grid, (int(images.shape[-2]), int(images.shape[-1])))

    try:
        if store is None:
            yield from extracted()
        else:
            yield from store.write_through(key, described, extracted(), errors)
    finally:
        bar.close()


def _cache_key(store, backbone, paths, maker, layers, batch_size, device, precision) -> tuple[str, dict]:
    """The patch cache's key of one extraction (see :mod:`anomalib_study.patch_cache`)."""
    from anomalib_study.backbones import resolve_device
    from anomalib_study.features import FeatureCache

    hashes = FeatureCache(store.root.parent / "features").content_hashes(paths)
    fields = {
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": backbone.preprocessing,
        "layers": list(layers),
        "patch_size": maker.patch_size,
        "per_layer_dim": maker.per_layer_dim,
        "target_dim": maker.target_dim,
        "precision": precision,
        "device": resolve_device(device).type,
        "batch_size": int(batch_size),
        "code": PATCH_CODE,
    }
    return store.key(fields, hashes)


def collect_patch_features(
    backbone, paths: Sequence[str | os.PathLike], maker: PatchFeatures, **options
) -> tuple[np.ndarray, tuple[int, int]]:
    """All patch features of ``paths`` in one array: ``(features (n, h*w, D) float32, (h, w))``.

    ``options`` as in :func:`iter_patch_features`; with ``errors`` the rows of unreadable
    images are NaN. ParameterError for an empty ``paths``, or for images with different
    patch grids (``resize_mode="keep"`` on images of different shapes: one array cannot
    hold them; use :func:`iter_patch_features`); DataError if no image is readable.
    """
    from anomalib_study.errors import DataError

    paths = list(paths)
    if not paths:
        raise ParameterError("patch features need at least one image")
    out = grid = None
    for positions, features, grid_here, _ in iter_patch_features(backbone, paths, maker, **options):
        if out is None:
            grid = tuple(grid_here)
            out = np.full((len(paths), *features.shape[1:]), np.nan, dtype=np.float32)
        elif tuple(grid_here) != grid:
            raise ParameterError(
                f"the images give patch grids {grid} and {tuple(grid_here)}: resize_mode='keep' on images of "
                "different shapes gives each shape its own grid, which one (n, h*w, D) array cannot hold; use "
                "resize_mode='squash' or 'crop' here, or iter_patch_features"
            )
        out[positions] = features
    if out is None:
        raise DataError(f"none of the {len(paths)} images could be read")
    return out, grid
