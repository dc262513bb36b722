"""The ``anomalib-study`` command: detect, evaluate, run, download, make-synthetic, backbones.

Errors caused by the input (a missing file, a bad parameter, a stale database) print one
line naming what is wrong and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

from anomalib_study.errors import StudyError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _add_knn_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=_positive_int, default=100, help="neighbours averaged (default 100)")
    parser.add_argument(
        "--thres-ratio", type=_ratio, default=0.92,
        help="share of normal images the threshold keeps normal (default 0.92)",
    )
    parser.add_argument("--index", default="Flat", help="faiss factory string (default Flat = exact)")


def _coreset_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (e.g. 0.01, 0.1, 1.0), got {text}")
    return value


def _odd_int(text: str) -> int:
    value = int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be an odd positive integer (1, 3, 5...), got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_resize_mode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resize-mode", choices=("crop", "squash"), default="crop",
        help="crop: shorter side resized, centre crop (default); squash: the whole image resized to the square "
             "input, nothing cut off (long narrow images: KolektorSDD, Magnetic-tile)",
    )


def _add_patchcore_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("patchcore options (--method patchcore)")
    group.add_argument("--coreset-ratio", type=_coreset_ratio, default=0.1,
                       help="share of training patches kept in the memory bank (default 0.1)")
    group.add_argument("--patch-size", type=_odd_int, default=3, help="neighbourhood side of the patch features (default 3)")
    group.add_argument("--score", dest="image_score", choices=("max", "reweighted"), default="reweighted",
                       help="image score: max patch score or the paper's Eq. 7 reweighting (default reweighted)")
    group.add_argument("--sigma", type=_non_negative_float, default=4.0, help="Gaussian sigma of the anomaly maps (default 4)")
    group.add_argument("--calibration-fraction", type=float, default=0.1,
                       help="share of training images held out of the bank to set the threshold (default 0.1; 0 = none)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalib-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="flag the anomalous images of a folder with the kNN detector or PatchCore")
    p.add_argument("test_dir", help="folder of images to check")
    p.add_argument("--db-dir", default=None, help="database folder: loaded if valid, else built and saved there")
    p.add_argument("--image-dir", default="images", help="folder of normal images to build the database from")
    p.add_argument("--model-name", default="efficientnet_lite0", help="backbone (see `anomalib-study backbones`)")
    p.add_argument("--weights", default=None, help="explicit weight file for the backbone")
    p.add_argument("--gpu", action="store_true", help="use CUDA")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--result-dir", default="result", help="runs are written to <result-dir>/<timestamp>/")
    p.add_argument("--method", choices=("knn", "patchcore"), default="knn", help="detector (default knn)")
    p.add_argument("--image-size", type=_positive_int, default=None, help="backbone input side (default: the backbone's)")
    _add_resize_mode(p)
    p.add_argument("--k", type=_positive_int, default=100, help="(knn) neighbours averaged (default 100)")
    p.add_argument(
        "--thres-ratio", type=_ratio, default=None,
        help="share of normal images the threshold keeps normal (default 0.92 for knn; 0.99 for patchcore, "
             "of its held-out calibration images)",
    )
    p.add_argument("--index", default="Flat", help="faiss factory string (default Flat = exact)")
    _add_patchcore_options(p)
    p.add_argument("--max-overlays", type=int, default=100,
                   help="(patchcore) anomaly-map overlays written for at most this many flagged images (default 100)")

    p = sub.add_parser("evaluate", help="evaluate a method on a data set and write <out>/metrics.json")
    p.add_argument("--method", default="knn", help="method (default knn)")
    p.add_argument("--dataset", required=True, help="layout: mvtec_ad, mvtec_loco, mvtec_3d, dagm, magnetic_tile, kolektorsdd, neu_det, folder, ood")
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument("--category", default=None, help="category inside root (mvtec_ad bottle, dagm Class1, ...)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="explicit weight file for the backbone")
    p.add_argument("--image-size", type=_positive_int, default=None)
    _add_resize_mode(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--seed", type=int, default=None, help="seed of the split where the layout has no official one")
    p.add_argument("--out", required=True, help="folder for metrics.json (never overwritten)")
    _add_knn_options(p)
    _add_patchcore_options(p)

    p = sub.add_parser("run", help="execute a study file's notebooks and render the reports")
    p.add_argument("study", help="study file, e.g. studies/default.yaml")
    p.add_argument("--jobs", type=_positive_int, default=1, help="grid cells run in parallel")
    p.add_argument("--data", default=None, help="real data folder (default $ANOMALIB_STUDY_DATA)")
    p.add_argument("--reports", default="reports", help="reports folder (default reports)")
    p.add_argument("--force", action="store_true", help="rerun cells whose inputs did not change")
    p.add_argument("--only", action="append", default=None, help="run only this cell (dataset-backbone, glob allowed); repeatable")
    p.add_argument("--device", default=None, help="set every cell's device (cpu, cuda, cuda:N)")
    p.add_argument("--kernel", default=None, help="Jupyter kernel (default: anomalib-study if installed)")

    p = sub.add_parser("download", help="download and verify MVTec AD or DAGM 2007 (needs internet)")
    p.add_argument("name", help="mvtec_ad or dagm2007")
    p.add_argument("dest", help="folder to extract into")
    p.add_argument("--url", default=None, help="another address of the same archive")
    p.add_argument("--sha256", default=None, help="expected checksum of the archive")

    p = sub.add_parser("make-synthetic", help="write the synthetic DAGM-layout data set")
    p.add_argument("dest")
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("backbones", help="list the registered backbones")
    return parser


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from anomalib_study.evaluate import evaluate

    options = {"seed": args.seed} if args.seed is not None else None
    common = dict(
        category=args.category, backbone=args.backbone, weights=args.weights, image_size=args.image_size,
        resize_mode=args.resize_mode, device=args.device, out=args.out, dataset_options=options, index=args.index, batch_size=args.batch_size,
        num_workers=args.num_workers, cache=None if args.no_cache else "default",
    )
    if args.method == "patchcore":
        metrics = evaluate(
            args.method, args.dataset, args.root, coreset_ratio=args.coreset_ratio, patch_size=args.patch_size,
            image_score=args.image_score, sigma=args.sigma, calibration_fraction=args.calibration_fraction, **common,
        )
        _print_patchcore(metrics, args)
        return 0
    metrics = evaluate(args.method, args.dataset, args.root, k=args.k, thres_ratio=args.thres_ratio, **common)
    report = metrics["classification_report"]
    print(f"{metrics['dataset']['name']} / {args.backbone} / {args.method}: n_train={metrics['n_train']} n_test={metrics['n_test']}")
    print(f"image AUROC {metrics['image_auroc']:.4f}  accuracy {metrics['accuracy']:.4f}  threshold {metrics['threshold']:.4f}")
    print(f"{'':>14} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name in ("normal", "anomalous", "macro avg", "weighted avg"):
        row = report[name]
        print(f"{name:>14} {row['precision']:9.3f} {row['recall']:9.3f} {row['f1-score']:9.3f} {int(row['support']):8d}")
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def _print_patchcore(metrics: dict, args: argparse.Namespace) -> None:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    timings = metrics["timings"]
    print(f"{metrics['dataset']['name']} / {args.backbone} / patchcore: n_train={metrics['n_train']} "
          f"n_test={metrics['n_test']} memory bank={metrics['memory_bank_size']}")
    print(f"image AUROC {fmt(metrics['image_auroc'])} ({metrics['params']['image_score']}; max {fmt(metrics['image_auroc_max'])}, "
          f"reweighted {fmt(metrics['image_auroc_reweighted'])})  image F1-max {fmt(metrics['image_f1_max'])}")
    print(f"pixel AUROC {fmt(metrics['pixel_auroc'])}  PRO {fmt(metrics['pro'])}  pixel F1-max {fmt(metrics['pixel_f1_max'])}")
    print(f"fit {timings['fit_s']:.1f} s (coreset {timings['fit_coreset_s']:.1f} s)  predict {timings['predict_s']:.1f} s  "
          f"peak RSS {metrics['peak_memory']['peak_rss_mb']:.0f} MB")
    print(f"wrote {Path(args.out) / 'metrics.json'}")


def _cmd_detect(args: argparse.Namespace) -> int:
    from anomalib_study.detect import detect_abnormal

    run_dir = detect_abnormal(
        args.test_dir, db_dir=args.db_dir, image_dir=args.image_dir, model_name=args.model_name,
        k=args.k, thres_ratio=args.thres_ratio, gpu=args.gpu, batch_size=args.batch_size,
        num_workers=args.num_workers, result_dir=args.result_dir, weights=args.weights, index=args.index,
        method=args.method, image_size=args.image_size, resize_mode=args.resize_mode, coreset_ratio=args.coreset_ratio, patch_size=args.patch_size,
        image_score=args.image_score, sigma=args.sigma, calibration_fraction=args.calibration_fraction,
        max_overlays=args.max_overlays,
    )
    flagged = (Path(run_dir) / "abnormal.result").read_text().splitlines()
    print(f"{len(flagged)} image(s) flagged anomalous; results in {run_dir}")
    overlays = Path(run_dir) / "overlays"
    if overlays.is_dir():
        print(f"anomaly-map overlays in {overlays}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from anomalib_study.runner import exit_code, run_study

    results = run_study(
        args.study, reports_dir=args.reports, jobs=args.jobs, data_root=args.data, only=args.only,
        force=args.force, device=args.device, kernel_name=args.kernel,
    )
    return exit_code(results)


def _cmd_download(args: argparse.Namespace) -> int:
    from anomalib_study.data.download import download

    path = download(args.name, args.dest, url=args.url, sha256=args.sha256)
    print(f"extracted into {path}")
    return 0


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from anomalib_study.data.synthetic import make_synthetic_dagm

    print(make_synthetic_dagm(args.dest, seed=args.seed))
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from anomalib_study.backbones import BACKBONES

    for name in sorted(BACKBONES):
        print(name)
    return 0


_COMMANDS = {
    "detect": _cmd_detect,
    "evaluate": _cmd_evaluate,
    "run": _cmd_run,
    "download": _cmd_download,
    "make-synthetic": _cmd_make_synthetic,
    "backbones": _cmd_backbones,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        return _COMMANDS[args.command](args)
    except StudyError as error:
        print(f"anomalib-study {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
