"""The measurements of bench_patchcore.py, each in a fresh process: the predict timings side by
side, our fit runs, the stored results and their reuse, the comparison rows and the scaling rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from patchcore_bench_anomalib import anomalib_python, run_anomalib
from patchcore_bench_data import (
    ANOMALIB_SIDE,
    BACKBONE,
    BENCH_SCRIPT,
    CORESET_RATIO,
    LAYERS,
    N_TEST,
    PRECISIONS,
    REPO,
    log,
    magnetic_tile_lists,
    preprocessing_of,
    write_list,
)
from patchcore_bench_ratios import quadratic_extrapolation, ratios


# --------------------------------------------------------------------------------------
# Predict side by side; our fit runs
# --------------------------------------------------------------------------------------
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
    memory bank of the 10 % coreset's shape (N x 784 patches x 0.1 rows, 1536 columns: anomalib's
    random normal rows, whose exhaustive search costs what the shape says; ours a random 10 % of the
    first N training images' real patches, since our default certified search depends on the data),
    ``repeats`` rounds of (anomalib, ours in each of ``precisions``), each a fresh process
    with one warm-up batch. ``predict_speedup`` = median of our images/s / median of
    anomalib's (the first precision, fp32, under the historical keys; every precision under
    ``ours_by_precision`` with its median ``limit_ratio``)."""
    import statistics

    from anomalib_study.errors import StudyError
    from anomalib_study.methods.coreset import coreset_size

    train, test = magnetic_tile_lists(data, max(sizes), n_test)
    test_list = work / f"predict_test_{n_test}.txt"
    write_list(test, test_list)
    patches_per_image = (224 // 8) ** 2  # layer2 of a ResNet has stride 8: 28 x 28 patches at 224 px
    out = {}
    for n in sizes:
        rows = coreset_size(n * patches_per_image, CORESET_RATIO)
        train_list = work / f"predict_train_{n}.txt"  # our bank: a random 10 % of these images' real patches
        write_list(train[:n], train_list)
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
                        str(BENCH_SCRIPT),
                        "--our-side",
                        "--test-list",
                        str(test_list),
                        "--weights",
                        str(weights),
                        "--threads",
                        str(threads),
                        "--bank-rows",
                        str(rows),
                        "--train-list",
                        str(train_list),
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
                            "rerank_hit_rate",
                            "exact_fallbacks",
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
        str(BENCH_SCRIPT),
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
# Stored measurements, the comparison and the scaling rows
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


def measurement_summary(side: dict | None) -> dict | None:
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
            "anomalib": measurement_summary(theirs),
            "ours": measurement_summary(ours),
            "ratios": ratios(ours, theirs) if theirs else None,
            "ours_by_precision": {p: measurement_summary(m) for p, m in mine.items()},
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
            row = {"backbone": name, "random_weights": weights is not None, **measurement_summary(result)}
            above = result["peak_rss_mb"] - result["rss_after_imports_mb"]
            row["peak_above_imports_mb"] = above
            row["memory_above_imports_per_bank_mb"] = above / result["bank_mb"]
            rows.append(row)
            log(
                f"scaling {name} N={n}: fit {result['fit_s']:.1f} s (coreset {result['fit_coreset_s']:.1f} s), "
                f"peak {result['peak_rss_mb']:.0f} MiB, bank {result['bank_mb']:.0f} MiB"
            )
    return rows
