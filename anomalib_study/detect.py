"""``detect_abnormal``: flag the anomalous images of a folder with any registered method.

The method (``method="knn"``, ``"patchcore"``, ...: :data:`anomalib_study.methods.DETECTORS`)
is fitted on a folder of normal images (``image_dir``) and kept in a **database folder**
(``db_dir``, default ``<method>_db`` in the current folder), reused by later runs as long as
it still matches the method, the backbone and the normal images. Everything
method-specific (how it is fitted on files, scores them, describes itself, its default
threshold rule) comes from the method's own declaration
(:class:`~anomalib_study.methods.base.MethodSpec`); this module holds none of it.

The database folder (``<method>_model.npz`` and ``database.json``, written last), and the
checks that refuse a database of another format, version or method, one whose backbone
differs from the one loaded now, or whose normal images changed since it was built
("stale database"): :mod:`anomalib_study.detect_db`.

Thresholds (higher score = more anomalous; an image is flagged when score > threshold):
each method's own rule, recorded as ``threshold_rule`` in ``config.json``:

* kNN: the ``thres_ratio`` quantile (default 0.92) of the leave-one-out scores of the
  normal images.
* PatchCore: the ``thres_ratio`` quantile (default 0.99) of the image scores of the
  **held-out calibration images**: ``calibration_fraction`` (default 0.1) of the normal
  images, chosen with ``seed``, are kept out of the memory bank and scored like test
  images. So about ``1 - thres_ratio`` of normal images are expected to be flagged.

Image files: every image under a folder, recursively, by the package's one listing rule
(:func:`~anomalib_study.data.decode.image_files`): images behind symbolic links are read,
hidden files and folders and files that are not images (by suffix) are passed over
silently. **Unreadable test images** (empty, truncated, not an image, over the
decompression-bomb limit, a dangling link) are skipped: every readable image is scored,
each skipped file is listed with its reason in ``skipped.csv``, counted in ``config.json``
and summed up in one warning. ``strict=True`` refuses them instead, before any work, naming
every one. Unreadable **normal** images are always refused before any work (a database is
never built silently from fewer images than given), unless ``skip_unreadable_normal=True``,
which leaves them out and records them in the database.

Test images are scored in a stream of chunks, so memory does not grow with the folder
beyond the scores themselves (the maps kept for the overlays are bounded by
``max_overlays``); they are not put in the feature cache (``cache`` serves the normal images).

Every run writes a new folder ``<result_dir>/<timestamp>/`` (never overwritten), built in a
hidden ``<result_dir>/.<timestamp>.<random>.partial/`` folder and renamed when complete, so
an interrupted run (Ctrl-C removes its partial folder; a killed process leaves it hidden)
never leaves a folder that looks like a result. It holds ``abnormal.result`` (the test
images predicted anomalous, one path per line), ``scores.csv`` (path, score, predicted;
higher score = more anomalous), ``skipped.csv`` (path, reason; header only when nothing was
skipped) and ``config.json`` (everything needed to reproduce the run, with timings).
Methods that give anomaly maps (PatchCore) also write ``overlays/``: one small JPEG per
test image flagged anomalous (the ``max_overlays`` highest-scoring ones if more are
flagged), the anomaly map blended on the backbone's input on one colour scale for the
whole run, plus ``overlays/overlays.csv`` (see :mod:`anomalib_study.overlays`).
"""

from __future__ import annotations

import heapq
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomalib_study import __version__
from anomalib_study.checks import check_bool, check_int
from anomalib_study.data.decode import find_unreadable, list_images, unreadable_message
from anomalib_study.detect_db import (
    DB_FILE,
    DB_FORMAT,
    DB_VERSION,
    LEGACY_FORMAT,  # noqa: F401 (re-exported: importable from here as before)
    LEGACY_VERSION,  # noqa: F401
    DetectDatabase,
    KNNDatabase,
    build_database,
    load_database,
    reuse_database,
    save_database,
)
from anomalib_study.errors import DataError, ParameterError
from anomalib_study.io import as_json, atomic_write, folder_lock, run_dir_in_progress, write_json
from anomalib_study.methods import DETECTORS, get_detector
from anomalib_study.methods.base import MethodSpec, RunOptions
from anomalib_study.overlays import overlay_names, write_overlays
from anomalib_study.search import available_cores

