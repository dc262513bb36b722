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


@pytest.mark.slow
def test_evaluate_knn_on_the_synthetic_set(synthetic_root, tmp_path):
    metrics = evaluate(
        "knn", "dagm", synthetic_root, backbone="efficientnet_lite0", k=5, out=tmp_path / "run", progress=False
    )
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "accuracy",
        "threshold",
        "n_train",
        "n_test",
        "timings",
        "per_image",
        "classification_report",
    ):
        assert key in written
    assert written["synthetic"] is True
    assert written["n_test"] == len(written["per_image"]) == metrics["n_test"]
    assert written["backbone"]["weights_sha256"] and len(written["backbone"]["weights_sha256"]) == 64
    assert written["index"]["factory"] == "Flat"
    used = written["feature_cache"]  # read from the embedding cache or computed, per image set
    assert set(used) == {"normal images", "test images"}
    assert used["normal images"]["read"] + used["normal images"]["computed"] == written["n_train"]
    environment = written["environment"]  # what produced the figures; knn has no seed
    assert environment["weights_sha256"] == written["backbone"]["weights_sha256"] and "seed" not in environment
    assert environment["gpu"] == "none" and environment["device"] == "cpu"
    assert environment["threads"]["torch"] >= 1 and environment["cpu_model"]
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


