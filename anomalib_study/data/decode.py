"""Robust decoding of images and masks.

Every image of every data set goes through :func:`load_image`, so every method sees the
same 8-bit RGB picture whatever the file stored (grayscale, 16-bit, palette, CMYK, alpha,
EXIF rotation). Every ground-truth mask goes through :func:`load_mask`. A file that cannot
be decoded raises :class:`~anomalib_study.errors.DataError` naming the file and the fault;
nothing is ever silently half-decoded (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from skimage.draw import ellipse as _draw_ellipse

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import sha256_file

from .records import ImageRecord

#: file suffixes read as images (compared case-insensitively)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose suffix is one of :data:`IMAGE_EXTENSIONS` (any case)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """The image files of ``folder``, sorted: the one listing rule of the package.

    * A file counts when its suffix is one of :data:`IMAGE_EXTENSIONS`; other files are
      passed over silently.
    * Hidden names (a file or folder below ``folder`` whose name starts with ``.``) are
      passed over silently, whatever they hold.
    * Symbolic links are followed, to files and (with ``recursive``) to folders; each real
      folder is read once, so a link loop ends. A link whose target is missing is listed,
      so that reading it reports it instead of it vanishing without a word.

    Every folder of images the package reads (the readers, ``detect``, a detect
    database's staleness check) is listed through this function.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[Path] = []
    seen: set[str] = set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            path = Path(here) / name
            if is_image_file(path) and (path.is_file() or path.is_symlink()):
                found.append(path)
    return sorted(found)


def find_unreadable(paths, progress: bool = False, desc: str = "checking images", workers: int = 2) -> dict[Path, str]:
    """Decode every image of ``paths`` fully; ``{path: reason}`` for those that cannot be read.

    The reason is the message :func:`load_image` raises (empty file, truncated, not an
    image, over the decompression-bomb limit, missing). Decoding runs in ``workers``
    threads (PIL releases the GIL while it decodes). Order: that of ``paths``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    paths = [Path(p) for p in paths]

    def reason(path: Path) -> str | None:
        try:
            load_image(path).close()
        except DataError as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(
            tqdm(pool.map(reason, paths), total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
        )
    return {path: why for path, why in zip(paths, reasons) if why is not None}


def list_images(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """Every image file under ``folder`` (recursively, by the package's one listing rule:
    :func:`image_files`), sorted; DataError naming ``what`` if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder} does not exist or is not a folder")
    paths = image_files(folder)
    if not paths:
        raise DataError(f"{what} {folder} holds no image files (.png, .jpg, .bmp, .tif): nothing to do")
    return paths


def unreadable_message(bad: dict[Path, str], what: str, folder: Path, fix: str) -> str:
    """One message naming every unreadable image of ``bad`` (path -> reason)."""
    lines = "\n".join(f"  {path}: {reason}" for path, reason in bad.items())
    return f"{len(bad)} image(s) in {what} {folder} cannot be read, {fix}:\n{lines}"


def _open_fully(path: Path, what: str) -> Image.Image:
    """Open ``path`` and force a full decode; any failure becomes one clear DataError."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist: check the path or the data folder")
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not an image file")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {path} is empty (0 bytes): re-copy or re-download the file")
    image = None
    try:
        image = Image.open(path)
        image.load()  # decode every pixel now: a truncated file fails here, not later
    except Image.DecompressionBombError as exc:
        if image is not None:
            image.close()
        raise DataError(f"{what} {path} is too large to decode safely ({exc})") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        if image is not None:
            image.close()
        reason = str(exc) or type(exc).__name__
        raise DataError(
            f"{what} {path} cannot be decoded ({reason}): the file is corrupt, truncated or "
            "not an image; re-copy or re-download it"
        ) from None
    return image


def _sixteen_bit_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit (or 32-bit integer holding 16-bit data) grayscale image to 0..255.

    The full 16-bit range 0..65535 maps linearly onto 0..255 (``round(v * 255 / 65535)``),
    so a 16-bit image keeps its contrast instead of being clipped at 255.
    """
    values = np.asarray(image, dtype=np.float64)
    values = np.clip(values, 0, 65535)
    return Image.fromarray(np.rint(values * (255.0 / 65535.0)).astype(np.uint8), mode="L")