__all__ = [
    "detect_abnormal",
    "load_database",
    "save_database",
    "DetectDatabase",
    "KNNDatabase",
    "list_images",
    "resolve_device",
    "write_overlays",
    "DB_FORMAT",
    "DB_VERSION",
    "METHODS",
]

METHODS = tuple(DETECTORS)
#: test images scored per chunk: bounds the memory a run needs whatever the folder's size
CHUNK_IMAGES = 512


# ---------------------------------------------------------------------- the backbone layer
# Thin wrappers so that this module imports without torch models loaded, and so that
# tests can replace them (monkeypatch) by a tiny fake backbone and extractor.
def load_backbone(
    name: str, weights=None, device: str = "cpu", image_size: int | None = None, resize_mode: str = "crop"
):
    """:func:`anomalib_study.backbones.load_backbone` (imported on first use)."""
    from anomalib_study.backbones import load_backbone as _load_backbone

    return _load_backbone(name, weights=weights, device=device, image_size=image_size, resize_mode=resize_mode)


def _load_backbone(name: str, weights, device: str, image_size: int | None, resize_mode: str = "crop"):
    # image_size and resize_mode only when given, so that simple replacements of load_backbone keep working
    options = {} if image_size is None else {"image_size": image_size}
    if resize_mode != "crop":
        options["resize_mode"] = resize_mode
    return load_backbone(name, weights=weights, device=device, **options)