@pytest.mark.slow
def test_cli_evaluate_prints_the_table(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "evaluate",
            "--method",
            "knn",
            "--dataset",
            "dagm",
            "--root",
            str(synthetic_root),
            "--backbone",
            "efficientnet_lite0",
            "--k",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "weighted avg" in printed
    assert (out / "metrics.json").is_file()


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    code = main(
        [
            "evaluate",
            "--dataset",
            "mvtec_ad",
            "--root",
            str(tmp_path / "missing"),
            "--category",
            "bottle",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing" in err and "Traceback" not in err


def test_cli_rejects_impossible_ratio(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "dagm", "--root", "x", "--out", "y", "--thres-ratio", "1.5"])
    assert "between 0 and 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- patchcore
def test_evaluate_patchcore_on_the_synthetic_set(synthetic_root, tmp_path):
    import numpy as np

    metrics = evaluate(
        "patchcore",
        "dagm",
        synthetic_root,
        category="Class1",
        backbone="efficientnet_lite0",
        image_size=128,
        coreset_ratio=0.1,
        out=tmp_path / "run",
        progress=False,
        return_maps=True,
    )
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in (
        "image_auroc",
        "image_auroc_max",
        "image_auroc_reweighted",
        "pixel_auroc",
        "pro",
        "image_f1_max",
        "image_f1_threshold",
        "pixel_f1_max",
        "pixel_f1_threshold",
        "memory_bank_size",
        "timings",
        "peak_memory",
        "per_image",
        "pixel_metrics_note",
        "threshold",
    ):
        assert key in written, key
    for key in ("fit_s", "fit_extract_s", "fit_coreset_s", "predict_s"):
        assert written["timings"][key] >= 0
    assert "anomaly_maps" not in written and "model" not in written  # in memory only
    assert metrics["anomaly_maps"].shape == (written["n_test"], 128, 128)
    assert metrics["masks"].shape == metrics["anomaly_maps"].shape and metrics["masks"].any()
    assert {"score_max", "score_reweighted"} <= set(written["per_image"][0])
    assert written["image_auroc"] == written["image_auroc_reweighted"]
    # far better than the global kNN (~0.7) on these local defects
    assert written["image_auroc"] > 0.85
    assert written["pixel_auroc"] > 0.9 and written["pro"] > 0.7
    assert "nearest" in written["pixel_metrics_note"] and written["memory_bank_size"] == int(0.1 * 22 * 256)
    labels = np.array([r["label"] for r in written["per_image"]])
    # masks line up with the maps: defect pixels score higher than the rest of their image
    maps, masks = metrics["anomaly_maps"], metrics["masks"]
    inside = [maps[i][masks[i]].mean() > maps[i][~masks[i]].mean() for i in np.flatnonzero(labels) if masks[i].any()]
    assert np.mean(inside) > 0.8


def test_masks_like_input_follow_the_resize_and_crop(tmp_path):
    import numpy as np
    from PIL import Image

    from anomalib_study.data.records import ImageRecord
    from anomalib_study.evaluate import masks_like_input

    mask = np.zeros((100, 200), dtype=np.uint8)  # H 100, W 200; defect in the right quarter
    mask[:, 150:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(mask).save(tmp_path / "i.png")
    records = [
        ImageRecord(tmp_path / "i.png", "test", 1, "cut", tmp_path / "m.png"),
        ImageRecord(tmp_path / "i.png", "test", 0),
    ]
    out = masks_like_input(records, {"resize": 50, "crop": 40})
    # shorter side 100 -> 50, width 200 -> 100; centre crop 40 keeps columns 30..69 of 100: defect starts at 75
    assert out.shape == (2, 40, 40) and not out.any()
    out = masks_like_input(records, {"resize": 50, "crop": 50})  # keeps columns 25..74: still none
    assert not out.any()
    wide = masks_like_input(records, {"resize": 100, "crop": 100})  # width 200, columns 50..149: none
    assert not wide.any()
    mask[:, 90:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = masks_like_input(records, {"resize": 50, "crop": 40})  # defect from column 45 -> crop columns 15..39
    assert out[0, :, 15:].all() and not out[0, :, :15].any() and not out[1].any()


def test_cli_evaluate_patchcore(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cli_pc"
    code = main(
        [
            "evaluate",
            "--method",
            "patchcore",
            "--dataset",
            "dagm",
            "--root",
            str(synthetic_root),
            "--category",
            "Class2",
            "--image-size",
            "96",
            "--coreset-ratio",
            "0.05",
            "--score",
            "max",
            "--sigma",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pixel AUROC" in printed and "PRO" in printed
    written = json.loads((out / "metrics.json").read_text())
    assert written["params"]["image_score"] == "max" and written["params"]["sigma"] == 2.0
    assert written["image_auroc"] == written["image_auroc_max"]


def test_cli_rejects_even_patch_size(capsys):
    with pytest.raises(SystemExit):
        main(
            ["evaluate", "--method", "patchcore", "--dataset", "dagm", "--root", "x", "--out", "y", "--patch-size", "2"]
        )
    assert "odd" in capsys.readouterr().err


def test_patchcore_coreset_ablation_rows(synthetic_root):
    from anomalib_study.backbones import load_backbone
    from anomalib_study.data import load_dataset
    from anomalib_study.evaluate import patchcore_coreset_ablation

    data = load_dataset("dagm", synthetic_root, category="Class1")
    net = load_backbone("efficientnet_lite0", image_size=128)
    result = patchcore_coreset_ablation(data, net, ratios=(0.05, 1.0), max_train_images=10)
    assert result["n_train_images"] == 10
    small, full = result["rows"]
    assert small["memory_bank_size"] < full["memory_bank_size"] == result["n_train_patches"]
    assert full["image_auroc_max"] > 0.8 and full["pixel_auroc"] > 0.85
    assert small["peak_memory_added_mb"] is not None and small["fit_s"] > 0


def test_squash_keeps_the_defect_a_centre_crop_cuts_off(tmp_path):
    import numpy as np
    from PIL import Image

    from anomalib_study.backbones import squash_preprocessing
    from anomalib_study.data.records import ImageRecord
    from anomalib_study.evaluate import masks_like_input
    from anomalib_study.plots import crop_like_input

    mask = np.zeros((100, 200), dtype=np.uint8)  # defect in the right quarter: outside any centre crop
    mask[:, 150:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(mask).save(tmp_path / "i.png")
    records = [ImageRecord(tmp_path / "i.png", "test", 1, "cut", tmp_path / "m.png")]
    crop = {"resize": 50, "crop": 40}
    assert not masks_like_input(records, crop).any()
    squash = squash_preprocessing(crop)
    assert squash["resize"] == [40, 40] and squash["resize_mode"] == "squash"
    out = masks_like_input(records, squash)  # whole image to 40 x 40: columns 150..199 of 200 -> 30..39
    assert out.shape == (1, 40, 40) and out[0, :, 30:].all() and not out[0, :, :30].any()
    picture = np.asarray(crop_like_input(tmp_path / "i.png", squash).convert("L"))
    assert picture.shape == (40, 40) and picture[:, 31:].min() > 200 and picture[:, :29].max() < 50


# ---------------------------------------------------------------------------------- autoencoder
@pytest.mark.slow
def test_evaluate_autoencoder_through_the_generic_path(synthetic_root, tmp_path):
    """The autoencoder needs nothing of evaluate but its declaration: both scores, maps and
    pixel metrics, its threshold rule, its training history, the squashed 64 px input."""
    metrics = evaluate(
        "autoencoder",
        "dagm",
        synthetic_root,
        category="Class1",
        image_size=64,
        epochs=2,
        out=tmp_path / "run",
        progress=False,
        return_maps=True,
    )
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["method"] == "autoencoder" and written["score_kinds"] == ["mse", "residual"]
    assert written["backbone"]["preprocessing"]["resize_mode"] == "squash"  # the method's own geometry
    for key in (
        "image_auroc",
        "image_auroc_mse",
        "image_auroc_residual",
        "pixel_auroc",
        "pro",
        "threshold",
        "accuracy",
        "classification_report",
        "train_scores",
    ):
        assert written[key] is not None, key
    assert written["image_auroc"] == written["image_auroc_residual"]
    assert written["params"]["epochs"] == 2 and written["epochs_run"] <= 2 and len(written["history"]) <= 2
    assert (
        "held out of training" in written["threshold_rule"]
        and "squared reconstruction" in written["pixel_metrics_note"]
    )
    assert metrics["anomaly_maps"].shape == (written["n_test"], 64, 64)
    assert {"score_mse", "score_residual", "predicted", "map_max"} <= set(written["per_image"][0])
    # trained from scratch: the backbone (only its preprocessing is used) gave no weights; the seed is recorded
    assert written["environment"]["weights_sha256"] == "none" and written["environment"]["seed"] == 0


def test_autoencoder_refuses_a_cropped_input(synthetic_root):
    with pytest.raises(ParameterError, match="works on resize_mode='squash' only"):
        evaluate("autoencoder", "dagm", synthetic_root, resize_mode="crop", epochs=1)


def test_cli_evaluate_autoencoder(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cli_ae"
    code = main(
        [
            "evaluate",
            "--method",
            "autoencoder",
            "--dataset",
            "dagm",
            "--root",
            str(synthetic_root),
            "--category",
            "Class2",
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--score",
            "mse",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pixel AUROC" in printed and "mse" in printed
    written = json.loads((out / "metrics.json").read_text())
    assert written["params"]["image_score"] == "mse" and written["image_auroc"] == written["image_auroc_mse"]


def test_an_out_that_cannot_work_is_refused_before_any_work(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    for out in (taken, taken / "below"):  # the data set does not even exist: the check comes first
        with pytest.raises(StudyError, match=r"--out .*taken is a file, not a folder"):
            evaluate("knn", "dagm", tmp_path / "no_such_set", out=out)
    code = main(["evaluate", "--dataset", "dagm", "--root", str(tmp_path / "no_such_set"), "--out", str(taken)])
    assert code == 2


@pytest.mark.slow
def test_the_folder_layout_names_its_folders_on_the_command_line(synthetic_root, tmp_path, capsys):
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(synthetic_root / "Class1" / "Train", tree / "ok_parts")
    shutil.copytree(synthetic_root / "Class1" / "Test", tree / "rejected" / "defect")
    code = main(["evaluate", "--dataset", "folder", "--root", str(tree), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "--normal NAME on the command line" in err and "Traceback" not in err
    code = main(
        [
            "evaluate",
            "--dataset",
            "folder",
            "--root",
            str(tree),
            "--normal",
            "ok_parts",
            "--anomalous",
            "rejected",
            "--k",
            "5",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 0
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert written["n_train"] > 0 and written["dataset"]["layout"] == "folder"
    code = main(["evaluate", "--dataset", "dagm", "--root", str(tree), "--normal", "x", "--out", str(tmp_path / "c")])
    assert code == 2 and "options of --dataset folder only" in capsys.readouterr().err
