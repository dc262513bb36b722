"""evaluate() and `anomalib-study evaluate` end to end on the synthetic set with the real EfficientNet-Lite0."""

from __future__ import annotations

import json

import pytest

from anomalib_study.cli import main
from anomalib_study.data.synthetic import make_synthetic_dagm
from anomalib_study.errors import ParameterError, StudyError
from anomalib_study.evaluate import evaluate


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return make_synthetic_dagm(tmp_path_factory.mktemp("synthetic"), seed=0)


def test_evaluate_knn_on_the_synthetic_set(synthetic_root, tmp_path):
    metrics = evaluate("knn", "dagm", synthetic_root, backbone="efficientnet_lite0", k=5, out=tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("image_auroc", "accuracy", "threshold", "n_train", "n_test", "timings", "per_image", "classification_report"):
        assert key in written
    assert written["synthetic"] is True
    assert written["n_test"] == len(written["per_image"]) == metrics["n_test"]
    assert written["backbone"]["weights_sha256"] and len(written["backbone"]["weights_sha256"]) == 64
    assert written["index"]["factory"] == "Flat"
    # the synthetic defects are visible to an ImageNet CNN: far better than chance
    assert written["image_auroc"] > 0.7
    report = written["classification_report"]
    assert {"normal", "anomalous", "macro avg", "weighted avg"} <= set(report)
    assert report["normal"]["support"] + report["anomalous"]["support"] == written["n_test"]


def test_evaluate_refuses_to_overwrite(synthetic_root, tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(StudyError, match="never overwritten"):
        evaluate("knn", "dagm", synthetic_root, out=tmp_path)
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_unknown_method_is_named():
    with pytest.raises(ParameterError, match="unknown method 'lof'"):
        evaluate("lof", "dagm", "anywhere")


def test_cli_evaluate_prints_the_table(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["evaluate", "--method", "knn", "--dataset", "dagm", "--root", str(synthetic_root),
                 "--backbone", "efficientnet_lite0", "--k", "5", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "weighted avg" in printed
    assert (out / "metrics.json").is_file()


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(["evaluate", "--dataset", "mvtec_ad", "--root", str(tmp_path / "missing"), "--category", "bottle",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing" in err and "Traceback" not in err


def test_cli_rejects_impossible_ratio(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "dagm", "--root", "x", "--out", "y", "--thres-ratio", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err
