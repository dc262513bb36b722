"""Side-by-side timings of the deep-kNN path: detection vs a bare backbone, exact vs
compressed search, cold vs warm feature cache. Writes one JSON report.

    python benchmarks/bench_knn.py [--quick] [--data DIR] [--out reports/benchmarks/knn.json]

Three parts, each one function, each comparing its candidates in the same run:

1. :func:`bench_detect`: images/s of the full detection path (files -> decoding and
   preprocessing in DataLoader workers -> forward -> kNN search against a prebuilt bank,
   feature cache disabled) vs a bare ``efficientnet_lite0`` forward over the same images
   already decoded and preprocessed. Key ``throughput_ratio`` = detect / bare (goal >= 0.85).
2. :func:`bench_search`: exact (``"Flat"``) vs IVF-PQ search on a bank of synthetic,
   clustered, L2-normalised embeddings: queries/s, recall@k of IVF-PQ against the exact
   neighbours, bytes per stored embedding, build (train + add) time.
3. :func:`bench_cache`: ``evaluate("knn", ...)`` twice on the same set with a fresh cache
   folder; ``cache_speedup`` = cold total time / warm total time (goal >= 10).

``--quick`` runs every part on tiny generated data (seconds; for the smoke test). Without
``--quick`` the real data of ``--data`` / $ANOMALIB_STUDY_DATA is used where present, else the
synthetic DAGM-layout set, and the JSON says which. Times are wall-clock seconds
(``time.perf_counter``); every timed figure is the median of ``repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from anomalib_study import __version__  # noqa: E402
from anomalib_study.errors import DataError, ParameterError, StudyError  # noqa: E402
from anomalib_study.io import data_root, write_json  # noqa: E402

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "knn.json"
BACKBONE = "efficientnet_lite0"

#: the settings of the full run and of ``--quick`` (every one is written to the JSON)
FULL = {
    "detect": {"n_test": 384, "n_bank": 256, "repeats": 3, "n_sweep": 128, "sweep_workers": (0, 1, 2)},
    "search": {
        "n_bank": 200_000,
        "dim": 384,
        "n_clusters": 1000,
        "cluster_std": 0.6,
        "intrinsic_dim": 32,
        "noise_std": 0.05,
        "n_queries": 1000,
        "ks": (1, 100),
        "factory": "IVF1024,PQ32np",
        "nprobe": 16,
        "nprobe_sweep": (1, 4, 16, 64),
        "build_only_factories": ("IVF1024,PQ32",),
        "repeats": 3,
    },
    "cache": {"repeats": 1, "num_workers": None},
    "synthetic": {"n_classes": 3, "n_train": 128, "n_test_normal": 64, "n_test_defect": 64, "image_size": 128},
}
QUICK = {
    "detect": {
        "n_test": 4,
        "n_bank": 4,
        "repeats": 1,
        "n_sweep": 0,
        "sweep_workers": (),
        "batch_size": 2,
        "num_workers": 0,
    },
    "search": {
        "n_bank": 3000,
        "dim": 32,
        "n_clusters": 20,
        "cluster_std": 0.6,
        "intrinsic_dim": 8,
        "noise_std": 0.05,
        "n_queries": 50,
        "ks": (1, 100),
        "factory": "IVF16,PQ4x4np",
        "nprobe": 4,
        "nprobe_sweep": (1, 4),
        "build_only_factories": (),
        "repeats": 1,
    },
    "cache": {"repeats": 1, "num_workers": 0},
    "synthetic": {"n_classes": 1, "n_train": 8, "n_test_normal": 4, "n_test_defect": 4, "image_size": 64},
}


_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench_knn {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Machine and timing helpers
# --------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Where the figures come from: cores, threads, platform, versions, date, load average."""
    from anomalib_study.search import available_cores

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "anomalib_study": __version__,
        "load_average_1_5_15_min": load,
    }


