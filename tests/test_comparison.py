"""Tests of the comparison across reports, on hand-made metrics files (the front page: test_frontpage.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from anomalib_study import comparison, io
from anomalib_study.published import DN2_ACCURACY, PATCHCORE

SOURCES = "sources-now"


def _detection(
    method,
    dataset_key,
    layout,
    name,
    config,
    image_auroc,
    *,
    variant=None,
    synthetic=False,
    notebook_sha256=None,
    sources_hash=SOURCES,
    **extra,
):
    """Metrics as notebooks 01-03 write them (only the keys the comparison and published.py read)."""
    metrics = {
        "schema": 2,
        "method": method,
        "task": "detection",
        "dataset": {"name": name, "layout": layout},
        "synthetic": synthetic,
        "backbone": {"name": config, "label": f"{config} (label)", "image_size": 224, "preprocessing": {}},
        "n_train": 200,
        "n_test": 40,
        "k_used": 100,
        "params": {
            "k": 100,
            "thres_ratio": 0.92,
            "coreset_ratio": 0.1,
            "model": "conv",
            "loss": "mse",
            "ssim_weight": 0.5,
        },
        "image_auroc": image_auroc,
        "per_image": [],
        "environment": {},
        "accuracy": 0.75,
        "timings": {"fit_s": 12.0, "predict_s": 4.0, "predict_images_per_s": 10.0},
        "_run": {
            "dataset": dataset_key,
            "backbone": "" if variant else config,
            "status": "ok",
            "title": f"{method} study",
            "headline": ["image_auroc"],
            "duration_s": 3.0,
            "notebook": "/nowhere/nb.ipynb",
        },
        **extra,
    }
    if variant:
        metrics["_run"]["variant"] = variant
    if notebook_sha256 is not None:
        metrics["_run"].update(notebook_sha256=notebook_sha256, sources_hash=sources_hash)
    return metrics


def _clustering(dataset_key, name, layout, config):
    modes = {
        "unsupervised": {"nmi": 0.41, "ari": 0.3, "f1": 0.6, "tau": 2.5, "tau_rule": "label-free rule"},
        "average": {"nmi": 0.2, "ari": 0.1, "f1": 0.4, "tau": None, "tau_rule": "uniform weights"},
    }
    return {
        "schema": 2,
        "method": "clustering",
        "task": "clustering",
        "dataset": {"name": name, "layout": layout},
        "n_train": 0,
        "n_test": 12,
        "timings": {},
        "environment": {},
        "synthetic": False,
        "backbone": {"name": config, "label": config},
        "params": {"tau": None},
        "protocol": {"name": "reproduction"},
        "modes": modes,
        "_run": {
            "dataset": dataset_key,
            "backbone": config,
            "status": "ok",
            "headline": ["nmi_unsupervised"],
            "title": "clustering",
            "notebook": "/nowhere/nb.ipynb",
        },
        "nmi_unsupervised": 0.41,
    }


def _write(folder: Path, cell: str, metrics=None, failed=None, html=True):
    folder.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        io.write_json(folder / f"{cell}.metrics.json", metrics)
        if html:
            (folder / f"{cell}.html").write_text("<html></html>")
    if failed is not None:
        io.write_json(folder / f"{cell}.failed.json", {"_run": failed})
        (folder / f"{cell}.failed.html").write_text("<html>failed</html>")


@pytest.fixture
def project(tmp_path):
    """reports/ with kNN, PatchCore, autoencoder and clustering reports, one failed cell, one
    stale report; notebooks/ beside it (for staleness)."""
    notebooks, reports = tmp_path / "notebooks", tmp_path / "reports"
    notebooks.mkdir()
    for stem in ("01_knn_detection", "02_patchcore", "03_autoencoder", "04_anomaly_clustering"):
        (notebooks / f"{stem}.ipynb").write_text(f"{{}} {stem}")
    knn_sha = io.sha256_file(notebooks / "01_knn_detection.ipynb")
    knn, patchcore = reports / "01_knn_detection", reports / "02_patchcore"
    _write(
        knn,
        "synthetic_dagm-b1",
        _detection(
            "knn", "synthetic_dagm", "dagm", "synthetic_dagm", "b1", 0.81, synthetic=True, notebook_sha256=knn_sha
        ),
    )
    _write(
        knn,
        "mvtec_ad-bottle-b1",
        _detection(
            "knn",
            "mvtec_ad-bottle",
            "mvtec_ad",
            "mvtec_ad/bottle",
            "b1",
            0.93,
            notebook_sha256=knn_sha,
            sources_hash="older-sources",
        ),
    )
    _write(
        knn,
        "mvtec_ad-bottle-b2",
        failed={
            "dataset": "mvtec_ad-bottle",
            "backbone": "b2",
            "status": "failed",
            "error": {"ename": "ValueError", "evalue": "boom\nmore"},
        },
    )
    _write(
        patchcore,
        "mvtec_ad-bottle-b1",
        _detection(
            "patchcore",
            "mvtec_ad-bottle",
            "mvtec_ad",
            "mvtec_ad/bottle",
            "b1",
            0.97,
            pixel_auroc=0.95,
            pro=0.88,
            notebook_sha256="a-notebook-since-edited",
        ),
        failed={
            "dataset": "mvtec_ad-bottle",
            "backbone": "b1",
            "status": "failed",
            "error": {"ename": "RuntimeError", "evalue": "out of memory"},
        },
    )
    _write(
        reports / "03_autoencoder",
        "mvtec_ad-bottle-conv",
        _detection(
            "autoencoder",
            "mvtec_ad-bottle",
            "mvtec_ad",
            "mvtec_ad/bottle",
            "efficientnet_lite0",
            0.9,
            variant="conv",
            image_auroc_residual=0.9,
            image_auroc_mse=0.8,
            epochs_run=3,
            fit_timings={"train_s": 60.0},
            environment={"cpu_count": 2, "device": "cpu"},
        ),
    )
    _write(
        reports / "04_anomaly_clustering",
        "mvtec_ad-bottle-b1",
        _clustering("mvtec_ad-bottle", "mvtec_ad/bottle", "mvtec_ad", "b1"),
    )
    (reports / "benchmarks").mkdir()
    (reports / "benchmarks" / "knn.json").write_text("{}")
    (knn / ".hidden.metrics.json").write_text("{not json")
    return {"reports": reports, "notebooks": notebooks}


def _collect(project):
    return comparison.collect_reports(project["reports"], sources_hash=SOURCES)


def _row(table, notebook, cell):
    rows = table[(table["notebook"] == notebook) & (table["cell"] == cell)]
    assert len(rows) == 1, (notebook, cell)
    return rows.iloc[0]


def test_one_row_per_report_with_its_figures_and_status(project):
    table = _collect(project)
    assert len(table) == 6 and set(table["notebook"]) == {
        "01_knn_detection",
        "02_patchcore",
        "03_autoencoder",
        "04_anomaly_clustering",
    }
    synthetic = _row(table, "01_knn_detection", "synthetic_dagm-b1")
    assert synthetic["image_auroc"] == 0.81 and synthetic["synthetic"] and synthetic["status"] == "ok"
    assert synthetic["freshness"] == "current" and synthetic["fit_s"] == 12.0
    assert synthetic["predict_images_per_s"] == 10.0 and math.isnan(synthetic["pixel_auroc"])
    conv = _row(table, "03_autoencoder", "mvtec_ad-bottle-conv")
    assert (conv["config"], conv["variant"], conv["task"]) == ("conv", "conv", "detection")


def test_failed_reports_say_so_with_or_without_a_last_good_run(project):
    table = _collect(project)
    never_ran = _row(table, "01_knn_detection", "mvtec_ad-bottle-b2")
    assert never_ran["status"] == "failed" and never_ran["note"] == "ValueError: boom"
    assert never_ran["method"] == "knn" and never_ran["metrics"] is None  # the method: its notebook's
    assert math.isnan(never_ran["image_auroc"])
    kept = _row(table, "02_patchcore", "mvtec_ad-bottle-b1")
    assert kept["status"] == "failed" and kept["image_auroc"] == 0.97  # the last good run's number
    assert "RuntimeError: out of memory" in kept["note"] and "last good run" in kept["note"]
    detection = comparison.detection_table(table)
    assert "failed" in set(detection["status"])


def test_stale_when_the_notebook_or_the_sources_changed(project):
    table = _collect(project)
    sources = _row(table, "01_knn_detection", "mvtec_ad-bottle-b1")
    assert sources["status"] == "stale" and "package sources changed" in sources["note"]
    unknown = _row(table, "03_autoencoder", "mvtec_ad-bottle-conv")  # no hashes recorded: never claimed current
    assert unknown["freshness"] == "unknown" and unknown["status"] == "ok"
    notebook = project["notebooks"] / "01_knn_detection.ipynb"
    notebook.write_text(notebook.read_text() + " edited")
    edited = _row(_collect(project), "01_knn_detection", "synthetic_dagm-b1")
    assert edited["status"] == "stale" and "01_knn_detection.ipynb changed" in edited["note"]
    notebook.unlink()  # neither beside the reports nor at the recorded path: unknown, not a crash
    assert _row(_collect(project), "01_knn_detection", "synthetic_dagm-b1")["freshness"] == "unknown"


def test_heatmap_cells_are_the_metrics_values(project):
    matrix = comparison.auroc_matrix(_collect(project))
    assert list(matrix.columns) == ["mvtec_ad/bottle", "synthetic_dagm"]  # the data sets the metrics name
    assert list(matrix.index) == ["kNN (DN2) · b1", "PatchCore · b1", "autoencoder · conv"]
    assert matrix.loc["kNN (DN2) · b1", "mvtec_ad/bottle"] == 0.93
    assert matrix.loc["kNN (DN2) · b1", "synthetic_dagm"] == 0.81
    assert matrix.loc["PatchCore · b1", "mvtec_ad/bottle"] == 0.97
    assert math.isnan(matrix.loc["PatchCore · b1", "synthetic_dagm"])


def test_detection_and_clustering_tables(project):
    table = _collect(project)
    detection = comparison.detection_table(table)
    bottle = detection[detection["dataset"] == "mvtec_ad-bottle"]
    assert list(bottle["method"]) == ["kNN (DN2)", "kNN (DN2)", "PatchCore", "autoencoder"]  # method order
    assert bottle.iloc[2]["pixel_auroc"] == 0.95 and bottle.iloc[2]["pro"] == 0.88
    clustering = comparison.clustering_table(table)
    assert list(clustering["mode"]) == ["unsupervised", "average"]
    assert clustering.iloc[0]["nmi"] == 0.41 and clustering.iloc[0]["tau"] == 2.5
    assert clustering.iloc[0]["tau_rule"] == "label-free rule" and math.isnan(clustering.iloc[1]["tau"])
    speed = comparison.speed_table(table)
    assert len(speed) == 4 and set(speed["predict_images_per_s"]) == {10.0}


def test_old_knn_timings_give_the_speed_with_the_extraction(tmp_path):
    metrics = _detection("knn", "d", "dagm", "d", "b", 0.5)
    metrics["timings"] = {"extract_train_s": 9.0, "fit_s": 1.0, "extract_test_s": 3.0, "score_s": 1.0}
    _write(tmp_path / "01_knn_detection", "d-b", metrics)
    row = comparison.collect_reports(tmp_path, sources_hash=SOURCES).iloc[0]
    assert row["fit_s"] == 10.0 and row["predict_images_per_s"] == 40 / 4.0


def test_published_rows_are_labelled_beside_ours(project):
    table = comparison.published_table(_collect(project))
    assert set(table["kind"]) == {"this run", "published"}
    knn = table[(table["method"] == "kNN (DN2)") & (table["dataset"] == "synthetic_dagm")]
    assert list(knn["kind"]) == ["this run", "published"]
    assert knn.iloc[1]["accuracy"] == DN2_ACCURACY["DAGM"] and "synthetic" in knn.iloc[1]["what differs"]
    patchcore = table[(table["method"] == "PatchCore") & (table["kind"] == "published")]
    assert patchcore.iloc[0]["image_auroc"] == PATCHCORE["mvtec_ad/bottle"]["image_auroc"]
    clustering = table[table["method"] == "anomaly clustering"]
    published = clustering[clustering["kind"] == "published"]
    assert len(published) and not published["data"].str.contains("textures|transistor").any()  # nearest only
    assert table.columns[-1] == "what differs"


def test_summary_is_json(project):
    summary = comparison.summary(_collect(project))
    json.dumps(summary, allow_nan=False)  # NaN written as null
    assert summary["n_reports"] == 6 and summary["status_counts"] == {"ok": 3, "stale": 1, "failed": 2}
    assert summary["image_auroc_matrix"]["PatchCore · b1"]["mvtec_ad/bottle"] == 0.97
    assert summary["image_auroc_matrix"]["PatchCore · b1"]["synthetic_dagm"] is None


def test_no_reports_folder_is_an_empty_table(tmp_path):
    table = comparison.collect_reports(tmp_path / "absent", sources_hash=SOURCES)
    assert len(table) == 0 and list(table.columns) == list(comparison.REPORT_COLUMNS)
    assert len(comparison.detection_table(table)) == 0 and len(comparison.auroc_matrix(table)) == 0


# --------------------------------------------------------------------------- notebook 05


@pytest.mark.slow
def test_notebook_05_runs_on_a_reports_folder(project, tmp_path):
    import papermill

    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "05_comparison.ipynb"
    out = tmp_path / "metrics.json"
    executed = papermill.execute_notebook(
        str(notebook),
        str(tmp_path / "05.ipynb"),
        kernel_name="python3",
        progress_bar=False,
        parameters={"reports": str(project["reports"]), "metrics_out": str(out)},
        cwd=str(notebook.parent),
    )
    summary = json.loads(out.read_text())
    assert summary["method"] == "comparison" and summary["n_reports"] == 6
    detection = pd.DataFrame(summary["detection"])
    assert detection.loc[detection["method"] == "PatchCore", "image_auroc"].tolist() == [0.97]
    text = json.dumps([c.outputs for c in executed.cells if c.cell_type == "code"])
    assert "image/png" in text and re.search(r"published \(DN2 seed\)", text)


def _scored(config, scores, threshold, paths=("a", "b", "c", "d"), labels=(0, 0, 1, 1), image_auroc=0.5):
    per_image = [{"path": p, "label": y, "score": s} for p, y, s in zip(paths, labels, scores)]
    return _detection(
        "patchcore", "set", "mvtec_ad", "mvtec_ad/set", config, image_auroc, threshold=threshold, per_image=per_image
    )


def test_fusion_table_sums_threshold_normalised_scores(tmp_path):
    """Known answer: A alone 0.50, B alone 0.75; A / 1 + B / 10 = [2, 3, 4, 4.5] separates the classes (1.0).
    A data set with one report, or whose reports scored other images, gets no row."""
    folder = tmp_path / "reports" / "02_patchcore"
    _write(folder, "set-a", _scored("a", [1.0, 2.0, 3.0, 0.5], 1.0, image_auroc=0.5))
    _write(folder, "set-b", _scored("b", [10.0, 10.0, 10.0, 40.0], 10.0, image_auroc=0.75))
    other = _scored("a", [1.0, 2.0, 3.0, 0.5], 1.0)
    other["_run"]["dataset"] = "lonely"
    _write(folder, "lonely-a", other)
    for config, paths in (("a", ("a", "b", "c", "d")), ("b", ("d", "c", "b", "a"))):
        mixed = _scored(config, [1.0, 2.0, 3.0, 4.0], 1.0, paths=paths)
        mixed["_run"]["dataset"] = "mixed"
        _write(folder, f"mixed-{config}", mixed)
    table = comparison.fusion_table(comparison.collect_reports(tmp_path / "reports"))
    assert list(table["dataset"]) == ["set"]
    row = table.iloc[0]
    assert row["configs"] == "a + b" and row["best_single"] == "b" and row["image_aurocs"] == "0.500, 0.750"
    assert row["fused_auroc"] == pytest.approx(1.0) and row["gain"] == pytest.approx(0.25) and row["n_test"] == 4
    assert list(comparison.summary(comparison.collect_reports(tmp_path / "reports"))["patchcore_fusion"][0]) == list(
        comparison.FUSION_COLUMNS
    )


def test_settings_table_lists_the_settings_of_one_backbone_on_one_data_set(tmp_path):
    """Two input settings of b1 on one data set: both rows, smaller input first, each setting read
    from its metrics; a backbone with one setting only is left out."""
    folder = tmp_path / "reports" / "02_patchcore"

    def cell(config, side, mode, auroc, ratio=0.01):
        metrics = _detection(
            "patchcore",
            "tiles",
            "magnetic_tile",
            "magnetic_tile",
            config,
            auroc,
            peak_memory={"peak_rss_mb": 100.0 * side / 224},
        )
        metrics["backbone"].update(image_size=side, preprocessing={"resize_mode": mode})
        metrics["params"]["coreset_ratio"] = ratio
        return metrics

    _write(folder, "tiles-b1-448-keep", cell("b1", 448, "keep", 0.97))
    _write(folder, "tiles-b1", cell("b1", 224, "squash", 0.93, ratio=0.1))
    _write(folder, "tiles-b2", cell("b2", 224, "squash", 0.9))
    table = comparison.settings_table(comparison.collect_reports(tmp_path / "reports"))
    assert list(table["cell"]) == ["tiles-b1", "tiles-b1-448-keep"]
    assert list(table["image_size"]) == [224, 448] and list(table["resize_mode"]) == ["squash", "keep"]
    assert list(table["coreset"]) == ["10 %", "1 %"] and list(table["image_auroc"]) == [0.93, 0.97]
    assert table["peak_rss_mb"].tolist() == [100.0, 200.0]
