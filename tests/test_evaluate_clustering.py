"""evaluate("clustering", ...) and `anomalib-study evaluate --method clustering` on the synthetic set
(EfficientNet-Lite0 at 64 px: an 8 x 8 patch grid, so that it runs in seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomalib_study.cli import main
from anomalib_study.data.synthetic import make_synthetic_dagm
from anomalib_study.errors import ParameterError, StudyError
from anomalib_study.evaluate import evaluate
from anomalib_study.methods.clustering import TAU_FACTORS
from anomalib_study.metrics import clustering_metrics


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic_dagm(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="module")
def metrics(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    evaluate("clustering", "dagm", synthetic_root, image_size=64, out=out, progress=False, coreset_ratio=0.5)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_every_mode_is_scored_against_the_types(metrics):
    assert metrics["task"] == "clustering" and set(metrics["modes"]) == {"unsupervised", "semi_supervised", "average"}
    protocol = metrics["protocol"]
    assert protocol["name"] == "reproduction" and protocol["n_clusters"] == protocol["n_classes"] == 4
    assert protocol["class_counts"] == {"blob": 12, "good": 24, "scratch": 12, "spot": 12}
    assert protocol["n_images"] == 60 and len(metrics["per_image"]) == 60
    types = [row["defect_type"] for row in metrics["per_image"]]
    for mode, row in metrics["modes"].items():
        labels = [r[f"cluster_{mode}"] for r in metrics["per_image"]]
        again = clustering_metrics(types, labels)
        assert row["nmi"] == pytest.approx(again["nmi"]) and metrics[f"nmi_{mode}"] == row["nmi"]
        assert row["ari"] == pytest.approx(again["ari"]) and row["f1"] == pytest.approx(again["f1"])
        assert np.sum(row["confusion"]["counts"]) == protocol["n_images"]
        used = row["patch_cache"]  # every mode clusters the test images' patch features: their cache use is its own
        assert used["anomaly clustering: patch features"]["patch_cache"] in ("hit", "extracted")
        assert ("anomaly clustering: normal patch features" in used) == (mode == "semi_supervised")
    assert metrics["modes"]["average"]["tau"] is None and metrics["modes"]["average"]["tau_curve"] == []
    assert metrics["environment"]["weights_sha256"] == metrics["backbone"]["weights_sha256"]
    assert metrics["environment"]["seed"] == 0


def test_tau_is_label_free_and_the_oracle_is_labelled(metrics):
    row = metrics["modes"]["unsupervised"]
    assert "label-free" in row["tau_rule"] and row["tau"] > 0
    curve = row["tau_curve"]
    assert [point["relative"] for point in curve] == [f if np.isfinite(f) else "inf" for f in TAU_FACTORS]
    assert curve[0]["tau"] == 0.0 and curve[-1]["tau"] is None  # top patch only ... uniform weights
    at_one = [p for p in curve if p["relative"] == 1.0][0]
    assert at_one["nmi"] == pytest.approx(row["nmi"]) and row["taus"] is None  # the curve's x 1 is the result
    assert row["oracle"]["nmi"] == max(p["nmi"] for p in curve) and "never our result" in row["oracle"]["note"]


def test_anomalous_only_protocol_and_one_mode(synthetic_root, tmp_path):
    result = evaluate(
        "clustering",
        "dagm",
        synthetic_root,
        image_size=64,
        progress=False,
        modes=["average"],
        protocol="anomalous_only",
    )
    assert set(result["modes"]) == {"average"}
    assert "good" not in result["protocol"]["class_counts"] and result["protocol"]["n_clusters"] == 3


def test_bad_clustering_parameters_are_refused_before_any_work(synthetic_root):
    with pytest.raises(ParameterError, match="modes must be"):
        evaluate("clustering", "dagm", synthetic_root, modes=["supervised"])
    with pytest.raises(StudyError, match="protocol must be one of"):
        evaluate("clustering", "dagm", synthetic_root, protocol="all", image_size=64, progress=False)
    with pytest.raises(StudyError, match="detection methods have one protocol"):
        evaluate("knn", "dagm", synthetic_root, protocol="reproduction", progress=False)


def test_impossible_groupings_are_refused_before_the_features(synthetic_root, tmp_path, monkeypatch):
    from anomalib_study.methods import clustering

    monkeypatch.setattr(clustering.AnomalyClustering, "extract", lambda *a, **k: pytest.fail("features extracted"))
    with pytest.raises(StudyError, match="n_clusters=99 is more than the 60 images"):
        evaluate("clustering", "dagm", synthetic_root, image_size=64, progress=False, n_clusters=99)
    neu = tmp_path / "neu_det" / "IMAGES"  # defect images only, as NEU-DET: no semi-supervised mode
    neu.mkdir(parents=True)
    for kind in ("scratches", "patches"):
        for i, path in enumerate(sorted((synthetic_root / "Class1" / "Test").glob("*.PNG"))[:3]):
            (neu / f"{kind}_{i + 1}.jpg").write_bytes(path.read_bytes())
    with pytest.raises(StudyError, match="has no training images"):
        evaluate("clustering", "neu_det", neu.parent, image_size=64, progress=False, modes=["semi_supervised"])


def test_cli_evaluate_clustering_prints_the_table(synthetic_root, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--method",
            "clustering",
            "--dataset",
            "dagm",
            "--root",
            str(synthetic_root),
            "--image-size",
            "64",
            "--modes",
            "unsupervised,average",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "unsupervised" in printed and "NMI" in printed
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["protocol"]["name"] == "reproduction"
    code = main(
        [
            "evaluate",
            "--method",
            "knn",
            "--dataset",
            "dagm",
            "--root",
            str(synthetic_root),
            "--tau",
            "1",
            "--out",
            str(tmp_path / "knn"),
        ]
    )
    assert code == 2 and "option of method clustering" in capsys.readouterr().err
