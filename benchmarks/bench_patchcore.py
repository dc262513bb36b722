"""Our PatchCore against anomalib 2.7.0's, on the same images, side by side. Writes one JSON.

    bash benchmarks/setup_anomalib_venv.sh            # once: anomalib in its own venv
    python benchmarks/bench_patchcore.py [--data DIR] [--sizes 50 300] [--out reports/benchmarks/patchcore.json]

What is compared (every setting is written to the JSON):

* the same training images: the first N Magnetic-tile MT_Free images of
  ``mtd_train_filenames.txt`` (the DifferNet / PatchCore training split), N in ``--sizes``;
* the same test images for predict speed: ``--n-test`` images drawn with a fixed seed from
  the Magnetic-tile test split (normals and defects);
* the same backbone: torchvision's ``wide_resnet50_2`` architecture with RANDOM weights
  (no WideResNet weights exist on this machine; a cost comparison does not need trained
  ones). anomalib builds it through timm with ``pre_trained=False``; we load a random-init
  torchvision state dict written once to a temporary file (our loader is strict);
* the same layers (layer2 + layer3), image size (224 px, our backbone's preprocessing,
  used verbatim on both sides), coreset ratio (0.10) and torch threads.

Each measurement runs in its own process (anomalib's in its venv via
``benchmarks/anomalib_side.py``, ours via ``python benchmarks/bench_patchcore.py --our-side``),
so that ``ru_maxrss`` (the resident-set high-water mark) is the peak of that one run. The
ratios are ``fit_speedup`` = anomalib fit s / ours, ``predict_speedup`` = our images/s /
anomalib's, ``peak_memory_ratio`` = our peak RSS / anomalib's. The 1-minute load average
is recorded with every measurement: other work on a shared machine slows both sides.

A long anomalib run (its fit at 300 images takes about 45 minutes) may be started ahead
with ``--anomalib-only N`` (same work folder); the main run then reuses its result when the
parameters and image lists match. Sizes for which anomalib has no result are never
invented: an extrapolation (quadratic fit of its coreset time in N) is written under a key
that says so.

The scaling table (``--scaling``) fits OUR PatchCore on 100 / 300 / 761 Magnetic-tile
normals and reports fit time, coreset time per training image and peak memory against the
size of the patch bank.

Precision (``--precisions fp32 bf16``): our side is measured in each precision side by side
(``PatchCore(precision=...)``: backbone forward under bf16 autocast, bank search in bf16
re-ranked in float32). Every predict timing carries its physical floor, measured in the
same process: the matrix-product throughput (fp32 and bf16 GFLOP/s, ``torch.mm``), the
FLOP count of the backbone forward (``torch.utils.flop_counter.FlopCounterMode`` on one
image) and of the search (2 q N d for the products + 3 q r d for the float32 re-ranking of
r candidates), the time that work takes at that throughput, and ``limit_ratio`` = measured
predict time / floor time. ``rerank_hit_rate`` is how often the bf16 candidates held the
exact float32 nearest neighbour (:meth:`NearestNeighbourIndex.rerank_hit_rate`), on the
real bank of the fit runs. ``coreset_precision`` compares the greedy coreset with fp32 /
bf16 / fp16 distance updates (time, overlap with the fp32 selection, covering radius).

A setting may also name fewer search dimensions, ``<precision>@<dims>`` (e.g. ``bf16@256``):
``PatchCore(precision=..., search_dim=dims)``, whose bank search takes its candidates from the
bank's first ``dims`` principal components and re-ranks the best 8 of each patch exactly on
every feature; its floor counts the candidate products at ``dims`` columns, the projection of
the queries (2 q d dims, fp32 rate) and the re-ranking.

``--quick`` runs only our side, in this process, on a few generated 64 px tiles with a
random ResNet-18 (seconds; no anomalib, no data); it writes nothing unless ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "patchcore.json"
DEFAULT_VENV = Path(os.environ.get("ANOMALIB_VENV", "/work/.venvs/anomalib-2.7.0"))
DEFAULT_WORK = Path(tempfile.gettempdir()) / "bench_patchcore"
ANOMALIB_SIDE = Path(__file__).resolve().parent / "anomalib_side.py"

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


def parse_setting(setting: str) -> tuple[str, int | None]:
    """``"fp32"`` / ``"bf16"`` / ``"auto"``, optionally ``@<dims>`` -> (precision, search_dim or None).

    Raises StudyError naming the setting when it is neither."""
    from anomalib_study.errors import StudyError

    precision, at, dims = str(setting).partition("@")
    if precision not in ("fp32", "bf16", "auto") or (at and not (dims.isdigit() and int(dims) >= 1)):
        raise StudyError(
            f"unknown setting {setting!r}: give fp32, bf16 or auto, optionally followed by @<search "
            "dimensions>, e.g. bf16@256"
        )
    return precision, int(dims) if dims else None


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

    # torchvision ResNets: resize the short side to size*256/224, centre-crop size (backbone_models._build_resnet)
    return make_preprocessing(int(round(image_size * 256 / 224)), image_size, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


# --------------------------------------------------------------------------------------
# anomalib's side (subprocess in its venv)
# --------------------------------------------------------------------------------------
def anomalib_python(venv: Path = DEFAULT_VENV) -> Path:
    """The venv's python; StudyError with the fix when the venv is missing."""
    from anomalib_study.errors import StudyError

    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        raise StudyError(
            f"anomalib venv not found at {venv}: run `bash benchmarks/setup_anomalib_venv.sh` "
            "(or set ANOMALIB_VENV to its folder)"
        )
    return python


