"""Peak memory of ``detect_abnormal`` on a folder of 1,000 and of 10,000 test images, for
each method. Writes one JSON report.

    python benchmarks/bench_detect.py [--quick] [--sizes 1000,10000] [--methods knn,patchcore]
                                      [--image-size 128] [--out reports/benchmarks/detect.json]

Test images are scored in a stream of chunks (``anomalib_study.detect.CHUNK_IMAGES``), so
the memory a run needs should not grow with the folder beyond the scores themselves
(paths, scores, the result table) and the at most ``max_overlays`` anomaly maps kept for
the overlays. This script measures it: the images are generated (textured grey squares,
every 20th one with a bright defect, each file distinct), a database is built once per
method from 50 generated normal images, and then each (method, folder size) runs
``detect_abnormal`` in a **fresh process**, whose peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``) is read before the call (imports done, backbone
loaded once to warm it) and after it. ``added_mb`` = after - before is what the run
needed above the peak the imports and the backbone's loading reached (0 when the run
stays below it, as tiny runs may: then the ratio is None); ``growth_bytes_per_image`` = the difference
of ``added_mb`` between the two
sizes per extra image. For comparison the report also gives, computed (not measured),
what holding every test embedding / anomaly map at once would take at the largest size.

``--quick`` uses 60 / 240 images at 64 px in chunks of 32 (so both sizes stream; about a
minute; for the smoke test) and writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _folder in (REPO, REPO / "benchmarks"):  # a source checkout; bench_knn's machine_info
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "detect.json"
BACKBONE = "efficientnet_lite0"
N_NORMAL = 50
SIDE = 96  # pixels of the generated files
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench_detect {time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def write_images(folder: Path, n: int, seed: int, defect_every: int = 0) -> Path:
    """``n`` distinct PNG files (grey noise; every ``defect_every``-th with a bright square)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = (128 + rng.normal(0, 12, (SIDE, SIDE, 3))).clip(0, 255)
        if defect_every and i % defect_every == defect_every - 1:
            x, y = rng.integers(10, SIDE - 30, 2)
            pixels[y : y + 20, x : x + 20] = 250
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def method_options(method: str, image_size: int) -> dict[str, Any]:
    common = dict(
        model_name=BACKBONE, image_size=image_size, batch_size=64, num_workers=2, progress=False, method=method
    )
    return {**common, **({"k": 10} if method == "knn" else {"calibration_fraction": 0.2})}


# ---------------------------------------------------------------------- the child processes
def child_build(work: Path, method: str, image_size: int) -> dict:
    from anomalib_study.detect import detect_abnormal

    started = time.perf_counter()
    run = detect_abnormal(
        work / "test_build",
        db_dir=work / f"{method}_db",
        image_dir=work / "normal",
        result_dir=work / "result_build",
        cache=None,
        **method_options(method, image_size),
    )
    return {"build_s": time.perf_counter() - started, "run": str(run)}


def child_score(work: Path, method: str, image_size: int, n: int, chunk_images: int | None) -> dict:
    from anomalib_study import detect
    from anomalib_study.detect import detect_abnormal

    if chunk_images:
        detect.CHUNK_IMAGES = chunk_images
    detect.load_backbone(BACKBONE, image_size=image_size)  # warm the imports and the weights file
    before = peak_rss_mb()
    started = time.perf_counter()
    run = detect_abnormal(
        work / f"test_{n}",
        db_dir=work / f"{method}_db",
        image_dir=work / "normal",
        result_dir=work / f"result_{method}_{n}",
        cache=None,
        **method_options(method, image_size),
    )
    seconds = time.perf_counter() - started
    after = peak_rss_mb()
    config = json.loads((run / "config.json").read_text())
    return {
        "n_images": n,
        "n_scored": config["n_test"],
        "n_flagged": config["n_abnormal"],
        "peak_rss_before_mb": before,
        "peak_rss_after_mb": after,
        "added_mb": after - before,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "chunk_images": detect.CHUNK_IMAGES,
        "overlays_written": config.get("overlays", {}).get("count"),
        "scores_csv_bytes": (run / "scores.csv").stat().st_size,
    }