def _float_to_8bit(image: Image.Image) -> Image.Image:
    """A float image: 0..1 if its maximum is at most 1, else taken as 0..255; then clipped."""
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
    values = np.nan_to_num(values * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_8bit(image).convert("RGB")
    if image.mode == "F":
        return _float_to_8bit(image).convert("RGB")
    if image.mode == "P":
        # through RGBA so palette transparency is handled (and then dropped) without warnings
        image = image.convert("RGBA")
    # RGBA / LA / PA: convert() drops the alpha channel and keeps the stored colour values
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an 8-bit RGB ``PIL.Image.Image`` (size ``(W, H)``).

    * Grayscale (``L``, ``1``), palette (``P``), CMYK, YCbCr, LA and RGBA images become RGB.
    * 16-bit grayscale (``I;16``, ``I``) is scaled linearly from 0..65535 to 0..255
      (not clipped); float images (``F``) are taken as 0..1 when their maximum is <= 1.
    * Alpha is **dropped**, not composited: the stored colour values are kept whatever
      the alpha (a fully transparent red pixel stays red).
    * The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), so the image
      is returned upright as a viewer shows it.

    Raises:
        DataError: the file is missing, empty (0 bytes), truncated, corrupt or not an image.
    """
    path = Path(path)
    original = image = _open_fully(path, "image")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block must not lose an otherwise good image
        warnings.warn(f"{path}: unreadable EXIF orientation ignored ({exc})", stacklevel=2)
    result = _to_rgb(image)
    if result is not original:
        original.close()  # release the file handle that multi-frame formats keep open
    return result


def _mask_values(path: Path) -> np.ndarray:
    """A mask file as a (H, W) uint8 array (16-bit masks scaled to 0..255)."""
    image = _open_fully(path, "mask")
    if image.mode == "1":
        return np.asarray(image, dtype=np.uint8) * np.uint8(255)
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(_sixteen_bit_to_8bit(image))
    if image.mode == "F":
        return np.asarray(_float_to_8bit(image))
    if image.mode == "P":
        image = image.convert("RGBA")
    return np.asarray(image.convert("L"))


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(W, H)`` of the image at ``path`` as :func:`load_image` returns it (EXIF orientation
    applied), read from the header only. DataError if it is missing or unreadable."""
    return _oriented_size(Path(path))


def _oriented_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image as :func:`load_image` returns it, read from the header only."""
    if not path.exists():
        raise DataError(f"image {path} does not exist: cannot take the size of its all-normal mask")
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:
        raise DataError(f"image {path} cannot be read ({exc or type(exc).__name__})") from None
    if orientation in (5, 6, 7, 8):  # these orientations swap width and height
        width, height = height, width
    return width, height


def load_mask(
    record_or_path: ImageRecord | str | os.PathLike | None,
    size: tuple[int, int] | None = None,
    threshold: int = 127,
) -> np.ndarray:
    """Read a ground-truth mask as a boolean array of shape ``(H, W)``; True = defective.

    Args:
        record_or_path: an :class:`ImageRecord` (its ``mask_path`` and ``mask_threshold``
            are used; a record without mask gives an all-False mask the size of its image),
            a mask file, a folder of per-defect masks (MVTec LOCO's official form: the mask
            is their union), or ``None`` (all-False; needs ``size``).
        size: optional ``(W, H)``; the mask is resized to it with nearest-neighbour.
        threshold: a pixel is defective where its 8-bit value is ``> threshold``
            (ignored for a record, which carries its own ``mask_threshold``).

    Raises:
        DataError: the mask file or folder is missing, empty or undecodable, or the
            per-defect masks of one folder differ in size.
        ParameterError: ``None`` was given without ``size``.
    """
    image_path: Path | None = None
    if isinstance(record_or_path, ImageRecord):
        image_path = Path(record_or_path.path)
        mask_path = record_or_path.mask_path
        threshold = record_or_path.mask_threshold
    else:
        mask_path = record_or_path
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] <= 0 or size[1] <= 0:
            raise ParameterError(f"size must be a positive (W, H), got {size}")

    if mask_path is None:
        if size is None:
            if image_path is None:
                raise ParameterError("load_mask(None) needs size=(W, H): there is no image to take it from")
            size = _oriented_size(image_path)
        return np.zeros((size[1], size[0]), dtype=bool)

    mask_path = Path(mask_path)
    if mask_path.is_dir():
        parts = sorted(p for p in mask_path.iterdir() if p.is_file() and is_image_file(p))
        if not parts:
            raise DataError(f"mask folder {mask_path} holds no mask image (expected one PNG per defect)")
        mask = None
        for part in parts:
            values = _mask_values(part) > threshold
            if mask is None:
                mask = values
            elif values.shape != mask.shape:
                raise DataError(
                    f"mask folder {mask_path}: {part.name} is {values.shape[1]}x{values.shape[0]} "
                    f"but {parts[0].name} is {mask.shape[1]}x{mask.shape[0]}; all masks must match"
                )
            else:
                mask |= values
    else:
        mask = _mask_values(mask_path) > threshold

    if size is not None and (mask.shape[1], mask.shape[0]) != size:
        resized = Image.fromarray(mask.astype(np.uint8) * np.uint8(255), mode="L").resize(size, Image.NEAREST)
        mask = np.asarray(resized) > 127
    return np.ascontiguousarray(mask)


def content_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes: the key of the feature cache for that image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file: cannot hash it")
    return sha256_file(path)


def ellipse_mask(
    shape: tuple[int, int],
    ellipses: list[tuple[float, float, float, float, float]],
) -> np.ndarray:
    """Rasterise filled ellipses (DAGM 2007 weak labels) into a boolean ``(H, W)`` mask.

    Each ellipse is ``(semi_major, semi_minor, angle, x, y)``: half-axes in pixels, the
    angle in radians (the semi-major axis lies along +x at angle 0 and turns
    counter-clockwise as displayed, i.e. ``skimage.draw.ellipse``'s ``rotation``), and the
    centre at column ``x``, row ``y`` (0-based pixel coordinates). The mask is the union.
    """
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), dtype=bool)
    for semi_major, semi_minor, angle, x, y in ellipses:
        rows, cols = _draw_ellipse(
            float(y),
            float(x),
            max(float(semi_minor), 0.5),
            max(float(semi_major), 0.5),
            shape=(height, width),
            rotation=float(angle),
        )
        mask[rows, cols] = True
    return mask
