"""PatchCore in fp32 and in bf16 on every committed data set: how much the results move. Writes one JSON.

    python benchmarks/bench_patchcore_precision.py [--data DIR] [--only GLOB ...] [--hit-images 8]
                                                   [--out reports/benchmarks/patchcore_precision.json]

Issue 13's rule: bf16 becomes PatchCore's default precision only if image AUROC, pixel AUROC
and PRO move by at most 0.002 on every committed data set. This script measures exactly that.
For every cell of ``studies/patchcore.yaml`` (data set x backbone, the study's own parameters:
10 % coreset, reweighted image score, sigma 4, the data set's resize mode) and every cell it
``uses`` (the aspect-kept DINOv2 cells of the resolution and coreset ablations, after the study's
own), in the order of the cheapest first, it runs :func:`anomalib_study.evaluate.evaluate` twice in this process, with
``precision="fp32"`` and ``precision="bf16"`` (backbone forward under bf16 autocast, Flat bank
search in bf16 with the best 8 candidates of each patch re-ranked in float32), and records:

* ``image_auroc``, ``pixel_auroc``, ``pro`` of both and their changes (bf16 - fp32);
* ``rerank_hit_rate``: on the patches of the first ``--hit-images`` test images (bf16 forward, as
  at prediction), how often the bf16 candidates held faiss's exact float32 nearest bank row
  (:meth:`anomalib_study.search.NearestNeighbourIndex.rerank_hit_rate`);
* ``fp32_matches_committed``: whether the fp32 run reproduces the committed report's three figures
  (``reports/02_patchcore/<cell>.metrics.json``) up to float rounding (1e-6; the largest difference in
  ``fp32_vs_committed_max_diff``), so that the comparison is with what the study shows;
* both runs' fit and predict seconds (on a CPU without native bf16 the bf16 run is emulated and
  many times slower: those seconds say nothing about bf16 on a CPU that has it;
  ``bench_patchcore.py`` measures speed).

The report is rewritten after every cell (``"complete": false`` until the end), so a stopped run
keeps what it measured, and ``--resume`` skips the cells the JSON already holds (and keeps those
``--only`` leaves out); ``--stored-only``
measures nothing and rewrites the summary of the stored cells, listing the others as not measured.
``bf16_default_allowed`` is true only when every cell of the study was measured and every change is
within 0.002. ``--quick`` runs the synthetic EfficientNet-Lite0 cell on a tiny generated set at 64 px (seconds;
smoke test) and writes nothing unless ``--out`` is given.

``--compare SETTING`` puts another setting in bf16's place, written as ``bench_patchcore.py``
names them: a precision, optionally ``@<search dimensions>`` (``fp32@128``: fp32 throughout, the
bank search's candidates from 128 principal components of the bank, re-ranked exactly; the hit
rate is then that search's). Its report goes to ``reports/benchmarks/patchcore_compare_<precision>_<dims>.json``
and says whether that setting passes the same 0.002 rule (``default_allowed``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
for _folder in (REPO, REPO / "benchmarks"):  # a source checkout; bench_knn's PartialReport
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "patchcore_precision.json"
STUDY = REPO / "studies" / "patchcore.yaml"
COMMITTED = REPO / "reports" / "02_patchcore"
METRICS = ("image_auroc", "pixel_auroc", "pro")
TOLERANCE = 0.002
# notebook 02's parameters that are not evaluate's (the coreset ablation, where to write, the title)
NOTEBOOK_ONLY = ("ablation_ratios", "ablation_train_images", "metrics_out", "report_name")
# cheapest first, so that a stopped run has measured as many data sets as possible
ORDER = (
    "synthetic_dagm",
    "mvtec_ad-bottle",
    "mvtec_ad-transistor",
    "mvtec_3d-tire",
    "kolektorsdd",
    "mvtec_loco-juice_bottle",
    "magnetic_tile",
)
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench_patchcore_precision {time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def study_cells(data: Path | None, only: Sequence[str] = ()) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """``(cell name, evaluate keyword arguments or None, skip reason or None)`` of the PatchCore study,
    cheapest first, then the cells it uses (defined by the ablation studies), in its order."""
    from anomalib_study.runner import expand_grid, read_study, resolve_parameters, synthetic_root, used_cells

    study = read_study(STUDY)
    cells = expand_grid(study)
    rank = {key: i for i, key in enumerate(ORDER)}
    cells.sort(key=lambda c: (rank.get(c.dataset, len(ORDER)), c.name))
    cells += [cell for _, cell in used_cells(study)]
    chosen = []
    for cell in cells:
        if only and not any(fnmatch.fnmatchcase(cell.name, pattern) for pattern in only):
            continue
        parameters, reason = resolve_parameters(cell.parameters, data=data, synthetic=synthetic_root)
        kwargs = {k: v for k, v in parameters.items() if k not in NOTEBOOK_ONLY}
        chosen.append((cell.name, None if reason else kwargs, reason))
    return chosen


def committed_figures(cell: str) -> dict[str, Any] | None:
    path = COMMITTED / f"{cell}.metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return {key: metrics.get(key) for key in METRICS}


def _change(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(b) - float(a)


def measure(kwargs: dict[str, Any], hit_images: int, quick: bool = False, compare: str = "bf16") -> dict[str, Any]:
    """fp32 and ``compare`` on one cell: figures, changes, seconds, the re-rank hit rate."""
    from bench_patchcore import parse_setting

    from anomalib_study.evaluate import evaluate

    kwargs = dict(kwargs)
    dataset, root = kwargs.pop("dataset"), kwargs.pop("root")
    if quick:
        kwargs.update(image_size=64)
    runs: dict[str, Any] = {}
    for setting in ("fp32", compare):
        precision, search_dim = parse_setting(setting)
        search_dim = None if search_dim == "default" else search_dim  # here a setting without @: every feature
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "bf16 is emulated": recorded as native_bf16
            metrics = evaluate(
                "patchcore",
                dataset,
                root,
                progress=False,
                return_maps=setting == compare,
                precision=precision,
                search_dim=search_dim,
                cache=None,
                **kwargs,
            )
        runs[setting] = {
            **{key: metrics.get(key) for key in METRICS},
            "precision_used": metrics.get("precision_used"),
            "fit_s": round(metrics["timings"]["fit_s"], 2),
            "predict_s": round(metrics["timings"]["predict_s"], 2),
            "n_train": metrics["n_train"],
            "n_test": metrics["n_test"],
            "memory_bank_size": metrics.get("memory_bank_size"),
        }
        log(f"  {setting}: " + ", ".join(f"{k} {runs[setting][k]}" for k in (*METRICS, "fit_s", "predict_s")))
    from anomalib_study.data import load_dataset

    model = metrics["model"]
    test = load_dataset(dataset, root, category=kwargs.get("category")).test[:hit_images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patches, _ = model.extract_patches([r.path for r in test])
    hit = model.index_.rerank_hit_rate(patches.reshape(-1, patches.shape[-1]))
    changes = {key: _change(runs["fp32"][key], runs[compare][key]) for key in METRICS}
    return {
        **runs,
        "compared": compare,
        "changes": changes,
        "rerank_hit_rate": {**hit, "n_images": len(test)},
        "within_tolerance": all(v is None or abs(v) <= TOLERANCE for v in changes.values()),
    }


def _matches_committed(row: dict[str, Any]) -> tuple[bool | None, float | None]:
    """Whether the fp32 run gives the committed report's figures (up to float rounding, 1e-6), and the largest
    difference."""
    committed = row.get("committed")
    if committed is None:
        return None, None
    diffs = []
    for key in METRICS:
        a, b = committed.get(key), row["fp32"].get(key)
        if (a is None) != (b is None):
            return False, None
        if a is not None:
            diffs.append(abs(float(a) - float(b)))
    largest = max(diffs, default=0.0)
    return largest <= 1e-6, largest


def run(
    data: Path | None,
    only: Sequence[str],
    hit_images: int,
    out: Path | None,
    resume: bool,
    quick: bool = False,
    stored_only: bool = False,
    compare: str = "bf16",
) -> dict[str, Any]:
    import torch
    from bench_knn import PartialReport
    from bench_patchcore import load_average

    from anomalib_study.hardware import native_bf16

    report = PartialReport(
        out,
        native_bf16=native_bf16("cpu"),
        quick=quick,
        tolerance=TOLERANCE,
        study=str(STUDY.relative_to(REPO)),
        hit_images=hit_images,
        compared=compare,
    )
    keep_stored = (resume or stored_only) and out is not None and out.exists()
    previous = json.loads(out.read_text()).get("cells", {}) if keep_stored else {}
    # rows of another comparison (rows from before "compared" was recorded compared bf16) are not this one's
    previous = {name: row for name, row in previous.items() if row.get("compared", "bf16") == compare}
    study = [] if quick else study_cells(data)  # every cell of the study, resolved once
    cells = study_cells(data, only) if only or quick else study
    if quick:  # one cell, on a tiny generated set of its own
        from anomalib_study.data.synthetic import make_synthetic_dagm

        root = make_synthetic_dagm(
            Path(tempfile.mkdtemp(prefix="bench_precision_quick_")),
            n_classes=1,
            n_train=8,
            n_test_normal=4,
            n_test_defect=4,
            image_size=64,
        )
        cells = [
            (name, {**kwargs, "root": str(root)}, reason)
            for name, kwargs, reason in cells
            if name == "synthetic_dagm-efficientnet_lite0"
        ]
    report["cells"] = {}
    report["skipped"] = {name: reason for name, _, reason in cells if reason and name not in previous}
    report["not_measured"] = []
    chosen = {name for name, _, _ in cells}
    for name, _, reason in study:  # stored cells that --only leaves out, or that cannot run here (no data): kept
        if name in previous and (name not in chosen or reason):
            row = previous[name]
            row["fp32_matches_committed"], row["fp32_vs_committed_max_diff"] = _matches_committed(row)
            report["cells"][name] = row
    for name, kwargs, reason in cells:
        if reason:
            if name in previous:
                log(f"{name}: cannot be measured here ({reason}); the stored measurement is kept")
            continue
        if name in previous:
            log(f"{name}: kept from {out}")
            row = previous[name]
        elif stored_only:
            report["not_measured"].append(name)
            continue
        else:
            log(f"{name}: fp32 and {compare}")
            started = time.strftime("%Y-%m-%dT%H:%M:%S")
            load_before = load_average()
            row = measure(kwargs, hit_images, quick=quick, compare=compare)
            row["committed"] = None if quick else committed_figures(name)
            row["measured"] = {
                "started": started,
                "native_bf16": native_bf16("cpu"),
                "torch_threads": torch.get_num_threads(),
                "load_average_before": load_before,
                "load_average_after": load_average(),
            }
        row["fp32_matches_committed"], row["fp32_vs_committed_max_diff"] = _matches_committed(row)
        report["cells"][name] = row
        report.save()
    rows = report["cells"].values()
    measured_all = (
        bool(study)
        and not any(reason for _, _, reason in study)
        and all(name in report["cells"] for name, _, _ in study)
    )
    changes = [abs(v) for row in rows for v in row["changes"].values() if v is not None]
    report["max_abs_change"] = max(changes) if changes else None
    report["cells_outside_tolerance"] = [name for name, row in report["cells"].items() if not row["within_tolerance"]]
    report["min_rerank_hit_rate"] = min((row["rerank_hit_rate"]["hit_rate"] for row in rows), default=None)
    report["every_study_cell_measured"] = measured_all
    # bf16 is allowed only when every cell was measured and is within the tolerance; one cell outside it
    # already decides against bf16, measured or not the rest
    report["default_allowed"] = bool(measured_all and not report["cells_outside_tolerance"])
    if compare == "bf16":
        report["bf16_default_allowed"] = report["default_allowed"]
    # cells stored by runs before this record existed were measured on a CPU without native bf16
    report["native_bf16_by_cell"] = {
        name: (row.get("measured") or {}).get("native_bf16", False) for name, row in report["cells"].items()
    }
    report.save()
    return dict(report.finish())


def summary(report: dict) -> list[str]:
    lines = [f"{'cell':42} {'image AUROC':>19} {'pixel AUROC':>19} {'PRO':>19}  hit rate"]
    for name, row in report["cells"].items():
        parts = []
        for key in METRICS:
            a, change = row["fp32"][key], row["changes"][key]
            parts.append("-".rjust(19) if a is None else f"{a:.4f} {change:+.4f}".rjust(19))
        lines.append(f"{name:42} {' '.join(parts)}  {row['rerank_hit_rate']['hit_rate']:.4f}")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"{name:42} skipped: {reason}")
    for name in report.get("not_measured", []):
        lines.append(f"{name:42} not measured")
    lines.append(
        f"largest change {report['max_abs_change']} (tolerance {TOLERANCE}); outside it: "
        f"{', '.join(report['cells_outside_tolerance']) or 'none'}; every cell measured: "
        f"{report['every_study_cell_measured']}; {report.get('compared', 'bf16')} may be the default: "
        f"{report['default_allowed']}"
    )
    return lines


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
        "--data", default=None, help="real data folder (default $ANOMALIB_STUDY_DATA or ../shared/data)"
    )
    parser.add_argument("--only", nargs="*", default=[], help="cell name patterns (e.g. 'mvtec_ad-*'); default: all")
    parser.add_argument("--hit-images", type=int, default=8, help="test images whose patches the hit rate uses")
    parser.add_argument("--resume", action="store_true", help="keep the cells the --out JSON already holds")
    parser.add_argument(
        "--stored-only",
        action="store_true",
        help="measure nothing: the summary of the cells the --out JSON holds, the others listed as not measured",
    )
    parser.add_argument("--quick", action="store_true", help="synthetic EfficientNet-Lite0 cell at 64 px (smoke test)")
    parser.add_argument(
        "--out", default=None, help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; with --quick: none)"
    )
    parser.add_argument(
        "--compare",
        default="bf16",
        help="the setting compared with fp32: a precision, optionally @<search dimensions> "
        "(e.g. fp32@128); default bf16",
    )
    args = parser.parse_args(argv)
    if args.hit_images < 1:
        parser.error(f"--hit-images must be at least 1, got {args.hit_images}")
    try:
        from bench_patchcore import parse_setting

        precision, search_dim = parse_setting(args.compare)
        search_dim = None if search_dim == "default" else search_dim  # here a setting without @: every feature
        if args.compare == "fp32":
            raise StudyError("--compare fp32 compares fp32 with itself: give bf16 or a setting with @<dims>")
        default_out = (
            DEFAULT_OUT
            if args.compare == "bf16"
            else DEFAULT_OUT.with_name(f"patchcore_compare_{precision}_{search_dim or 'all'}.json")
        )
        out = Path(args.out) if args.out else (None if args.quick else default_out)
        data = None if args.quick else data_root(args.data)
        report = run(
            data,
            args.only,
            args.hit_images,
            out,
            args.resume,
            quick=args.quick,
            stored_only=args.stored_only,
            compare=args.compare,
        )
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary(report)))
    if out is not None:
        write_json(out, report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
