"""The ``anomalib-study`` command: detect, cluster, evaluate, run, verify, download, make-synthetic, backbones.

Errors caused by the input (a missing file, a bad parameter, a stale database) print one
line naming what is wrong and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from pathlib import Path
from typing import Sequence

from anomalib_study.checks import non_negative_float, odd_positive_int, positive_int
from anomalib_study.errors import StudyError


def _parser_type(read):
    """A reader of :mod:`anomalib_study.checks` (raising ParameterError) as an argparse type."""

    def parse(text: str):
        try:
            return read(text)
        except (ValueError, StudyError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = getattr(read, "__name__", "value")
    return parse


def _add_resize_mode(parser: argparse.ArgumentParser) -> None:
    from anomalib_study.preprocessing import RESIZE_MODES  # not backbones: the parser does not import torchvision

    parser.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        default=None,
        help="crop: shorter side resized, centre crop (default; the autoencoder: squash); squash: the whole image "
        "resized to the square input, nothing cut off (long narrow images: KolektorSDD, Magnetic-tile); keep: "
        "shorter side resized, aspect ratio kept (longer side at most 3x, rounded to the backbone's stride), "
        "nothing cut off (PatchCore, kNN; not anomaly clustering)",
    )


def _method_options(specs) -> dict[str, list]:
    """flag -> the (spec, MethodParam) pairs that declare it, over every method, in order."""
    options: dict[str, list] = {}
    for spec in specs:
        for param in spec.params:
            if param.type is not None:
                options.setdefault(param.cli_flag, []).append((spec, param))
    return options


#: readers of whole numbers: their values show as N in --help
_WHOLE_NUMBER_READERS = (int, positive_int, odd_positive_int)


def _metavar(param) -> str | None:
    """The word ``--help`` shows for a method option's value: the declared one (``--n-clusters
    K``), ``N`` for a whole number, else the flag's last word (``--tau TAU``, ``--weight-share
    SHARE``); None where argparse lists the choices instead."""
    if param.metavar:
        return param.metavar
    if param.choices:
        return None
    if param.type in _WHOLE_NUMBER_READERS:
        return "N"
    return param.cli_flag.lstrip("-").rsplit("-", 1)[-1].upper()


def _add_method_options(parser: argparse.ArgumentParser, specs=None, skip: Sequence[str] = ()) -> None:
    """One option per method parameter flag (read from the methods' declarations: ``specs``,
    default every method), default None, so that only what the user gives reaches the
    method; its help names the methods and their defaults."""
    from anomalib_study.methods import SPECS

    group = parser.add_argument_group("method options (each applies to the methods named in its help)")
    for flag, declared in _method_options((SPECS if specs is None else specs).values()).items():
        if all(param.name in skip for _, param in declared):
            continue
        first = declared[0][1]
        owners = ", ".join(f"{spec.name} {param.default!r}" for spec, param in declared)
        choices = []
        for _, param in declared:
            choices += [c for c in (param.choices or ()) if c not in choices]
        help_text = f"{first.help} (default: {owners})"
        dest = "method_" + flag.lstrip("-").replace("-", "_")
        if first.type is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(
                flag,
                dest=dest,
                type=_parser_type(first.type),
                default=None,
                choices=choices or None,
                metavar=None if choices else _metavar(first),
                help=help_text,
            )


def _method_params(args: argparse.Namespace) -> dict:
    """The method options the user gave, by parameter name; StudyError for one the chosen
    method does not have."""
    from anomalib_study.methods import SPECS, get_method

    spec = get_method(args.method)
    params = {}
    for flag, declared in _method_options(SPECS.values()).items():
        value = getattr(args, "method_" + flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        mine = [param for owner, param in declared if owner is spec]
        if not mine:
            owners = ", ".join(owner.name for owner, _ in declared)
            raise StudyError(f"{flag} is an option of method {owners}, not of {spec.name}")
        params[mine[0].name] = value
    return params


def _build_parser() -> argparse.ArgumentParser:
    from anomalib_study.evaluate import CLUSTERING_PROTOCOLS
    from anomalib_study.methods import DETECTORS, SPECS

    methods = tuple(SPECS)
    parser = argparse.ArgumentParser(prog="anomalib-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="flag the anomalous images of a folder with any method")
    p.add_argument("test_dir", help="folder of images to check")
    p.add_argument(
        "--db-dir",
        default=None,
        help="database folder: loaded if valid, else built and saved there (default <method>_db)",
    )
    p.add_argument(
        "--image-dir",
        default=None,
        help="folder of normal images to build the database from, and to check a reused one against "
        "(default: images, when there is such a folder)",
    )
    p.add_argument("--model-name", default="efficientnet_lite0", help="backbone (see `anomalib-study backbones`)")
    p.add_argument("--weights", default=None, help="explicit weight file for the backbone")
    p.add_argument("--gpu", action="store_true", help="use CUDA")
    p.add_argument(
        "--batch-size",
        type=_parser_type(positive_int),
        default=None,
        help="images per forward pass (default: the method's own)",
    )
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--result-dir", default="result", help="runs are written to <result-dir>/<timestamp>/")
    p.add_argument("--method", choices=tuple(DETECTORS), default="knn", help="detector (default knn)")
    p.add_argument(
        "--image-size",
        type=_parser_type(positive_int),
        default=None,
        help="input side (default: the method's, e.g. 128 for the autoencoder, else the backbone's)",
    )
    _add_resize_mode(p)
    p.add_argument(
        "--max-overlays",
        type=int,
        default=100,
        help="(methods with anomaly maps) overlays written for at most this many flagged images (default 100)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a test folder holding unreadable images (all named) instead of skipping them",
    )
    p.add_argument(
        "--skip-unreadable-normal",
        action="store_true",
        help="build the database without the unreadable normal images (recorded in it) instead of refusing",
    )
    _add_method_options(p, DETECTORS)

    p = sub.add_parser("evaluate", help="evaluate a method on a data set and write <out>/metrics.json")
    p.add_argument("--method", choices=methods, default="knn", help="method (default knn)")
    p.add_argument(
        "--dataset",
        required=True,
        help="layout: mvtec_ad, mvtec_loco, mvtec_3d, dagm, magnetic_tile, kolektorsdd, neu_det, folder, ood",
    )
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument("--category", default=None, help="category inside root (mvtec_ad bottle, dagm Class1, ...)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="explicit weight file for the backbone")
    p.add_argument("--image-size", type=_parser_type(positive_int), default=None)
    _add_resize_mode(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-size",
        type=_parser_type(positive_int),
        default=None,
        help="images per forward pass (default: the method's own)",
    )
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--seed", type=int, default=None, help="seed of the split where the layout has no official one")
    p.add_argument(
        "--normal",
        action="append",
        default=None,
        metavar="NAME",
        help="--dataset folder: the folder of normal images under --root (default good); repeatable",
    )
    p.add_argument(
        "--anomalous",
        default=None,
        metavar="NAME",
        help="--dataset folder: the folder of anomalous images (one subfolder per defect type; default anomalous)",
    )
    p.add_argument("--out", required=True, help="folder for metrics.json (never overwritten)")
    p.add_argument(
        "--protocol",
        default=None,
        choices=tuple(CLUSTERING_PROTOCOLS),
        help="clustering methods: the test images grouped (default reproduction: normal test images kept "
        "as one class, 'combined' removed; anomalous_only: defects only)",
    )
    _add_method_options(p)

    p = sub.add_parser(
        "cluster",
        help="group the images of a folder into anomaly types (anomaly clustering); --from RUN regroups a run",
        description="Group the images of FOLDER into anomaly types; each run writes <out>/<timestamp>/ with "
        "index.html (open it in a browser), clusters.csv, embeddings.npz and config.json. --from RUN groups "
        "the images of an earlier run again from its embeddings, in seconds (e.g. with another --n-clusters).",
    )
    p.add_argument(
        "folder", nargs="?", default=None, metavar="FOLDER", help="folder of images to group (e.g. a day's rejects)"
    )
    p.add_argument(
        "--from",
        dest="from_run",
        default=None,
        metavar="RUN",
        help="regroup an earlier run's images from its embeddings.npz (no backbone, no image read) into a new "
        "run folder: with --n-clusters K, into K clusters; without, the number chosen again "
        "(--max-clusters and --linkage apply too; instead of FOLDER)",
    )
    p.add_argument(
        "--normal-dir",
        default=None,
        metavar="DIR",
        help="folder of normal images: semi-supervised patch scores (default: unsupervised, none needed)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="runs are written to DIR/<timestamp>/ (default clusters; with --from: beside RUN)",
    )
    p.add_argument(
        "--backbone",
        default=None,
        metavar="NAME",
        help="backbone (default efficientnet_lite0; see `anomalib-study backbones`)",
    )
    p.add_argument("--weights", default=None, metavar="FILE", help="explicit weight file for the backbone")
    p.add_argument(
        "--image-size",
        type=_parser_type(positive_int),
        default=None,
        metavar="PX",
        help="input side in pixels (default: the backbone's)",
    )
    _add_resize_mode(p)
    p.add_argument("--device", default=None, metavar="DEVICE", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--batch-size",
        type=_parser_type(positive_int),
        default=None,
        metavar="N",
        help="images per forward pass (default: the method's own)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="image-decoding worker processes (default 0)",
    )
    p.add_argument(
        "--strict", action="store_true", help="refuse a folder holding unreadable images instead of skipping them"
    )
    p.set_defaults(method="clustering")  # the method options below are anomaly clustering's
    _add_method_options(p, {"clustering": SPECS["clustering"]}, skip=("modes",))

    p = sub.add_parser("run", help="execute a study file's notebooks and render the reports")
    p.add_argument("study", help="study file, e.g. studies/default.yaml")
    p.add_argument("--jobs", type=_parser_type(positive_int), default=1, help="grid cells run in parallel here")
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="run the cells on a Dask cluster: its scheduler's address, e.g. tcp://10.0.0.5:8786 "
        "(exclusive with --jobs; see the README)",
    )
    p.add_argument("--data", default=None, help="real data folder (default $ANOMALIB_STUDY_DATA)")
    p.add_argument("--reports", default="reports", help="reports folder (default reports)")
    p.add_argument("--force", action="store_true", help="rerun cells whose inputs did not change")
    p.add_argument(
        "--only", action="append", default=None, help="run only this cell (dataset-backbone, glob allowed); repeatable"
    )
    p.add_argument("--device", default=None, help="set every cell's device (cpu, cuda, cuda:N)")
    p.add_argument("--kernel", default=None, help="Jupyter kernel (default: anomalib-study if installed)")

    p = sub.add_parser(
        "verify",
        help="re-run committed reports in a scratch folder and compare their metrics (exit 1 when a number drifted; "
        "schema and wording differences are listed; --adopt regenerates the stale ones that matched)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=None,
        help="verify only this report: cell name or <notebook>/<cell>, glob allowed; repeatable",
    )
    p.add_argument(
        "--tolerance",
        type=_parser_type(non_negative_float),
        default=0.0,
        help="largest absolute difference of two numbers that still matches, on top of each number's own "
        "tolerance (default 0: exact up to float rounding, or within a method's declared tolerance)",
    )
    p.add_argument(
        "--reports", default="reports", help="the committed reports folder, only read unless --adopt (default reports)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="real data folder (default $ANOMALIB_STUDY_DATA); without it, reports of real data are skipped",
    )
    p.add_argument(
        "--keep-scratch",
        default=None,
        metavar="DIR",
        help=(
            "re-run into DIR and keep it (default: a temporary folder, removed); verify again with the same DIR "
            "to resume: re-runs it left there that are current (same notebook, code, parameters, data folder) are "
            "compared, not run again"
        ),
    )
    p.add_argument(
        "--adopt",
        action="store_true",
        help=(
            "replace each committed report that is not current (stale, or of unknown freshness) and whose re-run "
            "matched by the re-run, so one verify both checks and regenerates; drifted (unless --adopt-drifted),"
            " failed and current reports are left as they are (the only option that writes into --reports)"
        ),
    )
    p.add_argument(
        "--adopt-drifted",
        action="store_true",
        help=(
            "with --adopt, a drifted re-run replaces its committed report too (for a drift understood: a report of "
            "older code or another CPU); its drifts are listed, and a resumed verify still reports them"
        ),
    )
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

    given = {"seed": args.seed, "normal": args.normal, "anomalous": args.anomalous}
    options = {name: value for name, value in given.items() if value is not None} or None
    if args.dataset != "folder" and (args.normal or args.anomalous):
        raise StudyError("--normal and --anomalous are options of --dataset folder only")
    metrics = evaluate(
        args.method,
        args.dataset,
        args.root,
        category=args.category,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        device=args.device,
        out=args.out,
        dataset_options=options,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache=None if args.no_cache else "default",
        protocol=args.protocol,
        **_method_params(args),
    )
    (_print_clustering if metrics.get("task") == "clustering" else _print_metrics)(metrics, args)
    return 0


def _print_clustering(metrics: dict, args: argparse.Namespace) -> None:
    protocol = metrics["protocol"]
    print(
        f"{metrics['dataset']['name']} / {args.backbone} / {args.method}: {protocol['n_images']} images of "
        f"{protocol['n_classes']} types, {protocol['n_clusters']} clusters (protocol {protocol['name']})"
    )
    print(f"{'mode':>16} {'NMI':>6} {'ARI':>6} {'F1':>6}  tau")
    for mode, row in metrics["modes"].items():
        tau = "-" if row["tau"] is None else f"{row['tau']:.4g}"
        oracle = row.get("oracle")
        note = (
            f"  (oracle tau {oracle['tau']:.4g}: NMI {oracle['nmi']:.3f})"
            if oracle and oracle["tau"] is not None
            else ""
        )
        print(f"{mode:>16} {row['nmi']:6.3f} {row['ari']:6.3f} {row['f1']:6.3f}  {tau}{note}")
    print(f"total {metrics['timings']['total_s']:.1f} s  peak RSS {metrics['peak_memory']['peak_rss_mb']:.0f} MB")
    print(f"wrote {Path(args.out) / 'metrics.json'}")


def _print_metrics(metrics: dict, args: argparse.Namespace) -> None:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    timings = metrics["timings"]
    print(
        f"{metrics['dataset']['name']} / {args.backbone} / {args.method}: n_train={metrics['n_train']} "
        f"n_test={metrics['n_test']}"
    )
    kinds = "".join(f", {kind} {fmt(metrics[f'image_auroc_{kind}'])}" for kind in metrics.get("score_kinds", []))
    print(f"image AUROC {fmt(metrics['image_auroc'])}{kinds}  image F1-max {fmt(metrics.get('image_f1_max'))}")
    print(f"accuracy {fmt(metrics['accuracy'])}  threshold {fmt(metrics['threshold'])} ({metrics['threshold_rule']})")
    if metrics.get("pixel_auroc") is not None:
        print(
            f"pixel AUROC {fmt(metrics['pixel_auroc'])}  PRO {fmt(metrics['pro'])}  "
            f"pixel F1-max {fmt(metrics['pixel_f1_max'])}"
        )
    report = metrics.get("classification_report")
    if report:
        print(f"{'':>14} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
        for name in ("normal", "anomalous", "macro avg", "weighted avg"):
            row = report[name]
            print(
                f"{name:>14} {row['precision']:9.3f} {row['recall']:9.3f} {row['f1-score']:9.3f} "
                f"{int(row['support']):8d}"
            )
    print(
        f"fit {timings['fit_s']:.1f} s  predict {timings['predict_s']:.1f} s  "
        f"peak RSS {metrics['peak_memory']['peak_rss_mb']:.0f} MB"
    )
    print(f"wrote {Path(args.out) / 'metrics.json'}")


#: the cluster options that make the embeddings: a regroup (--from) reuses the run's
_EMBEDDING_OPTIONS = (
    "normal_dir",
    "backbone",
    "weights",
    "image_size",
    "resize_mode",
    "device",
    "batch_size",
    "num_workers",
)
#: the method options a regroup takes
_REGROUP_PARAMS = ("n_clusters", "max_clusters", "linkage")


def _cmd_cluster(args: argparse.Namespace) -> int:
    import json

    from anomalib_study.cluster import cluster_folder, regroup_run

    params = _method_params(args)
    if args.from_run is not None:
        given = ["FOLDER"] if args.folder is not None else []
        given += [f"--{name.replace('_', '-')}" for name in _EMBEDDING_OPTIONS if getattr(args, name) is not None]
        given += [f"--{name.replace('_', '-')}" for name in params if name not in _REGROUP_PARAMS]
        given += ["--strict"] if args.strict else []
        if given:
            raise StudyError(
                f"--from regroups the embeddings of run {args.from_run} as they are: {', '.join(given)} would need "
                "them made again; run `anomalib-study cluster FOLDER` with those options instead (--from takes "
                "--n-clusters, --max-clusters, --linkage and --out)"
            )
        run_dir = regroup_run(args.from_run, args.out, **params)
    elif args.folder is None:
        raise StudyError("give the FOLDER of images to group, or --from RUN to regroup an earlier run")
    else:
        run_dir = cluster_folder(
            args.folder,
            args.out or "clusters",
            normal_dir=args.normal_dir,
            backbone=args.backbone or "efficientnet_lite0",
            weights=args.weights,
            image_size=args.image_size,
            resize_mode=args.resize_mode or "crop",
            device=args.device or "cpu",
            batch_size=args.batch_size,
            num_workers=args.num_workers or 0,
            strict=args.strict,
            **params,
        )
    config = json.loads((Path(run_dir) / "config.json").read_text())
    sizes = ", ".join(f"{k}: {v}" for k, v in config["cluster_sizes"].items())
    print(
        f"{config['n_clustered']} image(s) in {config['n_clusters']} clusters ({sizes}); "
        f"{config['settings']['mode']} patch scores"
    )
    print(f"number of clusters: {config['n_clusters_rule']}")
    print(f"tau: {config['tau_rule']}")
    if config.get("from_run"):
        print(f"regrouped from {config['from_run']} in {config['timings']['total_s']:.1f} s (page included)")
    if config["n_skipped"]:
        print(f"{config['n_skipped']} unreadable image(s) skipped: see {Path(run_dir) / 'skipped.csv'}")
    print(f"results in {run_dir}; open {Path(run_dir) / 'index.html'}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from anomalib_study.detect import detect_abnormal

    run_dir = detect_abnormal(
        args.test_dir,
        db_dir=args.db_dir,
        image_dir=args.image_dir,
        model_name=args.model_name,
        gpu=args.gpu,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        result_dir=args.result_dir,
        weights=args.weights,
        method=args.method,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        max_overlays=args.max_overlays,
        strict=args.strict,
        skip_unreadable_normal=args.skip_unreadable_normal,
        **_method_params(args),
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
        args.study,
        reports_dir=args.reports,
        jobs=args.jobs,
        data_root=args.data,
        only=args.only,
        force=args.force,
        device=args.device,
        kernel_name=args.kernel,
        scheduler=args.scheduler,
    )
    return exit_code(results)


def _cmd_verify(args: argparse.Namespace) -> int:
    from anomalib_study.verify import exit_code, verify_reports

    results = verify_reports(
        args.reports,
        only=args.only,
        tolerance=args.tolerance,
        data_root=args.data,
        scratch=args.keep_scratch,
        adopt=args.adopt,
        adopt_drifted=args.adopt_drifted,
        kernel_name=args.kernel,
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
    "cluster": _cmd_cluster,
    "evaluate": _cmd_evaluate,
    "run": _cmd_run,
    "verify": _cmd_verify,
    "download": _cmd_download,
    "make-synthetic": _cmd_make_synthetic,
    "backbones": _cmd_backbones,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    prefix = f"anomalib-study {args.command}"

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)  # one line, no source location

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show_warning
        try:
            return _COMMANDS[args.command](args)
        except StudyError as error:
            print(f"{prefix}: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # a write outside the atomic helpers (a memory-mapped bank, a library's file)
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {error.filename}" if error.filename else ""
            print(
                f"{prefix}: error: no space left on the device{where}: free some space there, or write to "
                "another folder (--out, --reports, ANOMALIB_STUDY_CACHE)",
                file=sys.stderr,
            )
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