def run_anomalib(
    n_train: int,
    work: Path,
    data: Path,
    venv: Path = DEFAULT_VENV,
    n_test: int = N_TEST,
    ratio: float = CORESET_RATIO,
    threads: int = 2,
    reuse: bool = True,
) -> dict:
    """anomalib's fit + predict on the first ``n_train`` training images, in its own process.

    Result (the JSON of anomalib_side.py) is cached as ``work/anomalib_<n>.json`` keyed by
    the image lists' hashes and the parameters; ``reuse`` takes a matching cached result.
    """
    from anomalib_study.errors import StudyError
    from anomalib_study.io import write_json

    work.mkdir(parents=True, exist_ok=True)
    train, test = magnetic_tile_lists(data, n_train, n_test)
    train_sha = write_list(train, work / f"train_{n_train}.txt")
    test_sha = write_list(test, work / f"test_{n_test}.txt")
    pre = preprocessing_of()
    key = {
        "train_sha256": train_sha,
        "test_sha256": test_sha,
        "ratio": ratio,
        "threads": threads,
        "backbone": BACKBONE,
        "layers": list(LAYERS),
        "preprocessing": pre,
    }
    cached = work / f"anomalib_{n_train}.json"
    if reuse and cached.is_file():
        previous = json.loads(cached.read_text())
        if previous.get("key") == key:
            log(f"anomalib N={n_train}: reusing {cached} (measured {previous.get('measured_at')})")
            return _with_rate_profile(previous, work / f"anomalib_{n_train}.log")
    command = [
        str(anomalib_python(venv)),
        "-W",
        "ignore",
        str(ANOMALIB_SIDE),
        "--train-list",
        str(work / f"train_{n_train}.txt"),
        "--test-list",
        str(work / f"test_{n_test}.txt"),
        "--preprocessing",
        json.dumps(pre),
        "--backbone",
        BACKBONE,
        "--layers",
        *LAYERS,
        "--coreset-ratio",
        str(ratio),
        "--threads",
        str(threads),
    ]
    log(f"anomalib N={n_train}: running in {venv} ...")
    started = _dt.datetime.now().isoformat(timespec="seconds")
    stderr_log = work / f"anomalib_{n_train}.log"  # progress of a long run: tail -f this file
    with open(stderr_log, "w", encoding="utf-8") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(work))
    if done.returncode != 0:
        tail = stderr_log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise StudyError(f"anomalib side failed (exit {done.returncode}) for N={n_train} (log {stderr_log}):\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update({"key": key, "measured_at": started, "command": " ".join(command[:4]) + " ..."})
    result = _with_rate_profile(result, stderr_log)
    write_json(cached, result)
    return result


def _with_rate_profile(result: dict, log_path: Path) -> dict:
    """``result`` with ``coreset_rate_profile`` read from anomalib's progress log, where it has none yet."""
    if "coreset_rate_profile" not in result and log_path.is_file():
        result = {
            **result,
            "coreset_rate_profile": coreset_rate_profile(log_path.read_text(encoding="utf-8", errors="replace")),
        }
    return result


# --------------------------------------------------------------------------------------
# Our side (subprocess: `python benchmarks/bench_patchcore.py --our-side ...`)
# --------------------------------------------------------------------------------------
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


def coreset_check_on_images(
    train_paths: Sequence[Path],
    backbone: str = BACKBONE,
    weights: Path | None = None,
    layers: Sequence[str] | None = LAYERS,
    image_size: int | None = None,
    ratio: float = CORESET_RATIO,
) -> dict:
    """:func:`coreset_precision_check` on the patch features of ``train_paths`` (fp32 forward)."""
    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import PatchCore

    module = load_backbone(backbone, weights=weights, image_size=image_size)
    model = PatchCore(backbone=module, layers=None if layers is None else list(layers), progress=False)
    patches, _ = model.extract_patches(list(train_paths))
    check = coreset_precision_check(patches.reshape(-1, patches.shape[-1]), ratio=ratio)
    check["n_images"] = len(train_paths)
    return check


def quick(work: Path, out: Path | None = None, precisions: Sequence[str] = PRECISIONS) -> dict:
    """The ``--quick`` smoke run: our side only, in this process, on a tiny generated Magnetic-tile
    tree (6 training, 4 test tiles), a random ResNet-18 at 64 px; every figure of the full run
    (fit, predict, floor, limit_ratio, re-rank hit rate, coreset precision), none meaningful
    as a speed measurement. Writes ``out`` when given."""
    import warnings

    from anomalib_study.io import write_json

    data = make_tiny_magnetic_tile(work / "tiny_data")
    train, test = magnetic_tile_lists(data, n_train=6, n_test=4)
    weights = random_wide_resnet_weights(work, arch="resnet18")
    options = {"backbone": "resnet18", "weights": weights, "layers": ("layer2", "layer3"), "image_size": 64}
    report: dict[str, Any] = {
        "benchmark": "bench_patchcore --quick (smoke run, not a measurement)",
        "quick": True,
        "machine": machine_info(),
        "precisions": list(precisions),
        "ours_by_precision": {},
        "predict_only_by_precision": {},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="precision='bf16'")  # emulated bf16 on this CPU: expected
        for precision in precisions:
            log(f"quick: our fit + predict, {precision} ...")
            fitted = our_side(
                train, test, coreset_ratio=0.5, precision=precision, matmul_shape=QUICK_MATMUL_SHAPE, **options
            )
            report["ours_by_precision"][precision] = {k: v for k, v in fitted.items() if k != "image_scores"}
            log(f"quick: our predict only, {precision} ...")
            report["predict_only_by_precision"][precision] = our_predict_only(
                test, 100, precision=precision, matmul_shape=QUICK_MATMUL_SHAPE, **options
            )
    log("quick: coreset precision check ...")
    report["coreset_precision"] = coreset_check_on_images(train, ratio=0.5, **options)
    report["limit_ratio"] = {p: r["limit_ratio"] for p, r in report["ours_by_precision"].items()}
    report["rerank_hit_rate"] = {p: r["rerank_hit_rate"]["hit_rate"] for p, r in report["ours_by_precision"].items()}
    if out is not None:
        write_json(out, report)
    for precision, r in report["ours_by_precision"].items():
        floor = r["floor"]
        print(
            f"{precision}: fit {r['fit_s']:.2f} s, predict {r['predict_s']:.2f} s (floor {floor['floor_s']:.4f} s: "
            f"forward {floor['forward_floor_s']:.4f} + search {floor['search_floor_s']:.4f}), limit_ratio "
            f"{r['limit_ratio']:.1f}, re-rank hit rate {r['rerank_hit_rate']['hit_rate']:.3f}"
        )
    return report


# --------------------------------------------------------------------------------------
# The physical floor: FLOPs and the measured matrix-product throughput
# --------------------------------------------------------------------------------------
def matmul_throughput(
    shape: Sequence[int] = MATMUL_SHAPE, repeats: int = 3, seed: int = SEED, budget_s: float = 1.0
) -> dict:
    """Measured ``torch.mm`` throughput in GFLOP/s, float32 and bfloat16, with this process's threads.

    One untimed warm-up product per type, then the median of up to ``repeats`` timed ones of
    an (m, k) x (k, n) product (2 m k n FLOPs), stopping early once ``budget_s`` seconds are
    spent (at least one; emulated bf16 is slow).
    """
    import statistics

    import torch

    m, k, n = (int(v) for v in shape)
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    out: dict[str, Any] = {"shape_mkn": [m, k, n], "repeats": repeats, "torch_threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)
        times: list[float] = []
        while len(times) < repeats and (not times or sum(times) < budget_s):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        out[f"{name}_timed_products"] = len(times)
        out[f"{name}_gflops"] = 2.0 * m * k * n / statistics.median(times) / 1e9
    return out


def forward_flops_per_image(module, layers: Sequence[str]) -> int:
    """FLOPs of one image through ``module`` up to ``layers`` (torch's FlopCounterMode; the
    same count in fp32 and under bf16 autocast)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = int(module.image_size)
    x = torch.zeros(1, 3, side, side, device=module.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(x, layers=list(layers), embedding=False)
    return int(counter.get_total_flops())


def search_flops(n_queries: int, bank_rows: int, dim: int, rerank: int = 0, candidate_dim: int | None = None) -> dict:
    """FLOPs of an exhaustive search: ``products`` = 2 q N d' (the distance products, d' = ``candidate_dim``
    or d), ``projection`` = 2 q d d' (the queries onto d' < d principal components, else 0),
    ``rerank`` = 3 q r d (exact float32 distances of r candidates: subtract, square, add)."""
    width = int(dim) if candidate_dim is None else min(int(candidate_dim), int(dim))
    return {
        "products": 2 * int(n_queries) * int(bank_rows) * width,
        "projection": 2 * int(n_queries) * int(dim) * width if width < int(dim) else 0,
        "rerank": 3 * int(n_queries) * int(rerank) * int(dim),
    }


def physical_floor(n_images: int, forward_flops: int, searched: dict, throughput: dict, precision: str) -> dict:
    """Seconds the forward's and the search's floating-point work take at the measured throughput.

    ``precision`` "fp32": everything at the fp32 rate; "bf16": the forward and the search
    products at the bf16 rate, the query projection and the re-ranking at the fp32 rate.
    """
    rate = throughput[f"{precision}_gflops"] * 1e9
    forward_s = n_images * forward_flops / rate
    fp32_work = searched["rerank"] + searched.get("projection", 0)
    search_s = searched["products"] / rate + fp32_work / (throughput["fp32_gflops"] * 1e9)
    return {
        "precision": precision,
        "forward_gflop": n_images * forward_flops / 1e9,
        "search_gflop": (searched["products"] + fp32_work) / 1e9,
        "throughput_gflops": throughput[f"{precision}_gflops"],
        "forward_floor_s": forward_s,
        "search_floor_s": search_s,
        "floor_s": forward_s + search_s,
    }


def _floor_of_predict(model, module, layers, n_images: int, predict_s: float, throughput: dict) -> dict:
    """The floor of one predict run of ``model`` (fitted) on ``n_images`` images, and limit_ratio."""
    per_image = model.grid_shape_[0] * model.grid_shape_[1]
    width = model.index_.candidate_dim_used_  # None: faiss's own exact search, nothing re-ranked
    rerank = 0 if width is None else min(model.index_.ntotal, max(1, model.index_.rerank))
    # every patch searched with k = 1, then each image's m* with k = num_neighbours (a k-search costs the same)
    searched = search_flops(n_images * (per_image + 1), model.index_.ntotal, model.n_features_in_, rerank, width)
    floor = physical_floor(
        n_images, forward_flops_per_image(module, layers), searched, throughput, model.precision_used_
    )
    floor["predict_s"] = predict_s
    floor["limit_ratio"] = predict_s / floor["floor_s"] if floor["floor_s"] > 0 else None
    return floor


def _hit_rate(model, patches, seed: int = SEED, n_queries: int = HIT_RATE_QUERIES) -> dict:
    """The bf16 re-rank hit rate of ``model``'s bank on a seeded sample of ``patches`` (n, p, D)."""
    import numpy as np

    rows = patches.reshape(-1, patches.shape[-1])
    pick = np.sort(np.random.default_rng(seed).choice(rows.shape[0], size=min(n_queries, rows.shape[0]), replace=False))
    return model.index_.rerank_hit_rate(rows[pick])


