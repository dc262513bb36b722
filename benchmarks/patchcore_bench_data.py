"""The settings of bench_patchcore.py, its process helpers (log, load average, peak RSS, CPU
seconds) and the images both sides see: the Magnetic-tile lists, the random backbone weights and
the tiny generated tree of ``--quick``.

A sibling module of ``benchmarks/bench_patchcore.py`` (which re-exports every public name here);
imported by its plain name, with ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "patchcore.json"
DEFAULT_VENV = Path(os.environ.get("ANOMALIB_VENV", "/work/.venvs/anomalib-2.7.0"))
DEFAULT_WORK = Path(tempfile.gettempdir()) / "bench_patchcore"
ANOMALIB_SIDE = Path(__file__).resolve().parent / "anomalib_side.py"
# the command line: our side's measurements run as `python BENCH_SCRIPT --our-side ...`
BENCH_SCRIPT = Path(__file__).resolve().parent / "bench_patchcore.py"

BACKBONE = "wide_resnet50_2"
LAYERS = ("layer2", "layer3")
CORESET_RATIO = 0.10
N_TEST = 50
SEED = 0
PRECISIONS = ("fp32", "bf16")
MATMUL_SHAPE = (512, 1536, 2048)  # (m, k, n) of the throughput probe: a block of queries against a bank slice
QUICK_MATMUL_SHAPE = (128, 256, 512)
HIT_RATE_QUERIES = 1024  # test patches the re-rank hit rate is measured on
CORESET_CHECK_IMAGES = 20  # training images whose patches the coreset-precision check samples

_START = time.perf_counter()


#: parse_setting's search dimensions for a setting without ``@``: PatchCore's own default
DEFAULT_SEARCH = "default"


def parse_setting(setting: str) -> tuple[str, int | str | None]:
    """``"fp32"`` / ``"bf16"`` / ``"auto"``, optionally ``@<dims>`` or ``@full`` -> (precision, search_dim):
    without ``@``, :data:`DEFAULT_SEARCH` (PatchCore's default ``search_dim``, the certified re-ranked
    search); ``@full``: None (faiss's exhaustive search on every feature); ``@256``: 256.

    Raises StudyError naming the setting when it is neither."""
    from anomalib_study.errors import StudyError

    precision, at, dims = str(setting).partition("@")
    if precision not in ("fp32", "bf16", "auto") or (
        at and not (dims == "full" or (dims.isdigit() and int(dims) >= 1))
    ):
        raise StudyError(
            f"unknown setting {setting!r}: give fp32, bf16 or auto, optionally followed by @<search "
            "dimensions> or @full (every feature), e.g. bf16@256"
        )
    if not at:
        return precision, DEFAULT_SEARCH
    return precision, None if dims == "full" else int(dims)


def search_kwargs(search_dim: int | str | None) -> dict:
    """PatchCore keyword arguments of a parsed search setting (none for the default)."""
    return {} if search_dim == DEFAULT_SEARCH else {"search_dim": search_dim}


def log(message: str) -> None:
    print(f"[bench_patchcore {time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float] | None:
    """os.getloadavg() rounded (1, 5, 15 minutes), None where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mb() -> float:
    """ru_maxrss of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------
# The images both sides see
# --------------------------------------------------------------------------------------
def magnetic_tile_lists(
    data: Path, n_train: int, n_test: int = N_TEST, seed: int = SEED
) -> tuple[list[Path], list[Path]]:
    """(first ``n_train`` training images in the reader's order, ``n_test`` seeded test images).

    Training images are MT_Free images of the DifferNet/PatchCore split; the test images are
    drawn without replacement from the test split (MT_Free held-out normals and every
    defect image) with ``numpy.random.default_rng(seed)``, then sorted. Raises DataError
    when the folder is missing or holds fewer images than asked for.
    """
    import numpy as np

    from anomalib_study.data.readers import load_dataset
    from anomalib_study.errors import DataError

    root = Path(data) / "magnetic_tile"
    if not root.is_dir():
        raise DataError(
            f"Magnetic-tile data not found at {root}: pass --data <folder holding magnetic_tile/> "
            "or set ANOMALIB_STUDY_DATA"
        )
    dataset = load_dataset("magnetic_tile", root)
    train = [r.path for r in dataset.train]
    test = sorted(r.path for r in dataset.test)
    if n_train > len(train):
        raise DataError(f"{root}: asked for {n_train} training images, the split has {len(train)}")
    if n_test > len(test):
        raise DataError(f"{root}: asked for {n_test} test images, the split has {len(test)}")
    picked = np.random.default_rng(seed).choice(len(test), size=n_test, replace=False)
    return train[:n_train], sorted(test[i] for i in picked)


def write_list(paths: Sequence[Path], target: Path) -> str:
    """Write one absolute path a line to ``target`` (atomically); return the list's sha256."""
    from anomalib_study.io import atomic_write

    text = "".join(f"{Path(p).resolve()}\n" for p in paths)
    with atomic_write(target, "w") as handle:
        handle.write(text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def preprocessing_of(image_size: int = 224) -> dict:
    """Our backbone's preprocessing dict (resize, crop, interpolation, mean, std), used by both sides."""
    from anomalib_study.preprocessing import IMAGENET_MEAN, IMAGENET_STD, make_preprocessing

    # torchvision ResNets: resize the short side to size*256/224, centre-crop size (backbones._build_resnet)
    return make_preprocessing(int(round(image_size * 256 / 224)), image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def random_wide_resnet_weights(folder: Path, seed: int = SEED, arch: str = "wide_resnet50_2") -> Path:
    """A random-initialised torchvision ``arch`` (default ``wide_resnet50_2``) state dict file
    (written once, atomically).

    The stand-in for ImageNet weights, which do not exist on this machine; anomalib's side
    uses its own random initialisation (timm, ``pre_trained=False``): the cost is the same.
    """
    import torch
    import torchvision

    from anomalib_study.io import atomic_write

    target = Path(folder) / f"{arch}_random_seed{seed}.pth"
    if not target.is_file():
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        state = getattr(torchvision.models, arch)(weights=None).state_dict()
        with atomic_write(target, "wb") as handle:
            torch.save(state, handle)
    return target


def make_tiny_magnetic_tile(
    root: Path, n_free: int = 8, n_train: int = 6, n_defect: int = 4, size: int = 40, seed: int = SEED
) -> Path:
    """``root/magnetic_tile`` in the Magnetic-tile layout with seeded noise tiles (``--quick``):
    ``n_free`` MT_Free images (the first ``n_train`` listed for training) and ``n_defect``
    MT_Blowhole images with empty masks. Returns ``root``."""
    import numpy as np
    from PIL import Image

    base = Path(root) / "magnetic_tile"
    rng = np.random.default_rng(seed)
    names = [f"exp0_num_{i}.jpg" for i in range(n_free)]
    for folder, files in (("MT_Free", names), ("MT_Blowhole", [f"exp1_num_{i}.jpg" for i in range(n_defect)])):
        (base / folder / "Imgs").mkdir(parents=True, exist_ok=True)
        for name in files:
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(base / folder / "Imgs" / name)
            if folder == "MT_Blowhole":
                Image.fromarray(np.zeros((size, size), np.uint8)).save(
                    base / folder / "Imgs" / name.replace(".jpg", ".png")
                )
    (base / "mtd_train_filenames.txt").write_text("\n".join(names[:n_train]) + "\n")
    return Path(root)