class PartialReport(dict):
    """A benchmark report rewritten after each part (``save``), marked ``"complete": false``
    until ``finish``, so that a long run that is stopped keeps what it measured. Starts with
    ``machine_before`` (:func:`machine_info`); ``out`` None writes nothing."""

    def __init__(self, out: Path | None, **fields: Any):
        super().__init__(machine_before=machine_info(), **fields, complete=False)
        self.out = out

    def save(self) -> None:
        if self.out is not None:
            write_json(
                self.out,
                {**self, "machine_now": {"load_average_1_5_15_min": machine_info()["load_average_1_5_15_min"]}},
            )

    def finish(self) -> "PartialReport":
        self["complete"] = True
        self["machine_after"] = {"load_average_1_5_15_min": machine_info()["load_average_1_5_15_min"]}
        return self


class Clock:
    """Wall time, this process's CPU time and finished child processes' CPU time (DataLoader
    workers are joined at the end of each pass, so their CPU time is counted)."""

    def __enter__(self) -> "Clock":
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._children = _children_cpu()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.main_cpu_s = time.process_time() - self._cpu
        self.workers_cpu_s = _children_cpu() - self._children


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a) / float(b) if a is not None and b else None


# --------------------------------------------------------------------------------------
# Image selection
# --------------------------------------------------------------------------------------
def select_images(
    data: Path | None, workdir: Path, n_test: int, n_bank: int, synthetic: dict, seed: int = 0
) -> dict[str, Any]:
    """Test and bank image paths: Magnetic-tile (else MVTec AD bottle) from ``data``, else
    the synthetic DAGM-layout set generated in ``workdir``.

    Bank = normal training images; test = a seeded sample of the test images (normal and
    defective), never overlapping the bank. Returns {"source", "synthetic", "note",
    "test_paths", "bank_paths"}.
    """
    from anomalib_study.data import load_dataset, make_synthetic_dagm

    candidates = []
    if data is not None:
        candidates = [("magnetic_tile", data / "magnetic_tile", None), ("mvtec_ad", data / "mvtec_ad", "bottle")]
    for layout, root, category in candidates:
        if root.is_dir():
            dataset = load_dataset(layout, root, category=category)
            note = f"real images: {dataset.name}"
            break
    else:
        root = make_synthetic_dagm(workdir / "synthetic_dagm", seed=seed, **synthetic)
        dataset = load_dataset("dagm", root)
        note = (
            "SYNTHETIC images (DAGM-layout generator): no real data folder "
            f"({'none given' if data is None else data}) held magnetic_tile or mvtec_ad/bottle"
        )
    rng = np.random.default_rng(seed)
    test = [dataset.test[i].path for i in sorted(rng.permutation(len(dataset.test))[:n_test])]
    bank = [r.path for r in dataset.train[:n_bank]]
    if len(test) < n_test or len(bank) < n_bank:
        note += f" (only {len(test)} test / {len(bank)} bank images available)"
    return {
        "source": dataset.name,
        "synthetic": bool(dataset.synthetic),
        "note": note,
        "test_paths": test,
        "bank_paths": bank,
    }