def coreset_precision_check(
    features,
    ratio: float = CORESET_RATIO,
    projection_dim: int = 128,
    seed: int = SEED,
    precisions: Sequence[str] = ("fp32", "bf16", "fp16"),
) -> dict:
    """The greedy coreset of ``features`` (N, D) with each distance-update precision: seconds,
    share of the fp32 selection chosen too, and covering radius (largest distance of a row to
    its nearest centre, in the projected space, exact faiss search) relative to fp32's."""

    from anomalib_study.methods.coreset import GreedyCoresetSampler, selection_overlap
    from anomalib_study.search import NearestNeighbourIndex

    out: dict[str, Any] = {
        "n_rows": int(features.shape[0]),
        "dim": int(features.shape[1]),
        "ratio": ratio,
        "projection_dim": projection_dim,
    }
    projected = GreedyCoresetSampler(ratio=ratio, projection_dim=projection_dim, seed=seed).project(features).numpy()
    reference = None
    for precision in precisions:
        sampler = GreedyCoresetSampler(ratio=ratio, projection_dim=projection_dim, seed=seed, precision=precision)
        start = time.perf_counter()
        chosen = sampler.run(features)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = chosen
        index = NearestNeighbourIndex().fit(projected[chosen])
        radius = float(index.search(projected, 1)[0].max())
        out[precision] = {
            "seconds": seconds,
            "n_centres": int(len(chosen)),
            "overlap_with_fp32": selection_overlap(chosen, reference),
            "covering_radius": radius,
        }
    for precision in precisions:
        out[precision]["covering_radius_vs_fp32"] = (
            out[precision]["covering_radius"] / out[precisions[0]]["covering_radius"]
        )
        out[precision]["speedup_vs_fp32"] = out[precisions[0]]["seconds"] / out[precision]["seconds"]
    return out


# --------------------------------------------------------------------------------------
# Ratios, extrapolation, table
# --------------------------------------------------------------------------------------
def ratios(ours: dict, theirs: dict) -> dict[str, float | None]:
    """The comparison of one training-set size (None where a side lacks the figure).

    ``fit_speedup`` = anomalib fit s / our fit s (> 1: we are faster);
    ``predict_speedup`` = our images/s / anomalib's (> 1: we are faster);
    ``peak_memory_ratio`` = our peak RSS / anomalib's (< 1: we use less), whole processes;
    ``peak_memory_above_imports_ratio``: the same on (peak - RSS after imports), which
    discounts the ~1 GB that importing anomalib's whole package costs before any work;
    ``fit_cpu_speedup`` / ``predict_cpu_speedup``: the same on CPU seconds (user + system),
    which other programs on a shared machine disturb less than wall time.
    """

    def div(a, b):
        return None if a is None or b in (None, 0) else float(a) / float(b)

    def above(side):
        base = side.get("rss_after_imports_mb", side.get("rss_before_model_mb"))
        return None if base is None or side.get("peak_rss_mb") is None else side["peak_rss_mb"] - base

    return {
        "fit_speedup": div(theirs.get("fit_s"), ours.get("fit_s")),
        "predict_speedup": div(ours.get("predict_images_per_s"), theirs.get("predict_images_per_s")),
        "peak_memory_ratio": div(ours.get("peak_rss_mb"), theirs.get("peak_rss_mb")),
        "peak_memory_above_imports_ratio": div(above(ours), above(theirs)),
        "coreset_speedup": div(theirs.get("fit_coreset_s"), ours.get("fit_coreset_s")),
        "fit_cpu_speedup": div(theirs.get("fit_cpu_s"), ours.get("fit_cpu_s")),
        "predict_cpu_speedup": div(theirs.get("predict_cpu_s"), ours.get("predict_cpu_s")),
        # anomalib's fit had its coreset loop run at its fastest sustained rate throughout (an estimate that
        # removes any slowing by other processes from anomalib's side only: the conservative fit ratio)
        "fit_speedup_at_anomalib_p90_rate": div(_fit_at_p90_rate(theirs), ours.get("fit_s")),
    }


def _fit_at_p90_rate(theirs: dict) -> float | None:
    """anomalib's fit seconds with its coreset loop at ``coreset_rate_profile.p90_rate`` (None without a profile)."""
    profile = theirs.get("coreset_rate_profile") or {}
    estimate = profile.get("coreset_s_at_p90_rate")
    if estimate is None or theirs.get("fit_s") is None or theirs.get("fit_coreset_s") is None:
        return None
    return (
        float(theirs["fit_s"]) - float(theirs["fit_coreset_s"]) + min(float(estimate), float(theirs["fit_coreset_s"]))
    )


_TQDM = re.compile(r"Selecting Coreset Indices\.:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<")


