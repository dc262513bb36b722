"""Autoencoder training and scoring speed on 2 cores, and what the default training budget
costs in AUROC. Writes one JSON report.

    python benchmarks/bench_autoencoder.py [--quick] [--data DIR] [--parts speed,default,longer,bf16]
                                           [--out reports/benchmarks/autoencoder.json] [--resume]

Parts (each compares its candidates in the same run):

1. ``speed``: for each model (``conv``, ``pretrained`` = EfficientNet-Lite0 encoder) and
   precision (fp32, and bf16 autocast), the seconds per training epoch and training
   images/s at 128 px on ``--speed-images`` normal images (one epoch after a warm-up
   epoch), and the scoring throughput of ``score_paths`` (files -> decoding -> network ->
   residual maps and scores) against the bare forward pass of the same network on the
   same images already decoded (``scoring_ratio`` = scoring / bare).
2. ``default``: ``evaluate("autoencoder", ...)`` with the default configuration (30 epochs
   at most, early stopping with patience 5 on 10 % held-out normal images, MSE + SSIM,
   128 px) on each MVTec AD category of ``--data``, both models: training minutes, epochs
   run, image AUROC (both scores), pixel AUROC, PRO. ``default_train_minutes`` = the
   largest training time over the categories (goal: at most 10 on 2 cores).
3. ``longer``: the same on the first category with three times the epochs the default run
   used and no early stopping: what the default budget costs in AUROC.
4. ``bf16``: fp32 vs bf16 autocast on the synthetic set (both models, few epochs): the
   AUROC difference. Where the CPU has no native bf16 (``native_bf16`` false in the JSON)
   bf16 is emulated and slower; the figures still show its effect on the scores.

``--resume`` keeps the parts the ``--out`` JSON already holds and runs only the missing ones,
so the parts can be measured in separate sittings (each on a quiet machine); every part
records when it ran, the machine load before and after and the torch threads
(``parts_measured``).

``--quick`` runs every part on the synthetic set at 64 px with 1-3 epochs (for the smoke
test) and writes nothing unless ``--out`` is given. Times are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _folder in (REPO, REPO / "benchmarks"):  # a source checkout; bench_knn's machine_info
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import torch  # noqa: E402

from anomalib_study.io import data_root, read_json_object, write_json  # noqa: E402

DEFAULT_OUT = REPO / "reports" / "benchmarks" / "autoencoder.json"
MODELS = ("conv", "pretrained")
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench_autoencoder {time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def _synthetic(work: Path) -> Path:
    from anomalib_study.data.synthetic import make_synthetic_dagm

    return make_synthetic_dagm(work / "synthetic_dagm", seed=0)


def bench_speed(
    paths: Sequence[Path], image_size: int, precisions: Sequence[str], repeats: int = 1, models: Sequence[str] = MODELS
) -> list[dict]:
    """Seconds per epoch (after a warm-up epoch) and scoring vs bare forward, per model and precision."""
    from anomalib_study.methods.autoencoder import AutoEncoder, decode_images

    images = decode_images(paths, image_size, batch_size=16)
    rows = []
    for model in models:
        for precision in precisions:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "bf16 is emulated here": said once in the JSON instead
                ae = AutoEncoder(
                    model=model,
                    image_size=image_size,
                    epochs=1 + repeats,
                    patience=10,
                    precision=precision,
                    progress=False,
                    val_fraction=0.1,
                ).fit(images)
            epochs = [row["seconds"] for row in ae.history_[1:]]  # the first epoch warms the kernels up
            n_train = ae.n_train_images_
            started = time.perf_counter()
            ae.set_params(num_workers=2)
            ae.score_paths(paths)
            scoring_s = time.perf_counter() - started
            batches = [images[i : i + ae.batch_size] for i in range(0, len(images), ae.batch_size)]
            started = time.perf_counter()
            for batch in batches:
                ae._forward(batch)  # the network alone: [0, 1] conversion, forward, under the same autocast
            bare_s = time.perf_counter() - started
            rows.append(
                {
                    "model": model,
                    "precision": precision,
                    "precision_used": ae.precision_used_,
                    "image_size": image_size,
                    "n_train_images": n_train,
                    "n_scored": len(paths),
                    "seconds_per_epoch": float(np.median(epochs)),
                    "train_images_per_s": n_train / float(np.median(epochs)),
                    "scoring_images_per_s": len(paths) / scoring_s,
                    "bare_forward_images_per_s": len(paths) / bare_s,
                    "scoring_ratio": bare_s / scoring_s,
                }
            )
            log(
                f"speed {model}/{precision}: {rows[-1]['seconds_per_epoch']:.1f} s/epoch, "
                f"{rows[-1]['train_images_per_s']:.1f} train img/s, "
                f"scoring {rows[-1]['scoring_images_per_s']:.1f} img/s "
                f"({rows[-1]['scoring_ratio']:.2f} of the bare forward)"
            )
    return rows


def _evaluate(layout: str, root: Path, category: str | None, model: str, **params: Any) -> dict:
    from anomalib_study.evaluate import evaluate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = evaluate(
            "autoencoder", layout, root, category=category, model=model, progress=False, num_workers=2, **params
        )
    return {
        "data": metrics["dataset"]["name"],
        "model": model,
        "encoder": metrics["encoder"],
        "params": {k: metrics["params"][k] for k in ("epochs", "patience", "loss", "precision", "image_score")},
        "image_size": metrics["image_size"],
        "n_train": metrics["n_train"],
        "n_test": metrics["n_test"],
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics["best_epoch"],
        "stopped_early": metrics["stopped_early"],
        "precision_used": metrics["precision_used"],
        "train_minutes": metrics["fit_timings"]["train_s"] / 60,
        "fit_minutes": metrics["timings"]["fit_s"] / 60,
        "predict_s": metrics["timings"]["predict_s"],
        "image_auroc_residual": metrics["image_auroc_residual"],
        "image_auroc_mse": metrics["image_auroc_mse"],
        "pixel_auroc": metrics["pixel_auroc"],
        "pro": metrics["pro"],
    }


PART_KEYS = {
    "default": ("default", "default_train_minutes", "default_train_minutes_by_model"),
    "speed": ("speed",),
    "bf16": ("bf16",),
    "longer": ("longer",),
}


def _stored_parts(out: Path | None, quick: bool) -> dict:
    """The parts a previous run wrote to ``out`` (each with its ``parts_measured`` entry), for ``--resume``.

    A report of the other kind (``--quick`` against a real run) is refused, not mixed in."""
    stored = read_json_object(out) if out is not None else None
    if stored is None:
        return {}
    if bool(stored.get("quick")) != bool(quick):
        raise SystemExit(
            f"{out}: a {'quick' if stored.get('quick') else 'full'} report; --resume cannot add "
            f"{'quick' if quick else 'full'} parts to it (pass another --out)"
        )
    measured = stored.get("parts_measured", {})
    return {
        part: {"keys": {k: stored[k] for k in keys if k in stored}, "measured": measured.get(part)}
        for part, keys in PART_KEYS.items()
        if keys[0] in stored
    }


def run(
    parts: Sequence[str],
    data: Path | None,
    quick: bool,
    work: Path,
    models: Sequence[str] = MODELS,
    out: Path | None = None,
    resume: bool = False,
) -> dict:
    """Every part in turn; with ``out`` the report so far is written after each part (marked
    ``"complete": false`` until the last), so a long run that is stopped keeps what it measured.

    ``resume``: the parts ``out`` already holds are kept as stored (with the machine load and
    threads of the run that measured them, in ``parts_measured``) and not run again; only the
    missing parts of ``parts`` run now. "longer" reads the epochs of a stored "default"."""
    from bench_knn import PartialReport, machine_info

    from anomalib_study.hardware import native_bf16

    report = PartialReport(out, native_bf16=native_bf16("cpu"), quick=quick)
    stored = _stored_parts(out, quick) if resume else {}
    report["parts_measured"] = {}
    for part, kept in stored.items():
        report.update(kept["keys"])
        report["parts_measured"][part] = {
            **(kept["measured"] or {"when": "unknown (an earlier run)"}),
            "kept_from_earlier_run": True,
        }
    parts = [p for p in parts if p not in stored]
    if stored:
        log(f"resume: keeping stored part(s) {', '.join(stored)}; running {', '.join(parts) or 'nothing'}")
    started = {}

    def save(part: str | None = None) -> None:
        if part is not None:
            report["parts_measured"][part] = {
                "when": started[part][0],
                "seconds": time.perf_counter() - started[part][1],
                "load_average_before": started[part][2],
                "load_average_after": machine_info()["load_average_1_5_15_min"],
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            }
        report.save()

    def start(part: str) -> None:
        started[part] = (
            time.strftime("%Y-%m-%dT%H:%M:%S"),
            time.perf_counter(),
            machine_info()["load_average_1_5_15_min"],
        )

    synthetic = _synthetic(work)
    categories = (
        []
        if quick or data is None
        else [c for c in ("bottle", "transistor") if (data / "mvtec_ad" / c / "train").is_dir()]
    )
    report["settings"] = {
        "parts": [*stored, *parts],
        "mvtec_ad_categories": categories,
        "data": str(data) if data else None,
        "default": "30 epochs max, patience 5, "
        "val_fraction 0.1, loss mse_ssim (a = 0.5), 128 px, batch 16, lr 1e-3, fp32",
    }
    if "default" in parts:
        start("default")
        rows = []
        targets = [("mvtec_ad", data / "mvtec_ad", c) for c in categories] or [("dagm", synthetic, "Class1")]
        for layout, root, category in targets:
            for model in models:
                log(f"default training: {category} {model}")
                rows.append(
                    _evaluate(layout, root, category, model, **({"image_size": 64, "epochs": 1} if quick else {}))
                )
                log(
                    f"  {rows[-1]['train_minutes']:.1f} min, {rows[-1]['epochs_run']} epochs, image AUROC "
                    f"{rows[-1]['image_auroc_residual']:.3f} (residual) / {rows[-1]['image_auroc_mse']:.3f} (mse)"
                )
        report["default"] = rows
        report["default_train_minutes"] = max(row["train_minutes"] for row in rows)
        report["default_train_minutes_by_model"] = {
            m: max(r["train_minutes"] for r in rows if r["model"] == m) for m in models
        }
        save("default")
    if "speed" in parts:
        start("speed")
        if categories:
            paths = sorted((data / "mvtec_ad" / categories[0] / "train" / "good").glob("*.png"))[:64]
        else:
            from anomalib_study.data import load_dataset

            paths = [r.path for r in load_dataset("dagm", synthetic, category="Class1").train][: 24 if quick else 64]
        report["speed"] = bench_speed(paths, 64 if quick else 128, ("fp32", "bf16"), models=models)
        save("speed")
    if "bf16" in parts:
        start("bf16")
        rows = []
        for model in models:
            pair = {}
            for precision in ("fp32", "bf16"):
                log(f"bf16 effect: synthetic {model} {precision}")
                pair[precision] = _evaluate(
                    "dagm",
                    synthetic,
                    "Class1",
                    model,
                    precision=precision,
                    epochs=1 if quick else 5,
                    image_size=64 if quick else 128,
                )
            rows.append(
                {
                    "model": model,
                    "fp32": pair["fp32"],
                    "bf16": pair["bf16"],
                    "image_auroc_residual_change": pair["bf16"]["image_auroc_residual"]
                    - pair["fp32"]["image_auroc_residual"],
                    "image_auroc_mse_change": pair["bf16"]["image_auroc_mse"] - pair["fp32"]["image_auroc_mse"],
                    "train_speed_ratio_bf16_to_fp32": pair["fp32"]["train_minutes"] / pair["bf16"]["train_minutes"],
                }
            )
        report["bf16"] = rows
        save("bf16")
    if "longer" in parts and report.get("default"):
        start("longer")
        rows = []
        for first in [r for r in report["default"] if r["data"] == report["default"][0]["data"]]:
            epochs = 3 * first["epochs_run"]
            layout, root, category = (
                ("mvtec_ad", data / "mvtec_ad", categories[0]) if categories else ("dagm", synthetic, "Class1")
            )
            log(f"three times longer: {category} {first['model']} {epochs} epochs, no early stopping")
            longer = _evaluate(
                layout,
                root,
                category,
                first["model"],
                epochs=epochs,
                patience=epochs,
                **({"image_size": 64} if quick else {}),
            )
            longer["default_epochs_run"] = first["epochs_run"]
            for key in ("image_auroc_residual", "image_auroc_mse", "pixel_auroc", "pro"):
                if longer[key] is not None and first[key] is not None:
                    longer[f"{key}_gain_over_default"] = longer[key] - first[key]
            rows.append(longer)
            log(f"  {longer['train_minutes']:.1f} min, image AUROC {longer['image_auroc_residual']:.3f} (residual)")
        report["longer"] = rows
        save("longer")
    return dict(report.finish())


def summary(report: dict) -> list[str]:
    lines = []
    for row in report.get("speed", []):
        lines.append(
            f"speed {row['model']:<10} {row['precision']:<5} ({row['precision_used']}): "
            f"{row['seconds_per_epoch']:.1f} s/epoch of {row['n_train_images']} images = "
            f"{row['train_images_per_s']:.1f} img/s; scoring {row['scoring_images_per_s']:.1f} img/s = "
            f"{row['scoring_ratio']:.2f} x the bare forward ({row['bare_forward_images_per_s']:.1f} img/s)"
        )
    for row in report.get("default", []):
        lines.append(
            f"default {row['data']:<22} {row['model']:<10}: {row['train_minutes']:.1f} min, "
            f"{row['epochs_run']} epochs (best {row['best_epoch']}), image AUROC residual "
            f"{row['image_auroc_residual']:.3f} / mse {row['image_auroc_mse']:.3f}"
        )
    if "default_train_minutes" in report:
        lines.append(f"default_train_minutes {report['default_train_minutes']:.1f} (goal <= 10)")
    for row in report.get("longer", []):
        lines.append(
            f"3x longer {row['model']:<10}: {row['epochs_run']} epochs ({row['train_minutes']:.1f} min), "
            f"image AUROC residual {row['image_auroc_residual']:.3f} "
            f"({row.get('image_auroc_residual_gain_over_default', float('nan')):+.3f} over the default run)"
        )
    for row in report.get("bf16", []):
        lines.append(
            f"bf16 {row['model']:<10}: image AUROC change residual {row['image_auroc_residual_change']:+.3f}, "
            f"mse {row['image_auroc_mse_change']:+.3f}; training speed bf16/fp32 "
            f"{row['train_speed_ratio_bf16_to_fp32']:.2f} (native bf16: {report['native_bf16']})"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="synthetic set, 64 px, 1-2 epochs (smoke test)")
    parser.add_argument(
        "--data", default=None, help="real data folder (default $ANOMALIB_STUDY_DATA or ../shared/data)"
    )
    parser.add_argument(
        "--parts",
        default="default,speed,bf16,longer",
        help="which parts to run, comma-separated "
        "(default: all four; they always run in the order default, speed, bf16, longer, and the "
        "report is written after each)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help="conv,pretrained (default both)")
    parser.add_argument(
        "--out",
        default=None,
        help=f"JSON report (default {DEFAULT_OUT.relative_to(REPO)}; --quick writes nothing unless given)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the parts the --out JSON already holds and "
        "run only the missing ones of --parts (each part records its own machine load)",
    )
    args = parser.parse_args(argv)
    data = data_root(args.data) or REPO.parent / "shared" / "data"
    data = data if (data / "mvtec_ad").is_dir() else None
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"speed", "default", "longer", "bf16"})
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}: choose from speed, default, longer, bf16")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out = Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)
    with tempfile.TemporaryDirectory(prefix="bench_autoencoder_") as scratch:
        report = run(parts, data, args.quick, Path(scratch), models, out, resume=args.resume)
    for line in summary(report):
        print(line)
    if out is not None:
        write_json(out, report)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    sys.exit(main())