def _link_folder(folder: Path, paths: Sequence[Path]) -> Path:
    """A folder holding only ``paths`` (as symlinks; copies where links are refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        target = folder / f"{i:05d}_{Path(path).name}"
        try:
            target.symlink_to(Path(path).resolve())
        except OSError:
            shutil.copyfile(path, target)
    return folder


# --------------------------------------------------------------------------------------
# 1. Detection throughput vs a bare backbone forward
# --------------------------------------------------------------------------------------
def detect_defaults() -> dict[str, Any]:
    """batch_size and num_workers of ``detect_abnormal`` (its signature), and the worker
    count it actually uses (clamped to the available cores)."""
    from anomalib_study.detect import detect_abnormal
    from anomalib_study.search import available_cores

    params = inspect.signature(detect_abnormal).parameters
    batch_size, workers = params["batch_size"].default, params["num_workers"].default
    return {"batch_size": batch_size, "num_workers": workers, "num_workers_used": min(workers, available_cores())}


def bare_forward(backbone, batches: Sequence[torch.Tensor]) -> np.ndarray:
    """Only the model forward over already preprocessed batches: (N, D) embeddings."""
    with torch.inference_mode():
        return torch.cat([backbone(x)["embedding"] for x in batches]).cpu().numpy()


def bench_detect(
    test_paths: Sequence[Path],
    bank_paths: Sequence[Path],
    workdir: Path,
    *,
    backbone_name: str = BACKBONE,
    batch_size: int | None = None,
    num_workers: int | None = None,
    repeats: int = 3,
    n_sweep: int = 128,
    sweep_workers: Sequence[int] = (0, 1, 2),
    device: str = "cpu",
) -> dict[str, Any]:
    """Images/s of detection (files to scores, cache disabled) vs a bare forward, same images.

    ``batch_size`` / ``num_workers`` default to those of ``detect_abnormal``. Three
    candidates are timed in turn within each repeat (so load changes hit all of them):
    the bare forward on tensors preprocessed beforehand (``torch.inference_mode``); the
    detection pipeline ``extract_embeddings(cache=None)`` + ``KNNDetector.score`` with the
    detector of a prebuilt database (``detect_images_per_s``); and ``detect_abnormal``
    itself on the prebuilt database (it always uses the feature cache, so each repeat gets
    an empty cache folder: a cold cache, with its hashing and writing).
    """
    from anomalib_study.backbones import load_backbone
    from anomalib_study.data.decode import load_image
    from anomalib_study.detect import detect_abnormal, load_database
    from anomalib_study.features import extract_embeddings

    defaults = detect_defaults()
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    num_workers = defaults["num_workers_used"] if num_workers is None else num_workers
    if repeats < 1:
        raise ParameterError(f"repeats={repeats}: give an integer >= 1")
    test_paths, bank_paths = list(test_paths), list(bank_paths)
    n = len(test_paths)
    test_dir = _link_folder(workdir / "test_images", test_paths)
    bank_dir = _link_folder(workdir / "bank_images", bank_paths)
    db_dir, result_dir = workdir / "knn_db", workdir / "results"

    def run_detect_abnormal(tag: str) -> dict:
        with _env("ANOMALIB_STUDY_CACHE", str(workdir / f"cache_{tag}")), Clock() as clock:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # k clamped to the bank size in quick runs
                run = detect_abnormal(
                    test_dir,
                    db_dir=db_dir,
                    image_dir=bank_dir,
                    model_name=backbone_name,
                    gpu=device,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    result_dir=result_dir,
                    progress=False,
                )
        config = json.loads((run / "config.json").read_text())
        return {"wall_s": clock.wall_s, "timings": config["timings"], "num_workers": config["num_workers"]}

    log(f"detect: building the kNN database from {len(bank_paths)} bank images (also the warm-up of detect_abnormal)")
    build = run_detect_abnormal("build")
    detector = load_database(db_dir, device=device).detector
    backbone = load_backbone(backbone_name, device=device)

    # Decoding + preprocessing, beforehand and untimed for the bare forward; timed here
    # once, single process, for the profile.
    with Clock() as decode_clock:
        tensors = [backbone.image_transform(load_image(p)) for p in test_paths]
    batches = [torch.stack(tensors[i : i + batch_size]).to(device) for i in range(0, n, batch_size)]
    del tensors

    def pipeline(paths, workers) -> np.ndarray:
        embeddings = extract_embeddings(
            backbone, paths, batch_size=batch_size, num_workers=workers, device=device, cache=None, progress=False
        )
        return detector.score(embeddings)

    log(f"detect: decoded {n} images beforehand; warm-up")
    bare_forward(backbone, batches[:1])
    pipeline(test_paths[:batch_size], num_workers)

    bare, piped, full = [], [], []
    for _ in tqdm(range(repeats), desc="detect vs bare forward", unit="repeat", file=sys.stderr):
        with Clock() as clock:
            reference = bare_forward(backbone, batches)
        bare.append(clock)
        with Clock() as clock:
            scores = pipeline(test_paths, num_workers)
        piped.append(clock)
        full.append(run_detect_abnormal(f"repeat{len(full)}"))
    # the pipeline scores what the bare forward computes (same embeddings -> same scores)
    same_scores = bool(np.allclose(detector.score(reference), scores, rtol=1e-4, atol=1e-5))

    bare_s = _median([c.wall_s for c in bare])
    pipe_s = _median([c.wall_s for c in piped])
    per_image_s = _median([r["timings"]["score_s"] for r in full])  # test images extracted and scored in one stream
    total_s = _median([r["timings"]["total_s"] for r in full])
    decode_ms = 1e3 * decode_clock.wall_s / n
    forward_ms = 1e3 * bare_s / n

    # Profile: worker count, on a subset, one pass each (after the same warm-up)
    log("detect: num_workers sweep")
    sweep = []
    subset = test_paths[:n_sweep]
    for workers in tqdm(sweep_workers, desc="num_workers sweep", unit="setting", file=sys.stderr):
        with Clock() as clock:
            pipeline(subset, workers)
        sweep.append(
            {
                "num_workers": workers,
                "images_per_s": len(subset) / clock.wall_s,
                "main_cpu_s": clock.main_cpu_s,
                "workers_cpu_s": clock.workers_cpu_s,
            }
        )
    sub_bare = None
    if sweep:
        chosen = batches[: max(1, -(-len(subset) // batch_size))]
        with Clock() as clock:
            bare_forward(backbone, chosen)
        sub_bare = sum(len(b) for b in chosen) / clock.wall_s
    for row in sweep:
        row["ratio_to_bare"] = _ratio(row["images_per_s"], sub_bare)

    detect_ips, bare_ips = n / pipe_s, n / bare_s
    log("detect: done")
    return {
        "images": n,
        "bank_images": len(bank_paths),
        "backbone": backbone_name,
        "device": device,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "detect_abnormal_defaults": defaults,
        "repeats": repeats,
        "detect_images_per_s": detect_ips,
        "backbone_images_per_s": bare_ips,
        "throughput_ratio": detect_ips / bare_ips,
        "detect_abnormal": {
            "note": "detect_abnormal has no cache switch: it always uses the feature cache, here an empty "
            "folder per repeat (cold: content hashing + writing a shard on top of the pipeline)",
            "per_image_images_per_s": n / per_image_s,
            "per_image_ratio": (n / per_image_s) / bare_ips,
            "end_to_end_images_per_s": n / total_s,
            "end_to_end_ratio": (n / total_s) / bare_ips,
            "fixed_overhead_s": total_s - per_image_s,
            "timings_median_s": {
                key: _median([r["timings"][key] for r in full if key in r["timings"]]) for key in full[0]["timings"]
            },
            "build_run_timings_s": build["timings"],
        },
        "same_scores_as_bare_forward": same_scores,
        "seconds": {
            "bare_forward": [c.wall_s for c in bare],
            "detect_pipeline": [c.wall_s for c in piped],
            "detect_abnormal_total": [r["timings"]["total_s"] for r in full],
        },
        # CPU seconds per image (main process + DataLoader workers): less sensitive than wall
        # time to other programs sharing the cores
        "cpu_throughput_ratio": _ratio(
            _median([c.main_cpu_s for c in bare]), _median([c.main_cpu_s + c.workers_cpu_s for c in piped])
        ),
        "cpu_seconds_median": {
            "bare_forward_main": _median([c.main_cpu_s for c in bare]),
            "detect_pipeline_main": _median([c.main_cpu_s for c in piped]),
            "detect_pipeline_workers": _median([c.workers_cpu_s for c in piped]),
        },
        "profile": {
            "decode_preprocess_ms_per_image_one_process": decode_ms,
            "forward_ms_per_image": forward_ms,
            "decode_share_of_forward": decode_ms / forward_ms,
            "ratio_if_decoding_only_adds": forward_ms / (forward_ms + decode_ms),
            "num_workers_sweep": {"images": len(subset), "bare_images_per_s": sub_bare, "rows": sweep},
        },
    }


# --------------------------------------------------------------------------------------
# 2. Exact vs IVF-PQ search
# --------------------------------------------------------------------------------------
def clustered_embeddings(
    n: int, dim: int, n_clusters: int, cluster_std: float, seed: int, intrinsic_dim: int = 32, noise_std: float = 0.05
) -> np.ndarray:
    """(n, dim) float32, L2-normalised, deterministic: embedding-like synthetic data.

    Points are Gaussian clusters (``n_clusters`` standard normal centres, spread
    ``cluster_std``) in an ``intrinsic_dim``-dimensional latent space, mapped into ``dim``
    dimensions by one random linear map, plus isotropic noise ``noise_std``: like CNN
    embeddings, the data fill a low-dimensional part of the space, which is what makes
    product quantisation work at all (isotropic 384-d noise is its worst case).
    """
    rng = np.random.default_rng(seed)
    mapping = rng.standard_normal((intrinsic_dim, dim), dtype=np.float32) / math.sqrt(intrinsic_dim)
    centres = rng.standard_normal((n_clusters, intrinsic_dim), dtype=np.float32)
    latent = centres[rng.integers(0, n_clusters, n)]
    latent += cluster_std * rng.standard_normal((n, intrinsic_dim), dtype=np.float32)
    points = latent @ mapping
    del latent
    for start in range(0, n, 50_000):  # noise in chunks: no second full-size array
        block = points[start : start + 50_000]
        block += noise_std * rng.standard_normal(block.shape, dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return points


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ids ∩ exact top-k ids| / k; both (q, k) int."""
    k = exact.shape[1]
    return float(np.mean([np.intersect1d(a, e).size / k for a, e in zip(approx, exact)]))