def coreset_rate_profile(log_text: str, window_s: float = 60.0) -> dict | None:
    """How steadily anomalib's coreset loop ran, read from its tqdm progress lines in ``log_text``.

    Each greedy step costs the same (a distance update over every bank row), so on a quiet
    machine the steps per second stay flat; another process on the same cores slows them for
    as long as it runs. Returns, over ``window_s``-second windows of the loop's elapsed time:
    ``rates`` (steps/s of each full window), ``median_rate``, ``p90_rate`` (a fast, sustained
    rate: the undisturbed speed unless most of the run was disturbed), ``slowest_rate``,
    ``seconds_below_80pct_of_p90``, ``steps``, ``elapsed_s`` and ``coreset_s_at_p90_rate``
    (the loop's time had it run at ``p90_rate`` throughout: an estimate, for reading a ratio
    measured under load). None when the log holds no coreset progress.
    """
    import math

    import numpy as np

    points = []
    for match in _TQDM.finditer(log_text):
        done, total, hours, minutes, seconds = match.groups()
        points.append((int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds), int(done), int(total)))
    if len(points) < 2:
        return None
    elapsed, steps = points[-1][0], points[-1][2]
    ends = {}
    for t, done, _ in points:  # the last count seen in each window (a count at t = 60 s closes the first)
        if t > 0:
            ends[math.ceil(t / window_s) - 1] = done
    rates, previous, last = [], 0, -1
    for window in range(int(elapsed // window_s)):  # full windows only
        if window in ends:  # (a window without an update joins the next one)
            rates.append((ends[window] - previous) / (window_s * (window - last)))
            previous, last = ends[window], window
    if not rates:
        return None
    p90 = float(np.percentile(rates, 90))
    return {
        "window_s": window_s,
        "rates": [round(r, 3) for r in rates],
        "median_rate": float(np.median(rates)),
        "p90_rate": p90,
        "slowest_rate": float(min(rates)),
        "seconds_below_80pct_of_p90": window_s * sum(r < 0.8 * p90 for r in rates),
        "steps": steps,
        "elapsed_s": float(elapsed),
        "coreset_s_at_p90_rate": steps / p90 if p90 > 0 else None,
    }


def quadratic_extrapolation(sizes: Sequence[float], seconds: Sequence[float], target: float) -> float:
    """Least-squares ``a * n**2 + b * n`` through the measured (size, seconds), evaluated at ``target``.

    No constant term: zero images cost zero. Needs at least two distinct sizes. Used ONLY
    for anomalib sizes that could not be measured, and labelled as an extrapolation.
    """
    import numpy as np

    from anomalib_study.errors import ParameterError

    n = np.asarray(sizes, dtype=float)
    if len(set(n.tolist())) < 2 or len(n) != len(seconds):
        raise ParameterError(f"quadratic_extrapolation needs >= 2 distinct sizes with one time each, got {list(sizes)}")
    design = np.stack([n**2, n], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.asarray(seconds, dtype=float), rcond=None)
    return float(a * target**2 + b * target)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) in ``columns`` order; floats with 3 significant digits."""

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def our_side(
    train_paths: Sequence[Path],
    test_paths: Sequence[Path],
    backbone: str = BACKBONE,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] | None = LAYERS,
    coreset_ratio: float = CORESET_RATIO,
    image_size: int | None = None,
    batch_size: int = 8,
    threads: int = 0,
    device: str = "cpu",
    progress: bool = False,
    precision: str = "fp32",
    matmul_shape: Sequence[int] = MATMUL_SHAPE,
) -> dict:
    """Our PatchCore timed like anomalib_side.py: fit_paths on ``train_paths`` then score_paths on ``test_paths``.

    The backbone is loaded BEFORE the clocks start (anomalib's model is also built before
    its fit). Every training image goes into the bank (``calibration_fraction=0``, as in
    anomalib and the paper); ``num_neighbours=9`` as anomalib. ``fit_s`` is the wall time of
    ``fit_paths`` (decode + backbone + patch features + coreset + exact faiss index);
    ``predict_*`` cover ``score_paths`` (decode + backbone + search + both image scores +
    smoothed anomaly maps). Peak memory is this process's ru_maxrss (MiB). ``precision`` is
    PatchCore's; after the timed predict (untimed): the matrix-product throughput, the
    predict's physical floor and ``limit_ratio``, and the re-rank hit rate on the real bank.
    """
    import torch

    from anomalib_study import __version__
    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import PatchCore

    precision, search_dim = parse_setting(precision)
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "side": "anomalib_study",
        "anomalib_study": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "n_train": len(train_paths),
        "n_test": len(test_paths),
        "load_average_start": load_average(),
        "rss_after_imports_mb": peak_rss_mb(),
    }
    module = load_backbone(backbone, weights=weights, device=device, image_size=image_size)
    result["rss_after_model_mb"] = peak_rss_mb()
    model = PatchCore(
        backbone=module,
        layers=None if layers is None else list(layers),
        coreset_ratio=coreset_ratio,
        calibration_fraction=0.0,
        num_neighbours=9,
        batch_size=batch_size,
        device=device,
        progress=progress,
        precision=precision,
        search_dim=search_dim,
    )
    result["parameters"] = {k: v for k, v in model.get_params().items() if k != "backbone"}
    result["parameters"].update(
        backbone=backbone,
        weights=None if weights is None else str(weights),
        layers=model._patch_maker().resolve_layers(module),
        preprocessing=module.preprocessing,
    )
    cpu_start, start = cpu_seconds(), time.perf_counter()
    model.fit_paths(train_paths)
    fit_s = time.perf_counter() - start
    timings = dict(model.timings_)
    result.update(
        {
            "fit_s": fit_s,
            "fit_cpu_s": cpu_seconds() - cpu_start,
            "fit_extract_s": timings.get("extract_s"),
            "fit_coreset_s": timings.get("coreset_s"),
            "fit_index_s": timings.get("index_s"),
            "bank_rows": int(model.n_train_patches_),
            "bank_dim": int(model.n_features_in_),
            "bank_mb": model.n_train_patches_ * model.n_features_in_ * 4 / 2**20,
            "coreset_rows": int(model.memory_bank_.shape[0]),
            "coreset_s_per_train_image": (timings.get("coreset_s") or 0.0) / max(len(train_paths), 1),
            "peak_rss_after_fit_mb": peak_rss_mb(),
            "load_average_after_fit": load_average(),
        }
    )
    if test_paths:
        cpu_start, start = cpu_seconds(), time.perf_counter()
        scored = model.score_paths(test_paths)
        predict_s = time.perf_counter() - start
        result.update(
            {
                "predict_cpu_s": cpu_seconds() - cpu_start,
                "predict_s": predict_s,
                "predict_images_per_s": len(test_paths) / predict_s,
                "image_scores": [float(v) for v in scored["image_scores"]],
                "anomaly_map_shape": list(scored["anomaly_maps"].shape[1:]),
                "load_average_after_predict": load_average(),
            }
        )
    result["peak_rss_mb"] = peak_rss_mb()  # before the untimed extras below
    result["precision_used"] = model.precision_used_
    if test_paths:
        layers_used = model._patch_maker().resolve_layers(module)
        result["matmul_throughput"] = matmul_throughput(matmul_shape)
        result["floor"] = _floor_of_predict(
            model, module, layers_used, len(test_paths), result["predict_s"], result["matmul_throughput"]
        )
        result["limit_ratio"] = result["floor"]["limit_ratio"]
        sample, _ = model.extract_patches(test_paths[:batch_size])
        result["rerank_hit_rate"] = _hit_rate(model, sample)
    result["peak_memory_note"] = "ru_maxrss of this process (resident-set high-water mark, MiB)"
    return result


def our_predict_only(
    test_paths: Sequence[Path],
    bank_rows: int,
    backbone: str = BACKBONE,
    weights: str | os.PathLike | None = None,
    layers: Sequence[str] | None = LAYERS,
    batch_size: int = 8,
    threads: int = 0,
    device: str = "cpu",
    seed: int = SEED,
    precision: str = "fp32",
    image_size: int | None = None,
    matmul_shape: Sequence[int] = MATMUL_SHAPE,
) -> dict:
    """Our predict timing only, as anomalib_side.py's ``--bank-rows``: a memory bank of
    ``bank_rows`` seeded random rows (the coreset's shape; the search cost depends on the shape
    only), one untimed warm-up batch, then ``score_paths`` on every test image, in ``precision``.
    Then (untimed) the matrix-product throughput of this process, the floor and ``limit_ratio``,
    and the re-rank hit rate against this random bank (``rerank_hit_rate_random_bank``: not
    representative of real banks; the fit runs measure it on a real one)."""
    import numpy as np
    import torch

    from anomalib_study.backbones import load_backbone
    from anomalib_study.methods.patchcore import PatchCore

    setting = precision
    precision, search_dim = parse_setting(setting)
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, Any] = {
        "side": "anomalib_study",
        "mode": "predict only (random bank of the coreset's shape)",
        "torch_threads": torch.get_num_threads(),
        "n_test": len(test_paths),
        "load_average_start": load_average(),
        "rss_after_imports_mb": peak_rss_mb(),
    }
    module = load_backbone(backbone, weights=weights, device=device, image_size=image_size)
    model = PatchCore(
        backbone=module,
        layers=None if layers is None else list(layers),
        coreset_ratio=1.0,
        calibration_fraction=0.0,
        num_neighbours=9,
        batch_size=batch_size,
        device=device,
        progress=False,
        precision=precision,
        search_dim=search_dim,
    )
    warm, grid = model.extract_patches(test_paths[:batch_size])  # warm-up batch; gives the grid and dimension
    per_image = grid[0] * grid[1]
    n_images = -(-bank_rows // per_image)
    bank = np.random.default_rng(seed).standard_normal((n_images, per_image, warm.shape[2]), dtype=np.float32)
    model.fit(bank, grid_shape=grid)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    model.score_paths(test_paths)
    predict_s = time.perf_counter() - start
    result.update(
        {
            "bank_rows": int(model.memory_bank_.shape[0]),
            "bank_dim": int(model.n_features_in_),
            "predict_cpu_s": cpu_seconds() - cpu_start,
            "predict_s": predict_s,
            "predict_images_per_s": len(test_paths) / predict_s,
            "load_average_after_predict": load_average(),
            "peak_rss_mb": peak_rss_mb(),
            "precision": setting,
            "precision_used": model.precision_used_,
            "search_dim_used": model.index_.candidate_dim_used_,
        }
    )
    result["matmul_throughput"] = matmul_throughput(matmul_shape)
    result["floor"] = _floor_of_predict(
        model,
        module,
        model._patch_maker().resolve_layers(module),
        len(test_paths),
        predict_s,
        result["matmul_throughput"],
    )
    result["limit_ratio"] = result["floor"]["limit_ratio"]
    if model.index_.candidate_dim_used_ is not None:  # a re-ranked search: how often it was exact (random bank)
        result["rerank_hit_rate_random_bank"] = _hit_rate(model, warm)
    return result


def predict_side_by_side(
    sizes: Sequence[int],
    data: Path,
    work: Path,
    venv: Path,
    weights: Path,
    n_test: int = N_TEST,
    threads: int = 2,
    repeats: int = 2,
    precisions: Sequence[str] = PRECISIONS,
) -> dict:
    """Predict speed of both sides in turn, in this one run: for each training-set size N, a
    memory bank of the 10 % coreset's shape (N x 784 patches x 0.1 rows, 1536 columns),
    ``repeats`` rounds of (anomalib, ours in each of ``precisions``), each a fresh process
    with one warm-up batch. ``predict_speedup`` = median of our images/s / median of
    anomalib's (the first precision, fp32, under the historical keys; every precision under
    ``ours_by_precision`` with its median ``limit_ratio``)."""
    import statistics

    from anomalib_study.errors import StudyError
    from anomalib_study.methods.coreset import coreset_size

    _, test = magnetic_tile_lists(data, max(sizes), n_test)
    test_list = work / f"predict_test_{n_test}.txt"
    write_list(test, test_list)
    patches_per_image = (224 // 8) ** 2  # layer2 of a ResNet has stride 8: 28 x 28 patches at 224 px
    out = {}
    for n in sizes:
        rows = coreset_size(n * patches_per_image, CORESET_RATIO)
        sides = ["anomalib", *[f"ours_{p}" for p in precisions]]
        runs = {side: [] for side in sides}
        for round_ in range(repeats):
            for side in sides:
                if side == "anomalib":
                    command = [
                        str(anomalib_python(venv)),
                        "-W",
                        "ignore",
                        str(ANOMALIB_SIDE),
                        "--test-list",
                        str(test_list),
                        "--preprocessing",
                        json.dumps(preprocessing_of()),
                        "--backbone",
                        BACKBONE,
                        "--layers",
                        *LAYERS,
                        "--threads",
                        str(threads),
                        "--bank-rows",
                        str(rows),
                    ]
                else:
                    command = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "--our-side",
                        "--test-list",
                        str(test_list),
                        "--weights",
                        str(weights),
                        "--threads",
                        str(threads),
                        "--bank-rows",
                        str(rows),
                        "--precision",
                        side.split("_", 1)[1],
                    ]
                log(f"predict side by side N={n} (bank {rows} rows), round {round_ + 1}/{repeats}: {side} ...")
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(work))
                if done.returncode != 0:
                    raise StudyError(f"{side} predict-only run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[side].append(
                    {
                        k: result.get(k)
                        for k in (
                            "predict_images_per_s",
                            "predict_s",
                            "predict_cpu_s",
                            "bank_rows",
                            "bank_dim",
                            "peak_rss_mb",
                            "load_average_start",
                            "load_average_after_predict",
                            "precision_used",
                            "matmul_throughput",
                            "floor",
                            "limit_ratio",
                            "rerank_hit_rate_random_bank",
                        )
                    }
                )
                log(
                    f"  {side}: {result['predict_images_per_s']:.2f} images/s"
                    + (f", limit_ratio {result['limit_ratio']:.2f}" if result.get("limit_ratio") else "")
                )
        medians = {side: statistics.median(r["predict_images_per_s"] for r in v) for side, v in runs.items()}
        cpu = {side: statistics.median(r["predict_cpu_s"] for r in v) for side, v in runs.items()}
        by_precision = {}
        for precision in precisions:
            side = f"ours_{precision}"
            by_precision[precision] = {
                "precision_used": runs[side][-1].get("precision_used"),
                "ours_images_per_s": medians[side],
                "predict_speedup": medians[side] / medians["anomalib"],
                "predict_cpu_speedup": cpu["anomalib"] / cpu[side],
                "limit_ratio": statistics.median(r["limit_ratio"] for r in runs[side]),
                "floor_s": statistics.median(r["floor"]["floor_s"] for r in runs[side]),
                "forward_floor_s": statistics.median(r["floor"]["forward_floor_s"] for r in runs[side]),
                "search_floor_s": statistics.median(r["floor"]["search_floor_s"] for r in runs[side]),
                "predict_s": statistics.median(r["predict_s"] for r in runs[side]),
            }
        first = f"ours_{precisions[0]}"
        out[str(n)] = {
            "bank_rows": rows,
            "n_test": n_test,
            "runs": runs,
            "anomalib_images_per_s": medians["anomalib"],
            "ours_images_per_s": medians[first],
            "predict_speedup": medians[first] / medians["anomalib"],
            "predict_cpu_speedup": cpu["anomalib"] / cpu[first],
            "ours_by_precision": by_precision,
        }
    return out


def run_ours(
    train_paths: Sequence[Path],
    test_paths: Sequence[Path],
    work: Path,
    tag: str,
    backbone: str = BACKBONE,
    weights: Path | None = None,
    coreset_ratio: float = CORESET_RATIO,
    threads: int = 2,
    precision: str = "fp32",
) -> dict:
    """:func:`our_side` in a fresh process (so ru_maxrss is this run's own peak); returns its JSON."""
    from anomalib_study.errors import StudyError

    work.mkdir(parents=True, exist_ok=True)
    train_list, test_list = work / f"ours_{tag}_train.txt", work / f"ours_{tag}_test.txt"
    write_list(train_paths, train_list)
    write_list(test_paths, test_list)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--our-side",
        "--train-list",
        str(train_list),
        "--test-list",
        str(test_list),
        "--backbone",
        backbone,
        "--coreset-ratio",
        str(coreset_ratio),
        "--threads",
        str(threads),
        "--precision",
        precision,
    ]
    if weights is not None:
        command += ["--weights", str(weights)]
    log(f"ours {tag}: {backbone}, {len(train_paths)} train / {len(test_paths)} test images ...")
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    if done.returncode != 0:
        raise StudyError(f"our side failed (exit {done.returncode}) for {tag}:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["measured_at"] = _dt.datetime.now().isoformat(timespec="seconds")
    return result


# --------------------------------------------------------------------------------------
# The two parts of the report
# --------------------------------------------------------------------------------------
def _cached_or_run(path: Path, key: dict, reuse: bool, run) -> dict:
    """A measurement stored at ``path`` with this ``key`` (reuse), else ``run()`` stored there."""
    from anomalib_study.io import write_json

    if reuse and path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("key") == key:
            log(f"reusing {path.name} (measured {previous.get('measured_at')})")
            return previous
    result = run()
    result["key"] = key
    write_json(path, result)
    return result


def _summary(side: dict | None) -> dict | None:
    """The figures of one measurement that go into the report (no per-image scores)."""
    if side is None:
        return None
    keep = (
        "side",
        "anomalib",
        "anomalib_study",
        "torch",
        "measured_at",
        "n_train",
        "n_test",
        "fit_s",
        "fit_extract_s",
        "fit_coreset_s",
        "fit_index_s",
        "coreset_s_per_train_image",
        "fit_cpu_s",
        "predict_cpu_s",
        "bank_rows",
        "bank_dim",
        "bank_mb",
        "coreset_rows",
        "predict_s",
        "predict_images_per_s",
        "peak_rss_after_fit_mb",
        "peak_rss_mb",
        "rss_after_imports_mb",
        "rss_before_model_mb",
        "rss_after_model_mb",
        "torch_threads",
        "load_average_start",
        "load_average_after_extract",
        "load_average_after_fit",
        "load_average_after_predict",
        "precision_used",
        "matmul_throughput",
        "floor",
        "limit_ratio",
        "rerank_hit_rate",
        "coreset_rate_profile",
    )
    return {k: side[k] for k in keep if k in side}


def ours_measurement(
    name: str,
    weights: Path | None,
    n: int,
    data: Path,
    work: Path,
    n_test: int = N_TEST,
    threads: int = 2,
    reuse: bool = True,
    stored_only: bool = False,
    precision: str = "fp32",
) -> dict | None:
    """Our fit + predict for backbone ``name`` on the first ``n`` training images (fresh process,
    stored as ``work/ours_<name>_<n>[_<precision>].json`` and reused when images and settings match).
    ``stored_only``: return the stored result, or None when there is none (never measure)."""
    from anomalib_study.runner import package_sources_hash

    train, test = magnetic_tile_lists(data, n, n_test)
    tag = f"{name}_{n}" if precision == "fp32" else f"{name}_{n}_{precision}"
    key = {
        "precision": precision,
        "train_sha256": write_list(train, work / f"ours_{tag}_train.txt"),
        "test_sha256": write_list(test, work / f"ours_{tag}_test.txt"),
        "backbone": name,
        "weights": None if weights is None else str(weights),
        "ratio": CORESET_RATIO,
        "threads": threads,
        "package_sources": package_sources_hash(),
    }  # a measurement of older code is never reused
    if stored_only:
        stored = work / f"ours_{tag}.json"
        previous = json.loads(stored.read_text()) if stored.is_file() else {}
        return previous if previous.get("key") == key else None
    return _cached_or_run(
        work / f"ours_{tag}.json",
        key,
        reuse,
        lambda: run_ours(train, test, work, tag, name, weights, CORESET_RATIO, threads, precision),
    )


def compare(
    sizes: Sequence[int],
    data: Path,
    work: Path,
    venv: Path,
    weights: Path,
    anomalib_sizes: Sequence[int],
    n_test: int = N_TEST,
    threads: int = 2,
    reuse: bool = True,
    precisions: Sequence[str] = PRECISIONS,
) -> list[dict]:
    """One row per training-set size: anomalib's and our measurement (same images), and the ratios.

    anomalib is run for the sizes in ``anomalib_sizes``; for any other size a stored result
    of an earlier run (``--anomalib-only``) is used if one matches, else the row holds
    ``anomalib: null`` and an extrapolation from the measured sizes, labelled as such.
    Ours is measured in each of ``precisions``: ``ours`` / ``ratios`` hold the first (fp32),
    ``ours_by_precision`` / ``ratios_by_precision`` all of them.
    """
    rows = []
    for n in sizes:
        train, test = magnetic_tile_lists(data, n, n_test)
        theirs = None
        cached = work / f"anomalib_{n}.json"
        if n in anomalib_sizes:
            theirs = run_anomalib(n, work, data, venv, n_test, CORESET_RATIO, threads, reuse)
        elif cached.is_file():
            theirs = (
                run_anomalib(n, work, data, venv, n_test, CORESET_RATIO, threads, reuse=True)
                if json.loads(cached.read_text()).get("key", {}).get("train_sha256")
                == write_list(train, work / f"train_{n}.txt")
                else None
            )
        mine = {
            p: ours_measurement(BACKBONE, weights, n, data, work, n_test, threads, reuse, precision=p)
            for p in precisions
        }
        ours = mine[precisions[0]]
        row = {
            "n_train": n,
            "n_test": n_test,
            "anomalib": _summary(theirs),
            "ours": _summary(ours),
            "ratios": ratios(ours, theirs) if theirs else None,
            "ours_by_precision": {p: _summary(m) for p, m in mine.items()},
            "ratios_by_precision": {p: ratios(m, theirs) if theirs else None for p, m in mine.items()},
        }
        if theirs and ours.get("image_scores") and theirs.get("image_scores"):
            import numpy as np

            # same images, random weights on both sides (different random draws): scores are not
            # expected to agree; their rank correlation is reported only as a sanity figure
            a, b = np.asarray(ours["image_scores"]), np.asarray(theirs["image_scores"])
            row["score_rank_correlation"] = float(
                np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
            )
        rows.append(row)
        r = row["ratios"] or {}
        log(
            f"N={n}: fit ours {ours['fit_s']:.1f} s, anomalib {theirs['fit_s'] if theirs else float('nan'):.1f} s; "
            f"fit_speedup {r.get('fit_speedup')}, predict_speedup {r.get('predict_speedup')}, "
            f"peak_memory_ratio {r.get('peak_memory_ratio')}"
        )
    _extrapolate_missing(rows)
    return rows


def _extrapolate_missing(rows: list[dict]) -> None:
    """For rows without an anomalib measurement: its fit time extrapolated from the measured rows
    (coreset: a*n^2 + b*n least squares; feature extraction: mean seconds per image times n).
    Written under ``anomalib_extrapolated`` / ``ratios_vs_extrapolation``, never as a measurement."""
    measured = [r for r in rows if r["anomalib"]]
    if len(measured) < 2:
        return
    sizes = [r["n_train"] for r in measured]
    coreset = [r["anomalib"]["fit_coreset_s"] for r in measured]
    per_image = sum(r["anomalib"]["fit_extract_s"] / r["n_train"] for r in measured) / len(measured)
    for row in rows:
        if row["anomalib"]:
            continue
        n = row["n_train"]
        coreset_s = quadratic_extrapolation(sizes, coreset, n)
        extract_s = per_image * n
        row["anomalib_extrapolated"] = {
            "EXTRAPOLATION": f"not measured: anomalib's fit at N={n} extrapolated from its measurements at N={sizes}",
            "method": "coreset s = a*n^2 + b*n (least squares); extraction s = mean s/image * n",
            "fit_coreset_s": coreset_s,
            "fit_extract_s": extract_s,
            "fit_s": coreset_s + extract_s,
        }
        ours = row["ours"]
        row["ratios_vs_extrapolation"] = {
            "fit_speedup_extrapolated": (coreset_s + extract_s) / ours["fit_s"],
            "coreset_speedup_extrapolated": coreset_s / ours["fit_coreset_s"] if ours.get("fit_coreset_s") else None,
        }


def scaling(
    sizes: Sequence[int],
    data: Path,
    work: Path,
    backbones: Sequence[tuple[str, Path | None]],
    threads: int = 2,
    reuse: bool = True,
    n_test: int = N_TEST,
    stored_only: bool = False,
) -> list[dict]:
    """OUR fit time, coreset time per image and peak memory against the number of training images.

    One fresh process per (backbone, N); a measurement of the comparison with the same
    backbone, images and settings is reused. ``memory_above_imports_per_bank_mb`` = (peak RSS -
    RSS after imports) / bank size: roughly constant (or falling) when memory grows no faster
    than the bank.
    """
    rows = []
    for name, weights in backbones:
        for n in sizes:
            result = ours_measurement(name, weights, n, data, work, n_test, threads, reuse, stored_only)
            if result is None:
                rows.append(
                    {
                        "backbone": name,
                        "n_train": n,
                        "not_measured": "no stored measurement (run without --stored-only to measure it)",
                    }
                )
                log(f"scaling {name} N={n}: not measured")
                continue
            row = {"backbone": name, "random_weights": weights is not None, **_summary(result)}
            above = result["peak_rss_mb"] - result["rss_after_imports_mb"]
            row["peak_above_imports_mb"] = above
            row["memory_above_imports_per_bank_mb"] = above / result["bank_mb"]
            rows.append(row)
            log(
                f"scaling {name} N={n}: fit {result['fit_s']:.1f} s (coreset {result['fit_coreset_s']:.1f} s), "
                f"peak {result['peak_rss_mb']:.0f} MiB, bank {result['bank_mb']:.0f} MiB"
            )
    return rows


def memory_check(rows: Sequence[dict]) -> dict:
    """Per backbone: does peak memory (above imports) grow no faster than the bank?

    True when, from the smallest to the largest N, the growth factor of (peak - imports) is
    at most the bank's growth factor (+10 % slack for allocator noise).
    """
    out = {}
    for name in dict.fromkeys(r["backbone"] for r in rows):
        mine = sorted((r for r in rows if r["backbone"] == name and "bank_mb" in r), key=lambda r: r["n_train"])
        if len(mine) < 2:
            continue
        first, last = mine[0], mine[-1]
        memory_growth = last["peak_above_imports_mb"] / first["peak_above_imports_mb"]
        bank_growth = last["bank_mb"] / first["bank_mb"]
        out[name] = {
            "n": [first["n_train"], last["n_train"]],
            "memory_growth": memory_growth,
            "bank_growth": bank_growth,
            "memory_grows_no_faster_than_bank": memory_growth <= 1.1 * bank_growth,
        }
    return out


def _native_bf16() -> bool:
    from anomalib_study.hardware import native_bf16

    return bool(native_bf16("cpu"))


def machine_info() -> dict:
    import torch

    from anomalib_study import __version__

    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "anomalib_study": __version__,
        "memory_total_mb": _total_memory_mb(),
        "load_average_1_5_15_min": load_average(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": _native_bf16(),
    }


def _total_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def _flat(rows: Sequence[dict], key: str, source: str = "ratios") -> dict[str, float | None]:
    return {str(r["n_train"]): (r.get(source) or {}).get(key) for r in rows}


def _by_precision(rows: Sequence[dict], key: str, source: str = "ratios_by_precision") -> dict[str, dict]:
    """{precision: {N: value}} from the rows' per-precision dicts (``ratios_by_precision`` or
    ``ours_by_precision``)."""
    out: dict[str, dict] = {}
    for r in rows:
        for precision, values in (r.get(source) or {}).items():
            out.setdefault(precision, {})[str(r["n_train"])] = (values or {}).get(key)
    return out


def build_report(
    rows: Sequence[dict], scaling_rows: Sequence[dict], parameters: dict, started: str, predict_rows: dict | None = None
) -> dict:
    """The JSON report. ``predict_speedup`` is the side-by-side predict timing (same run,
    alternating processes) where there is one, else the predict part of the fit runs."""
    anomalib_version = next((r["anomalib"] for r in rows if r["anomalib"]), None)
    in_fit_runs = _flat(rows, "predict_speedup")
    side_by_side = {n: r["predict_speedup"] for n, r in (predict_rows or {}).items()}
    predict_by_precision: dict[str, dict] = {}
    limit_by_precision: dict[str, dict] = {}
    for n, r in (predict_rows or {}).items():
        for precision, values in (r.get("ours_by_precision") or {}).items():
            predict_by_precision.setdefault(precision, {})[n] = values.get("predict_speedup")
            limit_by_precision.setdefault(precision, {})[n] = values.get("limit_ratio")
    return {
        "benchmark": "PatchCore: anomalib_study vs anomalib 2.7.0 (same images, backbone, size, coreset ratio)",
        "started": started,
        "machine": machine_info(),
        "anomalib_version": "2.7.0" if anomalib_version else None,
        "parameters": parameters,
        "fit_speedup": _flat(rows, "fit_speedup"),
        "fit_speedup_at_anomalib_p90_rate": _flat(rows, "fit_speedup_at_anomalib_p90_rate"),
        "fit_speedup_at_anomalib_p90_rate_by_precision": _by_precision(rows, "fit_speedup_at_anomalib_p90_rate"),
        "predict_speedup": side_by_side or in_fit_runs,
        "predict_speedup_source": "predict_side_by_side" if side_by_side else "comparison (predict after each fit)",
        "predict_speedup_in_fit_runs": in_fit_runs,
        "predict_side_by_side": predict_rows or {},
        "peak_memory_ratio": _flat(rows, "peak_memory_ratio"),
        "peak_memory_above_imports_ratio": _flat(rows, "peak_memory_above_imports_ratio"),
        "coreset_speedup": _flat(rows, "coreset_speedup"),
        "fit_cpu_speedup": _flat(rows, "fit_cpu_speedup"),
        "predict_cpu_speedup": _flat(rows, "predict_cpu_speedup"),
        "fit_speedup_extrapolated": {
            k: v for k, v in _flat(rows, "fit_speedup_extrapolated", "ratios_vs_extrapolation").items() if v is not None
        },
        "precisions": sorted({p for r in rows for p in (r.get("ours_by_precision") or {})} | set(predict_by_precision)),
        "fit_speedup_by_precision": _by_precision(rows, "fit_speedup"),
        "predict_speedup_by_precision": predict_by_precision,
        "peak_memory_ratio_by_precision": _by_precision(rows, "peak_memory_ratio"),
        "limit_ratio": limit_by_precision,
        "limit_ratio_in_fit_runs": _by_precision(rows, "limit_ratio", "ours_by_precision"),
        "rerank_hit_rate": {
            p: {n: (v or {}).get("hit_rate") for n, v in values.items()}
            for p, values in _by_precision(rows, "rerank_hit_rate", "ours_by_precision").items()
        },
        "goals": {
            "fit_speedup_at_300": ">= 20",
            "predict_speedup_at_300": ">= 3",
            "peak_memory_ratio": "<= 1",
            "limit_ratio_of_our_predict": "<= 1.5",
        },
        "comparison": list(rows),
        "scaling": list(scaling_rows),
        "scaling_memory_check": memory_check(scaling_rows) if scaling_rows else {},
        "notes": [
            "Timings are wall-clock seconds on a shared 2-core machine: other processes ran at the same time "
            "(see the load averages recorded with every measurement), which slows both sides.",
            "Peak memory = resource.getrusage(RUSAGE_SELF).ru_maxrss of the measuring process (one process per "
            "measurement); tracemalloc does not see torch's native allocations. It includes the imports: "
            "'peak_memory_above_imports_ratio' discounts them (anomalib's package import alone is ~1 GB).",
            "Backbone wide_resnet50_2 with random weights on both sides (no WideResNet weights exist here): "
            "the cost is that of trained weights; the scores are not comparable.",
            "anomalib is driven through PatchcoreModel (forward in training mode per batch = "
            "Patchcore.training_step, subsample_embedding = Patchcore.fit), without Lightning's loop.",
            "Any anomalib figure under 'anomalib_extrapolated' is an extrapolation, not a measurement.",
            "anomalib's coreset loop costs the same per step, so its steps per second (read from its progress "
            "log: 'coreset_rate_profile' of each anomalib measurement) show when other processes slowed it; "
            "'fit_speedup_at_anomalib_p90_rate' divides the anomalib fit it would have taken at its fastest "
            "sustained rate (90th percentile of its one-minute rates) by ours: the conservative fit ratio.",
            "predict_speedup comes from 'predict_side_by_side': both sides timed in turn in this one run, each "
            "in a fresh process with one untimed warm-up batch, against a memory bank of the 10 % coreset's "
            "shape filled with seeded random rows (exact search: its cost depends on the shape only); the "
            "median over the rounds. 'predict_speedup_in_fit_runs' is the predict part of the fit runs, which "
            "ran at other times (other machine load).",
            "limit_ratio = our measured predict seconds / the seconds the forward's FLOPs (FlopCounterMode) and the "
            "search's (2 q N d products + 3 q r d re-ranking) take at the torch.mm throughput measured in the same "
            "process (fp32 and bf16 GFLOP/s under 'matmul_throughput'); 1 would be the matrix units' limit.",
            "rerank_hit_rate: share of test patches whose exact float32 nearest bank patch was among the bf16 "
            "search's candidates (measured on the real bank of the fit runs; the predict-only runs' figure is "
            "against a random bank and labelled so).",
        ],
    }


def carry_over_scaling(report: dict, previous_out: Path) -> None:
    """With ``--scaling-sizes`` left empty, keep the scaling table of the report being replaced.

    It is copied with the date and machine of the run that measured it
    (``scaling_carried_over``), so that replacing the comparison does not silently drop a table
    this run did not measure again; nothing is kept when the earlier report has none.
    """
    if not previous_out.is_file():
        return
    previous = json.loads(previous_out.read_text())
    if not previous.get("scaling"):
        return
    report["scaling"] = previous["scaling"]
    report["scaling_memory_check"] = previous.get("scaling_memory_check", {})
    # a table the earlier report itself carried over keeps the run that measured it
    report["scaling_carried_over"] = previous.get("scaling_carried_over") or {
        "from_run_started": previous.get("started"),
        "machine": previous.get("machine"),
        "why": "this run was given no --scaling-sizes: the scaling table is the earlier run's, not measured again",
    }
    report["notes"].append(
        f"The scaling table was not measured in this run: it is carried over from the run "
        f"started {report['scaling_carried_over']['from_run_started']} (see scaling_carried_over)."
    )


def print_tables(report: dict) -> None:
    rows = []
    for r in report["comparison"]:
        a, o, q = r["anomalib"] or {}, r["ours"], r["ratios"] or {}
        ext = r.get("anomalib_extrapolated") or {}
        rows.append(
            {
                "N": r["n_train"],
                "anomalib_fit_s": a.get("fit_s") or (f"~{ext['fit_s']:.0f} (extrap.)" if ext else None),
                "ours_fit_s": o["fit_s"],
                "fit_speedup": q.get("fit_speedup")
                or (f"~{r['ratios_vs_extrapolation']['fit_speedup_extrapolated']:.1f} (extrap.)" if ext else None),
                "anomalib_img/s": a.get("predict_images_per_s"),
                "ours_img/s": o.get("predict_images_per_s"),
                "predict_speedup": q.get("predict_speedup"),
                "fit_cpu_speedup": q.get("fit_cpu_speedup"),
                "predict_cpu_speedup": q.get("predict_cpu_speedup"),
                "anomalib_peak_MiB": a.get("peak_rss_mb"),
                "ours_peak_MiB": o.get("peak_rss_mb"),
                "peak_memory_ratio": q.get("peak_memory_ratio"),
                "load_1min": (o.get("load_average_start") or [None])[0],
            }
        )
    print("\nPatchCore vs anomalib 2.7.0 (wide_resnet50_2 random init, layer2+layer3, 224 px, coreset 10 %)")
    print(format_table(rows, list(rows[0]) if rows else ["N"]))
    if report.get("predict_side_by_side"):
        print("\nPredict speed side by side (same run, alternating processes, bank of the coreset's shape)")
        table = []
        for n, r in report["predict_side_by_side"].items():
            by_precision = r.get("ours_by_precision") or {
                "fp32": {
                    "ours_images_per_s": r["ours_images_per_s"],
                    "predict_speedup": r["predict_speedup"],
                    "predict_cpu_speedup": r["predict_cpu_speedup"],
                }
            }
            for precision, values in by_precision.items():
                table.append(
                    {
                        "N": n,
                        "bank_rows": r["bank_rows"],
                        "precision": precision,
                        "anomalib_img/s": r["anomalib_images_per_s"],
                        "ours_img/s": values["ours_images_per_s"],
                        "predict_speedup": values["predict_speedup"],
                        "predict_cpu_speedup": values.get("predict_cpu_speedup"),
                        "predict_s": values.get("predict_s"),
                        "floor_s": values.get("floor_s"),
                        "forward_floor_s": values.get("forward_floor_s"),
                        "search_floor_s": values.get("search_floor_s"),
                        "limit_ratio": values.get("limit_ratio"),
                    }
                )
        print(
            format_table(
                table,
                [
                    "N",
                    "bank_rows",
                    "precision",
                    "anomalib_img/s",
                    "ours_img/s",
                    "predict_speedup",
                    "predict_cpu_speedup",
                    "predict_s",
                    "floor_s",
                    "forward_floor_s",
                    "search_floor_s",
                    "limit_ratio",
                ],
            )
        )
    if any(r.get("ours_by_precision") for r in report["comparison"]):
        print("\nOur fit + predict by precision (the floor beside each predict timing)")
        table = []
        for r in report["comparison"]:
            for precision, o in (r.get("ours_by_precision") or {}).items():
                q, floor = (r.get("ratios_by_precision") or {}).get(precision) or {}, o.get("floor") or {}
                table.append(
                    {
                        "N": r["n_train"],
                        "precision": precision,
                        "fit_s": o.get("fit_s"),
                        "fit_speedup": q.get("fit_speedup"),
                        "predict_s": o.get("predict_s"),
                        "floor_s": floor.get("floor_s"),
                        "limit_ratio": o.get("limit_ratio"),
                        "peak_memory_ratio": q.get("peak_memory_ratio"),
                        "rerank_hit_rate": (o.get("rerank_hit_rate") or {}).get("hit_rate"),
                    }
                )
        print(
            format_table(
                table,
                [
                    "N",
                    "precision",
                    "fit_s",
                    "fit_speedup",
                    "predict_s",
                    "floor_s",
                    "limit_ratio",
                    "peak_memory_ratio",
                    "rerank_hit_rate",
                ],
            )
        )
    if report.get("coreset_precision"):
        check = report["coreset_precision"]
        print(
            f"\nGreedy coreset by distance-update precision ({check['n_rows']} x {check['dim']} patches, "
            f"ratio {check['ratio']})"
        )
        print(
            format_table(
                [{"precision": p, **check[p]} for p in ("fp32", "bf16", "fp16") if p in check],
                ["precision", "seconds", "speedup_vs_fp32", "overlap_with_fp32", "covering_radius_vs_fp32"],
            )
        )
    if report["scaling"]:
        print("\nScaling of OUR PatchCore (Magnetic-tile normals)")
        print(
            format_table(
                report["scaling"],
                [
                    "backbone",
                    "n_train",
                    "bank_rows",
                    "bank_mb",
                    "fit_s",
                    "fit_cpu_s",
                    "fit_extract_s",
                    "fit_coreset_s",
                    "coreset_s_per_train_image",
                    "peak_rss_mb",
                    "peak_above_imports_mb",
                    "memory_above_imports_per_bank_mb",
                ],
            )
        )
        for name, check in report["scaling_memory_check"].items():
            print(
                f"  {name}: memory grew x{check['memory_growth']:.2f} while the bank grew x{check['bank_growth']:.2f}"
            )


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def _our_side_main(args: argparse.Namespace) -> int:
    test = (
        [Path(line) for line in Path(args.test_list).read_text().split("\n") if line.strip()] if args.test_list else []
    )
    if args.bank_rows:
        result = our_predict_only(
            test,
            args.bank_rows,
            backbone=args.backbone,
            weights=args.weights,
            layers=args.layers,
            threads=args.threads,
            device=args.device,
            precision=args.precision,
            image_size=args.image_size,
            matmul_shape=args.matmul_shape,
        )
        print(json.dumps(result))
        return 0
    train = [Path(line) for line in Path(args.train_list).read_text().split("\n") if line.strip()]
    result = our_side(
        train,
        test,
        backbone=args.backbone,
        weights=args.weights,
        layers=args.layers,
        coreset_ratio=args.coreset_ratio,
        image_size=args.image_size,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        matmul_shape=args.matmul_shape,
    )
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from anomalib_study.errors import StudyError
    from anomalib_study.io import data_root, write_json

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=None,
        help="data folder holding magnetic_tile/ (default $ANOMALIB_STUDY_DATA or ../shared/data)",
    )
    parser.add_argument(
        "--out", default=None, help=f"the JSON report (default {DEFAULT_OUT.relative_to(REPO)}; with --quick: none)"
    )
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="image lists, weights file, stored measurements")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="anomalib's venv (setup_anomalib_venv.sh)")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[50, 100, 300], help="training-set sizes compared (none: skip)"
    )
    parser.add_argument(
        "--anomalib-sizes",
        type=int,
        nargs="*",
        default=None,
        help="sizes anomalib is run for now (default: all --sizes); others use a stored run or "
        "are extrapolated (labelled)",
    )
    parser.add_argument("--n-test", type=int, default=N_TEST, help="test images timed for predict")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--scaling-sizes", type=int, nargs="*", default=[100, 300, 761])
    parser.add_argument("--scaling-backbones", nargs="*", default=["efficientnet_lite0", BACKBONE])
    parser.add_argument("--no-reuse", action="store_true", help="measure again even where a stored result matches")
    parser.add_argument("--note", action="append", default=[], help="a note added to the report (repeatable)")
    parser.add_argument(
        "--stored-only",
        action="store_true",
        help="scaling table from stored measurements only (missing ones are listed as not measured)",
    )
    parser.add_argument(
        "--anomalib-only",
        type=int,
        default=None,
        metavar="N",
        help="only run (and store) anomalib's measurement at N training images, e.g. ahead in the background",
    )
    # the child process of one of our measurements
    parser.add_argument(
        "--predict-sizes",
        type=int,
        nargs="*",
        default=[50, 100, 300],
        help="sizes whose predict speed is timed side by side (bank of the coreset's shape)",
    )
    parser.add_argument("--predict-repeats", type=int, default=2, help="rounds of (anomalib, ours) per size")
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=None,
        help="our PatchCore's settings, measured side by side: fp32, bf16 or auto, each optionally "
        "@<search dimensions> (e.g. bf16@256); the first one fills the historical keys; "
        "default: fp32 and bf16 where the CPU has native bf16, else fp32 only, since emulated "
        "bf16 is many times slower; --quick: fp32 and bf16",
    )
    parser.add_argument(
        "--coreset-check-images",
        type=int,
        default=CORESET_CHECK_IMAGES,
        help="training images whose patches the coreset-precision check uses (0: skip it)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="our side only on tiny generated tiles, random ResNet-18 at 64 px (seconds; smoke run); "
        "writes nothing unless --out is given",
    )
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-shape", type=int, nargs=3, default=list(MATMUL_SHAPE), help=argparse.SUPPRESS)
    parser.add_argument("--our-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bank-rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--train-list", help=argparse.SUPPRESS)
    parser.add_argument("--test-list", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default=BACKBONE, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--layers", nargs="*", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coreset-ratio", type=float, default=CORESET_RATIO, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.our_side:
            if args.layers is None and args.backbone == BACKBONE:
                args.layers = list(LAYERS)
            return _our_side_main(args)
        if args.precisions is not None and not args.precisions:
            raise StudyError("--precisions needs at least one of fp32, bf16, auto")
        for setting in [args.precision, *(args.precisions or [])]:
            parse_setting(setting)
        if args.quick:
            args.precisions = args.precisions or list(PRECISIONS)
            with tempfile.TemporaryDirectory(prefix="bench_patchcore_quick_") as scratch:
                quick(Path(scratch), None if args.out is None else Path(args.out), args.precisions)
            return 0
        args.out = args.out or str(DEFAULT_OUT)
        if args.precisions is None:
            from anomalib_study.hardware import native_bf16

            args.precisions = list(PRECISIONS) if native_bf16("cpu") else ["fp32"]
            if "bf16" not in args.precisions:
                log(
                    "this CPU has no native bf16 (emulated: many times slower): measuring fp32 only; "
                    "pass --precisions fp32 bf16 to measure bf16 anyway"
                )
        data = data_root(args.data) or (REPO.parent / "shared" / "data")
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        venv = Path(args.venv)
        if args.anomalib_only is not None:
            result = run_anomalib(
                args.anomalib_only, work, data, venv, args.n_test, CORESET_RATIO, args.threads, reuse=not args.no_reuse
            )
            print(json.dumps(_summary(result), indent=1))
            return 0
        started = _dt.datetime.now().isoformat(timespec="seconds")
        weights = random_wide_resnet_weights(work)
        anomalib_sizes = args.sizes if args.anomalib_sizes is None else args.anomalib_sizes
        rows = compare(
            args.sizes,
            data,
            work,
            venv,
            weights,
            anomalib_sizes,
            args.n_test,
            args.threads,
            reuse=not args.no_reuse,
            precisions=args.precisions,
        )
        backbones = [(name, weights if name == BACKBONE else None) for name in args.scaling_backbones]
        scaling_rows = (
            scaling(
                args.scaling_sizes,
                data,
                work,
                backbones,
                args.threads,
                not args.no_reuse,
                args.n_test,
                args.stored_only,
            )
            if args.scaling_sizes
            else []
        )
        stored_predict = work / "predict_side_by_side.json"
        if args.stored_only:
            predict_rows = json.loads(stored_predict.read_text()) if stored_predict.is_file() else {}
        elif args.predict_sizes:
            predict_rows = predict_side_by_side(
                args.predict_sizes,
                data,
                work,
                venv,
                weights,
                args.n_test,
                args.threads,
                args.predict_repeats,
                args.precisions,
            )
            write_json(stored_predict, predict_rows)
        else:
            predict_rows = {}
        parameters = {
            "data": str(data),
            "images": "Magnetic-tile MT_Free training split (first N), seeded test draw",
            "backbone": BACKBONE,
            "weights": "random initialisation (torchvision seed 0 / timm)",
            "layers": list(LAYERS),
            "image_size": 224,
            "preprocessing": preprocessing_of(),
            "coreset_ratio": CORESET_RATIO,
            "num_neighbours": 9,
            "batch_size": 8,
            "torch_threads": args.threads,
            "n_test": args.n_test,
            "sizes": list(args.sizes),
            "anomalib_measured_now": list(anomalib_sizes),
            "scaling_sizes": list(args.scaling_sizes),
            "scaling_backbones": list(args.scaling_backbones),
            "precisions": list(args.precisions),
            "matmul_shape_mkn": list(MATMUL_SHAPE),
            "native_bf16": _native_bf16(),
            "hit_rate_queries": HIT_RATE_QUERIES,
            "coreset_check_images": args.coreset_check_images,
        }
        report = build_report(rows, scaling_rows, parameters, started, predict_rows)
        if not args.scaling_sizes:
            carry_over_scaling(report, Path(args.out))
        if args.coreset_check_images and not args.stored_only:
            import torch

            torch.set_num_threads(args.threads)
            train, _ = magnetic_tile_lists(data, args.coreset_check_images, args.n_test)
            log(f"coreset precision check on {len(train)} training images ...")
            report["coreset_precision"] = coreset_check_on_images(train, BACKBONE, weights)
        report["notes"].extend(args.note)
        write_json(args.out, report)
        print_tables(report)
        log(f"wrote {args.out}")
        return 0
    except StudyError as error:
        print(f"bench_patchcore: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
