"""benchmarks/bench_study.py: stage sums from a report's timings, totals, and the JSON it writes from
a reports folder (known answers from tiny hand-written metrics files; nothing is run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_study", REPO / "benchmarks" / "bench_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_stage_seconds_sums_leaf_keys_into_stages_and_rendering_is_the_rest():
    patchcore = {
        "load_s": 1.0,
        "fit_s": 60.0,  # refined by the fit_* keys: left out
        "fit_extract_s": 20.0,
        "fit_coreset_s": 30.0,
        "fit_index_s": 2.0,
        "fit_calibration_s": 8.0,
        "predict_s": 10.0,
        "predict_images_per_s": 5.0,  # a rate: left out
        "pixel_metrics_s": 4.0,
        "total_s": 75.0,
    }
    assert bench.stage_seconds(patchcore, 90.0) == {
        "coreset": 30.0,
        "extraction": 20.0,
        "fit": 10.0,
        "other": 1.0,
        "predict": 14.0,
        "rendering": 15.0,
    }
    autoencoder = {
        "fit_s": 50.0,
        "fit_decode_s": 1.0,
        "fit_train_s": 49.0,
        "fit_seconds_per_epoch": 5.0,
        "total_s": 55.0,
    }
    assert bench.stage_seconds(autoencoder, None) == {"training": 50.0}
    clustering = {"unsupervised_s": 9.0, "unsupervised_patch_scores_s": 6.0, "unsupervised_cluster_s": 3.0}
    assert bench.stage_seconds(clustering, None) == {"clustering": 3.0, "predict": 6.0}


def test_totals_per_notebook_and_slowest_first():
    cells = [
        {"notebook": "02_patchcore", "cell": "a", "seconds": 100.0, "stages": {"coreset": 60.0}},
        {"notebook": "02_patchcore", "cell": "b", "seconds": 300.0, "stages": {"coreset": 200.0}},
        {"notebook": "01_knn_detection", "cell": "c", "seconds": 50.0, "stages": {}},
        {"notebook": "03_autoencoder", "cell": "d", "seconds": None},
    ]
    out = bench.totals(cells)
    assert out["total_s"] == 450.0 and out["per_notebook_s"] == {"01_knn_detection": 50.0, "02_patchcore": 400.0}
    assert [c["cell"] for c in out["slowest"]] == ["02_patchcore/b", "02_patchcore/a", "01_knn_detection/c"]
    assert out["per_stage_s"] == {"coreset": 260.0} and out["untimed"] == ["03_autoencoder/d"]
    assert bench.goal(out, cells)["met"] is None  # not every cell current: not judged


def test_cache_reads_are_told_apart_sharing_within_the_run_from_a_cache_filled_before():
    patchcore = {  # a PatchCore report: its train features read, its test features extracted
        "index": {
            "patch_cache": {
                "train": {"patch_cache": "hit", "key": "A"},
                "test": {"patch_cache": "extracted", "key": "B"},
            }
        },
        "_run": {"code": {"modules": {"patch_cache.py": "x"}}},
    }
    knn = {
        "feature_cache": {
            "normal images": {"read": 2, "computed": 3, "key": "K", "read_images": "R", "computed_images": "C"},
            "test images": "off",
        }
    }
    assert bench.cache_uses(patchcore) == [
        {"cache": "patch", "read": True, "key": "A"},
        {"cache": "patch", "read": False, "key": "B"},
    ]
    assert bench.cache_uses(knn) == [
        {"cache": "feature", "read": True, "key": "K:R"},
        {"cache": "feature", "read": False, "key": "K:C"},
    ]
    writer = {
        "cell": "w",
        "notebook": "02",
        "started_at": "1",
        "freshness": "current",
        "caches": [{"cache": "patch", "read": False, "key": "A"}],
    }
    reader = {
        "cell": "r",
        "notebook": "02",
        "started_at": "2",
        "freshness": "current",
        "caches": bench.cache_uses(patchcore),
    }
    assert bench.cache_check([reader, writer]) == {
        "reads_shared_within_the_regeneration": 1,
        "reads_from_before_it": 0,
        "cells_reading_from_before_it": [],
        "as_from_an_empty_cache": True,
    }
    early = {**reader, "started_at": "0"}  # it ran before the cell that wrote A: A was in the cache already
    check = bench.cache_check([early, writer])
    assert check["reads_from_before_it"] == 1 and check["cells_reading_from_before_it"] == ["02/r (patch cache)"]
    assert not check["as_from_an_empty_cache"]


def test_a_read_of_an_entry_created_during_the_regeneration_is_shared(tmp_path):
    import os

    folder = tmp_path / "features" / "K"
    folder.mkdir(parents=True)
    (folder / "key.json").write_text("{}")
    os.utime(folder / "key.json", (1_800_000_000, 1_800_000_000))  # 2027-01-15: after the cell below started
    reader = {  # its images were computed by other cells among theirs: no earlier use has this digest
        "cell": "ood",
        "notebook": "01",
        "started_at": "2026-12-07T17:00:00+00:00",
        "freshness": "current",
        "caches": [{"cache": "feature", "read": True, "key": "K:digest"}],
    }
    assert bench.cache_check([reader], tmp_path)["as_from_an_empty_cache"]
    os.utime(folder / "key.json", (1_700_000_000, 1_700_000_000))  # 2023: filled before the regeneration
    assert not bench.cache_check([reader], tmp_path)["as_from_an_empty_cache"]
    assert not bench.cache_check([reader])["as_from_an_empty_cache"]  # no cache folder to look at


def test_run_reads_the_suites_reports_and_judges_nothing_when_reports_are_missing(tmp_path):
    study = tmp_path / "suite.yaml"
    study.write_text(f"studies:\n  - {REPO / 'studies' / 'knn.yaml'}\n  - {REPO / 'studies' / 'comparison.yaml'}\n")
    (tmp_path / "reports" / "01_knn_detection").mkdir(parents=True)
    metrics = {"timings": {"extract_train_s": 5.0, "score_s": 1.0, "total_s": 6.5}, "_run": {"duration_s": 9.0}}
    (tmp_path / "reports" / "01_knn_detection" / "synthetic_dagm-efficientnet_lite0.metrics.json").write_text(
        json.dumps(metrics)
    )
    out = tmp_path / "study.json"
    assert bench.main(["--study", str(study), "--reports", str(tmp_path / "reports"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    cell = next(c for c in result["cells"] if c["cell"] == "synthetic_dagm-efficientnet_lite0")
    assert cell["seconds"] == 9.0 and cell["stages"] == {"extraction": 5.0, "predict": 1.0, "rendering": 2.5}
    assert result["after"]["total_s"] == 9.0 and result["after"]["n_timed"] == 1
    assert result["goal"]["met"] is None and "not current" in result["goal"]["why"]
    assert {"cpu", "native_bf16", "load_average_1_5_15_min"} <= set(result["machine"])


def test_everything_yaml_runs_exactly_the_committed_reports():
    """studies/everything.yaml regenerates every committed report and nothing else, each once."""
    cells = bench.suite_cells(REPO / "studies" / "everything.yaml")
    assert len(cells) == len(set(cells))
    committed = {
        (path.parent.name, path.name[: -len(".metrics.json")]) for path in (REPO / "reports").glob("0*/*.metrics.json")
    }
    assert set(cells) == committed
    assert cells[-1] == ("05_comparison", "all-comparison")  # the comparison reads all the others: last