def _spawn(args: Sequence[str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the run
def run(
    sizes: Sequence[int], methods: Sequence[str], image_size: int, work: Path, chunk_images: int | None = None
) -> dict:
    from bench_knn import machine_info

    log(f"generating {max(sizes)} test images and {N_NORMAL} normal images in {work}")
    write_images(work / "normal", N_NORMAL, seed=0)
    write_images(work / "test_build", 4, seed=1)
    biggest = write_images(work / f"test_{max(sizes)}", max(sizes), seed=2, defect_every=20)
    for n in sizes:
        if n != max(sizes):  # the first n files of the biggest folder, as links: the same images
            folder = work / f"test_{n}"
            folder.mkdir(exist_ok=True)
            for path in sorted(biggest.iterdir())[:n]:
                os.link(path, folder / path.name)
    machine_before = machine_info()
    report: dict[str, Any] = {
        "settings": {
            "backbone": BACKBONE,
            "image_size": image_size,
            "sizes": list(sizes),
            "methods": list(methods),
            "n_normal": N_NORMAL,
            "file_side": SIDE,
            "options": {m: method_options(m, image_size) for m in methods},
        },
        "machine_before": machine_before,
        "methods": {},
    }
    for method in methods:
        log(f"{method}: building the database")
        build = _spawn(["--child", "build", "--method", method, "--image-size", str(image_size), "--work", str(work)])
        rows = []
        for n in sizes:
            log(f"{method}: detect on {n} images (fresh process)")
            rows.append(
                _spawn(
                    [
                        "--child",
                        "score",
                        "--method",
                        method,
                        "--image-size",
                        str(image_size),
                        "--work",
                        str(work),
                        "--n",
                        str(n),
                        "--chunk-images",
                        str(chunk_images or 0),
                    ]
                )
            )
            log(f"  added {rows[-1]['added_mb']:.0f} MB, {rows[-1]['images_per_s']:.0f} images/s")
        small, large = rows[0], rows[-1]
        extra = large["n_images"] - small["n_images"]
        growth = (large["added_mb"] - small["added_mb"]) * 2**20 / extra if extra else None
        held = large["n_images"] * (1280 * 4 if method == "knn" else image_size * image_size * 4)
        report["methods"][method] = {
            "build_s": build["build_s"],
            "rows": rows,
            "peak_memory_ratio_large_to_small": large["added_mb"] / small["added_mb"] if small["added_mb"] else None,
            "growth_bytes_per_image": growth,
            "held_at_once_mb_computed": held / 2**20,
            "held_at_once_what": (
                "every test embedding (1280 float32) at once"
                if method == "knn"
                else f"every {image_size} x {image_size} float32 anomaly map at once"
            ),
        }
    report["machine_after"] = {"load_average_1_5_15_min": machine_info()["load_average_1_5_15_min"]}
    return report


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary(report: dict) -> list[str]:
    lines = [f"{'method':<10} {'images':>7} {'peak before MB':>15} {'peak after MB':>14} {'added MB':>9} {'img/s':>7}"]
    sizes = report["settings"]["sizes"]
    for method, part in report["methods"].items():
        for row in part["rows"]:
            lines.append(
                f"{method:<10} {row['n_images']:>7} {row['peak_rss_before_mb']:>15.0f} "
                f"{row['peak_rss_after_mb']:>14.0f} {row['added_mb']:>9.1f} {row['images_per_s']:>7.1f}"
            )
        lines.append(
            f"{method}: added-memory ratio {_fmt(part['peak_memory_ratio_large_to_small'])} for "
            f"{sizes[-1] / sizes[0]:.0f}x the images; growth {_fmt(part['growth_bytes_per_image'], '.0f')} "
            f"bytes per extra image; {part['held_at_once_what'].replace(' at once', '')} held at once "
            f"would take {part['held_at_once_mb_computed']:.0f} MB (computed)"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 / 240 images at 64 px (smoke test)")
    parser.add_argument("--sizes", default="1000,10000", help="folder sizes, comma-separated (default 1000,10000)")
    parser.add_argument("--methods", default="knn,patchcore")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--work", default=None, help="folder for the generated images (default: a temporary one)")
    parser.add_argument(
        "--out",
        default=None,
        help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; --quick writes nothing unless given)",
    )
    parser.add_argument(
        "--chunk-images",
        type=int,
        default=0,
        help="test images per chunk (default: detect's CHUNK_IMAGES; --quick: 32)",
    )
    parser.add_argument("--child", choices=("build", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        work = Path(args.work)
        result = (
            child_build(work, args.method, args.image_size)
            if args.child == "build"
            else child_score(work, args.method, args.image_size, args.n, args.chunk_images)
        )
        print(json.dumps(result))
        return 0
    sizes = [60, 240] if args.quick else [int(v) for v in args.sizes.split(",") if v.strip()]
    image_size = 64 if args.quick else args.image_size
    methods = [m for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_detect_") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        chunk = args.chunk_images or (32 if args.quick else 0)
        report = run(sorted(sizes), methods, image_size, work, chunk or None)
    report["quick"] = bool(args.quick)
    for line in summary(report):
        print(line)
    out = Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        from anomalib_study.io import write_json

        write_json(out, report)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
