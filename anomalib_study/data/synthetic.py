"""A small generated data set in the DAGM 2007 layout (stands in for DAGM, always labelled synthetic).

Layout written (the DAGM 2007 one, read by ``load_dataset("dagm", root)``)::

    root/synthetic.json                    the stamp: generator, parameters, defect kinds
    root/ClassN/Train/NNNN.PNG             normal training images
    root/ClassN/Train/Label/Labels.txt     (no defect: empty)
    root/ClassN/Test/NNNN.PNG              normal and defective test images
    root/ClassN/Test/Label/Labels.txt      one line per defect, the 2007 ellipse form:
                                           image<TAB>semi_major<TAB>semi_minor<TAB>angle<TAB>x<TAB>y

Each class has its own texture (oriented sinusoidal weave, smooth multi-octave noise,
streaks along one direction, grain); each defective image carries one defect of a kind
(``scratch``: a thin line along the ellipse's major axis, ``blob``: a dark soft blob,
``spot``: a bright soft spot), always drawn inside the labelled ellipse so the rasterised
ellipse covers it. Defect contrast is 2-3 texture standard deviations at its peak: visible to a
pretrained CNN but not trivially so. Same seed and parameters -> same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import SHARED_SYNTHETIC_SEED, shared_synthetic_path, write_json

from .decode import ellipse_mask

SYNTHETIC_STAMP = "synthetic.json"
GENERATOR_VERSION = 2  # 2: larger defects (semi-major axis 12-22 % of the side)
DEFECT_KINDS = ("scratch", "blob", "spot")
_TEXTURES = ("weave", "clouds", "streaks", "grain")


def _texture(kind: str, rng: np.random.Generator, size: int, variant: int) -> np.ndarray:
    """A float texture in roughly [0, 1], of shape (size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if kind == "weave":
        angle = 0.4 + 0.5 * variant + rng.normal(0, 0.05)
        freq = 2 * np.pi / (9.0 + 2 * variant)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        v = -np.sin(angle) * xx + np.cos(angle) * yy
        base = 0.5 + 0.2 * np.sin(freq * u + rng.uniform(0, 2 * np.pi)) * np.sin(
            0.7 * freq * v + rng.uniform(0, 2 * np.pi)
        )
        return base + ndimage.gaussian_filter(rng.normal(0, 0.12, (size, size)), 1.0)
    if kind == "clouds":
        out = np.zeros((size, size))
        for octave, weight in ((4, 0.5), (8, 0.25), (16, 0.15), (32, 0.1)):
            coarse = rng.normal(0, 1, (octave, octave))
            out += weight * ndimage.zoom(coarse, size / octave, order=3, mode="wrap")[:size, :size]
        return 0.5 + 0.12 * out + rng.normal(0, 0.02, (size, size))
    if kind == "streaks":
        noise = rng.normal(0, 1, (size, size))
        sigma = (0.8, 6.0 + variant) if variant % 2 == 0 else (6.0 + variant, 0.8)
        streaks = ndimage.gaussian_filter(noise, sigma, mode="wrap")
        return 0.5 + 0.6 * streaks / (streaks.std() + 1e-9) * 0.12
    # grain: fine isotropic noise with a slow brightness gradient
    grain = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), 0.7)
    ramp = 0.05 * (xx / size - 0.5) * rng.choice([-1, 1])
    return 0.5 + 0.1 * grain / (grain.std() + 1e-9) + ramp


def _add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, tuple[float, float, float, float, float]]:
    """Draw one defect of ``kind`` inside a random ellipse; returns (image, ellipse)."""
    semi_major = rng.uniform(0.12, 0.22) * size
    semi_minor = semi_major * rng.uniform(0.35, 0.7)
    if kind == "scratch":
        semi_minor = max(semi_major * 0.25, 3.0)
    angle = rng.uniform(-np.pi / 2, np.pi / 2)
    margin = semi_major + 2
    x = rng.uniform(margin, size - 1 - margin)
    y = rng.uniform(margin, size - 1 - margin)
    ellipse = (semi_major, semi_minor, angle, x, y)
    inside = ellipse_mask((size, size), [ellipse])
    contrast = 1.0 * image.std()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # coordinates in the ellipse frame (same convention as ellipse_mask: counter-clockwise as shown)
    du, dv = xx - x, y - yy
    u = du * np.cos(angle) + dv * np.sin(angle)
    v = -du * np.sin(angle) + dv * np.cos(angle)
    if kind == "scratch":
        profile = np.exp(-(v**2) / (2 * 1.1**2)) * (np.abs(u) < 0.85 * semi_major)
        delta = rng.choice([-1.0, 1.0]) * 3.0 * contrast * profile
    else:
        r2 = (u / (0.75 * semi_major)) ** 2 + (v / (0.75 * semi_minor)) ** 2
        profile = np.exp(-r2 * 1.2)
        sign = -1.0 if kind == "blob" else 1.0
        delta = sign * 2.8 * contrast * profile
    return image + delta * inside, ellipse


