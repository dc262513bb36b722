"""Batched feature extraction with a progress bar, and the on-disk feature cache.

Decoding and preprocessing run in a torch ``DataLoader`` (``num_workers`` processes), so
they overlap the forward pass. With a cache, only the images whose embeddings are not
stored yet are decoded and run; the second evaluation of the same images reads one small
index of content hashes and the stored embeddings.

Cache layout (``<root>/``, default ``<cache_root()>/features``)::

    content_hashes.json              path -> [size, mtime_ns, sha256 of the bytes]
    <model_key>/key.json             what the key stands for (backbone, weights, preprocessing, output, code)
    <model_key>/<shard>.npz          hashes (N,) str + embeddings (N, D) float32, append-only

``model_key`` is the sha256 of the canonical JSON of the backbone name, the weights'
sha256, the preprocessing dict, the output kind and the code that computes the embeddings
(:data:`EXTRACTION_CODE`: the modules :data:`EXTRACTION_MODULES` and the versions of torch,
torchvision, timm, Pillow and numpy; after an edit to how images are decoded, preprocessed
or run through a backbone, or an upgrade, the stored embeddings are not reused); an image's entry is keyed by the
sha256 of its file bytes, so a changed file is a cache miss. Every file is written
atomically; shards are merged into one when they become many.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import Backbone, resolve_device
from .data.decode import content_hash, load_image
from .errors import DataError, ParameterError, StudyError
from .freshness import code_version
from .io import atomic_write, cache_root, sha256_bytes, write_json

CACHE_FORMAT = 1
#: the modules whose code computes an embedding: part of every cache key (`freshness.code_version`)
EXTRACTION_MODULES = (
    "features.py",
    "backbones.py",
    "backbone_models.py",
    "backbone_families.py",
    "preprocessing.py",
    "weights.py",
    "data/decode.py",
)
#: their :func:`~anomalib_study.freshness.code_version` with the feature libraries' versions, taken
#: when this module is imported: the code this process runs, even if a file is edited afterwards
EXTRACTION_CODE = code_version(EXTRACTION_MODULES, libraries=True)
_MAX_SHARDS = 16


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------
def _cache_write_failed(root: Path, error: OSError) -> None:
    warnings.warn(
        f"feature cache: could not write to {root} ({error}); the run goes on without storing these features "
        "(free some space there, or set ANOMALIB_STUDY_CACHE to another folder)",
        stacklevel=3,
    )


class FeatureCache:
    """Embeddings on disk, keyed by (backbone identity, image content hash).

    ``root``: the cache folder (default ``cache_root() / "features"``, i.e.
    ``$ANOMALIB_STUDY_CACHE/features``).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else cache_root() / "features"
        self._hash_index: dict[str, list] | None = None
        self._hash_index_dirty = False
        self._shards: dict[Path, tuple[int, np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"FeatureCache(root={str(self.root)!r})"

    # ---- keys --------------------------------------------------------------------------
    @staticmethod
    def key_fields(backbone: Backbone, output: str = "embedding") -> dict:
        """What a model key stands for (JSON-able)."""
        return {
            "format": CACHE_FORMAT,
            "backbone": backbone.name,
            "weights_sha256": backbone.weights_sha256,
            "preprocessing": backbone.preprocessing,
            "output": output,
            "code": EXTRACTION_CODE,
        }

    @classmethod
    def model_key(cls, backbone: Backbone, output: str = "embedding") -> str:
        """sha256 of the canonical JSON of :meth:`key_fields` (first 32 hex digits)."""
        canonical = json.dumps(cls.key_fields(backbone, output), sort_keys=True, separators=(",", ":"))
        return sha256_bytes(canonical.encode("utf-8"))[:32]

    def content_hashes(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> list[str]:
        """sha256 of each file's bytes, memoised by (path, size, mtime_ns) in ``content_hashes.json``.

        Raises DataError naming a missing file.
        """
        index = self._load_hash_index()
        hashes = []
        for path in tqdm(paths, desc="hashing images", disable=not progress or len(paths) < 200, leave=False):
            real = os.path.realpath(path)
            try:
                stat = os.stat(real)
            except OSError:
                raise DataError(f"image {path} does not exist: check the path or the data folder") from None
            entry = index.get(real)
            if entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
                hashes.append(entry[2])
                continue
            digest = content_hash(real)
            index[real] = [stat.st_size, stat.st_mtime_ns, digest]
            self._hash_index_dirty = True
            hashes.append(digest)
        self._save_hash_index()
        return hashes

    def _load_hash_index(self) -> dict[str, list]:
        if self._hash_index is None:
            try:
                self._hash_index = json.loads((self.root / "content_hashes.json").read_text())
            except (OSError, ValueError):
                self._hash_index = {}
        return self._hash_index

    def _save_hash_index(self) -> None:
        if self._hash_index_dirty:
            try:
                write_json(self.root / "content_hashes.json", self._hash_index)
            except OSError as error:  # a cache is an optimisation: a failed write never fails the run
                _cache_write_failed(self.root, error)
            self._hash_index_dirty = False

    # ---- entries -----------------------------------------------------------------------
    def _folder(self, backbone: Backbone, output: str) -> Path:
        return self.root / self.model_key(backbone, output)

    def _read_shards(self, folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
        shards = []
        for path in sorted(folder.glob("*.npz")):
            try:
                mtime = path.stat().st_mtime_ns
                cached = self._shards.get(path)
                if cached is None or cached[0] != mtime:
                    with np.load(path, allow_pickle=False) as data:
                        cached = (mtime, data["hashes"], data["embeddings"])
                    self._shards[path] = cached
            except FileNotFoundError:  # merged away by another process meanwhile
                continue
            except Exception as error:  # a damaged shard is a cache miss, not a failure
                warnings.warn(f"feature cache: ignoring unreadable shard {path} ({error})", stacklevel=3)
                continue
            shards.append((cached[1], cached[2]))
        return shards

    def get_many(self, backbone: Backbone, hashes: Sequence[str], output: str = "embedding") -> dict[str, np.ndarray]:
        """{hash: (D,) float32 row} for those of ``hashes`` that are stored."""
        wanted = set(hashes)
        found: dict[str, np.ndarray] = {}
        for shard_hashes, rows in self._read_shards(self._folder(backbone, output)):
            for position, digest in enumerate(shard_hashes.tolist()):
                if digest in wanted:
                    found[digest] = rows[position]
        return found

    def put_many(self, backbone: Backbone, hashes: Sequence[str], rows: np.ndarray, output: str = "embedding") -> None:
        """Store ``rows`` (N, D) under ``hashes`` (N,) as one new shard, written atomically. A
        write that fails (a full disk, a read-only folder) is a warning: the features were
        computed, the run goes on, the next run computes them again."""
        rows = np.asarray(rows, dtype=np.float32)
        if len(hashes) == 0:
            return
        if rows.ndim != 2 or rows.shape[0] != len(hashes):
            raise ParameterError(f"put_many: rows of shape {rows.shape} do not match {len(hashes)} hashes")
        folder = self._folder(backbone, output)
        try:
            if not (folder / "key.json").is_file():
                write_json(folder / "key.json", self.key_fields(backbone, output))
            self._write_shard(folder / f"{uuid.uuid4().hex}.npz", np.asarray(list(hashes)), rows)
            shard_files = sorted(folder.glob("*.npz"))
            if len(shard_files) > _MAX_SHARDS:
                self._merge(folder, shard_files)
        except OSError as error:  # a cache is an optimisation: a failed write never fails the run
            _cache_write_failed(self.root, error)

    @staticmethod
    def _write_shard(path: Path, hashes: np.ndarray, rows: np.ndarray) -> None:
        with atomic_write(path) as handle:
            np.savez(handle, hashes=hashes, embeddings=rows)

    def _merge(self, folder: Path, shard_files: list[Path]) -> None:
        merged: dict[str, np.ndarray] = {}
        for shard_hashes, rows in self._read_shards(folder):
            merged.update(zip(shard_hashes.tolist(), rows))
        if not merged:
            return
        self._write_shard(folder / f"{uuid.uuid4().hex}.npz", np.asarray(list(merged)), np.stack(list(merged.values())))
        for path in shard_files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            self._shards.pop(path, None)


_DEFAULT_CACHES: dict[Path, FeatureCache] = {}


def _resolve_cache(cache) -> FeatureCache | None:
    if cache is None or cache is False:
        return None
    if isinstance(cache, FeatureCache):
        return cache
    if cache == "default":
        root = cache_root() / "features"
        if root not in _DEFAULT_CACHES:  # one instance per folder keeps its in-memory memos
            _DEFAULT_CACHES[root] = FeatureCache(root)
        return _DEFAULT_CACHES[root]
    raise ParameterError(f"cache={cache!r}: use None, 'default' or a FeatureCache")


# --------------------------------------------------------------------------------------
# Decoding in DataLoader workers
# --------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """(position, preprocessed image or None, error message or None) for each path."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        try:
            return position, self.transform(load_image(self.paths[position])), None
        except StudyError as error:  # surfaced in the main process as one clear DataError
            return position, None, str(error)
        except Exception as error:
            return position, None, f"image {self.paths[position]} cannot be preprocessed: {error}"


def collate_images(items):
    """(positions of the decoded images, their (B, 3, H, W) batch or None, [(position, error)])."""
    good = [item for item in items if item[2] is None]
    errors = [(item[0], item[2]) for item in items if item[2] is not None]
    images = torch.stack([item[1] for item in good]) if good else None
    return [item[0] for item in good], images, errors


def _collate_by_shape(items):
    """([(positions, (B, 3, H, W) batch)] one per input shape, in order of first appearance,
    [(position, error)]). Under ``"crop"`` / ``"squash"`` every image has one shape: one batch."""
    errors = [(item[0], item[2]) for item in items if item[2] is not None]
    by_shape: dict[tuple, list] = {}
    for item in items:
        if item[2] is None:
            by_shape.setdefault(tuple(item[1].shape), []).append(item)
    groups = [([item[0] for item in group], torch.stack([item[1] for item in group])) for group in by_shape.values()]
    return groups, errors


def shape_batches(paths: Sequence[Path], preprocessing: dict, batch_size: int) -> list[list[int]]:
    """Positions in ``paths`` cut into batches of at most ``batch_size`` images that share
    one preprocessed input shape (``backbones.input_size`` of each image's header size, EXIF
    orientation applied): shapes in order of their first image, positions ascending within
    each. An image whose header cannot be read goes into a batch of its own kind (it is
    reported when decoded)."""
    from .backbones import input_size
    from .data.decode import oriented_size

    groups: dict[tuple | None, list[int]] = {}
    for position, path in enumerate(paths):
        try:
            width, height = oriented_size(path)
            shape: tuple | None = input_size(preprocessing, height, width)
        except StudyError:
            shape = None
        groups.setdefault(shape, []).append(position)
    return [
        group[start : start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)
    ]


def _check_arguments(paths, batch_size, num_workers) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        raise ParameterError("paths must be a list of image paths, not a single path")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ParameterError(f"batch_size={batch_size!r}: give an integer >= 1")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ParameterError(f"num_workers={num_workers!r}: give an integer >= 0")
    return [Path(p) for p in paths]


def _batches(
    backbone: Backbone,
    paths: Sequence[Path],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    errors: dict[int, str] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Preprocessed batches on ``device``: (positions in ``paths``, (B, 3, H, W) tensor).

    Under ``resize_mode="keep"`` the input shape depends on the image: the images are
    grouped by shape first (:func:`shape_batches`), so a batch holds one shape and the
    batches do not come in path order (the positions say where each image belongs).
    An image that cannot be decoded raises DataError naming it, or, with ``errors`` (a
    dict), is left out of its batch and recorded there (position -> the reason).
    """
    dataset = ImageFiles(paths, backbone.image_transform)
    common = dict(num_workers=num_workers, collate_fn=_collate_by_shape, pin_memory=device.type == "cuda")
    if backbone.preprocessing.get("resize_mode") == "keep":
        loader = DataLoader(dataset, batch_sampler=shape_batches(paths, backbone.preprocessing, batch_size), **common)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **common)
    for groups, failed in loader:
        if failed:
            if errors is None:
                raise DataError(failed[0][1])
            errors.update(failed)
        for positions, images in groups:
            yield positions, images.to(device, non_blocking=True)


def _prepare(backbone: Backbone, device) -> torch.device:
    if not isinstance(backbone, Backbone):
        raise ParameterError(f"backbone must be a Backbone from load_backbone(), got {type(backbone).__name__}")
    if device is None:
        return backbone.device
    device = resolve_device(device)
    backbone.to(device)
    return device


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def extract_embeddings(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    cache: None | str | FeatureCache = "default",
    progress: bool = True,
    desc: str | None = None,
    errors: dict[int, str] | None = None,
    record: dict | None = None,
) -> np.ndarray:
    """Global embeddings of the images at ``paths``: (N, D) float32, rows in the order of ``paths``.

    ``device=None`` uses the backbone's device (otherwise the backbone is moved there).
    ``cache``: None (no cache), "default" (``$ANOMALIB_STUDY_CACHE/features``) or a
    :class:`FeatureCache`; only images missing from it are decoded and run. Embeddings are
    raw features: no direction (higher/lower) is implied.
    Raises DataError naming the first image that cannot be decoded; with ``errors`` (a
    dict) such images are skipped instead: position in ``paths`` -> reason is recorded
    there, their rows are NaN, and nothing is cached for them. With ``record`` (a dict) what
    the cache did is written there: ``{"feature_cache": "off"}``, or ``{"feature_cache":
    {"read", "computed", "key", "read_images", "computed_images"}}`` (:func:`_cache_use`).
    """
    paths = _check_arguments(paths, batch_size, num_workers)
    device = _prepare(backbone, device)
    store = _resolve_cache(cache)
    result = np.zeros((len(paths), backbone.embedding_dim), dtype=np.float32)
    if not paths:
        if record is not None:
            record["feature_cache"] = "off" if store is None else _cache_use(store.model_key(backbone), [], {})
        return result
    if store is not None:
        hashes = store.content_hashes(paths, progress=progress)
        found = store.get_many(backbone, hashes)
        first_position: dict[str, int] = {}
        for position, digest in enumerate(hashes):
            if digest in found:
                result[position] = found[digest]
            else:
                first_position.setdefault(digest, position)  # identical files are run once
        todo = sorted(first_position.values())
    else:
        hashes, todo = None, list(range(len(paths)))
    if record is not None:
        record["feature_cache"] = "off" if store is None else _cache_use(store.model_key(backbone), hashes, found)
    if todo:
        computed = np.full((len(todo), backbone.embedding_dim), np.nan, dtype=np.float32)
        failed: dict[int, str] | None = None if errors is None else {}
        bar = tqdm(total=len(todo), desc=desc or f"{backbone.name} embeddings", disable=not progress, unit="img")
        try:
            with torch.inference_mode():
                for positions, images in _batches(
                    backbone, [paths[i] for i in todo], batch_size, num_workers, device, failed
                ):
                    embedding = backbone(images)["embedding"]
                    computed[positions] = embedding.float().cpu().numpy()
                    bar.update(len(positions))
        finally:
            bar.close()
        result[todo] = computed
        if failed:
            if hashes is None:
                errors.update({todo[i]: why for i, why in failed.items()})
            else:  # identical copies of an unreadable file (run once) are unreadable too
                reason_of = {hashes[todo[i]]: why for i, why in failed.items()}
                errors.update(
                    {position: reason_of[digest] for position, digest in enumerate(hashes) if digest in reason_of}
                )
        if store is not None:
            readable = [j for j in range(len(todo)) if failed is None or j not in failed]
            store.put_many(backbone, [hashes[todo[j]] for j in readable], computed[readable])
            by_hash = {hashes[todo[j]]: computed[j] for j in readable}
            for position, digest in enumerate(hashes):
                if digest in by_hash:
                    result[position] = by_hash[digest]
        if failed:
            result[sorted(errors)] = np.nan
    return result


def _cache_use(model_key: str, hashes: Sequence[str], found: dict) -> dict:
    """What one extraction did with the cache: images ``read`` from it and ``computed``, and a
    digest of each set of distinct image hashes (``read_images`` / ``computed_images``, None
    when empty), so that a read can be matched with the extraction that stored it."""

    def digest(chosen: set[str]) -> str | None:
        return sha256_bytes(json.dumps(sorted(chosen)).encode())[:16] if chosen else None

    read = {h for h in hashes if h in found}
    computed = set(hashes) - read
    return {
        "read": sum(h in found for h in hashes),
        "computed": len(computed),
        "key": model_key,
        "read_images": digest(read),
        "computed_images": digest(computed),
    }


def check_forward_precision(precision: str) -> None:
    """A resolved forward precision ("fp32" or "bf16"), else ParameterError."""
    if precision not in ("fp32", "bf16"):
        raise ParameterError(
            f"precision of the forward must be 'fp32' or 'bf16' (resolve 'auto' first with "
            f"hardware.resolve_precision), got {precision!r}"
        )


def forward_maps(
    backbone: Backbone,
    images: torch.Tensor,
    layers: Sequence[str],
    *,
    embedding: bool = True,
    precision: str = "fp32",
    contiguous: bool = True,
) -> dict[str, torch.Tensor]:
    """``backbone(images, layers=..., embedding=..., contiguous=...)``, under bf16 autocast for
    ``precision="bf16"`` (the maps returned as float32, in the same memory layout). Call it inside
    ``torch.inference_mode``; the autocast context closes before it returns, so it never leaks
    to a caller's generator."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        maps = backbone(images, layers=layers, embedding=embedding, contiguous=contiguous)
    if precision == "bf16":
        maps = {name: value.float() for name, value in maps.items()}
    return maps


def extract_feature_maps(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike],
    layers: Sequence[str],
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str | None = None,
    embedding: bool = True,
    errors: dict[int, str] | None = None,
    precision: str = "fp32",
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield (positions in ``paths``, {"embedding": (B, D), <layer>: (B, C, h, w), ...}) per batch.

    ``embedding=False`` leaves the embedding out, so that backbones can stop after the
    last requested map. ``precision="bf16"`` runs the forward under
    ``torch.autocast(dtype=torch.bfloat16)`` (the maps are returned as float32);
    ``"fp32"`` (default) in float32. Pass a resolved precision
    (:func:`anomalib_study.hardware.resolve_precision`), not ``"auto"``.

    The tensors stay on the compute device, for PatchCore-style methods to reduce them
    there. Not cached. Unknown ``layers`` raise ParameterError before any image is read;
    an undecodable image raises DataError naming it, or with ``errors`` (a dict) is left
    out and recorded there (position -> reason).
    """
    paths = _check_arguments(paths, batch_size, num_workers)
    check_forward_precision(precision)
    layers = backbone.check_layers(layers) if isinstance(backbone, Backbone) else layers
    bar = tqdm(total=len(paths), desc=desc or f"{backbone.name} feature maps", disable=not progress, unit="img")
    try:
        for positions, images in image_batches(
            backbone, paths, batch_size=batch_size, num_workers=num_workers, device=device, errors=errors
        ):
            with torch.inference_mode():  # not around the yield: grad mode would leak to the caller
                maps = forward_maps(backbone, images, layers, embedding=embedding, precision=precision)
            bar.update(len(positions))
            yield positions, maps
    finally:
        bar.close()


def image_batches(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    errors: dict[int, str] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (positions in ``paths``, preprocessed (B, 3, H, W) batch on the compute device).

    Decoding runs in a ``DataLoader`` (``num_workers`` processes). Under
    ``resize_mode="keep"`` a batch holds the images of one input shape, and the batches do
    not come in path order (see :func:`shape_batches`). An undecodable image raises
    DataError naming it, or with ``errors`` (a dict) is left out and recorded there.
    """
    paths = _check_arguments(paths, batch_size, num_workers)
    device = _prepare(backbone, device)
    yield from _batches(backbone, paths, batch_size, num_workers, device, errors)
