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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomalib-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="flag the anomalous images of a folder with the kNN detector")
    p.add_argument("test_dir", help="folder of images to check")
    p.add_argument("--db-dir", default=None, help="database folder: loaded if valid, else built and saved there")
    p.add_argument("--image-dir", default="images", help="folder of normal images to build the database from")
    p.add_argument("--model-name", default="efficientnet_lite0", help="backbone (see `anomalib-study backbones`)")
    p.add_argument("--weights", default=None, help="explicit weight file for the backbone")
    p.add_argument("--gpu", action="store_true", help="use CUDA")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--result-dir", default="result", help="runs are written to <result-dir>/<timestamp>/")
    _add_knn_options(p)

    p = sub.add_parser("evaluate", help="evaluate a method on a data set and write <out>/metrics.json")
    p.add_argument("--method", default="knn", help="method (default knn)")
    p.add_argument("--dataset", required=True, help="layout: mvtec_ad, mvtec_loco, mvtec_3d, dagm, magnetic_tile, kolektorsdd, neu_det, folder, ood")
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument("--category", default=None, help="category inside root (mvtec_ad bottle, dagm Class1, ...)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="explicit weight file for the backbone")
    p.add_argument("--image-size", type=_positive_int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--seed", type=int, default=None, help="seed of the split where the layout has no official one")
    p.add_argument("--out", required=True, help="folder for metrics.json (never overwritten)")
    _add_knn_options(p)

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
    metrics = evaluate(
        args.method, args.dataset, args.root, category=args.category, backbone=args.backbone,
        weights=args.weights, image_size=args.image_size, device=args.device, out=args.out,
        dataset_options=options, k=args.k, thres_ratio=args.thres_ratio, index=args.index,
        batch_size=args.batch_size, num_workers=args.num_workers, cache=None if args.no_cache else "default",
    )
    report = metrics["classification_report"]
    print(f"{metrics['dataset']['name']} / {args.backbone} / {args.method}: n_train={metrics['n_train']} n_test={metrics['n_test']}")
    print(f"image AUROC {metrics['image_auroc']:.4f}  accuracy {metrics['accuracy']:.4f}  threshold {metrics['threshold']:.4f}")
    print(f"{'':>14} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for name in ("normal", "anomalous", "macro avg", "weighted avg"):
        row = report[name]
        print(f"{name:>14} {row['precision']:9.3f} {row['recall']:9.3f} {row['f1-score']:9.3f} {int(row['support']):8d}")
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from anomalib_study.detect import detect_abnormal

    run_dir = detect_abnormal(
        args.test_dir, db_dir=args.db_dir, image_dir=args.image_dir, model_name=args.model_name,
        k=args.k, thres_ratio=args.thres_ratio, gpu=args.gpu, batch_size=args.batch_size,
        num_workers=args.num_workers, result_dir=args.result_dir, weights=args.weights, index=args.index,
    )
    flagged = (Path(run_dir) / "abnormal.result").read_text().splitlines()
    print(f"{len(flagged)} image(s) flagged anomalous; results in {run_dir}")
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
