"""The command line: each command runs, and bad input ends in one line naming the problem (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_study.cli import main


def _images(folder: Path, n: int, seed: int, spot: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = (120 + rng.normal(0, 6, (48, 48, 3))).clip(0, 255)
        if spot:
            pixels[14:34, 14:34] = [250, 20, 20]
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_detect_builds_database_then_flags_the_odd_images(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    normal = _images(tmp_path / "normal", 10, 0)
    test = _images(tmp_path / "test", 3, 1)
    _images(tmp_path / "test" / "odd", 2, 2, spot=True)
    args = [
        "detect",
        str(test),
        "--image-dir",
        str(normal),
        "--db-dir",
        str(tmp_path / "db"),
        "--k",
        "3",
        "--num-workers",
        "0",
        "--batch-size",
        "4",
    ]
    assert main(args) == 0
    assert (tmp_path / "db" / "database.json").is_file()
    runs = sorted((tmp_path / "result").iterdir())
    flagged = (runs[0] / "abnormal.result").read_text().splitlines()
    assert {Path(p).parent.name for p in flagged} == {"odd"}
    assert main(args) == 0  # loads the database; a second, separate run folder
    assert len(list((tmp_path / "result").iterdir())) == 2
    assert "flagged anomalous" in capsys.readouterr().out


def test_detect_on_empty_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    _images(tmp_path / "normal", 4, 0)
    code = main(["detect", str(tmp_path / "empty"), "--image-dir", str(tmp_path / "normal"), "--num-workers", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "empty" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    names = capsys.readouterr().out.split()
    assert {"efficientnet_lite0", "dinov2_vits14", "clip_vit_b32", "wide_resnet50_2"} <= set(names)


def test_missing_weights_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ANOMALIB_STUDY_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _images(tmp_path / "normal", 4, 0)
    code = main(
        [
            "detect",
            str(tmp_path / "normal"),
            "--image-dir",
            str(tmp_path / "normal"),
            "--model-name",
            "wide_resnet50_2",
            "--db-dir",
            str(tmp_path / "db"),
            "--result-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "wide_resnet50_2" in err and "ANOMALIB_STUDY_WEIGHTS" in err and "Traceback" not in err


def test_make_synthetic(tmp_path, capsys):
    assert main(["make-synthetic", str(tmp_path / "syn")]) == 0
    assert (tmp_path / "syn" / "synthetic.json").is_file()


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "invalid choice" in capsys.readouterr().err


def test_detect_patchcore_end_to_end_with_overlays(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    normal = _images(tmp_path / "normal", 8, 0)
    test = _images(tmp_path / "test", 2, 1)
    _images(tmp_path / "test" / "odd", 2, 2, spot=True)
    args = [
        "detect",
        str(test),
        "--method",
        "patchcore",
        "--coreset-ratio",
        "0.1",
        "--image-size",
        "64",
        "--calibration-fraction",
        "0.25",
        "--image-dir",
        str(normal),
        "--num-workers",
        "0",
        "--batch-size",
        "8",
    ]
    code = main(args)
    captured = capsys.readouterr()
    if code == 2 and "weights" in captured.err:
        pytest.skip(f"efficientnet_lite0 weights not installed: {captured.err.strip()}")
    assert code == 0, captured.err
    assert (tmp_path / "patchcore_db" / "patchcore_model.npz").is_file()  # the default patchcore db_dir
    run = next((tmp_path / "result").iterdir())
    flagged = (run / "abnormal.result").read_text().splitlines()
    assert {Path(p).parent.name for p in flagged} == {"odd"} and len(flagged) == 2
    assert sorted(p.name for p in (run / "overlays" / "odd").iterdir()) == ["00.jpg", "01.jpg"]
    assert "overlays" in captured.out
    assert main(args) == 0  # loads the database; a second run folder
    assert len(list((tmp_path / "result").iterdir())) == 2
    capsys.readouterr()
    # a kNN run pointed at the PatchCore database: one line, no traceback
    code = main(["detect", str(test), "--image-dir", str(normal), "--db-dir", str(tmp_path / "patchcore_db")])
    err = capsys.readouterr().err
    assert code == 2 and "built for method 'patchcore', not 'knn'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_detect_bad_calibration_fraction_is_one_line(tmp_path, capsys):
    _images(tmp_path / "normal", 2, 0)
    code = main(
        [
            "detect",
            str(tmp_path / "normal"),
            "--method",
            "patchcore",
            "--calibration-fraction",
            "0",
            "--image-dir",
            str(tmp_path / "normal"),
            "--result-dir",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "calibration_fraction" in err and "Traceback" not in err


def test_detect_resize_mode_squash_is_stored_in_the_database(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    normal = _images(tmp_path / "normal", 6, 0)
    args = [
        "detect",
        str(normal),
        "--image-dir",
        str(normal),
        "--db-dir",
        str(tmp_path / "db"),
        "--k",
        "2",
        "--num-workers",
        "0",
        "--batch-size",
        "4",
        "--resize-mode",
        "squash",
    ]
    assert main(args) == 0
    stored = json.loads((tmp_path / "db" / "database.json").read_text())
    assert stored["backbone"]["preprocessing"]["resize_mode"] == "squash"
    assert main(args[:-2]) == 0  # default (crop) asked: the database's own squash backbone is used


def test_resize_mode_choices_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--dataset", "dagm", "--root", "x", "--out", "y", "--resize-mode", "stretch"])
    assert "invalid choice" in capsys.readouterr().err


def test_detect_skips_broken_files_with_one_summary_line_or_refuses_them_with_strict(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    normal, test = _images(tmp_path / "normal", 6, 0), _images(tmp_path / "test", 3, 1)
    (test / "zero.png").write_bytes(b"")
    (test / "text.jpg").write_text("not an image")
    common = [
        "--image-dir",
        str(normal),
        "--db-dir",
        str(tmp_path / "db"),
        "--k",
        "2",
        "--num-workers",
        "0",
        "--batch-size",
        "4",
        "--image-size",
        "64",
    ]
    code = main(["detect", str(test), "--strict", *common])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and errors[0].endswith(
        "anomalib-study detect: error: 2 image(s) in test_dir "
        f"{test} cannot be read, and strict=True (--strict) refuses them; "
        "nothing was done: remove or replace them, or run without --strict "
        "to score the others and list these in skipped.csv:"
    )
    assert "zero.png" in err and "text.jpg" in err and not (tmp_path / "db").exists()

    assert main(["detect", str(test), *common]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "could not be read" in line]
    assert warning == [line for line in warning if line.startswith("anomalib-study detect: warning: 2 of 5 test")]
    assert len(warning) == 1 and "skipped.csv" in warning[0]
    assert "flagged anomalous" in captured.out


def test_detect_refuses_an_option_of_another_method(tmp_path, capsys):
    code = main(["detect", str(tmp_path), "--method", "patchcore", "--k", "3"])
    assert code == 2 and "--k is an option of method knn, not of patchcore" in capsys.readouterr().err


def test_a_full_disk_outside_the_atomic_writes_is_one_line_too(monkeypatch, capsys):
    import errno

    from anomalib_study import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/bank.memmap")

    monkeypatch.setitem(cli._COMMANDS, "backbones", full)
    assert cli.main(["backbones"]) == 2
    err = capsys.readouterr().err
    assert "error: no space left on the device writing /somewhere/bank.memmap" in err and "Traceback" not in err