def _params(seed, n_classes, n_train, n_test_normal, n_test_defect, image_size) -> dict:
    values = dict(
        seed=seed,
        n_classes=n_classes,
        n_train=n_train,
        n_test_normal=n_test_normal,
        n_test_defect=n_test_defect,
        image_size=image_size,
    )
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ParameterError(f"{name} must be an integer, got {value!r}")
    if n_classes < 1 or n_train < 1 or n_test_normal < 0 or n_test_defect < 1:
        raise ParameterError(
            "make_synthetic_dagm needs n_classes >= 1, n_train >= 1, n_test_normal >= 0 and n_test_defect >= 1"
        )
    if image_size < 32:
        raise ParameterError(f"image_size must be at least 32 pixels, got {image_size}")
    return {k: int(v) for k, v in values.items()}


def _save_png(array01: np.ndarray, path: Path) -> None:
    pixels = np.clip(np.rint(array01 * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path, format="PNG")


def _write_tree(out: Path, params: dict) -> dict[str, str]:
    size = params["image_size"]
    kinds: dict[str, str] = {}
    for class_index in range(params["n_classes"]):
        rng = np.random.default_rng([params["seed"], class_index])
        texture = _TEXTURES[class_index % len(_TEXTURES)]
        variant = class_index // len(_TEXTURES)
        class_dir = out / f"Class{class_index + 1}"
        for split in ("Train", "Test"):
            (class_dir / split / "Label").mkdir(parents=True)
        for i in range(params["n_train"]):
            _save_png(_texture(texture, rng, size, variant), class_dir / "Train" / f"{i + 1:04d}.PNG")
        (class_dir / "Train" / "Label" / "Labels.txt").write_text("")
        n_test = params["n_test_normal"] + params["n_test_defect"]
        defective = set(rng.permutation(n_test)[: params["n_test_defect"]].tolist())
        lines = []
        for i in range(n_test):
            image = _texture(texture, rng, size, variant)
            name = f"{i + 1:04d}.PNG"
            if i in defective:
                kind = DEFECT_KINDS[len(lines) % len(DEFECT_KINDS)]
                image, (a, b, angle, x, y) = _add_defect(image, kind, rng, size)
                lines.append(f"{i + 1}\t{a:.2f}\t{b:.2f}\t{angle:.4f}\t{x:.2f}\t{y:.2f}")
                kinds[f"Class{class_index + 1}/Test/{name}"] = kind
            _save_png(image, class_dir / "Test" / name)
        (class_dir / "Test" / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return kinds


def make_synthetic_dagm(
    root: str | os.PathLike,
    seed: int = 0,
    n_classes: int = 3,
    n_train: int = 24,
    n_test_normal: int = 8,
    n_test_defect: int = 12,
    image_size: int = 128,
) -> Path:
    """Write (or reuse) a synthetic DAGM-2007-layout data set at ``root`` and return ``root``.

    Per class: ``n_train`` normal training images, ``n_test_normal`` normal and
    ``n_test_defect`` defective test images, grayscale ``image_size`` x ``image_size`` PNGs;
    the defect kinds cycle scratch, blob, spot. If ``root`` already holds a set made with
    the same parameters (its ``synthetic.json`` stamp says so) nothing is written. The set
    is built in a temporary folder beside ``root`` and moved into place in one rename.

    Raises:
        DataError: ``root`` exists, is not empty and is not a synthetic set (never overwritten).
        ParameterError: a count or size is impossible.
    """
    params = _params(seed, n_classes, n_train, n_test_normal, n_test_defect, image_size)
    root = Path(root).expanduser()
    stamp = root / SYNTHETIC_STAMP
    if stamp.is_file():
        try:
            existing = json.loads(stamp.read_text())
        except (OSError, ValueError):
            existing = {}
        if existing.get("params") == params and existing.get("version") == GENERATOR_VERSION:
            return root
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} exists and is not a synthetic data set (no {SYNTHETIC_STAMP}): choose an empty or new folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
    try:
        kinds = _write_tree(build, params)
        write_json(
            build / SYNTHETIC_STAMP,
            {
                "generator": "anomalib_study.data.synthetic.make_synthetic_dagm",
                "version": GENERATOR_VERSION,
                "synthetic": True,
                "note": "synthetic DAGM-layout data, generated: not the real DAGM 2007 data set",
                "params": params,
                "defect_types": kinds,
            },
        )
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "set")
        os.replace(build, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return root


def shared_synthetic_set() -> Path:
    """The study's shared synthetic set (``{synthetic}`` in study files, the notebooks' fallback: at
    :func:`anomalib_study.io.shared_synthetic_path`, seed :data:`anomalib_study.io.SHARED_SYNTHETIC_SEED`),
    generated if missing."""
    return Path(make_synthetic_dagm(shared_synthetic_path(), seed=SHARED_SYNTHETIC_SEED))