def index_bytes_per_vector(index) -> float:
    """Serialised size of a fitted NearestNeighbourIndex's faiss index / ntotal."""
    return faiss.serialize_index(index.index_).size / index.ntotal


def bench_search(
    *,
    n_bank: int = 200_000,
    dim: int = 384,
    n_clusters: int = 1000,
    cluster_std: float = 0.6,
    intrinsic_dim: int = 32,
    noise_std: float = 0.05,
    n_queries: int = 1000,
    ks: Sequence[int] = (1, 100),
    factory: str = "IVF1024,PQ32np",
    nprobe: int = 16,
    build_only_factories: Sequence[str] = (),
    nprobe_sweep: Sequence[int] = (1, 4, 16, 64),
    repeats: int = 3,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Exact ``"Flat"`` vs ``factory`` on a synthetic bank: queries/s per k, recall@k of
    the compressed index against the exact neighbours, bytes per embedding, build time."""
    from anomalib_study.search import NearestNeighbourIndex

    log(f"search: generating {n_bank} x {dim} clustered embeddings")
    points = clustered_embeddings(n_bank + n_queries, dim, n_clusters, cluster_std, seed, intrinsic_dim, noise_std)
    bank, queries = points[:n_bank], np.ascontiguousarray(points[n_bank:])  # queries: held-out draws
    del points

    def timed_search(index, k) -> tuple[float, np.ndarray]:
        index.search(queries[: min(10, n_queries)], k)  # warm-up
        times, ids = [], None
        for _ in range(repeats):
            with Clock() as clock:
                _, ids = index.search(queries, k)
            times.append(clock.wall_s)
        return n_queries / _median(times), ids

    results: dict[str, Any] = {}
    exact_ids: dict[int, np.ndarray] = {}
    log("search: exact (Flat)")
    with Clock() as clock:
        exact = NearestNeighbourIndex("Flat", device=device).fit(bank)
    results["exact"] = {
        "factory": "Flat",
        "build_s": clock.wall_s,
        "bytes_per_embedding": index_bytes_per_vector(exact),
    }
    for k in ks:
        qps, exact_ids[k] = timed_search(exact, k)
        results["exact"][f"k{k}"] = {"queries_per_s": qps}

    log(f"search: {factory} (training on the bank)")
    with warnings.catch_warnings(record=True) as caught, Clock() as clock:
        warnings.simplefilter("always")
        approx = NearestNeighbourIndex(factory, nprobe=nprobe, device=device).fit(bank)
    results["ivfpq"] = {
        "factory": factory,
        "nprobe": nprobe,
        "build_s": clock.wall_s,
        "build_includes": "k-means training of the coarse quantiser and the PQ codebooks, then add",
        "bytes_per_embedding": index_bytes_per_vector(approx),
        "warnings": [str(w.message) for w in caught],
    }
    for k in ks:
        qps, ids = timed_search(approx, k)
        results["ivfpq"][f"k{k}"] = {"queries_per_s": qps, "recall_at_k": recall_at_k(ids, exact_ids[k])}

    ivf = faiss.extract_index_ivf(approx.index_)
    sweep = []
    for probe in nprobe_sweep:
        ivf.nprobe = int(probe)
        row = {"nprobe": int(probe)}
        for k in ks:
            qps, ids = timed_search(approx, k)
            row[f"k{k}"] = {
                "queries_per_s": qps,
                "recall_at_k": recall_at_k(ids, exact_ids[k]),
                "speedup_vs_exact": qps / results["exact"][f"k{k}"]["queries_per_s"],
            }
        sweep.append(row)
    ivf.nprobe = int(nprobe)
    results["ivfpq"]["nprobe_sweep"] = sweep

    # e.g. "IVF1024,PQ32": without "np" the factory adds polysemous training (a code
    # reordering used only by polysemous search), which costs build time and nothing else
    results["build_only"] = []
    for other in build_only_factories:
        log(f"search: build time of {other}")
        with warnings.catch_warnings(), Clock() as clock:
            warnings.simplefilter("ignore")
            built = NearestNeighbourIndex(other, nprobe=nprobe, device=device).fit(bank)
        _, ids = built.search(queries, max(ks))
        results["build_only"].append(
            {"factory": other, "build_s": clock.wall_s, f"recall_at_k{max(ks)}": recall_at_k(ids, exact_ids[max(ks)])}
        )
        del built

    results["recall_at_k"] = {f"k{k}": results["ivfpq"][f"k{k}"]["recall_at_k"] for k in ks}
    results["speedup"] = {
        f"k{k}": results["ivfpq"][f"k{k}"]["queries_per_s"] / results["exact"][f"k{k}"]["queries_per_s"] for k in ks
    }
    results["memory_ratio"] = results["exact"]["bytes_per_embedding"] / results["ivfpq"]["bytes_per_embedding"]
    results["bank"] = {
        "n": n_bank,
        "dim": dim,
        "n_queries": n_queries,
        "ks": list(ks),
        "data": (
            f"SYNTHETIC: {n_clusters} Gaussian clusters (standard normal centres, std "
            f"{cluster_std}) in a {intrinsic_dim}-d latent space, mapped linearly to {dim}-d, "
            f"plus isotropic noise {noise_std}, L2-normalised, seed {seed}; queries: "
            f"{n_queries} further draws from the same clusters, not in the bank"
        ),
        "bank_mb": bank.nbytes / 2**20,
    }
    return results


# --------------------------------------------------------------------------------------
# 3. Feature cache: cold vs warm evaluate
# --------------------------------------------------------------------------------------
def bench_cache(
    layout: str,
    root: Path,
    workdir: Path,
    *,
    category: str | None = None,
    backbone: str = BACKBONE,
    repeats: int = 1,
    num_workers: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``evaluate("knn", layout, root)`` twice with a fresh cache folder: cold then warm.

    ``cache_speedup`` = cold total / warm total (everything ``evaluate`` does, including
    loading the data set and the backbone); ``extraction_speedup`` = cold / warm time of the
    two ``extract_embeddings`` calls (train + test). Repeats each use a new cache folder.
    ``num_workers=None`` keeps ``evaluate``'s own default.
    """
    from anomalib_study.evaluate import evaluate
    from anomalib_study.features import FeatureCache

    def extract_s(metrics):
        # train embeddings (fit) + test embeddings and their search (predict: the search is ~1 ms)
        return metrics["timings"]["fit_extract_s"] + metrics["timings"]["predict_s"]

    rows = []
    for repeat in tqdm(range(repeats), desc="cache cold/warm", unit="repeat", file=sys.stderr):
        cache = FeatureCache(workdir / f"feature_cache_{repeat}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cold = evaluate(
                "knn",
                layout,
                root,
                category=category,
                backbone=backbone,
                device=device,
                cache=cache,
                progress=False,
                num_workers=num_workers,
            )
            warm = evaluate(
                "knn",
                layout,
                root,
                category=category,
                backbone=backbone,
                device=device,
                cache=cache,
                progress=False,
                num_workers=num_workers,
            )
        rows.append(
            {
                "cold_total_s": cold["timings"]["total_s"],
                "warm_total_s": warm["timings"]["total_s"],
                "cold_extract_s": extract_s(cold),
                "warm_extract_s": extract_s(warm),
                "cold_timings_s": cold["timings"],
                "warm_timings_s": warm["timings"],
                "same_scores": [p["score"] for p in cold["per_image"]] == [p["score"] for p in warm["per_image"]],
                "n_images": cold["n_train"] + cold["n_test"],
                "dataset": cold["dataset"].get("name"),
                "synthetic": cold["synthetic"],
            }
        )
    cold_total = _median([r["cold_total_s"] for r in rows])
    warm_total = _median([r["warm_total_s"] for r in rows])
    cold_extract = _median([r["cold_extract_s"] for r in rows])
    warm_extract = _median([r["warm_extract_s"] for r in rows])
    return {
        "dataset": rows[0]["dataset"],
        "synthetic": rows[0]["synthetic"],
        "images": rows[0]["n_images"],
        "backbone": backbone,
        "device": device,
        "repeats": repeats,
        "num_workers": num_workers if num_workers is not None else "evaluate's default",
        "cold_total_s": cold_total,
        "warm_total_s": warm_total,
        "cache_speedup": cold_total / warm_total,
        "cold_extract_s": cold_extract,
        "warm_extract_s": warm_extract,
        "extraction_speedup": cold_extract / warm_extract if warm_extract > 0 else None,
        "runs": rows,
    }


def cache_dataset(
    data: Path | None, workdir: Path, synthetic: dict, seed: int = 0
) -> tuple[str, Path, str | None, str]:
    """(layout, root, category, note) for the cache benchmark: MVTec AD bottle if present,
    else the synthetic DAGM-layout set."""
    from anomalib_study.data import make_synthetic_dagm

    if data is not None and (data / "mvtec_ad" / "bottle").is_dir():
        return "mvtec_ad", data / "mvtec_ad", "bottle", "real images: MVTec AD bottle"
    root = make_synthetic_dagm(workdir / "synthetic_dagm", seed=seed, **synthetic)  # shared with detect
    return "dagm", root, None, "SYNTHETIC images (DAGM-layout generator): MVTec AD bottle not found"


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def summary_table(report: dict) -> list[tuple[str, float | None, str]]:
    """(name, value, goal) rows of every ratio in ``report``."""
    rows = []
    detect = report.get("detect")
    if detect:
        rows.append(("detect / bare forward (images/s)", detect["throughput_ratio"], ">= 0.85"))
        rows.append(("detect / bare forward (CPU seconds per image)", detect["cpu_throughput_ratio"], ""))
        rows.append(("detect_abnormal per-image / bare", detect["detect_abnormal"]["per_image_ratio"], ""))
        rows.append(("detect_abnormal end-to-end / bare", detect["detect_abnormal"]["end_to_end_ratio"], ""))
    search = report.get("search")
    if search:
        for key, value in search["speedup"].items():
            rows.append((f"{search['ivfpq']['factory']} / Flat queries/s, {key}", value, ""))
        for key, value in search["recall_at_k"].items():
            rows.append((f"{search['ivfpq']['factory']} recall@{key[1:]}", value, ""))
        rows.append(("Flat / IVF-PQ bytes per embedding", search["memory_ratio"], ""))
    cache = report.get("cache")
    if cache:
        rows.append(("cold / warm evaluate (cache_speedup)", cache["cache_speedup"], ">= 10"))
        rows.append(("cold / warm feature extraction", cache["extraction_speedup"], ""))
    return rows


def print_table(rows) -> None:
    width = max(len(name) for name, _, _ in rows)
    print(f"{'ratio':<{width}}  {'value':>9}  goal")
    for name, value, goal in rows:
        shown = f"{value:9.3f}" if value is not None else f"{'n/a':>9}"
        print(f"{name:<{width}}  {shown}  {goal}")


def run(
    quick: bool = False,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    parts: Sequence[str] = ("detect", "search", "cache"),
    seed: int = 0,
) -> dict[str, Any]:
    """Run the chosen parts, write the JSON to ``out`` (if given) and return the report."""
    settings = QUICK if quick else FULL
    unknown = set(parts) - {"detect", "search", "cache"}
    if unknown:
        raise ParameterError(f"unknown part(s) {sorted(unknown)}: choose from detect, search, cache")
    data_dir = None if quick else data_root(data)
    if data is not None and not quick and not Path(data).expanduser().is_dir():
        raise DataError(f"--data {data} is not a folder: give the real data folder (e.g. ../shared/data)")
    if data_dir is None and not quick:
        candidate = REPO.parent / "shared" / "data"
        data_dir = candidate if candidate.is_dir() else None

    report: dict[str, Any] = {
        "benchmark": "knn",
        "quick": quick,
        "machine": machine_info(),
        "data_dir": str(data_dir) if data_dir else None,
        "settings": settings,
        "seed": seed,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_knn_") as tmp:
        workdir = Path(tmp)
        if "detect" in parts:
            d = settings["detect"]
            images = select_images(data_dir, workdir, d["n_test"], d["n_bank"], settings["synthetic"], seed)
            log(f"detect: {len(images['test_paths'])} test images, {images['note']}")
            report["detect"] = {
                "data": {k: images[k] for k in ("source", "synthetic", "note")},
                **bench_detect(
                    images["test_paths"],
                    images["bank_paths"],
                    workdir / "detect",
                    batch_size=d.get("batch_size"),
                    num_workers=d.get("num_workers"),
                    repeats=d["repeats"],
                    n_sweep=d["n_sweep"],
                    sweep_workers=d["sweep_workers"],
                    device=device,
                ),
            }
        if "cache" in parts:
            layout, root, category, note = cache_dataset(data_dir, workdir, settings["synthetic"], seed)
            log(f"cache: {note}")
            report["cache"] = {
                "note": note,
                **bench_cache(
                    layout,
                    root,
                    workdir / "cache",
                    category=category,
                    repeats=settings["cache"]["repeats"],
                    num_workers=settings["cache"]["num_workers"],
                    device=device,
                ),
            }
        if "search" in parts:
            s = dict(settings["search"])
            report["search"] = bench_search(**s, seed=seed, device=device)
    report["total_s"] = time.perf_counter() - started
    try:
        report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    report["ratios"] = {name: value for name, value, _ in summary_table(report)}
    if out is not None:
        write_json(out, report)
        log(f"wrote {out}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny generated data, seconds (smoke test)")
    parser.add_argument("--data", help="real data folder (default $ANOMALIB_STUDY_DATA, else ../shared/data)")
    parser.add_argument(
        "--out",
        help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; with --quick nothing is written unless given)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--parts", default="detect,cache,search", help="comma-separated subset of detect,cache,search")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    try:
        report = run(
            quick=args.quick,
            data=args.data,
            out=out,
            device=args.device,
            parts=[p.strip() for p in args.parts.split(",") if p.strip()],
        )
    except StudyError as error:
        print(f"bench_knn: error: {error}", file=sys.stderr)
        return 2
    print_table(summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
