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

A setting without ``@`` is PatchCore with its defaults (``search_dim=256``: the certified
re-ranked search, whose results are the exhaustive search's); ``<precision>@full`` is faiss's
exhaustive search on every feature (the setting the earlier runs called plain ``fp32``), and
``<precision>@<dims>`` (e.g. ``bf16@256``) names the search dimensions:
``PatchCore(precision=..., search_dim=dims)``, whose bank search takes its candidates from the
bank's first ``dims`` principal components and re-ranks the best 8 of each patch exactly on
every feature; its floor counts the candidate products at ``dims`` columns, the projection of
the queries (2 q d dims, fp32 rate) and the re-ranking. Our predict-only runs fill the bank
with a random 10 % of the first N training images' real patches (the certified search's cost
depends on the data), anomalib's with random normal rows of the same shape.

``--quick`` runs only our side, in this process, on a few generated 64 px tiles with a
random ResNet-18 (seconds; no anomalib, no data); it writes nothing unless ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

_HERE = Path(__file__).resolve().parent
REPO = _HERE.parent
# a source checkout (anomalib_study), and this folder: the sibling patchcore_bench_* modules are imported by
# their plain names, which also works when this file is loaded by path (importlib) rather than run as a script
for _folder in (REPO, _HERE):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# The parts of this benchmark, one module each; every public name is re-exported here (__all__).
from patchcore_bench_anomalib import anomalib_python, run_anomalib  # noqa: E402
from patchcore_bench_data import (  # noqa: E402
    ANOMALIB_SIDE,
    BACKBONE,
    BENCH_SCRIPT,
    CORESET_CHECK_IMAGES,
    CORESET_RATIO,
    DEFAULT_OUT,
    DEFAULT_VENV,
    DEFAULT_WORK,
    HIT_RATE_QUERIES,
    LAYERS,
    MATMUL_SHAPE,
    N_TEST,
    PRECISIONS,
    QUICK_MATMUL_SHAPE,
    SEED,
    cpu_seconds,
    load_average,
    log,
    magnetic_tile_lists,
    make_tiny_magnetic_tile,
    parse_setting,
    peak_rss_mb,
    preprocessing_of,
    random_wide_resnet_weights,
    write_list,
)
from patchcore_bench_floor import (  # noqa: E402
    coreset_precision_check,
    floor_of_predict,
    forward_flops_per_image,
    matmul_throughput,
    physical_floor,
    rerank_hit_rate_of,
    search_flops,
)
from patchcore_bench_ours import coreset_check_on_images, our_predict_only, our_side, quick  # noqa: E402
from patchcore_bench_ratios import (  # noqa: E402
    coreset_rate_profile,
    format_table,
    quadratic_extrapolation,
    ratios,
)
from patchcore_bench_report import (  # noqa: E402
    build_report,
    carry_over_scaling,
    machine_info,
    memory_check,
    native_bf16_cpu,
    print_tables,
)
from patchcore_bench_runs import (  # noqa: E402
    compare,
    measurement_summary,
    ours_measurement,
    predict_side_by_side,
    run_ours,
    scaling,
)

__all__ = [
    "ANOMALIB_SIDE",
    "BACKBONE",
    "BENCH_SCRIPT",
    "CORESET_CHECK_IMAGES",
    "CORESET_RATIO",
    "DEFAULT_OUT",
    "DEFAULT_VENV",
    "DEFAULT_WORK",
    "HIT_RATE_QUERIES",
    "LAYERS",
    "MATMUL_SHAPE",
    "N_TEST",
    "PRECISIONS",
    "QUICK_MATMUL_SHAPE",
    "REPO",
    "SEED",
    "anomalib_python",
    "build_report",
    "carry_over_scaling",
    "compare",
    "coreset_check_on_images",
    "coreset_precision_check",
    "coreset_rate_profile",
    "cpu_seconds",
    "floor_of_predict",
    "format_table",
    "forward_flops_per_image",
    "load_average",
    "log",
    "machine_info",
    "magnetic_tile_lists",
    "main",
    "make_tiny_magnetic_tile",
    "matmul_throughput",
    "measurement_summary",
    "memory_check",
    "native_bf16_cpu",
    "our_predict_only",
    "our_side",
    "ours_measurement",
    "parse_setting",
    "peak_rss_mb",
    "physical_floor",
    "predict_side_by_side",
    "preprocessing_of",
    "print_tables",
    "quadratic_extrapolation",
    "quick",
    "random_wide_resnet_weights",
    "ratios",
    "rerank_hit_rate_of",
    "run_anomalib",
    "run_ours",
    "scaling",
    "search_flops",
    "write_list",
]


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def _our_side_main(args: argparse.Namespace) -> int:
    test = (
        [Path(line) for line in Path(args.test_list).read_text().split("\n") if line.strip()] if args.test_list else []
    )
    if args.bank_rows:
        train = (
            [Path(line) for line in Path(args.train_list).read_text().split("\n") if line.strip()]
            if args.train_list
            else None
        )
        result = our_predict_only(
            test,
            args.bank_rows,
            train_paths=train,
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
    # the timings include the patch extraction: the patch cache would hand a later round or process the
    # features an earlier one stored, so it is off here and in every process this one starts
    os.environ["ANOMALIB_STUDY_PATCH_CACHE_GB"] = "0"
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
            print(json.dumps(measurement_summary(result), indent=1))
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
            "native_bf16": native_bf16_cpu(),
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
