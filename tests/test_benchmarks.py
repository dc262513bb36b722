"""Smoke test of benchmarks/bench_knn.py: its --quick run on tiny generated data writes a
JSON report with every key, and its small helpers give known answers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from anomalib_study.errors import DataError, ParameterError

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_knn", REPO / "benchmarks" / "bench_knn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "knn.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_report_has_every_key(quick_report):
    report = quick_report
    assert report["quick"] is True
    machine = report["machine"]
    for key in ("cpu_count", "torch_threads", "platform", "date", "load_average_1_5_15_min"):
        assert key in machine
    assert report["settings"]["search"]["factory"]

    detect = report["detect"]
    for key in ("detect_images_per_s", "backbone_images_per_s", "throughput_ratio"):
        assert _positive(detect[key]), key
    assert detect["throughput_ratio"] == pytest.approx(detect["detect_images_per_s"] / detect["backbone_images_per_s"])
    assert detect["data"]["synthetic"] is True and "SYNTHETIC" in detect["data"]["note"]
    assert detect["same_scores_as_bare_forward"] is True
    assert {"batch_size", "num_workers", "num_workers_used"} <= set(detect["detect_abnormal_defaults"])
    assert _positive(detect["detect_abnormal"]["per_image_images_per_s"])
    assert _positive(detect["profile"]["decode_preprocess_ms_per_image_one_process"])

    search = report["search"]
    for part in ("exact", "ivfpq"):
        assert _positive(search[part]["bytes_per_embedding"])
        for k in (1, 100):
            assert _positive(search[part][f"k{k}"]["queries_per_s"])
    # Flat stores d float32 per vector (plus a small header)
    assert search["exact"]["bytes_per_embedding"] == pytest.approx(4 * search["bank"]["dim"], rel=0.01)
    assert search["memory_ratio"] > 1
    for k in ("k1", "k100"):
        assert 0 <= search["recall_at_k"][k] <= 1

    cache = report["cache"]
    for key in ("cold_total_s", "warm_total_s", "cache_speedup", "cold_extract_s", "warm_extract_s"):
        assert _positive(cache[key]), key
    assert cache["runs"][0]["same_scores"] is True
    assert cache["warm_extract_s"] < cache["cold_extract_s"]

    assert set(report["ratios"]) >= {"detect / bare forward (images/s)", "cold / warm evaluate (cache_speedup)"}


def test_recall_at_k_known_answer():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 2, 1], [5, 9, 10, 11]])  # all found; one of four found
    assert bench.recall_at_k(approx, exact) == pytest.approx((1.0 + 0.25) / 2)


def test_clustered_embeddings_are_normalised_and_deterministic():
    a = bench.clustered_embeddings(300, 24, n_clusters=5, cluster_std=0.3, seed=3, intrinsic_dim=4)
    b = bench.clustered_embeddings(300, 24, n_clusters=5, cluster_std=0.3, seed=3, intrinsic_dim=4)
    assert a.shape == (300, 24) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    # clustered: each point's nearest other point is much nearer than a random pair
    distances = np.linalg.norm(a[:, None] - a[None], axis=2)
    np.fill_diagonal(distances, np.inf)
    assert np.median(distances.min(axis=1)) < 0.5 * np.median(distances[np.isfinite(distances)])


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ParameterError, match="unknown part"):
        bench.run(quick=True, parts=["detect", "bogus"])
    with pytest.raises(DataError, match="not a folder"):
        bench.run(data=tmp_path / "missing", parts=["search"])
    assert bench.main(["--data", str(tmp_path / "missing"), "--parts", "search"]) == 2


@pytest.mark.slow
def test_bench_detect_quick_streams_with_flat_memory(tmp_path):
    """bench_detect.py --quick (kNN only): two folder sizes, each in a fresh process, both in chunks."""
    spec = importlib.util.spec_from_file_location("bench_detect", REPO / "benchmarks" / "bench_detect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "detect.json"
    assert module.main(["--quick", "--methods", "knn", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    part = report["methods"]["knn"]
    small, large = part["rows"]
    assert (small["n_images"], large["n_images"]) == (60, 240) and large["n_scored"] == 240
    assert small["chunk_images"] == large["chunk_images"] == 32
    assert small["added_mb"] >= 0 and large["added_mb"] >= 0 and _positive(large["images_per_s"])
    assert part["growth_bytes_per_image"] is not None and report["settings"]["image_size"] == 64
    assert any(line.startswith("knn: added-memory ratio") for line in module.summary(report))


@pytest.mark.slow
def test_bench_autoencoder_quick_default_and_longer(tmp_path):
    """bench_autoencoder.py --quick on the synthetic set (conv model): the default run, then with
    --resume the 3x longer one (the stored default part kept, not run again)."""
    spec = importlib.util.spec_from_file_location("bench_autoencoder", REPO / "benchmarks" / "bench_autoencoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "autoencoder.json"
    assert module.main(["--quick", "--parts", "default", "--models", "conv", "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert set(first["parts_measured"]) == {"default"} and "longer" not in first
    assert first["parts_measured"]["default"]["torch_threads"] >= 1
    assert module.main(["--quick", "--parts", "default,longer", "--models", "conv", "--out", str(out), "--resume"]) == 0
    report = json.loads(out.read_text())
    assert report["default"] == first["default"]  # kept as stored, not measured again
    assert report["parts_measured"]["default"]["kept_from_earlier_run"] is True
    assert "kept_from_earlier_run" not in report["parts_measured"]["longer"]
    assert report["settings"]["parts"] == ["default", "longer"]
    assert [row["model"] for row in report["default"]] == ["conv"]
    assert report["default_train_minutes"] == max(row["train_minutes"] for row in report["default"])
    for default, longer in zip(report["default"], report["longer"]):
        assert longer["epochs_run"] == 3 * default["epochs_run"] and longer["stopped_early"] is False
        assert longer["image_auroc_residual_gain_over_default"] == pytest.approx(
            longer["image_auroc_residual"] - default["image_auroc_residual"]
        )
    assert isinstance(report["native_bf16"], bool)
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"quick": False, "default": []}))
    with pytest.raises(SystemExit, match="full report"):
        module.main(["--quick", "--parts", "longer", "--out", str(full), "--resume"])


@pytest.mark.slow
def test_bench_clustering_quick_default_options_and_scaling(tmp_path):
    """bench_clustering.py --quick on the synthetic set: the default pipeline, the exact computation
    and the cheaper options on the same features, and the cost against N."""
    spec = importlib.util.spec_from_file_location("bench_clustering", REPO / "benchmarks" / "bench_clustering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "clustering.json"
    assert module.main(["--quick", "--parts", "default,options,scaling", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["settings"]["n_images"] == 60
    for key in ("total_seconds", "peak_memory_gb", "exact_nmi", "default_nmi"):
        assert isinstance(report[key], float)
    assert report["total_seconds"] == pytest.approx(sum(report["default"]["stages_s"].values()), abs=0.01)
    assert report["default_nmi_gap"] == pytest.approx(report["default_nmi"] - report["exact_nmi"])
    assert set(report["options"]) == {"exact", "references_64", "references_128", "references_256", "distance_dim_64"}
    assert report["options"]["exact"]["settings"] == {"n_references": None}
    assert [row["n_images"] for row in report["scaling"]] == [20, 40, 60]
    assert any(line.startswith("default pipeline") for line in module.summary(report))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_patchcore_precision_cells_follow_the_study():
    """Every cell of studies/patchcore.yaml, cheapest data set first, then the cells it uses; without real
    data only the synthetic cells run, the others are skipped with the reason; notebook-only keys are dropped."""
    module = _load_script("bench_patchcore_precision")
    cells = module.study_cells(None)
    names = [name for name, _, _ in cells]
    assert len(names) == 18 and names[:2] == ["synthetic_dagm-dinov2_vits14", "synthetic_dagm-efficientnet_lite0"]
    assert names[-6:] == [
        "magnetic_tile-dinov2_vits14",
        "magnetic_tile-efficientnet_lite0",
        "kolektorsdd-dinov2_vits14-322-keep",
        "kolektorsdd-dinov2_vits14-448-keep",
        "magnetic_tile-dinov2_vits14-448-keep",
        "magnetic_tile-448-keep-coreset10",
    ]
    for name, kwargs, reason in cells:
        assert (kwargs is None) == (reason is not None) == (not name.startswith("synthetic_dagm"))
    kwargs = cells[0][1]
    assert kwargs["coreset_ratio"] == 0.1 and kwargs["backbone"] == "dinov2_vits14"
    assert not set(module.NOTEBOOK_ONLY) & set(kwargs)
    assert [name for name, _, _ in module.study_cells(None, ["mvtec_ad-*"])] == [
        "mvtec_ad-bottle-dinov2_vits14",
        "mvtec_ad-bottle-efficientnet_lite0",
        "mvtec_ad-transistor-dinov2_vits14",
        "mvtec_ad-transistor-efficientnet_lite0",
    ]


@pytest.mark.slow
def test_bench_patchcore_precision_quick_compares_fp32_and_bf16(tmp_path):
    """--quick: one tiny cell fitted in fp32 and in bf16; the changes are bf16 - fp32, the hit rate a
    share of the test patches, and bf16 is never allowed as the default from a partial measurement."""
    module = _load_script("bench_patchcore_precision")
    out = tmp_path / "precision.json"
    assert module.main(["--quick", "--hit-images", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and list(report["cells"]) == ["synthetic_dagm-efficientnet_lite0"]
    row = report["cells"]["synthetic_dagm-efficientnet_lite0"]
    assert row["fp32"]["precision_used"] == "fp32" and row["bf16"]["precision_used"] == "bf16"
    for key in module.METRICS:
        assert row["changes"][key] == pytest.approx(row["bf16"][key] - row["fp32"][key])
    hit = row["rerank_hit_rate"]
    assert hit["n_images"] == 2 and hit["n_queries"] > 0 and 0.0 <= hit["hit_rate"] <= 1.0
    assert hit["n_hits"] == round(hit["hit_rate"] * hit["n_queries"])
    assert report["every_study_cell_measured"] is False and report["bf16_default_allowed"] is False
    # each measured cell says on what it ran: a resumed report may mix native and emulated bf16
    from anomalib_study.hardware import native_bf16

    assert row["measured"]["native_bf16"] is native_bf16("cpu") and row["measured"]["torch_threads"] >= 1
    assert report["native_bf16_by_cell"] == {"synthetic_dagm-efficientnet_lite0": native_bf16("cpu")}


def test_bench_patchcore_precision_refuses_zero_hit_images():
    module = _load_script("bench_patchcore_precision")
    with pytest.raises(SystemExit) as exc:
        module.main(["--quick", "--hit-images", "0"])
    assert exc.value.code == 2


def test_bench_clustering_options_rows_are_chosen_and_checked(tmp_path):
    """--options names the rows of the options part (exact only here); an unknown row is refused."""
    module = _load_script("bench_clustering")
    out = tmp_path / "clustering.json"
    assert module.main(["--quick", "--parts", "default,options", "--options", "exact", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["options"]) == ["exact"]
    assert report["default_nmi_gap"] == pytest.approx(report["default_nmi"] - report["exact_nmi"])
    with pytest.raises(SystemExit):
        module.main(["--quick", "--options", "exact,bogus"])


def test_bench_patchcore_precision_stored_only_summarises_without_measuring(tmp_path):
    """--stored-only: the stored cell is kept (its committed check recomputed: 1e-7 apart is a match), the
    other synthetic cell is listed as not measured; one change above 0.002 puts the cell outside the tolerance."""
    module = _load_script("bench_patchcore_precision")
    figures = {"image_auroc": 0.9, "pixel_auroc": 0.8, "pro": 0.7}
    row = {
        "fp32": dict(figures),
        "bf16": {**figures, "image_auroc": 0.91},
        "changes": {"image_auroc": 0.01, "pixel_auroc": 0.0, "pro": 0.0},
        "within_tolerance": False,
        "rerank_hit_rate": {"hit_rate": 0.99, "n_queries": 100, "n_hits": 99, "rerank": 8, "n_images": 1},
        "committed": {**figures, "pro": 0.7 + 1e-7},
    }
    out = tmp_path / "precision.json"
    io_write = json.dumps({"cells": {"synthetic_dagm-efficientnet_lite0": row}})
    out.write_text(io_write)
    assert module.main(["--stored-only", "--only", "synthetic_dagm-*", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["cells"]) == ["synthetic_dagm-efficientnet_lite0"]
    assert report["not_measured"] == ["synthetic_dagm-dinov2_vits14"]
    kept = report["cells"]["synthetic_dagm-efficientnet_lite0"]
    assert kept["fp32_matches_committed"] is True and kept["fp32_vs_committed_max_diff"] == pytest.approx(1e-7)
    assert report["cells_outside_tolerance"] == ["synthetic_dagm-efficientnet_lite0"]
    assert report["max_abs_change"] == pytest.approx(0.01) and report["bf16_default_allowed"] is False


def test_bench_patchcore_precision_resume_keeps_cells_that_only_leaves_out(tmp_path):
    """--resume --only 'x': a stored cell that the pattern leaves out stays in the report."""
    module = _load_script("bench_patchcore_precision")
    figures = {"image_auroc": 0.9, "pixel_auroc": None, "pro": None}
    row = {
        "fp32": dict(figures),
        "bf16": dict(figures),
        "changes": {"image_auroc": 0.0, "pixel_auroc": None, "pro": None},
        "within_tolerance": True,
        "committed": None,
        "rerank_hit_rate": {"hit_rate": 1.0, "n_queries": 10, "n_hits": 10, "rerank": 8, "n_images": 1},
    }
    out = tmp_path / "precision.json"
    out.write_text(
        json.dumps({"cells": {"synthetic_dagm-efficientnet_lite0": row, "synthetic_dagm-dinov2_vits14": row}})
    )
    assert module.main(["--stored-only", "--only", "*-dinov2_vits14", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["cells"]) == {"synthetic_dagm-dinov2_vits14", "synthetic_dagm-efficientnet_lite0"}
    assert report["cells"]["synthetic_dagm-efficientnet_lite0"]["fp32_matches_committed"] is None
    assert report["max_abs_change"] == 0.0 and report["every_study_cell_measured"] is False
    # stored rows from before the per-cell record were measured where bf16 was emulated
    assert report["native_bf16_by_cell"] == {
        "synthetic_dagm-dinov2_vits14": False,
        "synthetic_dagm-efficientnet_lite0": False,
    }


def test_bench_patchcore_precision_keeps_stored_real_cells_when_the_data_is_absent(tmp_path):
    """A --resume run where the real data cannot be found measures what it can and keeps every stored real-data
    cell: a missing data folder never wipes earlier measurements."""
    module = _load_script("bench_patchcore_precision")
    figures = {"image_auroc": 0.9, "pixel_auroc": 0.8, "pro": 0.7}
    row = {
        "fp32": dict(figures),
        "bf16": dict(figures),
        "changes": {k: 0.0 for k in figures},
        "within_tolerance": True,
        "committed": None,
        "rerank_hit_rate": {"hit_rate": 1.0, "n_queries": 10, "n_hits": 10, "rerank": 8, "n_images": 1},
    }
    out = tmp_path / "precision.json"
    out.write_text(json.dumps({"cells": {"mvtec_ad-bottle-dinov2_vits14": row}}))
    report = module.run(None, ["mvtec_ad-bottle-*"], 1, out, resume=True, stored_only=True)
    assert "mvtec_ad-bottle-dinov2_vits14" in report["cells"]
    assert "mvtec_ad-bottle-dinov2_vits14" not in report["skipped"]
    assert "mvtec_ad-bottle-efficientnet_lite0" in report["skipped"]
    assert "mvtec_ad-bottle-dinov2_vits14" in json.loads(out.read_text())["cells"]


def test_bench_patchcore_precision_compares_another_setting(tmp_path, capsys):
    """--compare fp32@8: the tiny cell in fp32 and with the search's candidates from 8 principal components of the
    bank (re-ranked exactly); the report names the comparison, and a stored row of another comparison is not reused."""
    module = _load_script("bench_patchcore_precision")
    out = tmp_path / "compare.json"
    assert module.main(["--quick", "--hit-images", "1", "--compare", "fp32@8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["cells"]["synthetic_dagm-efficientnet_lite0"]
    assert report["compared"] == row["compared"] == "fp32@8" and set(row) >= {"fp32", "fp32@8", "changes"}
    assert row["fp32@8"]["precision_used"] == "fp32" and "bf16_default_allowed" not in report
    for key in module.METRICS:
        assert row["changes"][key] == pytest.approx(row["fp32@8"][key] - row["fp32"][key])
    assert "fp32@8 may be the default: False" in capsys.readouterr().out
    assert module.main(["--quick", "--compare", "fp32"]) == 2
    assert module.main(["--quick", "--compare", "fp16@8"]) == 2
    # a bf16 row stored in the file is not taken for this comparison
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"cells": {"mvtec_ad-bottle-dinov2_vits14": {**row, "compared": "bf16"}}}))
    kept = module.run(None, ["mvtec_ad-bottle-*"], 1, other, resume=True, stored_only=True, compare="fp32@8")
    assert kept["cells"] == {}


def test_bench_ae_reproducibility_quick_repeats_bit_for_bit(tmp_path):
    """bench_ae_reproducibility.py --quick: one seed, one thread count, trained twice in two fresh
    processes; the same seed and thread count on one machine give the same losses and figures."""
    module = _load_script("bench_ae_reproducibility")
    out = tmp_path / "ae_reproducibility.json"
    assert module.main(["--quick", "--seeds", "0", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["committed_report"] is None
    assert [(r["seed"], r["threads"]) for r in report["runs"]] == [(0, 1)]
    assert report["repeat"]["identical"] is True
    assert report["repeat"]["run"]["val_losses"] == report["runs"][0]["val_losses"]
    assert report["over_seeds"]["1"]["image_auroc"]["range"] == 0.0
    assert report["all_runs"]["epochs_run"] == [1]
    assert isinstance(report["machine"]["native_bf16"], bool)
    assert any(line.startswith("repeat of seed 0 with 1 thread(s): bit for bit") for line in module.summary(report))


def test_bench_ae_reproducibility_refuses_bad_arguments(capsys):
    module = _load_script("bench_ae_reproducibility")
    with pytest.raises(SystemExit):
        module.main(["--quick", "--threads", "0"])
    with pytest.raises(SystemExit, match="is not a cell"):
        module.cell_arguments("no-such-cell", None, quick=False)