# ---------------------------------------------------------------------- helpers
def resolve_device(gpu: bool | int | str) -> str:
    """``False`` -> ``"cpu"``, ``True`` -> ``"cuda"``, ``N`` -> ``"cuda:N"`` (a device string passes through).

    Raises ParameterError if CUDA is asked for but not available.
    """
    if isinstance(gpu, (bool, np.bool_)):
        device = "cuda" if gpu else "cpu"
    elif isinstance(gpu, (int, np.integer)):
        if gpu < 0:
            raise ParameterError(f"gpu must be False, True or a GPU number >= 0, got {gpu}")
        device = f"cuda:{int(gpu)}"
    elif isinstance(gpu, str) and (gpu == "cpu" or gpu.startswith("cuda")):
        device = gpu
    else:
        raise ParameterError(f"gpu must be False, True, a GPU number or a device string, got {gpu!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ParameterError(f"gpu={gpu!r} asks for CUDA, but no CUDA device is available: pass gpu=False")
        if ":" in device and int(device.split(":", 1)[1]) >= torch.cuda.device_count():
            raise ParameterError(f"gpu={gpu!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return device


DEFAULT_IMAGE_DIR = "images"  # the folder of normal images used when none is given, if it exists


def _say(message: str) -> None:
    print(f"anomalib-study: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the command
def detect_abnormal(
    test_dir: str | os.PathLike,
    db_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    model_name: str = "efficientnet_lite0",
    *,
    method: str = "knn",
    gpu: bool | int | str = False,
    batch_size: int | None = None,
    num_workers: int = 8,
    result_dir: str | os.PathLike = "result",
    weights: str | os.PathLike | None = None,
    progress: bool = True,
    cache: Any = "default",
    image_size: int | None = None,
    resize_mode: str | None = None,
    max_overlays: int = 100,
    strict: bool = False,
    skip_unreadable_normal: bool = False,
    **method_params: Any,
) -> Path:
    """Flag the anomalous images of ``test_dir`` with a registered method; return the run folder.

    Args:
        test_dir: folder of images to check (searched recursively; see the module doc for
            which files count and what happens to unreadable ones).
        db_dir: database folder (default ``"<method>_db"`` in the current folder). If it
            holds a database, that database is used (its backbone and settings win over the
            arguments, with a warning where they differ) after checking it was built for
            ``method`` and is not stale; otherwise the database is built from ``image_dir``
            and saved there.
        image_dir: folder of normal images (searched recursively) the database is built
            from, and checked against when a database is reused (None: ``images`` in the
            current folder when there is one; a database is then reused without that check).
        model_name: backbone name (see ``anomalib_study.backbones.BACKBONES``).
        gpu: False (cpu), True (cuda) or a GPU number; CUDA unavailable -> ParameterError.
        batch_size: images per forward pass (None: the method's, :attr:`MethodSpec.batch_size`).
        num_workers: image-loading processes (clamped to the cores available).
        result_dir: runs are written to ``<result_dir>/<timestamp>/``.
        weights: explicit weight file for the backbone.
        progress: show progress bars.
        cache: the feature cache for the normal images, for methods that cache embeddings
            (kNN): ``"default"`` (``$ANOMALIB_STUDY_CACHE``), a
            :class:`~anomalib_study.features.FeatureCache`, or ``None``.
        method: a registered method (``"knn"``: one embedding per image; ``"patchcore"``:
            patch memory bank and anomaly maps; ``anomalib_study.methods.DETECTORS`` lists them).
        image_size: input side (None = the method's, e.g. 128 for the autoencoder, else the
            backbone's default).
        resize_mode: ``"crop"`` (shorter side resized, centre crop), ``"squash"`` (the whole
            image resized to the square input, nothing cut off) or ``"keep"`` (shorter side
            resized, aspect ratio kept, nothing cut off; overlays at each image's own
            shape); None = the method's own (the autoencoder squashes), else ``"crop"``.
            The database records it (in the backbone's preprocessing).
        max_overlays: (methods with anomaly maps) at most this many overlays (the
            highest-scoring flagged images) are written; 0 = none.
        strict: refuse, before any work, a test folder holding unreadable images (every one
            named) instead of skipping them.
        skip_unreadable_normal: build the database without the unreadable normal images
            (recorded in it) instead of refusing them.
        **method_params: the method's parameters by name, as it declares them (kNN: k,
            thres_ratio, normalize, index; PatchCore: coreset_ratio, patch_size, image_score,
            sigma, calibration_fraction (in (0, 1): detect needs a threshold), seed, ...; see
            each method's ``SPEC.params``); those not given take the method's defaults. An
            unknown name -> ParameterError listing the valid ones.

    Returns:
        The new run folder, holding ``abnormal.result``, ``scores.csv``, ``skipped.csv``,
        ``config.json`` and, for methods with anomaly maps, ``overlays/``.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    spec = get_detector(method)
    given = dict(method_params)  # what the caller set (a reused database warns where it differs)
    params = spec.resolve_params(given)
    spec.check_params(params)
    problem = spec.threshold_problem(params) if spec.threshold_problem is not None else None
    if problem:
        raise ParameterError(f"detect needs a threshold: {problem}")
    batch_size = spec.batch_size if batch_size is None else check_int("batch_size", batch_size, minimum=1)
    num_workers = check_int("num_workers", num_workers, minimum=0)
    max_overlays = check_int("max_overlays", max_overlays, minimum=0)
    strict = check_bool("strict", strict)
    skip_unreadable_normal = check_bool("skip_unreadable_normal", skip_unreadable_normal)
    if image_size is not None:
        image_size = check_int("image_size", image_size, minimum=1)
    from anomalib_study.backbones import RESIZE_MODES

    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ParameterError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    given_geometry = {"image_size": image_size, "resize_mode": resize_mode}  # what the user passed
    resize_mode = spec.resolve_resize_mode(resize_mode)
    if image_size is None:
        image_size = spec.image_size
    device = resolve_device(gpu)
    workers = min(num_workers, available_cores())
    db_dir = Path(db_dir) if db_dir is not None else Path(spec.default_db_dir)
    test_dir = Path(test_dir)
    if image_dir is None and Path(DEFAULT_IMAGE_DIR).is_dir():
        image_dir = DEFAULT_IMAGE_DIR
    image_dir = Path(image_dir) if image_dir is not None else None
    if image_dir is None and not (db_dir / DB_FILE).is_file():
        raise DataError(
            f"no database in {db_dir} ({DB_FILE} missing) and no folder of normal images to build it from: "
            f"pass --image-dir (image_dir=), the folder of normal images"
        )
    test_paths = list_images(test_dir, "test_dir")
    if strict:
        bad = find_unreadable(test_paths, progress=progress, desc="checking test images")
        if bad:
            raise DataError(
                unreadable_message(
                    bad,
                    "test_dir",
                    test_dir,
                    "and strict=True (--strict) refuses them; nothing was done: remove or "
                    "replace them, or run without --strict to score the others and list these in skipped.csv",
                )
            )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = time.perf_counter()
        # one process at a time builds or loads a database folder: a second one waits, told who holds it
        with folder_lock(db_dir.parent / f".{db_dir.name}.lock", f"the database folder {db_dir}", notify=_say):
            built = not (db_dir / DB_FILE).is_file()
            if built:
                detector, backbone = build_database(
                    spec,
                    params,
                    db_dir,
                    image_dir,
                    model_name,
                    weights,
                    image_size,
                    resize_mode,
                    skip_unreadable_normal,
                    RunOptions(
                        device=device, batch_size=batch_size, num_workers=workers, progress=progress, cache=cache
                    ),
                    load_backbone=_load_backbone,
                )
            else:
                detector, backbone = reuse_database(
                    spec,
                    given,
                    db_dir,
                    image_dir,
                    model_name,
                    weights,
                    given_geometry,
                    device,
                    progress,
                    load_backbone=_load_backbone,
                )
            stored = json.loads((db_dir / DB_FILE).read_text(encoding="utf-8"))
        timings["build_database_s" if built else "load_database_s"] = time.perf_counter() - step

        step = time.perf_counter()
        run = RunOptions(device=device, batch_size=batch_size, num_workers=workers, progress=False, cache=None)
        with run_dir_in_progress(result_dir) as run_folder:
            stream = _score_stream(spec, detector, backbone, test_paths, run, max_overlays, progress)
            timings["score_s"] = time.perf_counter() - step
            if not np.isfinite(stream.scores).any():
                raise DataError(
                    unreadable_message(
                        {test_paths[i]: why for i, why in stream.skipped.items()},
                        "test_dir",
                        test_dir,
                        "and no other image is there: nothing was scored; replace them with readable images",
                    )
                )
            config = _write_run(
                run_folder.path, spec, detector, backbone, test_dir, test_paths, stream, max_overlays, progress, timings
            )
            config.update(
                {
                    "test_dir": str(test_dir.resolve()),
                    "image_dir": None if image_dir is None else str(image_dir.resolve()),
                    "db_dir": str(db_dir.resolve()),
                    "database_built": built,
                    "database_created": stored.get("created"),
                    "device": device,
                    "batch_size": batch_size,
                    "num_workers": workers,
                    "strict": strict,
                    "warnings": [str(w.message) for w in caught],
                }
            )
            timings["total_s"] = time.perf_counter() - started
            config["timings"] = timings
            write_json(run_folder.path / "config.json", config)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if stream.skipped:
        warnings.warn(
            f"{len(stream.skipped)} of {len(test_paths)} test image(s) could not be read and were skipped "
            f"(not scored): listed with the reasons in {run_folder.final / 'skipped.csv'}",
            stacklevel=2,
        )
    return run_folder.final


@dataclass
class _Scored:
    """What a streamed run keeps: every score, the skipped images, and the maps of the overlays."""

    scores: np.ndarray  # (n,) float64, NaN where skipped
    skipped: dict[int, str]  # position -> reason
    kept_maps: dict[int, np.ndarray] = field(default_factory=dict)  # the max_overlays best flagged images
    vmin: float = float("inf")
    vmax: float = float("-inf")


def _score_stream(
    spec: MethodSpec, detector, backbone, paths: list[Path], run: RunOptions, max_overlays: int, progress: bool
) -> _Scored:
    """Score ``paths`` chunk by chunk (:data:`CHUNK_IMAGES`); only the scores and at most
    ``max_overlays`` anomaly maps (of the highest-scoring flagged images) outlive a chunk."""
    threshold = float(detector.threshold_)
    out = _Scored(scores=np.full(len(paths), np.nan), skipped={})
    best: list[tuple[float, int]] = []  # min-heap of (score, position) of the kept maps
    bar = tqdm(
        total=len(paths), desc=f"{spec.name}: scoring {len(paths)} test images", unit="img", disable=not progress
    )
    try:
        for start in range(0, len(paths), CHUNK_IMAGES):
            chunk = paths[start : start + CHUNK_IMAGES]
            errors: dict[int, str] = {}
            result = spec.score_paths(detector, backbone, chunk, run, errors)
            out.skipped.update({start + i: why for i, why in errors.items()})
            scores = np.asarray(result["image_scores"], dtype=np.float64)
            out.scores[start : start + len(chunk)] = scores
            maps = result.get("anomaly_maps") if spec.produces_maps else None
            if maps is not None:
                readable = np.isfinite(scores)
                if readable.any():  # maps may be one (n, H, W) array or one array per image ("keep")
                    out.vmin = min(out.vmin, min(float(np.nanmin(maps[i])) for i in np.flatnonzero(readable)))
                    out.vmax = max(out.vmax, max(float(np.nanmax(maps[i])) for i in np.flatnonzero(readable)))
                for i in np.flatnonzero(readable & (scores > threshold)):
                    item = (float(scores[i]), -(start + int(i)))  # ties: the earlier image wins
                    if len(best) < max_overlays:
                        heapq.heappush(best, item)
                        out.kept_maps[start + int(i)] = np.array(maps[i])
                    elif best and item > best[0]:
                        dropped = heapq.heapreplace(best, item)
                        del out.kept_maps[-dropped[1]]
                        out.kept_maps[start + int(i)] = np.array(maps[i])
            del result, maps
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def _input_words(backbone) -> str:
    mode = (backbone.preprocessing or {}).get("resize_mode", "crop")
    return {"keep": "resized input (aspect ratio kept, each image at its own shape)", "squash": "squashed input"}.get(
        mode, "cropped input"
    )


def _write_run(
    run_dir: Path,
    spec: MethodSpec,
    detector,
    backbone,
    test_dir: Path,
    test_paths: list[Path],
    stream: _Scored,
    max_overlays: int,
    progress: bool,
    timings: dict,
) -> dict:
    """abnormal.result, scores.csv, skipped.csv and overlays/ into ``run_dir``; the config so far."""
    readable = np.isfinite(stream.scores)
    scored_paths = [p for p, ok in zip(test_paths, readable) if ok]
    scores = stream.scores[readable]
    predicted = (scores > detector.threshold_).astype(int)
    flagged = [str(p) for p, flag in zip(scored_paths, predicted) if flag]
    with atomic_write(run_dir / "abnormal.result", "w") as handle:
        handle.write("".join(f"{p}\n" for p in flagged))
    table = pd.DataFrame({"path": [str(p) for p in scored_paths], "score": scores, "predicted": predicted})
    with atomic_write(run_dir / "scores.csv", "w") as handle:
        table.to_csv(handle, index=False, lineterminator="\n")
    skipped = pd.DataFrame(
        {
            "path": [str(test_paths[i]) for i in sorted(stream.skipped)],
            "reason": [stream.skipped[i] for i in sorted(stream.skipped)],
        },
        columns=["path", "reason"],
    )
    with atomic_write(run_dir / "skipped.csv", "w") as handle:
        skipped.to_csv(handle, index=False, lineterminator="\n")
    section = as_json(spec.describe(detector))
    config = {
        "anomalib_study_version": __version__,
        "method": spec.name,
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": as_json(backbone.preprocessing),
        "image_size": getattr(backbone, "image_size", None),
        **({"embedding_dim": int(backbone.embedding_dim)} if spec.uses_embedding else {}),
        **section,
        "index": section.get("index_describe", section.get("index")),
        "n_found": len(test_paths),
        "n_test": len(scored_paths),
        "n_skipped": len(stream.skipped),
        "skipped_list": "skipped.csv",
        "n_abnormal": len(flagged),
    }
    if spec.produces_maps:
        step = time.perf_counter()
        order = sorted(stream.kept_maps, key=lambda i: (-stream.scores[i], i))[:max_overlays]
        names = overlay_names([p.relative_to(test_dir) for p in test_paths])  # stable whatever is selected
        written = write_overlays(
            run_dir / "overlays",
            [test_paths[i] for i in order],
            test_dir,
            [stream.kept_maps[i] for i in order],
            stream.scores[order],
            backbone.preprocessing,
            stream.vmin,
            stream.vmax,
            names=[names[i] for i in order],
            progress=progress,
        )
        timings["overlays_s"] = time.perf_counter() - step
        config["overlays"] = {
            "folder": "overlays",
            "count": len(written),
            "max_overlays": max_overlays,
            "n_flagged": len(flagged),
            "vmin": stream.vmin,
            "vmax": stream.vmax,
            "what": f"flagged images, highest scores first, on the backbone's {_input_words(backbone)}; "
            "one colour scale "
            "(vmin, vmax = min, max of all the run's anomaly maps)",
        }
    return config
